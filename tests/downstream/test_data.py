"""Labeled data: MSD and folder layouts, subject-level splits, the cache, and bad volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from downstream.data import draw_labeled, load_splits, make_splits, open_labeled, prepare, subject_attributes
from ssl_pretrain.data.ingest import Subject, split_ids
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.data.shards import split_subjects

PARAMS = PreprocessParams(spacing=(10.0, 13.0), size=(32, 32))


def _copy_cohort(src: Path, dst: Path, n: int) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    meta = json.loads((dst / "dataset.json").read_text())
    for e in meta["training"][n:]:
        (dst / e["image"]).unlink()
        (dst / e["label"]).unlink()
    meta["training"] = meta["training"][:n]
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_splits_are_fixed_and_draws_depend_on_seed_only() -> None:
    ids = [f"s{i:02d}" for i in range(12)]
    a = make_splits(ids, 2, 3, split_seed=0)
    assert make_splits(list(reversed(ids)), 2, 3, split_seed=0) == a  # order of discovery does not matter
    assert len(a.test) == 3 and len(a.val) == 2 and len(a.train_pool) == 7
    assert not set(a.test) & set(a.val) and not (set(a.test) | set(a.val)) & set(a.train_pool)
    d1, d2 = draw_labeled(a.train_pool, 2, seed=0), draw_labeled(a.train_pool, 2, seed=1)
    assert d1 == draw_labeled(a.train_pool, 2, seed=0) and set(d1) <= set(a.train_pool)
    assert d1 != d2 or draw_labeled(a.train_pool, 2, seed=2) != d1
    assert draw_labeled(a.train_pool, 0, seed=5) == a.train_pool
    with pytest.raises(ValueError, match="n_labeled: 8 is larger than the training pool of 7"):
        draw_labeled(a.train_pool, 8, seed=0)
    with pytest.raises(ValueError, match="need at least"):
        make_splits(ids[:5], 2, 3, split_seed=0)


def test_prepare_caches_volumes(cohort: Path, tmp_path: Path) -> None:
    data = prepare(cohort, PARAMS, n_val=2, n_test=2, split_seed=0, cache_dir=tmp_path / "c")
    assert data.dataset.num_classes == 2 and data.dataset.name == "syntheticliver"
    assert not data.skipped and len(data.splits.train_pool) == 4
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npz")}
    assert len(files) == 8
    vol = data.volumes(data.splits.test[:1])[data.splits.test[0]]
    assert vol.image.shape[1:] == (1, 32, 32) and vol.label.shape == (vol.image.shape[0], 32, 32)
    again = prepare(cohort, PARAMS, n_val=2, n_test=2, split_seed=0, cache_dir=tmp_path / "c")
    assert again.splits == data.splits
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.npz")} == files  # nothing redone
    other = prepare(cohort, PreprocessParams(spacing=(5.0, 6.5), size=(64, 64)), n_val=2, n_test=2,
                    split_seed=0, cache_dir=tmp_path / "c")
    assert other.splits == data.splits and len(list((tmp_path / "c").glob("*.npz"))) == 16


def test_image_label_folders_with_matching_names(cohort: Path, tmp_path: Path) -> None:
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for img in sorted((cohort / "imagesTr").glob("*.nii.gz"))[:6]:
        shutil.copy(img, root / "images" / img.name)
        shutil.copy(cohort / "labelsTr" / img.name, root / "labels" / img.name)
    ds = open_labeled(root)
    assert len(ds.subjects) == 6 and not ds.declared and ds.label_names == {0: "background", 1: "class1"}


def test_bad_volumes_are_skipped_with_one_line_each(cohort: Path, tmp_path: Path) -> None:
    root = _copy_cohort(cohort, tmp_path / "bad", 8)
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    # 1) label shape differs from the image
    img = nib.load(labels[0])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), labels[0])
    # 2) label affine differs from the image
    img = nib.load(labels[1])
    shifted = img.affine.copy()
    shifted[:3, 3] += 25.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), labels[1])
    # 3) label value 3 is not declared in dataset.json
    img = nib.load(labels[2])
    lab = np.asarray(img.dataobj).copy()
    lab[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(lab, img.affine), labels[2])
    # too few usable volumes left for 2 val + 3 test + 1 train
    with pytest.raises(ValueError, match="5 usable labeled volumes, need at least"):
        prepare(root, PARAMS, n_val=2, n_test=4, split_seed=0, cache_dir=tmp_path / "c")
    data = prepare(root, PARAMS, n_val=2, n_test=2, split_seed=0, cache_dir=tmp_path / "c")
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert len(reasons) == 3 and len(data.splits.train_pool) == 1
    assert "label shape" in reasons[labels[0].name] and labels[0].name in reasons[labels[0].name]
    assert "affine differs" in reasons[labels[1].name]
    assert "[3]" in reasons[labels[2].name] and "declared" in reasons[labels[2].name]
    assert all("\n" not in r for r in reasons.values())
    with pytest.raises(ValueError, match="is not a directory"):
        open_labeled(tmp_path / "missing")


def _write_splits(path: Path, ids: list[str], **override: list[str]) -> Path:
    lists = {"train_pool": ids[4:], "val": ids[2:4], "test": ids[:2]} | override
    path.write_text(json.dumps(lists))
    return path


def test_splits_file_replaces_the_seeded_split_and_is_written(cohort: Path, tmp_path: Path) -> None:
    ids = [s.id for s in open_labeled(cohort).subjects]
    fixed = _write_splits(tmp_path / "splits_final.json", ids, test=ids[-2:], train_pool=ids[:2] + ids[4:6])
    data = prepare(cohort, PARAMS, n_val=2, n_test=2, split_seed=0, cache_dir=tmp_path / "c",
                   splits_file=fixed, out_dir=tmp_path / "run")
    assert data.splits.test == tuple(ids[-2:]) and data.splits.val == tuple(ids[2:4])
    assert data.splits.train_pool == tuple(ids[:2] + ids[4:6])
    written = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert written == {"train_pool": list(data.splits.train_pool), "val": list(data.splits.val),
                       "test": list(data.splits.test)}
    # the seeded split is written too, and a written split read back gives the same split
    seeded = prepare(cohort, PARAMS, n_val=2, n_test=2, split_seed=0, cache_dir=tmp_path / "c", out_dir=tmp_path / "s")
    again = prepare(cohort, PARAMS, n_val=9, n_test=9, split_seed=5, cache_dir=tmp_path / "c",
                    splits_file=tmp_path / "s" / "splits.json")
    assert again.splits == seeded.splits


def test_bad_splits_files_give_one_line_naming_file_and_id(cohort: Path, tmp_path: Path) -> None:
    ids = [s.id for s in open_labeled(cohort).subjects]
    cases = {
        "unknown": ({"test": [ids[0], "nobody_07"]}, "subject 'nobody_07' in 'test' is not a usable labeled subject"),
        "twice": ({"val": [ids[0], ids[3]]}, f"subject '{ids[0]}' is in both 'val' and 'test'"),
        "empty": ({"test": []}, "'test' is empty"),
    }
    for name, (override, message) in cases.items():
        path = _write_splits(tmp_path / f"{name}.json", ids, **override)
        with pytest.raises(ValueError) as e:
            load_splits(path, ids)
        assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_splits(tmp_path / "missing.json", ids)


def test_subject_attributes_from_csv_and_dataset_json(cohort: Path, tmp_path: Path) -> None:
    root = _copy_cohort(cohort, tmp_path / "attr", 6)
    meta = json.loads((root / "dataset.json").read_text())
    for i, e in enumerate(meta["training"]):
        e["site"] = "A" if i < 3 else "B"
    (root / "dataset.json").write_text(json.dumps(meta))
    ids = [s.id for s in open_labeled(root).subjects]
    (root / "subjects.csv").write_text("\ufeffsubject,protocol\n" + "".join(f"{sid},{'t2' if i % 2 else 'dixon'}\n"
                                                                       for i, sid in enumerate(ids)))
    ds = open_labeled(root)
    by_image = {s.image.name: s.id for s in ds.subjects}
    first = by_image[Path(meta["training"][0]["image"]).name]
    assert ds.attributes[first]["site"] == "A" and set(ds.attributes[ids[1]]) == {"site", "protocol"}
    assert ds.attributes[ids[1]]["protocol"] == "t2" and subject_attributes(root) == ds.attributes
    (root / "subjects.csv").write_text(f"subject,site\n{ids[0]},A\nghost_9,B\n")
    with pytest.raises(ValueError) as e:
        open_labeled(root)
    assert str(e.value).startswith(str(root / "subjects.csv")) and "'ghost_9'" in str(e.value)
    (root / "subjects.csv").write_text(f"id,site\n{ids[0]},A\n")
    with pytest.raises(ValueError, match="no 'subject' column"):
        subject_attributes(root)


def test_malformed_msd_labels_name_dataset_json(cohort: Path, tmp_path: Path) -> None:
    root = _copy_cohort(cohort, tmp_path / "labels", 6)
    meta = json.loads((root / "dataset.json").read_text())
    for labels, words in [({"liver": "x"}, "neither 'value: name'"), ({"300": "x"}, "0..255")]:
        (root / "dataset.json").write_text(json.dumps(meta | {"labels": labels}))
        with pytest.raises(ValueError) as e:
            open_labeled(root)
        assert str(e.value).startswith(str(root / "dataset.json")) and words in str(e.value)
    (root / "dataset.json").write_text(json.dumps(meta | {"labels": {"0": "background", "1": "liver"}}))
    assert open_labeled(root).label_names == {0: "background", 1: "liver"}


def test_one_subject_split_serves_shards_finetuning_splits_and_draws() -> None:
    ids = [f"case_{i:02d}" for i in range(12)]
    parts = split_ids(ids, (3, 2), seed=4)
    assert split_ids(list(reversed(ids)), (3, 2), seed=4) == parts  # order of discovery does not matter
    assert [len(p) for p in parts] == [3, 2, 7] and sorted(sum(parts, ())) == ids
    assert all(list(p) == sorted(p) for p in parts)
    s = make_splits(ids, 2, 3, split_seed=4)
    assert (s.test, s.val, s.train_pool) == parts
    assert draw_labeled(s.train_pool, 3, seed=1) == split_ids(s.train_pool, (3,), seed=1)[0]
    subjects = [Subject(i, Path(f"{i}.nii.gz"), None) for i in reversed(ids)]
    train, val = split_subjects(subjects, 0.25, seed=4)
    assert tuple(sorted(v.id for v in val)) == split_ids(ids, (3,), seed=4)[0]
    assert [t.id for t in train] == [i for i in reversed(ids) if i not in {v.id for v in val}]  # input order kept
    with pytest.raises(ValueError, match=r"\['case_01'\] appear more than once"):
        split_ids([*ids, "case_01"], (1,), seed=0)
    with pytest.raises(ValueError, match="add up to at most the 12 subjects"):
        split_ids(ids, (10, 3), seed=0)


def test_a_volume_spacing_makes_3d_finetuning_whose_random_init_needs_an_arch() -> None:
    from downstream.config import FinetuneConfig
    from ssl_pretrain.config import ConfigError, load_config

    cfg = load_config(FinetuneConfig, overrides=["data.preprocess.spacing=[1, 1, 1]"])
    assert cfg.data.preprocess.volumetric
    with pytest.raises(ConfigError, match=r"^model\.arch: 3D data .* needs the network's arch_kwargs"):
        cfg.model.unet_config(1, spatial_dims=3)
