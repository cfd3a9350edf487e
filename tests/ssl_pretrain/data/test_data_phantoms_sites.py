"""Multi-site phantoms: each site looks the way its protocol says, artefacts where the physics puts them."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from downstream.data import open_labeled
from ssl_pretrain.data import phantoms
from ssl_pretrain.data.phantoms import SITES, make_cohort

LIVER = {s.protocol: s for s in SITES["liver"]}


def _medians(kind: str, site: phantoms.Site, index: int, tissues: dict[str, int]) -> dict[str, float]:
    img, _, _, tissue, _ = phantoms._generate(kind, 0, index, site)
    return {name: float(np.median(img[tissue == t])) for name, t in tissues.items()}


@pytest.mark.parametrize("index", [0, 1])
def test_tissue_contrast_ordering_follows_protocol(index: int) -> None:
    tissues = {"fat": phantoms._FAT, "liver": phantoms._LIVER, "spleen": phantoms._SPLEEN}
    t2 = _medians("liver", LIVER["T2w"], index, tissues)
    t1 = _medians("liver", LIVER["T1w-in"], index, tissues)
    fs = _medians("liver", LIVER["T2w-FS"], index, tissues)
    assert t2["fat"] > t2["spleen"] > t2["liver"]  # T2w: spleen brighter than liver
    assert t1["fat"] > t1["liver"] > t1["spleen"]  # T1w: the order of liver and spleen flips
    assert fs["fat"] < fs["liver"] < fs["spleen"]  # fat suppression: fat darkest of the three


def test_prostate_zones_by_protocol() -> None:
    tissues = {"pz": phantoms._PZ, "tz": phantoms._TZ, "bladder": phantoms._BLADDER}
    t2, adc, t1 = (_medians("prostate", s, 0, tissues) for s in (SITES["prostate"][0], SITES["prostate"][2],
                                                                   SITES["prostate"][3]))
    assert t2["bladder"] > t2["pz"] > t2["tz"] and adc["bladder"] > adc["pz"] > adc["tz"]
    assert t1["bladder"] < t1["tz"]  # urine is dark on T1w


def _air_noise_over_liver(site: phantoms.Site) -> float:
    img, _, _, tissue, _ = phantoms._generate("liver", 0, 0, site)
    corners = np.zeros(tissue.shape, dtype=bool)
    for sx in (slice(0, 25), slice(-25, None)):
        for sy in (slice(0, 25), slice(-25, None)):
            corners[sx, sy] = True
    air = corners & (tissue == phantoms._AIR)
    assert air.sum() > 10_000
    return float(img[air].mean() / np.median(img[tissue == phantoms._LIVER]))


def test_noise_follows_field_strength() -> None:
    base = replace(LIVER["T2w"], ghost=0.0)
    low, high = (_air_noise_over_liver(replace(base, field_strength=b0)) for b0 in (1.5, 3.0))
    # Rician noise in air has mean σ·sqrt(π/2); σ ∝ 1 / B0, so about half at 3 T
    assert 0.35 < high / low < 0.7, (low, high)


@pytest.mark.parametrize("phase_axis", [0, 1])
def test_motion_ghosts_along_phase_axis_only(phase_axis: int) -> None:
    img = np.zeros((64, 64, 2), dtype=np.float32)
    img[24:40, 20:36] = 1.0
    rng = np.random.default_rng(0)
    clean = np.abs(phantoms._kspace_artefacts(img, phase_axis, 1.0, 0.0, 8.0, rng))
    ghosted = np.abs(phantoms._kspace_artefacts(img, phase_axis, 1.0, 0.6, 8.0, rng))
    np.testing.assert_allclose(clean, img, atol=1e-5)  # full k-space, no motion: the object itself
    diff = np.abs(ghosted - img)
    # lines that cross the object along the phase axis carry its ghosts; all others stay empty
    if phase_axis == 1:
        inside_lines, other_lines = diff[24:40], np.concatenate([diff[:24], diff[40:]])
        ghost_region = diff[24:40, 36:44]  # first ghost: 64 / 8 lines away
    else:
        inside_lines, other_lines = diff[:, 20:36], np.concatenate([diff[:, :20], diff[:, 36:]], axis=1)
        ghost_region = diff[40:48, 20:36]
    assert other_lines.max() < 1e-5
    assert inside_lines.max() > 0.1 and ghost_region.max() > 0.1  # copies outside the object, same lines


def test_gibbs_ringing_from_truncated_kspace() -> None:
    img = np.zeros((64, 64, 1), dtype=np.float32)
    img[16:48, 16:48] = 1.0
    ringing = np.abs(phantoms._kspace_artefacts(img, 1, 0.5, 0.0, 8.0, np.random.default_rng(0)))
    assert ringing.max() > 1.05  # overshoot at the edge
    assert ringing[16:48, 4:12].max() > 0.02  # ripples outside the object


def test_wrap_around_folds_the_phase_axis() -> None:
    a = np.arange(5 * 7 * 2, dtype=np.float32).reshape(5, 7, 2)
    folded = phantoms._fold(a, 1, 4)
    assert folded.shape == (5, 4, 2) and np.isclose(folded.sum(), a.sum())
    # start = 1: line 0 → 3, lines 1..4 → 0..3, lines 5, 6 → 0, 1
    np.testing.assert_array_equal(folded[:, 0], a[:, 1] + a[:, 5])
    np.testing.assert_array_equal(folded[:, 3], a[:, 4] + a[:, 0])
    site = LIVER["T1w-opposed"]
    img, label, affine, tissue, _ = phantoms._generate("liver", 0, 1, site)
    assert img.shape == label.shape == tissue.shape and img.shape[1] == round(site.phase_fov / abs(affine[0, 0]))
    full = phantoms._generate("liver", 0, 1, replace(site, phase_fov=None))
    start = (full[0].shape[1] - img.shape[1]) // 2
    np.testing.assert_array_equal(label, full[1][:, start:start + img.shape[1]])  # labels are cropped, not folded
    np.testing.assert_allclose(affine[:3, 3], full[2][:3, :3] @ [0, start, 0] + full[2][:3, 3])


def test_lesions_lie_inside_the_organ_label() -> None:
    found = set()
    for index in range(6):
        _, label, _, tissue, pathology = phantoms._generate("liver", 0, index, LIVER["DWI-b800"])
        found.update(pathology.split("+"))
        lesion = np.isin(tissue, (phantoms._METS, phantoms._CYST, phantoms._DUCT, phantoms._PORTAL))
        assert lesion.any() and (label[lesion] == 1).all()
    assert {"metastases", "cysts"} <= found
    for index in range(6):
        _, label, _, tissue, pathology = phantoms._generate("prostate", 0, index, SITES["prostate"][2])
        found.update(pathology.split("+"))
        assert (label[np.isin(tissue, (phantoms._BPH_STROMA, phantoms._BPH_GLAND))] == 2).all()
        assert (label[tissue == phantoms._NODULE] == 1).all()
    assert {"BPH", "nodule"} <= found


def test_multi_site_cohort_attributes_round_trip_and_same_bytes(tmp_path: Path) -> None:
    root = make_cohort("liver", 3, tmp_path / "a", seed=5, sites=3, site_of=[2, 0, 2])
    ids = [s.id for s in open_labeled(root).subjects]
    with open(root / "subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ids == ["liver_s5_000", "liver_s5_001", "liver_s5_002"]
    assert [r["site"] for r in rows] == ["site-3", "site-1", "site-3"]
    assert [r["protocol"] for r in rows] == ["T1w-opposed", "T2w", "T1w-opposed"]
    assert {r["field_strength"] for r in rows} == {"3.0", "1.5"} and all(r["vendor"] and r["pathology"] for r in rows)
    entries = json.loads((root / "dataset.json").read_text())["training"]
    for e, r in zip(entries, rows, strict=True):
        assert {k: str(v) for k, v in e.items() if k not in ("image", "label")} == {
            k: v for k, v in r.items() if k != "subject"}
    assert entries[0]["field_strength"] == 3.0
    again = make_cohort("liver", 3, tmp_path / "b", seed=5, sites=3, site_of=[2, 0, 2])
    for name in ("imagesTr/liver_s5_000.nii.gz", "labelsTr/liver_s5_001.nii.gz", "subjects.csv", "dataset.json"):
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    other = np.asanyarray(nib.load(make_cohort("liver", 1, tmp_path / "c", seed=6, sites=3)
                                   / "imagesTr" / "liver_s6_000.nii.gz").dataobj)
    first = np.asanyarray(nib.load(root / "imagesTr" / "liver_s5_000.nii.gz").dataobj)
    assert other.shape != first.shape or not np.array_equal(other, first)


def test_single_site_cohort_keeps_its_protocol_and_attributes(tmp_path: Path) -> None:
    root = make_cohort("prostate", 1, tmp_path / "p")
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T2", "1": "ADC"}
    assert meta["training"][0]["site"] == "site-1" and meta["training"][0]["protocol"] == "T2w+ADC"
    assert (root / "subjects.csv").read_text() == "subject,site,protocol\nprostate_s0_000,site-1,T2w+ADC\n"
    multi = json.loads((make_cohort("prostate", 1, tmp_path / "m", sites=2) / "dataset.json").read_text())
    assert multi["modality"] == {"0": "MR"} and multi["tensorImageSize"] == "3D"


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": 7}, "sites: 7 must be an integer from 1 to 6"),
    ({"sites": 2, "site_of": [0, 2]}, "site_of: needs 2 site indices in 0..1"),
    ({"sites": 2, "site_of": [0]}, "site_of: needs 2 site indices"),
])
def test_bad_sites(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make_cohort("liver", 2, tmp_path, **kwargs)
