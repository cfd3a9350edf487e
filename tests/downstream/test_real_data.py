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


def _oblique_t2(path: Path, *, zero_pixdim: bool = False, qform_differs: bool = False) -> Path:
    """A 0.6 × 0.6 × 3.6 mm LPS volume; optionally pixdim zeroed, or a qform (scanner) ≠ sform (aligned)."""
    aff = np.array([[-0.6, 0, 0, 20.0], [0, -0.6, 0, 30.0], [0, 0, 3.6, -10.0], [0, 0, 0, 1]])
    data = np.random.default_rng(1).normal(100, 10, (60, 50, 6)).astype(np.float32)
    data[20:40, 15:35, 2:4] += 80
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=2)
    qform = aff.copy()
    if qform_differs:
        qform[:3, 3] += [1.5, 0.0, 0.0]
    img.set_qform(qform, code=1)
    if zero_pixdim:
        img.set_qform(None, code=0)
        img.header["pixdim"][1:4] = 0
    nib.save(img, path)
    return path


def test_zero_pixdim_takes_the_spacing_from_the_affine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ssl_pretrain.data.preprocess import PreprocessParams, preprocess

    params = PreprocessParams(spacing=(1.2, 1.2), size=(32, 32))
    good = preprocess(_oblique_t2(tmp_path / "good.nii.gz"), params)
    with caplog.at_level("WARNING"):
        zero = preprocess(_oblique_t2(tmp_path / "zero.nii.gz", zero_pixdim=True), params)
    assert zero.geometry["resampled_shape"] == good.geometry["resampled_shape"] == [30, 25]  # 60·0.6/1.2, 50·0.6/1.2
    assert zero.spacing == pytest.approx(good.spacing) and zero.spacing[2] == pytest.approx(3.6)
    assert "zero.nii.gz: header pixdim [0.0, 0.0, 0.0] mm disagrees with the affine's voxel size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        preprocess(_oblique_t2(tmp_path / "q.nii.gz", qform_differs=True), params)
    assert "q.nii.gz: qform (code 1) and sform (code 2) disagree; using the sform" in caplog.text


def test_masks_carry_the_input_header_exactly(tmp_path: Path) -> None:
    from downstream.predict import predict

    model = _segmentation_model(tmp_path / "model.pt")
    src = _oblique_t2(tmp_path / "scan.nii.gz", qform_differs=True)
    (mask,) = predict(str(model), src, tmp_path / "masks", save_probabilities=True)
    a, b = nib.load(src), nib.load(mask)
    assert b.shape == a.shape and b.get_data_dtype() == np.uint8
    for img in (b, nib.load(tmp_path / "masks" / "scan_probabilities.nii.gz")):
        np.testing.assert_array_equal(img.get_qform(), a.get_qform())  # what ITK-SNAP / SimpleITK read
        np.testing.assert_array_equal(img.get_sform(), a.get_sform())  # what nibabel reads
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
        np.testing.assert_array_equal(img.header["pixdim"][1:4], a.header["pixdim"][1:4])


