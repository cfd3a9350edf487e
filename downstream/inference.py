"""Inference shared by finetuning's evaluation, the sweep and ``predict.py``: one place for each step.

* :func:`load_init` / :func:`load_segmentation_model`: an ``init`` (export path or MLflow URI) or a
  finetuned model, through :func:`ssl_pretrain.export.build_unet`.
* :func:`predict_probabilities` / :func:`predict_labels`: Gaussian-weighted sliding windows (MONAI)
  over whole slices (2D) or whole volumes (3D), with mirroring test-time augmentation;
  :func:`original_grid` maps a prediction back onto the input file's own grid.
* :func:`keep_largest_component` / :func:`choose_largest_component`: post-processing, chosen per
  class on validation (nnU-Net's rule).
* :func:`evaluate` (validation Dice on the preprocessed grid) and :func:`evaluate_test` (test
  metrics of predictions mapped back to each file's own grid, made exactly as ``predict.py`` makes
  them).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downstream.data import PreparedData
from downstream.metrics import dice_score, volume_metrics
from downstream.model_refs import local_model_file, resolve_model_file
from ssl_pretrain.data.preprocess import Volume, load_nifti, to_original_grid
from ssl_pretrain.data.volumes import VolumeSample, volume_to_original_grid
from ssl_pretrain.export import ExportError, build_unet, load_export
from ssl_pretrain.nnunet import load_init_file

__all__ = [
    "choose_largest_component", "evaluate", "evaluate_test", "image_channels", "inference_roi",
    "keep_largest_component", "load_init", "load_segmentation_model", "mirror_axes", "original_grid", "original_label",
    "predict_labels", "predict_probabilities",
]


def load_init(init: str, download_dir: Path | None = None, *, trust: bool = False
              ) -> tuple[dict[str, Any] | None, str]:
    """Load the export an ``init`` names (an nnU-Net / nnssl checkpoint as one: :mod:`ssl_pretrain.nnunet`).

    Args:
        init: ``random``, a path to an export or to an nnU-Net / nnssl checkpoint, or an MLflow URI.
        download_dir: Where MLflow artifacts go.
        trust: Load a checkpoint that is more than tensors and plain values (a full pickle).

    Returns:
        ``(export dict or None for random, local path or "random")``.

    Raises:
        ValueError: The file does not exist, is not a compatible export or checkpoint, is an untrusted
            pickle, or the URI does not resolve.
    """
    if init == "random":
        return None, "random"
    path = resolve_model_file(init, download_dir, key="init")
    try:
        return load_init_file(path, trust=trust), str(path)
    except ExportError as e:
        raise ExportError(f"init: {e}") from None


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    roi_size: tuple[int, ...] | list[int],
    overlap: float = 0.5,
    mirror_axes: tuple[int, ...] = (),
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Class probabilities of every voxel of a preprocessed volume: slices at any size, or a whole 3D volume.

    MONAI's Gaussian-weighted ``sliding_window_inference`` with windows of the training patch size covers
    every slice (2D, ``roi_size`` of two) or the whole volume (3D, ``roi_size`` of three) completely;
    an image smaller than a window is padded and cropped back.

    Args:
        model: Segmentation network mapping ``(B, C, *roi)`` to ``(B, K, *roi)`` logits.
        image: ``(S, C, H, W)`` float32 slices (2D) or a ``(C, D, H, W)`` volume (3D).
        roi_size: Window ``(h, w)`` or ``(d, h, w)``: the patch size the model was trained on.
        overlap: Fraction of a window shared with its neighbours, in ``[0, 1)``.
        mirror_axes: Test-time augmentation: the probabilities are averaged over every combination of
            mirrorings along these axes of the network input ``(B, C, *spatial)`` (``(2, 3)``: the four
            in-plane ones of slices; ``(2, 3, 4)``: the eight of a volume), each flipped back; ``()``
            for none.
        device: Where the model runs.
        batch_size: Slices (2D) and windows per forward pass.

    Returns:
        ``(K, S, H, W)`` or ``(K, D, H, W)`` float32 softmax probabilities: classes first, then the
        grid of the preprocessed volume.
    """
    from monai.inferers import sliding_window_inference

    volume = len(roi_size) == 3
    batch = image[None] if volume else image  # (B, C, *spatial)
    was_training = model.training
    model.eval()
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    out = []
    for i in range(0, batch.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch[i : i + batch_size])).to(device)
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
    probs = np.concatenate(out, axis=0)
    return probs[0] if volume else np.ascontiguousarray(probs.transpose(1, 0, 2, 3))


