"""Benchmark of the NT-Xent loss: naive (materialising) against the chunked torch path / Triton.

Prints tables and ratios; asserts nothing (the goals are printed next to the numbers).

Usage::

    python -m benchmarks.ntxent                         # CPU table; GPU table too when CUDA is present
    python -m benchmarks.ntxent --cpu-pairs 1024 8192   # chosen CPU sizes only
    python -m benchmarks.ntxent --no-cpu                # GPU table only
    TRITON_INTERPRET=1 python -m benchmarks.ntxent --smoke   # GPU code path on the CPU, tiny sizes

CPU: forward + backward in fp32 at D = 128, each (size, implementation) in its own
subprocess so peak RSS is per case; the fp32 matmul rate is measured in the same process
right before the case, because other work on the machine moves both numbers together.
GPU: bf16, eager naive vs ``torch.compile``d naive vs the Triton kernels, timed with
``triton.testing.do_bench``; memory is ``max_memory_allocated`` above the inputs; each Triton
row is followed by the block configurations the autotuner chose for that size.
``python -m benchmarks.gpu_check`` runs this GPU half after the CUDA correctness checks.
FLOPs are counted as 3 matmuls of the (2N x 2N x D) similarity: ``3 * 2 * (2N)^2 * D``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from kernels.ntxent import nt_xent

CPU_PAIRS = (1024, 4096, 8192, 16384, 32768, 65536)
GPU_PAIRS = (4096, 8192, 16384, 32768, 65536)
SMOKE_PAIRS = (64, 150)
DIM = 128
TEMPERATURE = 0.1
GIB = 2**30
MIB = 2**20
#: Bytes per logit the naive loss is assumed to need before one size has been measured.
NAIVE_BYTES_PER_LOGIT = 16.0
#: Fraction of the available RAM a naive case may be predicted to use before it is skipped.
RAM_SAFETY = 0.5

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def naive_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The usual materialising NT-Xent (lightly / MONAI style): the whole 2N x 2N matrix.

    Args:
        z0: (N, D) first views.
        z1: (N, D) second views.
        temperature: the softmax temperature.

    Returns:
        The scalar mean loss.
    """
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=-1)
    logits = torch.einsum("id,jd->ij", z, z) / temperature
    diag_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(diag_mask, float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def torch_path(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """The chunked torch path of :func:`kernels.nt_xent`."""
    return nt_xent(z0, z1, temperature=TEMPERATURE, impl="torch")


def triton_path(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """The Triton kernels of :func:`kernels.nt_xent`."""
    return nt_xent(z0, z1, temperature=TEMPERATURE, impl="triton")


def loss_flops(pairs: int, dim: int) -> float:
    """FLOPs of forward + backward: three (2N x D) @ (D x 2N)-sized matmuls."""
    return 3 * 2 * (2 * pairs) ** 2 * dim


def forward_backward(loss_fn: LossFn, z0: torch.Tensor, z1: torch.Tensor) -> None:
    """Run the loss and its backward once (gradients accumulate into ``z0.grad``, ``z1.grad``)."""
    loss_fn(z0, z1).backward()


# --------------------------------------- CPU -------------------------------------------


def cpu_matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this process on a ``size``-cube, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool, code paths
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    """MemAvailable of the machine."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_cpu_case(impl: str, pairs: int, dim: int) -> dict[str, float | int | str]:
    """Time one implementation in this process and measure its peak RSS above its inputs.

    Args:
        impl: ``"naive"`` or ``"torch"``.
        pairs: N, the number of pairs (2N rows).
        dim: D, the embedding size.

    Returns:
        A dict with ``seconds`` (best of the runs), ``peak_bytes`` (peak RSS above the RSS
        with the inputs allocated), ``gflops`` and ``matmul_gflops``.
    """
    loss_fn = {"naive": naive_nt_xent, "torch": torch_path}[impl]
    forward_backward(loss_fn, *torch.randn(2, 64, dim, requires_grad=True))  # warm-up, small
    matmul = cpu_matmul_gflops()
    gen = torch.Generator().manual_seed(0)
    z0, z1 = (torch.randn(pairs, dim, generator=gen).requires_grad_() for _ in range(2))
    # One run for the big sizes (they take long); best of three for the small ones.
    runs = 3 if pairs <= 4096 else 1
    base = _rss_bytes()
    best = float("inf")
    for _ in range(runs):
        z0.grad = z1.grad = None
        start = time.perf_counter()
        forward_backward(loss_fn, z0, z1)
        best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "impl": impl,
        "pairs": pairs,
        "seconds": best,
        "peak_bytes": max(peak - base, 0),
        "gflops": loss_flops(pairs, dim) / best / 1e9,
        "matmul_gflops": matmul,
    }


def _cpu_case_subprocess(impl: str, pairs: int, dim: int) -> dict[str, float | int | str]:
    """Run :func:`run_cpu_case` in a fresh interpreter (so ``ru_maxrss`` is this case's)."""
    cmd = [sys.executable, "-m", "benchmarks.ntxent", "--case", impl, "--pairs", str(pairs), "--dim", str(dim)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"impl": impl, "pairs": pairs, "error": tail[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cpu_table(pairs_list: Sequence[int], dim: int) -> None:
    """Print the CPU table (naive vs torch path) and the ratios the issue asks for."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"CPU: {torch.get_num_threads()} threads, fp32, D={dim}, tau={TEMPERATURE}, forward+backward; "
        f"load average before: {load}"
    )
    print("  peak = RSS above the inputs; %matmul = GFLOP/s / fp32 matmul rate measured in the case's process")
    print(f"  {'pairs':>6} {'impl':>6} {'time_s':>9} {'peak_MiB':>10} {'GFLOP/s':>8} {'matmul':>7} {'%matmul':>8}")
    results: dict[tuple[str, int], dict] = {}
    bytes_per_logit = NAIVE_BYTES_PER_LOGIT
    for pairs in sorted(pairs_list):
        for impl in ("naive", "torch"):
            need = bytes_per_logit * (2 * pairs) ** 2
            available = _available_bytes()
            if impl == "naive" and need > RAM_SAFETY * available:
                verdict = "cannot allocate" if need > available else f"over {RAM_SAFETY:.0%} of the available RAM"
                print(
                    f"  {pairs:>6} {impl:>6}   skipped ({verdict}): needs ~{need / GIB:.1f} GiB "
                    f"({bytes_per_logit:.1f} B per logit as measured), {available / GIB:.1f} GiB available"
                )
                continue
            res = _cpu_case_subprocess(impl, pairs, dim)
            results[(impl, pairs)] = res
            if "error" in res:
                print(f"  {pairs:>6} {impl:>6}   failed: {res['error']}")
                continue
            if impl == "naive":
                bytes_per_logit = max(res["peak_bytes"] / (2 * pairs) ** 2, 1.0)
            print(
                f"  {pairs:>6} {impl:>6} {res['seconds']:>9.3f} {res['peak_bytes'] / MIB:>10.1f} "
                f"{res['gflops']:>8.1f} {res['matmul_gflops']:>7.1f} "
                f"{100 * res['gflops'] / res['matmul_gflops']:>7.1f}%"
            )
    _print_cpu_ratios(results)


def _print_cpu_ratios(results: dict[tuple[str, int], dict]) -> None:
    """Print the goals of the issue next to the measured ratios."""
    ok = {key: res for key, res in results.items() if "error" not in res}
    print("  ratios (torch path / naive):")
    for pairs in sorted({p for _, p in ok}):
        naive, fused = ok.get(("naive", pairs)), ok.get(("torch", pairs))
        if naive and fused:
            goal = "  (goal at 8192: memory <= 0.10, time <= 1.00)" if pairs == 8192 else ""
            print(
                f"    {pairs:>6} pairs: memory {fused['peak_bytes'] / max(naive['peak_bytes'], 1):.3f}, "
                f"time {fused['seconds'] / naive['seconds']:.2f}{goal}"
            )
    fused_rows = [res for (impl, _), res in ok.items() if impl == "torch"]
    if fused_rows:
        largest = max(fused_rows, key=lambda res: res["pairs"])
        print(
            f"    torch path at {largest['pairs']} pairs: peak {largest['peak_bytes'] / GIB:.3f} GiB above inputs "
            f"(goal at 65536: <= 2 GiB)"
        )
        shares = [res["gflops"] / res["matmul_gflops"] for res in fused_rows]
        print(
            f"    torch path GFLOP/s / matmul rate: {100 * min(shares):.0f}% .. {100 * max(shares):.0f}% "
            "(goal >= 50%)"
        )


# --------------------------------------- GPU -------------------------------------------


def _time_ms(fn: Callable[[], None], grads: list[torch.Tensor], device: torch.device) -> float:
    """Milliseconds per call: ``do_bench`` on CUDA, one timed call elsewhere (smoke runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=grads))
    fn()
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak device memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The card's matmul rate for ``dtype`` on a ``size``-cube, measured now, in TFLOP/s."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / (_time_ms(lambda: a @ b, [], device) * 1e-3) / 1e12


def run_gpu_table(
    pairs_list: Sequence[int],
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
    matmul_size: int = 8192,
    deadline: float | None = None,
) -> dict:
    """Print eager naive vs compiled naive vs Triton, with the ratios the issue asks for.

    Args:
        pairs_list: sizes N (2N rows).
        dim: the embedding size D.
        device: where to run (CUDA, or the CPU for an interpreter smoke run).
        dtype: the input dtype.
        matmul_size: side of the matmul cube whose rate is the 100 % mark.
        deadline: a ``time.monotonic()`` value after which the remaining baseline cases are
            skipped (the GPU check's time budget); default None, no limit.

    Returns:
        ``{"device", "dim", "matmul_tflops", "rows"}``; every row has ``pairs`` and ``impl``, then
        either ``ms``, ``tflops``, ``share`` (of the matmul rate), ``peak_bytes`` (None off
        CUDA) and for Triton ``blocks`` (the autotuned configs), or ``error``.
    """
    from kernels.ntxent_triton import chosen_configs  # triton is needed here anyway (do_bench)

    peak_tflops = matmul_tflops(device, dtype, matmul_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (interpreter smoke run)"
    print(f"GPU: {name}, {dtype}, D={dim}, tau={TEMPERATURE}, forward+backward; matmul {peak_tflops:.1f} TFLOP/s")
    print(f"  {'pairs':>6} {'impl':>9} {'ms':>9} {'TFLOP/s':>8} {'%matmul':>8} {'peak_MiB':>9}")
    compiled = torch.compile(naive_nt_xent)
    impls: dict[str, LossFn] = {"eager": naive_nt_xent, "compiled": compiled, "triton": triton_path}
    rows: list[dict] = []
    for pairs in pairs_list:
        z0, z1 = (torch.randn(pairs, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for impl, loss_fn in impls.items():
            row: dict = {"pairs": pairs, "impl": impl}
            rows.append(row)
            # Past the deadline only Triton still runs: seconds per size, against the baselines' compiles.
            if deadline is not None and impl != "triton" and time.monotonic() > deadline:
                row["error"] = "skipped (time budget)"
                print(f"  {pairs:>6} {impl:>9}   {row['error']}")
                continue
            call = partial(forward_backward, loss_fn, z0, z1)
            try:
                ms = _time_ms(call, [z0, z1], device)
                peak = _peak_bytes(call, device)
            except Exception as error:  # noqa: BLE001 - one failing row must not lose the table
                row["error"] = "out of memory" if isinstance(error, torch.OutOfMemoryError) else _one_line(error)
                print(f"  {pairs:>6} {impl:>9}   {row['error']}")
                z0.grad = z1.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            tflops = loss_flops(pairs, dim) / (ms * 1e-3) / 1e12
            row.update(ms=ms, tflops=tflops, share=tflops / peak_tflops, peak_bytes=peak)
            peak_text = "-" if peak is None else f"{peak / MIB:.1f}"
            print(
                f"  {pairs:>6} {impl:>9} {ms:>9.3f} {tflops:>8.2f} {100 * tflops / peak_tflops:>7.1f}% "
                f"{peak_text:>9}"
            )
            if impl == "triton":
                row["blocks"] = chosen_configs()
                print(f"  {'':>6} {'blocks':>9}   " + "; ".join(f"{k} {v}" for k, v in row["blocks"].items()))
    for line in gpu_ratios(rows, dim, peak_tflops):
        print(f"  {line}")
    return {"device": name, "dim": dim, "matmul_tflops": peak_tflops, "rows": rows}


def _one_line(error: BaseException) -> str:
    """The first line of an exception, with its type, cut to 120 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:120]


def gpu_ratios(rows: Sequence[dict], dim: int, peak_tflops: float) -> list[str]:
    """Return the lines that put the GPU goals of the issue next to the measured ratios.

    Args:
        rows: the ``rows`` of :func:`run_gpu_table`.
        dim: the embedding size D.
        peak_tflops: the measured matmul rate.
    """
    times = {(row["impl"], row["pairs"]): row["ms"] for row in rows if "ms" in row}
    triton_pairs = sorted(p for impl, p in times if impl == "triton")
    if not triton_pairs:
        return []
    at = 32768 if 32768 in triton_pairs else triton_pairs[-1]
    share = loss_flops(at, dim) / (times[("triton", at)] * 1e-3) / 1e12 / peak_tflops
    lines = [f"ratios: triton at {at} pairs: {100 * share:.0f}% of the matmul rate (goal at 32768: >= 50%)"]
    for baseline, goal in (("eager", 3.0), ("compiled", 1.5)):
        both = [p for p in triton_pairs if (baseline, p) in times]
        if both:
            p = both[-1]
            lines.append(
                f"  speed-up vs {baseline} at {p} pairs (largest it fits): "
                f"{times[(baseline, p)] / times[('triton', p)]:.2f}x (goal >= {goal}x)"
            )
    return lines


# --------------------------------------- main ------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the benchmarks (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ntxent", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-pairs", type=int, nargs="+", default=list(CPU_PAIRS), help="CPU sizes (pairs)")
    parser.add_argument("--gpu-pairs", type=int, nargs="+", default=list(GPU_PAIRS), help="GPU sizes (pairs)")
    parser.add_argument("--dim", type=int, default=DIM, help="embedding size D")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    parser.add_argument(
        "--smoke", action="store_true", help="run the GPU table's code on the CPU at tiny sizes (TRITON_INTERPRET=1)"
    )
    parser.add_argument("--case", choices=["naive", "torch"], help=argparse.SUPPRESS)  # one subprocess case
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_cpu_case(args.case, args.pairs, args.dim)))
        return
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 in the environment (the kernels run interpreted)")
        # fp16: the interpreter mishandles bf16 in tl.dot; the CUDA run uses bf16.
        run_gpu_table(SMOKE_PAIRS, 32, torch.device("cpu"), torch.float16, matmul_size=256)
        return
    if not args.no_cpu:
        run_cpu_table(args.cpu_pairs, args.dim)
    if torch.cuda.is_available():
        run_gpu_table(args.gpu_pairs, args.dim, torch.device("cuda"), torch.bfloat16)
    else:
        print("GPU: no CUDA device on this machine; the GPU table was not run.")


if __name__ == "__main__":
    main()
