"""A 2D UNet whose encoder and decoder are separate modules, so each can be pretrained and exported.

Written for one device; data parallelism (DeepSpeed, DDP) is applied by the engine only.

Shapes: input ``(B, C, H, W)`` with ``H`` and ``W`` divisible by ``2 ** (depth - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssl_pretrain.config import FieldError, from_dict, option

__all__ = ["UNetConfig", "Encoder", "Decoder", "UNet"]


@dataclass
class UNetConfig:
    """Architecture of the model (stored in every export): the 2D UNet below, or a 3D network of
    ``dynamic_network_architectures`` (:mod:`ssl_pretrain.models.dna`) when ``spatial_dims`` is 3."""

    in_channels: int = option(1, "input channels (MRI contrasts); must match the shards", ge=1)
    widths: tuple[int, ...] = option(
        (32, 64, 128, 256, 512), "channels per level; depth = len(widths)", ge=1, length=(2, None),
        rule="need at least 2 positive widths",
    )
    norm: Literal["instance", "batch"] = option("instance", "normalisation layer")
    dropout: float = option(0.0, "dropout probability in the bottleneck", ge=0, lt=1)
    spatial_dims: int = option(
        2, "2: this module's UNet on slices (widths, norm, dropout); 3: the dynamic_network_architectures "
        "network network_class_name + arch on volumes (ssl_pretrain.models.dna)", choices=(2, 3),
    )
    network_class_name: str = option(
        "PlainConvUNet", "3D: PlainConvUNet or ResidualEncoderUNet (as nnU-Net plans name it)"
    )
    arch: dict | None = option(
        None, "3D: the network's arch_kwargs exactly as an nnU-Net plans file writes them (features_per_stage, "
        "strides, kernel_sizes, n_conv_per_stage or n_blocks_per_stage, norm_op, ...)",
    )

    def check_fields(self) -> None:
        """A 3D model needs an ``arch`` the library accepts (built on the meta device); a 2D one takes none."""
        if self.spatial_dims == 2:
            if self.arch is not None:
                raise FieldError("arch: only for spatial_dims=3 (2D models take widths, norm, dropout)")
            return
        if self.arch is None:
            raise FieldError("arch: required for spatial_dims=3 (nnU-Net's arch_kwargs; see "
                             "launch/configs/debug3d.yaml)")
        from ssl_pretrain.models.dna import check_arch  # the library is needed for 3D models only

        check_arch(self.network_class_name, self.arch, self.in_channels)

    @property
    def depth(self) -> int:
        """Number of resolution levels."""
        return len(self.widths)

    @property
    def divisor(self) -> int:
        """``H`` and ``W`` must be multiples of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        """JSON-able form, stored in exports (a 2D model's has no 3D keys, as before they existed)."""
        if self.spatial_dims == 3:
            return {"in_channels": self.in_channels, "spatial_dims": 3,
                    "network_class_name": self.network_class_name, "arch": self.arch}
        return {"in_channels": self.in_channels, "widths": list(self.widths), "norm": self.norm,
                "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Inverse of :meth:`to_dict`; raises ConfigError on unknown or bad keys."""
        return from_dict(cls, d, "model_config.")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


class ConvBlock(nn.Sequential):
    """Two 3×3 conv → norm → LeakyReLU layers."""

    def __init__(self, c_in: int, c_out: int, norm: str, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm(norm, c_out),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(norm, c_out),
                   nn.LeakyReLU(0.01, inplace=True)]
        super().__init__(*layers)


class Encoder(nn.Module):
    """Contracting path.

    Args:
        cfg: The architecture; level ``i`` has ``cfg.widths[i]`` channels at ``1 / 2**i`` resolution.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        self.levels = nn.ModuleList()
        for i, w in enumerate(widths):
            c_in = cfg.in_channels if i == 0 else widths[i - 1]
            drop = cfg.dropout if i == len(widths) - 1 else 0.0
            self.levels.append(ConvBlock(c_in, w, cfg.norm, drop))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the features of every level, finest first; the last is the bottleneck.

        Args:
            x: ``(B, C, H, W)``.

        Returns:
            ``[(B, widths[0], H, W), …, (B, widths[-1], H / 2**(d-1), W / 2**(d-1))]``.
        """
        if x.shape[-1] % self.cfg.divisor or x.shape[-2] % self.cfg.divisor:
            raise ValueError(
                f"input H×W {tuple(x.shape[-2:])} must be divisible by {self.cfg.divisor} for depth "
                f"{self.cfg.depth}"
            )
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Expanding path with skip connections from the encoder."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.blocks.append(ConvBlock(2 * widths[i - 1], widths[i - 1], cfg.norm))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the decoder features from coarsest to finest; ``[-1]`` is ``(B, widths[0], H, W)``."""
        x = feats[-1]
        outs = []
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
            outs.append(x)
        return outs


class UNet(nn.Module):
    """Encoder, decoder and a 1×1-conv head.

    Args:
        cfg: The architecture.
        out_channels: Channels of the head: classes for segmentation (background included),
            image channels for restoration.

    Example:
        >>> net = UNet(UNetConfig(widths=(8, 16, 32)), out_channels=2)
        >>> net(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, cfg: UNetConfig, out_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.head = nn.Conv2d(cfg.widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` images to ``(B, out_channels, H, W)`` logits."""
        return self.head(self.decoder(self.encoder(x))[-1])
