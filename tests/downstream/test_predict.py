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

    from downstream.inference import load_segmentation_model
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


def _seg_export(path: Path, seed: int, *, num_classes: int = 2, size: int = 32, **info) -> Path:
    """A segmentation export of a freshly initialised UNet (real weights, untrained)."""
    import dataclasses

    import torch

    from ssl_pretrain.export import save_export
    from ssl_pretrain.models.unet import UNet, UNetConfig

    from .conftest import PARAMS32

    torch.manual_seed(seed)
    net = UNet(UNetConfig(widths=(8, 16, 32)), num_classes)
    params = dataclasses.replace(PARAMS32, size=(size, size), field_of_view="pad")
    return save_export(path, task="segmentation", model_config=net.cfg, encoder_state=net.encoder.state_dict(),
                       decoder_state=net.decoder.state_dict(), head_state=net.head.state_dict(),
                       num_classes=num_classes, preprocessing=params.to_dict(),
                       info={"label_names": {"0": "background", "1": "liver"}, **info})


def test_tta_is_the_mean_of_the_mirrored_predictions(tmp_path: Path) -> None:
    from downstream.inference import load_segmentation_model, predict_probabilities

    net, _ = load_segmentation_model(str(_seg_export(tmp_path / "m.pt", 0)))
    image = np.random.default_rng(0).normal(size=(3, 1, 40, 48)).astype(np.float32)  # larger than a patch
    kw = {"roi_size": (32, 32), "overlap": 0.25}
    tta = predict_probabilities(net, image, mirror_axes=(2, 3), **kw)
    manual = []
    for axes in ((), (2,), (3,), (2, 3)):
        flipped = np.ascontiguousarray(np.flip(image, axes)) if axes else image
        p = predict_probabilities(net, flipped, **kw)  # (K, S, H, W): the input's axes 2, 3 are its 2, 3 too
        manual.append(np.flip(p, axes) if axes else p)
    assert tta.shape == (2, 3, 40, 48)
    np.testing.assert_allclose(tta, np.mean(manual, axis=0), atol=1e-6)
    assert not np.allclose(tta, manual[0], atol=1e-4)  # mirroring changed something
    np.testing.assert_allclose(tta.sum(axis=0), 1.0, atol=1e-5)  # still a probability at every pixel


def test_largest_component_removes_a_planted_island() -> None:
    from downstream.inference import choose_largest_component, keep_largest_component

    mask = np.zeros((4, 20, 20), np.uint8)
    mask[1:3, 2:10, 2:10] = 1  # the structure
    mask[1, 15:17, 15:17] = 1  # an island of the same class
    mask[0, 0:2, 18:20] = 2  # another class, left alone when not chosen
    mask[3, 18:20, 0:2] = 2
    clean = keep_largest_component(mask, [1])
    assert (clean[1, 15:17, 15:17] == 0).all() and (clean[1:3, 2:10, 2:10] == 1).all()
    assert (clean == 2).sum() == (mask == 2).sum()
    truth = mask.copy()
    truth[1, 15:17, 15:17] = 0  # the island is a false positive: cleaning class 1 helps, class 2 not
    assert choose_largest_component([mask], [truth], 3) == {"1": True, "2": False}


def test_ensemble_averages_probabilities_and_saves_them_on_the_input_grid(cohort: Path, tmp_path: Path,
                                                                            capsys) -> None:
    from downstream.predict import predict

    src = sorted((cohort / "imagesTr").iterdir())[0]
    ref = nib.load(src)
    m1 = _seg_export(tmp_path / "m1.pt", 1, largest_component={"1": True})
    m2 = _seg_export(tmp_path / "m2.pt", 2, largest_component={"1": False})
    probs = {}
    for name, models in (("a", [m1]), ("b", [m2]), ("ab", [m1, m2])):
        (mask_path,) = predict(models, src, tmp_path / f"{name}_mask.nii.gz", save_probabilities=True)
        p = nib.load(tmp_path / f"{name}_probabilities.nii.gz")
        assert p.shape == (*ref.shape, 2) and np.allclose(p.affine, ref.affine)
        probs[name] = np.asarray(p.dataobj, dtype=np.float64)
        assert np.array_equal(np.asarray(nib.load(mask_path).dataobj), probs[name].argmax(axis=-1))
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, atol=2 / 65535)
    np.testing.assert_allclose(probs["ab"].sum(axis=-1), 1.0, atol=4 / 65535)
    # only classes every member chose are cleaned; models that disagree on data or labels are refused
    predict([m1, m2], src, tmp_path / "lcc.nii.gz", largest_component=True)
    mod = _launch_predict()
    other = _seg_export(tmp_path / "other.pt", 3, size=16)
    three = _seg_export(tmp_path / "three.pt", 3, num_classes=3)
    for bad, what in ((other, "preprocessing"), (three, "label set")):
        assert mod.main(["--model", str(m1), "--model", str(bad), "--input", str(src), "--output",
                         str(tmp_path / "x.nii.gz")]) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and str(m1) in err and str(bad) in err and len(err.splitlines()) == 1
    assert mod.main(["--model", str(m1), "--tta", "hwd", "--input", str(src), "--output",
                     str(tmp_path / "x.nii.gz")]) == 2
    assert "in-plane only" in capsys.readouterr().err
    assert mod.main(["--model", str(_seg_export(tmp_path / "old.pt", 4)), "--largest-component", "--input",
                     str(src), "--output", str(tmp_path / "x.nii.gz")]) == 2
    assert "records no per-class choice" in capsys.readouterr().err


def test_far_spacing_is_warned_with_both_spacings(tmp_path: Path, caplog) -> None:
    from downstream.predict import predict

    m = _seg_export(tmp_path / "m.pt", 0)  # trained at PARAMS32's 10 × 13 mm
    vol = tmp_path / "fine.nii.gz"
    data = np.random.default_rng(0).random((24, 20, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), vol)
    with caplog.at_level("INFO"):
        predict(m, vol, tmp_path / "out.nii.gz")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("differs widely" in t and "[1.0, 1.0]" in t and "[10.0, 13.0]" in t for t in msgs)
    assert sum("padded" in t for t in msgs) == 1
