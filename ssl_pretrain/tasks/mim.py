"""Masked image modelling for 3D CNNs, as nnssl pretrains nnU-Net's networks (Wald et al., CVPR 2025).

Each patch is cut into ``mask_block``-mm cubes (16 voxels at 1 mm by default, converted to voxels
along each axis by the shards' spacing); a ``mask_ratio`` share of them, drawn per sample, is set
to zero (the normalised intensity mean) and the whole network — the ``dynamic_network_architectures``
encoder and decoder, whose segmentation layer outputs the image channels — reconstructs the patch.
The loss is the squared error on masked voxels only: what the network could see is not scored.
Encoder and decoder are exported (nnssl's finetuning loads both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_pretrain.config import option, validate
from ssl_pretrain.models.dna import build_network, without_deep_supervision
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.figures import image_grid
from ssl_pretrain.tasks.regression import random_tiles

__all__ = ["MIMConfig", "MIMTask", "block_mask", "masked_mse"]


@dataclass
class MIMConfig:
    """Masked image modelling options (the ``mim:`` section of the pretraining config)."""

    mask_ratio: float = option(0.75, "share of blocks masked in each patch (nnssl: 0.75)", gt=0, lt=1)
    mask_block: float = option(16.0, "side of a masked block in mm (nnssl: 16 voxels at 1 mm)", gt=0)


def block_voxels(block_mm: float, spacing: torch.Tensor) -> tuple[int, int, int]:
    """Block side in voxels along (D, H, W) for a voxel size ``spacing`` (mm, (D, H, W))."""
    return tuple(max(1, round(block_mm / float(s))) for s in spacing.tolist())  # type: ignore[return-value]


def block_mask(shape: tuple[int, ...], block: tuple[int, int, int], ratio: float,
               generator: torch.Generator) -> torch.Tensor:
    """Boolean ``(B, 1, D, H, W)`` mask, True where masked: ``round(ratio × blocks)`` blocks per sample.

    Args:
        shape: ``(B, C, D, H, W)`` of the batch.
        block: Block side in voxels along (D, H, W).
        ratio: Share of blocks masked (at least one block is masked and one left visible).
        generator: Draws the blocks (on the batch's device).
    """
    b, spatial = shape[0], tuple(shape[2:])
    n_blocks = math.prod(-(-n // k) for n, k in zip(spatial, block, strict=True))
    k = min(max(1, round(ratio * n_blocks)), max(1, n_blocks - 1))
    return random_tiles(b, spatial, block, k, generator, generator.device)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean squared error over masked voxels, the same over visible voxels)``; ``mask`` broadcasts over channels."""
    err = (pred - target).square()
    m = mask.expand_as(err).to(err.dtype)
    masked = (err * m).sum() / m.sum().clamp_min(1)
    visible = (err * (1 - m)).sum() / (1 - m).sum().clamp_min(1)
    return masked, visible


class MIMTask(nn.Module):
    """A ``dynamic_network_architectures`` UNet that reconstructs masked blocks of 3D patches.

    Args:
        model_cfg: A 3D model (``spatial_dims: 3``, ``network_class_name``, ``arch``).
        cfg: Task options.
        seed: Seed of the task's mask generator (one per rank).
        distributed: Unused: the loss is per sample.
        device: Device of that generator.
    """

    needs_position = False

    def __init__(self, model_cfg: UNetConfig, cfg: MIMConfig, *, seed: int, distributed: bool = False,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        validate(cfg, "mim.")
        if model_cfg.spatial_dims != 3 or model_cfg.arch is None:  # the config's check (TASKS dims), for code
            raise ValueError("MIMTask: needs a 3D model config (spatial_dims=3 and an arch)")
        self.cfg = cfg
        net = without_deep_supervision(build_network(
            model_cfg.network_class_name, model_cfg.arch, input_channels=model_cfg.in_channels,
            num_classes=model_cfg.in_channels))
        self.encoder = net.encoder
        self.decoder = net.decoder  # its segmentation layer outputs the image channels
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def export_parts(self) -> tuple[str, ...]:
        """Encoder and decoder (the decoder's segmentation layer is the image reconstruction)."""
        return ("encoder", "decoder")

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for ``x`` (the library's UNet forward: decoder over the encoder's skips)."""
        return self.decoder(self.encoder(x))

    def _mask(self, batch: dict[str, Any], x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spacing = batch["spacing"][0] if "spacing" in batch else torch.ones(3)
        return block_mask(tuple(x.shape), block_voxels(self.cfg.mask_block, spacing), self.cfg.mask_ratio, generator)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction loss of one micro batch on masked voxels; metrics: ``mse_masked``, ``mse_visible``."""
        param = next(self.parameters())
        x = batch["image"].to(param.device, torch.float32)
        mask = self._mask(batch, x, self.generator)
        pred = self.reconstruct((x * ~mask).to(param.dtype)).float()
        masked, visible = masked_mse(pred, x, mask)
        return masked, {"mse_masked": masked.detach(), "mse_visible": visible.detach(),
                        "masked_share": mask.float().mean().detach()}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`loss` (DeepSpeed calls ``forward``)."""
        return self.loss(batch)

    @torch.no_grad()
    def figure(self, batch: dict[str, Any], n: int = 4) -> Any:
        """Masked / reconstructed / original middle slices of the first ``n`` patches (fixed mask seed)."""
        param = next(self.parameters())
        x = batch["image"][:n].to(param.device, torch.float32)
        mask = self._mask(batch, x, torch.Generator(device=param.device).manual_seed(0))
        was_training = self.training
        self.eval()
        try:
            pred = self.reconstruct((x * ~mask).to(param.dtype)).float()
        finally:
            self.train(was_training)
        mid = x.shape[2] // 2
        return image_grid([("masked", (x * ~mask)[:, :, mid]), ("reconstructed", pred[:, :, mid]),
                           ("original", x[:, :, mid])])

    def rng_state(self) -> torch.Tensor:
        """State of the mask generator (saved in checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`rng_state`."""
        self.generator.set_state(state)
