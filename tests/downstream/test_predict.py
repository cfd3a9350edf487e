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
    afile = tmp_path / "afile"
    afile.write_text("x")
    for dst in (afile / "o.nii.gz", afile / "masks"):  # the output's folder is a file
        assert mod.main(["--model", str(tmp_path / "none.pt"), "--input", str(vol), "--output", str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --output:") and str(afile) in err and len(err.splitlines()) == 1


def test_prediction_loads_strictly_what_finetuning_loads_partially(tmp_path: Path) -> None:
    import torch

    from downstream.predict import load_segmentation_model
    from ssl_pretrain.export import ExportError, build_unet, load_export

    from .conftest import make_export

    pre = load_export(make_export(tmp_path / "pre.pt"))  # encoder only, as pretraining writes it
    model, report = build_unet(pre, 2, source="pre.pt", strict=False)
    assert report.loaded and all(k.startswith("encoder.") for k in report.loaded)
    assert {k.split(".")[0] for k in report.missing} == {"decoder", "head"}
    with pytest.raises(ExportError, match="has no segmentation head"):
        load_segmentation_model(str(tmp_path / "pre.pt"))
    # a head that lacks a tensor: finetuning would train it from scratch, prediction refuses it
    payload = torch.load(tmp_path / "pre.pt", weights_only=True)
    payload.update(task="segmentation", num_classes=2, decoder=model.decoder.state_dict(),
                   head={k: v for k, v in list(model.head.state_dict().items())[:-1]})
    torch.save(payload, tmp_path / "cut.pt")
    with pytest.raises(ExportError, match="does not match its model config"):
        load_segmentation_model(str(tmp_path / "cut.pt"))
