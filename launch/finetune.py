"""Finetune a UNet for segmentation on a few labeled volumes (random or pretrained init).

One process, CPU or one GPU::

    python launch/finetune.py --config launch/configs/finetune.yaml data.root=data/liver \\
        init=runs/c1/export/model.pt n_labeled=2 seed=0 out_dir=runs/ft_c1_n2

``init`` is ``random``, a path to an export ``model.pt``, or an MLflow URI (``runs:/<id>`` of a
pretraining run, ``models:/mri-ssl-<dataset>@champion``). The best model (validation Dice) is
written to ``<out_dir>/model.pt`` together with its head and preprocessing, ready for
``launch/predict.py``. ``--resume`` continues from ``<out_dir>/checkpoint/`` after an interruption.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from downstream.config import FinetuneConfig
from ssl_pretrain.config import parse_config
from ssl_pretrain.fileio import lock_output_dir
from ssl_pretrain.tracking import start_logger


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, finetune, print the test metrics. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, args = parse_config(
        FinetuneConfig,
        argv,
        doc=__doc__,
        add_flags=lambda p: p.add_argument(
            "--resume", action="store_true", help="continue from <out_dir>/checkpoint/state.pt"
        ),
    )
    try:  # one run per out_dir
        with lock_output_dir(cfg.out_dir):
            return _run(cfg, args)
    except ValueError as e:  # the lock is held elsewhere, or out_dir is not a directory
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    from downstream.finetune import finetune

    ckpt = Path(cfg.out_dir) / "checkpoint" / "state.pt"
    logger = start_logger(cfg.tracking.enabled, cfg.tracking.experiment, run_name=Path(cfg.out_dir).name)
    try:
        result = finetune(cfg, resume=ckpt if args.resume and ckpt.is_file() else None, logger=logger)
    except ValueError as e:  # bad input: one clear line, no traceback
        logger.end("FAILED")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end("FINISHED")
    print(
        f"model: {result['model_path']}\n"
        f"test Dice {result['test_dice']:.4f} ± {result['test_dice_std']:.4f}, "
        f"HD95 {result['test_hd95']:.2f} ± {result['test_hd95_std']:.2f} mm "
        f"({len(result['test_ids'])} test volumes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
