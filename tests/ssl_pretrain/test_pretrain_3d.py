"""3D pretraining: masked image modelling and Models Genesis on dynamic_network_architectures networks."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.engine.config import PretrainConfig
from ssl_pretrain.engine.distributed import free_port
from ssl_pretrain.export import build_unet, load_export, network_state_dict
from ssl_pretrain.models.dna import TINY_ARCH, build_network
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.contrastive3d import Contrastive3DConfig, Contrastive3DTask, gather_points, matching_voxels
from ssl_pretrain.tasks.mim import MIMConfig, MIMTask, block_mask, block_voxels
from ssl_pretrain.tasks.regression import RegressionConfig, _box_union, _local_shuffle, corrupt

ROOT = Path(__file__).resolve().parents[2]
DEBUG3D = ROOT / "launch" / "configs" / "debug3d.yaml"
BIN = Path(sys.executable).parent
MODEL3D = UNetConfig(spatial_dims=3, arch=TINY_ARCH)


def test_block_mask_masks_whole_blocks_at_the_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    mask = block_mask((3, 1, 16, 16, 16), (4, 8, 8), 0.75, g)
    assert mask.shape == (3, 1, 16, 16, 16) and mask.dtype == torch.bool
    blocks = mask[:, 0].reshape(3, 4, 4, 2, 8, 2, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 16, -1)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()  # each block is masked whole or not at all
    assert (blocks.all(-1).sum(-1) == 12).all()  # 75 % of 16 blocks, in every sample
    assert not torch.equal(mask[0], mask[1])  # drawn per sample
    assert block_voxels(16.0, torch.tensor([4.0, 1.0, 0.5])) == (4, 16, 32)  # 16 mm in voxels per axis


def test_mim_loss_scores_masked_voxels_only() -> None:
    """Positive control: an identity "network" returns the masked input, exact where visible."""
    task = MIMTask(MODEL3D, MIMConfig(mask_ratio=0.5, mask_block=4.0), seed=0)
    task.reconstruct = lambda x: x  # type: ignore[method-assign]
    x = torch.randn(2, 1, 16, 16, 16) + 3.0  # no voxel is 0, so a masked voxel always costs
    loss, metrics = task.loss({"image": x, "spacing": torch.ones(2, 3)})
    assert metrics["mse_visible"] == 0.0
    assert loss > 0 and torch.isclose(loss, metrics["mse_masked"])
    assert metrics["masked_share"] == pytest.approx(0.5)


def test_3d_configs_refuse_what_does_not_fit(tmp_path: Path) -> None:
    base = ["data.shards=x", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="task: contrastive runs on model.spatial_dims 2, not 3"):
        load_config(PretrainConfig, DEBUG3D, [*base, "task=contrastive"])
    with pytest.raises(ConfigError, match="task: mim runs on model.spatial_dims 3, not 2"):
        load_config(PretrainConfig, ROOT / "launch" / "configs" / "debug.yaml", [*base, "task=mim"])
    with pytest.raises(ConfigError, match=r"model.arch: PlainConvUNet rejects these arch_kwargs: n_conv_per_stage"):
        load_config(PretrainConfig, DEBUG3D, [*base, "model.arch.n_stages=4"])


def test_genesis_corruptions_in_3d() -> None:
    """Local shuffling permutes voxels inside cubes; painting fills boxes with noise; nothing else moves."""
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8, 8)
    shuffled = _local_shuffle(x, 4, 1.0, g)
    cubes = [t.reshape(2, 2, 4, 2, 4, 2, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 8, 64) for t in (x, shuffled)]
    assert torch.equal(cubes[0].sort(-1).values, cubes[1].sort(-1).values)  # the same voxels in every cube
    assert not torch.equal(shuffled, x)
    boxes = _box_union(2, 3, (8, 10, 12), (0.3, 0.6), g, torch.device("cpu"))
    assert boxes.shape == (2, 1, 8, 10, 12) and 0 < boxes.float().mean() < 1
    cfg = RegressionConfig(intensity_prob=0.0, shuffle_prob=0.0, swap_prob=0.0, paint_prob=1.0, inpaint_ratio=1.0)
    y = corrupt(x, cfg, g)
    changed = (y != x).float().mean()
    assert 0 < changed < 0.5  # in-painting replaced a few boxes, not the volume


def test_slice_corruptions_draw_what_they_drew_before_volumes() -> None:
    """The N-d corruptions give a slice batch the same bytes as the 2D-only code did (hash from that code)."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 40, 36)
    h = hashlib.sha1()
    for cfg in [RegressionConfig(), RegressionConfig(mask_ratio=0.5, mask_loss="masked"),
                RegressionConfig(shuffle_prob=1.0, paint_prob=1.0, inpaint_ratio=0.3)]:
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            h.update(corrupt(x, cfg, g).numpy().tobytes())
    assert h.hexdigest() == "a1d27248dab58c89c18b2486f6527ea5f59e2ec2"


