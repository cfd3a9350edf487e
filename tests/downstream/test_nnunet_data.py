"""nnU-Net v2 raw datasets in: channel files grouped per case, splits_final.json folds, one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from downstream.config import FinetuneConfig
from downstream.data import load_splits
from downstream.finetune import finetune
from downstream.metrics import dice_score
from downstream.predict import predict
from ssl_pretrain.config import load_config
from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.preprocess import InputError, PreprocessParams, preprocess
from ssl_pretrain.data.shards import write_shards

from .conftest import tiny_overrides
from .nnunet_data import nnunet_raw_dataset


@pytest.fixture(scope="module")
def raw(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset501_Liver: 6 training cases (2 channel files each), 2 test cases in imagesTs/ with labelsTs/."""
    return nnunet_raw_dataset(cohort, tmp_path_factory.mktemp("nnunet_raw") / "Dataset501_Liver", n_test=2)


def test_channel_files_are_one_case_stacked_in_channel_order(raw: Path, cohort: Path) -> None:
    subjects, skipped = discover(raw)
    assert not skipped and len(subjects) == 8
    case = subjects[0]
    assert [p.name for p in case.image] == [f"{case.id}_0000.nii.gz", f"{case.id}_0001.nii.gz"]
    assert case.label == raw / "labelsTr" / f"{case.id}.nii.gz"
    assert {s.id for s in subjects} == {p.name[:-7] for p in (cohort / "imagesTr").iterdir()}
    # imagesTr/ alone is its own cases, not one subject per channel file
    tr, _ = discover(raw / "imagesTr")
    assert len(tr) == 6 and all(len(s.image) == 2 for s in tr)

    params = PreprocessParams(spacing=(10.0, 13.0), size=(32, 32))
    both = preprocess(case.image, params, case.label, allowed_labels=(0, 1))
    alone = preprocess(case.image[0], params, case.label, allowed_labels=(0, 1))
    assert both.image.shape[1] == 2
    np.testing.assert_array_equal(both.image[:, :1], alone.image)  # channel 0 is the _0000 file, untouched
    np.testing.assert_array_equal(both.label, alone.label)
    assert not np.allclose(both.image[:, 1], both.image[:, 0])

    manifest = write_shards(subjects, raw.parent / "shards", params, samples_per_shard=64, workers=1, progress=False)
    assert manifest["channels"] == 2 and manifest["num_subjects"] == 8


def test_splits_final_fold_is_honoured(raw: Path, tmp_path: Path) -> None:
    folds = json.loads((raw / "splits_final.json").read_text())
    cfg = load_config(FinetuneConfig, overrides=[
        *tiny_overrides(raw, tmp_path / "ft", size=32), f"data.splits={raw / 'splits_final.json'}", "data.fold=0",
        "n_labeled=0", "train.max_steps=30", "data.cache_dir=" + str(tmp_path / "cache")])
    result = finetune(cfg)
    assert result["train_ids"] == sorted(folds[0]["train"])
    assert result["val_ids"] == sorted(folds[0]["val"])
    assert set(folds[0]["val"]) != set(folds[1]["val"])  # the folds differ: fold 0 was the one taken
    assert result["test_ids"] == sorted(p.name[:-7] for p in (raw / "labelsTs").iterdir())  # the labeled imagesTs

    # predict the imagesTs folder: one mask per case, named by case, on the case's grid; the two channels are
    # stacked as in training, so the Dice equals the finetuning's own test evaluation
    written = predict(result["model_path"], raw / "imagesTs", tmp_path / "masks")
    assert sorted(p.name for p in written) == sorted(f"{t}_mask.nii.gz" for t in result["test_ids"])
    for t in result["test_ids"]:
        mask = nib.load(tmp_path / "masks" / f"{t}_mask.nii.gz")
        ref = nib.load(raw / "imagesTs" / f"{t}_0000.nii.gz")
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
        truth = np.asarray(nib.load(raw / "labelsTs" / f"{t}.nii.gz").dataobj) == 1
        dice = dice_score(np.asarray(mask.dataobj) == 1, truth)
        assert dice == pytest.approx(result["test_per_volume"][t]["dice"][0], abs=1e-9)


def test_a_fold_covering_every_case_holds_test_cases_out_of_its_train_list(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(8)]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ids[:6], "val": ids[6:]}, {"train": ids[2:], "val": ids[:2]}]))
    s = load_splits(path, ids, fold=0, n_test=2, split_seed=5)
    assert s.val == ("c6", "c7") and len(s.test) == 2 and set(s.test) < set(ids[:6])
    assert set(s.train_pool) == set(ids[:6]) - set(s.test)
    assert load_splits(path, ids, fold=0, n_test=2, split_seed=5) == s  # seeded


@pytest.mark.parametrize("fold, msg", [(None, "set data.fold"), (2, "out of range; .* has folds 0..1")])
def test_splits_final_needs_a_fold_in_range(tmp_path: Path, fold, msg) -> None:
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}] * 2))
    with pytest.raises(ValueError, match=msg):
        load_splits(path, ["a", "b", "c", "d"], fold=fold)


def test_region_labels_and_other_file_endings_are_refused_in_one_line(raw: Path, tmp_path: Path) -> None:
    meta = json.loads((raw / "dataset.json").read_text())
    for change, msg in (({"labels": {"background": 0, "whole": [1, 2], "core": 2}}, "region-based labels"),
                        ({"file_ending": ".mha"}, "file_ending '.mha' is not supported"),
                        ({"channel_names": {"1": "T2"}}, "'channel_names' must map")):
        bad = tmp_path / "Dataset502_Bad"
        bad.mkdir(exist_ok=True)
        (bad / "dataset.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(InputError, match=msg) as exc:
            discover(bad)
        assert "\n" not in str(exc.value) and "dataset.json" in str(exc.value)


def test_a_case_missing_a_channel_file_is_skipped_with_the_reason(raw: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / raw.name
    shutil.copytree(raw, copy)
    victim = sorted((copy / "imagesTr").glob("*_0001.nii.gz"))[0]
    victim.unlink()
    subjects, skipped = discover(copy)
    assert len(subjects) == 7
    assert skipped == [(str(copy / "imagesTr" / victim.name[:-12]),
                        "channel files [0] but dataset.json declares 2 channel(s) ['T2', 'ADC']")]
