"""Synthetic T2w-like MRI cohorts (abdomen / liver and pelvis / prostate) in the MSD layout.

Each subject is drawn in physical (RAS, mm) coordinates from analytic organ shapes deformed by
smooth random fields, painted with per-tissue T2w intensities and texture, then degraded like a
clinical acquisition: thick anisotropic slices, a smooth multiplicative bias field, a contrast
(gamma) change and Rician noise. Files are stored as int16 NIfTI in an LPS-like voxel order (as
DICOM converters write), so readers must reorient. Same ``seed`` → same bytes (gzip mtime is 0).

Liver subjects (label 1 = liver) show body outline, subcutaneous fat, abdominal wall, liver with
hepatic vessels (flow voids, labelled liver), gallbladder, spleen, kidneys, stomach, spine with
spinal canal, aorta and IVC. Prostate subjects are 4D (T2, ADC) like MSD Task05 (label 1 =
peripheral zone, 2 = transition zone) with bladder, rectum, femoral heads, pubic bone, obturator
muscles and periprostatic fat.

Usage::

    python launch/synth.py --kind liver --n 6 --out data/liver
    python -m ssl_pretrain.data.phantoms --montage docs/phantoms.png   # README figure
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from ssl_pretrain.fileio import atomic_savefig, atomic_write_bytes

logger = logging.getLogger(__name__)

Kind = Literal["liver", "prostate"]
_KIND_CODE = {"liver": 1, "prostate": 2}


@dataclass
class _Grid:
    """Physical coordinates (mm, RAS) of a voxel grid, as broadcastable 1D axes."""

    x: np.ndarray  # (X, 1, 1)
    y: np.ndarray  # (1, Y, 1)
    z: np.ndarray  # (1, 1, Z)
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])


def _make_grid(n_xy: int, n_z: int, s_xy: float, s_z: float, rng: np.random.Generator) -> _Grid:
    """LPS-ordered voxel grid (i → patient right, j → posterior, k → superior) centred near 0."""
    shift = rng.uniform(-10, 10, size=3)
    x0 = (n_xy - 1) / 2 * s_xy + shift[0]
    y0 = (n_xy - 1) / 2 * s_xy + shift[1]
    z0 = -(n_z - 1) / 2 * s_z + shift[2]
    affine = np.array(
        [[-s_xy, 0, 0, x0], [0, -s_xy, 0, y0], [0, 0, s_z, z0], [0, 0, 0, 1]], dtype=np.float64
    )
    i, j, k = np.arange(n_xy), np.arange(n_xy), np.arange(n_z)
    x = (x0 - s_xy * i).astype(np.float32)[:, None, None]
    y = (y0 - s_xy * j).astype(np.float32)[None, :, None]
    z = (z0 + s_z * k).astype(np.float32)[None, None, :]
    return _Grid(x, y, z, affine)


def _field(g: _Grid, rng: np.random.Generator, scale_mm: float, n_terms: int = 5) -> np.ndarray:
    """Smooth random field (sum of random plane waves), roughly in [-1, 1], shape of the grid.

    Uses sin(a + b + c) = Im(e^ia e^ib e^ic) so each wave costs one complex product per voxel.
    """
    acc = np.zeros(g.shape, dtype=np.complex64)
    for _ in range(n_terms):
        k = rng.normal(size=3)
        k *= 2 * np.pi / scale_mm / np.linalg.norm(k) * rng.uniform(0.6, 1.4)
        phase = rng.uniform(0, 2 * np.pi)
        exy = np.exp(1j * k[0] * g.x).astype(np.complex64) * np.exp(1j * k[1] * g.y).astype(np.complex64)
        ez = np.exp(1j * (k[2] * g.z + phase)).astype(np.complex64)
        acc += exy * ez
    return acc.imag * np.float32(1.2 / np.sqrt(n_terms))


def _ellipsoid(
    g: _Grid, c: tuple[float, float, float], r: tuple[float, float, float], warp: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask of a (warped) ellipsoid; ``warp`` is added to the unit radius."""
    d = ((g.x - c[0]) / r[0]) ** 2 + ((g.y - c[1]) / r[1]) ** 2 + ((g.z - c[2]) / r[2]) ** 2
    return d < (1.0 if warp is None else (1.0 + warp) ** 2)


