"""predict.py round trip: non-RAS, anisotropic NIfTI in → mask on the original grid, Dice as evaluated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from downstream.config import FinetuneConfig
from downstream.finetune import finetune
from downstream.metrics import dice_score
from ssl_pretrain.config import load_config

from .conftest import tiny_overrides


def _launch_predict():
    spec = importlib.util.spec_from_file_location("launch_predict", Path(__file__).parents[2] / "launch/predict.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_predict_round_trip_on_the_original_grid(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config(FinetuneConfig, overrides=[*tiny_overrides(cohort, tmp_path / "ft"), "n_labeled=2",
                                                  "train.max_steps=30"])
    result = finetune(cfg)
    model = result["model_path"]
    sid = result["test_ids"][0]
    src = cohort / "imagesTr" / f"{sid}.nii.gz"
    ref = nib.load(src)
    assert nib.aff2axcodes(ref.affine) != ("R", "A", "S")
    assert len({round(float(z), 3) for z in ref.header.get_zooms()}) == 3  # three different spacings

    out = tmp_path / "mask.nii.gz"
    assert _launch_predict().main(["--model", model, "--input", str(src), "--output", str(out)]) == 0
    mask = nib.load(out)
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    assert mask.get_data_dtype() == np.uint8
    truth = np.asarray(nib.load(cohort / "labelsTr" / f"{sid}.nii.gz").dataobj)
    dice = dice_score(np.asarray(mask.dataobj) == 1, truth == 1)
    assert dice == pytest.approx(result["test_per_volume"][sid]["dice"][0], abs=1e-9)
    assert dice > 0.2  # the model learned something (it is compared with the evaluation above)

    # a folder of volumes in one call, one <name>_mask.nii.gz each; a broken file is skipped with a line
    batch = tmp_path / "batch"
    batch.mkdir()
    for t in result["test_ids"]:
        (batch / f"{t}.nii.gz").write_bytes((cohort / "imagesTr" / f"{t}.nii.gz").read_bytes())
    (batch / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    from downstream.predict import predict

    written = predict(model, batch, tmp_path / "masks")
    assert sorted(p.name for p in written) == sorted(f"{t}_mask.nii.gz" for t in result["test_ids"])


def test_predict_bad_inputs(tmp_path: Path, capsys, mlflow_uri: str) -> None:
    mod = _launch_predict()
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), np.eye(4)), vol)
    out = str(tmp_path / "o.nii.gz")
    assert mod.main(["--model", str(tmp_path / "none.pt"), "--input", str(vol), "--output", out]) == 2
    assert "--model:" in capsys.readouterr().err
    assert mod.main(["--model", "models:/no-such-model@champion", "--input", str(vol), "--output", out]) == 2
    assert "does not resolve" in capsys.readouterr().err
    assert mod.main(["--model", "m.pt", "--input", str(tmp_path / "missing"), "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err
