"""Should the 2D path use nnU-Net's own network? mri-ssl's UNet against dynamic_network_architectures (issue 22).

The 3D half builds ``PlainConvUNet`` / ``ResidualEncoderUNet`` from ``dynamic_network_architectures``;
the 2D half has its own UNet (:mod:`ssl_pretrain.models.unet`). This measures, at the CPU demo's
settings, whether moving the 2D path to the library would change Dice or speed::

    python -m experiments.network_choice --out runs/network-choice

Both networks have the demo's widths (16-32-64-128), instance norm, LeakyReLU 0.01, two 3×3 convs
per stage in encoder and decoder and transposed-conv upsampling; they differ where the library
follows nnU-Net: strided convolutions instead of max pooling, conv biases, He initialisation.
The library's network is configured as nnU-Net's planner writes a ``2d`` configuration
(:func:`dna_2d_arch`).

1. **Speed**: one training step (forward, backward, AdamW) at the demo's slice size and its finetuning
   and pretraining batches, the two networks alternating, median over repeats, ``--threads`` CPU threads.
2. **Dice**: random-init finetuning through the one finetuning loop (:mod:`downstream.finetune`:
   data preparation, labeled draw, patch sampler, augmentation, validation, best-model selection,
   held-out evaluation), the network being the only difference, at the demo's steps, counts
   n = 1, 2, 4 and seeds 0, 1. The labeled cohort is a DEVELOPMENT cohort of its own (seed
   :data:`NETWORK_SEED`, the demo's scenario: labels from site-1, validation and held-out subjects
   from every site); the demo's subjects play no part, so the demo stays a fresh test.

Writes ``network_choice.md`` (printed too).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments.label_efficiency import CONFIGS, DEMO_SEEDS, SCALES, Scale, make_cohorts, site_splits

NETWORK_SEED = 301  # the labeled development cohort of this check; the demo's are 1 and 2
assert NETWORK_SEED not in DEMO_SEEDS.values()
COUNTS = (1, 2, 4)
SEEDS = (0, 1)
NETWORKS = ("mri-ssl UNet", "dna PlainConvUNet")


def dna_2d_arch(widths: tuple[int, ...]) -> dict[str, Any]:
    """``arch_kwargs`` of a 2D ``PlainConvUNet`` with mri-ssl's 2D layout, as nnU-Net's plans write them."""
    n = len(widths)
    return {
        "n_stages": n,
        "features_per_stage": list(widths),
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * n,
        "strides": [[1, 1]] + [[2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def build(network: str, widths: tuple[int, ...], in_channels: int, num_classes: int) -> torch.nn.Module:
    """One of :data:`NETWORKS`, at random init (the caller seeds torch)."""
    from ssl_pretrain.models.dna import build_network, without_deep_supervision
    from ssl_pretrain.models.unet import UNet, UNetConfig

    if network == NETWORKS[0]:
        return UNet(UNetConfig(in_channels=in_channels, widths=widths), num_classes)
    net = build_network("PlainConvUNet", dna_2d_arch(widths), input_channels=in_channels, num_classes=num_classes)
    return without_deep_supervision(net)


def _base_config(scale: Scale, labeled: Path, splits: Path) -> Any:
    """The demo sweep's trial config (``sweep_debug.yaml`` with the demo's overrides), random init, no tracking."""
    from downstream.config import FinetuneConfig, SweepConfig
    from ssl_pretrain.config import load_config

    sweep = load_config(SweepConfig, CONFIGS / scale.sweep_config, [
        f"data.root={labeled}", f"data.splits={splits}", f"train.max_steps={scale.finetune_steps}",
        f"train.eval_every={scale.eval_every}", f"model.widths={list(scale.widths)}",
        f"data.preprocess={{size: [{scale.size}, {scale.size}], spacing: [{scale.spacing}, {scale.spacing}]}}",
        "tracking.enabled=false",
    ])
    return FinetuneConfig(data=sweep.data, model=sweep.model, train=sweep.train, tracking=sweep.tracking)


def step_speed(scale: Scale, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one training step of each network (alternating, after two warm-up steps)."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, scale.size, scale.size, generator=gen)
    y = (torch.rand(batch, 1, scale.size, scale.size, generator=gen) > 0.7).long()
    nets, opts = {}, {}
    for name in NETWORKS:
        torch.manual_seed(0)
        nets[name] = build(name, scale.widths, 1, 2)
        opts[name] = torch.optim.AdamW(nets[name].parameters(), lr=1e-3)
    times: dict[str, list[float]] = {name: [] for name in NETWORKS}
    for i in range(repeats + 2):
        for name in NETWORKS:
            t0 = time.perf_counter()
            loss = loss_fn(nets[name](x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def finetune_with(network: str, cfg: Any) -> dict[str, Any]:
    """Random-init finetuning of ``network`` through the finetuning loop; the held-out result.

    The run is built as ``downstream.finetune.finetune`` builds it (data, draw, optimizer groups,
    schedule, generator); only the model is replaced, seeded as the loop seeds its own. No export is
    written: ``model.pt`` holds mri-ssl UNets only.
    """
    from downstream import finetune as ft
    from downstream.state import FinetuneState
    from ssl_pretrain.tracking import NullLogger

    t0 = time.time()
    run = ft._build_run(cfg)
    torch.manual_seed(cfg.seed)
    first = run.data.volumes(run.train_ids[:1])[run.train_ids[0]]
    run.model = build(network, tuple(cfg.model.widths), int(first.image.shape[1]), run.num_classes).to(run.device)
    run.opt = ft._optimizer(cfg, run.model, run.load_report)
    run.sched = torch.optim.lr_scheduler.LambdaLR(
        run.opt, lambda s: ft._lr_factor(s, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.schedule))
    state = FinetuneState(best_model=copy.deepcopy(run.model.state_dict()))
    ft._train(run, state, lambda row, ckpt: None, NullLogger())  # an on_eval callback: no progress bar
    result = ft._final_evaluation(run, state, NullLogger())
    return {"network": network, "n_labeled": cfg.n_labeled, "seed": cfg.seed, "val_dice": state.best_dice,
            "test_dice": result["test_dice"], "wall_s": time.time() - t0}


def _table(rows: list[dict[str, Any]], speed: dict[int, dict[str, float]], scale: Scale, batch: int,
           threads: int) -> str:
    def mean(net: str, n: int, key: str) -> float:
        return statistics.mean(r[key] for r in rows if r["network"] == net and r["n_labeled"] == n)

    lines = [
        "# Network choice for the 2D path (issue 22)\n",
        f"CPU demo settings ({scale.size}×{scale.size} slices at {scale.spacing} mm, widths {list(scale.widths)}, "
        f"{scale.finetune_steps} finetuning steps, batch {batch}), {threads} CPU threads; random-init finetuning "
        f"on a development labeled cohort (seed {NETWORK_SEED}, the demo's scenario), seeds {list(SEEDS)}. "
        "Held-out Dice of the best-on-validation model, mean over seeds; paired difference "
        "(PlainConvUNet − UNet) per draw.\n",
        "| network | " + " | ".join(f"step, batch {b} (s) | speed vs UNet" for b in speed) + " | "
        + " | ".join(f"Dice n={n}" for n in COUNTS) + " | finetune wall (s) |",
        "|---|" + "---:|---:|" * len(speed) + "---:|" * len(COUNTS) + "---:|",
    ]
    for net in NETWORKS:
        wall = sum(r["wall_s"] for r in rows if r["network"] == net)
        dice = " | ".join(f"{mean(net, n, 'test_dice'):.3f}" for n in COUNTS)
        steps = " | ".join(f"{t[net]:.4f} | {t[NETWORKS[0]] / t[net]:.2f}x" for t in speed.values())
        lines.append(f"| {net} | {steps} | {dice} | {wall:.0f} |")
    diffs = []
    for r in rows:
        if r["network"] == NETWORKS[1]:
            ref = next(u for u in rows if u["network"] == NETWORKS[0] and u["n_labeled"] == r["n_labeled"]
                       and u["seed"] == r["seed"])
            diffs.append(r["test_dice"] - ref["test_dice"])
    lines.append(f"\nPaired held-out Dice difference over {len(diffs)} draws: mean {statistics.mean(diffs):+.3f}, "
                 f"range [{min(diffs):+.3f}, {max(diffs):+.3f}].")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/network-choice"))
    parser.add_argument("--kind", choices=["liver", "prostate"], default="liver")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed training steps per network")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = SCALES["cpu"]
    out = args.out.resolve()
    labeled = make_cohorts(out, args.kind, scale, scale.sites, seeds={"labeled": NETWORK_SEED})["labeled"]
    splits = site_splits(labeled, scale)
    base = _base_config(scale, labeled, splits)
    speed = {b: step_speed(scale, b, args.repeats) for b in (base.train.batch_size, scale.pretrain_batch)}
    rows = []
    for network in NETWORKS:
        for n in COUNTS:
            for seed in SEEDS:
                cfg = copy.deepcopy(base)
                cfg.n_labeled, cfg.seed = n, seed
                cfg.data.cache_dir = str(out / "cache")
                cfg.out_dir = str(out / "runs" / f"{network.split()[-1]}-n{n}-s{seed}")
                rows.append(finetune_with(network, cfg))
                print(json.dumps(rows[-1]), flush=True)
    text = _table(rows, speed, scale, base.train.batch_size, args.threads)
    (out / "network_choice.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
