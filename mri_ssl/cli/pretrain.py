"""Self-supervised pretraining of the 2D UNet (contrastive or regression) with DeepSpeed.

One process (CPU or one GPU)::

    python launch/pretrain.py --config launch/configs/debug.yaml data.shards=shards/ out_dir=runs/dbg

One node, G GPUs (or G CPU processes on a machine without GPUs)::

    deepspeed --num_gpus G launch/pretrain.py --config launch/configs/contrastive.yaml \\
        data.shards=/data/t2w out_dir=runs/c1

Several nodes (hostfile lines: ``host slots=G``; checkpoints/ must be on a shared file system)::

    deepspeed --hostfile hosts.txt launch/pretrain.py --config launch/configs/regression.yaml \\
        data.shards=/shared/t2w out_dir=/shared/runs/r1

torchrun, two nodes (run on each node with its --node_rank)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node G --master_addr HOST0 --master_port 29500 \\
        launch/pretrain.py --config launch/configs/contrastive.yaml data.shards=/shared/t2w out_dir=runs/c2

Re-running the same command continues from the latest checkpoint (``resume: auto``); a finished
run only reports its export, and the same command with a larger ``train.max_steps`` trains it on.
``--resume`` is the same as ``resume=auto``. ``probe.root=DATASET`` (a labeled MSD folder) adds a
segmentation probe every ``probe.every`` steps; ``train.export_every=N`` writes
``export/step-NNNNNNN/model.pt`` along the way.
"""

from __future__ import annotations

import logging
import os
import sys

from mri_ssl.cli import parse_run_config
from ssl_pretrain.engine.config import PretrainConfig
from ssl_pretrain.fileio import run_locked


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the job, report the export path. Returns the exit code."""
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = parse_run_config(PretrainConfig, argv, __doc__)
    # one run per out_dir; rank 0 holds the lock for the whole job
    return run_locked(cfg.out_dir, lambda: _run(cfg), enabled=os.environ.get("RANK", "0") == "0")


def _run(cfg: PretrainConfig) -> int:
    # deepspeed is imported only for a real run, not for --help
    from ssl_pretrain.engine.distributed import PeerLost
    from ssl_pretrain.engine.trainer import TrainingDiverged, run_pretraining

    try:
        export = run_pretraining(cfg)  # sets up and always tears down the process group
    except (ValueError, TrainingDiverged, PeerLost) as e:  # bad input, divergence, a lost node: one line, no traceback
        # errors re-raised from DataLoader workers carry a traceback: keep the last line only
        logging.getLogger("pretrain").debug("full traceback", exc_info=True)
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        print(f"error: {lines[-1].strip()}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    if os.environ.get("RANK", "0") == "0":
        print(f"export: {export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
