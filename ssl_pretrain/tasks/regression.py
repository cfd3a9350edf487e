"""Regression pretext task: restore a slice from a corrupted copy (Models Genesis, context restoration).

Corruptions (Zhou et al. 2019; Chen et al. 2019), each applied to a sample with its own
probability, in this order, all as batched torch ops:

1. non-linear intensity transform — a random monotone Bézier curve on the min-max rescaled slice
   (flipped to a decreasing curve half of the time; :func:`~ssl_pretrain.tasks.intensity.bezier_remap`);
2. local pixel shuffling — pixels permuted inside a random subset of small blocks;
3. in-painting (random boxes replaced by noise) or out-painting (everything but a few boxes replaced);
4. context restoration — ``swap_count`` pairs of square patches swapped;
5. masking (masked image modelling, in the spirit of MAE / SparK; off by default) — the slice is
   tiled into non-overlapping ``mask_patch``×``mask_patch`` squares (edge tiles are cut to the
   slice) and exactly ``round(mask_ratio × tiles)`` of them per sample, a uniform random subset,
   are removed: set to the mean of that sample's visible pixels (per channel). Masking comes last,
   so masked pixels always hold that fill, whatever the other corruptions did, and the visible
   rest carries them.

Masking options (``regression.*``):

- ``mask_ratio`` (float in [0, 1), default ``0.0`` = off): share of tiles masked per sample. At 0
  nothing extra is drawn from the task's generator, so the corruptions stay bit for bit what they
  were without it. A pure-MAE recipe: ``intensity_prob=0 shuffle_prob=0 paint_prob=0 swap_prob=0
  mask_ratio=0.6``.
- ``mask_patch`` (int >= 1, default ``8``): tile side in pixels. A tile larger than the slice, or a
  ratio that masks no tile or every tile of it, is a ConfigError at the first batch (not clamped:
  a clamped mask would silently be a different recipe).
- ``mask_loss`` (``"all"`` | ``"masked"``, default ``"all"``): pixels the loss is averaged over;
  ``"masked"`` counts only masked pixels (MAE's choice), and needs ``mask_ratio > 0``.

The UNet (encoder + decoder + :class:`~ssl_pretrain.models.heads.ReconstructionHead`) restores
the original; the loss is L2 (or L1), the mean over the image's pixels (or over the masked ones
with ``mask_loss=masked``). Encoder and decoder are exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_pretrain.config import ConfigError, FieldError, option, validate
from ssl_pretrain.models.heads import ReconstructionHead
from ssl_pretrain.models.unet import UNet, UNetConfig
from ssl_pretrain.tasks.figures import image_grid
from ssl_pretrain.tasks.health import regression_health
from ssl_pretrain.tasks.intensity import bezier_remap

__all__ = ["RegressionConfig", "RegressionTask", "corrupt", "corrupt_with_mask", "patch_mask", "restoration_error"]


@dataclass
class RegressionConfig:
    """Options of the regression (restoration) task."""

    loss: Literal["l2", "l1"] = option("l2", "restoration loss over the image")
    intensity_prob: float = option(0.9, "probability of the non-linear intensity transform", ge=0, le=1)
    shuffle_prob: float = option(0.5, "probability of local pixel shuffling", ge=0, le=1)
    shuffle_block: int = option(4, "block side (pixels) of local pixel shuffling", ge=1)
    shuffle_fraction: float = option(0.3, "fraction of blocks shuffled", ge=0, le=1)
    paint_prob: float = option(0.9, "probability of in- or out-painting", ge=0, le=1)
    inpaint_ratio: float = option(0.5, "share of in-painting among paintings (the rest is out-painting)", ge=0, le=1)
    paint_boxes: int = option(3, "boxes per in-/out-painting", ge=1)
    swap_prob: float = option(0.5, "probability of context restoration (patch swapping)", ge=0, le=1)
    swap_count: int = option(8, "patch pairs swapped", ge=1)
    swap_size: float = option(0.125, "swapped patch side as a fraction of the slice side", gt=0, le=0.5)
    mask_ratio: float = option(0.0, "share of mask_patch tiles masked per sample (0 = no masking)", ge=0, lt=1)
    mask_patch: int = option(8, "side (pixels) of the square tiles that masking removes", ge=1)
    mask_loss: Literal["all", "masked"] = option("all", "pixels the loss is averaged over: all, or the masked only")

    def check_fields(self) -> None:
        """The rule across fields (the bounds are checked by the config loader)."""
        if self.mask_loss == "masked" and self.mask_ratio == 0.0:
            raise FieldError("mask_loss: 'masked' needs regression.mask_ratio > 0 (nothing is masked at 0)")

def _rand(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device)


def _local_shuffle(x: torch.Tensor, block: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Permute the pixels inside a random ``fraction`` of the ``block``×``block`` tiles of each sample."""
    b, c, h, w = x.shape
    hb, wb = h // block, w // block
    if hb == 0 or wb == 0:
        return x
    core = x[..., : hb * block, : wb * block].reshape(b, c, hb, block, wb, block)
    core = core.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hb, wb, block * block)
    perm = _rand((b, 1, hb, wb, block * block), g, x.device).argsort(-1).expand_as(core)
    chosen = _rand((b, 1, hb, wb, 1), g, x.device) < fraction
    core = torch.where(chosen, core.gather(-1, perm), core)
    core = core.reshape(b, c, hb, wb, block, block).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hb * block, wb * block)
    out = x.clone()
    out[..., : hb * block, : wb * block] = core
    return out


