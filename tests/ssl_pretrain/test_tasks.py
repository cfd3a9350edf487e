"""Pretext tasks, augmentations and heads, in one process (no DeepSpeed); the task registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_pretrain.config import validate
from ssl_pretrain.models.heads import LocalHead, ProjectionHead, ReconstructionHead
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.contrastive import ContrastiveConfig, ContrastiveTask, partition_groups
from ssl_pretrain.tasks.registry import TASKS, PretextTask, register_task
from ssl_pretrain.tasks.regression import RegressionConfig, RegressionTask, corrupt
from ssl_pretrain.tasks.views import ContrastiveAugmentConfig, matching_points, random_view, sample_at, two_views

TINY = UNetConfig(widths=(8, 16, 32))


def _batch(b: int = 6, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # smooth blobs, like a normalised slice
    img = F.avg_pool2d(torch.randn(b, 1, size, size, generator=g), 5, 1, 2) * 3
    return {"image": img, "position": torch.linspace(0, 1, b), "slice": torch.arange(b)}


def test_heads_shapes() -> None:
    assert ProjectionHead(32, 16, 8)(torch.randn(2, 32, 4, 4)).shape == (2, 8)
    assert LocalHead(16, 5)(torch.randn(2, 16, 8, 8)).shape == (2, 5, 8, 8)
    assert ReconstructionHead(8, 1)(torch.randn(2, 8, 16, 16)).shape == (2, 1, 16, 16)


def test_views_are_reproducible_and_different() -> None:
    x = _batch()["image"]
    v0, v1, t0, t1 = two_views(x, ContrastiveAugmentConfig(), torch.Generator().manual_seed(3))
    w0, w1, _, _ = two_views(x, ContrastiveAugmentConfig(), torch.Generator().manual_seed(3))
    assert v0.shape == x.shape and t0.shape == (6, 2, 3)
    assert torch.equal(v0, w0) and torch.equal(v1, w1)
    assert not torch.allclose(v0, v1)
    assert torch.isfinite(v0).all()


def test_identity_augmentation_returns_the_image() -> None:
    x = _batch()["image"]
    cfg = ContrastiveAugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, rotate_deg=0.0,
                        brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, blur_prob=0.0)
    validate(cfg)
    v, _ = random_view(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v, x, atol=1e-4, rtol=1e-4)


def test_matching_points_see_the_same_image_content() -> None:
    # an image whose value is its own x coordinate (and y in channel 1): sampling a view at u
    # must give the image coordinate theta @ u, and both views' points must agree
    size = 64
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = torch.stack([xs, ys])[None].repeat(4, 1, 1, 1)
    cfg = ContrastiveAugmentConfig(brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, blur_prob=0.0)
    g = torch.Generator().manual_seed(1)
    v0, t0 = random_view(x, cfg, g)
    v1, t1 = random_view(x, cfg, g)
    u0, u1 = matching_points(t0, t1, 8, g)
    s0, s1 = sample_at(v0, u0), sample_at(v1, u1)  # (B, k, 2) image coordinates seen at the points
    # linear content is preserved by bilinear sampling up to the pixel grid's half-pixel convention
    assert (s0 - s1).abs().max() < 0.1
    assert (u1.abs() <= 0.9 + 1e-5).float().mean() > 0.9


def test_partition_groups() -> None:
    pos = torch.tensor([0.0, 0.24, 0.25, 0.74, 0.99, 1.0])
    assert partition_groups(pos, 4).tolist() == [0, 0, 1, 2, 3, 3]


def test_corruptions() -> None:
    x = _batch()["image"]
    g = torch.Generator().manual_seed(0)
    off = RegressionConfig(intensity_prob=0, shuffle_prob=0, paint_prob=0, swap_prob=0)
    assert torch.equal(corrupt(x, off, g), x)
    shuffle = RegressionConfig(intensity_prob=0, shuffle_prob=1, paint_prob=0, swap_prob=0)
    y = corrupt(x, shuffle, g)
    assert not torch.equal(y, x)
    torch.testing.assert_close(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # a permutation
    y = corrupt(x, RegressionConfig(), g)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(y, x)


def test_contrastive_local_loss_trains_the_decoder() -> None:
    batch = _batch()
    glob = ContrastiveTask(TINY, ContrastiveConfig(proj_hidden=16, proj_dim=8), seed=0, distributed=False)
    assert glob.export_parts() == ("encoder",) and glob.decoder is None
    loss, metrics = glob.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss_global" in metrics

    cfg = ContrastiveConfig(proj_hidden=16, proj_dim=8, positives="partition", local_weight=1.0, local_level=-1,
                            local_points=6, local_dim=4)
    task = ContrastiveTask(TINY, cfg, seed=0, distributed=False)
    loss, metrics = task.loss(batch)
    loss.backward()
    assert task.export_parts() == ("encoder", "decoder")
    assert {k for k in metrics if not k.startswith("health/")} == {"loss_global", "loss_local"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.decoder.parameters())


def test_task_randomness_is_restorable() -> None:
    task = RegressionTask(TINY, RegressionConfig(), seed=5)
    batch = _batch()
    state = task.rng_state()
    a, _ = task.loss(batch)
    task.set_rng_state(state)
    b, _ = task.loss(batch)
    assert torch.equal(a, b)


def test_regression_learns_to_restore() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and immune to a busy machine
    torch.manual_seed(0)
    task = RegressionTask(TINY, RegressionConfig(), seed=0)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    batch = _batch(8)
    losses = []
    for _ in range(30):
        loss, _ = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_figures() -> None:
    import matplotlib.pyplot as plt

    batch = _batch(3)
    for task in (RegressionTask(TINY, RegressionConfig(), seed=0),
                 ContrastiveTask(TINY, ContrastiveConfig(), seed=0, distributed=False)):
        fig = task.figure(batch)
        assert len(fig.axes) == 9
        plt.close(fig)


def test_registry_table_drives_config_and_export(tmp_path: Path) -> None:
    from ssl_pretrain.config import ConfigError, describe, load_config
    from ssl_pretrain.engine.config import PretrainConfig
    from ssl_pretrain.export import load_export, save_export
    from ssl_pretrain.models.dna import TINY_ARCH

    tiny3d = UNetConfig(spatial_dims=3, arch=TINY_ARCH)
    for name, spec in TASKS.items():
        model = TINY if 2 in spec.dims else tiny3d
        assert isinstance(spec.task(model, spec.config(), seed=0, distributed=False), PretextTask), name
    keys = {k for k, _, _ in describe(PretrainConfig)}
    assert {"contrastive.temperature", "regression.loss"} <= keys
    allowed = "'contrastive', 'regression', 'mim', 'contrastive3d'"
    with pytest.raises(ConfigError, match=f"task: must be one of {allowed}; got 'jigsaw'"):
        load_config(PretrainConfig, overrides=["task=jigsaw"])
    # the export records the task as a string: one from a task registered in another process loads here
    save_export(tmp_path / "m.pt", task="jigsaw", model_config=TINY, encoder_state={}, decoder_state=None,
                preprocessing={})
    assert load_export(tmp_path / "m.pt")["task"] == "jigsaw"
    with pytest.raises(ValueError, match="task: a non-empty name"):
        save_export(tmp_path / "n.pt", task="", model_config=TINY, encoder_state={}, decoder_state=None,
                    preprocessing={})
    with pytest.raises(ValueError, match="already registered"):
        register_task("regression", RegressionConfig, RegressionTask)
    with pytest.raises(ValueError, match="before importing ssl_pretrain.engine.config"):
        register_task("jigsaw", RegressionConfig, RegressionTask)
    assert "jigsaw" not in TASKS


@pytest.mark.slow
def test_toy_task_registered_and_pretrained(pretrain_shards: Path, tmp_path: Path) -> None:
    """A task from outside the package: one register_task call, then the real CLI pretrains it (DeepSpeed)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "rot"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "ssl_pretrain" / "scripts" / "toy_task.py"),
         "--config", str(root / "launch" / "configs" / "debug.yaml"), f"data.shards={pretrain_shards}",
         f"out_dir={out}", "task=rotation", "rotation.turns=4", "track=false", "data.num_workers=0",
         "train.max_steps=6", "train.ckpt_every=3", "train.image_every=3"],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**env, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all("accuracy" in r for r in rows)
    export = torch.load(out / "export" / "model.pt", weights_only=True)
    assert export["task"] == "rotation" and export["decoder"] is None and export["encoder"]
    assert "turns: 4" in (out / "config.yaml").read_text()
    assert (out / "plots" / "rotation-step00000003.png").is_file()


