"""One-command check of the GPU path: the compiled Triton kernels on CUDA, then their benchmark.

Usage::

    python -m benchmarks.gpu_check                   # checks + GPU benchmark, one summary block
    python -m benchmarks.gpu_check --no-bench        # the correctness checks only
    python -m benchmarks.gpu_check --json out.json   # also write every check's result

It needs torch and triton only (``kernels`` imports nothing else of the project; pytest is
not needed). First every case of ``tests/kernels/ntxent_reference.py`` -- loss and both gradients
against the fp64 reference, fp32 / bf16 / fp16, pairs, groups, batched, strided -- runs on
CUDA through the compiled Triton kernels and through the torch path, and every autotuning
candidate of both kernels is checked; then the GPU half of ``python -m benchmarks.ntxent`` runs
(eager naive, ``torch.compile``d naive, Triton; bf16; 4k-64k pairs). It stops starting
baseline benchmark cases at ``BUDGET_S`` so that the whole check ends within 5 minutes on one
GPU (the Triton rows, seconds each, always run).

Exit status: 0 when everything passed, or when there is no GPU (it says so in one line);
1 when a check or a Triton benchmark row failed; 2 when it cannot check (triton missing,
or ``TRITON_INTERPRET=1`` set, which would interpret the kernels instead of compiling them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from benchmarks.ntxent import DIM, GPU_PAIRS, MIB, gpu_ratios, run_gpu_table
from kernels import ntxent
from tests.kernels.ntxent_reference import CASES, check_every_block_config

#: Seconds after the start past which no further baseline benchmark case starts: the longest
#: one (a ``torch.compile``) takes about a minute and the whole check must end within 5 minutes.
BUDGET_S = 220.0
IMPLS = ("triton", "torch")
#: dtypes of the every-candidate check (fp16 takes bf16's code path with another element type).
CONFIG_DTYPES = (torch.float32, torch.bfloat16)


def named_checks(device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """Return every check as ``(name, run)``; ``run()`` raises AssertionError on a mismatch.

    Args:
        device: the device the checks run on (building the list runs nothing).
    """
    checks = [(f"{case.name}[{impl}]", partial(case.run, impl, device)) for case in CASES for impl in IMPLS]
    checks += [
        (f"every-block-config[{str(dtype).removeprefix('torch.')}]", partial(check_every_block_config, device, dtype))
        for dtype in CONFIG_DTYPES
    ]
    return checks


def run_checks(device: torch.device) -> dict[str, dict]:
    """Run :func:`named_checks` on ``device``, printing one line per check.

    Returns:
        ``{name: {"ok": bool, "seconds": float, "error": str}}`` (``error`` empty when ok).
    """
    results: dict[str, dict] = {}
    for name, check in named_checks(device):
        start = time.monotonic()
        try:
            check()
            error = ""
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
            error = f"{type(exc).__name__}: {exc}".strip()
        seconds = time.monotonic() - start
        results[name] = {"ok": not error, "seconds": seconds, "error": error}
        flat = " | ".join(line.strip() for line in error.splitlines() if line.strip())
        print(f"  {'ok  ' if not error else 'FAIL'} {name:<40} {seconds:6.2f} s  {flat[:160]}", flush=True)
    return results


def device_line() -> str:
    """The card, its compute capability and the versions that matter, in one line."""
    import triton

    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return (
        f"{torch.cuda.get_device_name()} (sm {capability}), torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
    )


def summary(device: str, results: dict[str, dict], table: dict | None, seconds: float) -> tuple[list[str], bool]:
    """Return the summary block's lines and whether everything passed.

    Args:
        device: the first line's description of the machine (:func:`device_line`).
        results: what :func:`run_checks` returned.
        table: what :func:`benchmarks.ntxent.run_gpu_table` returned, or None (``--no-bench``).
        seconds: the check's wall time so far.
    """
    failed = [name for name, res in results.items() if not res["ok"]]
    lines = [
        f"device   {device}",
        f"checks   {len(results) - len(failed)}/{len(results)} passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
    ]
    ok = not failed
    if table is not None:
        lines.append(f"matmul   bf16 {table['matmul_tflops']:.1f} TFLOP/s (the 100 % mark)")
        lines.append(
            f"         {'pairs':>6} {'eager_ms':>9} {'compiled_ms':>11} {'triton_ms':>9} "
            f"{'%matmul':>7} {'triton_MiB':>10} {'eager_MiB':>9}  blocks"
        )
        by_key = {(row["impl"], row["pairs"]): row for row in table["rows"]}
        for pairs in sorted({row["pairs"] for row in table["rows"]}):
            eager, comp, tri = (by_key.get((impl, pairs), {}) for impl in ("eager", "compiled", "triton"))
            if "error" in tri:
                ok = False
            blocks = "; ".join(f"{k} {v}" for k, v in tri.get("blocks", {}).items())
            cells = (
                f"{pairs:>6} {_cell(eager, 'ms', 9)} {_cell(comp, 'ms', 11)} {_cell(tri, 'ms', 9)} "
                f"{_cell(tri, 'share', 7)} {_cell(tri, 'peak_bytes', 10)} {_cell(eager, 'peak_bytes', 9)}"
            )
            lines.append(f"         {cells}  {blocks}".rstrip())
        lines += [f"         {line}" for line in gpu_ratios(table["rows"], table["dim"], table["matmul_tflops"])]
    lines.append(f"time     {seconds:.0f} s (limit 300 s)")
    lines.append(f"result   {'PASS' if ok else 'FAIL'}")
    return lines, ok


def _cell(row: dict, key: str, width: int) -> str:
    """Format one table cell: ms, a share in %, or bytes in MiB; the row's error in short."""
    if "error" in row:
        short = {"out of memory": "OOM", "skipped (time budget)": "skipped"}.get(row["error"], "failed")
        return f"{short:>{width}}"
    if key not in row or row[key] is None:
        return f"{'-':>{width}}"
    value = row[key]
    text = {"ms": f"{value:.3f}", "share": f"{100 * value:.1f}%", "peak_bytes": f"{value / MIB:.0f}"}[key]
    return f"{text:>{width}}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (see the module docstring); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="run the correctness checks only")
    parser.add_argument("--json", type=Path, help="write every check's result to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check.")
        return 0
    if ntxent.ntxent_forward is None:
        print("gpu_check: triton is not installed; install it (pip install triton) to check the GPU kernels.")
        return 2
    if ntxent.INTERPRETED:
        print("gpu_check: TRITON_INTERPRET=1 is set, so the kernels would be interpreted, not compiled; unset it.")
        return 2
    start = time.monotonic()
    device = torch.device("cuda")
    print(f"gpu_check: {len(named_checks(device))} checks on {torch.cuda.get_device_name()}", flush=True)
    results = run_checks(device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = None
    if not args.no_bench:
        table = run_gpu_table(GPU_PAIRS, DIM, device, torch.bfloat16, deadline=start + BUDGET_S)
    lines, ok = summary(device_line(), results, table, time.monotonic() - start)
    print("=" * 30 + " benchmarks.gpu_check summary " + "=" * 30)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