@pytest.mark.slow
def test_3d_pretexts_two_ranks_under_deepspeed_export_weights_nnunet_networks_load(volume_shards: Path,
                                                                                  labeled: Path,
                                                                                  tmp_path: Path) -> None:
    env = {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": str(BIN) + ":/usr/bin:/bin"}
    probe = [f"probe.root={labeled}", "probe.every=2", "probe.steps=20"]  # the 3D probe, on rank 0
    for task, zero, extra in (("mim", 1, probe), ("regression", 0, []), ("contrastive3d", 1, [])):
        out = tmp_path / task
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "launch" / "pretrain.py"), "--config", str(DEBUG3D), f"data.shards={volume_shards}",
               f"out_dir={out}", f"task={task}", "track=false", "train.max_steps=4", f"train.zero_stage={zero}",
               "data.num_workers=0", "train.track_samples=true", "train.image_every=4", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["replica_max_abs_diff"] == 0.0
        rank0, rank1 = (set(s) for s in summary["samples_by_rank"])
        assert rank0 and rank1 and not rank0 & rank1  # patches of each rank's own volumes
        assert list((out / "plots").glob("*.png"))
    rows = [json.loads(line) for line in (tmp_path / "mim" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "probe/dice" in r) == [0, 2, 4]  # the random-init reference first

    export = load_export(tmp_path / "mim" / "export" / "model.pt")
    mcfg = export["model_config"]
    assert export["task"] == "mim" and mcfg.spatial_dims == 3 and export["decoder"] is not None
    # the network nnU-Net builds from the stored class and kwargs (another head: segmentation classes)
    net = build_network(mcfg.network_class_name, mcfg.arch, input_channels=1, num_classes=3)
    net.encoder.load_state_dict(export["encoder"], strict=True)
    state = network_state_dict(export)
    own = net.state_dict()
    assert {k for k in own if ".seg_layers." not in k} <= set(state)  # every key but the new head's
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if ".seg_layers." not in k},
                                              strict=False)
    assert unexpected == [] and all(".seg_layers." in k for k in missing)
    seg, report = build_unet(export, 2, source="model.pt", strict=False)  # finetuning's model of this export
    assert report.loaded and all(".seg_layers." in k for k in report.missing) and not report.unexpected