def test_a_header_that_lies_about_its_size_allocates_nothing(tmp_path: Path) -> None:
    import gzip as gz
    import tracemalloc

    from ssl_pretrain.data.preprocess import InputError, load_nifti

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((500, 500, 400))  # 100 M voxels of uint8 claimed ...
    hdr.set_data_dtype(np.uint8)
    liar = tmp_path / "liar.nii"
    liar.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x01" * 128)  # ... 480 bytes held
    bomb = tmp_path / "bomb.nii.gz"  # 8 M voxels of zeros: a few kB on disk, 32 MB inflated
    nib.save(nib.Nifti1Image(np.zeros((200, 200, 200), np.float32), np.eye(4)), tmp_path / "big.nii")
    bomb.write_bytes(gz.compress((tmp_path / "big.nii").read_bytes()))
    tracemalloc.start()
    with pytest.raises(InputError, match=r"liar.nii: the header claims 100,000,000 bytes .* the file holds 480:"):
        load_nifti(liar)
    with pytest.raises(InputError, match=r"bomb.nii.gz: the header claims shape \(200, 200, 200\) = 8,000,000 voxels, "
                                         r"more than max_voxels=1,000,000"):
        load_nifti(bomb, max_voxels=1_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # nothing near the claimed sizes was allocated
    assert load_nifti(bomb, kind="label").shape == (200, 200, 200)  # a positive control: under the limit it loads


def test_make_shards_excludes_the_evaluation_subjects(tmp_path: Path) -> None:
    """--exclude SPLITS keeps a split file's val and test subjects out of the pretraining set (26.4)."""
    import json

    from mri_ssl.cli.make_shards import main

    root = _folder(tmp_path / "ds", n=4)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train_pool": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    assert main(["--input", str(root / "images"), "--output", str(tmp_path / "sh"), "--exclude", str(splits),
                 "--size", "16", "16", "--spacing", "1", "1", "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["subjects"]] == ["case0", "case1"]
    assert manifest["excluded"] == ["case2", "case3"]
    listing = tmp_path / "test_ids.txt"
    listing.write_text("# test subjects\ncase1\nimages/case3.nii.gz\n")
    assert main(["--input", str(root / "images"), "--output", str(tmp_path / "sh2"), "--exclude", str(listing),
                 "--size", "16", "16", "--spacing", "1", "1", "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "sh2" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["subjects"]] == ["case0", "case2"] and manifest["excluded"] == ["case1", "case3"]


def test_the_report_warns_when_an_init_was_pretrained_on_test_subjects(tmp_path: Path) -> None:
    from downstream.report import build_report

    def row(init: str, seed: int, dice: float) -> dict:
        return {"init_tag": init, "n_labeled": 1, "seed": seed, "best_val_dice": dice, "test_dice": dice,
                "test_hd95": 1.0, "train_ids": [f"p{seed}"], "test_ids": ["t1", "t2"], "history": [],
                "test_per_volume": {t: {"dice": [dice], "hd95": [1.0]} for t in ("t1", "t2")}}

    rows = [row(i, s, d) for i, d in (("random", 0.5), ("clean", 0.6), ("leaky", 0.7)) for s in (0, 1)]
    budgets = {"clean": {"steps": 10, "pretrain_subjects": ["u1", "u2"]},
               "leaky": {"steps": 10, "pretrain_subjects": ["u1", "t2"]}, "old": {"steps": 10}}
    rep = build_report(rows, tmp_path / "r", budgets=budgets, n_boot=200)
    md = (tmp_path / "r" / "report.md").read_text()
    warning = ("WARNING leaky: its pretraining shards hold 1 of the 2 test subjects (t2): it was pretrained on "
               "subjects it is tested on; re-shard with make_shards --exclude")
    assert md.splitlines()[2] == warning  # right under the title
    assert "- clean: none of the 2 test subjects among its 2 pretraining subjects" in md
    assert "- old: unknown (its export records no pretraining subjects)" in md
    assert rep["leaks"][1] == warning


def test_the_registry_alias_moves_only_for_a_better_model(mlflow_uri: str) -> None:
    """A smoke-test sweep never replaces the champion (26.8): tags, description, alias rules."""
    import mlflow

    from downstream.config import SweepConfig
    from downstream.sweep import _register
    from ssl_pretrain.config import load_config

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):  # noqa: ANN001, ANN201
            return model_input

    def trial(val: float, val_ids: list[str], seed: int = 0) -> tuple[str, dict]:
        with mlflow.start_run() as run:
            uri = mlflow.pyfunc.log_model(name="m", python_model=Echo(), pip_requirements=[]).model_uri
        r = {"init": "runs/c1/export/model.pt", "init_tag": "contrastive", "n_labeled": 2, "seed": seed,
             "best_val_dice": val, "test_dice": val - 0.1, "val_ids": val_ids, "trial_key": f"t{val}-{seed}"}
        return uri, r | {"sweep": run.info.run_id}

    cfg = load_config(SweepConfig)
    client = mlflow.MlflowClient()
    first = _register(*trial(0.80, ["v1", "v2"]), "mri-ssl-toy", cfg, "sweep-a")
    assert first["promoted"] and str(client.get_model_version_by_alias("mri-ssl-toy", "champion").version) == "1"
    mv = client.get_model_version("mri-ssl-toy", "1")
    assert mv.tags["val_dice"] == "0.800000" and mv.tags["n_labeled"] == "2" and mv.tags["sweep_run_id"] == "sweep-a"
    assert mv.tags["init_tag"] == "contrastive" and mv.tags["test_dice"] == "0.700000"
    assert "val Dice 0.800, test Dice 0.700" in mv.description
    smoke = _register(*trial(0.60, ["v1", "v2"]), "mri-ssl-toy", cfg, "sweep-b")  # worse: alias stays
    assert not smoke["promoted"] and "does not beat version 1's 0.800" in smoke["promotion"]
    other = _register(*trial(0.95, ["w1"]), "mri-ssl-toy", cfg, "sweep-c")  # other subjects: not comparable
    assert not other["promoted"] and "validated on other subjects" in other["promotion"]
    assert str(client.get_model_version_by_alias("mri-ssl-toy", "champion").version) == "1"
    better = _register(*trial(0.85, ["v1", "v2"]), "mri-ssl-toy", cfg, "sweep-d")
    assert better["promoted"] and str(client.get_model_version_by_alias("mri-ssl-toy", "champion").version) == "4"
    cfg.tracking.promote = True
    forced = _register(*trial(0.10, ["x"]), "mri-ssl-toy", cfg, "sweep-e")
    assert forced["promoted"] and str(client.get_model_version_by_alias("mri-ssl-toy", "champion").version) == "5"


def test_pretraining_runs_get_a_name_from_the_task_and_config() -> None:
    from ssl_pretrain.config import load_config
    from ssl_pretrain.engine.config import PretrainConfig
    from ssl_pretrain.engine.trainer import run_name

    a = load_config(PretrainConfig, overrides=["out_dir=x"])
    b = load_config(PretrainConfig, overrides=["out_dir=y", "resume=never"])  # same recipe elsewhere
    c = load_config(PretrainConfig, overrides=["train.lr=0.01"])
    assert run_name(a) == run_name(b) != run_name(c) and run_name(a).startswith("contrastive-")
    assert len(run_name(a)) == len("contrastive-") + 8


def test_a_full_disk_at_the_last_write_is_one_line_and_leaves_no_model(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """26.10: ENOSPC while the finetuned model is renamed into place: exit 1, one line with path and errno."""
    import errno
    import os

    from mri_ssl.cli.finetune import main

    from .conftest import tiny_overrides

    out = tmp_path / "ft"
    real_replace = os.replace

    def full_disk(src, dst):  # noqa: ANN001, ANN202
        if Path(dst).name == "model.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    code = main(["--config", "finetune", *tiny_overrides(cohort, out, size=32), "train.max_steps=2",
                 "train.eval_every=2"])
    assert code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1] == f"error: {out / 'model.pt'}: No space left on device (errno ENOSPC)"
    assert not (out / "model.pt").exists() and not list(out.glob(".model.pt*"))  # nothing half-written


