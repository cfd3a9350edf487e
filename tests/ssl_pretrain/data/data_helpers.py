"""Helpers of the data tests: tiny NIfTI volumes and MSD cohorts written directly (fast)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl_pretrain.data.preprocess import PreprocessParams

# small, anisotropic, LPS-ordered volumes: (X, Y, Z) = (24, 20, n_z), 2 x 2.5 x 6 mm
SPACING = (2.0, 2.5, 6.0)


def lps_affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    """An LPS-like affine (as DICOM converters write), so readers must reorient."""
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def blob_volume(seed: int, n_z: int, shape_xy: tuple[int, int] = (24, 20)) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 (X, Y, Z), label uint8 (X, Y, Z)): a bright noisy ellipsoid labelled 1."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (*shape_xy, n_z)), indexing="ij")
    label = ((x / 0.6) ** 2 + (y / 0.5) ** 2 + (z / 0.9) ** 2 < 1).astype(np.uint8)
    img = 100.0 + 300.0 * label + rng.normal(0, 20, label.shape)
    return np.clip(img, 0, None).astype(np.int16), label


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, lps_affine() if affine is None else affine), path)
    return path


def write_msd(root: Path, n: int, *, seed: int = 0, labels: dict[str, str] | None = None) -> Path:
    """An MSD-layout cohort of ``n`` blob subjects with 5..8 slices each."""
    training = []
    for i in range(n):
        img, lab = blob_volume(seed * 100 + i, 5 + i % 4)
        save(root / "imagesTr" / f"case_{i:02d}.nii.gz", img)
        save(root / "labelsTr" / f"case_{i:02d}.nii.gz", lab)
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    meta = {"labels": labels or {"0": "background", "1": "organ"}, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


TINY = PreprocessParams(spacing=(2.5, 2.0), size=(16, 20))


def rewrite_tar(path: Path, edit: Callable[[tarfile.TarInfo, bytes], bytes], fmt: int = tarfile.PAX_FORMAT) -> None:
    """Rewrite the tar at ``path`` in place, each member's data passed through ``edit(info, data)``.

    ``edit`` may also change ``info`` (e.g. set ``pax_headers``); the size follows the new data.
    """
    tmp = path.with_suffix(".new")
    with tarfile.open(path) as tin, tarfile.open(tmp, "w", format=fmt) as tout:
        for m in tin.getmembers():
            data = edit(m, tin.extractfile(m).read())
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    tmp.replace(path)


def take(loader: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` batches of ``loader`` (its state then sits right after them)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