def predict_labels(model: torch.nn.Module, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``(S, H, W)`` or ``(D, H, W)`` uint8 label map: argmax of :func:`predict_probabilities` (same arguments)."""
    return predict_probabilities(model, image, **kwargs).argmax(axis=0).astype(np.uint8)


def original_grid(mask: np.ndarray, geometry: dict) -> np.ndarray:
    """A map on the preprocessed grid (slices or a cropped volume) back on the input file's own voxel grid."""
    if geometry.get("layout") == "volume":
        return volume_to_original_grid(mask, geometry)
    return to_original_grid(mask, geometry)


def image_channels(vol: Volume | VolumeSample) -> int:
    """Channels of a preprocessed volume: ``(S, C, H, W)`` slices or a ``(C, D, H, W)`` volume."""
    return int(vol.image.shape[0] if isinstance(vol, VolumeSample) else vol.image.shape[1])


def mirror_axes(spatial_dims: int) -> tuple[int, ...]:
    """Every spatial axis of the network input ``(B, C, *spatial)``: mirroring TTA as nnU-Net does it."""
    return tuple(range(2, 2 + spatial_dims))


def load_segmentation_model(ref: str, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a finetuned model from a ``model.pt`` path or an MLflow URI.

    Args:
        ref: Path, ``runs:/…`` or ``models:/<name>@<alias>``.
        device: Where to put the model.

    Returns:
        ``(model in eval mode, export dict)``.

    Raises:
        ValueError: The reference does not resolve, or the export has no segmentation head.
    """
    with local_model_file(ref, key="--model") as path:  # MLflow downloads are removed once loaded
        export = load_export(path)
        model, _ = build_unet(export, int(export["num_classes"] or 0), source=ref, strict=True)
    return model.to(device).eval(), export


def inference_roi(export: dict[str, Any]) -> tuple[int, ...]:
    """The sliding window of a finetuned model: its training patch (3D: recorded in the export's ``info``;
    2D: the preprocessing's slice size)."""
    if export["model_config"].spatial_dims == 3:
        return tuple(int(n) for n in export["info"]["patch_size"])
    return tuple(int(n) for n in export["preprocessing"]["size"])


def keep_largest_component(mask: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep only the largest 3D connected component of each class in ``classes`` (others: background).

    Args:
        mask: Integer label map, any 3D grid.
        classes: Label values to clean; other labels are left as they are.

    Returns:
        A cleaned copy.
    """
    from scipy import ndimage

    out = mask.copy()
    for c in classes:
        comp, n = ndimage.label(mask == c, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            largest = int(np.bincount(comp.ravel())[1:].argmax()) + 1
            out[(comp > 0) & (comp != largest)] = 0
    return out


def choose_largest_component(
    preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int
) -> dict[str, bool]:
    """Per class, whether keeping its largest component raises mean validation Dice (nnU-Net's rule).

    Returns:
        ``{"1": True, ...}`` for every foreground class (JSON-able, recorded in the model's export).
    """
    choice: dict[str, bool] = {}
    for c in range(1, num_classes):
        base = np.mean([dice_score(p == c, t == c) for p, t in zip(preds, labels, strict=True)])
        post = np.mean([dice_score(keep_largest_component(p, [c]) == c, t == c)
                        for p, t in zip(preds, labels, strict=True)])
        choice[str(c)] = bool(post > base)
    return choice


def evaluate(
    model: torch.nn.Module,
    volumes: dict[str, Volume | VolumeSample],
    num_classes: int,
    device: torch.device,
    *,
    roi_size: tuple[int, ...],
    overlap: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean foreground Dice of every volume on its preprocessed grid (validation, model selection).

    Returns:
        ``({id: Dice}, {id: prediction (S, H, W) or (D, H, W)})``.
    """
    per: dict[str, float] = {}
    preds: dict[str, np.ndarray] = {}
    for sid, vol in volumes.items():
        pred = predict_labels(model, vol.image, roi_size=roi_size, overlap=overlap, device=device)
        preds[sid] = pred
        per[sid] = float(np.mean([dice_score(pred == c, vol.label == c) for c in range(1, num_classes)]))
    return per, preds


def original_label(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The label map of a subject on its file's own voxel grid, with that grid's spacing in mm."""
    img = load_nifti(path, kind="label")
    lab = np.asanyarray(img.dataobj)
    lab = lab[..., 0] if lab.ndim == 4 else lab
    return np.rint(lab).astype(np.uint8), tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_test(
    model: torch.nn.Module,
    data: PreparedData,
    ids: tuple[str, ...],
    device: torch.device,
    *,
    roi_size: tuple[int, ...],
    overlap: float,
    mirror_axes: tuple[int, ...] = (),
    largest_component: list[int] | tuple[int, ...] = (),
    nsd_tolerance: float | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Volume], dict[str, np.ndarray]]:
    """3D Dice / HD95 of whole-volume predictions mapped back to each file's grid, against its label file.

    Nothing is cropped away: a structure anywhere in the field of view counts. The prediction is
    made exactly as ``predict.py`` makes it (mirroring TTA and largest-component classes included).

    Returns:
        ``({id: {"dice": [...], "hd95": [...]}}, {id: preprocessed volume}, {id: prediction on it})``.
    """
    by_id = {s.id: s for s in data.dataset.subjects}
    vols = data.volumes(ids)
    per: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, np.ndarray] = {}
    for sid, vol in vols.items():
        preds[sid] = predict_labels(model, vol.image, roi_size=roi_size, overlap=overlap, mirror_axes=mirror_axes,
                                    device=device)
        truth, spacing = original_label(by_id[sid].label)
        pred = keep_largest_component(original_grid(preds[sid], vol.geometry), largest_component)
        per[sid] = volume_metrics(pred, truth, spacing=spacing, num_classes=data.dataset.num_classes,
                                  nsd_tolerance=nsd_tolerance)
    return per, vols, preds
