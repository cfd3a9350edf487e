"""Preprocess NIfTI volumes into WebDataset shards (``shard-NNNNNN.tar`` + ``manifest.json``).

Usage::

    python launch/make_shards.py --input data/liver --output data/shards
    python launch/make_shards.py --input data/prostate/dataset.json --output data/p_shards \\
        --spacing 0.8 0.8 --size 192 192 --channels 0 --val-fraction 0.2 --workers 8
    python launch/make_shards.py --input volumes.txt --output data/shards --strict --overwrite

``--input`` is a folder (``.nii``/``.nii.gz`` found recursively), an MSD ``dataset.json`` (or its
folder) or a ``.txt`` list file (``image [label]`` per line). Bad volumes are skipped with one line
each and recorded in the manifest; ``--strict`` makes any skip an error (exit status 1, nothing
written). An existing output directory is refused unless ``--overwrite``, which replaces it whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.preprocess import InputError, PreprocessParams
from ssl_pretrain.data.shards import write_shards
from ssl_pretrain.fileio import OutputLockedError, lock_output_dir


def _label_names(path: Path) -> dict[str, str] | None:
    meta = path if path.name.endswith(".json") else path / "dataset.json"
    try:
        labels = json.loads(meta.read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None


def main(argv: list[str] | None = None) -> int:
    """Parse flags, write the shards, return the exit status (1 when --strict and inputs were skipped)."""
    d = PreprocessParams()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", type=Path, required=True, help="folder, MSD dataset.json or .txt list file")
    ap.add_argument("--output", type=Path, required=True, help="shard directory to create")
    ap.add_argument("--spacing", type=float, nargs=2, default=list(d.spacing), metavar=("ROW", "COL"),
                    help="target in-plane spacing in mm (H, W)")
    ap.add_argument("--size", type=int, nargs=2, default=list(d.size), metavar=("H", "W"),
                    help="output slice size after centre crop/pad")
    ap.add_argument("--norm", choices=["zscore", "minmax"], default=d.norm, help="intensity normalisation")
    ap.add_argument("--clip", type=float, nargs=2, default=list(d.clip), metavar=("LOW", "HIGH"),
                    help="percentiles clipped before normalising")
    ap.add_argument("--channels", type=int, nargs="+", default=None,
                    help="channels kept from 4D inputs (default: all)")
    ap.add_argument("--labels", choices=["auto", "yes", "no"], default="auto",
                    help="auto: use labels where found; yes: skip subjects without one; no: ignore labels")
    ap.add_argument("--samples-per-shard", type=int, default=512, help="slices per tar")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="fraction of subjects written to OUTPUT/val (the rest to OUTPUT/train)")
    ap.add_argument("--mix-subjects", type=int, default=8,
                    help="interleave the slices of this many subjects in each shard (1 = subject order)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and interleaving")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="preprocessing processes")
    ap.add_argument("--strict", action="store_true", help="any skipped input is an error (exit status 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing shard directory whole")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        params = PreprocessParams(spacing=tuple(args.spacing), size=tuple(args.size), norm=args.norm,
                                  clip=tuple(args.clip), channels=tuple(args.channels) if args.channels else None)
        labels = {"auto": None, "yes": True, "no": False}[args.labels]
        subjects, skipped = discover(args.input, labels=labels)
        # one writer per output; the lock sits beside it because the output is replaced whole
        with lock_output_dir(args.output, beside=True):
            manifest = write_shards(
                subjects, args.output, params, samples_per_shard=args.samples_per_shard,
                val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, strict=args.strict,
                overwrite=args.overwrite, skipped=skipped, mix_subjects=args.mix_subjects,
                label_names=_label_names(args.input) if labels is not False else None,
            )
    except (InputError, OutputLockedError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        ap.error(str(exc))
    splits = manifest.get("splits") or {"all": manifest}
    for name, m in splits.items():
        print(f"{name}: {m['num_subjects']} subjects, {m['num_samples']} slices")
    n_skip = len(manifest["skipped"])
    print(f"wrote {args.output}" + (f" ({n_skip} input(s) skipped, listed in manifest.json)" if n_skip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
