"""nnU-Net v2 itself: a sweep arm (its own planning, training, prediction), its checkpoints as inits, and an
mri-ssl export's weights into the network nnU-Net builds from the written plans, loaded by nnU-Net's own loader.

nnU-Net runs on the CPU with its standard trainer cut to a few iterations (``nnunet.*``) on 64×64 slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream.config import SweepConfig
from downstream.metrics import dice_score
from ssl_pretrain.config import load_config
from ssl_pretrain.export import ExportError, build_unet, load_export

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow

NNUNET_TINY = ["nnunet.epochs=1", "nnunet.iterations_per_epoch=2", "nnunet.val_iterations_per_epoch=1",
               "nnunet.device=cpu"]


@pytest.fixture(scope="module")
def nnunet_sweep(cohort: Path, tmp_path_factory: pytest.TempPathFactory, ray_session) -> Path:
    """``init=[random, nnunet]`` × n=1 × seed 0 through launch/sweep.py's ``run_sweep``."""
    from downstream.sweep import run_sweep

    out = tmp_path_factory.mktemp("nnunet_sweep") / "sw"
    cfg = load_config(SweepConfig, overrides=[
        *tiny_overrides(cohort, out, size=64), "init=[random, nnunet]", "n_labeled=[1]", "seeds=[0]",
        "search.cpus_per_trial=1", "tracking.enabled=true", *NNUNET_TINY])
    with pytest.MonkeyPatch.context() as mp:  # tracked: the nnunet trial has its nested run, no registry model
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent / 'mlflow.db'}")
        run_sweep(cfg)
    return out


def test_a_sweep_with_an_nnunet_arm_reports_nnunets_own_predictions(nnunet_sweep: Path, cohort: Path) -> None:
    results = json.loads((nnunet_sweep / "report" / "results.json").read_text())
    assert results["errors"] == []
    rows = {r["init_tag"]: r for r in results["rows"]}
    assert set(rows) == {"random", "nnunet"}
    nn, rand = rows["nnunet"], rows["random"]
    assert nn["engine"] == "nnunet" and nn["nnunet"]["configuration"] == "2d"
    assert nn["train_ids"] == rand["train_ids"] and nn["test_ids"] == rand["test_ids"]  # the same draw, paired
    # the row's Dice is nnU-Net's own prediction file scored against the label file on the original grid
    work = Path(nn["out_dir"]) / "nnunet"
    for sid in nn["test_ids"]:
        pred = nib.load(work / "predictions" / f"{sid}.nii.gz")
        truth = nib.load(cohort / "labelsTr" / f"{sid}.nii.gz")
        assert pred.shape == truth.shape and np.allclose(pred.affine, truth.affine, atol=1e-4)
        dice = dice_score(np.asarray(pred.dataobj) == 1, np.asarray(truth.dataobj) == 1)
        assert dice == pytest.approx(nn["test_per_volume"][sid]["dice"][0], abs=1e-9)
    log = (work / "results").rglob("training_log_*.txt")
    assert any("Epoch 0" in p.read_text() for p in log)  # nnU-Net's own trainer wrote its log
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{nnunet_sweep.parent / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(ids, filter_string="params.engine = 'nnunet'")
    assert run.data.metrics["test_dice"] == pytest.approx(nn["test_dice"])
    md = (nnunet_sweep / "report" / "report.md").read_text()
    assert "| nnunet |" in md and "## Against nnU-Net from scratch" in md
    assert "random" in results["stats"]["sentences"] or "nnunet" in results["stats"]["sentences"]


def test_an_nnunet_checkpoint_made_by_nnunet_loads_as_init(nnunet_sweep: Path, tmp_path: Path) -> None:
    """nnU-Net's checkpoint_final.pth of the sweep above (2d): mri-ssl takes 3D networks only, one line; a 3D
    checkpoint written the way nnU-Net's trainer writes it loads with encoder and decoder, head new."""
    from downstream.inference import load_init

    [ckpt] = (nnunet_sweep / "trials").rglob("checkpoint_final.pth")
    with pytest.raises(ExportError, match="Conv2d network; mri-ssl takes 3D nnU-Net / nnssl networks only"):
        load_init(str(ckpt), trust=True)
    with pytest.raises(ExportError, match="holds Python objects beyond tensors.*--trust-checkpoint") as exc:
        load_init(str(ckpt))
    assert "\n" not in str(exc.value)


def test_a_3d_nnunet_checkpoint_loads_as_init_with_its_plans(tmp_path: Path) -> None:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from downstream.inference import load_init

    plans = _plans_3d()
    conf = plans["configurations"]["3d_fullres"]["architecture"]
    net = get_network_from_plans(conf["network_class_name"], conf["arch_kwargs"], conf["_kw_requires_import"], 2, 3,
                                 deep_supervision=True)
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                     "labels": {"background": 0, "a": 1, "b": 2},
                                                     "numTraining": 2, "file_ending": ".nii.gz"}))
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 5},
               folder / "fold_0" / "checkpoint_final.pth")
    export, _ = load_init(str(folder / "fold_0" / "checkpoint_final.pth"))
    assert export["task"] == "nnunet" and export["model_config"].in_channels == 2
    assert export["preprocessing"]["spacing"] == [3.0, 1.5, 1.5] and export["info"]["patch_size"] == [16, 32, 32]
    model, report = build_unet(export, 2, source="ckpt", strict=False, in_channels=2)
    enc = {f"encoder.{k}" for k in net.encoder.state_dict()}
    dec = {f"decoder.{k}" for k in net.decoder.state_dict() if not k.startswith("seg_layers.")}
    assert set(report.loaded) == enc | dec  # every encoder and decoder key
    assert report.missing and all(".seg_layers." in f".{k}" or k.startswith("decoder.seg_layers") for k in
                                  report.missing)  # the head is new
    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v)


