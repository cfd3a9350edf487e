"""Preprocess NIfTI volumes into WebDataset shards (``shard-NNNNNN.tar`` + ``manifest.json``).

Usage::

    python launch/make_shards.py --input data/liver --output data/shards
    python launch/make_shards.py --input data/prostate/dataset.json --output data/p_shards \\
        --spacing 0.8 0.8 --size 192 192 --channels 0 --val-fraction 0.2 --workers 8
    python launch/make_shards.py --input volumes.txt --output data/shards --strict --overwrite
    python launch/make_shards.py --input data/brain --output data/shards3d --spacing 1 1 1   # 3D: (Z Y X) mm

``--input`` is a folder (``.nii``/``.nii.gz`` found recursively), an MSD ``dataset.json`` (or its
folder), an nnU-Net v2 raw dataset folder (``DatasetXXX_Name``: the channel files of a case are one
subject) or a ``.txt`` list file (``image [label]`` per line). Two ``--spacing`` values (H W) write 2D
slices of ``--size``; three (Z Y X) write one whole volume per subject, cropped to its non-zero box
(:mod:`ssl_pretrain.data.volumes`; ``--size`` is not used). Bad volumes are skipped with one line
each and recorded in the manifest; ``--strict`` makes any skip an error (exit status 1, nothing
written). An existing output directory is refused unless ``--overwrite``, which replaces it whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ssl_pretrain.data.ingest import discover, parse_msd_labels, read_exclusions
from ssl_pretrain.data.preprocess import MAX_VOXELS, InputError, PreprocessParams
from ssl_pretrain.data.shards import write_shards
from ssl_pretrain.fileio import OutputLockedError, lock_output_dir, os_error_line


def _label_names(path: Path) -> dict[str, str] | None:
    """``{value: name}`` of an MSD input's declared labels (JSON keys), ``None`` for other inputs."""
    meta = path if path.name.endswith(".json") else path / "dataset.json"
    try:
        labels = json.loads(meta.read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(k): v for k, v in parse_msd_labels(labels, meta).items()} if labels is not None else None


# Shards hold fixed-size slices (the pretraining loader batches them as they are): their field of
# view is always ``crop``; finetuning and prediction keep the whole slice (``field_of_view: pad``).
_SHARD_FIXED = {"field_of_view": "crop"}


def _preprocess_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(PreprocessParams) if f.name not in _SHARD_FIXED]


def _add_preprocess_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per :class:`PreprocessParams` field, with its type, default and help."""
    hints = typing.get_type_hints(PreprocessParams)
    for f in _preprocess_fields():
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[...]: its one other type
            tp = args[0]
            args = list(typing.get_args(tp))
        kw: dict[str, Any] = {"help": f.metadata["help"]}
        if typing.get_origin(tp) is typing.Literal:
            kw["choices"] = args
        elif typing.get_origin(tp) is tuple:
            kw["type"] = args[0]
            kw["nargs"] = "+" if Ellipsis in args else len(args)
        else:
            kw["type"] = tp
        kw["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, write the shards, return the exit status (1 when --strict and inputs were skipped)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", type=Path, required=True, action="append",
                    help="folder, MSD dataset.json, nnU-Net dataset folder or .txt list file (once: list several "
                    "folders' volumes in a .txt)")
    ap.add_argument("--output", type=Path, required=True, help="shard directory to create")
    _add_preprocess_flags(ap)
    ap.add_argument("--labels", choices=["auto", "yes", "no"], default="auto",
                    help="auto: use labels where found; yes: skip subjects without one; no: ignore labels")
    ap.add_argument("--samples-per-shard", type=int, default=512, help="slices per tar")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="fraction of subjects written to OUTPUT/val (the rest to OUTPUT/train)")
    ap.add_argument("--mix-subjects", type=int, default=8,
                    help="interleave the slices of this many subjects in each shard (1 = subject order)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and interleaving")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="preprocessing processes")
    ap.add_argument("--exclude", type=Path, default=None, metavar="SPLITS_OR_LIST",
                    help="keep these subjects out: a data.splits JSON (its val and test subjects) or a list of ids / "
                         "paths; every evaluation subject belongs here")
    ap.add_argument("--max-voxels", type=int, default=MAX_VOXELS,
                    help="largest volume a file may claim (voxels × channels); larger ones are skipped unread")
    ap.add_argument("--strict", action="store_true", help="any skipped input is an error (exit status 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing shard directory whole")
    args = ap.parse_args(argv)
    if len(args.input) > 1:  # argparse would keep the last one silently
        ap.error(f"--input: given {len(args.input)} times ({', '.join(map(str, args.input))}); give one folder, "
                 "dataset.json or a .txt list file naming every volume")
    args.input = args.input[0]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        params = PreprocessParams.from_dict({f.name: getattr(args, f.name) for f in _preprocess_fields()}
                                            | _SHARD_FIXED)
        labels = {"auto": None, "yes": True, "no": False}[args.labels]
        subjects, skipped = discover(args.input, labels=labels)
        exclude = read_exclusions(args.exclude) if args.exclude is not None else set()
        # one writer per output; the lock sits beside it because the output is replaced whole
        with lock_output_dir(args.output, beside=True):
            manifest = write_shards(
                subjects, args.output, params, samples_per_shard=args.samples_per_shard,
                val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, strict=args.strict,
                overwrite=args.overwrite, skipped=skipped, mix_subjects=args.mix_subjects,
                label_names=_label_names(args.input) if labels is not False else None, max_voxels=args.max_voxels,
                exclude=exclude,
            )
    except (InputError, OutputLockedError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        ap.error(str(exc))
    except OSError as exc:  # a read-only or full disk: one line (the shards are written to a temporary folder)
        print(f"make_shards: error: {os_error_line(exc, args.output)}", file=sys.stderr)
        return 1
    splits = manifest.get("splits") or {"all": manifest}
    for name, m in splits.items():
        unit = "volumes" if m.get("layout", manifest.get("layout")) == "volume" else "slices"
        print(f"{name}: {m['num_subjects']} subjects, {m['num_samples']} {unit}")
    n_skip = len(manifest["skipped"])
    print(f"wrote {args.output}" + (f" ({n_skip} input(s) skipped, listed in manifest.json)" if n_skip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
