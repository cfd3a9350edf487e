"""Write a synthetic MRI cohort (liver or prostate), from one or several sites, in the MSD layout.

Usage::

    python launch/synth.py --kind liver --n 6 --out data/liver                  # one T2w-like protocol
    python launch/synth.py --kind liver --n 24 --sites 4 --out data/liver4      # 4 scanners / protocols
    python launch/synth.py --kind prostate --n 12 --out data/prostate --seed 1 --no-labels

Writes ``OUT/imagesTr/*.nii.gz``, ``OUT/labelsTr/*.nii.gz`` (unless ``--no-labels``),
``OUT/subjects.csv`` (each subject's site, protocol, ...) and ``OUT/dataset.json`` (the same
attributes as extra keys of its ``training`` entries); the same ``--seed`` gives byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssl_pretrain.data.phantoms import make_cohort


def main(argv: list[str] | None = None) -> int:
    """Parse flags, write the cohort, return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kind", choices=["liver", "prostate"], required=True,
                    help="liver: abdominal T2w, label 1 = liver; prostate: T2 + ADC, labels 1 = PZ, 2 = TZ")
    ap.add_argument("--n", type=int, required=True, help="number of subjects")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (subject ids include it)")
    ap.add_argument("--sites", type=int, default=1,
                    help="1: one T2w-like protocol (the cohort of earlier versions); 2-6: subjects spread "
                         "round-robin over that many sites of ssl_pretrain.data.phantoms.SITES")
    ap.add_argument("--no-labels", action="store_true", help="write images only (an unlabeled cohort)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = make_cohort(args.kind, args.n, args.out, seed=args.seed, labels=not args.no_labels,
                          sites=args.sites)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"wrote {args.n} {args.kind} subjects from {args.sites} site(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
