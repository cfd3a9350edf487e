"""3D finetuning and inference (issue 23): whole volumes, the library's network, sliding windows, TTA, geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from downstream.config import FinetuneConfig
from downstream.finetune import finetune
from downstream.inference import predict_probabilities
from downstream.metrics import dice_score
from downstream.predict import predict
from ssl_pretrain.config import load_config
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.export import ExportError, build_unet, load_export, save_export
from ssl_pretrain.models.dna import TINY_ARCH, Segmenter3D
from ssl_pretrain.models.unet import UNetConfig
from tests.downstream.conftest import make_export

SPACING = (8.0, 8.0, 8.0)  # the cohort's volumes become ~(13-25, 40, 52) voxels
TINY3D = UNetConfig(in_channels=1, spatial_dims=3, arch=TINY_ARCH)


def _arch_yaml(arch: dict) -> str:
    import yaml

    return yaml.safe_dump(arch, default_flow_style=True, width=10**6).strip()  # one override, the whole arch


def _cfg(cohort: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, overrides=[
        f"data.root={cohort}", f"out_dir={out}", f"data.cache_dir={cohort.parent / 'cache3d'}",
        f"data.preprocess={{spacing: {list(SPACING)}}}", "data.n_val=1", "data.n_test=2",
        f"model.arch={_arch_yaml(TINY_ARCH)}", "train.patch_size=[16, 32, 32]", "train.batch_size=2",
        "train.max_steps=30", "train.eval_every=15", "train.warmup_steps=2", "train.lr=1e-2",
        "train.foreground_fraction=0.5", "train.aug={p_elastic: 0.0}", "tracking.enabled=false", *extra,
    ])


def _pretrained_3d_export(path: Path, seed: int = 7) -> Path:
    """A 3D export as MIM pretraining writes it: the library's encoder and decoder (a 1-channel reconstruction
    head in ``seg_layers``), no segmentation classes."""
    torch.manual_seed(seed)
    net = Segmenter3D(TINY3D, num_classes=1)
    params = PreprocessParams(spacing=SPACING)
    return save_export(path, task="mim", model_config=TINY3D, encoder_state=net.encoder.state_dict(),
                       decoder_state=net.decoder.state_dict(), preprocessing=params.to_dict(), info={"steps": 10})


def _reoriented_copy(src: Path, dst: Path, repeat_axis: int) -> nib.Nifti1Image:
    """``src`` stored differently: voxels repeated twice along one file axis (half the spacing there: a new
    anisotropy) and the axes permuted and flipped (another non-RAS orientation); world positions unchanged."""
    img = nib.load(src)
    data = np.repeat(np.asanyarray(img.dataobj), 2, axis=repeat_axis)
    affine = img.affine.copy()
    affine[:3, 3] -= 0.25 * affine[:3, repeat_axis]  # the two halves of a voxel: centres at i -/+ 1/4
    affine[:3, repeat_axis] *= 0.5
    fine = nib.Nifti1Image(data, affine)
    copy_img = fine.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))
    nib.save(copy_img, dst)
    return fine


def test_3d_finetune_then_predict_on_a_reoriented_anisotropic_copy(cohort: Path, tmp_path: Path) -> None:
    """Issue 23: finetune in 3D from a 3D export, predict the original and a copy stored with another non-RAS,
    anisotropic affine: the copy's mask is on the copy's grid and agrees with the original's (Dice >= 0.9)."""
    exp = _pretrained_3d_export(tmp_path / "pre" / "model.pt")
    res = finetune(_cfg(cohort, tmp_path / "ft", f"init={exp}", "n_labeled=2", "train.test_tta=true"))
    n_decoder_head = len([k for k in Segmenter3D(TINY3D, 2).decoder.state_dict() if k.startswith("seg_layers.")])
    assert res["load_report"]["missing"] == n_decoder_head  # the head is new: the MIM reconstruction head is not
    assert res["load_report"]["loaded"] == len(Segmenter3D(TINY3D, 2).state_dict()) - n_decoder_head
    assert res["test_dice"] > 0.5, res["test_dice"]  # learned the liver in 30 steps (chance is far lower)
    model = tmp_path / "ft" / "model.pt"
    export = load_export(model)
    assert export["model_config"].spatial_dims == 3 and export["info"]["patch_size"] == [16, 32, 32]

    sid = res["test_ids"][0]
    src = cohort / "imagesTr" / f"{sid}.nii.gz"
    fine = _reoriented_copy(src, tmp_path / "copy.nii.gz", repeat_axis=1)
    out = predict(str(model), str(src), str(tmp_path / "orig_mask.nii.gz"), tta="all", save_probabilities=True,
                  largest_component=True)[0]
    probs = np.asanyarray(nib.load(tmp_path / "orig_probabilities.nii.gz").dataobj)
    assert probs.shape == (*nib.load(src).shape, 2)
    assert (probs.argmax(-1) == np.asanyarray(nib.load(out).dataobj)).mean() > 0.99  # the mask is their argmax
    out_copy = predict(str(model), str(tmp_path / "copy.nii.gz"), str(tmp_path / "copy_mask.nii.gz"), tta="all",
                       largest_component=True)[0]  # as the original was predicted
    mask, mask_copy = nib.load(out), nib.load(out_copy)
    copy_in = nib.load(tmp_path / "copy.nii.gz")
    assert mask_copy.shape == copy_in.shape and np.allclose(mask_copy.affine, copy_in.affine)  # the copy's grid
    assert mask.shape == nib.load(src).shape and np.allclose(mask.affine, nib.load(src).affine)
    # the copy's mask back in the fine (repeated) file order: compare with the original's mask repeated
    back = nib.Nifti1Image(np.asanyarray(mask_copy.dataobj), mask_copy.affine).as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(mask_copy.affine), nib.io_orientation(fine.affine)))
    assert np.allclose(back.affine, fine.affine)
    ref = np.repeat(np.asanyarray(mask.dataobj), 2, axis=1)
    assert ref.any()
    agreement = dice_score(np.asanyarray(back.dataobj) == 1, ref == 1)
    assert agreement >= 0.9, agreement


