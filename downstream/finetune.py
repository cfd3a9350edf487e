"""Finetune a UNet for segmentation on ``n_labeled`` volumes from a random or pretrained init.

One function, :func:`finetune`, serves ``launch/finetune.py`` and every Ray Tune trial of a sweep.
It prepares the labeled data (with the init's preprocessing, whole slices: see
:func:`~ssl_pretrain.export.choose_preprocessing`), builds the UNet from the init's export
(:func:`~ssl_pretrain.export.build_unet`, reporting which keys were loaded, missing and unexpected),
trains on ``data.preprocess.size`` patches (foreground-biased) with MONAI's Dice + CE loss,
on-the-fly augmentation and AdamW with warmup + cosine schedule, optionally with a frozen encoder
first, evaluates 3D validation Dice every ``train.eval_every`` steps with early stopping, and
finally evaluates the best model on the fixed test set: whole-slice sliding-window predictions
mapped back to each file's grid, 3D Dice and HD95 in mm against the original label files.

The pieces live beside it: :mod:`downstream.patches` (batches and augmentation),
:mod:`downstream.inference` (loading, sliding windows, evaluation), :mod:`downstream.state`
(resume state and checkpoint files), :mod:`downstream.figures`. Everything resuming needs (the
typed :class:`~downstream.state.FinetuneState` — step, best model, history — plus the run's
modules: weights, optimizer, schedule and the one random generator, the result-deciding config and
the MLflow run id) is saved in ``<out_dir>/checkpoint/state.pt`` at every evaluation and on
SIGTERM (the previous one kept as ``state.prev.pt``), so re-running the same command
(``resume: auto``) or a retried Ray trial continues where it was, in the same MLflow run.

Outputs under ``out_dir``: ``model.pt`` (export format + head + preprocessing + the per-class
largest-component choice: all that ``predict.py`` needs), ``config.yaml``, ``init_load_report.json``,
``metrics.json`` (per-volume test Dice / HD95 / NSD), ``result.json`` (the returned dict),
``contours.png``, ``checkpoint/state.pt`` (+ ``state.prev.pt``) and, with tracking, ``mlflow_run_id``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from downstream.config import FinetuneConfig
from downstream.data import PreparedData, draw_labeled, prepare_configured
from downstream.figures import contour_figure
from downstream.inference import (
    choose_largest_component,
    evaluate,
    evaluate_test,
    image_channels,
    load_init,
    mirror_axes,
)
from downstream.metrics import summarize
from downstream.patches import PatchSampler, augment, build_augmentation
from downstream.state import (
    CHECKPOINT,
    FinetuneState,
    check_same_config,
    read_checkpoint,
    result_config,
    resume_source,
    save_checkpoint,
)
from ssl_pretrain import termination
from ssl_pretrain.config import flatten, save_config
from ssl_pretrain.data.preprocess import Volume
from ssl_pretrain.export import ExportError, LoadReport, build_unet, choose_preprocessing, save_export
from ssl_pretrain.fileio import atomic_savefig, atomic_write_text
from ssl_pretrain.models.dna import deep_supervision_weights, patch_divisor
from ssl_pretrain.tracking import NullLogger, RunLogger, start_logger

log = logging.getLogger(__name__)

__all__ = ["finetune", "InjectedFault", "EvalCallback"]

EvalCallback = Callable[[dict[str, Any], "str | None"], None]
"""``on_eval(metrics, checkpoint_dir)``: called after every evaluation (with the checkpoint folder)
and once at the end (test metrics, ``checkpoint_dir=None``); a sweep trial passes Ray Tune's
report here (not to be confused with the sweep's report, :mod:`downstream.report`)."""

_FAULT_MARKER = ".fault_injected"


class InjectedFault(RuntimeError):
    """Raised once by the ``train.inject_fault_at_step`` testing hook."""


def _build_model(
    cfg: FinetuneConfig,
    export: dict[str, Any] | None,
    source: str,
    in_channels: int,
    num_classes: int,
    data: PreparedData,
) -> tuple[torch.nn.Module, LoadReport]:
    """The segmentation model: the 2D UNet, or for 3D data a ``dynamic_network_architectures`` network (the
    init's, or ``model.network_class_name`` + ``model.arch`` for ``init=random``)."""
    dims = data.spatial_dims
    mcfg = cfg.model.unet_config(in_channels, dims) if export is None else export["model_config"]
    size = patch_size(cfg, data)
    div = patch_divisor(mcfg.arch) if dims == 3 else (mcfg.divisor,) * 2
    if any(n % d for n, d in zip(size, div, strict=True)):
        key = "train.patch_size" if dims == 3 else "data.preprocess.size"
        raise ValueError(f"{key}: {list(size)} must be multiples of {list(div)} per axis for this network")
    try:
        return build_unet(
            export, num_classes, source=source, strict=False, model_config=mcfg, in_channels=in_channels,
            parts=("encoder",) if cfg.transfer == "encoder" else ("encoder", "decoder", "head"),
            deep_supervision=cfg.train.deep_supervision and dims == 3,
        )
    except ExportError as e:
        raise ExportError(f"init: {e}") from None


def patch_size(cfg: FinetuneConfig, data: PreparedData) -> tuple[int, ...]:
    """The training patch and inference window: ``train.patch_size`` in 3D, the slice size in 2D."""
    return tuple(cfg.train.patch_size) if data.spatial_dims == 3 else tuple(data.params.size)


def _segmentation_loss(loss_fn: Any, logits: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Dice + CE of the logits; with deep supervision (a list, full resolution first) nnU-Net's weighted sum over
    the outputs, each against the label downsampled (nearest) to its grid."""
    if isinstance(logits, torch.Tensor):
        return loss_fn(logits.float(), label[:, None])
    total = torch.zeros((), device=label.device)
    for w, out in zip(deep_supervision_weights(len(logits)), logits, strict=True):
        if w:
            target = torch.nn.functional.interpolate(label[:, None].float(), size=out.shape[2:], mode="nearest")
            total = total + w * loss_fn(out.float(), target.long())
    return total


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _prepare_data(cfg: FinetuneConfig, export: dict[str, Any] | None, source: str) -> PreparedData:
    params = choose_preprocessing(cfg.data.preprocess, [(source, export)] if export is not None else [])
    return prepare_configured(cfg.data, params, cache_dir=cfg.data.cache_dir or Path(cfg.out_dir) / "cache",
                              out_dir=cfg.out_dir)


# ---------------------------------------------------------------------------------------------
# the run: state, setup, loop, final evaluation
# ---------------------------------------------------------------------------------------------


def _prepare_out_dir(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} is a file; expected a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir: cannot create {out} ({e.strerror}: a parent is a file?)") from None
    return out


def _start_logger(cfg: FinetuneConfig, out: Path, payload: dict[str, Any] | None) -> RunLogger:
    """The run's own MLflow run: the checkpoint's (a resume continues it) or a new one.

    Its id is also written to ``<out_dir>/mlflow_run_id`` at once, so a run killed before its first
    checkpoint is found and marked KILLED by the run that takes over instead of staying RUNNING.
    """
    if not cfg.tracking.enabled:
        return NullLogger()
    run_id = payload.get("mlflow_run_id") if payload is not None else None
    id_file = out / "mlflow_run_id"
    orphan = id_file.read_text().strip() if id_file.is_file() else ""
    if orphan and orphan != run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        try:
            if client.get_run(orphan).info.status == "RUNNING":
                client.set_terminated(orphan, status="KILLED")
                log.warning("MLflow run %s of %s was left RUNNING by a killed run: marked KILLED", orphan, out)
        except Exception as e:  # not in this tracking store (any more): nothing to mark
            log.info("MLflow run %s named in %s not found (%s)", orphan, id_file, type(e).__name__)
    logger = start_logger(True, cfg.tracking.experiment, run_name=out.name, run_id=run_id)
    atomic_write_text(id_file, str(logger.run_id))
    return logger


@dataclass
class _Run:
    """What one finetuning run is built from (fixed while it trains)."""

    cfg: FinetuneConfig
    out: Path
    device: torch.device
    export: dict[str, Any] | None
    init_source: str
    data: PreparedData
    train_ids: tuple[str, ...]
    model: torch.nn.Module
    load_report: LoadReport
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator

    @property
    def num_classes(self) -> int:
        return self.data.dataset.num_classes

    @property
    def patch_size(self) -> tuple[int, ...]:
        return patch_size(self.cfg, self.data)

    @property
    def pretrained(self) -> bool:
        return self.export is not None and bool(self.load_report.loaded)

    def state_dict(self) -> dict[str, Any]:
        """The modules' part of a checkpoint: model, optimizer, schedule and the run's generator."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "generator": self.gen.get_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (other keys of a checkpoint payload are ignored)."""
        self.model.load_state_dict(d["model"])
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["scheduler"])
        self.gen.set_state(d["generator"])

    def save(self, state: FinetuneState, logger: RunLogger) -> None:
        """Checkpoint the run: state, modules, the result-deciding config and the MLflow run id."""
        payload = {**state.state_dict(), **self.state_dict(), "config": result_config(self.cfg),
                   "mlflow_run_id": logger.run_id}
        save_checkpoint(self.out / "checkpoint" / CHECKPOINT, payload)


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(cfg: FinetuneConfig, model: torch.nn.Module, load_report: LoadReport) -> torch.optim.Optimizer:
    """AdamW; parameters loaded from the init train at ``train.pretrained_lr_scale`` × ``train.lr``."""
    loaded = set(load_report.loaded)  # "encoder.…" / "decoder.…": a Segmenter3D holds its parts under "net."
    named = [(n.removeprefix("net."), p) for n, p in model.named_parameters()]
    groups = [
        {"params": [p for n, p in named if n in loaded], "lr": cfg.train.lr * cfg.train.pretrained_lr_scale},
        {"params": [p for n, p in named if n not in loaded], "lr": cfg.train.lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr,
                             weight_decay=cfg.train.weight_decay)


def _build_run(cfg: FinetuneConfig) -> _Run:
    """Prepare the data, draw the labeled volumes, build model, optimizer, schedule and generator."""
    out = Path(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = _device(cfg.train.device)
    export, init_source = load_init(cfg.init, out / "init", trust=cfg.trust_checkpoint)
    data = _prepare_data(cfg, export, init_source)
    train_ids = draw_labeled(data.splits.train_pool, cfg.n_labeled, cfg.seed)
    first = data.volumes(train_ids[:1])[train_ids[0]]
    torch.manual_seed(cfg.seed)
    model, load_report = _build_model(cfg, export, init_source, image_channels(first), data.dataset.num_classes, data)
    model.to(device)
    opt = _optimizer(cfg, model, load_report)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.schedule)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Run(cfg, out, device, export, init_source, data, train_ids, model, load_report, opt, sched, gen)


def finetune(
    cfg: FinetuneConfig,
    on_eval: EvalCallback | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    logger: RunLogger | None = None,
) -> dict[str, Any]:
    """Finetune one model and evaluate it on the fixed test set.

    Re-running with the same ``out_dir`` continues from its checkpoint (``resume=auto``), refusing
    one whose config differs in anything that changes the result.

    Args:
        cfg: The run's config (data, init, n_labeled, seed, train).
        on_eval: Called after each evaluation with metrics and the checkpoint folder, and at the end.
        resume: A checkpoint folder (or its ``state.pt``) to continue from (default: ``cfg.resume``).
        logger: Where params, metrics and figures go; the caller ends it. Default: the run's own
            MLflow run when ``tracking.enabled`` (continued on resume, ended here), else nothing.

    Returns:
        The result: ids, steps, best validation Dice, test Dice/HD95 mean ± std, per-eval history,
        init load report and pretraining budget, ``model_path``, ``mlflow_run_id``.

    Raises:
        ValueError: Bad data or out_dir, ``n_labeled`` larger than the pool, incompatible init, a
            checkpoint of another config or none readable.
        InjectedFault: The ``train.inject_fault_at_step`` testing hook fired.
    """
    t0 = time.time()
    out = _prepare_out_dir(cfg)
    source = resume_source(cfg, resume)
    payload: dict[str, Any] | None = None
    if source is not None:
        source, payload = read_checkpoint(source)
        check_same_config(payload, cfg, source)
    own = logger is None
    logger = _start_logger(cfg, out, payload) if own else logger
    try:
        run = _build_run(cfg)
        state = FinetuneState(best_model=copy.deepcopy(run.model.state_dict()))
        if payload is not None:
            run.load_state_dict(payload)
            state.load_state_dict(payload)
            log.info("resumed from %s at step %d", source, state.step)
        else:
            _log_start(run, logger)
        resumed_from = state.step if payload is not None else None
        stopped_early = _train(run, state, on_eval, logger)
        result = _final_evaluation(run, state, logger)
        result.update(stopped_early=stopped_early, resumed_from_step=resumed_from, mlflow_run_id=logger.run_id,
                      wall_time_s=time.time() - t0)
        _write_outputs(run, state, result, on_eval, logger)
    except BaseException as e:
        if own:
            logger.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if own:
        logger.end("FINISHED")
    return result


def _log_start(run: _Run, logger: RunLogger) -> None:
    """Params, tags, the init load report and the config of a run that starts at step 0."""
    cfg = run.cfg
    logger.log_params(flatten(cfg) | {"n_train_volumes": len(run.train_ids), "init_source": run.init_source})
    logger.log_artifact(run.out / "splits.json")
    logger.set_tags({"init": cfg.init, "n_labeled": cfg.n_labeled, "seed": cfg.seed, "pretrained": run.pretrained})
    atomic_write_text(run.out / "init_load_report.json", json.dumps(run.load_report.to_dict(), indent=1))
    logger.log_artifact(run.out / "init_load_report.json")
    logger.log_artifact(run.out / "config.yaml")


def _train(run: _Run, state: FinetuneState, on_eval: EvalCallback | None, logger: RunLogger) -> bool:
    """Train from ``state.step`` to ``train.max_steps`` (or an early stop); return whether it stopped early."""
    from monai.losses import DiceCELoss

    cfg, model = run.cfg, run.model
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    transforms = build_augmentation(cfg.train.aug, run.patch_size) if cfg.train.augment else None
    sampler = PatchSampler(list(run.data.volumes(run.train_ids).values()), cfg.train.batch_size,
                           cfg.train.foreground_fraction, run.patch_size)
    val_vols = run.data.volumes(run.data.splits.val)
    total = cfg.train.max_steps
    running: list[float] = []
    model.train()
    # a progress bar for interactive runs; sweep trials (on_eval given) log through Ray instead
    bar = tqdm(total=total, initial=state.step, desc="finetune", unit="step", disable=on_eval is not None)
    try:
        while state.step < total and not _patience_spent(cfg, state):
            frozen = run.pretrained and state.step < cfg.train.freeze_encoder_steps
            for p in model.encoder.parameters():
                p.requires_grad_(not frozen)
            image, label = sampler.sample(run.gen)
            if transforms is not None:
                image, label = augment(transforms, image, label, run.gen)
            image, label = image.to(run.device), label.to(run.device)
            # bf16 autocast on GPUs (train.bf16); CPUs keep float32
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.bf16 and run.device.type == "cuda"):
                loss = _segmentation_loss(loss_fn, model(image), label)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.sched.step()
            state.step += 1
            bar.update(1)
            running.append(float(loss.detach()))  # host sync once per step: CPU-sized runs, cheap
            if termination.requested():  # SIGTERM (launch/finetune.py): checkpoint this step, then stop
                run.save(state, logger)
                raise termination.Terminated(f"SIGTERM: stopped at step {state.step} after its checkpoint")
            if state.step % cfg.train.eval_every and state.step != total:
                continue
            row = _evaluation(run, state, val_vols, float(np.mean(running)), frozen, logger)
            running = []
            if on_eval is not None:
                on_eval({**row, "best_val_dice": state.best_dice, "final": False}, str(run.out / "checkpoint"))
            _maybe_inject_fault(cfg, run.out, state.step)
            if _patience_spent(cfg, state):
                log.info("early stop at step %d: no validation Dice gain for %d evaluations", state.step,
                         state.bad_evals)
                break
    finally:
        bar.close()
    return _patience_spent(cfg, state)


def _patience_spent(cfg: FinetuneConfig, state: FinetuneState) -> bool:
    return bool(cfg.train.patience) and state.bad_evals >= cfg.train.patience


def _evaluation(run: _Run, state: FinetuneState, val_vols: dict[str, Volume], train_loss: float,
                frozen: bool, logger: RunLogger) -> dict[str, float]:
    """Validate, keep the best model, log the row, checkpoint; return the row."""
    per, _ = evaluate(run.model, val_vols, run.num_classes, run.device, roi_size=run.patch_size,
                      overlap=run.cfg.train.sw_overlap)
    val_dice = float(np.mean(list(per.values())))
    run.model.train()
    if val_dice > state.best_dice:
        state.best_dice, state.best_step, state.bad_evals = val_dice, state.step, 0
        state.best_model = copy.deepcopy(run.model.state_dict())
    else:
        state.bad_evals += 1
    row = {"step": state.step, "train_loss": train_loss, "val_dice": val_dice,
           "lr": run.opt.param_groups[0]["lr"], "encoder_frozen": float(frozen)}
    state.history.append(row)
    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=state.step)
    run.save(state, logger)
    return row