def _cylinder(g: _Grid, c: tuple[float, float], r: tuple[float, float], warp: np.ndarray | None = None,
              tilt: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Boolean mask of an elliptic cylinder along z (optionally tilted: centre moves with z)."""
    cx = c[0] + tilt[0] * g.z
    cy = c[1] + tilt[1] * g.z
    d = ((g.x - cx) / r[0]) ** 2 + ((g.y - cy) / r[1]) ** 2
    return d < (1.0 if warp is None else (1.0 + warp) ** 2)


def _finish(
    g: _Grid, tissue: np.ndarray, means: dict[int, float], texture: dict[int, float],
    rng: np.random.Generator, blur_px: float, noise: float,
) -> np.ndarray:
    """Paint tissue means + texture, blur, bias field, gamma, Rician noise → float32 image."""
    lut = np.zeros(256, dtype=np.float32)
    tex = np.zeros(256, dtype=np.float32)
    for t, m in means.items():
        lut[t] = m * rng.uniform(0.9, 1.1)  # per-subject contrast change between tissues
        tex[t] = texture.get(t, 0.03)
    fine = _field(g, rng, scale_mm=12.0, n_terms=6)
    img = lut[tissue] * (1.0 + tex[tissue] * fine)
    img = ndimage.gaussian_filter(img, sigma=(blur_px, blur_px, 0.0))
    bias = np.exp(0.25 * _field(g, rng, scale_mm=300.0, n_terms=3))
    img = np.clip(img * bias, 0, None) ** np.float32(rng.uniform(0.8, 1.25))
    img = img.astype(np.float32, copy=False)
    sigma = noise * rng.uniform(0.6, 1.4)
    n1 = rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((img + n1) ** 2 + n2**2)


# tissue ids
_AIR, _FAT, _MUSCLE, _BODY, _LIVER, _HVESSEL, _GB, _SPLEEN, _KCORTEX, _KMED = range(10)
_STOMACH, _GAS, _VERT, _CSF, _VOID, _BOWEL = range(10, 16)


def _liver_subject(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One abdominal T2w volume ``(X, Y, Z)`` float32, liver label uint8, affine."""
    s_xy = rng.uniform(1.3, 1.9)
    s_z = rng.uniform(5.0, 8.0)
    n_z = int(rng.integers(20, 33))
    g = _make_grid(256, n_z, s_xy, s_z, rng)
    sc = rng.uniform(0.85, 1.12)  # patient size
    rx, ry = 155 * sc * rng.uniform(0.92, 1.08), 112 * sc * rng.uniform(0.9, 1.1)
    tissue = np.zeros(g.shape, dtype=np.uint8)
    w_body = 0.04 * _field(g, rng, 120.0)
    body = _cylinder(g, (0, 0), (rx, ry), w_body)
    tissue[body] = _FAT
    fat = rng.uniform(12, 30) * sc
    wall = _cylinder(g, (0, 0), (rx - fat, ry - fat), w_body)
    tissue[wall] = _MUSCLE
    inner = _cylinder(g, (0, 0), (rx - fat - 10, ry - fat - 10), w_body)
    tissue[inner] = _BODY
    spine_y = -ry * 0.5
    # bowel loops: blobs of fluid / gas in the lower abdomen
    bowel = (_field(g, rng, 35.0) > 0.55) & inner & (g.y > spine_y + 30)
    tissue[bowel] = _BOWEL
    # kidneys
    for side in (-1, 1):
        c = (side * rng.uniform(55, 75) * sc, spine_y + rng.uniform(5, 20), rng.uniform(-70, -30))
        r = (25 * sc, 20 * sc, 55 * sc)
        tissue[_ellipsoid(g, c, r, 0.08 * _field(g, rng, 60.0))] = _KCORTEX
        tissue[_ellipsoid(g, c, (r[0] * 0.55, r[1] * 0.55, r[2] * 0.7))] = _KMED
    # spleen (patient left, posterior)
    c = (rng.uniform(70, 95) * sc, spine_y + rng.uniform(25, 45), rng.uniform(-5, 35))
    tissue[_ellipsoid(g, c, (30 * sc, 45 * sc, 55 * sc), 0.12 * _field(g, rng, 70.0)) & inner] = _SPLEEN
    # stomach with a gas pocket (patient left, anterior)
    c = (rng.uniform(30, 60) * sc, rng.uniform(10, 45) * sc, rng.uniform(10, 50))
    stomach = _ellipsoid(g, c, (40 * sc, 30 * sc, 45 * sc), 0.15 * _field(g, rng, 50.0)) & inner
    tissue[stomach] = _STOMACH
    tissue[stomach & (g.y > c[1] + 12 * sc)] = _GAS
    # liver: right lobe + left lobe, smooth irregular deformation, kept inside the abdominal wall
    zc = rng.uniform(-10, 25)
    warp = 0.13 * _field(g, rng, 90.0) + 0.05 * _field(g, rng, 35.0)
    right = _ellipsoid(g, (-55 * sc + rng.uniform(-10, 10), rng.uniform(-10, 15), zc),
                       (rng.uniform(70, 88) * sc, rng.uniform(65, 82) * sc, rng.uniform(65, 85)), warp)
    left = _ellipsoid(g, (rng.uniform(0, 25) * sc, rng.uniform(25, 45) * sc, zc + rng.uniform(5, 25)),
                      (rng.uniform(45, 65) * sc, rng.uniform(28, 40) * sc, rng.uniform(35, 50)), warp)
    liver = (right | left) & inner
    tissue[liver] = _LIVER
    # hepatic vessels: dark tubes running obliquely through the liver (flow voids, labelled liver)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = rng.uniform(-100, 20) * sc, rng.uniform(-20, 40) * sc
        tube = _cylinder(g, (cx, cy), (rng.uniform(2.5, 6), rng.uniform(2.5, 6)),
                         tilt=(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)))
        tissue[tube & liver] = _HVESSEL
    # gallbladder (fluid, not liver) at the inferior surface
    gb = _ellipsoid(g, (-30 * sc, 30 * sc, zc - rng.uniform(35, 55)), (14, 12, 25), 0.1 * _field(g, rng, 30))
    tissue[gb & inner] = _GB
    # great vessels (flow voids), spine, spinal canal, paraspinal muscles
    tissue[_cylinder(g, (rng.uniform(8, 22), spine_y + 32), (11, 11))] = _VOID  # aorta
    tissue[_cylinder(g, (-rng.uniform(18, 30), spine_y + 34), (13, 9))] = _VOID  # IVC
    for side in (-1, 1):
        tissue[_cylinder(g, (side * 30, spine_y - 25), (22, 18)) & body] = _MUSCLE
    tissue[_cylinder(g, (0, spine_y), (19, 15))] = _VERT
    tissue[_cylinder(g, (0, spine_y - 24), (8, 7))] = _CSF
    label = np.isin(tissue, (_LIVER, _HVESSEL)).astype(np.uint8)
    means = {_AIR: 0.0, _FAT: 0.85, _MUSCLE: 0.22, _BODY: 0.5, _LIVER: 0.3, _HVESSEL: 0.07, _GB: 0.95,
             _SPLEEN: 0.52, _KCORTEX: 0.6, _KMED: 0.45, _STOMACH: 0.75, _GAS: 0.02, _VERT: 0.42,
             _CSF: 0.98, _VOID: 0.04, _BOWEL: 0.65}
    texture = {_BODY: 0.12, _FAT: 0.04, _BOWEL: 0.15, _LIVER: 0.05, _SPLEEN: 0.04, _VERT: 0.06}
    img = _finish(g, tissue, means, texture, rng, blur_px=0.7, noise=0.03)
    return img, label, g.affine


