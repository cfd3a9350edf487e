"""Training batches of finetuning: foreground-biased patch sampling and on-the-fly MONAI augmentation.

:class:`PatchSampler` cuts ``data.preprocess.size`` patches out of whole preprocessed slices, a
share of them centred on foreground; :func:`build_augmentation` and :func:`augment` apply MONAI's
transforms at nnU-Net-like strength, seeded from the run's generator so that a resumed run
draws and augments exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from downstream.config import FinetuneAugmentConfig
from ssl_pretrain.data.preprocess import Volume

__all__ = ["PatchSampler", "augment", "build_augmentation"]


class PatchSampler:
    """Draws training batches of ``size`` patches from whole slices; a share is centred on foreground.

    Slices keep their whole field of view (any ``H, W`` at least ``size``); a foreground draw picks a
    slice with foreground and centres the patch on one of its foreground pixels (clamped inside the
    slice), the other draws pick any slice and a uniform patch position.

    Args:
        volumes: Training volumes (image ``(S, C, H, W)``, label ``(S, H, W)``; ``H, W`` may differ
            between volumes).
        batch_size: Patches per batch.
        foreground_fraction: Share of each batch centred on foreground.
        size: Patch ``(h, w)``.
    """

    def __init__(
        self, volumes: list[Volume], batch_size: int, foreground_fraction: float, size: tuple[int, int]
    ) -> None:
        self.images = [torch.from_numpy(v.image) for v in volumes]
        self.labels = [torch.from_numpy(v.label.astype(np.int64)) for v in volumes]
        self.slices = [(vi, s) for vi, v in enumerate(volumes) for s in range(v.image.shape[0])]
        self.fg = [i for i, (vi, s) in enumerate(self.slices) if bool(self.labels[vi][s].any())]
        self.batch_size, self.size = batch_size, (int(size[0]), int(size[1]))
        self.n_fg = round(batch_size * foreground_fraction) if self.fg else 0

    def _corner(self, vi: int, s: int, centred: bool, gen: torch.Generator) -> tuple[int, int]:
        (h, w), (big_h, big_w) = self.size, self.images[vi].shape[-2:]
        if centred:
            pix = torch.nonzero(self.labels[vi][s])
            cy, cx = pix[int(torch.randint(len(pix), (1,), generator=gen))].tolist()
            return min(max(cy - h // 2, 0), big_h - h), min(max(cx - w // 2, 0), big_w - w)
        top = int(torch.randint(big_h - h + 1, (1,), generator=gen))
        return top, int(torch.randint(big_w - w + 1, (1,), generator=gen))

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (B, C, h, w), label (B, h, w) int64)``."""
        idx_any = torch.randint(len(self.slices), (self.batch_size - self.n_fg,), generator=gen).tolist()
        idx_fg = [self.fg[i] for i in torch.randint(len(self.fg), (self.n_fg,), generator=gen).tolist()]
        images, labels = [], []
        for k, centred in [(i, True) for i in idx_fg] + [(i, False) for i in idx_any]:
            vi, s = self.slices[k]
            top, left = self._corner(vi, s, centred, gen)
            h, w = self.size
            images.append(self.images[vi][s, :, top : top + h, left : left + w])
            labels.append(self.labels[vi][s, top : top + h, left : left + w])
        return torch.stack(images), torch.stack(labels)


def build_augmentation(aug: FinetuneAugmentConfig, size: tuple[int, int]) -> Any:
    """The MONAI transforms of one ``{"image": (C, h, w), "label": (1, h, w)}`` training sample.

    Affine and elastic deformation (image bilinear, label nearest), bias field, gamma, Gaussian noise
    and smoothing, low-resolution simulation, left-right mirroring; ranges scale with
    ``aug.strength``; shifts and the elastic grid follow the patch ``size``. Seeded per batch from the
    run's generator (:func:`augment`), never globally.
    """
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandSimulateLowResolutiond,
    )

    s, both, img = aug.strength, ("image", "label"), ("image",)
    geo = {"mode": ("bilinear", "nearest"), "padding_mode": ("border", "zeros")}
    return Compose([
        RandAffined(both, prob=aug.p_affine, rotate_range=math.radians(15) * s, scale_range=(0.15 * s, 0.15 * s),
                    translate_range=(0.06 * size[0] * s, 0.06 * size[1] * s), **geo),
        Rand2DElasticd(both, spacing=(max(4, size[0] // 4), max(4, size[1] // 4)), magnitude_range=(0.0, 1.5 * s),
                       prob=aug.p_elastic, **geo),
        RandBiasFieldd(img, prob=aug.p_bias_field, coeff_range=(0.0, 0.2 * s)),
        RandAdjustContrastd(img, prob=aug.p_gamma, gamma=(max(0.1, 1 - 0.3 * s), 1 + 0.5 * s)),
        RandGaussianNoised(img, prob=aug.p_noise, std=0.1 * s),
        RandGaussianSmoothd(img, prob=aug.p_smooth, sigma_x=(0.25, 0.25 + 0.75 * s),
                            sigma_y=(0.25, 0.25 + 0.75 * s)),
        RandSimulateLowResolutiond(img, prob=aug.p_low_resolution, upsample_mode="bilinear",
                                   zoom_range=(max(0.25, 1 - 0.5 * s), 1.0)),
        RandFlipd(both, prob=aug.p_flip, spatial_axis=1),
    ])


def augment(
    transforms: Any, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`build_augmentation`'s transforms to every sample, seeded from the run's generator.

    The seed of the batch is drawn from ``gen`` (whose state the checkpoint holds), so a resumed run
    augments exactly as an uninterrupted one.

    Args:
        transforms: The :func:`build_augmentation` compose.
        image: ``(B, C, h, w)`` float.
        label: ``(B, h, w)`` int64.
        gen: The run's generator (CPU).

    Returns:
        Augmented ``(image, label)`` of the same shapes and dtypes.
    """
    transforms.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    images, labels = [], []
    for x, y in zip(image, label, strict=True):
        d = transforms({"image": x, "label": y[None].float()})
        images.append(torch.as_tensor(d["image"]).float())
        labels.append(torch.as_tensor(d["label"])[0].round().long())
    return torch.stack(images), torch.stack(labels)
