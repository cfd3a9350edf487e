"""Inference: a finetuned model on new NIfTI volumes, masks written on the input's original grid.

The finetuned ``model.pt`` holds the architecture, the weights (encoder, decoder, head), the
number of classes and the preprocessing parameters, so nothing else is needed: every input goes
through the same :func:`~ssl_pretrain.data.preprocess.preprocess` as training did (whole slices,
padded only), every slice is segmented whole by Gaussian-weighted sliding windows of the training
patch size (:func:`predict_probabilities`), and :func:`~ssl_pretrain.data.preprocess.to_original_grid`
undoes padding, in-plane resampling and reorientation, so the mask has the input's shape, affine and
orientation and nothing outside a patch is dropped.

Example:
    >>> predict("runs/ft/model.pt", "case_001.nii.gz", "case_001_mask.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from downstream.mlflow_uri import resolve_model_file
from ssl_pretrain.data.preprocess import PreprocessParams, load_nifti, preprocess, to_original_grid
from ssl_pretrain.export import build_unet, load_export
from ssl_pretrain.fileio import atomic_path
from ssl_pretrain.models.unet import UNet

log = logging.getLogger(__name__)

__all__ = ["predict_probabilities", "predict_slices", "load_segmentation_model", "predict"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


_MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))  # none, W, H, both (of B, K, H, W)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    roi_size: tuple[int, int] | list[int],
    overlap: float = 0.5,
    mirror: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Class probabilities of every pixel of a preprocessed volume, whole slices at any size.

    Each slice is segmented by MONAI's Gaussian-weighted ``sliding_window_inference`` with windows
    of the training patch size, so a slice larger than a patch is covered completely.

    Args:
        model: Segmentation network mapping ``(B, C, h, w)`` to ``(B, K, h, w)`` logits.
        image: ``(S, C, H, W)`` float32 slices (``H``, ``W`` at least ``roi_size``, else padded).
        roi_size: Window ``(h, w)``: the patch size the model was trained on.
        overlap: Fraction of a window shared with its neighbours, in ``[0, 1)``.
        mirror: Test-time augmentation: average over the four in-plane mirrorings (each flipped back).
        device: Where the model runs.
        batch_size: Slices (and windows) per forward pass.

    Returns:
        ``(S, K, H, W)`` float32 softmax probabilities.
    """
    from monai.inferers import sliding_window_inference

    was_training = model.training
    model.eval()
    flips = _MIRROR_AXES if mirror else _MIRROR_AXES[:1]
    out = []
    for i in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size])).to(device)
        acc = None
        for axes in flips:
            xi = x.flip(axes) if axes else x
            logits = sliding_window_inference(
                xi, roi_size=tuple(roi_size), sw_batch_size=batch_size, predictor=model, overlap=overlap,
                mode="gaussian",
            )
            p = torch.softmax(torch.as_tensor(logits).float(), dim=1)
            p = p.flip(axes) if axes else p
            acc = p if acc is None else acc + p
        out.append((acc / len(flips)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out, axis=0)


def predict_slices(model: torch.nn.Module, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``(S, H, W)`` uint8 label map: argmax of :func:`predict_probabilities` (same arguments)."""
    return predict_probabilities(model, image, **kwargs).argmax(axis=1).astype(np.uint8)


def load_segmentation_model(ref: str, *, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Load a finetuned model from a ``model.pt`` path or an MLflow URI.

    Args:
        ref: Path, ``runs:/…`` or ``models:/<name>@<alias>``.
        device: Where to put the model.

    Returns:
        ``(model in eval mode, export dict)``.

    Raises:
        ValueError: The reference does not resolve, or the export has no segmentation head.
    """
    path = resolve_model_file(ref, key="--model")
    export = load_export(path)
    model, _ = build_unet(export, int(export["num_classes"] or 0), source=str(path), strict=True)
    return model.to(device).eval(), export


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(_NIFTI_SUFFIXES)


def _output_path(src: Path, output: Path, many: bool) -> Path:
    if not many and _is_nifti(output):
        return output
    name = src.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return output / f"{stem}_mask.nii.gz"


def _output_folder(folder: Path) -> None:
    """Create the folder the masks go to, or say in one line why it cannot be."""
    bad = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise ValueError(f"--output: {bad} is a file; the masks need a folder {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output: cannot create the folder {folder} ({e.strerror})") from None


def _save_mask(mask: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    img = nib.Nifti1Image(mask.astype(np.uint8), reference.affine)
    img.set_qform(reference.affine, code=1)
    img.set_sform(reference.affine, code=1)
    img.set_data_dtype(np.uint8)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def predict(
    model: str | os.PathLike[str],
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    device: str = "auto",
    batch_size: int = 16,
    overlap: float = 0.5,
) -> list[Path]:
    """Segment one NIfTI volume or every NIfTI file of a folder.

    Args:
        model: Finetuned ``model.pt`` path or MLflow URI.
        input: A ``.nii``/``.nii.gz`` file or a folder of them.
        output: A ``.nii.gz`` path (one input) or a folder (``<name>_mask.nii.gz`` per input).
        device: ``auto`` (cuda when available), ``cpu`` or ``cuda``.
        batch_size: Slices per forward pass.
        overlap: Sliding-window overlap in ``[0, 1)`` (windows of the model's patch size).

    Returns:
        The written mask files (uint8 labels; shape and affine of each input).

    Raises:
        ValueError: Missing input, no NIfTI files, unusable model; a bad volume among several is
            skipped with a one-line warning instead.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap: must be in [0, 1), got {overlap}")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    src, out = Path(input), Path(output)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if _is_nifti(p) and not p.name.startswith("."))
        if not files:
            raise ValueError(f"--input: {src} holds no .nii / .nii.gz files")
    elif src.is_file():
        files = [src]
    else:
        raise ValueError(f"--input: {src} does not exist")
    many = src.is_dir()
    _output_folder(out if many or not _is_nifti(out) else out.parent)
    net, export = load_segmentation_model(str(model), device=dev)
    params = PreprocessParams.from_dict(export["preprocessing"])
    written: list[Path] = []
    for f in tqdm(files, desc="predict", unit="vol", disable=len(files) < 2):
        try:
            vol = preprocess(f, params)
            if vol.image.shape[1] != export["model_config"].in_channels:
                raise ValueError(
                    f"{f}: {vol.image.shape[1]} channel(s), the model expects "
                    f"{export['model_config'].in_channels}"
                )
            mask = predict_slices(net, vol.image, roi_size=params.size, overlap=overlap, device=dev,
                                  batch_size=batch_size)
            original = to_original_grid(mask, vol.geometry)
        except ValueError as e:
            if not many:
                raise
            log.warning("skipped %s: %s", f, str(e).splitlines()[0])
            continue
        dst = _output_path(f, out, many)
        _save_mask(original, load_nifti(f), dst)
        written.append(dst)
        log.info("%s -> %s", f, dst)
    return written
