"""Benchmark: DeepSpeed engine vs a plain PyTorch DDP loop, 2 CPU ranks, same model / data / optimizer.

    python -m benchmarks.pretrain_step [--task regression|contrastive] [--steps 40] [--rounds 2]
    python -m benchmarks.pretrain_step --dims 3 --task mim [--patch 32]     # debug3d's network, 3D patches

Synthetic liver phantoms are sharded into a temporary directory and streamed by the real loader
(``--workers`` per rank and loop, default one). Three loops are built once — DDP (``torch.optim.AdamW`` +
gradient clipping), DeepSpeed ZeRO 0 and ZeRO 1 with the optimizer and clipping that
``launch/pretrain.py`` uses — and take turns, ``--steps`` steps at a time, ``--rounds`` times,
so that the load drifts of a shared machine hit all three alike. Printed: samples/s, the ratio to
DDP (goal ≥ 0.95 at ZeRO 0 and 1) and the fraction of step time spent waiting for data (goal
≤ 5 %). Ratios are reported, never asserted: wall-clock numbers belong to the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mri_ssl import CONFIG_DIR
from ssl_pretrain.config import load_config
from ssl_pretrain.data.loader import build_pretrain_loader
from ssl_pretrain.engine.config import PretrainConfig, deepspeed_config
from ssl_pretrain.engine.distributed import free_port, init_distributed
from ssl_pretrain.engine.trainer import build_task
from ssl_pretrain.tasks.registry import TASKS

MODES = ("ddp", "deepspeed-zero0", "deepspeed-zero1")


def _make_shards(root: Path, size: int, dims: int) -> Path:
    from ssl_pretrain.data.ingest import discover
    from ssl_pretrain.data.phantoms import make_cohort
    from ssl_pretrain.data.preprocess import PreprocessParams
    from ssl_pretrain.data.shards import write_shards

    raw = make_cohort("liver", 4, root / "raw", seed=0, labels=False)
    subjects, _ = discover(raw)
    out = root / "shards"
    if dims == 3:  # volumes of about 24 x 64 x 64 voxels, one per shard
        params, per_shard = PreprocessParams(spacing=(8.0, 6.0, 6.0)), 1
    else:
        params, per_shard = PreprocessParams(size=(size, size), spacing=(256 / size * 1.5,) * 2), 32
    write_shards(subjects, out, params, samples_per_shard=per_shard, workers=1, progress=False)
    return out


def _stepper(mode: str, cfg: PretrainConfig) -> Callable[[dict[str, Any]], None]:
    """One optimizer step of ``mode`` on a fresh model (all ranks build it together)."""
    import deepspeed
    from torch.nn.parallel import DistributedDataParallel

    info = init_distributed()
    task = build_task(cfg, info)
    t = cfg.train
    if mode == "ddp":
        model = DistributedDataParallel(task)
        opt = torch.optim.AdamW(task.parameters(), lr=t.lr, betas=tuple(t.betas), eps=1e-8,
                                weight_decay=t.weight_decay)

        def ddp_step(batch: dict[str, Any]) -> None:
            loss, _ = model(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(task.parameters(), t.grad_clip)
            opt.step()

        return ddp_step
    stage = int(mode[-1])
    ds = deepspeed_config(dataclasses.replace(cfg, train=dataclasses.replace(t, zero_stage=stage)),
                          dist.get_world_size())
    ds.pop("scheduler")  # the DDP loop has none either
    engine, _, _, _ = deepspeed.initialize(model=task, model_parameters=list(task.parameters()), config=ds,
                                           dist_init_required=False)

    def ds_step(batch: dict[str, Any]) -> None:
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    return ds_step


def _measure(cfg: PretrainConfig, steps: int, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Samples/s and data-wait fraction of every loop on this rank (all ranks call it together).

    The three loops are built once and then run in turns, ``steps`` steps at a time, ``rounds``
    times: slow drifts of a shared machine's load hit all three alike.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    loops = {}
    for mode in MODES:
        stream = iter(build_pretrain_loader(cfg.data, rank, world))
        loops[mode] = (_stepper(mode, cfg), stream)
        for _ in range(warmup):
            loops[mode][0](next(stream))
    elapsed = dict.fromkeys(MODES, 0.0)
    waited = dict.fromkeys(MODES, 0.0)
    for _ in range(rounds):
        for mode, (step, stream) in loops.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                w0 = time.perf_counter()
                batch = next(stream)
                waited[mode] += time.perf_counter() - w0
                step(batch)
            dist.barrier()
            elapsed[mode] += time.perf_counter() - t0
    out = {}
    for mode in MODES:
        waits = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(waits, torch.tensor([waited[mode] / elapsed[mode]], dtype=torch.float64))
        out[mode] = {
            "samples_per_s": rounds * steps * cfg.data.batch_size * world / elapsed[mode],
            "data_wait_frac": max(float(w) for w in waits),
        }
    return out


def _worker(rank: int, world: int, port: int, shards: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's use of deprecated c10d calls
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    init_distributed()
    common = [f"task={args.task}", f"data.shards={shards}", f"data.batch_size={args.batch}",
              f"data.num_workers={args.workers}", "train.max_steps=100000", "train.warmup_steps=1", "track=false"]
    if args.dims == 3:  # debug3d's PlainConvUNet (widths 8-32)
        cfg = load_config(PretrainConfig, CONFIG_DIR / "debug3d.yaml",
                          [*common, f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
                           "data.shuffle_buffer=8"])
    else:
        cfg = load_config(PretrainConfig, overrides=[
            *common, "data.shuffle_buffer=64", "model.widths=[8,16,32]", "contrastive.proj_hidden=32",
            "contrastive.proj_dim=16",
        ])
    results = _measure(cfg, args.steps, args.warmup, args.rounds)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per loop plus the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="regression")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2: slices; 3: volumes and debug3d's network")
    p.add_argument("--patch", type=int, default=32, help="3D patch side in voxels")
    p.add_argument("--steps", type=int, default=10, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per loop")
    p.add_argument("--rounds", type=int, default=8, help="turns: the three loops take turns this many times")
    p.add_argument("--batch", type=int, default=None, help="micro batch per rank (default 8 slices, 2 patches)")
    p.add_argument("--size", type=int, default=64, help="slice side in pixels")
    p.add_argument("--workers", type=int, default=1,
                   help="DataLoader workers per rank and loop (0: load in the training process)")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.dims == 3 else 8)
    world = 2
    with tempfile.TemporaryDirectory() as d:
        shards = _make_shards(Path(d), args.size, args.dims)
        out = Path(d) / "result.json"
        mp.spawn(_worker, args=(world, free_port(), str(shards), args, str(out)), nprocs=world, join=True)
        results = json.loads(out.read_text())
    med = results
    base = med["ddp"]["samples_per_s"]
    shape = f"{args.patch}³ patches, PlainConvUNet" if args.dims == 3 else f"{args.size}x{args.size}, UNet"
    print(f"pretraining step, {world} CPU ranks, task={args.task}, {shape} widths (8,16,32), "
          f"micro batch {args.batch}/rank, {args.rounds} turns of {args.steps} steps per loop")
    for m in MODES:
        print(f"{m:>16}: {med[m]['samples_per_s']:8.1f} samples/s  ratio vs DDP {med[m]['samples_per_s'] / base:5.3f}"
              f"  data wait {100 * med[m]['data_wait_frac']:5.1f} % of step time")


if __name__ == "__main__":
    main()
