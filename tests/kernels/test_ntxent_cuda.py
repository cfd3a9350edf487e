"""The compiled Triton kernels on CUDA: the cases of test_ntxent.py, and the GPU check's CPU behaviour.

This session runs the kernels interpreted (``conftest.py`` sets TRITON_INTERPRET=1 before
triton decorates them), so the compiled kernels are checked in a fresh interpreter without
that variable: ``python -m benchmarks.gpu_check --no-bench --json``, which runs the cases of
``tests/kernels/ntxent_reference.py`` on CUDA. Each test below reports one of its checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.ntxent import run_gpu_table

REPO = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the compiled Triton kernels run only on a GPU "
    "(test_ntxent.py runs the same cases interpreted on the CPU)",
)
CHECK_NAMES = [name for name, _ in gpu_check.named_checks(torch.device("cuda"))]


def _run_gpu_check(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``python -m benchmarks.gpu_check`` from the repository root in a fresh interpreter."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every check's result from one compiled (not interpreted) run on CUDA."""
    out = tmp_path_factory.mktemp("gpu_check") / "results.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = _run_gpu_check(["--no-bench", "--json", str(out)], env, timeout=900)
    if not out.exists():
        pytest.fail(f"gpu_check wrote no results (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


@CUDA
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_compiled_on_cuda_matches_reference(name: str, cuda_results: dict[str, dict]) -> None:
    result = cuda_results[name]
    assert result["ok"], result["error"]


def test_gpu_check_without_gpu_says_so_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU where there is one
    proc = _run_gpu_check([], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check."
    ]


def test_run_checks_reports_failures(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def mismatch() -> None:
        torch.testing.assert_close(torch.ones(3), torch.zeros(3))

    monkeypatch.setattr(gpu_check, "named_checks", lambda device: [("fine", lambda: None), ("off", mismatch)])
    results = gpu_check.run_checks(torch.device("cpu"))
    assert results["fine"]["ok"] and not results["off"]["ok"]
    assert "Tensor-likes are not close" in results["off"]["error"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  ok   fine") and out[1].startswith("  FAIL off")
    lines, ok = gpu_check.summary("a card", results, None, 1.0)
    assert not ok and "1/2 passed" in lines[1] and "FAILED: off" in lines[1] and lines[-1] == "result   FAIL"


def test_summary_of_a_benchmark_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary block from a real (interpreted, CPU) run of the GPU table's code."""
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    table = run_gpu_table([20], 16, torch.device("cpu"), torch.float16, matmul_size=64)
    table["rows"].append({"pairs": 80, "impl": "eager", "error": "out of memory"})
    table["rows"].append({"pairs": 80, "impl": "compiled", "error": "skipped (time budget)"})
    results = {"a[triton]": {"ok": True, "seconds": 0.1, "error": ""}}
    lines, ok = gpu_check.summary("a card", results, table, 12.0)
    text = "\n".join(lines)
    assert ok and lines[-1] == "result   PASS" and "1/1 passed" in text
    row_20 = next(line for line in lines if line.split()[:1] == ["20"])
    assert "forward BLOCK_M=" in row_20 and "backward BLOCK_M=" in row_20
    row_80 = next(line for line in lines if line.split()[:1] == ["80"])
    assert row_80.split()[1:4] == ["OOM", "skipped", "-"]
    assert "speed-up vs compiled" in text
    table["rows"].append({"pairs": 80, "impl": "triton", "error": "RuntimeError: boom"})  # fails the check
    assert gpu_check.summary("a card", results, table, 12.0)[1] is False
