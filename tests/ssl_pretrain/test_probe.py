"""The segmentation probe: a positive control, its bad input, and its place in a pretraining run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.engine.config import PretrainConfig
from ssl_pretrain.engine.probe import ProbeConfig, SegmentationProbe
from ssl_pretrain.models.unet import UNet, UNetConfig

DEBUG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "debug.yaml"
# the preprocessing of the pretrain_shards fixture (conftest.py)
SHARD_PREP = PreprocessParams(size=(32, 32), spacing=(8.0, 8.0)).to_dict()


def _fit(params: list[torch.nn.Parameter], predict: Any, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (16,), generator=g)
        loss = F.cross_entropy(predict(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_probe_sees_a_useful_encoder(labeled: Path) -> None:
    """Positive control: networks trained on the labels themselves probe well above their random init.

    Both feature kinds: the decoder output (a UNet trained end to end) and the hypercolumns of an
    encoder trained with a 1×1 convolution on its hypercolumns (what encoder-only tasks are probed on).
    """
    probe = SegmentationProbe(ProbeConfig(root=str(labeled)), SHARD_PREP, in_channels=1)
    assert probe.num_classes == 2 and len(probe.train) == 2 and len(probe.eval) == 4
    x = torch.cat([img for img, _ in probe.train])
    y = torch.cat([lab for _, lab in probe.train])
    model_cfg = UNetConfig(widths=(8, 16, 32), norm="instance")

    torch.manual_seed(0)
    net = UNet(model_cfg, out_channels=probe.num_classes)
    random_dec = probe.evaluate(net.encoder, net.decoder)
    assert probe.evaluate(net.encoder, net.decoder)["dice"] == random_dec["dice"]  # same weights, same value
    _fit(list(net.parameters()), net, x, y)
    trained_dec = probe.evaluate(net.encoder, net.decoder)
    assert net.training  # the probe gave the modules their mode back

    torch.manual_seed(0)
    encoder = UNet(model_cfg, out_channels=1).encoder
    head = torch.nn.Conv2d(sum(model_cfg.widths), probe.num_classes, 1)
    random_hyper = probe.evaluate(encoder, None)

    def on_hypercolumns(batch: torch.Tensor) -> torch.Tensor:
        levels = [F.interpolate(f, size=batch.shape[-2:], mode="bilinear", align_corners=False)
                  for f in encoder(batch)]
        return head(torch.cat(levels, 1))

    _fit([*encoder.parameters(), *head.parameters()], on_hypercolumns, x, y)
    trained_hyper = probe.evaluate(encoder, None)
    print(f"probe Dice random/trained: decoder {random_dec['dice']:.3f}/{trained_dec['dice']:.3f}, "
          f"hypercolumns {random_hyper['dice']:.3f}/{trained_hyper['dice']:.3f}")
    assert trained_dec["dice"] > random_dec["dice"] + 0.1
    assert trained_hyper["dice"] > random_hyper["dice"] + 0.02  # random hypercolumns already hold the intensities


def test_bad_probe_input(labeled: Path, tmp_path: Path) -> None:
    from ssl_pretrain.data.phantoms import make_cohort

    with pytest.raises(ConfigError, match="probe.root: .*nowhere not found"):
        load_config(PretrainConfig, DEBUG, [f"probe.root={tmp_path / 'nowhere'}"])
    unlabeled = make_cohort("liver", 2, tmp_path / "unlabeled", seed=2, labels=False)
    with pytest.raises(ValueError, match="unlabeled: no labeled volumes"):
        SegmentationProbe(ProbeConfig(root=str(unlabeled)), SHARD_PREP, 1)
    with pytest.raises(ValueError, match=r"6 labeled volumes, but probe.n_train \+ probe.n_eval = 8"):
        SegmentationProbe(ProbeConfig(root=str(labeled), n_train=4, n_eval=4), SHARD_PREP, 1)
    with pytest.raises(ValueError, match="shard manifest records no preprocessing"):
        SegmentationProbe(ProbeConfig(root=str(labeled)), {}, 1)
    with pytest.raises(ValueError, match="has 1 channels after the shards' preprocessing.*model.in_channels=2"):
        SegmentationProbe(ProbeConfig(root=str(labeled)), SHARD_PREP, 2)


def _cfg(shards: Path, out: Path, labeled: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, DEBUG, [
        f"data.shards={shards}", f"out_dir={out}", "data.num_workers=0", f"probe.root={labeled}", "probe.every=4",
        "probe.steps=40", *overrides,
    ])


def _probe_rows(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "probe/dice" in r}


def test_probe_runs_at_its_steps_and_logs(pretrain_shards: Path, labeled: Path, tmp_path: Path,
                                          mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    run_pretraining(_cfg(pretrain_shards, out, labeled, "train.max_steps=10", "train.export_every=5",
                         "train.ckpt_every=10"))
    probes = _probe_rows(out)
    assert sorted(probes) == [0, 4, 8, 10]  # the random-init reference, every 4 steps, and the end
    assert all(r["probe/dice_random"] == probes[0]["probe/dice"] for r in probes.values())
    assert all(0.0 <= r["probe/dice"] <= 1.0 and 0.0 < r["probe/time_frac"] <= 1.0 for r in probes.values())
    summary = json.loads((out / "summary.json").read_text())["probe"]
    best_step = max(probes, key=lambda s: probes[s]["probe/dice"])
    assert summary["best_step"] == best_step and summary["best_dice"] == probes[best_step]["probe/dice"]
    assert summary["random_init_dice"] == probes[0]["probe/dice"] and 0 < summary["time_frac"] < 1
    print(f"probe time share {100 * summary['time_frac']:.1f} % of {summary['time_s'] / summary['time_frac']:.1f} s")

    for step in (5, 10):  # intermediate exports carry their budget and the last probe before them
        export = torch.load(out / "export" / f"step-{step:07d}" / "model.pt", weights_only=True)
        assert export["info"]["steps"] == step and export["info"]["samples_seen"] == 8 * step
        assert export["info"]["probe_step"] == {5: 4, 10: 10}[step]
        assert export["info"]["probe_dice"] == probes[export["info"]["probe_step"]]["probe/dice"]
        assert export["task"] == "contrastive" and export["decoder"] is None
    assert sorted(p.name for p in (out / "export").iterdir()) == ["model.pt", "step-0000005", "step-0000010"]

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mri-ssl/pretrain").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "probe/dice")) == [0, 4, 8, 10]
    assert {"health/std_norm", "health/eff_rank", "health/top1", "probe/time_frac"} <= set(run.data.metrics)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/probe.png", "plots/health.png", "plots/loss.png"} <= plots
    assert (out / "plots" / "probe.png").is_file() and (out / "plots" / "health.png").is_file()


def test_probe_values_survive_a_kill(pretrain_shards: Path, labeled: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_pretrain.engine.trainer import Trainer, run_pretraining

    args = ("task=regression", "track=false", "train.max_steps=10", "train.ckpt_every=5", "train.image_every=7")
    straight = tmp_path / "straight"
    run_pretraining(_cfg(pretrain_shards, straight, labeled, *args))

    class Killed(RuntimeError):
        pass

    def die(self: Trainer, task: object, batch: object, step: int) -> None:
        raise Killed(f"step {step}")

    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_figure", die)
        with pytest.raises(Killed):
            run_pretraining(_cfg(pretrain_shards, out, labeled, *args))
    assert sorted(_probe_rows(out)) == [0, 4]
    run_pretraining(_cfg(pretrain_shards, out, labeled, *args))  # resumes from step 5
    resumed, reference = _probe_rows(out), _probe_rows(straight)
    assert sorted(resumed) == sorted(reference) == [0, 4, 8, 10]
    for step in reference:
        assert resumed[step]["probe/dice"] == reference[step]["probe/dice"], step
    summary = json.loads((out / "summary.json").read_text())["probe"]
    assert summary["best_dice"] == json.loads((straight / "summary.json").read_text())["probe"]["best_dice"]


def test_probe_every_beyond_max_steps_warns(pretrain_shards: Path, labeled: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from ssl_pretrain.engine.trainer import run_pretraining

    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="ssl_pretrain.engine.trainer"):
        run_pretraining(_cfg(pretrain_shards, out, labeled, "track=false", "train.max_steps=3",
                             "train.warmup_steps=1", "probe.every=50", "probe.steps=10"))
    assert any("probe.every=50 is larger than train.max_steps=3" in r.getMessage() for r in caplog.records)
    assert sorted(_probe_rows(out)) == [0, 3]  # the reference and the end