def test_health_statistics_closed_forms() -> None:
    from ssl_pretrain.tasks.health import CollapseWatch, contrastive_health, effective_rank, normalised_std, psnr

    g = torch.Generator().manual_seed(0)
    same = torch.randn(1, 16, generator=g).expand(32, 16)  # every slice gets the same embedding
    assert float(normalised_std(same)) < 1e-6
    assert abs(float(effective_rank(same)) - 1.0) < 1e-4
    d = 64
    iso = torch.randn(8192, d, generator=g)  # isotropic Gaussian: uniform directions on the sphere
    assert abs(float(normalised_std(iso)) * d**0.5 - 1.0) < 0.02
    assert float(effective_rank(iso)) > 0.95 * d
    h = contrastive_health(iso[:256], iso[:256])  # perfectly aligned views
    assert float(h["alignment"]) < 1e-10 and float(h["top1"]) == 1.0
    assert abs(float(h["std_norm"]) - 1.0) < 0.1 and float(h["uniformity"]) < -3.0
    collapsed = contrastive_health(same, same)
    assert float(collapsed["std_norm"]) < 1e-5 and abs(float(collapsed["uniformity"])) < 1e-6
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 0, 0] = 1.0  # intensity range 1
    assert abs(float(psnr(target + 0.1, target)) - 20.0) < 1e-4  # mse 0.01 → 20 dB
    watch = CollapseWatch(threshold=0.1, patience=2)
    assert watch.update(1, 0.05) is None and watch.update(2, 0.5) is None and watch.update(3, 0.05) is None
    assert "step 4: embeddings collapsed" in (watch.update(4, 0.01) or "")
    assert watch.update(5, 0.01) is None  # one warning line, not one per log


def test_tasks_report_health() -> None:
    batch = _batch(8)
    _, metrics = ContrastiveTask(TINY, ContrastiveConfig(), seed=0, distributed=False).loss(batch)
    assert {"health/std", "health/std_norm", "health/eff_rank", "health/alignment", "health/uniformity",
            "health/top1"} <= set(metrics)
    _, metrics = RegressionTask(TINY, RegressionConfig(), seed=0).loss(batch)
    gain = metrics["health/psnr_restored"] - metrics["health/psnr_corrupted"]
    assert torch.isclose(metrics["health/psnr_gain"], gain)
