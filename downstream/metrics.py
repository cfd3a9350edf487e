"""Per-volume 3D segmentation metrics: Dice, HD95 (millimetres) and normalised surface Dice per class.

Metrics are computed on the volume reassembled from slice predictions, ``(S, H, W)`` integer label
maps, with the voxel spacing of those three axes, so HD95 is in millimetres even for anisotropic
volumes. The surface distances come from MONAI (``compute_hausdorff_distance``,
``compute_surface_dice``: the share of both surfaces within ``nsd_tolerance`` mm of the other).

Empty structures are handled explicitly, not left to ``nan`` propagation:

==========================  =======  ==========================================================
prediction / truth          Dice     HD95
==========================  =======  ==========================================================
both empty                  1.0      0.0 (nothing to find, nothing found); NSD 1.0
one empty, the other not    0.0      ``nan`` (undefined); counted in ``hd95_undefined``; NSD 0.0
both non-empty              usual    usual (95th percentile of symmetric surface distances)
==========================  =======  ==========================================================

:func:`summarize` reports mean ± std over volumes; HD95 means skip undefined values and say how many.

Example:
    >>> pred = np.zeros((4, 8, 8), np.uint8); pred[1:3, 2:6, 2:6] = 1
    >>> volume_metrics(pred, pred, spacing=(3.0, 1.0, 1.0), num_classes=2)["dice"]
    [1.0]
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["volume_metrics", "summarize", "dice_score"]


def dice_score(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; 1.0 when both are empty."""
    p, t = pred.astype(bool), true.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def _hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two non-empty boolean masks ``(S, H, W)`` with per-axis ``spacing``."""
    from monai.metrics import compute_hausdorff_distance

    # MONAI wants one-hot (B, C, *spatial); a single foreground channel with include_background.
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(true[None, None].astype(np.float32))
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return float(hd.reshape(-1)[0])


def _nsd(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """Normalised surface Dice of two non-empty boolean masks at ``tolerance`` mm."""
    from monai.metrics import compute_surface_dice

    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(true[None, None].astype(np.float32))
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        nsd = compute_surface_dice(
            y_pred, y, [float(tolerance)], include_background=True, spacing=[float(s) for s in spacing]
        )
    return float(nsd.reshape(-1)[0])


def volume_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    spacing: Sequence[float],
    num_classes: int,
    nsd_tolerance: float | None = None,
) -> dict[str, list[float]]:
    """Dice, HD95 and (with ``nsd_tolerance``) normalised surface Dice for every foreground class.

    Args:
        pred: Predicted labels ``(S, H, W)``, integers in ``[0, num_classes)``.
        true: Reference labels ``(S, H, W)``.
        spacing: Voxel size in mm along ``(S, H, W)``.
        num_classes: Classes including background; metrics are reported for ``1 .. num_classes-1``.
        nsd_tolerance: Tolerance in mm of the normalised surface Dice; ``None`` leaves it out.

    Returns:
        ``{"dice": [per class], "hd95": [per class, nan where undefined], "empty": [1.0 where the
        class is absent from both prediction and label: its Dice 1 and HD95 0 say so], "nsd": [per
        class]}`` (``nsd`` only with ``nsd_tolerance``).

    Raises:
        ValueError: Shapes differ or the spacing does not have three positive values.
    """
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and label {true.shape} must be equal (S, H, W) shapes")
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive values in mm, got {tuple(spacing)}")
    if nsd_tolerance is not None and nsd_tolerance <= 0:
        raise ValueError(f"nsd_tolerance: must be > 0 mm, got {nsd_tolerance}")
    dice: list[float] = []
    hd95: list[float] = []
    nsd: list[float] = []
    empty: list[float] = []
    for c in range(1, num_classes):
        p, t = pred == c, true == c
        dice.append(dice_score(p, t))
        empty.append(float(not p.any() and not t.any()))
        if empty[-1]:
            hd95.append(0.0)
            nsd.append(1.0)
        elif not p.any() or not t.any():
            hd95.append(float("nan"))
            nsd.append(0.0)
        else:
            hd95.append(_hd95(p, t, spacing))
            nsd.append(_nsd(p, t, spacing, nsd_tolerance) if nsd_tolerance is not None else float("nan"))
    out = {"dice": dice, "hd95": hd95, "empty": empty}
    if nsd_tolerance is not None:
        out["nsd"] = nsd
    return out


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan"), len(values)
    arr = np.asarray(finite, dtype=np.float64)
    return float(arr.mean()), float(arr.std()), len(values) - len(finite)


def summarize(per_volume: list[dict[str, list[float]]], prefix: str = "") -> dict[str, Any]:
    """Mean ± std over volumes, per class and averaged over foreground classes.

    Args:
        per_volume: Outputs of :func:`volume_metrics`, one per volume.
        prefix: Prepended to every key (e.g. ``"test_"``).

    Returns:
        Flat dict: ``dice`` / ``dice_std`` (mean over classes, then mean / std over volumes),
        ``dice_empty_both`` (how many (volume, class) pairs were empty in both and scored 1),
        ``hd95`` / ``hd95_std`` / ``hd95_undefined`` likewise, ``nsd`` / ``nsd_std`` when the
        volumes have it, and ``dice_c{k}`` / ``hd95_c{k}`` (/ ``nsd_c{k}``) per class ``k``.
    """
    if not per_volume:
        return {}
    n_cls = len(per_volume[0]["dice"])
    out: dict[str, Any] = {}
    vol_dice = [float(np.mean(v["dice"])) for v in per_volume]
    vol_hd = [float(np.mean(v["hd95"])) for v in per_volume]  # nan if any class is undefined
    out["dice"], out["dice_std"], _ = _mean_std(vol_dice)
    # (volume, class) pairs absent from both prediction and label: they enter the means as Dice 1
    out["dice_empty_both"] = int(sum(sum(v.get("empty", ())) for v in per_volume))
    out["hd95"], out["hd95_std"], out["hd95_undefined"] = _mean_std(vol_hd)
    has_nsd = all("nsd" in v for v in per_volume)
    if has_nsd:
        out["nsd"], out["nsd_std"], _ = _mean_std([float(np.mean(v["nsd"])) for v in per_volume])
    for k in range(n_cls):
        out[f"dice_c{k + 1}"], _, _ = _mean_std([v["dice"][k] for v in per_volume])
        out[f"hd95_c{k + 1}"], _, _ = _mean_std([v["hd95"][k] for v in per_volume])
        if has_nsd:
            out[f"nsd_c{k + 1}"], _, _ = _mean_std([v["nsd"][k] for v in per_volume])
    return {prefix + k: v for k, v in out.items()}
