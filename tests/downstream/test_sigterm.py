"""SIGTERM, as SLURM and Kubernetes send it before a kill (issue 26.9): finetuning checkpoints and stops
with one line and a KILLED MLflow run, the re-run resumes; a sweep shuts Ray down without a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.serial
def test_finetuning_stops_at_a_checkpoint_and_resumes(cohort: Path, tmp_path: Path, mlflow_uri: str,
                                                      sigterm_when) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ft"
    overrides = [*tiny_overrides(cohort, out, size=32), "train.max_steps=200", "train.eval_every=1000",
                 "tracking.enabled=true", "train.augment=false"]
    cmd = ["-m", "mri_ssl.cli.finetune", "--config", "finetune", *overrides]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}

    def training() -> bool:  # the MLflow run exists and the first steps are done
        return (out / "mlflow_run_id").is_file() and (out / "splits.json").is_file()

    code, err, took = sigterm_when(cmd, training, env=env, cwd=ROOT)
    assert code == 143 and took < 60, err[-2000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last == f"terminated (SIGTERM); run the same command again to resume from the last checkpoint in {out}"
    assert "Traceback" not in err
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert 0 < state["step"] < 200
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"
    import subprocess
    import sys

    again = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint'}" in again.stderr and f"at step {state['step']}" in again.stderr
    assert json.loads((out / "result.json").read_text())["steps"] == 200


@pytest.mark.slow
@pytest.mark.serial
def test_a_sweep_shuts_ray_down_without_a_traceback(cohort: Path, tmp_path: Path, sigterm_when) -> None:
    out = tmp_path / "sw"
    cmd = ["-m", "mri_ssl.cli.sweep", "--config", "sweep_debug", *tiny_overrides(cohort, out, size=32),
           "n_labeled=[1]", "seeds=[0, 1]", "train.max_steps=400", "search.ray_num_cpus=2"]
    code, err, took = sigterm_when(cmd, lambda: any((out / "trials").glob("*/config.yaml")), cwd=ROOT)
    assert code == 143 and took < 90, err[-3000:]
    assert "Traceback" not in err and "terminated (SIGTERM); run the same command again" in err
