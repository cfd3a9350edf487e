"""The 2D network check (experiments/network_choice.py): the library's network mirrors the UNet and trains
through the finetuning loop."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from experiments.label_efficiency import SCALES, make_cohorts, site_splits
from experiments.network_choice import NETWORK_SEED, NETWORKS, _base_config, build, finetune_with


def _conv_shapes(net: nn.Module, skip: str) -> Counter:
    return Counter(tuple(m.weight.shape) for name, m in net.named_modules()
                   if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and skip not in name)


def test_the_library_network_has_the_unet_layout() -> None:
    """Same convolutions (in, out, kernel) outside the output layers: the comparison is of one architecture
    built two ways, not of two sizes."""
    widths = (4, 8, 16, 32)
    unet, dna = (build(name, widths, in_channels=2, num_classes=3) for name in NETWORKS)
    assert _conv_shapes(unet, "head") == _conv_shapes(dna, "seg_layers")
    assert _conv_shapes(unet, "head") != _conv_shapes(build(NETWORKS[0], (4, 8, 16), 2, 3), "head")  # it can differ
    x = torch.randn(2, 2, 32, 32)
    assert unet(x).shape == dna(x).shape == (2, 3, 32, 32)


def test_the_library_network_trains_through_the_finetuning_loop(tmp_path: Path) -> None:
    scale = SCALES["tiny"]
    labeled = make_cohorts(tmp_path, "liver", scale, scale.sites, seeds={"labeled": NETWORK_SEED})["labeled"]
    cfg = _base_config(scale, labeled, site_splits(labeled, scale))
    cfg.out_dir = str(tmp_path / "run")
    row = finetune_with(NETWORKS[1], cfg)
    assert row["network"] == NETWORKS[1] and 0.0 <= row["test_dice"] <= 1.0 and math.isfinite(row["val_dice"])
    assert (tmp_path / "run" / "checkpoint").is_dir()  # the loop's own checkpointing ran on the library's network