def test_dense_loss_of_identical_views_reaches_its_closed_form_minimum() -> None:
    """Positive control: features that are a one-hot code of the patch voxel make matched points identical
    and all others orthogonal, so NT-Xent over N = B × k pairs is exactly log(1 + (2N - 2) e^{-1/t})."""
    from kernels import nt_xent

    patch, view, stride, k, t = (8, 8, 8), (6, 6, 6), (2, 2, 2), 5, 0.5
    g = torch.Generator().manual_seed(0)
    o0 = torch.tensor([[0, 2, 0], [2, 0, 2]])
    o1 = torch.tensor([[2, 0, 2], [0, 2, 2]])
    grid = [p // s for p, s in zip(patch, stride, strict=True)]

    def onehot_map(offsets: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, 3, 3): the one-hot code of the patch voxel under each feature voxel."""
        maps = []
        for b, o in enumerate(offsets.tolist()):
            axes = (torch.arange(v // s) + oo // s for v, s, oo in zip(view, stride, o, strict=True))
            d, h, w = torch.meshgrid(*axes, indexing="ij")
            code = b * math.prod(grid) + (d * grid[1] + h) * grid[2] + w
            maps.append(torch.nn.functional.one_hot(code, 2 * math.prod(grid)).permute(3, 0, 1, 2).float())
        return torch.stack(maps)

    i0, i1 = matching_voxels(o0, o1, view, stride, k, g)
    z0, z1 = gather_points(onehot_map(o0), i0), gather_points(onehot_map(o1), i1)
    assert torch.equal(z0, z1) and (z0.sum(1) == 1).all()  # the same voxel in both views
    assert len({tuple(r) for r in z0.argmax(1).view(-1, 1).tolist()}) == 2 * k  # k distinct voxels per patch
    n = 2 * k
    loss = nt_xent(z0, z1, temperature=t)
    assert loss.item() == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)), rel=1e-5)
    shifted = gather_points(onehot_map(o1), i1.roll(1, dims=1))  # a wrong correspondence costs more
    assert nt_xent(z0, shifted, temperature=t) > loss + 1


def test_contrastive3d_views_overlap_and_losses_run() -> None:
    task = Contrastive3DTask(MODEL3D, Contrastive3DConfig(dense_points=8), seed=0, distributed=False)
    x = torch.randn(2, 1, 32, 32, 32)
    v0, v1, o0, o1 = task.views(x, torch.Generator().manual_seed(1))
    assert v0.shape == (2, 1, 24, 24, 24) and (o0 % 2 == 0).all() and (o0 <= 8).all()
    loss, metrics = task.loss({"image": x})
    assert loss.isfinite() and {"loss_global", "loss_dense"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in task.dense_head.parameters())
    with pytest.raises(ConfigError, match=r"data.patch_size: \[8, 8, 8\] .* do not overlap"):
        task.views(torch.randn(1, 1, 8, 8, 8), torch.Generator())


def _blob_dataset(root: Path, n: int) -> Path:
    """An MSD-layout set of ``n`` volumes: a bright noisy ellipsoid (label 1) in a dimmer body in zeros."""
    import nibabel as nib
    import numpy as np

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        rng = np.random.default_rng(i)
        z, y, x = np.meshgrid(*(np.linspace(-1, 1, m) for m in (20, 18, 12)), indexing="ij")
        label = ((z / 0.5) ** 2 + (y / (0.4 + 0.05 * i)) ** 2 + (x / 0.6) ** 2 < 1).astype(np.uint8)
        image = np.where(np.abs(z) < 0.9, 100.0 + 200.0 * label + rng.normal(0, 15, label.shape), 0.0)
        for sub, arr in (("imagesTr", image.astype(np.float32)), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), root / sub / f"b{i}.nii.gz")
        training.append({"image": f"./imagesTr/b{i}.nii.gz", "label": f"./labelsTr/b{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "blob"}, "training": training}))
    return root


class _Intensity(nn.Module):
    """An "encoder" whose only feature is the image itself (positive control) or noise (negative)."""

    def __init__(self, noise: bool) -> None:
        super().__init__()
        self.noise = noise
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.randn_like(x) if self.noise else x * self.scale]


def test_3d_probe_scores_what_the_features_can_separate(tmp_path: Path) -> None:
    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.engine.probe import ProbeConfig, SegmentationProbe

    root = _blob_dataset(tmp_path / "blobs", 4)
    cfg = ProbeConfig(root=str(root), n_train=2, n_eval=2, steps=100)
    probe = SegmentationProbe(cfg, PreprocessParams(spacing=(2.0, 2.0, 2.0)).to_dict(), 1, divisor=(4, 4, 4))
    assert probe.train[0][0].ndim == 4  # (C, D, H, W) volumes, cropped to the body
    assert probe.evaluate(_Intensity(noise=False), None)["dice"] > 0.9  # intensity separates the blob
    assert probe.evaluate(_Intensity(noise=True), None)["dice"] < 0.6  # noise does not
    task = MIMTask(MODEL3D, MIMConfig(), seed=0)
    result = probe.evaluate(task.encoder, task.decoder)  # a real (random) network: hypercolumns of every stage
    assert 0.0 <= result["dice"] <= 1.0 and result["time_s"] > 0
