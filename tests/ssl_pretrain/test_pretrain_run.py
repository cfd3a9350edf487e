"""One-process pretraining runs (in this process, as the demo calls them) and the bad-input checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.engine.checkpoint import CheckpointError
from ssl_pretrain.engine.config import PretrainConfig, deepspeed_config
from ssl_pretrain.models.unet import UNet

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"


def _cfg(shards: Path, out: Path, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig, DEBUG, [f"data.shards={shards}", f"out_dir={out}", "data.num_workers=0", *overrides]
    )


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}  # the last record of a step wins (after resumes)


def test_contrastive_run_exports_tracks_and_finishes_once(pretrain_shards: Path, tmp_path: Path, mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    cfg = _cfg(pretrain_shards, out, "contrastive.positives=partition", "contrastive.local_weight=1.0",
               "train.max_steps=12", "train.ckpt_every=6", "train.image_every=6")
    export = run_pretraining(cfg)
    assert export == out / "export" / "model.pt"

    data = torch.load(export, weights_only=True)
    assert data["task"] == "contrastive" and data["format_version"] == 1
    assert data["preprocessing"]["size"] == [32, 32]
    assert data["info"]["steps"] == 12 and data["info"]["world_size"] == 1
    manifest = json.loads((pretrain_shards / "manifest.json").read_text())
    assert data["info"]["pretrain_subjects"] == sorted(s["id"] for s in manifest["subjects"])  # for leak checks
    net = UNet(cfg.model, out_channels=2)
    net.encoder.load_state_dict(data["encoder"])
    net.decoder.load_state_dict(data["decoder"])  # the local loss trained the decoder

    assert (out / "config.yaml").is_file()
    assert load_config(PretrainConfig, out / "config.yaml").task == "contrastive"
    assert (out / "checkpoints" / "latest").read_text() == "step-00000012"

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("mri-ssl/pretrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "12" and run.data.params["task"] == "contrastive"
    assert run.data.tags["task"] == "contrastive" and run.data.tags["world_size"] == "1"
    assert "git_commit" in run.data.tags
    assert {"loss", "lr", "samples_per_s", "data_wait_frac", "data_wait_s/rank0", "loss_local"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 12

    def names(path: str | None = None) -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"config.yaml", "export", "plots", "summary.json"} <= names()
    assert names("export") == {"export/model.pt"}
    assert names("plots") == {"plots/loss.png", "plots/health.png", "plots/contrastive-step00000006.png",
                              "plots/contrastive-step00000012.png"}

    # running it again: already finished, nothing recomputed, no new MLflow run
    mtime = export.stat().st_mtime_ns
    assert run_pretraining(cfg) == export
    assert export.stat().st_mtime_ns == mtime
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_regression_loss_falls(pretrain_shards: Path, tmp_path: Path) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "reg"
    export = run_pretraining(_cfg(pretrain_shards, out, "task=regression", "track=false"))
    losses = list(_losses(out).values())
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    data = torch.load(export, weights_only=True)
    assert data["task"] == "regression" and data["decoder"] is not None
    assert json.loads((out / "summary.json").read_text())["replica_max_abs_diff"] == 0.0


def test_nan_guard_keeps_last_good_checkpoint(pretrain_shards: Path, tmp_path: Path) -> None:
    from ssl_pretrain.engine.trainer import TrainingDiverged, run_pretraining

    out = tmp_path / "nan"
    cfg = _cfg(pretrain_shards, out, "task=regression", "track=false", "train.lr=1e30", "train.grad_clip=0",
               "train.ckpt_every=2")
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss is nan.*last good checkpoint is step-"):
        run_pretraining(cfg)
    tag = (out / "checkpoints" / "latest").read_text()
    meta = json.loads((out / "checkpoints" / tag / "meta.json").read_text())
    assert meta["loss"] == meta["loss"] and meta["step"] < 20  # finite, before the failure
    assert not (out / "export").exists()


# ---- bad input: one clear error before any compute -------------------------------------------


def _no_compute(out: Path) -> None:
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_bad_shards(pretrain_shards: Path, tmp_path: Path) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "x"
    with pytest.raises(ValueError, match="data.shards"):
        run_pretraining(_cfg(tmp_path / "missing", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty/manifest.json: not found"):
        run_pretraining(_cfg(tmp_path / "empty", out))
    # shards whose meta.json lacks the relative position: partition positives are impossible
    nopos = tmp_path / "nopos"
    shutil.copytree(pretrain_shards, nopos)
    manifest = json.loads((nopos / "manifest.json").read_text())
    manifest["sample"]["meta.json"].remove("position")
    (nopos / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="positives=partition needs each slice's relative position"):
        run_pretraining(_cfg(nopos, out, "contrastive.positives=partition"))
    _no_compute(out)


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="train.zero_stage: must be 0, 1 or 2"):
        load_config(PretrainConfig, DEBUG, ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(PretrainConfig, DEBUG, ["train.nope=1"])
    with pytest.raises(ConfigError, match="task: must be one of 'contrastive', 'regression'"):
        load_config(PretrainConfig, DEBUG, ["task=jigsaw"])
    with pytest.raises(ConfigError, match="contrastive.local_level"):
        load_config(PretrainConfig, DEBUG, ["contrastive.local_weight=1", "contrastive.local_level=5"])
    cfg = load_config(PretrainConfig, DEBUG, ["train.batch_size=12", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="train.batch_size: 12 does not divide across 4 ranks × 2"):
        deepspeed_config(cfg, world_size=4)
    ds = deepspeed_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        12, 3, 2)
    assert ds["zero_optimization"]["stage"] == 0 and ds["optimizer"]["params"]["torch_adam"] is True
    if not torch.cuda.is_available():
        assert ds["bf16"]["enabled"] is False
        with pytest.raises(ConfigError, match="LAMB"):
            deepspeed_config(load_config(PretrainConfig, DEBUG, ["train.optimizer=LAMB"]), 1)
    for name in ("contrastive.yaml", "regression.yaml"):
        load_config(PretrainConfig, DEBUG.parent / name)


def test_users_deepspeed_json(tmp_path: Path) -> None:
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    ds = deepspeed_config(load_config(PretrainConfig, DEBUG, [f"train.deepspeed_config={own}"]), world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["type"] == "SGD"
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 disagrees with the run config"):
        deepspeed_config(load_config(PretrainConfig, DEBUG, [f"train.deepspeed_config={own}"]), world_size=2)
    with pytest.raises(ConfigError, match="train.deepspeed_config: file not found"):
        load_config(PretrainConfig, DEBUG, [f"train.deepspeed_config={tmp_path / 'nope.json'}"])


def test_checkpoint_dir_of_another_run_is_refused(pretrain_shards: Path, tmp_path: Path) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    run_pretraining(_cfg(pretrain_shards, out, "task=regression", "track=false", "train.max_steps=2",
                         "train.warmup_steps=1"))
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="checkpoint has task='regression', this run has 'contrastive'"):
        run_pretraining(_cfg(pretrain_shards, out, "track=false", "train.max_steps=2", "train.warmup_steps=1"))
    with pytest.raises(CheckpointError, match="checkpoint has model="):
        run_pretraining(_cfg(pretrain_shards, out, "task=regression", "track=false", "model.widths=[8,16]"))
    with pytest.raises(CheckpointError, match="checkpoint has zero_stage=0, this run has 1; keep train.zero_stage"):
        run_pretraining(_cfg(pretrain_shards, out, "task=regression", "track=false", "train.zero_stage=1"))
    with pytest.raises(CheckpointError, match="set resume=auto"):
        run_pretraining(_cfg(pretrain_shards, out, "task=regression", "track=false", "resume=never"))
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing ran


def test_cli_prints_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(DEBUG),
         f"data.shards={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'o'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "data.shards" in errors[0] and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(DEBUG), "train.lr=-1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 2 and "train.lr: must be > 0" in proc.stderr and "Traceback" not in proc.stderr


# ---- resume, extend, damaged checkpoints ----------------------------------------------------------


class SimulatedKill(RuntimeError):
    """Stands in for a kill: the run stops mid-way, after its last checkpoint."""


def _killed_at_figure(monkeypatch: pytest.MonkeyPatch, cfg: PretrainConfig) -> None:
    """Run ``cfg`` until its first figure step (``train.image_every``), where it dies."""
    from ssl_pretrain.engine.trainer import Trainer, run_pretraining

    def die(self: Trainer, task: object, batch: object, step: int) -> None:
        raise SimulatedKill(f"killed at step {step}")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_figure", die)
        with pytest.raises(SimulatedKill):
            run_pretraining(cfg)


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_logs_each_step_once(pretrain_shards: Path, tmp_path: Path, mlflow_uri: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    cfg = _cfg(pretrain_shards, out, "task=regression", "train.max_steps=8", "train.ckpt_every=3",
               "train.image_every=5")
    _killed_at_figure(monkeypatch, cfg)
    assert _steps(out) == [1, 2, 3, 4, 5] and (out / "checkpoints" / "latest").read_text() == "step-00000003"
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a row cut by the kill
    run_pretraining(cfg)
    assert _steps(out) == list(range(1, 9))
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mri-ssl/pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))


def test_extending_a_finished_run_trains_on(pretrain_shards: Path, tmp_path: Path) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    args = ("task=regression", "track=false", "train.ckpt_every=2", "train.warmup_steps=1")
    export = run_pretraining(_cfg(pretrain_shards, out, *args, "train.max_steps=4"))
    first = torch.load(export, weights_only=True)
    assert first["info"]["steps"] == 4
    run_pretraining(_cfg(pretrain_shards, out, *args, "train.max_steps=8"))
    second = torch.load(export, weights_only=True)
    assert second["info"]["steps"] == 8 and second["info"]["samples_seen"] == 2 * first["info"]["samples_seen"]
    assert any(not torch.equal(second["encoder"][k], v) for k, v in first["encoder"].items())
    assert _steps(out) == list(range(1, 9))
    assert (out / "checkpoints" / "latest").read_text() == "step-00000008"
    with pytest.raises(CheckpointError, match="is at step 8, beyond train.max_steps=6"):
        run_pretraining(_cfg(pretrain_shards, out, *args, "train.max_steps=6"))


def test_truncated_model_states_fall_back_to_previous_checkpoint(
    pretrain_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    cfg = _cfg(pretrain_shards, out, "task=regression", "track=false", "train.max_steps=6", "train.ckpt_every=2",
               "train.image_every=5")
    _killed_at_figure(monkeypatch, cfg)
    bad = out / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="ssl_pretrain.engine.checkpoint"):
        run_pretraining(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ssl_pretrain.engine.checkpoint"]
    assert "step-00000004" in warning and "mp_rank_00_model_states.pt is truncated" in warning
    assert "previous kept checkpoint" in warning and warning.endswith("step-00000002")
    assert _steps(out) == list(range(1, 7))
    for tag in ("step-00000004", "step-00000006"):  # every kept checkpoint damaged: one line, no traceback
        f = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"checkpoints: no readable checkpoint: .*step-00000006 \(mp_rank_00"):
        run_pretraining(cfg)


def test_rerun_after_a_kill_before_any_checkpoint_logs_each_step_once(
    pretrain_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    cfg = _cfg(pretrain_shards, out, "task=regression", "track=false", "train.max_steps=4", "train.ckpt_every=4",
               "train.image_every=2", "train.warmup_steps=1")
    _killed_at_figure(monkeypatch, cfg)
    assert _steps(out) == [1, 2] and not (out / "checkpoints" / "latest").exists()
    run_pretraining(cfg)  # starts over
    assert _steps(out) == [1, 2, 3, 4]


def test_2p5d_shards_pretrain_a_three_channel_model_whose_export_records_the_stacking(
        pretrain_shards: Path, labeled: Path, tmp_path: Path) -> None:
    """Issue 23.4: 2.5D shards (make_shards --context-slices 1) pretrain a 2D model of 3 input channels, the
    probe stacks its labeled slices the same way, and the export carries context_slices to finetuning."""
    from ssl_pretrain.data.ingest import discover
    from ssl_pretrain.data.phantoms import make_cohort
    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.data.shards import write_shards
    from ssl_pretrain.engine.trainer import run_pretraining

    subjects, _ = discover(make_cohort("liver", 2, tmp_path / "raw", seed=0, labels=False))
    params = PreprocessParams(size=(32, 32), spacing=(8.0, 8.0), context_slices=1)
    write_shards(subjects, tmp_path / "s", params, samples_per_shard=16, workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"model\.in_channels: is 1, but the shards have 3 channels"):
        run_pretraining(_cfg(tmp_path / "s", tmp_path / "bad", "task=regression", "train.max_steps=2",
                             "train.warmup_steps=1", "probe.root="))
    cfg = _cfg(tmp_path / "s", tmp_path / "run", "task=regression", "model.in_channels=3", "train.max_steps=2",
               "train.warmup_steps=1", "probe.every=2", f"probe.root={labeled}", "probe.n_train=1", "probe.n_eval=1")
    export = torch.load(run_pretraining(cfg), weights_only=True)
    assert export["preprocessing"]["context_slices"] == 1 and export["model_config"]["in_channels"] == 3
    assert export["info"]["probe_dice"] >= 0.0