def test_predict_checks_the_output_is_writable_before_inference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import tempfile

    from mri_ssl.cli.predict import main

    _folder(tmp_path / "ds", n=1)
    masks = tmp_path / "masks"

    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system", str(kwargs.get("dir", "")))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    # the model does not even exist: the output is checked first, before anything is loaded or computed
    code = main(["--model", str(tmp_path / "no-model.pt"), "--input", str(tmp_path / "ds" / "images"),
                 "--output", str(masks)])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: {masks}: Read-only file system (errno EROFS)"


def test_a_really_full_disk_while_sharding(tmp_path: Path) -> None:
    """26.10 on a real file system: a 256 kB tmpfs fills up; one line, and no manifest under the final name."""
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs (not root, or no mount permission)")
    try:
        root = _folder(tmp_path / "ds", n=3)
        proc = subprocess.run([sys.executable, "-m", "mri_ssl.cli.make_shards", "--input", str(root / "images"),
                               "--output", str(disk / "shards"), "--size", "256", "256", "--spacing", "0.1", "0.1",
                               "--workers", "1"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
        assert last.startswith("make_shards: error: ") and last.endswith("No space left on device (errno ENOSPC)")
        assert "Traceback" not in proc.stderr
        # the temporary shard folder is gone too; only the (empty) lock file beside the output stays
        assert [p.name for p in disk.iterdir()] == [".shards.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
