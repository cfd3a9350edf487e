"""Volumetric preprocessing: one subject → one ``(C, D, H, W)`` volume on a target spacing (3D shards).

The 3D counterpart of :func:`~ssl_pretrain.data.preprocess.preprocess`, with the same reading and
checks (NIfTI validation, channels, orientation, label grid and values) and the same intensity
normalisation, but nnU-Net's geometry instead of fixed-size slices:

1. reorient to the slicing frame (RAS, or the acquisition's own with ``slice_axis: acquisition``);
2. crop to the bounding box of the non-zero voxels of any channel, as nnU-Net crops before it
   resamples (MRI background outside the head or body is exactly zero in most exports; a volume
   without zero background keeps its whole extent);
3. resample the crop to ``spacing = (Z, Y, X)`` mm (image trilinear, label nearest);
4. normalise each channel inside the crop (percentile clip, z-score or min-max).

Array axes are ``(D, H, W)`` = (z, -y, x) of the frame, the slices of the 2D path stacked: the 2D
shards' slice ``s`` is the uncropped volume's ``[:, s]``. The crop box is recorded in that order,
on the native grid (before resampling), in ``geometry`` and in each shard sample's ``meta.json``, so
:func:`volume_to_original_grid` maps a mask back onto the input file's own voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ssl_pretrain.config import ConfigError, validate
from ssl_pretrain.data.preprocess import (
    _RAS_ORNT,
    MAX_VOXELS,
    ImageFiles,
    InputError,
    PreprocessParams,
    SpacingSHW,
    _nearest_index,
    _normalise,
    _to_slices,
    as_image_files,
    first_file,
    read_canonical,
    read_label,
)

__all__ = ["VolumeSample", "preprocess_volume", "volume_to_original_grid"]


@dataclass
class VolumeSample:
    """One preprocessed volume.

    Args:
        image: float32 ``(C, D, H, W)`` on the target spacing, cropped to the non-zero box.
        label: uint8 ``(D, H, W)`` or ``None``.
        spacing: ``(D, H, W)`` voxel size in mm (the target spacing, in array order).
        geometry: JSON-able record of everything :func:`volume_to_original_grid` needs; its
            ``crop_box`` is ``[[d0, d1], [h0, h1], [w0, w1]]`` on the native grid (before resampling).
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: SpacingSHW
    geometry: dict


def _resample(arr: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Trilinear resample of ``(C, D, H, W)`` float32 to ``(C, *size)``."""
    if arr.shape[1:] == size:
        return np.ascontiguousarray(arr)
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0].numpy()


def _nonzero_box(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``((d0, d1), (h0, h1), (w0, w1))`` of voxels that are non-zero in any channel."""
    nonzero = (image != 0).any(axis=0)
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(nonzero.any(axis=others))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def preprocess_volume(
    image_path: str | Path | ImageFiles,
    params: PreprocessParams,
    label_path: str | Path | None = None,
    *,
    allowed_labels: tuple[int, ...] | list[int] | None = None,
    max_voxels: int = MAX_VOXELS,
) -> VolumeSample:
    """Load one image (and label) and turn it into a cropped volume on ``params.spacing`` (Z, Y, X).

    Args:
        image_path: 3D ``(X, Y, Z)`` or 4D ``(X, Y, Z, C)`` NIfTI image, or one 3D file per channel.
        params: preprocessing parameters with a three-value ``spacing``.
        label_path: optional 3D label map on the image's voxel grid.
        allowed_labels: label values the dataset declares; others are an error.
        max_voxels: largest volume the file may claim, and the largest the resampled volume may have.

    Raises:
        InputError: unreadable or invalid input (as :func:`~ssl_pretrain.data.preprocess.preprocess`),
            an all-zero image, or a resampled volume over ``max_voxels``.
        ConfigError: ``params`` out of range or a two-value (slice) spacing.
    """
    validate(params, "preprocess.")
    if len(params.spacing) != 3:
        raise ConfigError(f"preprocess.spacing: {list(params.spacing)} is a slice spacing (H W); volumes take Z Y X")
    files = as_image_files(image_path)
    img, ornt, canon, zooms = read_canonical(files, params, max_voxels)
    image_path = first_file(files)
    full = np.moveaxis(_to_slices(canon), 1, 0)  # (C, D, H, W) = (z, -y, x), native spacing
    if not full.any():
        raise InputError(f"{image_path}: every voxel is zero; nothing to crop to")
    box = _nonzero_box(full)
    crop = full[(slice(None), *(slice(a, b) for a, b in box))]
    native = (zooms[2], zooms[1], zooms[0])  # (D, H, W) mm
    size = tuple(max(1, int(round((b - a) * z / t))) for (a, b), z, t in zip(box, native, params.spacing, strict=True))
    if math.prod(size) > max_voxels:
        raise InputError(
            f"{image_path}: {size[0]}x{size[1]}x{size[2]} voxels at spacing {list(params.spacing)} mm exceed "
            f"--max-voxels {max_voxels}; use a coarser --spacing or raise --max-voxels"
        )
    res = _resample(crop, size)
    image = np.moveaxis(_normalise(np.ascontiguousarray(np.moveaxis(res, 0, -1)), params), -1, 0)
    label = None
    if label_path is not None:
        lab = _to_slices(read_label(Path(label_path), image_path, img, ornt, allowed_labels))  # (D, H, W)
        lab = lab[tuple(slice(a, b) for a, b in box)]
        idx = [_nearest_index(n, m) for n, m in zip(lab.shape, size, strict=True)]
        label = np.ascontiguousarray(lab[np.ix_(*idx)], dtype=np.uint8)
    geometry = {
        "layout": "volume",
        "shape": [int(s) for s in img.shape[:3]],
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "ornt": ornt.astype(int).tolist(),
        "canonical_shape": [int(s) for s in full.shape[1:]],
        "crop_box": [list(b) for b in box],
    }
    return VolumeSample(np.ascontiguousarray(image, dtype=np.float32), label, tuple(params.spacing), geometry)


def volume_to_original_grid(mask: np.ndarray, geometry: dict) -> np.ndarray:
    """Map a ``(D, H, W)`` mask (or float map) on the cropped volume back to the input file's grid.

    Inverse of :func:`preprocess_volume`'s geometry: nearest resample to the crop box's native
    extent, un-crop (zeros outside the box), inverse reorientation. Save the result with the input
    image's affine.

    Raises:
        ValueError: ``mask`` is not 3D.
    """
    box = geometry["crop_box"]
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask: expected (D, H, W), got shape {mask.shape}")
    dtype = mask.dtype if mask.dtype.kind == "f" else np.uint8
    idx = [_nearest_index(n, b - a) for n, (a, b) in zip(mask.shape, box, strict=True)]
    full = np.zeros(geometry["canonical_shape"], dtype=dtype)  # (D, H, W) on the native grid
    full[tuple(slice(a, b) for a, b in box)] = mask[np.ix_(*idx)]
    canon = np.ascontiguousarray(np.moveaxis(full[:, ::-1, :], (0, 1, 2), (2, 1, 0)))  # (X, Y, Z)
    inv = nib.orientations.ornt_transform(_RAS_ORNT, np.asarray(geometry["ornt"], dtype=float))
    return np.ascontiguousarray(nib.orientations.apply_orientation(canon, inv).astype(dtype))
