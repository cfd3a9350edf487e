"""Synthetic MRI cohorts (abdomen / liver and pelvis / prostate) from one or several sites, MSD layout.

Each subject is drawn in physical (RAS, mm) coordinates from analytic organ shapes deformed by
smooth random fields, painted with per-tissue intensities and texture, then degraded like a
clinical acquisition. Files are stored as int16 NIfTI in an LPS-like voxel order (as DICOM
converters write), so readers must reorient. Same ``seed`` → same bytes (gzip mtime is 0).

``sites=1`` is the single-protocol cohort of earlier versions, byte for byte: T2w-like
intensities, thick anisotropic slices, a smooth bias field, a gamma change and Rician noise;
prostate subjects are 4D (T2, ADC) like MSD Task05. ``sites=K`` (2 ≤ K ≤ 6) spreads the
subjects over the first K entries of :data:`SITES` (subject ``i`` at site ``i % K`` unless
``site_of`` says otherwise). A site is one scanner and protocol:

- a protocol family with its own tissue-contrast ordering (liver: T2w, T2w fat-suppressed,
  T1w in-phase and opposed-phase with India-ink edges and steatosis, diffusion-like b800;
  prostate: T2w, ADC-like, T1w-like), one channel per subject;
- field strength: noise σ ∝ 1 / B0 and a bias field whose strength grows with B0;
- in-plane spacing, matrix (field of view), slice thickness and number of slices (coverage);
- vendor-like scaling of the stored integers;
- artefacts made in k-space: motion ghosts (periodic phase errors of the phase-encoding lines,
  so ghosts move along the phase axis only; EPI-like Nyquist ghosts for diffusion), Gibbs
  ringing (k-space truncated to the acquired matrix), and wrap-around (a phase field of view
  smaller than the body folds what lies outside onto the opposite side).

Multi-site anatomy is not flat either: per-tissue texture from two correlated random fields,
portal veins and bile ducts, partial volume through the slice profile, liver metastases and
cysts, prostate nodules and BPH (an enlarged, nodular transition zone), organ sizes varying across
subjects. Lesions are part of the organ label (liver; the zone they lie in for the prostate).

Liver subjects (label 1 = liver) show body outline, subcutaneous fat, abdominal wall, liver with
hepatic vessels (flow voids, labelled liver), gallbladder, spleen, kidneys, stomach, spine with
spinal canal, aorta and IVC. Prostate subjects (label 1 = peripheral zone, 2 = transition zone)
show bladder, rectum, femoral heads, pubic bone, obturator muscles and periprostatic fat.

Every subject's acquisition is written as per-subject attributes: extra keys of its
``dataset.json`` ``training`` entry and a row of ``subjects.csv`` (first column ``subject``, the id
that ``discover`` / ``open_labeled`` give it).

Usage::

    python launch/synth.py --kind liver --n 24 --sites 4 --out data/liver
    python -m ssl_pretrain.data.phantoms --montage docs/sites_liver.png --kind liver   # README figure
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


def _box(g: _Grid, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index slices of the grid's bounding box ``[lo, hi]`` (mm), or None when it misses the grid."""
    out = []
    for a, lo_, hi_ in zip((g.x[:, 0, 0], g.y[0, :, 0], g.z[0, 0, :]), lo, hi, strict=True):
        idx = np.flatnonzero((a >= lo_) & (a <= hi_))
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return out[0], out[1], out[2]


