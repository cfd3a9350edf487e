"""Finetuning: outputs, exact resume after a crash, pretrained-init loading, and bad inits."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream.config import FinetuneConfig
from downstream.finetune import InjectedFault, finetune
from ssl_pretrain.config import load_config
from ssl_pretrain.export import load_export
from ssl_pretrain.models.unet import UNet, UNetConfig

from .conftest import BUDGET, PARAMS32, make_export, tiny_overrides

PARAMS_FOV32 = dataclasses.replace(PARAMS32, field_of_view="pad")  # finetuning keeps whole slices


def _cfg(cohort: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, overrides=[*tiny_overrides(cohort, out, size=32), *extra])


def test_finetune_outputs_and_exact_resume_after_a_crash(cohort: Path, tmp_path: Path) -> None:
    plain = finetune(_cfg(cohort, tmp_path / "plain", "n_labeled=2"))
    out = tmp_path / "crash"
    with pytest.raises(InjectedFault):
        finetune(_cfg(cohort, out, "n_labeled=2", "train.inject_fault_at_step=10"))
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / "model.pt").exists()
    # re-running the same command continues from the checkpoint (resume: auto)
    resumed = finetune(_cfg(cohort, out, "n_labeled=2", "train.inject_fault_at_step=10"))
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 20
    # same batches, augmentation and weights after the resume: identical curve and test metrics
    assert [h["val_dice"] for h in resumed["history"]] == [h["val_dice"] for h in plain["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in plain["history"]]
    assert resumed["test_dice"] == plain["test_dice"]
    assert 0.0 < plain["test_dice"] <= 1.0 and len(plain["test_per_volume"]) == 2
    assert 0.0 <= plain["test_nsd"] <= 1.0 and all("nsd" in v for v in plain["test_per_volume"].values())
    export = load_export(tmp_path / "plain" / "model.pt")
    assert export["task"] == "segmentation" and export["num_classes"] == 2 and export["head"] is not None
    assert export["preprocessing"] == PARAMS_FOV32.to_dict()
    for name in ("config.yaml", "metrics.json", "result.json", "contours.png"):
        assert (tmp_path / "plain" / name).is_file()


def test_pretrained_init_reports_loaded_and_missing_keys(cohort: Path, tmp_path: Path) -> None:
    exp = make_export(tmp_path / "pre" / "export" / "model.pt")
    res = finetune(_cfg(cohort, tmp_path / "ft", f"init={exp}", "n_labeled=1", "train.max_steps=10",
                        "train.freeze_encoder_steps=5", "data.preprocess={size: [64, 64]}"))
    n_enc = len(UNet(UNetConfig(widths=(8, 16, 32)), 2).encoder.state_dict())
    n_all = len(UNet(UNetConfig(widths=(8, 16, 32)), 2).state_dict())
    assert res["load_report"]["loaded"] == n_enc  # the encoder; decoder and head start from scratch
    assert res["load_report"]["missing"] == n_all - n_enc and res["load_report"]["unexpected"] == 0
    assert res["pretrain_info"] == BUDGET and res["init_task"] == "contrastive"
    assert res["history"][0]["encoder_frozen"] == 0.0  # frozen for steps 0-4, the eval at step 10 is after
    # the export's preprocessing (32×32) wins over data.preprocess
    assert load_export(tmp_path / "ft" / "model.pt")["preprocessing"] == PARAMS_FOV32.to_dict()


def test_bad_inits_and_n_labeled_give_one_line(cohort: Path, tmp_path: Path, mlflow_uri: str) -> None:
    def err(*extra: str) -> str:
        with pytest.raises(ValueError) as e:
            finetune(_cfg(cohort, tmp_path / "bad", *extra))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    old = tmp_path / "old.pt"
    torch.save({"format_version": 99, "task": "contrastive"}, old)
    assert "format version 99" in err(f"init={old}")
    assert "in_channels=2, the data has 1" in err(f"init={make_export(tmp_path / 'c2.pt', in_channels=2)}")
    lying = make_export(tmp_path / "w.pt", widths=(4, 8, 16))
    payload = torch.load(lying, weights_only=True)
    payload["model_config"]["widths"] = [8, 16, 32]  # declared widths do not match the weights
    torch.save(payload, lying)
    assert "widths / channels do not match" in err(f"init={lying}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert "not a loadable model export" in err(f"init={junk}")
    assert "does not resolve" in err("init=runs:/0123456789abcdef0123456789abcdef/export/model.pt")
    assert "neither 'random'" in err(f"init={tmp_path / 'nope.pt'}")
    assert "n_labeled: 5 is larger than the training pool of 4" in err("n_labeled=5")


def test_launch_finetune_cli_prints_one_line_on_bad_input(cohort: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("launch_finetune", Path(__file__).parents[2] / "launch/finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main([*tiny_overrides(cohort, tmp_path / "cli", size=32), "n_labeled=9"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: n_labeled: 9 is larger")


def test_data_preprocess_is_typed_and_checked_by_the_config_loader(cohort: Path, tmp_path: Path) -> None:
    from ssl_pretrain.config import ConfigError, flatten
    from ssl_pretrain.data.preprocess import PreprocessParams

    cfg = _cfg(cohort, tmp_path / "t")
    assert isinstance(cfg.data.preprocess, PreprocessParams) and cfg.data.preprocess.size == (32, 32)
    assert flatten(cfg)["data.preprocess.size"] == [32, 32]  # YAML / MLflow see plain lists
    with pytest.raises(ConfigError) as e:
        _cfg(cohort, tmp_path / "t", "data.preprocess.norm=max")
    assert "data.preprocess" in str(e.value) and "norm" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.preprocess.sizes: unknown key"):
        _cfg(cohort, tmp_path / "t", "data.preprocess.sizes=[4, 4]")


def _crash(cohort: Path, out: Path, at: int, *extra: str) -> None:
    with pytest.raises(InjectedFault):
        finetune(_cfg(cohort, out, "n_labeled=2", f"train.inject_fault_at_step={at}", *extra))


def test_resume_refuses_a_checkpoint_of_another_config(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _crash(cohort, out, 10)
    written = (out / "config.yaml").read_text()

    def refused(*extra: str) -> str:
        with pytest.raises(ValueError) as e:
            finetune(_cfg(cohort, out, *extra))
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = refused("n_labeled=1", "seed=7")  # would write a result.json claiming 1 volume, seed 7
    assert "n_labeled" in msg and "seed" in msg and "state.pt" in msg
    assert "model.widths" in refused("n_labeled=2", "model.widths=[4, 8, 16]")
    assert "train.lr" in refused("n_labeled=2", "train.lr=1e-2")
    assert "resume=auto" in refused("n_labeled=2", "resume=never")
    assert (out / "config.yaml").read_text() == written  # a refused run changes nothing
    # what does not change the result may differ: threads, fault hook, tracking
    res = finetune(_cfg(cohort, out, "n_labeled=2", "train.num_threads=1"))
    assert res["resumed_from_step"] == 10


def test_truncated_checkpoint_falls_back_to_the_previous_one(cohort: Path, tmp_path: Path, caplog) -> None:
    plain = finetune(_cfg(cohort, tmp_path / "plain", "n_labeled=2", "train.max_steps=30"))
    out = tmp_path / "run"
    _crash(cohort, out, 20, "train.max_steps=30")
    state = out / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        res = finetune(_cfg(cohort, out, "n_labeled=2", "train.max_steps=30"))
    assert any(str(state) in r.getMessage() and "state.prev.pt" in r.getMessage() for r in caplog.records)
    assert res["resumed_from_step"] == 10 and res["test_dice"] == plain["test_dice"]
    # nothing readable left: one line, no traceback
    out2 = tmp_path / "run2"
    _crash(cohort, out2, 20, "train.max_steps=30")
    for name in ("state.pt", "state.prev.pt"):
        (out2 / "checkpoint" / name).write_bytes(b"\x80\x02 truncated")
    with pytest.raises(ValueError) as e:
        finetune(_cfg(cohort, out2, "n_labeled=2", "train.max_steps=30"))
    assert "state.pt" in str(e.value) and "unreadable" in str(e.value) and "\n" not in str(e.value)


def test_resumed_run_continues_its_mlflow_run(cohort: Path, tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    out = tmp_path / "run"
    _crash(cohort, out, 10, "tracking.enabled=true")
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["mlflow_run_id"] == run_id
    client.update_run(run_id, status="RUNNING")  # as a kill -9 leaves it
    res = finetune(_cfg(cohort, out, "n_labeled=2", "tracking.enabled=true"))
    assert res["resumed_from_step"] == 10 and res["mlflow_run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["n_labeled"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val_dice")] == [10, 20]
    # killed before its first checkpoint: the orphan is marked KILLED, a fresh run takes over
    out2 = tmp_path / "run2"
    exp = client.get_experiment_by_name("mri-ssl/finetune").experiment_id
    orphan = client.create_run(exp).info.run_id
    out2.mkdir()
    (out2 / "mlflow_run_id").write_text(orphan)
    res2 = finetune(_cfg(cohort, out2, "n_labeled=2", "tracking.enabled=true", "train.max_steps=10"))
    assert client.get_run(orphan).info.status == "KILLED" and res2["mlflow_run_id"] != orphan


def test_unusable_out_dir_and_widths_give_one_line(cohort: Path, tmp_path: Path) -> None:
    from ssl_pretrain.config import ConfigError

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        with pytest.raises(ValueError) as e:
            finetune(_cfg(cohort, out))
        assert "out_dir" in str(e.value) and str(afile) in str(e.value) and "\n" not in str(e.value)
    for widths in ("[]", "[0, 8]"):
        with pytest.raises(ConfigError, match=r"model.widths: need at least 2 positive widths"):
            _cfg(cohort, tmp_path / "w", f"model.widths={widths}")


def _wide_cohort(root: Path, n: int = 8) -> Path:
    """Volumes with a field of view twice the 32-pixel patch and a disc off-centre, partly outside the
    central 32×32 window (the old centre crop)."""
    import json

    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(5)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        cx, cy = rng.choice([12, 52]) + rng.integers(-2, 3), rng.choice([12, 52]) + rng.integers(-2, 3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 10**2  # indexed [x, y]: voxel axes are (X, Y)
        label = np.repeat(disc[:, :, None], 6, axis=2).astype(np.uint8)
        image = (label * 1.0 + rng.normal(0, 0.15, label.shape)).astype(np.float32)
        affine = np.diag([1.0, 1.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"w{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"w{i}.nii.gz")
    training = [{"image": f"./imagesTr/w{i}.nii.gz", "label": f"./labelsTr/w{i}.nii.gz"} for i in range(n)]
    (root / "dataset.json").write_text(
        json.dumps({"name": "wide", "labels": {"0": "background", "1": "disc"}, "training": training})
    )
    return root


def test_whole_field_of_view_structure_outside_the_old_crop_window_is_predicted_and_counted(
    tmp_path: Path,
) -> None:
    import nibabel as nib
    import numpy as np

    from downstream.metrics import dice_score
    from downstream.predict import predict

    root = _wide_cohort(tmp_path / "wide")
    cfg = load_config(FinetuneConfig, overrides=[
        f"data.root={root}", f"out_dir={tmp_path / 'ft'}",
        "data.preprocess={spacing: [1.0, 1.0], size: [32, 32], norm: minmax, clip: [0.0, 100.0]}",
        "data.n_val=2", "data.n_test=2", "n_labeled=0", "model.widths=[8, 16, 32]", "train.max_steps=60",
        "train.eval_every=30", "train.batch_size=8", "train.warmup_steps=2", "train.lr=3e-3",
        "tracking.enabled=false"])
    res = finetune(cfg)
    outside = np.ones((64, 64, 6), bool)
    outside[16:48, 16:48] = False  # everything the old 32×32 centre crop dropped
    for sid in res["test_ids"]:
        truth = np.asarray(nib.load(root / "labelsTr" / f"{sid}.nii.gz").dataobj) == 1
        assert truth[outside].sum() > 0.4 * truth.sum()  # much of the structure lies outside the window
        (mask_path,) = predict(res["model_path"], root / "imagesTr" / f"{sid}.nii.gz", tmp_path / f"{sid}.nii.gz")
        mask = np.asarray(nib.load(mask_path).dataobj) == 1
        assert mask.shape == truth.shape
        assert (mask & truth)[outside].sum() > 0.7 * truth[outside].sum()  # predicted outside the window too
        # the test Dice is the Dice of the whole structure on the original grid, as predict.py writes it
        assert res["test_per_volume"][sid]["dice"][0] == pytest.approx(dice_score(mask, truth), abs=1e-9)
    assert res["test_dice"] > 0.6


def test_transfer_parts_and_pretrained_lr_scale(cohort: Path, tmp_path: Path) -> None:
    from downstream.finetune import _build_run

    exp = make_export(tmp_path / "pre.pt", with_decoder=True)
    n_enc = len(UNet(UNetConfig(widths=(8, 16, 32)), 2).encoder.state_dict())
    n_dec = len(UNet(UNetConfig(widths=(8, 16, 32)), 2).decoder.state_dict())
    both = _build_run(_cfg(cohort, tmp_path / "a", f"init={exp}"))
    assert len(both.load_report.loaded) == n_enc + n_dec
    enc = _build_run(_cfg(cohort, tmp_path / "b", f"init={exp}", "transfer=encoder", "train.pretrained_lr_scale=0.1"))
    assert len(enc.load_report.loaded) == n_enc
    assert {k.split(".")[0] for k in enc.load_report.missing} == {"decoder", "head"}
    slow, fast = enc.opt.param_groups
    assert slow["initial_lr"] == pytest.approx(3e-4) and fast["initial_lr"] == pytest.approx(3e-3)
    loaded_params = {id(p) for n, p in enc.model.named_parameters() if n.startswith("encoder.")}
    assert {id(p) for p in slow["params"]} == loaded_params
    assert sum(len(g["params"]) for g in enc.opt.param_groups) == len(list(enc.model.parameters()))


@pytest.mark.parametrize("size", [(32, 32), (16, 24, 24)], ids=["2d", "3d"])
def test_monai_augmentation_is_seeded_by_the_run_generator_only(size: tuple[int, ...]) -> None:
    import numpy as np

    from downstream.config import FinetuneAugmentConfig
    from downstream.patches import augment, build_augmentation

    always = FinetuneAugmentConfig(**{f: 1.0 for f in FinetuneAugmentConfig.__dataclass_fields__ if f.startswith("p_")})
    transforms = build_augmentation(always, size)
    image = torch.randn(3, 1, *size)
    label = torch.zeros(3, *size, dtype=torch.long)
    label[(slice(None), *(slice(n // 4, 3 * n // 4) for n in size))] = 1

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(999 + seed)  # global RNGs must not matter
        np.random.seed(999 + seed)
        return augment(transforms, image, label, torch.Generator().manual_seed(seed))

    (a_img, a_lab), (b_img, b_lab), (c_img, _) = run(0), run(0), run(1)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)  # the generator alone decides
    assert not torch.equal(a_img, c_img) and not torch.equal(a_img, image)
    assert a_img.shape == image.shape and a_lab.dtype == torch.long and set(a_lab.unique().tolist()) <= {0, 1}


def test_an_oracle_scores_dice_one_up_to_the_resampling_loss(cohort: Path, tmp_path: Path) -> None:
    """Known answer on a resampled, anisotropic, non-RAS cohort (issue 26.14).

    Each image is its own label (×100, plus noise), so a per-pixel threshold network is an oracle:
    its only loss is the resampling's. That bound is computed here without the evaluation code (the
    label pushed through the preprocessing grid and back); the evaluation must reproduce it exactly,
    and the bound itself must be high (the round trip keeps a non-RAS, anisotropic file's geometry).
    """
    import nibabel as nib
    import torch
    from torch import nn

    from downstream.data import prepare
    from downstream.inference import evaluate_test
    from downstream.metrics import dice_score
    from ssl_pretrain.data.preprocess import PreprocessParams, preprocess, to_original_grid

    root = tmp_path / "oracle"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for lab_file in sorted((cohort / "labelsTr").glob("*.nii.gz")):
        lab = nib.load(lab_file)
        img = np.asanyarray(lab.dataobj).astype(np.float32) * 100 + rng.normal(0, 1, lab.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, lab.affine, lab.header), root / "imagesTr" / lab_file.name)
        nib.save(lab, root / "labelsTr" / lab_file.name)
    (root / "dataset.json").write_text((cohort / "dataset.json").read_text())
    params = PreprocessParams(spacing=(7.5, 9.75), size=(32, 32), norm="minmax", clip=(0.0, 100.0),
                              field_of_view="pad")  # 1.5× coarser than the files' 5 × 6.5 mm grid
    data = prepare(root, params, n_val=1, n_test=3, split_seed=0, cache_dir=tmp_path / "cache")
    oracle = nn.Conv2d(1, 2, 1)
    with torch.no_grad():  # logit of class 1 = 40 (x - 0.5), class 0 its negative: argmax = x > 0.5
        oracle.weight[:] = torch.tensor([-40.0, 40.0]).view(2, 1, 1, 1)
        oracle.bias[:] = torch.tensor([20.0, -20.0])
    per, _, _ = evaluate_test(oracle, data, data.splits.test, torch.device("cpu"), roi_size=params.size, overlap=0.5)
    for sid in data.splits.test:
        vol = preprocess(root / "imagesTr" / f"{sid}.nii.gz", params)
        back = to_original_grid((vol.image[:, 0] > 0.5).astype(np.uint8), vol.geometry)
        truth = np.asanyarray(nib.load(root / "labelsTr" / f"{sid}.nii.gz").dataobj)
        bound = dice_score(back == 1, truth == 1)
        assert 0.9 < bound < 1.0, (sid, bound)  # resampled for real, and the geometry survives the round trip
        assert per[sid]["dice"] == [pytest.approx(bound, abs=1e-9)]


def test_sliding_windows_of_an_identity_network_return_the_input() -> None:
    import torch
    from torch import nn

    from downstream.inference import predict_probabilities

    x = np.random.default_rng(0).normal(size=(2, 3, 45, 37)).astype(np.float32)  # larger than the window
    out = predict_probabilities(nn.Identity(), x, roi_size=(16, 16), overlap=0.5)  # classes first: (K, S, H, W)
    np.testing.assert_allclose(out, torch.softmax(torch.from_numpy(x), dim=1).numpy().transpose(1, 0, 2, 3), atol=1e-6)


@pytest.mark.slow
def test_finetuning_listens_on_loopback_only(cohort: Path, tmp_path: Path) -> None:
    """Issue 25.4: a finetuning run (tracked to a local MLflow store) opens no socket off loopback, polled
    from start to end (torch needs no rendezvous for one process; nothing else may listen either)."""
    import os
    import subprocess
    import sys
    import time

    from tests.netcheck import is_loopback, listeners

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(root / "launch" / "finetune.py"), *tiny_overrides(cohort, tmp_path / "run", size=32),
           "tracking.enabled=true", "train.max_steps=40"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, polls = set(), 0
    while proc.poll() is None:
        seen.update((c, a, p) for c, a, p in listeners(proc.pid))
        polls += 1
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert polls >= 10  # the run was watched while it trained, not only at its start
    assert not [s for s in seen if not is_loopback(s[1])], seen


def test_2p5d_finetunes_and_predicts_with_neighbouring_slices_as_channels(cohort: Path, tmp_path: Path) -> None:
    """Issue 23.4: data.preprocess.context_slices=1 gives the 2D model 3 input channels (a slice and its two
    neighbours); the export records it, so prediction stacks the same way and a pretrained 2.5D export's
    setting wins over the config's."""
    import nibabel as nib

    from downstream.predict import predict

    res = finetune(_cfg(cohort, tmp_path / "ft", "n_labeled=1", "train.max_steps=10",
                        "data.preprocess={spacing: [10.0, 13.0], size: [32, 32], context_slices: 1}"))
    export = load_export(tmp_path / "ft" / "model.pt")
    assert export["preprocessing"]["context_slices"] == 1 and export["model_config"].in_channels == 3
    assert 0.0 <= res["test_dice"] <= 1.0
    src = cohort / "imagesTr" / f"{res['test_ids'][0]}.nii.gz"
    [mask] = predict(str(tmp_path / "ft" / "model.pt"), str(src), str(tmp_path / "mask.nii.gz"))
    assert nib.load(mask).shape == nib.load(src).shape
    # a 2.5D init decides the stacking of the run it initialises (its preprocessing wins, as always)
    again = finetune(_cfg(cohort, tmp_path / "ft2", f"init={tmp_path / 'ft' / 'model.pt'}", "n_labeled=1",
                          "train.max_steps=2", "train.eval_every=2"))
    assert again["load_report"]["loaded"] > 0
    assert load_export(tmp_path / "ft2" / "model.pt")["preprocessing"]["context_slices"] == 1