def test_export_dimensionality_must_match_the_run(cohort: Path, tmp_path: Path) -> None:
    exp2d = make_export(tmp_path / "e2d.pt")
    with pytest.raises(ExportError, match=r"a 2D \(slices, an H W spacing\) export cannot initialise a 3D"):
        finetune(_cfg(cohort, tmp_path / "a", f"init={exp2d}"))
    exp3d = _pretrained_3d_export(tmp_path / "e3d.pt")
    cfg = _cfg(cohort, tmp_path / "b", f"init={exp3d}", "data.preprocess={spacing: [10.0, 13.0], size: [32, 32]}")
    with pytest.raises(ExportError, match=r"a 3D \(a Z Y X spacing\) export cannot initialise a 2D"):
        finetune(cfg)
    with pytest.raises(ValueError, match=r"^train\.patch_size: \[16, 30, 32\] must be multiples of \[4, 4, 4\]"):
        finetune(_cfg(cohort, tmp_path / "c", "train.patch_size=[16, 30, 32]"))


def test_3d_transfer_choices_load_what_they_name() -> None:
    torch.manual_seed(0)
    seg = Segmenter3D(TINY3D, 2)
    export = {"model_config": TINY3D, "task": "segmentation", "num_classes": 2, "head": None,
              "encoder": seg.encoder.state_dict(), "decoder": seg.decoder.state_dict()}
    full, report = build_unet(export, 2, source="seg", strict=True)
    assert not report.missing and not report.unexpected  # a finetuned 3D model loads whole (prediction)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(full.eval()(x), seg.eval()(x))
    enc, report = build_unet(export, 2, source="seg", strict=False, parts=("encoder",))
    assert {k.split(".")[0] for k in report.loaded} == {"encoder"}
    other, report = build_unet(export, 3, source="seg", strict=False)  # other classes: a new head
    assert all(".seg_layers." in k for k in report.missing) and report.missing
    # the loaded parameters train at train.pretrained_lr_scale × lr, the new head at lr
    from downstream.finetune import _optimizer

    cfg = FinetuneConfig()
    opt = _optimizer(cfg, other, report)
    pretrained, fresh = opt.param_groups
    assert pretrained["lr"] == pytest.approx(cfg.train.lr * cfg.train.pretrained_lr_scale)
    assert fresh["lr"] == cfg.train.lr
    assert sum(p.numel() for p in fresh["params"]) == sum(p.numel() for n, p in other.named_parameters()
                                                           if ".seg_layers." in n) > 0  # the head, all of it


