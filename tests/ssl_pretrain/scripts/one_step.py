"""One optimizer step of the real engine on a fixed global batch, on 1 or 2 ranks (issue 25.7).

    python one_step.py OUT                            # one rank: the whole batch
    deepspeed --num_gpus 2 one_step.py OUT           # two ranks: half of it each

For each case (contrastive with every rank's negatives, regression; ZeRO 0 and 1) the task is
built as the trainer builds it (:func:`build_task`, ``launch/configs/debug.yaml``), DeepSpeed is
configured by :func:`deepspeed_config` and takes one step, as the trainer's ``_step`` does
(``engine(batch)``, ``backward``, ``step``). Rank r gets rows ``[r·B, (r+1)·B)`` of one global
batch of 2B slices, so the two-rank step must equal the one-rank step over the concatenated batch.

Two things are set so that equality is meaningful rather than automatic:
- the views / corruptions are identities (their randomness is drawn per rank, so it could not match
  across world sizes); what is compared is the gradient's reduction, ZeRO's partitioned update and
  the gathered negatives;
- AdamW's ``eps`` is far above every gradient, which makes its first step ``lr / eps × gradient``:
  linear in the gradient, so a gradient summed instead of averaged over ranks (or a missing
  cross-rank term of the contrastive loss) moves the parameters by a different amount. Adam's usual
  first step, ``lr × sign(gradient)``, would hide any such scale error. No schedule: a constant lr.

A control case gives the contrastive loss its own rank's negatives only: its two-rank step must
differ from the one-rank step, or the comparison could not fail.

Rank 0 saves ``{case: {"before": params, "after": params, "loss": mean loss over ranks}}`` to OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_pretrain.config import load_config
from ssl_pretrain.engine.config import PretrainConfig, deepspeed_config
from ssl_pretrain.engine.distributed import init_distributed
from ssl_pretrain.engine.trainer import build_task

DEBUG = Path(__file__).resolve().parents[3] / "launch" / "configs" / "debug.yaml"
GLOBAL_BATCH = 8
IDENTITY_VIEWS = [f"contrastive.augment.{k}={v}" for k, v in (
    ("crop_scale", "[1.0, 1.0]"), ("crop_ratio", "[1.0, 1.0]"), ("flip_prob", 0), ("vflip_prob", 0),
    ("rotate_deg", 0), ("brightness", 0), ("contrast", 0), ("gamma", 0), ("noise_std", 0), ("blur_prob", 0),
    ("remap_prob", 0), ("invert_prob", 0), ("bias_field", 0))]
NO_CORRUPTION = [f"regression.{k}=0" for k in ("intensity_prob", "shuffle_prob", "paint_prob", "swap_prob")]
CASES = {
    "contrastive-zero0": ["task=contrastive", "train.zero_stage=0", *IDENTITY_VIEWS],
    "contrastive-zero1": ["task=contrastive", "train.zero_stage=1", *IDENTITY_VIEWS],
    "regression-zero0": ["task=regression", "train.zero_stage=0", *NO_CORRUPTION],
    "regression-zero1": ["task=regression", "train.zero_stage=1", *NO_CORRUPTION],
    # the control: negatives from this rank only, which must NOT equal the one-rank step
    "contrastive-own-negatives": ["task=contrastive", "train.zero_stage=0", *IDENTITY_VIEWS],
}


def global_batch() -> dict[str, torch.Tensor]:
    """Smooth random slices, the same on every rank and world size."""
    g = torch.Generator().manual_seed(7)
    image = F.avg_pool2d(torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g), 5, 1, 2) * 3
    return {"image": image, "position": torch.rand(GLOBAL_BATCH, generator=g)}


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher adds it
    out = parser.parse_args().out
    info = init_distributed()
    torch.set_num_threads(1)
    micro = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * micro, (info.rank + 1) * micro)
    batch = {k: v[rows] for k, v in global_batch().items()}
    results = {}
    for case, overrides in CASES.items():
        cfg = load_config(PretrainConfig, DEBUG, [
            *overrides, "model.widths=[8, 16, 32]", "contrastive.proj_hidden=16", "contrastive.proj_dim=8",
            f"train.batch_size={GLOBAL_BATCH}", f"data.batch_size={micro}", "train.grad_clip=0",
            "train.weight_decay=0", "train.lr=1.0", "track=false",
        ])
        task = build_task(cfg, info)
        if case == "contrastive-own-negatives":
            task.distributed = False
        ds_config = deepspeed_config(cfg, info.world_size)
        ds_config.pop("scheduler")
        ds_config["optimizer"]["params"]["eps"] = 1e4  # update = lr / eps × gradient (see the module doc)
        before = {k: v.detach().clone() for k, v in task.named_parameters()}
        engine, _, _, _ = deepspeed.initialize(model=task, model_parameters=list(task.parameters()),
                                               config=ds_config, dist_init_required=False)
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        results[case] = {"before": before, "after": {k: v.detach().clone() for k, v in task.named_parameters()},
                         "loss": float(mean) / info.world_size}
    if info.rank == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main()