def _plans_3d() -> dict:
    from ssl_pretrain.models.dna import TINY_ARCH

    arch = {**TINY_ARCH, "n_conv_per_stage": [1, 1, 1]}
    return {"dataset_name": "Dataset990_x", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
            [3.0, 1.5, 1.5], "original_median_shape_after_transp": [16, 32, 32], "image_reader_writer":
            "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": [16, 32, 32], "median_image_size_in_voxels": [16, 32, 32],
                "spacing": [3.0, 1.5, 1.5], "normalization_schemes": ["ZScoreNormalization"] * 2,
                "use_mask_for_norm": [False, False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
                "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
                "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                              "nonlin"]}}},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


@pytest.fixture(scope="module")
def nnunet3d_from_export(cohort: Path, tmp_path_factory: pytest.TempPathFactory, ray_session) -> tuple[Path, Path]:
    """``init=[nnunet:EXPORT]`` with a 3D export: nnU-Net's planner plans the cohort, the plans get the export's
    architecture, nnU-Net's trainer loads the export with its own load_pretrained_weights and trains 3d_fullres."""
    from downstream.sweep import run_sweep
    from tests.downstream.test_finetune3d import _pretrained_3d_export

    base = tmp_path_factory.mktemp("nnunet3d")
    exp = _pretrained_3d_export(base / "mim" / "model.pt")
    root = Path(__file__).parents[2]
    cfg = load_config(SweepConfig, path=root / "launch/configs/sweep_debug3d.yaml", overrides=[
        f"data.root={cohort}", f"out_dir={base / 'sw'}", f"data.cache_dir={cohort.parent / 'cache3d'}",
        "data.n_val=1", "data.n_test=1", f"init=[nnunet:{exp}]", "n_labeled=[1]", "seeds=[0]",
        "tracking.enabled=false", "search.cpus_per_trial=1", *NNUNET_TINY])
    run_sweep(cfg)
    return base / "sw", exp


def test_nnunet_finetunes_an_export_and_its_checkpoint_loads_back_as_init(nnunet3d_from_export) -> None:
    from downstream.inference import load_init

    sw, exp = nnunet3d_from_export
    results = json.loads((sw / "report" / "results.json").read_text())
    assert results["errors"] == []
    [row] = results["rows"]
    assert row["init_tag"] == "nnunet-mim" and row["nnunet"]["configuration"] == "3d_fullres"
    assert row["nnunet"]["plans"] == "nnUNetPlans_mrissl" and row["nnunet"]["pretrained_weights"]
    # nnU-Net's own load_pretrained_weights took the export's file (its banner in nnU-Net's output)
    assert "Loading pretrained weights from file" in (Path(row["out_dir"]) / "nnunet" / "nnunet.log").read_text()
    # nnU-Net's checkpoint_final.pth (a pickle with numpy values: refused without trust) loads as an init
    ckpt = Path(row["nnunet"]["checkpoint"])
    with pytest.raises(ExportError, match="--trust-checkpoint"):
        load_init(str(ckpt))
    export, _ = load_init(str(ckpt), trust=True)
    assert export["task"] == "nnunet" and export["model_config"].arch["features_per_stage"] == [8, 16, 32]
    model, report = build_unet(export, 2, source=str(ckpt), strict=False, in_channels=1)
    assert report.loaded and not report.unexpected
    assert all(k.startswith("decoder.seg_layers") for k in report.missing)  # every other key loaded; head new
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["network_weights"]
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, trained[f"encoder.{k}"])


def test_export_nnunet_writes_plans_whose_network_takes_every_encoder_key(nnunet3d_from_export,
                                                                          tmp_path: Path) -> None:
    """launch/export_nnunet.py on the plans nnU-Net's own planner wrote; nnU-Net's get_network_from_plans
    builds the network from the written plans and nnU-Net's load_pretrained_weights loads the file."""
    import importlib.util

    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    sw, exp = nnunet3d_from_export
    [planned] = sw.rglob("preprocessed/*/nnUNetPlans.json")
    root = Path(__file__).parents[2]
    spec = importlib.util.spec_from_file_location("launch_export_nnunet", root / "launch/export_nnunet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "dataset.json").write_text((planned.parent / "dataset.json").read_text())
    assert mod.main(["--model", str(exp), "--plans", str(planned), "--plans-out", str(out)]) == 0
    plans = json.loads((out / "nnUNetPlans_mrissl.json").read_text())
    conf = PlansManager(plans).get_configuration("3d_fullres")
    net = get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                 conf.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=True)
    load_pretrained_weights(net, str(out / "nnUNetPlans_mrissl_pretrained.pth"))
    export = load_export(exp)
    for k, v in export["encoder"].items():  # every encoder key, loaded by nnU-Net's function
        torch.testing.assert_close(net.encoder.state_dict()[k], v)
    for k, v in export["decoder"].items():
        if not k.startswith("seg_layers."):
            torch.testing.assert_close(net.decoder.state_dict()[k], v)
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"  # no re-preprocessing
    # a 2D export cannot go to nnU-Net: one line
    from .conftest import make_export

    flat = make_export(tmp_path / "2d.pt")
    assert mod.main(["--model", str(flat), "--plans", str(planned), "--plans-out", str(out)]) == 2


def test_an_nnssl_checkpoint_loads_its_encoder_by_the_adaptation_plan(tmp_path: Path) -> None:
    """nnssl's checkpoint format (nnssl AbstractTrainer.save_checkpoint: network_weights + the serialized
    AdaptationPlan): a ResidualEncoderUNet's stem and stages load as the encoder; the decoder (MAE's
    reconstruction decoder) and head start new; spacing and patch size come from the plan."""
    from downstream.inference import load_init
    from ssl_pretrain.models.dna import build_network

    arch = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.modules.activation.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(0)
    net = build_network("ResidualEncoderUNet", arch, input_channels=1, num_classes=1)
    plan = {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch,
                                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                              "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                              "configurations": {"onemmiso": {"spacing": [1.0, 1.0, 1.0], "patch_size": [160] * 3}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [32, 64, 64],
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": net.state_dict(), "current_epoch": 1000, "trainer_name": "BaseMAETrainer",
                "nnssl_adaptation_plan": plan}, path)
    export, _ = load_init(str(path))
    assert export["task"] == "nnssl" and export["decoder"] is None
    assert export["preprocessing"]["spacing"] == [1.0, 1.0, 1.0] and export["info"]["patch_size"] == [32, 64, 64]
    model, report = build_unet(export, 3, source="nnssl", strict=False, in_channels=1)
    assert {k.split(".")[1] for k in report.loaded} == {"stem", "stages"}
    assert all(k.startswith("decoder.") for k in report.missing)
    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v)
    # two-channel data: the input projection is adapted (reported as reshaped); two identical channels give the
    # pretrained network's own first activations (positive control)
    two, report2 = build_unet(export, 3, source="nnssl", strict=False, in_channels=2)
    stem = "encoder.stem.convs.0"
    assert sorted(report2.reshaped) == [f"{stem}.all_modules.0.weight", f"{stem}.conv.weight"]
    assert report2.counts()["reshaped"] == 2 and two.encoder.stem.convs[0].conv.weight.shape[1] == 2
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(two.encoder.stem.convs[0].conv(x.repeat(1, 2, 1, 1, 1)),
                                   net.encoder.stem.convs[0].conv(x))
    # an mri-ssl export records no input projection: a channel mismatch stays one line
    from tests.downstream.test_finetune3d import _pretrained_3d_export

    mine = load_export(_pretrained_3d_export(tmp_path / "mim.pt"))
    with pytest.raises(ExportError, match="in_channels=1, the data has 2"):
        build_unet(mine, 3, source="mim", strict=False, in_channels=2)


