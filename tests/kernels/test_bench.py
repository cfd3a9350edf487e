"""The benchmark's code paths at tiny sizes: its baseline is right and its tables print."""

from __future__ import annotations

import pytest
import torch

from benchmarks import ntxent as bench
from kernels import nt_xent


def test_naive_baseline_equals_nt_xent() -> None:
    z0, z1 = torch.randn(2, 20, 8)
    torch.testing.assert_close(bench.naive_nt_xent(z0, z1), nt_xent(z0, z1, temperature=bench.TEMPERATURE))


def test_cpu_table_runs_cases_in_subprocesses(capsys: pytest.CaptureFixture[str]) -> None:
    bench.run_cpu_table([16], dim=8)
    out = capsys.readouterr().out
    assert "16  naive" in out and "16  torch" in out and "failed" not in out
    assert "16 pairs: memory" in out


def test_cpu_table_skips_naive_that_cannot_fit(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "_available_bytes", lambda: 1024)
    monkeypatch.setattr(bench, "_cpu_case_subprocess", lambda impl, pairs, dim: bench.run_cpu_case(impl, pairs, dim))
    bench.run_cpu_table([8], dim=4)
    out = capsys.readouterr().out
    assert "naive   skipped (cannot allocate)" in out and "8  torch" in out


def test_gpu_table_code_path_under_interpreter(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA table's code (Triton path included) on CPU tensors; compiling is torch's business."""
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    bench.run_gpu_table([20], 16, torch.device("cpu"), torch.float16, matmul_size=64)
    out = capsys.readouterr().out
    for impl in ("eager", "compiled", "triton"):
        assert f"20 {impl:>9}" in out
    assert "speed-up vs compiled" in out


def test_gpu_table_past_its_deadline_runs_only_triton(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    table = bench.run_gpu_table([20], 16, torch.device("cpu"), torch.float16, matmul_size=64, deadline=0.0)
    errors = {row["impl"]: row.get("error") for row in table["rows"]}
    assert errors == {"eager": "skipped (time budget)", "compiled": "skipped (time budget)", "triton": None}
    assert "20    triton" in capsys.readouterr().out