def _paint_tube(tissue: np.ndarray, g: _Grid, p0: np.ndarray, p1: np.ndarray, r: float, value: int,
                where: np.ndarray) -> None:
    """Set ``tissue`` to ``value`` inside the capsule of radius ``r`` from ``p0`` to ``p1`` (mm), within ``where``.

    Only the capsule's bounding box is computed, so thin vessels cost little.
    """
    box = _box(g, np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if box is None:
        return
    x, y, z = g.x[box[0]] - p0[0], g.y[:, box[1]] - p0[1], g.z[:, :, box[2]] - p0[2]
    d = (p1 - p0).astype(np.float32)
    t = np.clip((x * d[0] + y * d[1] + z * d[2]) / float(d @ d), 0.0, 1.0)
    inside = (x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2 < r * r
    sub = tissue[box]
    sub[inside & where[box]] = value


def _paint_blob(tissue: np.ndarray, g: _Grid, c: np.ndarray, r: np.ndarray, value: int, where: np.ndarray) -> None:
    """Set ``tissue`` to ``value`` inside the axis-aligned ellipsoid ``c``, ``r`` (mm), within ``where``."""
    box = _box(g, c - r, c + r)
    if box is None:
        return
    d = (((g.x[box[0]] - c[0]) / r[0]) ** 2 + ((g.y[:, box[1]] - c[1]) / r[1]) ** 2
         + ((g.z[:, :, box[2]] - c[2]) / r[2]) ** 2)
    sub = tissue[box]
    sub[(d < 1.0) & where[box]] = value


def _random_point(g: _Grid, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Physical position (mm) of a random voxel of ``mask``, or None when it is empty."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    i, j, k = np.unravel_index(idx[int(rng.integers(idx.size))], mask.shape)
    return np.array([g.x[i, 0, 0], g.y[0, j, 0], g.z[0, 0, k]], dtype=np.float32)


# tissue ids
_AIR, _FAT, _MUSCLE, _BODY, _LIVER, _HVESSEL, _GB, _SPLEEN, _KCORTEX, _KMED = range(10)
_STOMACH, _GAS, _VERT, _CSF, _VOID, _BOWEL = range(10, 16)
_PZ, _TZ, _BLADDER, _RECTWALL, _RECTLUM, _BONE, _MARROW, _PPFAT, _NVB = range(16, 25)
_METS, _CYST, _DUCT, _PORTAL, _NODULE, _BPH_STROMA, _BPH_GLAND = range(25, 32)


@dataclass
class _Anatomy:
    """One subject's tissue map on its acquisition grid, before any contrast is painted."""

    g: _Grid
    tissue: np.ndarray  # uint8 (X, Y, Z) tissue ids
    label: np.ndarray  # uint8 (X, Y, Z)
    fat: dict[int, float]  # fat fraction per tissue (opposed-phase imaging cancels water against fat)
    pathology: str


_LEGACY_GRID = {"liver": ((1.3, 1.9), (5.0, 8.0), (20, 33), 256),
                "prostate": ((0.75, 0.95), (3.0, 4.5), (16, 25), 256)}


def _grid_for(kind: Kind, rng: np.random.Generator, site: Site | None, rx: np.random.Generator | None) -> _Grid:
    """The acquisition grid: the legacy ranges for ``site=None``, else the site's.

    The number of slices comes from ``rx`` for a site so that ``rng`` (the anatomy) draws the same
    numbers whatever the site's ranges: subject ``i`` of a seed has one anatomy at every site.
    """
    spacing, thickness, n_slices, matrix = (
        _LEGACY_GRID[kind] if site is None else (site.spacing, site.thickness, site.n_slices, site.matrix))
    s_xy = rng.uniform(*spacing)
    s_z = rng.uniform(*thickness)
    n_z = int((rng if rx is None else rx).integers(*n_slices))
    return _make_grid(matrix, n_z, s_xy, s_z, rng)


def _liver_anatomy(rng: np.random.Generator, site: Site | None, rx: np.random.Generator | None) -> _Anatomy:
    """Abdomen with liver. ``rx`` None draws the single-protocol cohort exactly as earlier versions did."""
    g = _grid_for("liver", rng, site, rx)
    sc = rng.uniform(0.85, 1.12)  # patient size
    org = 1.0 if rx is None else float(rx.uniform(0.85, 1.2))  # liver size relative to the patient
    rx_, ry = 155 * sc * rng.uniform(0.92, 1.08), 112 * sc * rng.uniform(0.9, 1.1)
    tissue = np.zeros(g.shape, dtype=np.uint8)
    w_body = 0.04 * _field(g, rng, 120.0)
    body = _cylinder(g, (0, 0), (rx_, ry), w_body)
    tissue[body] = _FAT
    fat = rng.uniform(12, 30) * sc
    wall = _cylinder(g, (0, 0), (rx_ - fat, ry - fat), w_body)
    tissue[wall] = _MUSCLE
    inner = _cylinder(g, (0, 0), (rx_ - fat - 10, ry - fat - 10), w_body)
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
    right_c = (-55 * sc + rng.uniform(-10, 10), rng.uniform(-10, 15), zc)
    right = _ellipsoid(g, right_c, (rng.uniform(70, 88) * sc * org, rng.uniform(65, 82) * sc * org,
                                    rng.uniform(65, 85) * org), warp)
    left = _ellipsoid(g, (rng.uniform(0, 25) * sc, rng.uniform(25, 45) * sc, zc + rng.uniform(5, 25)),
                      (rng.uniform(45, 65) * sc * org, rng.uniform(28, 40) * sc * org, rng.uniform(35, 50) * org),
                      warp)
    liver = (right | left) & inner
    tissue[liver] = _LIVER
    # hepatic vessels: dark tubes running obliquely through the liver (flow voids, labelled liver)
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = rng.uniform(-100, 20) * sc, rng.uniform(-20, 40) * sc
        tube = _cylinder(g, (cx, cy), (rng.uniform(2.5, 6), rng.uniform(2.5, 6)),
                         tilt=(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)))
        tissue[tube & liver] = _HVESSEL
    pathology = "none"
    liver_fat = 0.0
    if rx is not None:
        pathology, liver_fat = _liver_extras(g, tissue, liver, np.array(right_c, dtype=np.float32), sc, rx)
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
    label = np.isin(tissue, (_LIVER, _HVESSEL, _METS, _CYST, _DUCT, _PORTAL)).astype(np.uint8)
    return _Anatomy(g, tissue, label, {_FAT: 0.9, _BODY: 0.15, _VERT: 0.45, _LIVER: liver_fat}, pathology)


def _liver_extras(g: _Grid, tissue: np.ndarray, liver: np.ndarray, hilum_side: np.ndarray, sc: float,
                  rx: np.random.Generator) -> tuple[str, float]:
    """Portal veins with bile ducts beside them, metastases and cysts; returns (pathology, liver fat fraction)."""
    # porta hepatis: the medial, inferior part of the right lobe; branches fan out into the liver
    hilum = hilum_side + np.array([30 * sc, 10, -20], dtype=np.float32)
    for _ in range(int(rx.integers(3, 6))):
        direction = rx.normal(size=3).astype(np.float32) * np.array([1.0, 0.6, 0.6], dtype=np.float32)
        direction[0] = -abs(direction[0])  # towards the right lobe
        end = hilum + direction / np.linalg.norm(direction) * rx.uniform(50, 100)
        r = rx.uniform(3.0, 6.0)
        _paint_tube(tissue, g, hilum, end, r, _PORTAL, liver)
        duct_shift = rx.normal(size=3).astype(np.float32) * 2 + r + 1.5
        _paint_tube(tissue, g, hilum + duct_shift, end + duct_shift, rx.uniform(1.0, 2.0), _DUCT, liver)
    found = []
    if rx.random() < 0.35:
        for _ in range(int(rx.integers(1, 5))):
            c = _random_point(g, liver, rx)
            if c is not None:
                _paint_blob(tissue, g, c, rx.uniform(5, 20) * rx.uniform(0.8, 1.2, size=3), _METS, liver)
        found.append("metastases")
    if rx.random() < 0.3:
        for _ in range(int(rx.integers(1, 4))):
            c = _random_point(g, liver, rx)
            if c is not None:
                _paint_blob(tissue, g, c, np.full(3, rx.uniform(4, 15), dtype=np.float32), _CYST, liver)
        found.append("cysts")
    liver_fat = float(rx.uniform(0.0, 0.05) if rx.random() < 0.7 else rx.uniform(0.1, 0.3))  # steatosis
    return "+".join(found) or "none", liver_fat


def _prostate_anatomy(rng: np.random.Generator, site: Site | None, rx: np.random.Generator | None) -> _Anatomy:
    """Pelvis with prostate zones. ``rx`` None draws the single-protocol cohort exactly as earlier versions did."""
    g = _grid_for("prostate", rng, site, rx)
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
    bph = rx is not None and rx.random() < 0.35  # benign hyperplasia: a larger gland, most of it TZ
    tz_scale = 1.0
    if rx is not None:
        size = rx.uniform(0.85, 1.15) * (rx.uniform(1.15, 1.4) if bph else 1.0)
        pr = (pr[0] * size, pr[1] * size, pr[2] * size)
        tz_scale = rx.uniform(1.15, 1.3) if bph else 1.0
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
                    (0.62 * pr[0] * tz_scale, 0.58 * pr[1] * tz_scale, 0.7 * pr[2] * tz_scale),
                    0.15 * _field(g, rng, 20.0)) & prostate
    tissue[prostate] = _PZ
    tissue[tz] = _TZ
    found = []
    if rx is not None:
        if bph:  # stromal (dark) and glandular (bright) nodules inside the transition zone
            for _ in range(int(rx.integers(2, 7))):
                c = _random_point(g, tz, rx)
                if c is not None:
                    value = _BPH_STROMA if rx.random() < 0.5 else _BPH_GLAND
                    _paint_blob(tissue, g, c, rx.uniform(3, 8) * rx.uniform(0.8, 1.2, size=3), value, tz)
            found.append("BPH")
        if rx.random() < 0.4:  # a peripheral-zone tumour: T2 dark, restricted diffusion
            c = _random_point(g, tissue == _PZ, rx)
            if c is not None:
                _paint_blob(tissue, g, c, rx.uniform(4, 9) * rx.uniform(0.8, 1.2, size=3), _NODULE, prostate)
            found.append("nodule")
    for side in (-1, 1):  # neurovascular bundles (dark dots posterolateral)
        tissue[_cylinder(g, (pc[0] + side * 0.8 * pr[0], pc[1] - 0.8 * pr[1]), (3, 3))] = _NVB
    label = np.zeros(g.shape, dtype=np.uint8)
    label[np.isin(tissue, (_PZ, _NODULE))] = 1
    label[np.isin(tissue, (_TZ, _BPH_STROMA, _BPH_GLAND))] = 2
    return _Anatomy(g, tissue, label, {_FAT: 0.9, _PPFAT: 0.8, _MARROW: 0.6}, "+".join(found) or "none")


# Relative tissue intensities per protocol. The first T2w tables are the single-protocol cohort's
# (their order fixes its random draws); the others follow the usual appearance of each sequence:
# T2w fluid bright, spleen brighter than liver; fat suppression darkens fat and marrow; T1w fluid
# dark, liver brighter than spleen; high-b diffusion suppresses fat and fluid, spleen and tumours bright.
_T2W_LIVER = {_AIR: 0.0, _FAT: 0.85, _MUSCLE: 0.22, _BODY: 0.5, _LIVER: 0.3, _HVESSEL: 0.07, _GB: 0.95,
              _SPLEEN: 0.52, _KCORTEX: 0.6, _KMED: 0.45, _STOMACH: 0.75, _GAS: 0.02, _VERT: 0.42,
              _CSF: 0.98, _VOID: 0.04, _BOWEL: 0.65}
_T2W_PROSTATE = {_AIR: 0.0, _FAT: 0.8, _MUSCLE: 0.2, _PZ: 0.72, _TZ: 0.38, _BLADDER: 0.97, _RECTWALL: 0.22,
                 _RECTLUM: 0.05, _BONE: 0.06, _MARROW: 0.6, _PPFAT: 0.7, _NVB: 0.1}
_ADC_PROSTATE = {_AIR: 0.0, _FAT: 0.12, _MUSCLE: 0.45, _PZ: 0.78, _TZ: 0.5, _BLADDER: 1.0, _RECTWALL: 0.4,
                 _RECTLUM: 0.08, _BONE: 0.05, _MARROW: 0.15, _PPFAT: 0.3, _NVB: 0.5}
_T1W_LIVER = {_AIR: 0.0, _FAT: 0.9, _MUSCLE: 0.35, _BODY: 0.4, _LIVER: 0.62, _HVESSEL: 0.15, _GB: 0.12,
              _SPLEEN: 0.42, _KCORTEX: 0.5, _KMED: 0.35, _STOMACH: 0.3, _GAS: 0.02, _VERT: 0.55, _CSF: 0.1,
              _VOID: 0.12, _BOWEL: 0.3, _METS: 0.3, _CYST: 0.08, _DUCT: 0.1, _PORTAL: 0.15}
_CONTRAST: dict[str, dict[str, dict[int, float]]] = {
    "liver": {
        "T2w": {**_T2W_LIVER, _METS: 0.5, _CYST: 0.95, _DUCT: 0.9, _PORTAL: 0.06},
        "T2w-FS": {_AIR: 0.0, _FAT: 0.1, _MUSCLE: 0.2, _BODY: 0.45, _LIVER: 0.22, _HVESSEL: 0.05, _GB: 1.0,
                   _SPLEEN: 0.55, _KCORTEX: 0.6, _KMED: 0.5, _STOMACH: 0.7, _GAS: 0.02, _VERT: 0.15, _CSF: 1.0,
                   _VOID: 0.03, _BOWEL: 0.6, _METS: 0.55, _CYST: 1.0, _DUCT: 0.95, _PORTAL: 0.04},
        "T1w-in": _T1W_LIVER,
        "T1w-opposed": _T1W_LIVER,  # the same tissues; water and fat signals subtract (see _acquire)
        "DWI-b800": {_AIR: 0.0, _FAT: 0.03, _MUSCLE: 0.15, _BODY: 0.2, _LIVER: 0.25, _HVESSEL: 0.02, _GB: 0.08,
                     _SPLEEN: 0.6, _KCORTEX: 0.45, _KMED: 0.4, _STOMACH: 0.15, _GAS: 0.01, _VERT: 0.2, _CSF: 0.06,
                     _VOID: 0.02, _BOWEL: 0.35, _METS: 0.8, _CYST: 0.05, _DUCT: 0.05, _PORTAL: 0.02},
    },
    "prostate": {
        "T2w": {**_T2W_PROSTATE, _NODULE: 0.25, _BPH_STROMA: 0.28, _BPH_GLAND: 0.68},
        "ADC": {**_ADC_PROSTATE, _NODULE: 0.3, _BPH_STROMA: 0.42, _BPH_GLAND: 0.72},
        "T1w": {_AIR: 0.0, _FAT: 0.85, _MUSCLE: 0.35, _PZ: 0.38, _TZ: 0.36, _BLADDER: 0.12, _RECTWALL: 0.35,
                _RECTLUM: 0.05, _BONE: 0.05, _MARROW: 0.8, _PPFAT: 0.75, _NVB: 0.3, _NODULE: 0.37,
                _BPH_STROMA: 0.35, _BPH_GLAND: 0.38},
    },
}
# (coarse, fine) texture amplitude per tissue: two random fields (12 mm and 4 mm) mixed per tissue
_TEXTURE = {_BODY: (0.12, 0.05), _FAT: (0.04, 0.03), _BOWEL: (0.15, 0.06), _LIVER: (0.05, 0.04),
            _SPLEEN: (0.04, 0.05), _VERT: (0.06, 0.06), _METS: (0.1, 0.08), _TZ: (0.15, 0.08), _PZ: (0.06, 0.05),
            _RECTLUM: (0.2, 0.05), _MUSCLE: (0.08, 0.03), _BPH_STROMA: (0.1, 0.05), _BPH_GLAND: (0.1, 0.08),
            _KCORTEX: (0.03, 0.03), _NODULE: (0.05, 0.05)}
# Noise σ (relative to tissue intensities near 1) at 1.5 T; it scales as 1 / B0
_NOISE_1T5 = {"T2w": 0.03, "T2w-FS": 0.035, "T1w-in": 0.025, "T1w-opposed": 0.025, "DWI-b800": 0.04,
              "ADC": 0.04, "T1w": 0.025}
_VENDOR_GAIN = {"A": (800.0, 2000.0), "B": (150.0, 400.0), "C": (3000.0, 9000.0)}


@dataclass(frozen=True)
class Site:
    """One scanner and protocol: what every subject acquired there shares.

    Args:
        name: Site id written to the subject attributes (``site-1`` …).
        protocol: Contrast family, a key of the kind's contrast table (liver: ``T2w``, ``T2w-FS``,
            ``T1w-in``, ``T1w-opposed``, ``DWI-b800``; prostate: ``T2w``, ``ADC``, ``T1w``).
        field_strength: B0 in tesla; noise σ ∝ 1 / B0, bias-field strength ∝ B0.
        vendor: ``A`` | ``B`` | ``C``: the range the stored integers are scaled to.
        spacing: In-plane voxel size range (mm), drawn per subject.
        thickness: Slice thickness range (mm), drawn per subject.
        n_slices: ``[low, high)`` number of slices (coverage = slices × thickness).
        matrix: In-plane voxels of the reconstructed image (field of view = matrix × spacing).
        phase_axis: Voxel axis of phase encoding, 0 (left-right) or 1 (anterior-posterior):
            motion ghosts and wrap-around lie along it only.
        phase_fov: Phase field of view (mm); smaller than the body folds the rest back in
            (wrap-around), and the stored image has that many fewer lines. None: no wrap.
        acq_fraction: Share of k-space acquired along each in-plane axis; below 1 the edges ring
            (Gibbs) and the true resolution is coarser than the voxel.
        ghost: Peak phase error (rad) of the phase-encoding lines from periodic motion, 0 for none.
        ghost_period: Lines per motion cycle (2: an EPI-like Nyquist ghost at half the field of
            view); None draws a breathing-like 6–16 lines per subject.
    """

    name: str
    protocol: str
    field_strength: float
    vendor: str
    spacing: tuple[float, float]
    thickness: tuple[float, float]
    n_slices: tuple[int, int]
    matrix: int = 256
    phase_axis: int = 1
    phase_fov: float | None = None
    acq_fraction: float = 0.8
    ghost: float = 0.0
    ghost_period: float | None = None

    @property
    def noise(self) -> float:
        """Noise σ of this protocol at this field strength."""
        return _NOISE_1T5[self.protocol] * 1.5 / self.field_strength

    @property
    def bias(self) -> float:
        """Amplitude of the log bias field: stronger at higher field (B1 inhomogeneity)."""
        return 0.1 * self.field_strength

    def attributes(self) -> dict[str, str | float]:
        """The per-subject attributes this site gives its subjects."""
        return {"site": self.name, "vendor": self.vendor, "field_strength": self.field_strength,
                "protocol": self.protocol}


SITES: dict[str, tuple[Site, ...]] = {
    "liver": (
        Site("site-1", "T2w", 1.5, "A", (1.3, 1.9), (5.0, 8.0), (20, 33), ghost=0.15),
        Site("site-2", "T2w-FS", 3.0, "B", (1.2, 1.5), (5.0, 6.0), (24, 33), phase_axis=0, acq_fraction=0.75,
             ghost=0.35),
        Site("site-3", "T1w-opposed", 3.0, "C", (1.4, 1.8), (3.5, 4.5), (36, 49), phase_fov=250.0,
             acq_fraction=0.7, ghost=0.05),
        Site("site-4", "DWI-b800", 1.5, "A", (2.6, 3.2), (6.0, 8.0), (20, 29), matrix=128, acq_fraction=0.9,
             ghost=0.25, ghost_period=2.0),
        Site("site-5", "T1w-in", 1.5, "B", (1.4, 1.7), (5.0, 7.0), (24, 33), phase_axis=0, acq_fraction=0.75,
             ghost=0.1),
        Site("site-6", "T2w", 3.0, "C", (1.0, 1.3), (4.0, 5.0), (16, 23), matrix=320, acq_fraction=0.65,
             ghost=0.2),
    ),
    "prostate": (
        Site("site-1", "T2w", 3.0, "A", (0.75, 0.95), (3.0, 4.5), (16, 25), ghost=0.1),
        Site("site-2", "T2w", 1.5, "B", (0.9, 1.1), (4.0, 5.0), (16, 23), phase_axis=0, acq_fraction=0.7,
             ghost=0.3),
        Site("site-3", "ADC", 3.0, "C", (1.8, 2.2), (3.5, 4.5), (16, 23), matrix=128, acq_fraction=0.85,
             ghost=0.15, ghost_period=2.0),
        Site("site-4", "T1w", 1.5, "A", (0.8, 1.0), (3.5, 5.0), (16, 23), matrix=320, phase_axis=0,
             phase_fov=220.0, acq_fraction=0.75, ghost=0.1),
        Site("site-5", "T2w", 3.0, "B", (0.6, 0.75), (3.0, 3.6), (20, 29), matrix=320, acq_fraction=0.7, ghost=0.15),
        Site("site-6", "ADC", 1.5, "A", (1.6, 2.0), (4.0, 5.0), (16, 23), matrix=128, acq_fraction=0.9,
             ghost=0.25, ghost_period=2.0),
    ),
}
"""The sites ``sites=K`` draws from (the first K), per kind; ``site-1`` of each is a T2w site."""


def _finish(
    g: _Grid, tissue: np.ndarray, means: dict[int, float], texture: dict[int, float],
    rng: np.random.Generator, blur_px: float, noise: float,
) -> np.ndarray:
    """Single-protocol cohort: paint means + texture, blur, bias field, gamma, Rician noise → float32."""
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


def _fold(a: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Wrap-around: keep the central ``m`` lines of ``axis``; line ``j`` outside lands on ``(j - start) % m``."""
    n = a.shape[axis]
    start = (n - m) // 2
    pre = (-start) % m  # after padding, line j sits at j + pre ≡ j - start (mod m)
    total = -(-(n + pre) // m) * m
    pad = [(0, 0)] * a.ndim
    pad[axis] = (pre, total - n - pre)
    b = np.moveaxis(np.pad(a, pad), axis, 0)
    return np.moveaxis(b.reshape(total // m, m, *b.shape[1:]).sum(0), 0, axis)


def _kspace_artefacts(img: np.ndarray, phase_axis: int, keep: float, ghost: float, period: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Gibbs ringing and motion ghosts, made where the scanner makes them: in k-space, slice by slice.

    k-space is truncated to the central ``keep`` of each in-plane axis (the acquired matrix), and
    each phase-encoding line ``t`` (in acquisition order) gets the phase error
    ``ghost · sin(2π t / period + φ0)``: a modulation along the phase axis only, so its ghosts are
    copies of the object shifted along that axis by multiples of ``n / period`` lines.

    Returns:
        The complex image (before noise).
    """
    from scipy import fft as sfft

    k = sfft.fft2(img, axes=(0, 1), workers=1)
    for axis in (0, 1):
        n = img.shape[axis]
        keep_line = np.abs(sfft.fftfreq(n)) <= keep / 2
        shape = [1, 1, 1]
        shape[axis] = n
        k *= keep_line.reshape(shape)
    phase0 = rng.uniform(0, 2 * np.pi)  # drawn either way: switching ghosts off leaves the noise unchanged
    if ghost > 0:
        n = img.shape[phase_axis]
        t = (np.arange(n) + n // 2) % n  # fft index → acquisition order (lines swept from -k to +k)
        err = ghost * np.sin(2 * np.pi * t / period + phase0)
        shape = [1, 1, 1]
        shape[phase_axis] = n
        k *= np.exp(1j * err).astype(np.complex64).reshape(shape)
    return sfft.ifft2(k, axes=(0, 1), workers=1)


def _acquire(kind: Kind, a: _Anatomy, site: Site, rx: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray, np.ndarray]:
    """Image one anatomy at one site → (float32 magnitude image, label, tissue, affine)."""
    g, tissue, label = a.g, a.tissue, a.label
    lut = np.zeros(256, dtype=np.float32)
    coarse_amp = np.zeros(256, dtype=np.float32)
    fine_amp = np.zeros(256, dtype=np.float32)
    for t, m in _CONTRAST[kind][site.protocol].items():
        lut[t] = m * rx.uniform(0.9, 1.1)  # per-subject contrast change between tissues
        coarse_amp[t], fine_amp[t] = _TEXTURE.get(t, (0.03, 0.02))
    coarse = _field(g, rx, scale_mm=12.0, n_terms=6)
    fine = _field(g, rx, scale_mm=4.0, n_terms=4)
    img = lut[tissue] * (1.0 + coarse_amp[tissue] * coarse + fine_amp[tissue] * fine)
    # partial volume: a little in-plane blur and the slice profile mixing neighbouring slices
    sigma = (0.5, 0.5, 0.35)
    if site.protocol == "T1w-opposed":
        # water and fat signals cancel in voxels holding both: fatty livers darken and fat-water
        # boundaries get a black "India ink" line
        ff = np.zeros(256, dtype=np.float32)
        for t, f in a.fat.items():
            ff[t] = f
        fat = ndimage.gaussian_filter(img * ff[tissue], sigma=sigma)
        img = np.abs(ndimage.gaussian_filter(img * (1 - ff[tissue]), sigma=sigma) - fat)
    else:
        img = ndimage.gaussian_filter(img, sigma=sigma)
    bias = np.exp(site.bias * _field(g, rx, scale_mm=300.0, n_terms=3))
    img = (np.clip(img * bias, 0, None) ** np.float32(rx.uniform(0.8, 1.25))).astype(np.float32)
    affine = g.affine.copy()
    n_phase = img.shape[site.phase_axis]
    m = n_phase if site.phase_fov is None else min(n_phase, int(round(site.phase_fov / abs(affine[0, 0]))))
    if m < n_phase:
        start = (n_phase - m) // 2
        img = _fold(img, site.phase_axis, m)
        keep = [slice(None)] * 3
        keep[site.phase_axis] = slice(start, start + m)
        label, tissue = label[tuple(keep)], tissue[tuple(keep)]
        affine[:3, 3] += affine[:3, site.phase_axis] * start
    period = site.ghost_period if site.ghost_period is not None else rx.uniform(6, 16)
    cimg = _kspace_artefacts(img, site.phase_axis, site.acq_fraction, site.ghost * rx.uniform(0.5, 1.0), period, rx)
    sigma_n = np.float32(site.noise * rx.uniform(0.85, 1.15))
    n1 = rx.standard_normal(size=img.shape, dtype=np.float32) * sigma_n
    n2 = rx.standard_normal(size=img.shape, dtype=np.float32) * sigma_n
    return np.abs(cimg + (n1 + 1j * n2)).astype(np.float32), label, tissue, affine


def _to_int16(img: np.ndarray, rng: np.random.Generator, gain: tuple[float, float] = (800.0, 2000.0)) -> np.ndarray:
    scale = rng.uniform(*gain) / max(float(np.percentile(img, 99.5)), 1e-6)
    return np.clip(np.round(img * scale), 0, 32767).astype(np.int16)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic ``.nii.gz`` bytes (gzip mtime 0, fixed header)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _check_kind(kind: str) -> None:
    if kind not in _KIND_CODE:
        raise ValueError(f"kind: {kind!r} is not one of 'liver', 'prostate'")


def _generate(kind: Kind, seed: int, index: int, site: Site | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                               np.ndarray, str]:
    """(image int16, label, affine, tissue map, pathology) of one subject; ``site=None``: the single-protocol cohort."""
    _check_kind(kind)
    rng = np.random.default_rng([int(seed), int(index), _KIND_CODE[kind]])
    draw = _liver_anatomy if kind == "liver" else _prostate_anatomy
    if site is None:
        a = draw(rng, None, None)
        if kind == "liver":
            legacy_tex = {_BODY: 0.12, _FAT: 0.04, _BOWEL: 0.15, _LIVER: 0.05, _SPLEEN: 0.04, _VERT: 0.06}
            img = _finish(a.g, a.tissue, _T2W_LIVER, legacy_tex, rng, blur_px=0.7, noise=0.03)
        else:
            legacy_tex = {_TZ: 0.15, _PZ: 0.06, _FAT: 0.04, _RECTLUM: 0.2, _MUSCLE: 0.08}
            img = np.stack([_finish(a.g, a.tissue, _T2W_PROSTATE, legacy_tex, rng, blur_px=0.8, noise=0.03),
                            _finish(a.g, a.tissue, _ADC_PROSTATE, legacy_tex, rng, blur_px=2.0, noise=0.05)], axis=-1)
        return _to_int16(img, rng), a.label, a.g.affine, a.tissue, a.pathology
    if site.protocol not in _CONTRAST[kind]:
        raise ValueError(f"site {site.name}: protocol {site.protocol!r} is not one of {sorted(_CONTRAST[kind])} "
                         f"for {kind}")
    rx = np.random.default_rng([int(seed), int(index), _KIND_CODE[kind], 1])
    a = draw(rng, site, rx)
    img, label, tissue, affine = _acquire(kind, a, site, rx)
    return _to_int16(img, rx, _VENDOR_GAIN[site.vendor]), label, affine, tissue, a.pathology


def make_subject(kind: Kind, seed: int, index: int, site: Site | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """Generate one subject.

    Args:
        kind: ``"liver"`` or ``"prostate"``.
        seed: cohort seed.
        index: subject index within the cohort; ``(seed, index)`` fixes the anatomy, so the same
            subject imaged at two sites has the same organs.
        site: where it is acquired (e.g. ``SITES["liver"][2]``); None: the single-protocol cohort
            (liver 3D T2w, prostate 4D T2 + ADC).

    Returns:
        (image int16 ``(X, Y, Z)`` or ``(X, Y, Z, 2)``, label uint8 ``(X, Y, Z)``, affine ``(4, 4)``).
    """
    img, label, affine, _, _ = _generate(kind, seed, index, site)
    return img, label, affine


def make_cohort(kind: Kind, n: int, out: Path, *, seed: int = 0, labels: bool = True, sites: int = 1,
                site_of: list[int] | None = None) -> Path:
    """Write ``n`` synthetic subjects in the Medical Segmentation Decathlon layout.

    Layout: ``out/imagesTr/<id>.nii.gz``, ``out/labelsTr/<id>.nii.gz`` (when ``labels``),
    ``out/subjects.csv`` (``subject`` then one column per attribute) and ``out/dataset.json``
    (written last; training entries carry the same attributes as extra keys, and have no
    ``label`` key when ``labels`` is False). Subject ids are ``<kind>_s<seed>_<index>``, so cohorts
    with different seeds never collide; they are the ids ``discover`` and ``open_labeled`` give.

    Args:
        kind: ``"liver"`` or ``"prostate"``.
        n: number of subjects (≥ 1).
        out: output folder (created; existing subject files with the same names are replaced).
        seed: cohort seed; the same seed gives byte-identical files.
        labels: also write label maps.
        sites: 1: the single-protocol cohort of earlier versions (attributes ``site``,
            ``protocol``); 2..6: the first ``sites`` entries of :data:`SITES` (attributes ``site``,
            ``vendor``, ``field_strength``, ``protocol``, ``pathology``).
        site_of: 0-based site of each subject (length ``n``); default ``i % sites``.

    Returns:
        ``out``.

    Raises:
        ValueError: bad ``kind``, ``n``, ``sites`` or ``site_of``.
    """
    _check_kind(kind)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r} must be a positive integer")
    if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= len(SITES[kind]):
        raise ValueError(f"sites: {sites!r} must be an integer from 1 to {len(SITES[kind])}")
    if site_of is None:
        site_of = [i % sites for i in range(n)]
    elif len(site_of) != n or any(not 0 <= s < sites for s in site_of):
        raise ValueError(f"site_of: needs {n} site indices in 0..{sites - 1}, got {list(site_of)!r}")
    out = Path(out)
    training = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    it = range(n)
    if tqdm is not None and n > 4:
        it = tqdm(it, desc=f"synth {kind}", unit="subject")
    legacy = {"site": "site-1", "protocol": "T2w" if kind == "liver" else "T2w+ADC"}
    for i in it:
        sid = f"{kind}_s{seed}_{i:03d}"
        site = None if sites == 1 else SITES[kind][site_of[i]]
        img, label, affine, _, pathology = _generate(kind, seed, i, site)
        atomic_write_bytes(out / "imagesTr" / f"{sid}.nii.gz", _nifti_bytes(img, affine))
        entry: dict[str, str | float] = {"image": f"./imagesTr/{sid}.nii.gz"}
        if labels:
            atomic_write_bytes(out / "labelsTr" / f"{sid}.nii.gz", _nifti_bytes(label, affine))
            entry["label"] = f"./labelsTr/{sid}.nii.gz"
        entry.update(legacy if site is None else {**site.attributes(), "pathology": pathology})
        training.append(entry)
    columns = [k for k in training[0] if k not in ("image", "label")]
    rows = [",".join(["subject", *columns])]
    rows += [",".join([Path(str(e["image"])).name.removesuffix(".nii.gz"), *(str(e[c]) for c in columns)])
             for e in training]
    atomic_write_bytes(out / "subjects.csv", ("\n".join(rows) + "\n").encode())
    single = sites == 1 and kind == "prostate"
    meta = {
        "name": f"Synthetic{kind.capitalize()}",
        "description": f"mri-ssl synthetic T2w-like {kind} phantoms (seed {seed})" if sites == 1
        else f"mri-ssl synthetic {kind} phantoms from {sites} sites (seed {seed})",
        "reference": "ssl_pretrain.data.phantoms",
        "licence": "CC0",
        "tensorImageSize": "4D" if single else "3D",
        "modality": {"0": "T2", "1": "ADC"} if single else {"0": "T2" if sites == 1 else "MR"},
        "labels": {"0": "background", "1": "liver"} if kind == "liver"
        else {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_bytes(out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("wrote %d %s subjects (%d site%s) to %s", n, kind, sites, "s" * (sites > 1), out)
    return out


def save_montage(out_png: Path, *, kind: Kind = "liver", sites: int = 6, n: int = 3, seed: int = 0) -> Path:
    """Render a PNG with one row per site: the same ``n`` subjects at each, at the same slice position.

    Subject ``i`` has one anatomy at every site, so a column shows one patient on each scanner; the
    slice is the one nearest (in mm) to the middle of the organ at the first site. Label contours
    are drawn on top; every image is shown at the same physical scale.

    Args:
        out_png: destination PNG.
        kind: ``"liver"`` or ``"prostate"``.
        sites: rows: the first ``sites`` entries of :data:`SITES`.
        n: subjects (columns).
        seed: cohort seed.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = SITES[kind][:sites]
    fig, axes = plt.subplots(len(rows), n, figsize=(2.0 * n + 0.6, 2.0 * len(rows)), dpi=80, squeeze=False)
    half = 200.0 if kind == "liver" else 110.0  # mm shown either side of the grid centre
    for col in range(n):
        z_mm = None
        for row, site in enumerate(rows):
            img, label, affine = make_subject(kind, seed, col, site)
            z_of = affine[2, 2] * np.arange(img.shape[2]) + affine[2, 3]
            if z_mm is None:
                z_mm = float(z_of[int(np.argmax(label.reshape(-1, label.shape[2]).sum(0)))])
            z = int(np.argmin(np.abs(z_of - z_mm)))
            # LPS voxel order → radiological display (anterior up, patient right on the left)
            sl = img[::-1, ::-1, z].T[::-1]
            lb = label[::-1, ::-1, z].T[::-1]
            h, w = sl.shape[0] * abs(affine[1, 1]), sl.shape[1] * abs(affine[0, 0])
            extent = (-w / 2, w / 2, -h / 2, h / 2)
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5), extent=extent)
            ax.contour(lb, levels=[0.5, 1.5], colors=["orange", "cyan"], linewidths=0.6, extent=extent,
                       origin="upper")
            ax.set_xlim(-half, half)
            ax.set_ylim(-half, half)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if col == 0:
                ax.set_ylabel(f"{site.name}\n{site.protocol} {site.field_strength:g} T", fontsize=7)
            if row == 0:
                ax.set_title(f"subject {col}", fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, out_png, dpi=80)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> None:
    """``python -m ssl_pretrain.data.phantoms --montage docs/sites_liver.png --kind liver``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--montage", type=Path, required=True, help="PNG to write")
    ap.add_argument("--kind", choices=["liver", "prostate"], default="liver", help="anatomy (default liver)")
    ap.add_argument("--sites", type=int, default=6, help="rows: the first SITES (default 6)")
    ap.add_argument("--n", type=int, default=3, help="subjects, one per column (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    args = ap.parse_args(argv)
    print(save_montage(args.montage, kind=args.kind, sites=args.sites, n=args.n, seed=args.seed))


if __name__ == "__main__":
    main()
