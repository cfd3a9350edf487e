"""SIGTERM during pretraining (issue 26.9): a checkpoint at the next step, a KILLED MLflow run, one line, and
the same command resumes from that step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.serial
def test_pretraining_checkpoints_at_the_next_step_and_resumes(pretrain_shards: Path, tmp_path: Path,
                                                              mlflow_uri: str, sigterm_when) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "pre"
    cmd = ["-m", "mri_ssl.cli.pretrain", "--config", "debug", f"data.shards={pretrain_shards}", f"out_dir={out}",
           "train.max_steps=120", "train.ckpt_every=1000", "data.num_workers=0", "probe.root="]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    metrics = out / "metrics.jsonl"

    def stepping() -> bool:
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 3

    code, err, took = sigterm_when(cmd, stepping, env=env, cwd=ROOT)
    assert code == 143 and took < 60, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == (
        f"terminated (SIGTERM); run the same command again to resume from the last checkpoint in {out}")
    assert "Traceback" not in err
    tag = (out / "checkpoints" / "latest").read_text()
    meta = json.loads((out / "checkpoints" / tag / "meta.json").read_text())
    assert 3 <= meta["step"] < 120 and not meta["finished"]  # saved at the step it stopped, not at ckpt_every
    assert MlflowClient(mlflow_uri).get_run(meta["mlflow_run_id"]).info.status == "KILLED"
    again = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"from step {meta['step']}" in again.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 120
