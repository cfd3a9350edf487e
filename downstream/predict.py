"""Inference: a finetuned model on new NIfTI volumes, masks written on the input's original grid.

The finetuned ``model.pt`` holds the architecture, the weights (encoder, decoder, head), the
number of classes and the preprocessing parameters, so nothing else is needed: every input goes
through the same :func:`~ssl_pretrain.data.preprocess.preprocess` as training did (whole slices,
padded only), every slice is segmented whole by Gaussian-weighted sliding windows of the training
patch size (:func:`~downstream.inference.predict_probabilities`), and
:func:`~ssl_pretrain.data.preprocess.to_original_grid` undoes padding, in-plane resampling and
reorientation, so the mask has the input's shape, affine and
orientation and nothing outside a patch is dropped.

Example:
    >>> predict("runs/ft/model.pt", "case_001.nii.gz", "case_001_mask.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from downstream.inference import (
    image_channels,
    inference_roi,
    keep_largest_component,
    load_segmentation_model,
    mirror_axes,
    original_grid,
    predict_probabilities,
)
from ssl_pretrain.data.ingest import discover, is_nifti_name, is_nnunet_folder, nifti_stem
from ssl_pretrain.data.preprocess import ImageFiles, PreprocessParams, first_file, preprocess
from ssl_pretrain.data.volumes import preprocess_volume
from ssl_pretrain.fileio import atomic_path, check_writable

log = logging.getLogger(__name__)

__all__ = ["predict"]



def _output_paths(inputs: list[tuple[ImageFiles, str]], output: Path, many: bool) -> list[Path]:
    """The mask path of each input: ``output`` itself (one input, a ``.nii.gz`` path) or
    ``output/<name>_mask.nii.gz``.

    Raises:
        ValueError: Two inputs would share a mask (``a.nii`` and ``a.nii.gz``), or a mask would
            replace an input; nothing is written then.
    """
    single = not many and is_nifti_name(output)
    dsts = [output] if single else [output / f"{name}_mask.nii.gz" for _, name in inputs]
    files = [first_file(f) for f, _ in inputs]
    given = {p.resolve(): p for f, _ in inputs for p in (f if isinstance(f, tuple) else (f,))}
    first: dict[Path, Path] = {}
    for f, dst in zip(files, dsts, strict=True):
        key = dst.resolve()
        if key in first:
            raise ValueError(f"--input: {first[key]} and {f} would both be written to {dst}; rename one of them")
        if key in given:
            raise ValueError(f"--output: {dst} would overwrite the input {given[key]}")
        first[key] = f
    return dsts


def _plan_outputs(src: Path, out: Path) -> tuple[list[ImageFiles], list[Path], bool]:
    """``(input images, their mask paths, whether the input is a folder)``; the mask folder is created
    and written to once, so a read-only or full disk fails here, before any inference."""
    inputs, many = _input_images(src), src.is_dir()
    dsts = _output_paths(inputs, out, many)
    folder = out if many or not is_nifti_name(out) else out.parent
    _output_folder(folder)
    check_writable(folder)
    return [f for f, _ in inputs], dsts, many


def _input_images(src: Path) -> list[tuple[ImageFiles, str]]:
    """``(image, name)`` of each input of ``--input``: the file itself, a folder's NIfTI files (hidden files
    left out), or the cases of an nnU-Net dataset (its folder, ``imagesTs/`` or ``imagesTr/``: channel files
    grouped per case, named by case)."""
    if src.is_dir() and is_nnunet_folder(src):
        found, _ = discover(src, labels=False)
        return [(s.image, s.id) for s in found]
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if is_nifti_name(p) and not p.name.startswith("."))
        if not files:
            raise ValueError(f"--input: {src} holds no .nii / .nii.gz files")
        return [(f, nifti_stem(f)) for f in files]
    if src.is_file():
        return [(src, nifti_stem(src))]
    raise ValueError(f"--input: {src} does not exist")


def _output_folder(folder: Path) -> None:
    """Create the folder the masks go to, or say in one line why it cannot be."""
    bad = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise ValueError(f"--output: {bad} is a file; the masks need a folder {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output: cannot create the folder {folder} ({e.strerror})") from None


def _mirror_axes(tta: str | None, spatial_dims: int) -> tuple[int, ...]:
    """``--tta`` letters (``d`` slices of a 3D model, ``h`` rows, ``w`` columns) → axes of ``(B, C, *spatial)``."""
    if tta is None:
        return ()
    if tta == "all":
        return mirror_axes(spatial_dims)
    letters = "dhw" if spatial_dims == 3 else "hw"
    if not tta or any(ch not in letters for ch in tta.lower()):
        what = "a 3D model mirrors along d, h, w (slices, rows, columns)" if spatial_dims == 3 else \
            "a 2D model mirrors in-plane only: give h, w or hw (rows, columns)"
        raise ValueError(f"--tta: {what}, got {tta!r}")
    return tuple(sorted(letters.index(ch) + 2 for ch in set(tta.lower())))


def _load_ensemble(refs: Sequence[str], device: torch.device) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
    """Load the models of an ensemble; all must share label set and preprocessing."""
    loaded = [load_segmentation_model(str(r), device=device) for r in refs]
    first_ref, (_, first) = refs[0], loaded[0]
    for ref, (_, exp) in zip(refs[1:], loaded[1:], strict=True):
        for what, get in (("label set", lambda e: (e["num_classes"], e["info"].get("label_names"))),
                          ("preprocessing", lambda e: PreprocessParams.from_dict(e["preprocessing"]))):
            if get(exp) != get(first):
                raise ValueError(f"--model: {ref} and {first_ref} differ in {what}: {get(exp)} vs {get(first)}")
    return [net for net, _ in loaded], [exp for _, exp in loaded]


def _largest_component_classes(refs: Sequence[str], exports: Sequence[dict[str, Any]]) -> list[int]:
    """Classes every model of the ensemble chose (on its validation set) to keep one component of."""
    chosen: set[int] | None = None
    for ref, exp in zip(refs, exports, strict=True):
        record = exp["info"].get("largest_component")
        if not isinstance(record, dict):
            raise ValueError(f"--largest-component: {ref} records no per-class choice (finetune it again)")
        classes = {int(c) for c, on in record.items() if on}
        chosen = classes if chosen is None else chosen & classes
    return sorted(chosen or ())


def _check_geometry(path: ImageFiles, vol: Any, params: PreprocessParams, said: set[str]) -> None:
    """Warn when an input's spacing is far from the training spacing (in-plane for slices, each axis for 3D);
    say once that slices smaller than the model's patch are padded."""
    file_zooms = np.linalg.norm(np.asarray(vol.geometry["affine"], dtype=float)[:3, :3], axis=0)  # the affine's
    canon = np.empty(3)
    canon[np.asarray(vol.geometry["ornt"])[:, 0].astype(int)] = file_zooms  # (x, y, z) after reorienting
    zooms = [float(canon[1]), float(canon[0])]  # params.spacing is (row = y, column = x), or (z, y, x)
    if params.volumetric:
        zooms.insert(0, float(canon[2]))
    if any(z / t > 2.0 or z / t < 0.5 for z, t in zip(zooms, params.spacing, strict=True)):
        log.warning("%s: spacing %s mm differs widely from the training spacing %s mm (resampled to it)",
                    first_file(path), [round(z, 3) for z in zooms], list(params.spacing))
    if params.volumetric:
        return
    nx, ny = vol.geometry["resampled_shape"]
    if (ny < params.size[0] or nx < params.size[1]) and "pad" not in said:
        said.add("pad")
        log.info("slices smaller than the model's patch %s are padded to it (first: %s)", list(params.size),
                 first_file(path))


