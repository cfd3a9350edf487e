"""Regression pretext task: restore a slice or a 3D patch from a corrupted copy (Models Genesis, context restoration).

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

Every corruption works on slices ``(B, C, H, W)`` and on 3D patches ``(B, C, D, H, W)`` alike
(blocks, boxes, patches and tiles become cubes; a slice batch draws exactly what it drew before
volumes existed). With ``model.spatial_dims: 3`` the network is nnU-Net's (``model.arch``), whose
segmentation layer outputs the image channels.

The UNet (encoder + decoder + :class:`~ssl_pretrain.models.heads.ReconstructionHead`) restores
the original; the loss is L2 (or L1), the mean over the image's pixels (or over the masked ones
with ``mask_loss=masked``). Encoder and decoder are exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_pretrain.config import ConfigError, FieldError, option, validate
from ssl_pretrain.models.dna import build_network, without_deep_supervision
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
    """Permute the pixels (voxels) inside a random ``fraction`` of the ``block``-sided tiles of each sample.

    ``x`` is ``(B, C, H, W)`` or ``(B, C, D, H, W)``; edge pixels that fill no whole tile stay put.
    """
    b, c, *size = x.shape
    d = len(size)
    nb = [n // block for n in size]
    if min(nb) == 0:
        return x
    core_sl = (Ellipsis, *(slice(0, k * block) for k in nb))
    core = x[core_sl].reshape(b, c, *(v for k in nb for v in (k, block)))
    tiles_first = [0, 1, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2)]
    core = core.permute(*tiles_first).reshape(b, c, *nb, block**d)
    perm = _rand((b, 1, *nb, block**d), g, x.device).argsort(-1).expand_as(core)
    chosen = _rand((b, 1, *nb, 1), g, x.device) < fraction
    core = torch.where(chosen, core.gather(-1, perm), core)
    back = [0, 1, *(v for i in range(d) for v in (2 + i, 2 + d + i))]
    core = core.reshape(b, c, *nb, *[block] * d).permute(*back).reshape(b, c, *(k * block for k in nb))
    out = x.clone()
    out[core_sl] = core
    return out


def _box_union(
    b: int, n: int, size: tuple[int, ...], frac: tuple[float, float], g: torch.Generator, dev: torch.device
) -> torch.Tensor:
    """Union of ``n`` random boxes per sample, sides a ``frac`` fraction of the image's: ``(B, 1, *size)`` bool.

    Draws every axis's sides, then every axis's corners (the 2D order: heights, widths, rows, columns).
    """
    sides = [(frac[0] + (frac[1] - frac[0]) * _rand((b, n), g, dev)) * m for m in size]
    corners = [_rand((b, n), g, dev) * (m - side) for m, side in zip(size, sides, strict=True)]
    inside = torch.ones((b, n, *[1] * len(size)), dtype=torch.bool, device=dev)
    for axis, (m, side, lo) in enumerate(zip(size, sides, corners, strict=True)):
        pos = torch.arange(m, device=dev).view(1, 1, *[m if a == axis else 1 for a in range(len(size))])
        lo_, hi_ = (v.view(b, n, *[1] * len(size)) for v in (lo, lo + side))
        inside = inside & (pos >= lo_) & (pos < hi_)
    return inside.any(1, keepdim=True)


def _paint(y: torch.Tensor, boxes: int, inpaint_ratio: float, g: torch.Generator) -> torch.Tensor:
    """Per sample, in-painting (``boxes`` small boxes replaced by uniform noise; probability
    ``inpaint_ratio``) or out-painting (all but ``boxes`` larger boxes replaced); ``y`` is ``(B, C, *spatial)``.

    Draws the noise, the holes, the kept boxes, then the choice (the order the 2D task always had)."""
    b, dims = y.shape[0], tuple(range(1, y.ndim))
    lo = y.amin(dim=dims, keepdim=True)
    span = y.amax(dim=dims, keepdim=True) - lo
    noise = lo + span * _rand(tuple(y.shape), g, y.device)
    holes = _box_union(b, boxes, tuple(y.shape[2:]), (0.1, 0.3), g, y.device)
    keep = _box_union(b, boxes, tuple(y.shape[2:]), (0.3, 0.6), g, y.device)
    inpaint = (_rand((b,), g, y.device) < inpaint_ratio).view(b, *[1] * (y.ndim - 1))
    return torch.where(inpaint, torch.where(holes, noise, y), torch.where(keep, y, noise))


def _swap_patches(x: torch.Tensor, count: int, size: float, chosen: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Swap ``count`` random pairs of square (cubic) patches in the ``chosen`` ``(B,)`` samples.

    ``x`` is ``(B, C, *spatial)``. Per pair, both corners are drawn along each axis in turn (the 2D
    order: rows, then columns).
    """
    b, c, *dims = x.shape
    d, dev, n = len(dims), x.device, math.prod(dims)
    p = max(1, round(size * min(dims)))
    pos = [torch.arange(m, device=dev).view(1, *[m if a == axis else 1 for a in range(d)])
           for axis, m in enumerate(dims)]
    strides = [math.prod(dims[axis + 1:]) for axis in range(d)]
    pix = sum(q * st for q, st in zip(pos, strides, strict=True)).expand(b, *dims)
    one = (b, *[1] * d)
    flat = x.reshape(b, c, n)
    for _ in range(count):
        corners = [(_rand((2, b), g, dev) * (m - p + 1)).long().clamp(max=m - p).unbind(0) for m in dims]

        def box(which: int, corners: list[tuple[torch.Tensor, ...]] = corners) -> torch.Tensor:
            inside = chosen.view(one)
            for q, corner in zip(pos, corners, strict=True):
                lo = corner[which].view(one)
                inside = inside & (q >= lo) & (q < lo + p)
            return inside

        offset = sum((cb - ca) * st for (ca, cb), st in zip(corners, strides, strict=True)).view(one)
        src = torch.where(box(0), pix + offset, torch.where(box(1), pix - offset, pix))
        flat = flat.gather(2, src.reshape(b, 1, n).expand(b, c, n))
    return flat.reshape(b, c, *dims)


