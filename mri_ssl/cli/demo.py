"""Reproduce the label-efficiency experiment on synthetic MRI, sized for this machine.

    python launch/demo.py                      # liver phantoms, everything under runs/demo
    python launch/demo.py --kind prostate --out runs/demo-prostate
    python launch/demo.py --dims 3 --out runs/demo3d   # whole volumes: 3D MIM and 3D contrastive pretraining

Generates an unlabeled and a labeled synthetic cohort from several sites (scanners and protocols:
unlabeled scans from all of them, labels from site-1, validation and test subjects from every site;
``--sites 1`` is the single-protocol cohort), shards the unlabeled one, pretrains a
contrastive and a regression UNet (DeepSpeed: one CPU process, or all GPUs), runs a Ray Tune
finetuning sweep (init × labeled volumes × seed) and prints the label-efficiency table.
Tracking goes to MLFLOW_TRACKING_URI, or to MLflow's local default store inside --out.
Interrupt it at any time and run the same command again: finished stages are reused and
pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from experiments.label_efficiency import SCALES, pick_scale, run_experiment


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--kind", choices=["liver", "prostate"], default="liver", help="phantom anatomy")
    parser.add_argument("--scale", choices=["auto", *SCALES], default="auto",
                        help="auto: gpu when CUDA is available, else cpu; tiny is the CI smoke size")
    parser.add_argument("--sites", type=int, default=None,
                        help="scanners / protocols (default: the scale's, 4 on cpu); labels come from site-1, "
                             "validation and test subjects from every site; 1: the single-protocol cohort")
    parser.add_argument("--dims", type=float, choices=[2, 2.5, 3], default=2,
                        help="2: slices; 2.5: slices with a neighbour on each side as channels; 3: whole volumes, "
                             "the library's 3D network, MIM and 3D contrastive pretraining (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dims = int(args.dims) if args.dims != 2.5 else 2.5
        run_experiment(args.out, kind=args.kind, scale=pick_scale(args.scale), sites=args.sites, dims=dims)
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        raise SystemExit("\n[demo] interrupted: run the same command again to continue where it stopped") from None


if __name__ == "__main__":
    main()