def test_trust_checkpoint_is_a_flag_of_finetune_and_sweep() -> None:
    from downstream.config import FinetuneConfig
    from mri_ssl.cli import parse_run_config
    from ssl_pretrain.config import parse_config

    assert parse_run_config(FinetuneConfig, ["--trust-checkpoint"], None).trust_checkpoint is True
    assert parse_run_config(FinetuneConfig, [], None).trust_checkpoint is False
    assert load_config(SweepConfig, overrides=["trust_checkpoint=true"]).trust_checkpoint is True
    cfg, _ = parse_config(SweepConfig, ["trust_checkpoint=true"], doc=None)
    assert cfg.trust_checkpoint is True


def test_the_sweep_fingerprint_ignores_trust_and_the_nnunet_section_without_an_nnunet_arm(tmp_path: Path) -> None:
    """Re-running a sweep with --trust-checkpoint, or after the nnunet section was added, restores it (same
    fingerprint); nnunet.epochs defines a sweep that has an nnunet arm."""
    from downstream.sweep import _fingerprint, _resolve_inits

    def fp(*overrides: str) -> str:
        cfg = load_config(SweepConfig, overrides=[f"data.root={tmp_path}", f"out_dir={tmp_path / 'sw'}", *overrides])
        return _fingerprint(cfg, _resolve_inits(cfg, tmp_path / "sw"))

    assert fp() == fp("trust_checkpoint=true") == fp("nnunet.epochs=3")
    assert fp("init=[random, nnunet]") != fp("init=[random, nnunet]", "nnunet.epochs=3")
