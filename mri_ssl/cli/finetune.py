"""Finetune a UNet for segmentation on a few labeled volumes (random or pretrained init).

One process, CPU or one GPU::

    python launch/finetune.py --config launch/configs/finetune.yaml data.root=data/liver \\
        init=runs/c1/export/model.pt n_labeled=2 seed=0 out_dir=runs/ft_c1_n2

``init`` is ``random``, a path to an export ``model.pt``, or an MLflow URI (``runs:/<id>`` of a
pretraining run, ``models:/mri-ssl-<dataset>@champion``). The best model (validation Dice) is
written to ``<out_dir>/model.pt`` together with its head and preprocessing, ready for
``launch/predict.py``. Re-running the same command continues from ``<out_dir>/checkpoint/`` after an
interruption, in the same MLflow run (``resume: auto``; ``--resume`` is the same). A checkpoint of a
different config (init, n_labeled, seed, data, model, train) is refused with one line.
"""

from __future__ import annotations

import logging
import sys

from downstream.config import FinetuneConfig
from mri_ssl.cli import parse_run_config
from ssl_pretrain.fileio import run_locked


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, finetune, print the test metrics. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_run_config(FinetuneConfig, argv, __doc__)
    return run_locked(cfg.out_dir, lambda: _run(cfg))  # bad input and a held lock: one error line


def _run(cfg: FinetuneConfig) -> int:
    from downstream.finetune import finetune

    result = finetune(cfg)  # tracking: the run's own MLflow run, continued on resume
    print(
        f"model: {result['model_path']}\n"
        f"test Dice {result['test_dice']:.4f} ± {result['test_dice_std']:.4f}, "
        f"HD95 {result['test_hd95']:.2f} ± {result['test_hd95_std']:.2f} mm, "
        f"NSD {result['test_nsd']:.4f} ± {result['test_nsd_std']:.4f} "
        f"({len(result['test_ids'])} test volumes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
