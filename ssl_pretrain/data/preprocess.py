"""Load, validate and preprocess NIfTI volumes into axial slices, and map predictions back.

One function, :func:`preprocess`, prepares data for sharding, finetuning and prediction, driven by
:class:`PreprocessParams` (stored in the shard manifest and in exported models), so a model always
sees data prepared the same way. :func:`to_original_grid` inverts the geometric part so a predicted
mask can be saved on the input file's voxel grid with the input's affine.

Steps: read all bytes (gzip CRC checked) → validate (a label must have its image's shape and, within
:data:`LABEL_AFFINE_ATOL`, its affine: :func:`check_label_affine`) → reorient to RAS
(``as_closest_canonical``) → in-plane resample to ``spacing`` (image linear with antialiasing, label
nearest) → per-volume percentile clip + z-score or [0, 1] → centre crop/pad to ``size`` → axial
slices ``(S, C, H, W)``.

Slice display convention: rows (H) run anterior → posterior (−y), columns (W) run patient right →
left (+x), i.e. the radiological view; slice index runs inferior → superior (+z). With
``slice_axis: acquisition`` a sagittal or coronal scan is sliced along its own through-plane axis
instead, in the frame (y, z, x) or (x, z, y) taking the place of (x, y, z): superior stays up.

Spacings (voxel sizes in mm) come in three orders, each with its own type:

=============== ============= ==============================================================
type            order         where
=============== ============= ==============================================================
``SpacingHW``   (H, W)        :attr:`PreprocessParams.spacing`: the target in-plane grid
                              (three values (Z, Y, X), a ``SpacingSHW``, make volumes)
``SpacingXYZ``  (x, y, z) RAS :attr:`Volume.spacing` and the shards' ``meta.json`` ``spacing``
                              (x along W, y along H, z along S)
``SpacingSHW``  (S, H, W)     :attr:`Volume.array_spacing`: the order of the axes of
                              ``Volume.label``, as metrics such as HD95 take it
=============== ============= ==============================================================
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ssl_pretrain.config import ConfigError, FieldError, from_dict, option, to_dict, validate

log = logging.getLogger(__name__)

_RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)

SpacingHW = tuple[float, float]
"""In-plane spacing in mm as (row, column) = (H, W) (see the table above)."""
SpacingXYZ = tuple[float, float, float]
"""Voxel size in mm along RAS (x, y, z); x runs along W, y along H, z along S."""
SpacingSHW = tuple[float, float, float]
"""Voxel size in mm along the array axes (S, H, W) of a preprocessed volume."""
ImageFiles = Path | tuple[Path, ...]
"""An image: one NIfTI file (3D, or 4D with channels last), or one 3D file per channel in channel order
(nnU-Net's ``case_0000.nii.gz``, ``case_0001.nii.gz``, …), stacked as channels by :func:`load_image`."""

MAX_VOXELS = 2**28
"""Default largest volume (voxels, channels included) a file may claim: 268 M, ~1 GiB as float32."""

LABEL_AFFINE_ATOL = 1e-3
"""Largest accepted difference of any label affine element from the image's (mm, or mm per voxel)."""


class InputError(ValueError):
    """A user-supplied input file is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class PreprocessParams:
    """Deterministic preprocessing of one volume (stored in manifests and model exports).

    A config dataclass like every other (``option`` fields with bounds, :class:`ConfigError`):
    build it from a dict with :meth:`from_dict`, which converts and validates; ``launch/make_shards.py``
    derives its flags from these fields.
    """

    spacing: tuple[float, ...] = option(
        (1.5, 1.5),
        "target spacing in mm: (H, W) in-plane for slices, or (Z, Y, X) = (D, H, W) for volumes "
        "(ssl_pretrain.data.volumes)", gt=0, length=(2, 3),
        rule="{value} must be two (H W: slices) or three (Z Y X: volumes) positive floats",
    )
    size: tuple[int, int] = option(
        (256, 256), "output (H, W) after centre crop/pad (field_of_view=pad: the patch)", ge=1, length=2,
        rule="{value} must be two positive ints",
    )
    norm: Literal["zscore", "minmax"] = option(
        "zscore", "zscore: mean 0, std 1 per channel and volume; minmax: [0, 1]"
    )
    clip: tuple[float, float] = option(
        (0.5, 99.5), "intensity percentiles (low, high) clipped before normalising",
        ge=0, le=100, length=2,
    )
    channels: tuple[int, ...] | None = option(
        None, "channel indices kept from a 4D input; null keeps all", ge=0, length=(1, None)
    )
    slice_axis: Literal["axial", "acquisition"] = option(
        "axial",
        "axial: 2D slices along the patient's z (a sagittal or coronal scan is resliced, with a warning); "
        "acquisition: along the scan's own through-plane axis (its thickest voxel side)",
    )
    field_of_view: Literal["crop", "pad"] = option(
        "crop",
        "crop: centre-crop/pad every slice to size (fixed-size shards); pad: keep the whole resampled slice, "
        "padded only up to size where smaller (finetuning, evaluation, prediction)",
    )

    context_slices: int = option(
        0, "2.5D: the k neighbouring slices on each side of every slice become extra input channels, "
        "(2k+1)·C in all, edges repeating the end slice (slices only; 0: plain 2D)", ge=0,
    )

    def check_fields(self) -> None:
        """The percentiles must be ordered (each value's bounds are checked by the config loader); 2.5D is
        for slices."""
        lo, hi = self.clip
        if lo >= hi:
            raise FieldError(f"clip: {list(self.clip)} must be percentiles 0 <= low < high <= 100")
        if self.context_slices and self.volumetric:
            raise FieldError(f"context_slices: {self.context_slices} stacks neighbouring slices (2.5D); a volume "
                             f"spacing {list(self.spacing)} makes 3D volumes: use 0")

    @property
    def volumetric(self) -> bool:
        """Three spacing values: whole volumes (:mod:`ssl_pretrain.data.volumes`), not slices."""
        return len(self.spacing) == 3

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples become lists); :func:`ssl_pretrain.config.to_dict`. Plain 2D and 3D
        leave ``context_slices`` out, so their records are those written before 2.5D existed."""
        d = to_dict(self)
        if not self.context_slices:
            del d["context_slices"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessParams:
        """Build and validate from a dict such as :meth:`to_dict` wrote; :func:`ssl_pretrain.config.from_dict`.

        Raises:
            ConfigError: not a mapping, unknown key or bad value, naming ``preprocess.<key>``.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess: expected a mapping, got {type(d).__name__}")
        return from_dict(cls, d, "preprocess.")


@dataclass
class Volume:
    """One preprocessed volume.

    Args:
        image: float32 ``(S, C, H, W)`` axial slices after preprocessing.
        label: uint8 ``(S, H, W)`` or ``None``.
        spacing: (x, y, z) mm of the output grid (x along W, y along H); :attr:`array_spacing` is
            the same in the order of the array axes.
        geometry: JSON-able record of everything :func:`to_original_grid` needs.
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: SpacingXYZ
    geometry: dict

    @property
    def array_spacing(self) -> SpacingSHW:
        """Voxel size in mm along the ``(S, H, W)`` axes of ``label`` (and the last three of ``image``)."""
        x, y, z = self.spacing
        return (z, y, x)


def load_nifti(
    path: str | Path, *, kind: Literal["image", "label"] = "image", max_voxels: int = MAX_VOXELS
) -> nib.Nifti1Image:
    """Read a NIfTI file completely and validate it.

    All bytes are read and a gzip stream is decompressed to its end, so a truncated or corrupted
    ``.nii.gz`` fails here (CRC and length are checked) rather than half-way through a job.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` also rejects NaN/Inf and all-constant data; ``"label"`` allows a constant
            (e.g. empty) label map.
        max_voxels: Largest volume accepted; the header's claim is checked against it and against
            the file's own size before any voxel is allocated.

    Returns:
        A ``Nifti1Image`` whose data is in memory (``get_fdata`` needs no further I/O).

    Raises:
        InputError: one line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw:
        raise InputError(f"{path}: empty file")
    gz = raw[:2] == b"\x1f\x8b"
    header = _read_header(path, _gunzip(path, raw, 544, whole=False) if gz else raw[:544])
    need = _claimed_bytes(path, header, max_voxels)
    if gz:
        raw = _gunzip(path, raw, need + 65536, whole=True)  # a little slack for writers that pad the end
    if len(raw) < need:
        raise InputError(f"{path}: the header claims {need:,} bytes (shape {header.get_data_shape()}), the file holds "
                         f"{len(raw):,}: truncated, or a header that lies about its size")
    img: nib.Nifti1Image | None = None
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = klass.from_bytes(raw)
            break
        except Exception:  # nibabel raises several types for a wrong header; try the next class
            continue
    if img is None:
        raise InputError(f"{path}: not a NIfTI-1/NIfTI-2 file")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the voxel data ({exc})") from None
    if data.ndim < 3:
        raise InputError(f"{path}: {data.ndim}D image of shape {data.shape}; expected a 3D or 4D volume")
    if data.ndim > 4:
        data = _squeeze_trailing(path, data)
    if min(data.shape) == 0:
        raise InputError(f"{path}: empty volume of shape {data.shape}")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported voxel type {data.dtype} (expected integer or float)")
    if kind == "image":
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError(f"{path}: volume contains NaN or Inf values")
        if data.min() == data.max():
            raise InputError(f"{path}: volume is constant (all voxels = {data.flat[0]})")
    zooms = _affine_zooms(path, img, header)
    out = nib.Nifti1Image(data, img.affine, header=img.header if isinstance(img, nib.Nifti1Image) else None)
    out.set_data_dtype(data.dtype)
    out.header.set_zooms((*zooms, *out.header.get_zooms()[3:]))  # one source of spacing: the affine
    return out


def as_image_files(image: str | Path | tuple[str | Path, ...] | list[str | Path]) -> ImageFiles:
    """An image argument as :data:`ImageFiles` (a path, or a tuple of per-channel paths)."""
    if isinstance(image, (tuple, list)):
        return Path(image[0]) if len(image) == 1 else tuple(Path(p) for p in image)
    return Path(image)


def first_file(image: ImageFiles) -> Path:
    """The file that names an image in messages: the file itself, or its first channel file."""
    return image[0] if isinstance(image, tuple) else image


def load_image(image: ImageFiles, *, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """:func:`load_nifti` of one file, or of one 3D file per channel stacked into ``(X, Y, Z, C)``.

    Raises:
        InputError: a file :func:`load_nifti` refuses, a channel file that is not 3D, or channel files
            whose shapes or affines (beyond :data:`LABEL_AFFINE_ATOL` mm) differ from the first's.
    """
    if not isinstance(image, tuple):
        return load_nifti(image, max_voxels=max_voxels)
    imgs = [load_nifti(p, max_voxels=max_voxels) for p in image]
    ref = imgs[0]
    for p, im in zip(image, imgs, strict=True):
        if im.ndim != 3:
            raise InputError(f"{p}: a channel file must be 3D, got shape {im.shape}")
        if im.shape != ref.shape:
            raise InputError(f"{p}: shape {im.shape} differs from channel file {image[0].name} {ref.shape}")
        diff = float(np.abs(im.affine - ref.affine).max())
        if diff > LABEL_AFFINE_ATOL:
            raise InputError(f"{p}: affine differs from channel file {image[0].name} by up to {diff:.4g} mm "
                             f"(> {LABEL_AFFINE_ATOL}); the channels of one case must share a voxel grid")
    arrays = [np.asanyarray(im.dataobj) for im in imgs]
    dtype = arrays[0].dtype if all(a.dtype == arrays[0].dtype for a in arrays) else np.float32
    out = nib.Nifti1Image(np.stack(arrays, axis=-1).astype(dtype, copy=False), ref.affine, header=ref.header)
    out.set_data_dtype(dtype)
    return out


def _gunzip(path: Path, raw: bytes, limit: int, *, whole: bool) -> bytes:
    """At most ``limit`` decompressed bytes of a gzip stream (``whole``: all of it, which must fit).

    Bounded, so a small ``.nii.gz`` that inflates to gigabytes is refused before it is held; the
    stream's CRC and length are checked when it is read whole.
    """
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(raw, limit + 1 if whole else limit)
        if not whole:
            return out
        total = len(out)
        while total > limit and d.unconsumed_tail:  # read on in bounded pieces: is the rest even valid?
            total += len(d.decompress(d.unconsumed_tail, 1 << 20))
    except zlib.error as exc:
        raise InputError(f"{path}: corrupt or truncated gzip stream ({exc})") from None
    if not d.eof:
        raise InputError(f"{path}: corrupt or truncated gzip stream (it ends before its last byte)")
    if total > limit:
        raise InputError(f"{path}: decompresses to {total:,} bytes, more than the {limit:,} its header claims "
                         "(a header that lies about its size)")
    return out


def _read_header(path: Path, head: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header at the start of ``head``, as written (nibabel's fixes not applied)."""
    for klass, size, magic in ((nib.Nifti1Header, 348, (b"n+1", b"ni1")), (nib.Nifti2Header, 540, (b"n+2", b"ni2"))):
        try:
            hdr = klass.from_fileobj(io.BytesIO(head), check=False)
        except Exception:  # too short, or not this class's layout: try the next class
            continue
        if int(hdr["sizeof_hdr"]) == size and bytes(hdr["magic"].item()) in magic:
            return hdr
    raise InputError(f"{path}: not a NIfTI-1/NIfTI-2 file")


def _claimed_bytes(path: Path, header: nib.Nifti1Header, max_voxels: int) -> int:
    """Bytes the header says the file holds (offset + data), checked against ``max_voxels`` first."""
    try:
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises several types for a malformed header
        raise InputError(f"{path}: unreadable NIfTI header ({type(exc).__name__})") from None
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise InputError(f"{path}: the header claims shape {shape} = {voxels:,} voxels, more than max_voxels="
                         f"{max_voxels:,} (raise --max-voxels / data.preprocess.max_voxels if the volume is real)")
    return offset + voxels * itemsize


def _affine_zooms(path: Path, img: nib.Nifti1Image, header: nib.Nifti1Header) -> tuple[float, float, float]:
    """Voxel size in mm from the affine nibabel chose (sform if valid, else qform), with warnings.

    A header whose pixdim disagrees with that affine by more than 1 % (zero pixdim included, which
    nibabel silently reads as 1 mm) and a qform that disagrees with the sform are named in a warning.
    """
    zooms = np.sqrt((np.asarray(img.affine[:3, :3], dtype=float) ** 2).sum(axis=0))
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise InputError(f"{path}: invalid voxel size {tuple(float(z) for z in zooms)} (from its affine)")
    pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
    if not np.allclose(pixdim, zooms, rtol=0.01, atol=0):
        log.warning("%s: header pixdim %s mm disagrees with the affine's voxel size %s mm; using the affine",
                    path, [round(float(z), 4) for z in pixdim], [round(float(z), 4) for z in zooms])
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if q_code > 0 and s_code > 0 and not np.allclose(header.get_qform(), header.get_sform(), atol=1e-3):
        log.warning("%s: qform (code %d) and sform (code %d) disagree; using the sform, as nibabel does",
                    path, q_code, s_code)
    return float(zooms[0]), float(zooms[1]), float(zooms[2])


def _squeeze_trailing(path: Path, data: np.ndarray) -> np.ndarray:
    extra = data.shape[4:]
    if any(s != 1 for s in extra):
        raise InputError(f"{path}: {data.ndim}D image of shape {data.shape}; expected 3D or 4D")
    return data.reshape(data.shape[:4])


def _resample_image(arr: np.ndarray, out_xy: tuple[int, int]) -> np.ndarray:
    """Linear in-plane resample of ``(X, Y, Z, C)`` to ``(nx, ny, Z, C)`` (antialiased downsampling)."""
    x, y, z, c = arr.shape
    if (x, y) == out_xy:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 3, 0, 1))).reshape(z * c, 1, x, y)
    down = out_xy[0] < x or out_xy[1] < y
    r = F.interpolate(t, size=out_xy, mode="bilinear", align_corners=False, antialias=down)
    return r.reshape(z, c, *out_xy).numpy().transpose(2, 3, 0, 1)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resample with pixel-centre alignment."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def _crop_pad(arr: np.ndarray, offset: tuple[int, int], size: tuple[int, int], fill: float) -> np.ndarray:
    """``out[i, j] = arr[i + ox, j + oy]`` over the first two axes, ``fill`` outside ``arr``."""
    out = np.full(size + arr.shape[2:], fill, dtype=arr.dtype)
    src, dst = [], []
    for n_in, n_out, off in zip(arr.shape[:2], size, offset, strict=True):
        lo, hi = max(0, -off), min(n_out, n_in - off)
        dst.append(slice(lo, hi))
        src.append(slice(lo + off, hi + off))
    out[dst[0], dst[1]] = arr[src[0], src[1]]
    return out


