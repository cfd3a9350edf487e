"""nnU-Net v2 itself as an arm of a label-efficiency sweep (``init: [random, nnunet, nnunet:EXPORT, …]``).

The ``nnunet`` arm trains nnU-Net from scratch with its own planning, preprocessing, trainer and inference on
exactly a trial's subjects, and mri-ssl scores nnU-Net's predictions with its own metrics on the original grid,
so the report's paired differences and labels-saved sentences can be stated against nnU-Net from scratch.
``nnunet:EXPORT`` does the same, starting from an mri-ssl 3D export: the plans nnU-Net made for the data get the
export's architecture (:func:`ssl_pretrain.nnunet.plans_for_export`) and nnU-Net's own
``load_pretrained_weights`` loads the export (:func:`ssl_pretrain.nnunet.nnunet_checkpoint`).

Per trial, under ``<trial>/nnunet/``::

    raw/Dataset<ID>_<name>/      imagesTr (training + validation cases), labelsTr, imagesTs (test cases),
                                 dataset.json (nnU-Net's generate_dataset_json)
    preprocessed/Dataset<ID>_…/  nnU-Net's fingerprint, plans and preprocessed data; splits_final.json with one
                                 fold: the trial's labeled cases → train, its validation cases → val
    results/…/fold_0/            nnU-Net's training output (checkpoint_final.pth, progress.png, training log)
    predictions/                 nnU-Net's predictions of the validation and test cases (input grid)

nnU-Net runs in a child process (``python -m downstream.nnunet_arm SPEC.json``): it reads its folders from the
environment when imported, and a sweep's Ray workers are reused by trials. What nnU-Net does not offer is not
added: its training is not seeded (the trial's seed picks the labeled cases only), and the sweep's lr, weight
decay and transfer choices do not apply to it (nnU-Net's recipe is its own).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from downstream.config import FinetuneConfig
from downstream.data import LabeledDataset, draw_labeled, prepare_configured
from downstream.inference import load_init, original_label
from downstream.metrics import dice_score, summarize, volume_metrics
from ssl_pretrain.export import choose_preprocessing
from ssl_pretrain.fileio import atomic_write_text
from ssl_pretrain.tracking import RunLogger

log = logging.getLogger(__name__)

__all__ = ["DATASET_ID", "configuration_for", "nnunet_trial", "run_nnunet", "write_raw_dataset"]

DATASET_ID = 990
"""The nnU-Net dataset id of a trial's data (each trial has its own nnU-Net folders, so one id serves all)."""

PLANS_FROM_EXPORT = "nnUNetPlans_mrissl"
"""The plans identifier of nnU-Net's plans with an mri-ssl export's architecture."""


def configuration_for(spatial_dims: int) -> str:
    """nnU-Net's configuration of a sweep's dimensionality: ``2d`` for slices (2D and 2.5D), ``3d_fullres``."""
    return "3d_fullres" if spatial_dims == 3 else "2d"


def _channel_files(image: Any, dst: Path, case: str) -> int:
    """Write (link) one case's image as nnU-Net channel files ``{case}_{c:04d}.nii.gz``; returns the channels."""
    files = image if isinstance(image, tuple) else (image,)
    n = 0
    for f in files:
        img = nib.load(f)
        if img.ndim == 4:  # an MSD 4D file: one nnU-Net file per channel
            for c in range(img.shape[3]):
                nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., c], img.affine, img.header),
                         dst / f"{case}_{n:04d}.nii.gz")
                n += 1
            continue
        _link_nifti(Path(f), dst / f"{case}_{n:04d}.nii.gz")
        n += 1
    return n


def _link_nifti(src: Path, dst: Path) -> None:
    """``dst`` (``.nii.gz``) with ``src``'s content: a symlink when ``src`` is ``.nii.gz``, else rewritten."""
    if src.name.endswith(".nii.gz"):
        dst.symlink_to(src.resolve())
    else:
        nib.save(nib.load(src), dst)


