"""The grid of example slices that every pretext task draws (one row per sample, one column per stage)."""

from __future__ import annotations

from typing import Any

import torch


def image_grid(columns: list[tuple[str, torch.Tensor]]) -> Any:
    """Draw ``(title, images (N, C, H, W))`` columns side by side, channel 0, one row per sample.

    Returns:
        A matplotlib Figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(columns[0][1])
    fig, axes = plt.subplots(n, len(columns), figsize=(2 * len(columns), 2 * n), squeeze=False)
    for i in range(n):
        for j, (title, imgs) in enumerate(columns):
            axes[i, j].imshow(imgs[i, 0].detach().float().cpu().numpy(), cmap="gray")
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(title)
    fig.tight_layout()
    return fig
