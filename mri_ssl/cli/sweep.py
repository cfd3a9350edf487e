"""Label-efficiency sweep with Ray Tune: init × n_labeled × seed (+ lr / weight-decay search).

Local Ray on this machine (CPU, minutes)::

    python launch/sweep.py --config launch/configs/sweep_debug.yaml data.root=data/liver out_dir=runs/sweep

Add pretrained inits (export files or MLflow URIs) to the grid::

    python launch/sweep.py --config launch/configs/sweep_debug.yaml data.root=data/liver \\
        'init=[random, runs/c1/export/model.pt, runs/r1/export/model.pt]' out_dir=runs/sweep

Pretraining-budget sweep: a glob over a run's intermediate exports (``train.export_every``) is one
init per export; the report plots test Dice against samples seen and names the smallest useful budget::

    python launch/sweep.py --config launch/configs/sweep_debug.yaml data.root=data/liver \\
        'init=[random, runs/c1/export/step-*]' out_dir=runs/budget

On an existing Ray cluster (resources per trial from ``search.cpus_per_trial`` / ``gpus_per_trial``)::

    RAY_ADDRESS=ray://head:10001 python launch/sweep.py --config launch/configs/sweep.yaml \\
        data.root=/shared/Task05_Prostate out_dir=/shared/runs/sweep1

Re-running the same command with the same ``out_dir`` continues an interrupted sweep
(``Tuner.restore``) and reuses finished trials. Tracking: ``MLFLOW_TRACKING_URI`` (parent run +
nested trial runs; the best model is registered as ``mri-ssl-<dataset>@champion``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from downstream.config import SweepConfig
from mri_ssl import CONFIG_DIR
from ssl_pretrain.config import parse_config
from ssl_pretrain.fileio import run_locked


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the sweep, print the report table and its sentences. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--promote", action="store_true", help="same as tracking.promote=true: the best model takes "
                       "the alias")
        p.add_argument("--trust-checkpoint", action="store_true", help="same as trust_checkpoint=true")

    cfg, args = parse_config(SweepConfig, argv, doc=__doc__, config_dir=CONFIG_DIR, add_flags=flags)
    cfg.tracking.promote |= args.promote
    cfg.trust_checkpoint |= args.trust_checkpoint
    # one sweep per out_dir (its trials, under trials/, take no lock of their own); bad input: one error line
    return run_locked(cfg.out_dir, lambda: _run(cfg), stops_at_steps=False)  # SIGTERM: Ray shut down, trials resumable


def _run(cfg: SweepConfig) -> int:
    from downstream.sweep import run_sweep

    result = run_sweep(cfg)
    print(result["table"])
    report = result["report"]
    if report["paired_table"]:
        print("\nPaired difference to random init (same draws, same test volumes): mean [95 % CI], draws won")
        print(report["paired_table"])
    if report["subgroups_table"]:  # e.g. test Dice per site: labels from one site, tested on all
        print("\n" + report["subgroups_table"].strip())
    for sentence in [*result["sentences"].values(), *result["budget_sentences"]]:
        print(sentence)
    for line in report["leaks"]:
        if line.startswith("WARNING"):
            print(line, file=sys.stderr)
    for line in result["errors"]:
        print(line, file=sys.stderr)
    print(f"report: {result['report']['markdown']}")
    if result.get("registered"):
        print(f"registered: {result['registered']} (version {result['version']}); @{cfg.tracking.alias}: "
              f"{result['promotion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
