"""Training batches of finetuning: foreground-biased patch sampling and on-the-fly MONAI augmentation.

:class:`PatchSampler` cuts patches (2D: ``data.preprocess.size`` out of whole slices; 3D:
``train.patch_size`` out of whole volumes), a share of them centred on foreground;
:func:`build_augmentation` and :func:`augment` apply MONAI's transforms at nnU-Net-like strength,
seeded from the run's generator so that a resumed run draws and augments exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from downstream.config import FinetuneAugmentConfig

__all__ = ["PatchSampler", "augment", "build_augmentation"]


class PatchSampler:
    """Draws training batches of ``size`` patches; a share is centred on foreground (nnU-Net's oversampling).

    2D (``size`` of two): patches of whole slices, any ``H, W`` at least ``size``. 3D (``size`` of three):
    patches of whole volumes; a volume smaller than the patch along an axis is padded (image with its
    minimum, label with background), as nnU-Net pads. A foreground draw picks an item (slice or volume)
    with foreground and centres the patch on one of its foreground voxels (clamped inside), the other
    draws pick any item and a uniform position.

    Args:
        volumes: Training volumes: slices (image ``(S, C, H, W)``, label ``(S, H, W)``) or 3D volumes
            (image ``(C, D, H, W)``, label ``(D, H, W)``); sizes may differ between volumes.
        batch_size: Patches per batch.
        foreground_fraction: Share of each batch centred on foreground.
        size: Patch ``(h, w)`` or ``(d, h, w)``.
    """

    def __init__(
        self, volumes: list[Any], batch_size: int, foreground_fraction: float, size: tuple[int, ...]
    ) -> None:
        self.size = tuple(int(n) for n in size)
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []  # (image (C, *spatial), label (*spatial))
        for v in volumes:
            image, label = torch.from_numpy(v.image), torch.from_numpy(v.label.astype(np.int64))
            if len(self.size) == 2:
                self.items += [(image[s], label[s]) for s in range(image.shape[0])]
            else:
                self.items.append(_pad_to(image, label, self.size))
        self.fg_voxels = [torch.nonzero(label) for _, label in self.items]
        self.fg = [i for i, vox in enumerate(self.fg_voxels) if len(vox)]
        self.batch_size = batch_size
        self.n_fg = round(batch_size * foreground_fraction) if self.fg else 0

    def _corner(self, i: int, centred: bool, gen: torch.Generator) -> list[int]:
        big = self.items[i][1].shape
        if centred:
            vox = self.fg_voxels[i]
            centre = vox[int(torch.randint(len(vox), (1,), generator=gen))].tolist()
            return [min(max(c - n // 2, 0), b - n) for c, n, b in zip(centre, self.size, big, strict=True)]
        return [int(torch.randint(b - n + 1, (1,), generator=gen)) for n, b in zip(self.size, big, strict=True)]

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (B, C, *size), label (B, *size) int64)``."""
        idx_any = torch.randint(len(self.items), (self.batch_size - self.n_fg,), generator=gen).tolist()
        idx_fg = [self.fg[i] for i in torch.randint(len(self.fg), (self.n_fg,), generator=gen).tolist()]
        images, labels = [], []
        for k, centred in [(i, True) for i in idx_fg] + [(i, False) for i in idx_any]:
            corner = self._corner(k, centred, gen)
            box = tuple(slice(c, c + n) for c, n in zip(corner, self.size, strict=True))
            image, label = self.items[k]
            images.append(image[(slice(None), *box)])
            labels.append(label[box])
        return torch.stack(images), torch.stack(labels)


def _pad_to(image: torch.Tensor, label: torch.Tensor, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a ``(C, *spatial)`` volume and its label symmetrically to at least ``size`` (image with its minimum)."""
    short = [max(0, n - b) for n, b in zip(size, label.shape, strict=True)]
    if not any(short):
        return image, label
    pad = [p for k in reversed(short) for p in (k // 2, k - k // 2)]  # F.pad: last axis first
    fill = float(image.min())
    return torch.nn.functional.pad(image, pad, value=fill), torch.nn.functional.pad(label, pad, value=0)


def build_augmentation(aug: FinetuneAugmentConfig, size: tuple[int, ...]) -> Any:
    """The MONAI transforms of one ``{"image": (C, *size), "label": (1, *size)}`` training sample.

    Affine (rotation, scaling, shift) and elastic deformation (image linear, label nearest), bias
    field, gamma, Gaussian noise and smoothing, low-resolution simulation and mirroring: nnU-Net's
    set. 2D mirrors left-right; 3D rotates about all three axes and mirrors along each axis. Ranges
    scale with ``aug.strength``; shifts and the elastic grid follow the patch ``size``. Seeded per
    batch from the run's generator (:func:`augment`), never globally.
    """
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandSimulateLowResolutiond,
    )

    s, both, img = aug.strength, ("image", "label"), ("image",)
    three = len(size) == 3
    geo = {"mode": ("trilinear" if three else "bilinear", "nearest"), "padding_mode": ("border", "zeros")}
    rotate = math.radians(15) * s
    affine = RandAffined(both, prob=aug.p_affine, rotate_range=(rotate,) * 3 if three else rotate,
                         scale_range=(0.15 * s,) * len(size), translate_range=tuple(0.06 * n * s for n in size), **geo)
    if three:  # MONAI's 3D elastic: a smooth random field (sigma in voxels of the patch's control grid)
        elastic = Rand3DElasticd(both, sigma_range=(5.0, 8.0), magnitude_range=(0.0, 60.0 * s), prob=aug.p_elastic,
                                 **geo)
        flips = [RandFlipd(both, prob=aug.p_flip, spatial_axis=a) for a in range(3)]
    else:
        elastic = Rand2DElasticd(both, spacing=(max(4, size[0] // 4), max(4, size[1] // 4)),
                                 magnitude_range=(0.0, 1.5 * s), prob=aug.p_elastic, **geo)
        flips = [RandFlipd(both, prob=aug.p_flip, spatial_axis=1)]
    sigma = (0.25, 0.25 + 0.75 * s)
    return Compose([
        affine,
        elastic,
        RandBiasFieldd(img, prob=aug.p_bias_field, coeff_range=(0.0, 0.2 * s)),
        RandAdjustContrastd(img, prob=aug.p_gamma, gamma=(max(0.1, 1 - 0.3 * s), 1 + 0.5 * s)),
        RandGaussianNoised(img, prob=aug.p_noise, std=0.1 * s),
        RandGaussianSmoothd(img, prob=aug.p_smooth, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
        RandSimulateLowResolutiond(img, prob=aug.p_low_resolution, upsample_mode="trilinear" if three else "bilinear",
                                   zoom_range=(max(0.25, 1 - 0.5 * s), 1.0)),
        *flips,
    ])


def augment(
    transforms: Any, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`build_augmentation`'s transforms to every sample, seeded from the run's generator.

    The seed of the batch is drawn from ``gen`` (whose state the checkpoint holds), so a resumed run
    augments exactly as an uninterrupted one.

    Args:
        transforms: The :func:`build_augmentation` compose.
        image: ``(B, C, *size)`` float.
        label: ``(B, *size)`` int64.
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
