"""Shared fixtures of the downstream tests: one synthetic labeled cohort, one Ray session, tiny configs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream.sweep import start_local_ray
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams, preprocess
from ssl_pretrain.export import save_export
from ssl_pretrain.models.unet import UNet, UNetConfig

# Phantom voxel grid of the derived cohort: in-plane (row=H, col=W) spacing in mm and size; slices
# keep the phantom's own 5-8 mm thickness, so the three axes have three different spacings.
GRID_SPACING = (5.0, 6.5)
GRID_SIZE = (64, 64)
N_SUBJECTS = 8
PARAMS32 = PreprocessParams(spacing=(GRID_SPACING[0] * 2, GRID_SPACING[1] * 2), size=(32, 32))
BUDGET = {"steps": 40, "samples_seen": 320, "wall_time_s": 3.5, "final_loss": 2.1, "world_size": 1}


def make_export(path: Path, *, widths: tuple[int, ...] = (8, 16, 32), in_channels: int = 1, seed: int = 123,
                task: str = "contrastive", with_decoder: bool = False) -> Path:
    """An export of a freshly initialised UNet (32×32 preprocessing), as pretraining would write it."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(in_channels=in_channels, widths=tuple(widths)), 1)
    return save_export(path, task=task, model_config=net.cfg, encoder_state=net.encoder.state_dict(),
                       decoder_state=net.decoder.state_dict() if with_decoder else None,
                       preprocessing=PARAMS32.to_dict(), info=BUDGET)


def non_ras_nifti(display: np.ndarray, spacing_xyz: tuple[float, float, float], dtype: type) -> nib.Nifti1Image:
    """Store a display-ordered ``(S, H, W)`` volume with a permuted, flipped (non-RAS) affine.

    Display order (see ``ssl_pretrain.data.preprocess``): S = +z, H = -y, W = +x. The file's voxel
    axes are (x flipped, z, y), i.e. an "LSA"-like orientation that a reader must undo.
    """
    s, h, w = display.shape
    canon = np.ascontiguousarray(np.transpose(display[:, ::-1, :], (2, 1, 0)))  # C[x, y, z]
    arr = np.ascontiguousarray(np.transpose(canon[::-1, :, :], (0, 2, 1)))  # A[a, b, c] = C[W-1-a, c, b]
    sx, sy, sz = spacing_xyz
    affine = np.array(
        [[-sx, 0, 0, sx * (w - 1) - 100.0], [0, 0, sy, -60.0], [0, sz, 0, -40.0], [0, 0, 0, 1]], dtype=float
    )
    img = nib.Nifti1Image(arr.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSD-layout liver cohort whose files are already on a 64×64 in-plane grid, non-RAS, anisotropic.

    Because the grid equals the preprocessing grid of :func:`tiny_overrides`, preprocessing is a pure
    reorientation, so metrics on the preprocessed grid equal metrics on the original grid exactly.
    """
    base = tmp_path_factory.mktemp("cohort")
    raw = make_cohort("liver", N_SUBJECTS, base / "raw", seed=3)
    out = base / "liver"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    meta = json.loads((raw / "dataset.json").read_text())
    params = PreprocessParams(spacing=GRID_SPACING, size=GRID_SIZE, norm="minmax", clip=(0.0, 100.0))
    for entry in meta["training"]:
        name = Path(entry["image"]).name
        vol = preprocess(raw / entry["image"], params, raw / entry["label"], allowed_labels=(0, 1))
        nib.save(non_ras_nifti(vol.image[:, 0] * 1000.0, vol.spacing, np.float32), out / "imagesTr" / name)
        nib.save(non_ras_nifti(vol.label, vol.spacing, np.uint8), out / "labelsTr" / name)
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def tiny_overrides(root: Path, out_dir: Path, *, size: int = 64) -> list[str]:
    """Overrides of a seconds-long CPU finetuning run on :func:`cohort` (64×64 or 32×32 slices)."""
    f = GRID_SIZE[0] // size
    return [
        f"data.root={root}",
        f"out_dir={out_dir}",
        f"data.cache_dir={root.parent / f'cache{size}'}",
        f"data.preprocess={{spacing: [{GRID_SPACING[0] * f}, {GRID_SPACING[1] * f}], size: [{size}, {size}]}}",
        "data.n_val=2",
        "data.n_test=2",
        "model.widths=[8, 16, 32]",
        "train.max_steps=20",
        "train.eval_every=10",
        "train.batch_size=4",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "tracking.enabled=false",
    ]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for all sweep tests (Ray startup is slow), started as sweeps start it."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    if started:
        start_local_ray(num_cpus=2)  # this machine has 2 cores; 127.0.0.1 only
    yield
    if started:
        import ray

        ray.shutdown()