def _to_slices(arr: np.ndarray) -> np.ndarray:
    """Canonical ``(X, Y, Z, ...)`` → display ``(Z, ..., H=-y, W=x)``."""
    moved = np.moveaxis(arr, (2, 1, 0), (0, -2, -1))  # (Z, ..., Y, X)
    return np.ascontiguousarray(moved[..., ::-1, :])


def _normalise(arr: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Per-channel percentile clip then z-score / min-max on ``(X, Y, Z, C)`` float32."""
    out = np.empty_like(arr)
    for c in range(arr.shape[-1]):
        ch = arr[..., c]
        lo, hi = np.percentile(ch, params.clip)
        ch = np.clip(ch, lo, hi)
        if params.norm == "zscore":
            std = float(ch.std())
            out[..., c] = (ch - float(ch.mean())) / (std if std > 0 else 1.0)
        else:
            out[..., c] = (ch - lo) / (hi - lo if hi > lo else 1.0)
    return out


def read_canonical(
    image: ImageFiles, params: PreprocessParams, max_voxels: int
) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """Read an image (one file or one per channel), keep ``params.channels`` and reorient it to the slicing frame.

    Returns:
        ``(img, ornt, canon, canon_zooms)``: the NIfTI image, the file → frame orientation, the
        float32 data ``(X', Y', Z', C)`` in that frame (RAS, or the acquisition's own) and its voxel
        sizes in mm.
    """
    img = load_image(image, max_voxels=max_voxels)
    image_path = first_file(image)
    data = np.asanyarray(img.dataobj).astype(np.float32, copy=False)
    if data.ndim == 3:
        data = data[..., None]
    n_ch = data.shape[3]
    if params.channels is not None:
        bad = [c for c in params.channels if c >= n_ch]
        if bad:
            raise InputError(f"{image_path}: channel(s) {bad} requested but the image has {n_ch} channel(s)")
        data = data[..., list(params.channels)]
    ornt = _slicing_orientation(image_path, img, params.slice_axis)
    canon = nib.orientations.apply_orientation(data, ornt)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    canon_zooms = np.empty(3)
    canon_zooms[ornt[:, 0].astype(int)] = zooms
    return img, ornt, canon, canon_zooms


def preprocess(
    image_path: str | Path | ImageFiles,
    params: PreprocessParams,
    label_path: str | Path | None = None,
    *,
    allowed_labels: tuple[int, ...] | list[int] | None = None,
    max_voxels: int = MAX_VOXELS,
) -> Volume:
    """Load one volume (and its label) and turn it into preprocessed axial slices.

    Args:
        image_path: 3D ``(X, Y, Z)`` or 4D ``(X, Y, Z, C)`` NIfTI image, or one 3D file per channel.
        params: preprocessing parameters.
        label_path: optional 3D label map on the same voxel grid.
        allowed_labels: label values the dataset declares (e.g. ``(0, 1)``); others are an error.
        max_voxels: largest volume the image file may claim (:func:`load_nifti`).

    Returns:
        :class:`Volume` with image ``(S, C, H, W)`` float32 and label ``(S, H, W)`` uint8.

    Raises:
        InputError: unreadable/invalid image or label, label shape or affine mismatch (see
            :func:`check_label_affine`), undeclared label values, or a channel index the image does
            not have.
        ConfigError: ``params`` out of range.

    Example:
        >>> vol = preprocess("img.nii.gz", PreprocessParams(size=(64, 64)))  # doctest: +SKIP
    """
    validate(params, "preprocess.")  # parameters built in code have not been through from_dict
    if len(params.spacing) != 2:
        raise ConfigError(f"preprocess.spacing: {list(params.spacing)} is a volume spacing (Z Y X); slices take (H W)")
    files = as_image_files(image_path)
    img, ornt, canon, canon_zooms = read_canonical(files, params, max_voxels)
    cx, cy, cz = canon.shape[:3]
    # params.spacing is (row=H=y, col=W=x)
    nx = max(1, int(round(cx * canon_zooms[0] / params.spacing[1])))
    ny = max(1, int(round(cy * canon_zooms[1] / params.spacing[0])))
    res = _resample_image(np.ascontiguousarray(canon), (nx, ny))
    res = _normalise(res, params)
    h, w = params.size
    if params.field_of_view == "pad":  # the whole slice, padded up to the patch size where smaller
        h, w = max(h, ny), max(w, nx)
    # the display grid is (H=-y, W=x); crop/pad in canonical (x, y) order with matching offsets
    offset = ((nx - w) // 2, (ny - h) // 2)
    fill = res.min(axis=(0, 1, 2))  # background after normalisation (clip low), per channel
    out = _crop_pad(res, offset, (w, h), 0.0)
    pad_mask = _crop_pad(np.zeros((nx, ny, 1, 1), bool), offset, (w, h), True)[..., 0, 0]
    if pad_mask.any():
        for c in range(out.shape[-1]):
            out[pad_mask, :, c] = fill[c]
    image = _to_slices(out).astype(np.float32, copy=False)  # (Z, C, H, W)
    if params.context_slices:
        image = context_stack(image, params.context_slices)

    label = None
    if label_path is not None:
        label = _load_label(Path(label_path), first_file(files), img, ornt, (nx, ny), offset, (w, h), allowed_labels)

    geometry = {
        "shape": [int(s) for s in img.shape[:3]],
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "ornt": ornt.astype(int).tolist(),
        "canonical_shape": [int(cx), int(cy), int(cz)],
        "resampled_shape": [int(nx), int(ny)],
        "offset": [int(offset[0]), int(offset[1])],
        "size": [int(h), int(w)],
    }
    spacing = (
        float(canon_zooms[0] * cx / nx),
        float(canon_zooms[1] * cy / ny),
        float(canon_zooms[2]),
    )
    return Volume(image=image, label=label, spacing=spacing, geometry=geometry)


def context_stack(image: np.ndarray, k: int) -> np.ndarray:
    """2.5D input: every slice with its ``k`` neighbours on each side as channels.

    Args:
        image: ``(S, C, H, W)`` slices in order.
        k: neighbours on each side.

    Returns:
        ``(S, (2k + 1) C, H, W)``: channels ``j C … (j + 1) C - 1`` of slice ``s`` are slice
        ``clip(s + j - k, 0, S - 1)`` (the end slices repeat at the volume's edges); the slice itself is
        the middle group.
    """
    n = image.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)
    return np.ascontiguousarray(image[idx].reshape(n, (2 * k + 1) * image.shape[1], *image.shape[2:]))


def check_label_affine(
    image_affine: np.ndarray, label_affine: np.ndarray, image_path: str | Path, label_path: str | Path
) -> None:
    """Reject a label that is not on its image's voxel grid: the project's one label/image affine policy.

    A label whose affine differs from the image's by more than :data:`LABEL_AFFINE_ATOL` (any element)
    marks other voxels than the image shows; using it with the image geometry would train on, or
    score, misplaced masks, so it is an error rather than a warning. Smaller differences are the
    float32 rounding of NIfTI headers written by different tools and are accepted.

    Args:
        image_affine: ``(4, 4)`` voxel → world (mm) affine of the image.
        label_affine: The label's affine.
        image_path: The image (named in the error).
        label_path: The label (named in the error).

    Raises:
        InputError: The affines differ by more than the tolerance.
    """
    diff = float(np.max(np.abs(np.asarray(label_affine, float) - np.asarray(image_affine, float))))
    if not diff <= LABEL_AFFINE_ATOL:  # written so that a NaN affine is rejected too
        raise InputError(
            f"{label_path}: label affine differs from image {Path(image_path).name} affine by up to {diff:.4g} "
            f"(tolerance {LABEL_AFFINE_ATOL:g}); the label must be on the image's voxel grid"
        )


_PLANES = ("sagittal", "coronal", "axial")  # the plane whose normal is RAS axis x, y, z


def _slicing_orientation(path: Path, img: nib.Nifti1Image, slice_axis: str) -> np.ndarray:
    """File axes → the frame whose third axis is sliced: RAS (``axial``), or the acquisition's own.

    The acquisition's through-plane axis is the file axis with the thickest voxels (when it is at
    least 1.5× the others; an isotropic scan has none and is sliced axially). ``acquisition`` puts
    that axis last, keeping superior up in the slices of a sagittal or coronal scan (sagittal:
    (y, z, x), coronal: (x, z, y)); ``axial`` reslices it, and says so once per file.
    """
    ornt = nib.orientations.io_orientation(img.affine)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    thick = int(np.argmax(zooms))
    others = np.delete(zooms, thick)
    if zooms[thick] < 1.5 * others.max():
        return ornt
    through = int(ornt[thick, 0])  # RAS axis the slices are stacked along: 0 sagittal, 1 coronal, 2 axial
    if through == 2:
        return ornt
    if slice_axis == "axial":
        log.warning("%s: a %s acquisition (%.3g mm slices) is resliced axially: its %s-axis pixels are "
                    "interpolated from %.3g mm; preprocess.slice_axis=acquisition (make_shards --slice-axis "
                    "acquisition) keeps its own slices", path, _PLANES[through], zooms[thick], "xy"[through],
                    zooms[thick])
        return ornt
    order = [1, 2, 0] if through == 0 else [0, 2, 1]  # target axes as RAS axes; the through-plane one last
    out = ornt.copy()
    out[:, 0] = [order.index(int(a)) for a in ornt[:, 0]]
    return out


def read_label(
    label_path: Path, image_path: Path, img: nib.Nifti1Image, ornt: np.ndarray,
    allowed_labels: tuple[int, ...] | list[int] | None,
) -> np.ndarray:
    """Read a label map, check it against its image (shape, affine, declared values) and reorient it.

    Returns:
        uint8 ``(X', Y', Z')`` in the image's slicing frame (``ornt``).
    """
    lab_img = load_nifti(label_path, kind="label", max_voxels=max(MAX_VOXELS, math.prod(img.shape[:3])))
    lab = np.asanyarray(lab_img.dataobj)
    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    if lab.shape != tuple(img.shape[:3]):
        raise InputError(f"{label_path}: label shape {lab.shape} differs from image {image_path.name} "
                         f"shape {tuple(img.shape[:3])}")
    check_label_affine(img.affine, lab_img.affine, image_path, label_path)
    if lab.dtype.kind == "f" and (not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab))):
        raise InputError(f"{label_path}: label values must be integers")
    values = np.unique(lab)
    allowed = set(range(256)) if allowed_labels is None else {int(v) for v in allowed_labels}
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise InputError(f"{label_path}: label values {bad} not among declared labels {sorted(allowed)[:16]}")
    return nib.orientations.apply_orientation(lab.astype(np.uint8), ornt)


def _load_label(
    label_path: Path,
    image_path: Path,
    img: nib.Nifti1Image,
    ornt: np.ndarray,
    out_xy: tuple[int, int],
    offset: tuple[int, int],
    size_xy: tuple[int, int],
    allowed_labels: tuple[int, ...] | list[int] | None,
) -> np.ndarray:
    lab = read_label(label_path, image_path, img, ornt, allowed_labels)
    ix = _nearest_index(lab.shape[0], out_xy[0])
    iy = _nearest_index(lab.shape[1], out_xy[1])
    lab = lab[ix][:, iy]
    lab = _crop_pad(lab, offset, size_xy, 0)
    return _to_slices(lab).astype(np.uint8, copy=False)  # (Z, H, W)


def to_original_grid(mask: np.ndarray, geometry: dict) -> np.ndarray:
    """Map an ``(S, H, W)`` mask on the preprocessed grid back to the input file's voxel grid.

    Inverse of :func:`preprocess`'s geometry: inverse crop/pad, nearest inverse in-plane resample,
    inverse RAS reorientation. Save the result with the input image's affine.

    Args:
        mask: ``(S, H, W)`` integer mask (e.g. a prediction), S = number of slices of the input, or a
            float map (e.g. one class's probabilities), mapped the same way.
        geometry: ``Volume.geometry`` of the same input.

    Returns:
        Array with the input image's spatial shape ``(X, Y, Z)``: uint8 for an integer mask, the
        float map's own dtype for a float map.

    Raises:
        ValueError: ``mask`` shape does not match ``geometry``.
    """
    cx, cy, cz = geometry["canonical_shape"]
    nx, ny = geometry["resampled_shape"]
    h, w = geometry["size"]
    mask = np.asarray(mask)
    if mask.shape != (cz, h, w):
        raise ValueError(f"mask: shape {mask.shape} does not match the preprocessed grid {(cz, h, w)}")
    canon = np.ascontiguousarray(np.moveaxis(mask[:, ::-1, :], (0, 1, 2), (2, 1, 0)))  # (W=x, H=y, Z)
    ox, oy = geometry["offset"]
    res = _crop_pad(canon, (-ox, -oy), (nx, ny), 0)
    ix = _nearest_index(nx, cx)
    iy = _nearest_index(ny, cy)
    dtype = mask.dtype if mask.dtype.kind == "f" else np.uint8
    back = res[ix][:, iy].astype(dtype)
    ornt = np.asarray(geometry["ornt"], dtype=float)
    inv = nib.orientations.ornt_transform(_RAS_ORNT, ornt)
    out = nib.orientations.apply_orientation(back, inv)
    return np.ascontiguousarray(out.astype(dtype))
