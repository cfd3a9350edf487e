"""Every bad input of issue 2: one line naming the file; skipped, recorded; --strict fails."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import TINY, blob_volume, lps_affine, save, write_msd

from ssl_pretrain.data.ingest import discover, is_nifti_name, nifti_stem, parse_msd_labels
from ssl_pretrain.data.preprocess import LABEL_AFFINE_ATOL, InputError, load_nifti, preprocess
from ssl_pretrain.data.shards import write_shards


def _good(tmp_path: Path, name: str = "good.nii.gz") -> Path:
    return save(tmp_path / name, blob_volume(1, 5)[0])


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_truncated_gzip(tmp_path: Path) -> None:
    p = _good(tmp_path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert nib.load(p).shape == (24, 20, 5)  # the header alone still loads
    with pytest.raises(InputError, match="corrupt or truncated gzip") as exc:
        load_nifti(p)
    _one_line(exc, p)


def test_not_nifti(tmp_path: Path) -> None:
    p = tmp_path / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"hello, this is not an image" * 20))
    with pytest.raises(InputError, match="not a NIfTI") as exc:
        load_nifti(p)
    _one_line(exc, p)
    q = tmp_path / "plain.nii"
    q.write_text("x" * 400)
    with pytest.raises(InputError, match="not a NIfTI"):
        load_nifti(q)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="empty file") as exc:
        load_nifti(p)
    _one_line(exc, p)


def test_2d_image(tmp_path: Path) -> None:
    p = save(tmp_path / "flat.nii.gz", np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
    with pytest.raises(InputError, match="2D image") as exc:
        load_nifti(p)
    _one_line(exc, p)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(tmp_path: Path, bad: float) -> None:
    img = blob_volume(2, 5)[0].astype(np.float32)
    img[3, 4, 2] = bad
    p = save(tmp_path / "nan.nii.gz", img)
    with pytest.raises(InputError, match="NaN or Inf") as exc:
        load_nifti(p)
    _one_line(exc, p)


def test_constant_volume(tmp_path: Path) -> None:
    p = save(tmp_path / "const.nii.gz", np.full((8, 8, 4), 7, dtype=np.int16))
    with pytest.raises(InputError, match="constant") as exc:
        load_nifti(p)
    _one_line(exc, p)
    lab = save(tmp_path / "empty_label.nii.gz", np.zeros((8, 8, 4), dtype=np.uint8))
    load_nifti(lab, kind="label")  # an empty label map is legitimate


def test_label_shape_mismatch(tmp_path: Path) -> None:
    img = _good(tmp_path)
    lab = save(tmp_path / "lab.nii.gz", np.zeros((24, 20, 4), dtype=np.uint8))
    with pytest.raises(InputError, match=r"label shape \(24, 20, 4\) differs") as exc:
        preprocess(img, TINY, lab)
    _one_line(exc, lab)


def test_label_affine_beyond_tolerance_is_rejected(tmp_path: Path) -> None:
    img = _good(tmp_path)
    label = blob_volume(1, 5)[1]
    shifted = lps_affine()
    shifted[:3, 3] += 2.0  # the label marks voxels 2 mm away from what the image shows
    lab = save(tmp_path / "lab.nii.gz", label, shifted)
    with pytest.raises(InputError, match=r"label affine differs from image good.nii.gz affine by up to 2 ") as exc:
        preprocess(img, TINY, lab)
    _one_line(exc, lab)
    # header rounding below LABEL_AFFINE_ATOL is accepted, and the label is the same as on the exact grid
    exact = preprocess(img, TINY, save(tmp_path / "exact.nii.gz", label)).label
    nudged = lps_affine()
    nudged[:3, 3] += LABEL_AFFINE_ATOL / 4
    assert np.array_equal(preprocess(img, TINY, save(tmp_path / "near.nii.gz", label, nudged)).label, exact)


def test_label_values_outside_declared(tmp_path: Path) -> None:
    img = _good(tmp_path)
    lab_arr = blob_volume(1, 5)[1] * 3
    lab = save(tmp_path / "lab.nii.gz", lab_arr)
    with pytest.raises(InputError, match=r"label values \[3\] not among declared labels \[0, 1\]") as exc:
        preprocess(img, TINY, lab, allowed_labels=(0, 1))
    _one_line(exc, lab)


def test_dataset_json_missing_files(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "msd", 3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"})
    (root / "labelsTr" / "case_01.nii.gz").unlink()
    (root / "dataset.json").write_text(json.dumps(meta))
    subjects, skipped = discover(root)
    assert [s.id for s in subjects] == ["case_00", "case_02"]
    reasons = dict(skipped)
    assert any("ghost.nii.gz" in p and "missing" in r for p, r in reasons.items())
    assert any("case_01.nii.gz" in p and "label listed" in r for p, r in reasons.items())


@pytest.fixture
def bad_cohort(tmp_path: Path) -> Path:
    """Three good subjects and one of each bad kind, in an MSD dataset.json."""
    root = write_msd(tmp_path / "cohort", 3)
    meta = json.loads((root / "dataset.json").read_text())
    imgs, labs = root / "imagesTr", root / "labelsTr"
    good = (imgs / "case_00.nii.gz").read_bytes()
    (imgs / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (imgs / "text.nii.gz").write_bytes(b"not nifti at all")
    (imgs / "empty.nii.gz").write_bytes(b"")
    save(imgs / "flat.nii.gz", np.ones((8, 8), np.float32) * np.arange(8))
    nan = blob_volume(9, 5)[0].astype(np.float32)
    nan[0, 0, 0] = np.nan
    save(imgs / "nan.nii.gz", nan)
    save(imgs / "const.nii.gz", np.zeros((24, 20, 5), np.int16))
    for name in ("shape", "values", "affine"):
        save(imgs / f"{name}.nii.gz", blob_volume(7, 5)[0])
    save(labs / "shape.nii.gz", np.zeros((24, 20, 6), np.uint8))
    save(labs / "values.nii.gz", blob_volume(7, 5)[1] * 2)
    shifted = lps_affine()
    shifted[:3, 3] += 10.0
    save(labs / "affine.nii.gz", blob_volume(7, 5)[1], shifted)  # a label 10 mm off its image's grid
    for name in ("trunc", "text", "empty", "flat", "nan", "const", "shape", "values", "affine"):
        entry = {"image": f"./imagesTr/{name}.nii.gz"}
        if name in ("shape", "values", "affine"):
            entry["label"] = f"./labelsTr/{name}.nii.gz"
        meta["training"].append(entry)
    meta["training"].append({"image": "./imagesTr/missing.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_bad_inputs_are_skipped_and_recorded(bad_cohort: Path, tmp_path: Path, caplog) -> None:
    subjects, skipped = discover(bad_cohort)
    out = tmp_path / "shards"
    manifest = write_shards(subjects, out, TINY, samples_per_shard=8, workers=1, skipped=skipped, progress=False)
    assert [s["id"] for s in manifest["subjects"]] == ["case_00", "case_01", "case_02"]
    recorded = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    expected = {
        "trunc.nii.gz": "truncated gzip", "text.nii.gz": "not a NIfTI", "empty.nii.gz": "empty file",
        "flat.nii.gz": "2D image", "nan.nii.gz": "NaN or Inf", "const.nii.gz": "constant",
        "shape.nii.gz": "label shape", "values.nii.gz": "not among declared labels",
        "affine.nii.gz": "label affine differs", "missing.nii.gz": "missing",
    }
    assert set(recorded) == set(expected)
    for name, words in expected.items():
        assert words in recorded[name], (name, recorded[name])
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(len(w.splitlines()) == 1 for w in warned) and len(warned) >= len(expected)


def test_strict_fails_and_writes_nothing(bad_cohort: Path, tmp_path: Path) -> None:
    subjects, skipped = discover(bad_cohort)
    out = tmp_path / "strict"
    with pytest.raises(InputError, match="skipped and --strict is set"):
        write_shards(subjects, out, TINY, workers=1, strict=True, skipped=skipped, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".strict*"))


def test_msd_labels_both_forms_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    assert parse_msd_labels({"1": "liver", "0": "background"}, path) == {0: "background", 1: "liver"}
    assert parse_msd_labels({"liver": 1}, path) == {0: "background", 1: "liver"}
    for bad, words in [([], "non-empty mapping"), ({"liver": "x"}, "neither 'value: name'"), ({"300": "x"}, "0..255")]:
        with pytest.raises(InputError, match=words):
            parse_msd_labels(bad, path)
    root = write_msd(tmp_path / "msd", 2, labels={"background": 0, "organ": 1})  # was refused before
    subjects, _ = discover(root)
    assert [s.allowed_labels for s in subjects] == [(0, 1), (0, 1)]


def test_nifti_name_helpers() -> None:
    assert nifti_stem("a/case_01.nii.gz") == "case_01" == nifti_stem(Path("case_01.nii"))
    assert nifti_stem("notes.txt") == "notes"
    assert is_nifti_name("x.nii.gz") and is_nifti_name("x.nii") and not is_nifti_name("x.nii.gz.bak")


def test_list_files_take_names_with_spaces_hashes_and_unicode(tmp_path: Path) -> None:
    """One path per line; only a line starting with '#' is a comment; ids stay readable (issue 26.12)."""
    from ssl_pretrain.data.ingest import discover

    img, lab = blob_volume(0, 4)
    names = ["scan 01.nii.gz", "prostate#2.nii.gz", "früh_03.nii.gz"]
    for name in names:
        save(tmp_path / name, img)
    save(tmp_path / "mask 01.nii.gz", lab)
    listing = tmp_path / "volumes.txt"
    listing.write_text("# my cohort\n" "scan 01.nii.gz\tmask 01.nii.gz\n" "prostate#2.nii.gz\n" "früh_03.nii.gz\n",
                       encoding="utf-8")
    subjects, skipped = discover(listing)
    assert not skipped
    assert sorted(s.id for s in subjects) == ["früh_03", "prostate_2", "scan_01"]
    by_id = {s.id: s for s in subjects}
    assert by_id["scan_01"].label == tmp_path / "mask 01.nii.gz"
