"""Test helper: an nnU-Net v2 raw dataset written with nnU-Net's own dataset.json and split writers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def nnunet_raw_dataset(msd: Path, out: Path, *, n_test: int = 2, n_folds: int = 3, channels: int = 2) -> Path:
    """Copy an MSD-layout cohort into ``out`` (``DatasetXXX_Name``) as nnU-Net v2 raw data.

    Each case gets ``channels`` files ``{case}_{c:04d}.nii.gz`` on its grid (channel 0 the original image,
    the others monotone transforms of it, so they differ in value but not in geometry); the last ``n_test``
    cases go to ``imagesTs/`` with their labels in ``labelsTs/``; ``splits_final.json`` holds ``n_folds``
    folds of the training cases made by nnU-Net's ``generate_crossval_split``.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    meta = json.loads((msd / "dataset.json").read_text())
    cases = sorted(Path(e["image"]).name.removesuffix(".nii.gz") for e in meta["training"])
    train, test = cases[: len(cases) - n_test], cases[len(cases) - n_test:]
    for part, ids in (("Tr", train), ("Ts", test)):
        (out / f"images{part}").mkdir(parents=True, exist_ok=True)
        (out / f"labels{part}").mkdir(exist_ok=True)
        for case in ids:
            img = nib.load(msd / "imagesTr" / f"{case}.nii.gz")
            data = np.asarray(img.dataobj, dtype=np.float32)
            for c in range(channels):
                chan = data if c == 0 else np.sqrt(np.maximum(data, 0)) * (10.0 * c)
                dst = out / f"images{part}" / f"{case}_{c:04d}.nii.gz"
                nib.save(nib.Nifti1Image(chan, img.affine, header=img.header), dst)
            lab = nib.load(msd / "labelsTr" / f"{case}.nii.gz")
            nib.save(lab, out / f"labels{part}" / f"{case}.nii.gz")
    names = {str(c): ("T2", "ADC", "DWI")[c] for c in range(channels)}
    generate_dataset_json(str(out), names, {"background": 0, "liver": 1}, len(train), ".nii.gz",
                          dataset_name=out.name)
    (out / "splits_final.json").write_text(json.dumps(generate_crossval_split(train, seed=12345, n_splits=n_folds)))
    return out