def _box_union(
    b: int, n: int, h: int, w: int, size: tuple[float, float], g: torch.Generator, dev: torch.device
) -> torch.Tensor:
    """Union of ``n`` random boxes per sample, sides a ``size`` fraction of the slice: ``(B, 1, H, W)`` bool."""
    bh = (size[0] + (size[1] - size[0]) * _rand((b, n), g, dev)) * h
    bw = (size[0] + (size[1] - size[0]) * _rand((b, n), g, dev)) * w
    y0 = _rand((b, n), g, dev) * (h - bh)
    x0 = _rand((b, n), g, dev) * (w - bw)
    ys = torch.arange(h, device=dev).view(1, 1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, 1, w)
    inside = (
        (ys >= y0[..., None, None]) & (ys < (y0 + bh)[..., None, None])
        & (xs >= x0[..., None, None]) & (xs < (x0 + bw)[..., None, None])
    )
    return inside.any(1, keepdim=True)


def _swap_patches(x: torch.Tensor, count: int, size: float, chosen: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Swap ``count`` random pairs of square patches in the ``chosen`` ``(B,)`` samples."""
    b, c, h, w = x.shape
    dev = x.device
    p = max(1, round(size * min(h, w)))
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    pix = (ys * w + xs).expand(b, h, w)
    flat = x.reshape(b, c, h * w)
    for _ in range(count):
        ya, yb = ((_rand((2, b), g, dev) * (h - p + 1)).long().clamp(max=h - p)).unbind(0)
        xa, xb = ((_rand((2, b), g, dev) * (w - p + 1)).long().clamp(max=w - p)).unbind(0)

        def box(y0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            y0, x0 = y0.view(b, 1, 1), x0.view(b, 1, 1)
            return (ys >= y0) & (ys < y0 + p) & (xs >= x0) & (xs < x0 + p) & chosen.view(b, 1, 1)

        offset = ((yb - ya) * w + (xb - xa)).view(b, 1, 1)
        src = torch.where(box(ya, xa), pix + offset, torch.where(box(yb, xb), pix - offset, pix))
        flat = flat.gather(2, src.reshape(b, 1, h * w).expand(b, c, h * w))
    return flat.reshape(b, c, h, w)


def patch_mask(x: torch.Tensor, cfg: RegressionConfig, g: torch.Generator) -> torch.Tensor:
    """Draw the tiles that masking removes: exactly ``round(mask_ratio × tiles)`` per sample.

    Args:
        x: ``(B, C, H, W)`` images (only their shape and device are used).
        cfg: ``mask_ratio`` (> 0) and ``mask_patch``.
        g: Generator on ``x.device``; one ``(B, tiles)`` uniform draw, ranked per sample.

    Returns:
        ``(B, 1, H, W)`` bool, True on masked pixels.

    Raises:
        ConfigError: The tile is larger than the slice, or the ratio masks no tile or every tile.
    """
    b, _, h, w = x.shape
    p = cfg.mask_patch
    hp, wp = -(-h // p), -(-w // p)  # ceil: edge tiles are cut to the slice, so every pixel can be masked
    tiles = hp * wp
    k = round(cfg.mask_ratio * tiles)
    if p > min(h, w) or not 0 < k < tiles:
        raise ConfigError(
            f"regression.mask_patch: {p}-pixel tiles of a {h}×{w} slice give {tiles} tile(s), of which "
            f"mask_ratio={cfg.mask_ratio} masks {k}; need a tile no larger than the slice and 0 < masked < tiles"
        )
    # a random subset of exactly k tiles per sample: the k smallest of B×tiles uniform draws
    chosen = _rand((b, tiles), g, x.device).argsort(1)[:, :k]
    tile_mask = torch.zeros(b, tiles, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
    pixel_mask = tile_mask.view(b, hp, 1, wp, 1).expand(b, hp, p, wp, p).reshape(b, hp * p, wp * p)
    return pixel_mask[:, None, :h, :w]


def corrupt_with_mask(
    x: torch.Tensor, cfg: RegressionConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Corrupt every slice of a batch as described in the module docstring, and say what was masked.

    Args:
        x: ``(B, C, H, W)`` float images.
        cfg: Corruption probabilities and sizes.
        g: Generator on ``x.device``; the only source of randomness.

    Returns:
        ``(corrupted, mask)``: ``(B, C, H, W)`` corrupted images (``x`` is not modified) and the
        ``(B, 1, H, W)`` bool mask of :func:`patch_mask`, or None when ``mask_ratio`` is 0.
    """
    b, c, h, w = x.shape
    dev = x.device

    def pick(prob: float) -> torch.Tensor:
        return (_rand((b,), g, dev) < prob).view(b, 1, 1, 1)

    y = torch.where(pick(cfg.intensity_prob), bezier_remap(x, g, invert_prob=0.5), x)
    y = torch.where(pick(cfg.shuffle_prob), _local_shuffle(y, cfg.shuffle_block, cfg.shuffle_fraction, g), y)
    lo = y.amin(dim=(1, 2, 3), keepdim=True)
    span = y.amax(dim=(1, 2, 3), keepdim=True) - lo
    noise = lo + span * _rand((b, c, h, w), g, dev)
    holes = _box_union(b, cfg.paint_boxes, h, w, (0.1, 0.3), g, dev)
    keep = _box_union(b, cfg.paint_boxes, h, w, (0.3, 0.6), g, dev)
    painted = torch.where(pick(cfg.inpaint_ratio), torch.where(holes, noise, y), torch.where(keep, y, noise))
    y = torch.where(pick(cfg.paint_prob), painted, y)
    y = _swap_patches(y, cfg.swap_count, cfg.swap_size, pick(cfg.swap_prob).view(b), g)
    if cfg.mask_ratio == 0.0:
        return y, None  # no draw: the corruptions without masking stay bit for bit as they were
    mask = patch_mask(y, cfg, g)
    # Fill with the mean of the visible pixels (per sample and channel), not 0: the fill carries
    # nothing of the removed content, sits inside the slice's own intensity range whatever the
    # normalisation (0 is the mean of a z-scored volume, not of every slice or contrast), and so
    # adds no artificial edge beyond the tile border itself.
    visible = (~mask).to(y.dtype)
    fill = (y * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)
    return torch.where(mask, fill, y), mask


def corrupt(x: torch.Tensor, cfg: RegressionConfig, g: torch.Generator) -> torch.Tensor:
    """The corrupted images of :func:`corrupt_with_mask` (``(B, C, H, W)``, ``x`` is not modified)."""
    return corrupt_with_mask(x, cfg, g)[0]


def restoration_error(
    restored: torch.Tensor, target: torch.Tensor, counted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute and mean squared error, over every pixel or only the ``counted`` ones.

    Args:
        restored: ``(B, C, H, W)`` predictions.
        target: ``(B, C, H, W)`` originals.
        counted: ``(B, 1, H, W)`` bool pixels to average over (``mask_loss=masked``: the masked
            ones, MAE's choice: only removed content is to be predicted); None: all of them.

    Returns:
        ``(l1, l2)``, scalars; a mean over the counted pixels (and channels), so the scale does not
        depend on the mask ratio.
    """
    if counted is None:
        return F.l1_loss(restored, target), F.mse_loss(restored, target)
    weight = counted.expand_as(target).to(target.dtype)  # a weighted mean: boolean indexing is a host sync
    err = restored - target
    n = weight.sum()
    return (err.abs() * weight).sum() / n, (err.square() * weight).sum() / n


class RegressionTask(nn.Module):
    """UNet encoder + decoder + reconstruction head, trained to undo :func:`corrupt`.

    Args:
        model_cfg: UNet architecture.
        cfg: Task options.
        seed: Seed of the task's corruption generator (use a different one per rank).
        distributed: Unused: the restoration loss is per sample, nothing is gathered across ranks.
        device: Device of that generator (the device batches are moved to).
    """

    needs_position = False

    def __init__(
        self,
        model_cfg: UNetConfig,
        cfg: RegressionConfig,
        *,
        seed: int,
        distributed: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        validate(cfg, "regression.")  # configs built in code skip load_config's check; mask_loss=masked needs a mask
        self.model_cfg = model_cfg
        self.cfg = cfg
        unet = UNet(model_cfg, out_channels=model_cfg.in_channels)
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.head = ReconstructionHead(model_cfg.widths[0], model_cfg.in_channels)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def export_parts(self) -> tuple[str, ...]:
        """The UNet parts this task trains (and that the export carries)."""
        return ("encoder", "decoder")

    def restore(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Restored images ``(B, C, H, W)`` (in the parameters' dtype) from corrupted ones."""
        param = next(self.parameters())
        return self.head(self.decoder(self.encoder(corrupted.to(param.dtype)))[-1])

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Restoration loss of one micro batch.

        Returns:
            ``(loss, metrics)``; metrics hold the detached ``l1`` / ``l2`` error of the restoration (over
            the pixels the loss counts) and the ``health/psnr_*`` (over the whole image) of
            :func:`~ssl_pretrain.tasks.health.regression_health`.
        """
        param = next(self.parameters())
        x = batch["image"].to(param.device, torch.float32)
        corrupted, mask = corrupt_with_mask(x, self.cfg, self.generator)
        restored = self.restore(corrupted).float()
        l1, l2 = restoration_error(restored, x, mask if self.cfg.mask_loss == "masked" else None)
        loss = l2 if self.cfg.loss == "l2" else l1
        health = regression_health(restored.detach(), corrupted, x)
        return loss, {"l1": l1.detach(), "l2": l2.detach(), **{f"health/{k}": v for k, v in health.items()}}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`loss` (DeepSpeed calls ``forward``)."""
        return self.loss(batch)

    @torch.no_grad()
    def figure(self, batch: dict[str, Any], n: int = 4) -> Any:
        """Corrupted / restored / original for the first ``n`` samples (fixed corruption seed)."""
        param = next(self.parameters())
        x = batch["image"][:n].to(param.device, torch.float32)
        corrupted = corrupt(x, self.cfg, torch.Generator(device=param.device).manual_seed(0))
        was_training = self.training
        self.eval()  # batch norm must not update its running statistics on figure batches
        try:
            restored = self.restore(corrupted).float()
        finally:
            self.train(was_training)
        return image_grid([("corrupted", corrupted), ("restored", restored), ("original", x)])

    def rng_state(self) -> torch.Tensor:
        """State of the corruption generator (saved in checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)