_PZ, _TZ, _BLADDER, _RECTWALL, _RECTLUM, _BONE, _MARROW, _PPFAT, _NVB = range(16, 25)


def _prostate_subject(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pelvic volume ``(X, Y, Z, 2)`` (T2, ADC) float32, zone label uint8, affine."""
    s_xy = rng.uniform(0.75, 0.95)
    s_z = rng.uniform(3.0, 4.5)
    n_z = int(rng.integers(16, 25))
    g = _make_grid(256, n_z, s_xy, s_z, rng)
    sc = rng.uniform(0.85, 1.15)
    tissue = np.zeros(g.shape, dtype=np.uint8)
    w_body = 0.04 * _field(g, rng, 120.0)
    body = _cylinder(g, (0, 10), (170 * sc, 125 * sc), w_body)
    tissue[body] = _FAT
    # gluteal muscles (posterolateral) and iliopsoas (anterolateral): the pelvis is mostly muscle
    for side in (-1, 1):
        tissue[_cylinder(g, (side * 75 * sc, -75 * sc), (55 * sc, 32 * sc), 0.1 * _field(g, rng, 60))] = _MUSCLE
        tissue[_cylinder(g, (side * 62 * sc, 42 * sc), (17 * sc, 14 * sc), 0.1 * _field(g, rng, 40))] = _MUSCLE
    # obturator internus / levator muscles either side
    for side in (-1, 1):
        tissue[_cylinder(g, (side * 55 * sc, -5), (14 * sc, 38 * sc), 0.1 * _field(g, rng, 50))] = _MUSCLE
    # femoral heads: fatty marrow with a dark cortex
    for side in (-1, 1):
        c = (side * rng.uniform(78, 88) * sc, rng.uniform(-5, 10), rng.uniform(-10, 15))
        tissue[_ellipsoid(g, c, (26 * sc, 26 * sc, 26 * sc))] = _BONE
        tissue[_ellipsoid(g, c, (22 * sc, 22 * sc, 22 * sc))] = _MARROW
    # pubic symphysis (anterior)
    tissue[_cylinder(g, (0, 55 * sc), (30 * sc, 9 * sc), 0.1 * _field(g, rng, 40))] = _BONE
    tissue[_cylinder(g, (0, 55 * sc), (24 * sc, 5 * sc))] = _MARROW
    pc = (rng.uniform(-5, 5), rng.uniform(5, 15), rng.uniform(-10, 10))
    pr = (rng.uniform(19, 27) * sc, rng.uniform(14, 20) * sc, rng.uniform(17, 24) * sc)
    # periprostatic fat and venous plexus, bladder above, rectum behind
    tissue[_ellipsoid(g, pc, (pr[0] + 8, pr[1] + 7, pr[2] + 6))] = _PPFAT
    bladder = _ellipsoid(g, (pc[0], pc[1] + 8, pc[2] + pr[2] + rng.uniform(15, 30)),
                         (rng.uniform(35, 55), rng.uniform(28, 40), rng.uniform(25, 40)), 0.1 * _field(g, rng, 60))
    tissue[bladder] = _BLADDER
    ry = pc[1] - pr[1] - rng.uniform(14, 20)
    tissue[_cylinder(g, (pc[0], ry), (19, 15), 0.1 * _field(g, rng, 30))] = _RECTWALL
    tissue[_cylinder(g, (pc[0], ry), (12, 8), 0.2 * _field(g, rng, 20))] = _RECTLUM
    warp = 0.08 * _field(g, rng, 40.0)
    prostate = _ellipsoid(g, pc, pr, warp)
    tz = _ellipsoid(g, (pc[0], pc[1] + 0.2 * pr[1], pc[2] + 0.15 * pr[2]),
                    (0.62 * pr[0], 0.58 * pr[1], 0.7 * pr[2]), 0.15 * _field(g, rng, 20.0)) & prostate
    tissue[prostate] = _PZ
    tissue[tz] = _TZ
    for side in (-1, 1):  # neurovascular bundles (dark dots posterolateral)
        tissue[_cylinder(g, (pc[0] + side * 0.8 * pr[0], pc[1] - 0.8 * pr[1]), (3, 3))] = _NVB
    label = np.zeros(g.shape, dtype=np.uint8)
    label[tissue == _PZ] = 1
    label[tissue == _TZ] = 2
    t2 = {_AIR: 0.0, _FAT: 0.8, _MUSCLE: 0.2, _PZ: 0.72, _TZ: 0.38, _BLADDER: 0.97, _RECTWALL: 0.22,
          _RECTLUM: 0.05, _BONE: 0.06, _MARROW: 0.6, _PPFAT: 0.7, _NVB: 0.1}
    adc = {_AIR: 0.0, _FAT: 0.12, _MUSCLE: 0.45, _PZ: 0.78, _TZ: 0.5, _BLADDER: 1.0, _RECTWALL: 0.4,
           _RECTLUM: 0.08, _BONE: 0.05, _MARROW: 0.15, _PPFAT: 0.3, _NVB: 0.5}
    texture = {_TZ: 0.15, _PZ: 0.06, _FAT: 0.04, _RECTLUM: 0.2, _MUSCLE: 0.08}
    img_t2 = _finish(g, tissue, t2, texture, rng, blur_px=0.8, noise=0.03)
    img_adc = _finish(g, tissue, adc, texture, rng, blur_px=2.0, noise=0.05)
    return np.stack([img_t2, img_adc], axis=-1), label, g.affine


def _to_int16(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(800, 2000) / max(float(np.percentile(img, 99.5)), 1e-6)
    return np.clip(np.round(img * gain), 0, 32767).astype(np.int16)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic ``.nii.gz`` bytes (gzip mtime 0, fixed header)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)




def make_subject(kind: Kind, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one subject.

    Args:
        kind: ``"liver"`` (3D T2w) or ``"prostate"`` (4D T2 + ADC).
        seed: cohort seed.
        index: subject index within the cohort.

    Returns:
        (image int16 ``(X, Y, Z)`` or ``(X, Y, Z, 2)``, label uint8 ``(X, Y, Z)``, affine ``(4, 4)``).
    """
    if kind not in _KIND_CODE:
        raise ValueError(f"kind: {kind!r} is not one of 'liver', 'prostate'")
    rng = np.random.default_rng([int(seed), int(index), _KIND_CODE[kind]])
    img, label, affine = (_liver_subject if kind == "liver" else _prostate_subject)(rng)
    return _to_int16(img, rng), label, affine


def make_cohort(kind: Kind, n: int, out: Path, *, seed: int = 0, labels: bool = True) -> Path:
    """Write ``n`` synthetic subjects in the Medical Segmentation Decathlon layout.

    Layout: ``out/imagesTr/<id>.nii.gz``, ``out/labelsTr/<id>.nii.gz`` (when ``labels``) and
    ``out/dataset.json`` (training entries without a ``label`` key when ``labels`` is False).
    Subject ids are ``<kind>_s<seed>_<index>``, so cohorts with different seeds never collide.

    Args:
        kind: ``"liver"`` or ``"prostate"``.
        n: number of subjects (≥ 1).
        out: output folder (created; existing subject files with the same names are replaced).
        seed: cohort seed; the same seed gives byte-identical files.
        labels: also write label maps.

    Returns:
        ``out``.

    Raises:
        ValueError: bad ``kind`` or ``n``.
    """
    if kind not in _KIND_CODE:
        raise ValueError(f"kind: {kind!r} is not one of 'liver', 'prostate'")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r} must be a positive integer")
    out = Path(out)
    training = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    it = range(n)
    if tqdm is not None and n > 4:
        it = tqdm(it, desc=f"synth {kind}", unit="subject")
    for i in it:
        sid = f"{kind}_s{seed}_{i:03d}"
        img, label, affine = make_subject(kind, seed, i)
        atomic_write_bytes(out / "imagesTr" / f"{sid}.nii.gz", _nifti_bytes(img, affine))
        entry = {"image": f"./imagesTr/{sid}.nii.gz"}
        if labels:
            atomic_write_bytes(out / "labelsTr" / f"{sid}.nii.gz", _nifti_bytes(label, affine))
            entry["label"] = f"./labelsTr/{sid}.nii.gz"
        training.append(entry)
    meta = {
        "name": f"Synthetic{kind.capitalize()}",
        "description": f"mri-ssl synthetic T2w-like {kind} phantoms (seed {seed})",
        "reference": "ssl_pretrain.data.phantoms",
        "licence": "CC0",
        "tensorImageSize": "3D" if kind == "liver" else "4D",
        "modality": {"0": "T2"} if kind == "liver" else {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "liver"} if kind == "liver"
        else {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_bytes(out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("wrote %d %s subjects to %s", n, kind, out)
    return out


def save_montage(out_png: Path, *, n: int = 4, seed: int = 0) -> Path:
    """Render a PNG montage of ``n`` liver and ``n`` prostate subjects with label contours.

    Args:
        out_png: destination PNG.
        n: subjects per kind.
        seed: cohort seed.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, figsize=(2.1 * n, 4.5), dpi=72, squeeze=False)
    for row, kind in enumerate(("liver", "prostate")):
        for col in range(n):
            img, label, affine = make_subject(kind, seed, col)
            img = img[..., 0] if img.ndim == 4 else img
            z = int(np.argmax(label.reshape(-1, label.shape[2]).sum(0)))
            # LPS voxel order → radiological display (anterior up, patient right on the left)
            sl = img[::-1, ::-1, z].T[::-1]
            lb = label[::-1, ::-1, z].T[::-1]
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5), aspect=affine[1, 1] / affine[0, 0])
            ax.contour(lb, levels=[0.5, 1.5], colors=["orange", "cyan"], linewidths=0.7)
            ax.set_title(f"{kind} {col} (z={z})", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_savefig(fig, out_png, dpi=72)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> None:
    """``python -m ssl_pretrain.data.phantoms --montage docs/phantoms.png``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--montage", type=Path, required=True, help="PNG to write")
    ap.add_argument("--n", type=int, default=4, help="subjects per kind (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    args = ap.parse_args(argv)
    print(save_montage(args.montage, n=args.n, seed=args.seed))


if __name__ == "__main__":
    main()
