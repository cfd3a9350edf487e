"""Contrastive pretext for 3D patches: global NT-Xent plus a dense loss over matching voxels.

Each patch yields two views: overlapping crops of ``crop_fraction`` of its side (multiples of the
network's stride product, so they pass through it), at random offsets on the grid of the dense
stage's stride, each with its own monotone Bézier intensity remap and Gaussian noise.

- **Global loss**: the average-pooled bottleneck of each view through an MLP; NT-Xent with the
  negatives of every rank (``kernels.nt_xent``).
- **Dense loss**: the crops' offsets are known, so the voxels both views contain are known:
  ``dense_points`` of them per patch are drawn (without replacement, on the stride grid of encoder
  stage ``dense_stage``), their features in each view go through a point-wise MLP, and one NT-Xent
  problem over all ``batch × dense_points`` pairs (gathered from every rank) treats the same voxel
  seen in the other view as the positive and every other voxel as a negative. At cluster sizes that
  is 10^4–10^5 pairs — what the fused kernel exists for.

The encoder is exported (the decoder is not trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_pretrain.config import ConfigError, FieldError, option
from ssl_pretrain.models.dna import build_network, feature_channels, patch_divisor
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.batch import gathered_rows
from ssl_pretrain.tasks.figures import image_grid
from ssl_pretrain.tasks.health import contrastive_health
from ssl_pretrain.tasks.intensity import bezier_remap

__all__ = ["Contrastive3DConfig", "Contrastive3DTask", "matching_voxels", "gather_points"]


@dataclass
class Contrastive3DConfig:
    """Options of the 3D contrastive task (the ``contrastive3d:`` section)."""

    temperature: float = option(0.1, "NT-Xent temperature of the global loss", gt=0)
    proj_hidden: int = option(256, "hidden width of the global projection MLP", ge=1)
    proj_dim: int = option(128, "embedding size of the global projection", ge=1)
    crop_fraction: float = option(0.75, "view side as a fraction of the patch side (> 0.5: views overlap)",
                                  gt=0.5, le=1)
    intensity_prob: float = option(0.8, "probability of a Bézier intensity remap per view", ge=0, le=1)
    noise_std: float = option(0.1, "standard deviation of Gaussian noise added to each view", ge=0)
    dense_weight: float = option(1.0, "weight of the dense (voxel) loss; 0 turns it off", ge=0)
    dense_stage: int = option(1, "encoder stage whose features the dense loss matches (0 = full resolution)", ge=0,
                              unbounded="its range depends on model.arch.n_stages: checked by check_model")
    dense_points: int = option(256, "matching voxels drawn per patch", ge=1)
    dense_dim: int = option(64, "embedding size of the dense head", ge=1)
    dense_temperature: float = option(0.1, "NT-Xent temperature of the dense loss", gt=0)

    def check_model(self, model_cfg: UNetConfig) -> None:
        """``dense_stage`` must be a stage of the network."""
        assert model_cfg.arch is not None  # the task table admits 3D models only, and they have an arch
        stages = len(feature_channels(model_cfg.arch))
        if self.dense_weight > 0 and self.dense_stage >= stages:
            raise FieldError(f"contrastive3d.dense_stage: the network has {stages} stages (0..{stages - 1}); "
                             f"got {self.dense_stage}")


def _stage_stride(arch: dict[str, Any], stage: int) -> tuple[int, int, int]:
    """Voxels per feature voxel of encoder stage ``stage`` along (D, H, W)."""
    return patch_divisor({"strides": arch["strides"][: stage + 1]})


def matching_voxels(o0: torch.Tensor, o1: torch.Tensor, view: tuple[int, ...], stride: tuple[int, ...], k: int,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-map indices, in each view, of ``k`` voxels that both views contain.

    Args:
        o0, o1: ``(B, 3)`` view offsets in the patch (multiples of ``stride``).
        view: The views' side along (D, H, W) (multiples of ``stride``).
        stride: Voxels per feature voxel along each axis.
        k: Voxels per sample: drawn without replacement from the overlap's stride grid (with
            replacement only when the overlap has fewer grid points).
        g: Draws the voxels.

    Returns:
        ``(i0, i1)``, each ``(B, k, 3)`` int64: the same patch voxel in view 0's and view 1's feature map.
    """
    out0, out1 = [], []
    for a, b in zip(o0.tolist(), o1.tolist(), strict=True):
        lo = [max(x, y) // s for x, y, s in zip(a, b, stride, strict=True)]
        hi = [(min(x, y) + v) // s for x, y, v, s in zip(a, b, view, stride, strict=True)]
        counts = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
        n = math.prod(counts)
        if n >= k:
            flat = torch.rand(n, generator=g, device=g.device).argsort()[:k].cpu()
        else:
            flat = torch.randint(n, (k,), generator=g, device=g.device).cpu()
        grid = torch.stack(torch.unravel_index(flat, counts), -1) + torch.tensor(lo)  # (k, 3) on the stride grid
        out0.append(grid - torch.tensor([x // s for x, s in zip(a, stride, strict=True)]))
        out1.append(grid - torch.tensor([y // s for y, s in zip(b, stride, strict=True)]))
    return torch.stack(out0), torch.stack(out1)


def gather_points(fmap: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Features ``(B * k, F)`` of ``fmap`` ``(B, F, d, h, w)`` at ``idx`` ``(B, k, 3)``."""
    b, k = idx.shape[:2]
    batch = torch.arange(b, device=fmap.device).repeat_interleave(k)
    i = idx.to(fmap.device).reshape(-1, 3)
    return fmap[batch, :, i[:, 0], i[:, 1], i[:, 2]]


def _nt_xent(*args: Any, **kwargs: Any) -> torch.Tensor:
    from kernels import nt_xent  # lazily, as in the 2D contrastive task

    return nt_xent(*args, **kwargs)


def _mlp(c_in: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class Contrastive3DTask(nn.Module):
    """nnU-Net's encoder (``model.arch``) with a global projection and a dense point head.

    Args:
        model_cfg: A 3D model config.
        cfg: Task options.
        seed: Seed of the task's view generator (one per rank).
        distributed: Gather negatives across ranks.
        device: Device of that generator.
    """

    needs_position = False

    def __init__(self, model_cfg: UNetConfig, cfg: Contrastive3DConfig, *, seed: int, distributed: bool,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if model_cfg.spatial_dims != 3 or model_cfg.arch is None:
            raise ValueError("Contrastive3DTask: needs a 3D model config (spatial_dims=3 and an arch)")
        cfg.check_model(model_cfg)
        self.cfg, self.distributed = cfg, distributed
        self.encoder = build_network(model_cfg.network_class_name, model_cfg.arch,
                                     input_channels=model_cfg.in_channels, num_classes=1).encoder
        self.decoder = None
        channels = feature_channels(model_cfg.arch)
        self.projection = _mlp(channels[-1], cfg.proj_hidden, cfg.proj_dim)
        self.dense_head = _mlp(channels[cfg.dense_stage], channels[cfg.dense_stage], cfg.dense_dim)
        self.stride = _stage_stride(model_cfg.arch, cfg.dense_stage)
        self.divisor = patch_divisor(model_cfg.arch)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def export_parts(self) -> tuple[str, ...]:
        """The encoder only."""
        return ("encoder",)

    def view_size(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        """The views' side: ``crop_fraction`` of the patch, down to a multiple of the network's divisor.

        Raises:
            ConfigError: a view that would be empty or not overlap its twin.
        """
        view = tuple(int(p * self.cfg.crop_fraction) // d * d for p, d in zip(patch, self.divisor, strict=True))
        if any(v == 0 or 2 * v <= p for v, p in zip(view, patch, strict=True)):
            raise ConfigError(
                f"data.patch_size: {list(patch)} with contrastive3d.crop_fraction={self.cfg.crop_fraction} gives views "
                f"of {list(view)} (multiples of {list(self.divisor)}, the network's stride product) that do not "
                f"overlap; use a larger patch or crop_fraction"
            )
        return view

    def views(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
        """``(v0, v1, o0, o1)``: two augmented crops of every patch and their ``(B, 3)`` offsets."""
        b, patch = x.shape[0], tuple(x.shape[2:])
        view = self.view_size(patch)
        steps = [(p - v) // s + 1 for p, v, s in zip(patch, view, self.stride, strict=True)]
        offsets = []
        for _ in range(2):
            draws = torch.rand((b, 3), generator=g, device=g.device).cpu()
            offsets.append(torch.stack([(draws[:, a] * steps[a]).long().clamp(max=steps[a] - 1) * self.stride[a]
                                        for a in range(3)], 1))
        crops = []
        for o in offsets:
            v = torch.stack([x[i, :, d:d + view[0], h:h + view[1], w:w + view[2]]
                             for i, (d, h, w) in enumerate(o.tolist())])
            remap = (torch.rand((b,), generator=g, device=g.device) < self.cfg.intensity_prob).view(b, 1, 1, 1, 1)
            v = torch.where(remap.to(v.device), bezier_remap(v, g, invert_prob=0.0), v)
            noise = torch.randn(v.shape, generator=g, device=g.device).to(v.device)
            crops.append(v + self.cfg.noise_std * noise)
        return crops[0], crops[1], offsets[0], offsets[1]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global (+ dense) loss of one micro batch; metrics ``loss_global``, ``loss_dense``, ``health/*``."""
        param = next(self.parameters())
        x = batch["image"].to(param.device, torch.float32)
        v0, v1, o0, o1 = self.views(x, self.generator)
        feats = self.encoder(torch.cat([v0, v1]).to(param.dtype))
        z0, z1 = self.projection(feats[-1].mean(dim=(2, 3, 4))).float().chunk(2)
        n, sizes = gathered_rows(batch)
        loss = _nt_xent(z0[:n], z1[:n], temperature=self.cfg.temperature, gather_distributed=self.distributed,
                        sizes=sizes)
        metrics = {"loss_global": loss.detach(),
                   **{f"health/{k}": v for k, v in contrastive_health(z0, z1).items()}}
        if self.cfg.dense_weight > 0:
            f0, f1 = feats[self.cfg.dense_stage].chunk(2)
            i0, i1 = matching_voxels(o0, o1, tuple(v0.shape[2:]), self.stride, self.cfg.dense_points, self.generator)
            p0 = self.dense_head(gather_points(f0, i0)).float()
            p1 = self.dense_head(gather_points(f1, i1)).float()
            n, sizes = gathered_rows(batch, self.cfg.dense_points)
            dense = _nt_xent(p0[:n], p1[:n], temperature=self.cfg.dense_temperature,
                             gather_distributed=self.distributed, sizes=sizes)
            metrics["loss_dense"] = dense.detach()
            loss = loss + self.cfg.dense_weight * dense
        return loss, metrics

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`loss` (DeepSpeed calls ``forward``)."""
        return self.loss(batch)

    @torch.no_grad()
    def figure(self, batch: dict[str, Any], n: int = 4) -> Any:
        """Middle slices of the patch and its two views (a fixed generator: training randomness untouched)."""
        x = batch["image"][:n].float().cpu()
        v0, v1, _, _ = self.views(x, torch.Generator().manual_seed(0))
        return image_grid([(t, v[:, :, v.shape[2] // 2]) for t, v in (("patch", x), ("view 0", v0), ("view 1", v1))])

    def rng_state(self) -> torch.Tensor:
        """State of the view generator (saved in checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)
