"""3D Dice / HD95 in mm: closed-form cases, anisotropic spacing, explicit empty structures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from downstream.metrics import dice_score, summarize, volume_metrics


def _box(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int], value: int = 1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return a


def test_dice_closed_form() -> None:
    true = _box((4, 10, 10), (0, 0, 0), (4, 10, 4))  # 160 voxels
    pred = _box((4, 10, 10), (0, 0, 2), (4, 10, 6))  # 160 voxels, 80 shared
    m = volume_metrics(pred, true, spacing=(1.0, 1.0, 1.0), num_classes=2)
    assert m["dice"] == [pytest.approx(0.5)]
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0


def test_hd95_is_in_millimetres_along_the_shifted_axis() -> None:
    # the prediction is the truth shifted by 2 voxels along S (slices), spacing 5 mm there
    true = _box((12, 16, 16), (2, 4, 4), (6, 12, 12))
    pred = _box((12, 16, 16), (4, 4, 4), (8, 12, 12))
    aniso = volume_metrics(pred, true, spacing=(5.0, 0.7, 0.7), num_classes=2)["hd95"][0]
    iso = volume_metrics(pred, true, spacing=(1.0, 1.0, 1.0), num_classes=2)["hd95"][0]
    assert aniso == pytest.approx(10.0, abs=1e-3)
    assert iso == pytest.approx(2.0, abs=1e-3)


def test_empty_structures_are_explicit() -> None:
    empty = np.zeros((3, 8, 8), np.uint8)
    some = _box((3, 8, 8), (1, 2, 2), (2, 5, 5))
    both = volume_metrics(empty, empty, spacing=(2.0, 1.0, 1.0), num_classes=2)
    assert both == {"dice": [1.0], "hd95": [0.0], "empty": [1.0]}  # scored 1, and said to be empty
    missed = volume_metrics(empty, some, spacing=(2.0, 1.0, 1.0), num_classes=2)
    assert missed["dice"] == [0.0] and math.isnan(missed["hd95"][0])
    s = summarize([both, missed, volume_metrics(some, some, spacing=(2.0, 1.0, 1.0), num_classes=2)], "test_")
    assert s["test_dice"] == pytest.approx(2 / 3)
    assert s["test_dice_std"] == pytest.approx(np.std([1.0, 0.0, 1.0]))
    assert s["test_hd95"] == 0.0 and s["test_hd95_undefined"] == 1


def test_multiclass_and_bad_input() -> None:
    true = _box((2, 6, 6), (0, 0, 0), (2, 3, 6), 1) + _box((2, 6, 6), (0, 3, 0), (2, 6, 6), 2)
    pred = true.copy()
    pred[:, :, :3][pred[:, :, :3] == 2] = 1  # half of class 2 predicted as class 1
    m = volume_metrics(pred, true, spacing=(1.0, 1.0, 1.0), num_classes=3)
    assert m["dice"][0] == pytest.approx(2 * 36 / (54 + 36)) and m["dice"][1] == pytest.approx(2 * 18 / 54)
    with pytest.raises(ValueError, match="must be equal"):
        volume_metrics(pred[:1], true, spacing=(1.0, 1.0, 1.0), num_classes=3)
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(pred, true, spacing=(1.0, 0.0, 1.0), num_classes=3)


def test_normalised_surface_dice_tolerance_empty_cases_and_summary() -> None:
    true = _box((6, 20, 20), (1, 5, 5), (5, 15, 15))
    pred = _box((6, 20, 20), (1, 6, 5), (5, 16, 15))  # shifted one 1-mm voxel along H
    spacing = (3.0, 1.0, 1.0)
    tight = volume_metrics(pred, true, spacing=spacing, num_classes=2, nsd_tolerance=0.5)["nsd"][0]
    loose = volume_metrics(pred, true, spacing=spacing, num_classes=2, nsd_tolerance=1.5)["nsd"][0]
    assert 0.0 < tight < 1.0 and loose == pytest.approx(1.0)  # within 1.5 mm every surface voxel matches
    assert "nsd" not in volume_metrics(pred, true, spacing=spacing, num_classes=2)
    empty = np.zeros_like(true)
    assert volume_metrics(empty, empty, spacing=spacing, num_classes=2, nsd_tolerance=1.0)["nsd"] == [1.0]
    assert volume_metrics(empty, true, spacing=spacing, num_classes=2, nsd_tolerance=1.0)["nsd"] == [0.0]
    two = true + _box((6, 20, 20), (1, 16, 16), (3, 19, 19), value=2)
    per = [volume_metrics(two, two, spacing=spacing, num_classes=3, nsd_tolerance=1.0),
           volume_metrics(empty, two, spacing=spacing, num_classes=3, nsd_tolerance=1.0)]
    s = summarize(per, "test_")
    assert s["test_nsd"] == pytest.approx(0.5) and s["test_nsd_c1"] == pytest.approx(0.5)
    assert s["test_nsd_c2"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nsd_tolerance"):
        volume_metrics(pred, true, spacing=spacing, num_classes=2, nsd_tolerance=0.0)