def random_tiles(b: int, size: tuple[int, ...], tile: tuple[int, ...], k: int, g: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """``(B, 1, *size)`` bool: ``k`` random tiles of side ``tile`` per sample, True inside them.

    The image is tiled from its corner (edge tiles cut to the image); the ``k`` tiles are the ``k``
    smallest of one ``(B, tiles)`` uniform draw, so each sample gets exactly ``k``.
    """
    grid = [-(-n // t) for n, t in zip(size, tile, strict=True)]
    tiles = math.prod(grid)
    chosen = _rand((b, tiles), g, device).argsort(1)[:, :k]
    m = torch.zeros(b, tiles, dtype=torch.bool, device=device).scatter_(1, chosen, True).view(b, *grid)
    for axis, t in enumerate(tile):
        m = m.repeat_interleave(t, dim=1 + axis)
    return m[(slice(None), *(slice(0, n) for n in size))][:, None]


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
    b, _, *size = x.shape
    p = cfg.mask_patch
    tiles = math.prod(-(-n // p) for n in size)  # ceil: edge tiles are cut to the image, every pixel can be masked
    k = round(cfg.mask_ratio * tiles)
    if p > min(size) or not 0 < k < tiles:
        what = "slice" if len(size) == 2 else "patch"
        raise ConfigError(
            f"regression.mask_patch: {p}-pixel tiles of a {'×'.join(map(str, size))} {what} give {tiles} tile(s), of "
            f"which mask_ratio={cfg.mask_ratio} masks {k}; need a tile no larger than the {what} and 0 < masked < tiles"
        )
    return random_tiles(b, tuple(size), (p,) * len(size), k, g, x.device)


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
    b = x.shape[0]
    dev = x.device

    def pick(prob: float) -> torch.Tensor:
        return (_rand((b,), g, dev) < prob).view(b, *[1] * (x.ndim - 1))

    y = torch.where(pick(cfg.intensity_prob), bezier_remap(x, g, invert_prob=0.5), x)
    y = torch.where(pick(cfg.shuffle_prob), _local_shuffle(y, cfg.shuffle_block, cfg.shuffle_fraction, g), y)
    painted = _paint(y, cfg.paint_boxes, cfg.inpaint_ratio, g)
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
    spatial = tuple(range(2, y.ndim))
    fill = (y * visible).sum(spatial, keepdim=True) / visible.sum(spatial, keepdim=True)
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
        self.head: nn.Module | None
        if model_cfg.spatial_dims == 3:  # nnU-Net's network: its segmentation layer outputs the image channels
            assert model_cfg.arch is not None  # the model config's check
            net = without_deep_supervision(build_network(
                model_cfg.network_class_name, model_cfg.arch, input_channels=model_cfg.in_channels,
                num_classes=model_cfg.in_channels))
            self.encoder, self.decoder, self.head = net.encoder, net.decoder, None
        else:
            unet = UNet(model_cfg, out_channels=model_cfg.in_channels)
            self.encoder = unet.encoder
            self.decoder = unet.decoder
            self.head = ReconstructionHead(model_cfg.widths[0], model_cfg.in_channels)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def export_parts(self) -> tuple[str, ...]:
        """The UNet parts this task trains (and that the export carries)."""
        return ("encoder", "decoder")

    def restore(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Restored images ``(B, C, *spatial)`` (in the parameters' dtype) from corrupted ones."""
        param = next(self.parameters())
        if self.head is None:  # 3D: the library's UNet forward
            return self.decoder(self.encoder(corrupted.to(param.dtype)))
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
        columns = [("corrupted", corrupted), ("restored", restored), ("original", x)]
        if x.ndim == 5:  # volumes: their middle slices
            columns = [(t, v[:, :, v.shape[2] // 2]) for t, v in columns]
        return image_grid(columns)

    def rng_state(self) -> torch.Tensor:
        """State of the corruption generator (saved in checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)
