"""Contrastive pretext task: SimCLR NT-Xent on two augmented views, MRI-specific positives, local loss.

- Global loss (Chen et al. 2020): the pooled bottleneck of two random views of each slice goes
  through :class:`~ssl_pretrain.models.heads.ProjectionHead`; NT-Xent (``kernels.nt_xent``) with
  the negatives of *all* ranks (``gather_distributed``).
- ``positives="partition"`` (Chaitanya et al. 2020): each volume is cut into ``partitions`` equal
  ranges of relative slice position; slices of the same range — from any volume — are positives
  too. Needs ``position`` (``meta.json``'s relative position) in every batch.
- Local loss (Chaitanya et al. 2020), when ``local_weight > 0``: per-pixel embeddings of a decoder
  level (:class:`~ssl_pretrain.models.heads.LocalHead`); the same image point seen in both views
  is the positive, other points of the same image the negatives (batched NT-Xent, one problem per
  slice). This trains the decoder as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ssl_pretrain.config import ConfigError, option
from ssl_pretrain.models.heads import LocalHead, ProjectionHead
from ssl_pretrain.models.unet import UNet, UNetConfig
from ssl_pretrain.tasks.batch import gathered_rows
from ssl_pretrain.tasks.figures import image_grid
from ssl_pretrain.tasks.health import contrastive_health
from ssl_pretrain.tasks.views import ContrastiveAugmentConfig, matching_points, sample_at, two_views

__all__ = ["ContrastiveConfig", "ContrastiveTask", "partition_groups"]


@dataclass
class ContrastiveConfig:
    """Options of the contrastive task."""

    temperature: float = option(0.1, "NT-Xent temperature of the global loss", gt=0)
    proj_hidden: int = option(256, "hidden width of the projection MLP", ge=1)
    proj_dim: int = option(128, "embedding size of the projection head", ge=1)
    positives: Literal["views", "partition"] = option(
        "views", "positives: the two views only, or also same-partition slices (needs position in meta)"
    )
    partitions: int = option(4, "number of relative-position partitions per volume (positives=partition)", ge=2)
    local_weight: float = option(0.0, "weight of the local (decoder) contrastive loss; 0 turns it off", ge=0)
    local_level: int = option(
        -2, "decoder level of the local loss (index into coarsest→finest, -1 = full res)",
        unbounded="its range depends on model.widths: checked against the UNet by check_model",
    )
    local_points: int = option(16, "points per slice in the local loss", ge=1)
    local_dim: int = option(64, "embedding size of the local head", ge=1)
    local_temperature: float = option(0.1, "NT-Xent temperature of the local loss", gt=0)
    augment: ContrastiveAugmentConfig = option(factory=ContrastiveAugmentConfig, help="view augmentations")

    def check_model(self, model_cfg: UNetConfig) -> None:
        """Raise ConfigError when the local loss's ``local_level`` is not a level of this UNet's decoder."""
        levels = model_cfg.depth - 1
        if self.local_weight > 0 and not -levels <= self.local_level < levels:
            raise ConfigError(
                f"contrastive.local_level: the decoder has {levels} levels, so it must be in "
                f"[{-levels}, {levels - 1}]; got {self.local_level}"
            )


def partition_groups(position: torch.Tensor, partitions: int) -> torch.Tensor:
    """Partition index of each slice from its relative position in its volume.

    Args:
        position: ``(B,)`` relative positions in ``[0, 1]``.
        partitions: Number of equal ranges.

    Returns:
        ``(B,)`` int64 in ``[0, partitions)``.
    """
    return (position.float() * partitions).floor().clamp(0, partitions - 1).long()


def _nt_xent(*args: Any, **kwargs: Any) -> torch.Tensor:
    # imported lazily: kernels is an optional accelerator of this module's math, and importing it
    # late keeps the task importable while only the config is needed (e.g. --help)
    from kernels import nt_xent

    return nt_xent(*args, **kwargs)


class ContrastiveTask(nn.Module):
    """UNet encoder (+ decoder when the local loss is on) with contrastive heads.

    Args:
        model_cfg: UNet architecture.
        cfg: Task options.
        seed: Seed of the task's augmentation generator (use a different one per rank).
        distributed: Gather negatives across ranks (``torch.distributed`` must be initialised).
        device: Device of the task's random generator (the device the batches are moved to).
    """

    def __init__(
        self,
        model_cfg: UNetConfig,
        cfg: ContrastiveConfig,
        *,
        seed: int,
        distributed: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.distributed = distributed
        unet = UNet(model_cfg, out_channels=model_cfg.in_channels)
        self.encoder = unet.encoder
        self.projection = ProjectionHead(model_cfg.widths[-1], cfg.proj_hidden, cfg.proj_dim)
        self.decoder: nn.Module | None = None
        self.local_head: LocalHead | None = None
        if cfg.local_weight > 0:
            cfg.check_model(model_cfg)
            self.decoder = unet.decoder
            # decoder level i (coarsest first) has widths[-2 - i] channels
            channels = model_cfg.widths[::-1][1:][cfg.local_level]
            self.local_head = LocalHead(channels, cfg.local_dim)
        # the task's own randomness (views, local points): saved in checkpoints, one seed per rank
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def needs_position(self) -> bool:
        """Whether batches must carry ``position`` (the partition positives)."""
        return self.cfg.positives == "partition"

    def export_parts(self) -> tuple[str, ...]:
        """The UNet parts this task trains (and that the export carries)."""
        return ("encoder", "decoder") if self.decoder is not None else ("encoder",)

    def embed(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute the views and their embeddings.

        Args:
            batch: ``image`` ``(B, C, H, W)``; ``position`` ``(B,)`` when ``positives == "partition"``.
            generator: Randomness for the views (default: the task's own generator).

        Returns:
            ``z0``, ``z1`` ``(B, proj_dim)`` float32; ``groups`` ``(B,)`` or absent; ``v0``, ``v1``
            views; with the local loss also ``l0``, ``l1`` ``(B, local_points, local_dim)``.
        """
        param = next(self.parameters())
        x = batch["image"].to(param.device, torch.float32)
        g = generator if generator is not None else self.generator
        v0, v1, theta0, theta1 = two_views(x, self.cfg.augment, g)
        feats = self.encoder(torch.cat([v0, v1]).to(param.dtype))
        z0, z1 = self.projection(feats[-1]).float().chunk(2)
        out = {"z0": z0, "z1": z1, "v0": v0, "v1": v1}
        if self.cfg.positives == "partition":
            out["groups"] = partition_groups(batch["position"].to(param.device), self.cfg.partitions)
        if self.decoder is not None and self.local_head is not None:
            fmap = self.local_head(self.decoder(feats)[self.cfg.local_level]).float()
            f0, f1 = fmap.chunk(2)
            u0, u1 = matching_points(theta0, theta1, self.cfg.local_points, g)
            out["l0"], out["l1"] = sample_at(f0, u0), sample_at(f1, u1)
        return out

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Contrastive loss of one micro batch.

        Returns:
            ``(loss, metrics)``: scalar loss; detached scalar tensors ``loss_global`` (and ``loss_local``)
            and the ``health/*`` statistics of :func:`~ssl_pretrain.tasks.health.contrastive_health`.
        """
        e = self.embed(batch)
        n, sizes = gathered_rows(batch)
        groups = e.get("groups")
        loss_global = _nt_xent(
            e["z0"][:n], e["z1"][:n], groups=None if groups is None else groups[:n], temperature=self.cfg.temperature,
            gather_distributed=self.distributed, sizes=sizes,
        )
        metrics = {"loss_global": loss_global.detach()}
        metrics.update({f"health/{k}": v for k, v in contrastive_health(e["z0"], e["z1"]).items()})
        loss = loss_global
        if "l0" in e:
            # one independent problem per slice: other points of the same slice are the negatives
            loss_local = _nt_xent(e["l0"], e["l1"], temperature=self.cfg.local_temperature)
            metrics["loss_local"] = loss_local.detach()
            loss = loss + self.cfg.local_weight * loss_local
        return loss, metrics

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`loss` (DeepSpeed calls ``forward``)."""
        return self.loss(batch)

    @torch.no_grad()
    def figure(self, batch: dict[str, Any], n: int = 4) -> Any:
        """Original slice and its two views, side by side, for the first ``n`` samples.

        Uses a fixed generator, so drawing a figure never changes the training randomness.
        """
        x = batch["image"][:n].float().cpu()
        v0, v1, _, _ = two_views(x, self.cfg.augment, torch.Generator().manual_seed(0))
        return image_grid([("original", x), ("view 0", v0), ("view 1", v1)])

    def rng_state(self) -> torch.Tensor:
        """State of the augmentation generator (saved in checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)
