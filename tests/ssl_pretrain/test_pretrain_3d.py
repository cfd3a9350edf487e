"""3D pretraining: masked image modelling on dynamic_network_architectures networks, under DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.engine.config import PretrainConfig
from ssl_pretrain.engine.distributed import free_port
from ssl_pretrain.export import ExportError, build_unet, load_export, network_state_dict
from ssl_pretrain.models.dna import TINY_ARCH, build_network
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.mim import MIMConfig, MIMTask, block_mask, block_voxels

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
    task.net = nn.Identity()
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
    with pytest.raises(ConfigError, match="probe.root: the segmentation probe runs on 2D models only"):
        load_config(PretrainConfig, DEBUG3D, [*base, f"probe.root={tmp_path}"])


@pytest.mark.slow
def test_mim_two_ranks_under_deepspeed_exports_weights_nnunet_networks_load(volume_shards: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "mim"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "pretrain.py"), "--config", str(DEBUG3D), f"data.shards={volume_shards}",
           f"out_dir={out}", "track=false", "train.max_steps=6", "train.zero_stage=1", "data.num_workers=0",
           "train.track_samples=true"]
    env = {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PATH": str(BIN) + ":/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_max_abs_diff"] == 0.0
    rank0, rank1 = (set(s) for s in summary["samples_by_rank"])
    assert rank0 and rank1 and not rank0 & rank1  # patches of each rank's own volumes
    assert (out / "plots").is_dir()

    export = load_export(out / "export" / "model.pt")
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
    with pytest.raises(ExportError, match="a 3D export .* run 2D models only so far"):
        build_unet(export, 2, source="model.pt", strict=False)
