"""Heads that sit on the UNet during pretraining (they are not exported with the backbone).

- :class:`ProjectionHead`: global contrastive head, an MLP on the average-pooled bottleneck
  (SimCLR, Chen et al. 2020).
- :class:`LocalHead`: local contrastive head, 1×1 convolutions on one decoder level (Chaitanya et
  al. 2020), giving one embedding per pixel of that level.
- :class:`ReconstructionHead`: 1×1 convolution from the full-resolution decoder features back to
  the image channels, for the regression (restoration) task.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ProjectionHead", "LocalHead", "ReconstructionHead"]


class ProjectionHead(nn.Module):
    """MLP on the global-average-pooled bottleneck: ``(B, C, h, w) -> (B, out_dim)``.

    Args:
        in_channels: Channels of the bottleneck (``UNetConfig.widths[-1]``).
        hidden_dim: Width of the hidden layer.
        out_dim: Embedding size fed to NT-Xent.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Embed a bottleneck feature map.

        Args:
            bottleneck: ``(B, C, h, w)``.

        Returns:
            ``(B, out_dim)`` (not normalised; NT-Xent normalises).
        """
        return self.mlp(self.pool(bottleneck).flatten(1))


class LocalHead(nn.Module):
    """Two 1×1 convolutions on a decoder feature map: ``(B, C, h, w) -> (B, out_dim, h, w)``.

    Args:
        in_channels: Channels of the chosen decoder level.
        out_dim: Embedding size per pixel.
    """

    def __init__(self, in_channels: int, out_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(in_channels, out_dim, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Per-pixel embeddings ``(B, out_dim, h, w)`` of ``features`` ``(B, C, h, w)``."""
        return self.net(features)


class ReconstructionHead(nn.Module):
    """1×1 convolution from full-resolution decoder features to image channels.

    Args:
        in_channels: ``UNetConfig.widths[0]``.
        out_channels: Image channels to restore.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Restored image ``(B, out_channels, H, W)`` from ``features`` ``(B, in_channels, H, W)``."""
        return self.conv(features)
