"""Masked image modelling in the regression task: regression.mask_ratio / mask_patch / mask_loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_pretrain.config import ConfigError, load_config, validate
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.regression import (
    RegressionConfig,
    RegressionTask,
    corrupt,
    corrupt_with_mask,
    restoration_error,
)

TINY = UNetConfig(widths=(8, 16, 32))
ONLY_MASK = {"intensity_prob": 0.0, "shuffle_prob": 0.0, "paint_prob": 0.0, "swap_prob": 0.0}  # pure MAE


def _images(b: int = 4, c: int = 1, h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(b, c, h, w, generator=g), 5, 1, 2) * 3  # smooth blobs, like a slice


def _weighted_sums(y: torch.Tensor) -> tuple[float, float, float]:
    y64 = y.double()
    pos = torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape) / y.numel()  # position-sensitive
    return y64.sum().item(), y64.square().sum().item(), (y64 * pos).sum().item()


def test_defaults_corrupt_as_before_masking_existed() -> None:
    # recorded with the code before the masking options (commit 9c3a940), same input and seed:
    # the output and the generator's next draw, so "no extra draw at mask_ratio=0" is checked too
    for cfg in (RegressionConfig(), RegressionConfig(mask_patch=3, mask_loss="all")):
        g = torch.Generator().manual_seed(7)
        y = corrupt(_images(), cfg, g)
        assert _weighted_sums(y) == pytest.approx((-286.22960740327835, 1139.6747854699097, -309.8179095568446),
                                                  rel=1e-6)
        assert torch.rand(1, generator=g).item() == pytest.approx(0.964289665222168, abs=1e-7)
    _, mask = corrupt_with_mask(_images(), RegressionConfig(), torch.Generator().manual_seed(7))
    assert mask is None


def test_exact_number_of_masked_tiles_per_sample() -> None:
    # 24×20 in 8-pixel tiles: 3×3 tiles (the right column cut to 4 pixels); 0.6 × 9 → 5 masked
    x = _images(b=6, c=2)
    cfg = RegressionConfig(mask_ratio=0.6, mask_patch=8)
    _, mask = corrupt_with_mask(x, cfg, torch.Generator().manual_seed(1))
    assert mask is not None and mask.shape == (6, 1, 24, 20) and mask.dtype == torch.bool
    tiles = mask[:, 0, ::8, ::8]  # each tile's top-left pixel
    assert tiles.flatten(1).sum(1).tolist() == [5] * 6
    # the mask is constant on every tile: it is the tile mask blown up (and cut to the slice)
    blown = tiles.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :24, :20]
    assert torch.equal(mask[:, 0], blown)
    assert len({tuple(t.flatten().tolist()) for t in tiles}) > 1  # a subset per sample, not one for all
    # a divisible slice: the masked share of pixels is the ratio of tiles exactly
    _, mask = corrupt_with_mask(_images(b=3, h=32, w=32), RegressionConfig(mask_ratio=0.75, mask_patch=4),
                                torch.Generator().manual_seed(2))
    assert mask is not None and mask.flatten(1).sum(1).tolist() == [48 * 16] * 3


def test_masked_pixels_hold_the_visible_mean_and_the_rest_is_unchanged() -> None:
    x = _images(b=5, c=2) + torch.tensor([0.0, 10.0]).view(1, 2, 1, 1)  # channels on different scales
    y, mask = corrupt_with_mask(x, RegressionConfig(mask_ratio=0.5, mask_patch=4, **ONLY_MASK),
                                torch.Generator().manual_seed(3))
    assert mask is not None and mask.any()
    m = mask.expand_as(x)
    assert torch.equal(y[~m], x[~m])
    visible = (~mask).to(x.dtype)
    fill = (x * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)  # per sample, channel
    torch.testing.assert_close(y, torch.where(m, fill.expand_as(x), x), rtol=0, atol=0)
    assert fill[:, 1].mean() > 9  # the second channel's fill is its own mean, not the first's
    # the other corruptions still run before the mask when their probabilities say so
    y2, mask2 = corrupt_with_mask(x, RegressionConfig(mask_ratio=0.5, mask_patch=4, intensity_prob=1.0,
                                                      shuffle_prob=0.0, paint_prob=0.0, swap_prob=0.0),
                                  torch.Generator().manual_seed(3))
    assert mask2 is not None and not torch.equal(y2[~mask2.expand_as(x)], x[~mask2.expand_as(x)])


def test_masked_loss_counts_errors_inside_the_mask_only() -> None:
    x = _images(b=3, c=2)
    _, mask = corrupt_with_mask(x, RegressionConfig(mask_ratio=0.6, **ONLY_MASK), torch.Generator().manual_seed(4))
    assert mask is not None
    m = mask.expand_as(x)
    wrong_outside = torch.where(m, x, x + 5.0)
    l1, l2 = restoration_error(wrong_outside, x, mask)
    assert l1.item() == 0.0 and l2.item() == 0.0
    wrong_inside = torch.where(m, x + 0.5, x)
    l1, l2 = restoration_error(wrong_inside, x, mask)
    torch.testing.assert_close(l1, torch.tensor(0.5))  # a mean over the masked pixels, not a sum
    torch.testing.assert_close(l2, torch.tensor(0.25))
    share = m.float().mean()
    l1_all, l2_all = restoration_error(wrong_inside, x)  # mask_loss=all: diluted by the visible pixels
    torch.testing.assert_close(l1_all, 0.5 * share)
    torch.testing.assert_close(l2_all, 0.25 * share)


def test_masking_is_reproducible_for_the_same_generator() -> None:
    x = _images()
    cfg = RegressionConfig(mask_ratio=0.4, mask_patch=4)
    a, ma = corrupt_with_mask(x, cfg, torch.Generator().manual_seed(5))
    b, mb = corrupt_with_mask(x, cfg, torch.Generator().manual_seed(5))
    _, mc = corrupt_with_mask(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and ma is not None and mb is not None and torch.equal(ma, mb)
    assert mc is not None and not torch.equal(ma, mc)
    task = RegressionTask(TINY, RegressionConfig(mask_ratio=0.6, mask_loss="masked"), seed=5)
    state = task.rng_state()
    batch = {"image": _images(b=4, h=32, w=32)}
    first, _ = task.loss(batch)
    task.set_rng_state(state)
    again, _ = task.loss(batch)
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_ratio": 1.0}, r"regression\.mask_ratio: must be in \[0, 1\), got 1\.0"),
        ({"mask_ratio": -0.1}, r"regression\.mask_ratio: must be in \[0, 1\), got -0\.1"),
        ({"mask_patch": 0}, r"regression\.mask_patch: must be >= 1, got 0"),
        ({"mask_loss": "masked"}, r"regression\.mask_loss: 'masked' needs regression\.mask_ratio > 0"),
    ],
)
def test_bad_mask_options_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(RegressionConfig(**overrides), "regression.")  # type: ignore[arg-type]


def test_mask_options_from_the_command_line() -> None:
    from ssl_pretrain.engine.config import PretrainConfig

    cfg = load_config(PretrainConfig, overrides=["task=regression", "regression.mask_ratio=0.6",
                                                 "regression.mask_patch=4", "regression.mask_loss=masked"])
    assert (cfg.regression.mask_ratio, cfg.regression.mask_patch, cfg.regression.mask_loss) == (0.6, 4, "masked")
    with pytest.raises(ConfigError, match=r"regression\.mask_loss: must be one of 'all', 'masked'; got 'some'"):
        load_config(PretrainConfig, overrides=["regression.mask_loss=some"])
    with pytest.raises(ConfigError, match=r"regression\.mask_loss: 'masked' needs"):
        load_config(PretrainConfig, overrides=["regression.mask_loss=masked"])


@pytest.mark.parametrize(
    ("ratio", "patch", "tiles", "masked"),
    [(0.5, 40, 1, 0), (0.9, 16, 4, 4), (0.1, 16, 4, 0)],  # tile > slice; every tile; no tile
)
def test_masks_that_make_no_sense_for_the_slice_fail_at_the_first_batch(
    ratio: float, patch: int, tiles: int, masked: int
) -> None:
    cfg = RegressionConfig(mask_ratio=ratio, mask_patch=patch)
    validate(cfg, "regression.")  # the slice size is not known before the first batch
    with pytest.raises(ConfigError, match=rf"regression\.mask_patch: {patch}-pixel tiles of a 32×32 slice give "
                                          rf"{tiles} tile\(s\), of which mask_ratio={ratio} masks {masked}"):
        corrupt(_images(h=32, w=32), cfg, torch.Generator().manual_seed(0))


def _train(fixed_mask: bool, steps: int = 20) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and immune to a busy machine
    try:
        torch.manual_seed(0)
        task = RegressionTask(TINY, RegressionConfig(mask_ratio=0.6, mask_patch=8, mask_loss="masked", **ONLY_MASK),
                              seed=0)
        opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
        batch = {"image": _images(b=4, h=32, w=32)}
        state = task.rng_state()
        losses = []
        for _ in range(steps):
            if fixed_mask:
                task.set_rng_state(state)  # the same masks every step: a pure memorisation problem
            loss, metrics = task.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses, metrics, loss.detach()


def test_masked_restoration_overfits_a_tiny_batch() -> None:
    # measured (seeds 0-2): mean of the last 5 / first 5 losses 0.22-0.36 with fixed masks,
    # 0.71-0.81 with fresh masks every step (the MAE task itself, 20 steps)
    losses, metrics, last = _train(fixed_mask=True)
    assert all(math.isfinite(v) for v in losses)
    assert torch.equal(metrics["l2"], last)  # the logged l2 is the masked loss itself
    assert {"health/psnr_restored", "health/psnr_corrupted", "health/psnr_gain"} <= set(metrics)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    losses, _, _ = _train(fixed_mask=False)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_figure_shows_the_masked_tiles() -> None:
    import matplotlib.pyplot as plt

    cfg = RegressionConfig(mask_ratio=0.5, mask_patch=8, **ONLY_MASK)
    batch = {"image": _images(b=3, h=32, w=32)}
    fig = RegressionTask(TINY, cfg, seed=0).figure(batch)
    try:
        assert len(fig.axes) == 9
        shown = torch.as_tensor(fig.axes[0].get_images()[0].get_array().data)  # sample 0, "corrupted"
        expected, mask = corrupt_with_mask(batch["image"], cfg, torch.Generator().manual_seed(0))
        assert mask is not None
        torch.testing.assert_close(shown, expected[0, 0])
        assert shown[mask[0, 0]].unique().numel() == 1  # the masked tiles: one flat fill
    finally:
        plt.close(fig)


def test_masked_pretraining_run(pretrain_shards: Path, tmp_path: Path) -> None:
    """The real trainer with the pure-MAE recipe: finite losses, health metrics and a figure."""
    from ssl_pretrain.engine.config import PretrainConfig
    from ssl_pretrain.engine.trainer import run_pretraining

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "mae"
    cfg = load_config(PretrainConfig, root / "launch" / "configs" / "debug.yaml", [
        f"data.shards={pretrain_shards}", f"out_dir={out}", "data.num_workers=0", "task=regression", "track=false",
        "regression.intensity_prob=0", "regression.shuffle_prob=0", "regression.paint_prob=0",
        "regression.swap_prob=0", "regression.mask_ratio=0.6", "regression.mask_loss=masked",
        "train.max_steps=6", "train.ckpt_every=6", "train.image_every=6",
    ])
    run_pretraining(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["health/psnr_gain"]) for r in rows)
    assert (out / "plots" / "regression-step00000006.png").is_file()