def _maybe_inject_fault(cfg: FinetuneConfig, out: Path, step: int) -> None:
    if cfg.train.inject_fault_at_step == step and not (out / _FAULT_MARKER).exists():
        atomic_write_text(out / _FAULT_MARKER, f"fault injected after the checkpoint at step {step}\n")
        raise InjectedFault(f"train.inject_fault_at_step={step}: injected fault after the checkpoint")


def _final_evaluation(run: _Run, state: FinetuneState, logger: RunLogger) -> dict[str, Any]:
    """Test metrics of the best model, the contour figure, and the result dict (without timings)."""
    cfg, out = run.cfg, run.out
    run.model.load_state_dict(state.best_model)
    val_vols = run.data.volumes(run.data.splits.val)
    _, val_preds = evaluate(run.model, val_vols, run.num_classes, run.device, roi_size=run.patch_size,
                            overlap=cfg.train.sw_overlap)
    lcc = choose_largest_component([val_preds[i] for i in val_vols], [v.label for v in val_vols.values()],
                                   run.num_classes)
    per_test, test_vols, preds = evaluate_test(
        run.model, run.data, run.data.splits.test, run.device, roi_size=run.patch_size, overlap=cfg.train.sw_overlap,
        mirror_axes=mirror_axes(run.data.spatial_dims) if cfg.train.test_tta else (),
        largest_component=[int(c) for c, on in lcc.items() if on] if cfg.train.test_largest_component else (),
        nsd_tolerance=cfg.train.nsd_tolerance_mm,
    )
    test = summarize(list(per_test.values()), "test_")
    init_name = Path(cfg.init).name if cfg.init != "random" else "random"
    fig = contour_figure(test_vols, preds, f"init={init_name} n={cfg.n_labeled} seed={cfg.seed}")
    atomic_savefig(fig, out / "contours.png", dpi=100, bbox_inches="tight")
    logger.log_figure(fig, "plots/contours.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    data, export = run.data, run.export
    return {
        "out_dir": str(out),
        "model_path": str(out / "model.pt"),
        "init": cfg.init,
        "init_source": run.init_source,
        "init_task": export["task"] if export is not None else "random",
        "spatial_dims": data.spatial_dims,
        "n_labeled": cfg.n_labeled,
        "seed": cfg.seed,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "train_ids": list(run.train_ids),
        "val_ids": list(data.splits.val),
        "test_ids": list(data.splits.test),
        "skipped": [list(s) for s in data.skipped],
        "steps": state.step,
        "best_step": state.best_step,
        "best_val_dice": state.best_dice,
        "largest_component": lcc,
        **test,
        "test_per_volume": per_test,
        "history": state.history,
        "pretrain_info": {k: v for k, v in export["info"].items() if k != "pretrain_subjects"} if export else {},
        "load_report": run.load_report.counts(),
        "dataset": data.dataset.name,
        "num_classes": run.num_classes,
        "label_names": {str(k): v for k, v in data.dataset.label_names.items()},
    }


_EXPORT_INFO = ("init", "init_task", "n_labeled", "seed", "best_val_dice", "test_dice", "dataset", "label_names",
                "pretrain_info", "largest_component")


def _write_outputs(run: _Run, state: FinetuneState, result: dict[str, Any], on_eval: EvalCallback | None,
                   logger: RunLogger) -> None:
    """``model.pt``, ``metrics.json``, ``result.json``, the final metrics and the final ``on_eval`` call."""
    out, model, step = run.out, run.model, state.step
    three = run.data.spatial_dims == 3
    save_export(
        out / "model.pt",
        task="segmentation",
        model_config=model.cfg,
        encoder_state=model.encoder.state_dict(),
        decoder_state=model.decoder.state_dict(),  # 3D: the library's decoder, its seg_layers (the head) included
        head_state=None if three else model.head.state_dict(),
        num_classes=run.num_classes,
        preprocessing=run.data.params.to_dict(),
        info={k: result[k] for k in _EXPORT_INFO} | ({"patch_size": list(run.patch_size)} if three else {}),
    )
    test = {k: v for k, v in result.items() if k.startswith("test_") and k not in ("test_ids", "test_per_volume")}
    atomic_write_text(out / "metrics.json",
                      json.dumps({"per_volume": result["test_per_volume"], **test}, indent=1, default=float))
    atomic_write_text(out / "result.json", json.dumps(result, indent=1, default=float))
    logger.log_metrics({k: v for k, v in test.items() if isinstance(v, float) and math.isfinite(v)}, step=step)
    logger.log_metrics({"best_val_dice": state.best_dice}, step=step)
    logger.log_artifact(out / "metrics.json")
    if on_eval is not None:
        last = state.history[-1]["val_dice"] if state.history else float("nan")
        on_eval({"step": step, "val_dice": last, "best_val_dice": state.best_dice, "final": True, **test}, None)
    log.info(
        "finetune %s n=%d seed=%d: val Dice %.3f (step %d), test Dice %.3f ± %.3f", run.cfg.init, run.cfg.n_labeled,
        run.cfg.seed, state.best_dice, state.best_step, test.get("test_dice", float("nan")),
        test.get("test_dice_std", float("nan")),
    )