def write_raw_dataset(raw_root: Path, dataset: LabeledDataset, train: list[str], val: list[str],
                      test: list[str]) -> Path:
    """An nnU-Net v2 raw dataset of exactly these subjects: train + val in ``imagesTr``, test in ``imagesTs``.

    Raises:
        ValueError: label values that are not ``0..K-1`` (nnU-Net needs consecutive labels).
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if sorted(dataset.label_names) != list(range(len(dataset.label_names))):
        raise ValueError(f"init=nnunet: labels {sorted(dataset.label_names)} of {dataset.root}: nnU-Net needs the "
                         "consecutive values 0..K-1")
    folder = raw_root / f"Dataset{DATASET_ID:03d}_{dataset.name.replace('-', '_') or 'mrissl'}"
    by_id = {s.id: s for s in dataset.subjects}
    channels = 0
    for part, ids in (("imagesTr", [*train, *val]), ("imagesTs", test)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(exist_ok=True)
        for sid in ids:
            channels = _channel_files(by_id[sid].image, folder / part, sid)
            if part == "imagesTr":
                _link_nifti(by_id[sid].label, folder / "labelsTr" / f"{sid}.nii.gz")
    generate_dataset_json(str(folder), {str(c): f"channel{c}" for c in range(channels)},
                          {name if v else "background": v for v, name in dataset.label_names.items()},
                          len(train) + len(val), ".nii.gz", dataset_name=folder.name,
                          description="written by mri-ssl for one sweep trial")
    return folder


def run_nnunet(work: Path, dataset: LabeledDataset, *, train: list[str], val: list[str], test: list[str],
               spatial_dims: int, epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
               device: str, num_threads: int, export: str | None = None,
               nsd_tolerance: float | None = None) -> dict[str, Any]:
    """Train nnU-Net on ``train`` (validating on ``val``), predict ``val`` and ``test``, score them.

    Args:
        work: The trial's nnU-Net folder (``<trial>/nnunet``), replaced whole.
        dataset: The labeled dataset (subjects, label names).
        train, val, test: Subject ids.
        spatial_dims: 2 (configuration ``2d``) or 3 (``3d_fullres``).
        epochs, iterations_per_epoch, val_iterations_per_epoch: nnU-Net's training length.
        device: ``cpu`` or ``cuda``.
        num_threads: torch threads of the nnU-Net process.
        export: An mri-ssl 3D export to start from (``init=nnunet:EXPORT``), or ``None`` (from scratch).
        nsd_tolerance: Tolerance in mm of the test NSD.

    Returns:
        ``{"val_dice": {id: Dice}, "test_per_volume": {id: metrics}, **summarize(test, "test_"), "nnunet": facts}``.

    Raises:
        RuntimeError: nnU-Net failed (the last lines of its output).
    """
    t0 = time.time()
    shutil.rmtree(work, ignore_errors=True)  # a retried trial starts nnU-Net over (its folders are the trial's own)
    raw = write_raw_dataset(work / "raw", dataset, train, val, test)
    spec = {"work": str(work), "dataset": raw.name, "configuration": configuration_for(spatial_dims),
            "train": train, "val": val, "epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
            "val_iterations_per_epoch": val_iterations_per_epoch, "device": device, "export": export}
    spec_file = work / "spec.json"
    atomic_write_text(spec_file, json.dumps(spec, indent=1))
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_compile": "false",
           "OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads),
           # the processes nnU-Net spawns for its final validation's exports (default 8): the trial's CPUs
           "nnUNet_def_n_proc": str(num_threads)}
    with open(work / "nnunet.log", "w") as logf:
        proc = subprocess.run([sys.executable, "-m", "downstream.nnunet_arm", str(spec_file)], env=env,
                              stdout=logf, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = (work / "nnunet.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"init=nnunet: nnU-Net exited with {proc.returncode} ({work / 'nnunet.log'}): "
                           + " | ".join(tail))
    facts = json.loads((work / "facts.json").read_text())
    by_id = {s.id: s for s in dataset.subjects}
    preds = work / "predictions"
    val_dice = {}
    for sid in val:
        truth, _ = original_label(by_id[sid].label)
        pred = np.asanyarray(nib.load(preds / f"{sid}.nii.gz").dataobj)
        val_dice[sid] = float(np.mean([dice_score(pred == c, truth == c) for c in range(1, dataset.num_classes)]))
    per_test = {}
    for sid in test:
        truth, spacing = original_label(by_id[sid].label)
        pred = np.rint(np.asanyarray(nib.load(preds / f"{sid}.nii.gz").dataobj)).astype(np.uint8)
        per_test[sid] = volume_metrics(pred, truth, spacing=spacing, num_classes=dataset.num_classes,
                                       nsd_tolerance=nsd_tolerance)
    facts["wall_time_s"] = round(time.time() - t0, 1)
    return {"val_dice": val_dice, "test_per_volume": per_test, **summarize(list(per_test.values()), "test_"),
            "nnunet": facts}


def nnunet_trial(cfg: FinetuneConfig, nnunet: dict[str, Any], logger: RunLogger | None = None) -> dict[str, Any]:
    """One sweep trial of an nnunet arm: the trial's draw (``n_labeled``, ``seed``) and the sweep's validation and
    test subjects, nnU-Net trained and predicting (``init`` = an export for ``nnunet:EXPORT``), scored as
    finetuning scores; writes ``result.json`` and ``metrics.json`` as finetuning does.

    Args:
        cfg: The trial's finetuning config (data, draw, out_dir, nsd tolerance; lr and the like do not apply).
        nnunet: The sweep's ``nnunet`` section (:class:`~downstream.config.NnunetConfig` as a dict).
        logger: The trial's MLflow run.
    """
    import torch

    out = Path(cfg.out_dir)
    exports = [] if cfg.init == "random" else [(cfg.init, load_init(cfg.init, trust=cfg.trust_checkpoint)[0])]
    params = choose_preprocessing(cfg.data.preprocess, exports)  # the export's: 3D for nnunet:EXPORT
    data = prepare_configured(cfg.data, params, cache_dir=cfg.data.cache_dir or out / "cache", out_dir=out)
    train = list(draw_labeled(data.splits.train_pool, cfg.n_labeled, cfg.seed))
    device = nnunet["device"] if nnunet["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ran = run_nnunet(out / "nnunet", data.dataset, train=train, val=list(data.splits.val), test=list(data.splits.test),
                     spatial_dims=data.spatial_dims, epochs=nnunet["epochs"],
                     iterations_per_epoch=nnunet["iterations_per_epoch"],
                     val_iterations_per_epoch=nnunet["val_iterations_per_epoch"], device=device,
                     num_threads=max(1, cfg.train.num_threads), export=None if cfg.init == "random" else cfg.init,
                     nsd_tolerance=cfg.train.nsd_tolerance_mm)
    facts = ran["nnunet"]
    test = {k: v for k, v in ran.items() if k.startswith("test_") and k != "test_per_volume"}
    result = {
        "out_dir": str(out), "model_path": facts["checkpoint"], "engine": "nnunet", "init": cfg.init,
        "init_source": cfg.init, "init_task": "nnunet", "spatial_dims": data.spatial_dims,
        "n_labeled": cfg.n_labeled, "seed": cfg.seed, "lr": None, "weight_decay": None, "train_ids": train,
        "val_ids": list(data.splits.val), "test_ids": list(data.splits.test),
        "skipped": [list(s) for s in data.skipped], "steps": facts["epochs"] * facts["iterations_per_epoch"],
        "best_step": facts["epochs"] * facts["iterations_per_epoch"],
        "best_val_dice": float(np.mean(list(ran["val_dice"].values()))), "largest_component": {}, **test,
        "test_per_volume": ran["test_per_volume"], "history": [], "pretrain_info": {}, "load_report": {},
        "dataset": data.dataset.name, "num_classes": data.dataset.num_classes,
        "label_names": {str(k): v for k, v in data.dataset.label_names.items()}, "nnunet": facts,
        "wall_time_s": facts["wall_time_s"],
    }
    atomic_write_text(out / "metrics.json", json.dumps({"per_volume": ran["test_per_volume"], **test}, indent=1,
                                                       default=float))
    atomic_write_text(out / "result.json", json.dumps(result, indent=1, default=float))
    if logger is not None:
        logger.log_params({"engine": "nnunet", **{f"nnunet.{k}": v for k, v in facts.items()}})
        logger.log_metrics({k: float(v) for k, v in test.items() if isinstance(v, (int, float))}
                           | {"best_val_dice": result["best_val_dice"]})
        logger.log_artifact(out / "metrics.json")
    log.info("nnunet n=%d seed=%d: test Dice %.3f (%s, %d epochs × %d iterations, %.0f s)", cfg.n_labeled, cfg.seed,
             result["test_dice"], facts["configuration"], facts["epochs"], facts["iterations_per_epoch"],
             facts["wall_time_s"])
    return result


# ---------------------------------------------------------------------------------------------
# the child process: nnU-Net's own API, folders from the environment
# ---------------------------------------------------------------------------------------------

def _child(spec_file: Path) -> None:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    spec = json.loads(spec_file.read_text())
    work, configuration = Path(spec["work"]), spec["configuration"]
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112 (nnU-Net's name) the planner sets torch's threads to it (0 is refused there)
    # no integrity check: mri-ssl wrote this dataset from volumes its own loader validated (shapes, affines, labels)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False, verbose=False,
                         show_progress_bar=False)
    plan_experiments([DATASET_ID])
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 augmentation in this process, no worker processes
    torch.set_num_threads(threads)
    pre = work / "preprocessed" / spec["dataset"]
    plans_id, weights = "nnUNetPlans", None
    if spec["export"]:
        from ssl_pretrain.export import load_export
        from ssl_pretrain.nnunet import nnunet_checkpoint, plans_for_export

        export = load_export(spec["export"])
        plans = plans_for_export(json.loads((pre / "nnUNetPlans.json").read_text()), export, configuration,
                                 PLANS_FROM_EXPORT)
        atomic_write_text(pre / f"{PLANS_FROM_EXPORT}.json", json.dumps(plans, indent=1))
        plans_id, weights = PLANS_FROM_EXPORT, str(work / "pretrained_weights.pth")
        torch.save(nnunet_checkpoint(export, plans, configuration, input_channels=_channels(pre)), weights)
    preprocess([DATASET_ID], plans_id, configurations=(configuration,), num_processes=(1,), show_progress_bar=False)
    atomic_write_text(pre / "splits_final.json", json.dumps([{"train": spec["train"], "val": spec["val"]}]))
    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, "nnUNetTrainer", plans_id,
                                    device=torch.device(spec["device"]))
    trainer.num_epochs = spec["epochs"]
    trainer.num_iterations_per_epoch = spec["iterations_per_epoch"]
    trainer.num_val_iterations_per_epoch = spec["val_iterations_per_epoch"]
    maybe_load_checkpoint(trainer, False, False, weights)  # nnU-Net's own load_pretrained_weights
    trainer.run_training()
    predictor = nnUNetPredictor(device=torch.device(spec["device"]), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=(0,))
    raw = work / "raw" / spec["dataset"]
    cases = [(sid, "imagesTr") for sid in spec["val"]] + [(p.name[:-12], "imagesTs")
                                                          for p in sorted((raw / "imagesTs").glob("*_0000.nii.gz"))]
    inputs = [sorted(str(p) for p in (raw / part).glob(f"{sid}_[0-9][0-9][0-9][0-9].nii.gz")) for sid, part in cases]
    out = work / "predictions"
    out.mkdir(exist_ok=True)
    # in this process: a trial's few cases do not pay for the spawned workers of predict_from_files
    predictor.predict_from_files_sequential(inputs, [str(out / sid) for sid, _ in cases])
    conf = trainer.configuration_manager
    atomic_write_text(work / "facts.json", json.dumps({
        "configuration": configuration, "plans": plans_id, "epochs": spec["epochs"],
        "iterations_per_epoch": spec["iterations_per_epoch"], "batch_size": conf.batch_size,
        "patch_size": list(conf.patch_size), "spacing": list(conf.spacing),
        "network": conf.network_arch_class_name,
        "checkpoint": str(Path(trainer.output_folder) / "checkpoint_final.pth"),
        "pretrained_weights": weights}, indent=1))


def _channels(preprocessed: Path) -> int:
    return len(json.loads((preprocessed / "dataset.json").read_text())["channel_names"])


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
