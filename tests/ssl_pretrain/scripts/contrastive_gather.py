"""Run under ``torchrun --nproc_per_node 2``: the contrastive task's loss uses every rank's negatives.

Each rank computes ``ContrastiveTask.loss`` on its own batch; the mean over ranks must equal one
NT-Xent computation over the gathered embeddings of all ranks (and differ from the rank-local
loss). Rank 0 writes the numbers as JSON to ``argv[1]``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import nt_xent
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.contrastive import ContrastiveConfig, ContrastiveTask


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ContrastiveConfig(proj_hidden=16, proj_dim=8, positives="partition", partitions=3)
    task = ContrastiveTask(UNetConfig(widths=(8, 16, 32)), cfg, seed=rank, distributed=True)
    g = torch.Generator().manual_seed(100 + rank)
    batch = {
        "image": F.avg_pool2d(torch.randn(6, 1, 32, 32, generator=g), 5, 1, 2) * 3,
        "position": torch.rand(6, generator=g),
    }
    state = task.rng_state()
    loss, _ = task.loss(batch)
    task.set_rng_state(state)  # the same views again, for the reference computation
    with torch.no_grad():
        e = task.embed(batch)
        local_only = nt_xent(e["z0"], e["z1"], groups=e["groups"], temperature=cfg.temperature)
        parts = {k: [torch.zeros_like(e[k]) for _ in range(world)] for k in ("z0", "z1", "groups")}
        for k, out in parts.items():
            dist.all_gather(out, e[k].contiguous())
        full = nt_xent(torch.cat(parts["z0"]), torch.cat(parts["z1"]), groups=torch.cat(parts["groups"]),
                       temperature=cfg.temperature)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= world
    if rank == 0:
        result = {"mean_of_ranks": mean.item(), "gathered": full.item(), "rank0_local_only": local_only.item(),
                  "rank0": loss.item()}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