def test_sliding_windows_over_a_larger_volume_match_whole_volume_inference() -> None:
    """A network whose receptive field (5 voxels) is small against the window: windows of 16³ over a 24×40×32
    volume give the whole-volume probabilities (Gaussian blending of identical interior values). They differ
    only where a window's zero padding meets its border with a weight the blending does not dwarf: on the
    volume's faces, where every window is at its border along one axis and MONAI clamps the Gaussian's small
    weights to one minimum."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(4, 2, 3, padding=1))
    image = np.random.default_rng(0).normal(size=(1, 24, 40, 32)).astype(np.float32)
    whole = predict_probabilities(net, image, roi_size=(24, 40, 32))
    windows = predict_probabilities(net, image, roi_size=(16, 16, 16), overlap=0.5)
    assert windows.shape == whole.shape == (2, 24, 40, 32)
    diff = np.abs(windows - whole)
    assert diff.mean() < 5e-3 and diff.max() < 0.15, (diff.mean(), diff.max())
    sure = np.abs(whole[1] - 0.5) > 0.1  # a random network: many voxels sit near 0.5, where any change flips them
    assert (windows.argmax(0) == whole.argmax(0))[sure].mean() > 0.99
    # negative control: instance norm sees the whole volume, so its receptive field never fits a window
    normed = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.Conv3d(4, 2, 3, padding=1))
    far = np.abs(predict_probabilities(normed, image, roi_size=(16, 16, 16), overlap=0.5)
                 - predict_probabilities(normed, image, roi_size=(24, 40, 32)))
    assert far.mean() > 3 * diff.mean(), (far.mean(), diff.mean())
    tiny = predict_probabilities(net, image[:, :10, :12, :8], roi_size=(16, 16, 16))  # smaller than a window
    assert tiny.shape == (2, 10, 12, 8)


def test_tta_of_a_mirror_symmetric_volume_is_symmetric() -> None:
    torch.manual_seed(0)
    net = Segmenter3D(TINY3D, 2).eval()
    half = np.random.default_rng(1).normal(size=(1, 8, 8, 8)).astype(np.float32)
    image = half
    for axis in (1, 2, 3):  # mirror-symmetric along every axis
        image = np.concatenate([image, np.flip(image, axis)], axis=axis)
    tta = predict_probabilities(net, image, roi_size=(16, 16, 16), mirror_axes=(2, 3, 4))
    plain = predict_probabilities(net, image, roi_size=(16, 16, 16))
    for axis in (1, 2, 3):
        np.testing.assert_allclose(tta, np.flip(tta, axis), atol=1e-6)
    assert not np.allclose(plain, np.flip(plain, 1), atol=1e-3)  # the network itself is not symmetric


def test_3d_finetuning_resumes_exactly_after_a_crash(cohort: Path, tmp_path: Path) -> None:
    from downstream.finetune import InjectedFault

    extra = ("n_labeled=1", "train.max_steps=10", "train.eval_every=5", "train.deep_supervision=true")
    plain = finetune(_cfg(cohort, tmp_path / "plain", *extra))
    with pytest.raises(InjectedFault):
        finetune(_cfg(cohort, tmp_path / "crash", *extra, "train.inject_fault_at_step=5"))
    resumed = finetune(_cfg(cohort, tmp_path / "crash", *extra, "train.inject_fault_at_step=5"))
    assert resumed["resumed_from_step"] == 5
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in plain["history"]]
    assert resumed["test_dice"] == plain["test_dice"]
    state = torch.load(tmp_path / "plain" / "checkpoint" / "state.pt", weights_only=True)
    trained = {k for k in state["model"] if ".seg_layers." in k}
    assert len(trained) == 2 * len(TINY_ARCH["features_per_stage"][:-1])  # every deep-supervision head is kept
