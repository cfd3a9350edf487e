"""mri-ssl against nnU-Net from scratch, on a development cohort of one's own (the README's "With nnU-Net" table).

Three arms of one sweep, paired draw by draw on the same test volumes: random init (mri-ssl's finetuning),
``nnunet`` (nnU-Net v2 from scratch: its planner, preprocessing, trainer and predictor on the same labeled
volumes) and a pretrained export (default: the demo's regression pretraining)::

    python launch/demo.py                    # pretrains runs/demo/pretrain/{contrastive,regression}
    python -m experiments.nnunet_comparison --export runs/demo/pretrain/regression/export/model.pt

The labeled cohort is a development cohort (seed :data:`DEV_SEED`, never the demo's test subjects), stored on the
demo's preprocessing grid (6 mm in-plane, 64×64 slices), so nnU-Net plans, trains and predicts at the resolution
mri-ssl finetunes at, and a 2-core CPU can afford it. Each arm's wall time is printed beside the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from experiments.label_efficiency import CONFIGS, SCALES
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams, preprocess

DEV_SEED = 11
"""Seed of the development cohort (the demo's cohorts use other seeds)."""


def dev_cohort(out: Path, n: int, params: PreprocessParams) -> Path:
    """``n`` labeled liver phantoms stored on ``params``' grid (RAS NIfTI at the preprocessed spacing)."""
    root = out / "labeled"
    if (root / "dataset.json").is_file():
        return root
    raw = make_cohort("liver", n, out / "raw", seed=DEV_SEED)
    meta = json.loads((raw / "dataset.json").read_text())
    for part in ("imagesTr", "labelsTr"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        name = Path(entry["image"]).name
        vol = preprocess(raw / entry["image"], params, raw / entry["label"], allowed_labels=(0, 1))
        affine = np.diag([*vol.spacing, 1.0])
        for data, part in ((vol.image[:, 0] * 100.0 + 500.0, "imagesTr"), (vol.label, "labelsTr")):
            canon = np.ascontiguousarray(np.transpose(data[:, ::-1, :], (2, 1, 0)))  # display (S, H, W) -> (x, y, z)
            nib.save(nib.Nifti1Image(canon.astype(np.float32 if part == "imagesTr" else np.uint8), affine),
                     root / part / name)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def main(argv: list[str] | None = None) -> int:
    """Make the cohort, run the three-arm sweep, print the table with budgets and wall times."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="the pretrained 2D export to compare (the demo's)")
    parser.add_argument("--out", default="runs/nnunet_comparison", help="everything goes under it")
    parser.add_argument("--subjects", type=int, default=12, help="labeled subjects of the development cohort")
    parser.add_argument("--n-labeled", default="1,2,4", help="labeled training volumes, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="draws per n, comma-separated")
    parser.add_argument("--nnunet-epochs", type=int, default=4, help="nnU-Net epochs (of 250 iterations)")
    args = parser.parse_args(argv)
    from downstream.config import SweepConfig
    from downstream.sweep import run_sweep
    from ssl_pretrain.config import load_config

    scale = SCALES["cpu"]
    params = PreprocessParams(spacing=(scale.spacing, scale.spacing), size=(scale.size, scale.size),
                              field_of_view="pad", norm="minmax", clip=(0.0, 100.0))
    out = Path(args.out).resolve()
    root = dev_cohort(out, args.subjects, params)
    cfg = load_config(SweepConfig, CONFIGS / scale.sweep_config, [
        f"data.root={root}", f"out_dir={out / 'sweep'}", "data.n_val=2", "data.n_test=4",
        f"data.split_seed={DEV_SEED}", f"init=[random, nnunet, {Path(args.export).resolve()}]",
        f"n_labeled=[{args.n_labeled}]", f"seeds=[{args.seeds}]", f"train.max_steps={scale.finetune_steps}",
        f"train.eval_every={scale.eval_every}", f"model.widths={list(scale.widths)}", "search.cpus_per_trial=2",
        f"nnunet.epochs={args.nnunet_epochs}", "nnunet.device=cpu", "tracking.enabled=false",
    ])
    t0 = time.time()
    result = run_sweep(cfg)
    print(result["table"])
    rep = result["report"]
    print(f"\npaired difference to random init:\n{rep['paired_table']}")
    for title, sentences in (("against random init", rep["sentences"]),
                             ("against nnU-Net from scratch", rep["nnunet_sentences"])):
        print(f"\n{title}:", *sentences.values(), sep="\n")
    walls: dict[str, list[float]] = {}
    for row in result["rows"]:
        walls.setdefault(row["init_tag"], []).append(float(row["wall_time_s"]))
        if row.get("engine") == "nnunet":
            budget = (f"{row['nnunet']['epochs']} epochs x {row['nnunet']['iterations_per_epoch']} iterations, batch "
                      f"{row['nnunet']['batch_size']}, patch {row['nnunet']['patch_size']}")
    print(f"\nnnU-Net budget: {budget}; mri-ssl: {scale.finetune_steps} steps, batch {cfg.train.batch_size}")
    for tag, w in walls.items():
        print(f"wall time per trial, {tag}: {np.nanmean(w):.0f} s (mean of {len(w)})")
    print(f"sweep wall time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
