"""Figures of a finetuning run: test slices with true and predicted contours."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_pretrain.data.preprocess import Volume
from ssl_pretrain.data.volumes import VolumeSample

__all__ = ["contour_figure"]


def contour_figure(volumes: dict[str, Volume | VolumeSample], preds: dict[str, np.ndarray], title: str,
                   n: int = 4) -> Any:
    """Matplotlib figure: ``n`` test slices (the axial slice of most foreground of each volume, slices or 3D)
    with true (green) and predicted (red) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for sid, vol in volumes.items():
        area = vol.label.reshape(vol.label.shape[0], -1).astype(bool).sum(1)
        picks.append((sid, int(area.argmax())))
    picks = picks[:n]
    fig, axes = plt.subplots(1, max(1, len(picks)), figsize=(3 * max(1, len(picks)), 3.2), squeeze=False)
    for ax, (sid, s) in zip(axes[0], picks, strict=False):
        vol = volumes[sid]
        ax.imshow(vol.image[0, s] if isinstance(vol, VolumeSample) else vol.image[s, 0], cmap="gray")
        if vol.label[s].any():
            ax.contour(vol.label[s] > 0, levels=[0.5], colors="lime", linewidths=1.0)
        if preds[sid][s].any():
            ax.contour(preds[sid][s] > 0, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"{sid} z={s}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title} (green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    return fig