def _save_probabilities(probs: np.ndarray, geometry: dict, source: Path, path: Path) -> None:
    """``(X, Y, Z, K)`` probabilities on the input's grid; 2 bytes a voxel (NIfTI has no float16:
    uint16 with ``scl_slope`` = 1/65535, read back as floats)."""
    maps = np.stack([original_grid(p, geometry) for p in probs], axis=-1)
    img = _on_input_grid(np.rint(np.clip(maps, 0, 1) * 65535).astype(np.uint16), source)
    img.header.set_slope_inter(1.0 / 65535, 0.0)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def _probabilities_path(mask_path: Path) -> Path:
    return mask_path.with_name(f"{nifti_stem(mask_path).removesuffix('_mask')}_probabilities.nii.gz")


def _on_input_grid(data: np.ndarray, source: Path) -> nib.Nifti1Image:
    """An image of ``data`` with the input file's exact header: qform, sform, their codes, pixdim.

    So every viewer (ITK-SNAP and SimpleITK read the qform, nibabel prefers the sform) puts it on
    the input's grid, even when the input's qform and sform disagree. Only shape, type and scaling
    are the mask's own.
    """
    header = nib.load(source).header.copy()  # the header as written (the file was validated already)
    img = nib.Nifti1Image(data, None, header=header)  # no affine: the header's qform / sform stay as they are
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _save_mask(mask: np.ndarray, source: Path, path: Path) -> None:
    img = _on_input_grid(mask.astype(np.uint8), source)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def predict(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch_size: int = 16,
    overlap: float = 0.5,
    tta: str | None = None,
    save_probabilities: bool = False,
    largest_component: bool = False,
) -> list[Path]:
    """Segment one NIfTI volume or every NIfTI file of a folder.

    Args:
        model: Finetuned ``model.pt`` path or MLflow URI, or several (an ensemble: their probabilities
            are averaged; label sets and preprocessing must agree).
        input: A ``.nii``/``.nii.gz`` file, a folder of them, or an nnU-Net dataset folder (or its
            ``imagesTs/``): one mask per case, its channel files stacked.
        output: A ``.nii.gz`` path (one input) or a folder (``<name>_mask.nii.gz`` per input).
        device: ``auto`` (cuda when available), ``cpu`` or ``cuda``.
        batch_size: Slices (2D) and windows per forward pass.
        overlap: Sliding-window overlap in ``[0, 1)`` (windows of the model's patch size).
        tta: Mirroring test-time augmentation: letters of the axes mirrored, ``"hw"`` (rows and columns), ``"h"``,
            ``"w"``; a 3D model also ``"d"`` (``"dhw"``: the eight mirrorings); ``"all"``: every axis of the
            model; ``None``: none.
        save_probabilities: Also write ``<name>_probabilities.nii.gz``: ``(X, Y, Z, K)`` softmax on
            the input's grid.
        largest_component: Keep the largest connected component of the classes the model(s) chose
            on their validation set (recorded in the export).

    Returns:
        The written mask files (uint8 labels; shape and affine of each input).

    Raises:
        ValueError: Missing input, no NIfTI files, two inputs with one mask name, a mask over an
            input, unusable model, a bad option, an ensemble that does not agree, or every input of
            a folder skipped; a bad volume among several is skipped with a one-line warning instead.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap: must be in [0, 1), got {overlap}")
    _mirror_axes(tta, 3)  # a bad --tta fails before any file is touched (the model's dimensionality is checked below)
    refs = [str(model)] if isinstance(model, (str, os.PathLike)) else [str(m) for m in model]
    if not refs:
        raise ValueError("--model: give at least one model")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    files, dsts, many = _plan_outputs(Path(input), Path(output))
    nets, exports = _load_ensemble(refs, dev)
    export = exports[0]
    lcc = _largest_component_classes(refs, exports) if largest_component else []
    params = PreprocessParams.from_dict(export["preprocessing"])
    window = {"roi_size": inference_roi(export), "overlap": overlap, "device": dev, "batch_size": batch_size,
              "mirror_axes": _mirror_axes(tta, export["model_config"].spatial_dims)}
    prep = preprocess_volume if params.volumetric else preprocess
    written, skipped, said = [], [], set()  # masks written; "file: reason" of inputs skipped; notes given once
    for f, dst in tqdm(list(zip(files, dsts, strict=True)), desc="predict", unit="vol", disable=len(files) < 2):
        try:
            vol = prep(f, params)
            _check_geometry(f, vol, params, said)
            if image_channels(vol) != export["model_config"].in_channels:
                raise ValueError(f"{first_file(f)}: {image_channels(vol)} channel(s), the model expects "
                                 f"{export['model_config'].in_channels}")
            probs = np.mean([predict_probabilities(net, vol.image, **window) for net in nets], axis=0)
            original = keep_largest_component(original_grid(probs.argmax(axis=0), vol.geometry), lcc)
        except ValueError as e:
            if not many:
                raise
            skipped.append(f"{first_file(f)}: {str(e).splitlines()[0]}")
            log.warning("skipped %s", skipped[-1])
            continue
        _save_mask(original, first_file(f), dst)
        if save_probabilities:
            _save_probabilities(probs, vol.geometry, first_file(f), _probabilities_path(dst))
        written.append(dst)
        log.info("%s -> %s", first_file(f), dst)
    if skipped and not written:
        raise ValueError(f"--input: all {len(skipped)} input(s) skipped, no mask written (first: {skipped[0]})")
    if skipped:
        log.warning("%d of %d input(s) skipped (reasons above)", len(skipped), len(files))
    return written
