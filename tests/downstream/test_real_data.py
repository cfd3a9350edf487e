"""Real scanner data without silent harm: label classes, empty classes, unreadable labels (issue 26)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from downstream.data import open_labeled
from downstream.metrics import summarize, volume_metrics


def _folder(root: Path, n: int = 3, *, stray: int | None = None) -> Path:
    """A folder-mode dataset (``images/``, ``labels/``, no dataset.json) with labels 0/1."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 10, (16, 16, 4)).astype(np.float32)
        lab = np.zeros((16, 16, 4), np.uint8)
        lab[4:10, 4:10, 1:3] = 1
        if stray is not None and i == 1:
            lab[0, 0, 0] = stray
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labels" / f"case{i}.nii.gz")
    return root


def test_a_stray_label_value_is_an_error_naming_the_file_not_256_classes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", stray=255)
    with pytest.raises(ValueError) as e:
        open_labeled(root)
    msg = str(e.value)
    assert "case1.nii.gz" in msg and "[255]" in msg and "data.labels" in msg and "\n" not in msg
    # a positive control: the clean folder infers two classes, and a declared list is taken as it is
    clean = open_labeled(_folder(tmp_path / "clean"))
    assert clean.label_names == {0: "background", 1: "class1"} and clean.num_classes == 2
    named = open_labeled(_folder(tmp_path / "named"), labels=["background", "prostate"])
    assert named.label_names == {0: "background", 1: "prostate"} and named.declared


def test_a_truncated_label_skips_its_subject_with_one_line(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds")
    bad = root / "labels" / "case2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:40])  # a cut gzip stream
    ds = open_labeled(root)
    assert [s.id for s in ds.subjects] == ["case0", "case1"]
    (path, reason), = [s for s in ds.skipped if "case2" in s[0]]
    assert "truncated" in reason and "\n" not in reason


def test_an_empty_empty_class_is_reported_not_silently_averaged() -> None:
    true = np.zeros((3, 8, 8), np.uint8)
    true[1, 2:5, 2:5] = 1
    pred = true.copy()
    pred[0, 0, 0] = 1  # class 1 predicted with one extra voxel; class 2 absent from both
    m = volume_metrics(pred, true, spacing=(1.0, 1.0, 1.0), num_classes=3)
    assert m["empty"] == [0.0, 1.0] and m["dice"][1] == 1.0
    s = summarize([m, m], "test_")
    assert s["test_dice_empty_both"] == 2


def _segmentation_model(path: Path) -> Path:
    """A (untrained) finetuned-model export: UNet with a 2-class head and 32×32 preprocessing."""
    import torch

    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.export import save_export
    from ssl_pretrain.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(widths=(4, 8)), 2)
    return save_export(path, task="segmentation", model_config=net.cfg, encoder_state=net.encoder.state_dict(),
                       decoder_state=net.decoder.state_dict(), head_state=net.head.state_dict(), num_classes=2,
                       preprocessing=PreprocessParams(spacing=(2.0, 2.0), size=(32, 32)).to_dict(),
                       info={"largest_component": {"1": False}})


def test_predict_fails_when_it_skipped_every_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mri_ssl.cli.predict import main

    model = _segmentation_model(tmp_path / "model.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (scans / "b.nii").write_bytes(b"\x00" * 100)
    assert main(["--model", str(model), "--input", str(scans), "--output", str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    assert "all 2 input(s) skipped, no mask written" in err and "a.nii.gz" in err
    # a positive control: with one good scan beside them, that one is written and the run succeeds
    _folder(tmp_path / "ds", n=1)
    shutil.copy(tmp_path / "ds" / "images" / "case0.nii.gz", scans / "good.nii.gz")
    assert main(["--model", str(model), "--input", str(scans), "--output", str(tmp_path / "masks")]) == 0
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["good_mask.nii.gz"]


def test_make_shards_refuses_a_second_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mri_ssl.cli.make_shards import main

    a, b = _folder(tmp_path / "a", n=1), _folder(tmp_path / "b", n=1)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(a), "--input", str(b), "--output", str(tmp_path / "shards")])
    assert e.value.code == 2
    assert "--input: given 2 times" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()
