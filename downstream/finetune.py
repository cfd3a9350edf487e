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

Everything resuming needs (:class:`FinetuneState`: weights, optimizer, schedule, step, the one
random generator, best model, history; plus the result-deciding config and the MLflow run id) is
saved in ``<out_dir>/checkpoint/state.pt`` at every evaluation (the previous one kept as
``state.prev.pt``), so re-running the same command (``resume: auto``) or a retried Ray trial
continues exactly where it was, in the same MLflow run.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from downstream.config import FinetuneAugmentConfig, FinetuneConfig
from downstream.data import PreparedData, draw_labeled, prepare
from downstream.metrics import dice_score, summarize, volume_metrics
from downstream.model_refs import resolve_model_file
from downstream.predict import choose_largest_component, keep_largest_component, predict_slices
from ssl_pretrain.config import flatten, save_config
from ssl_pretrain.data.preprocess import Volume, load_nifti, to_original_grid
from ssl_pretrain.export import ExportError, LoadReport, build_unet, choose_preprocessing, load_export, save_export
from ssl_pretrain.fileio import atomic_path, atomic_savefig, atomic_write_text
from ssl_pretrain.models.unet import UNet
from ssl_pretrain.tracking import NullLogger, RunLogger, start_logger

log = logging.getLogger(__name__)

__all__ = [
    "finetune", "load_init", "FinetuneState", "read_checkpoint", "result_config", "InjectedFault", "EvalCallback",
]

EvalCallback = Callable[[dict[str, Any], "str | None"], None]
"""``on_eval(metrics, checkpoint_dir)``: called after every evaluation (with the checkpoint folder)
and once at the end (test metrics, ``checkpoint_dir=None``); a sweep trial passes Ray Tune's
report here (not to be confused with the sweep's report, :mod:`downstream.report`)."""

_FAULT_MARKER = ".fault_injected"


class InjectedFault(RuntimeError):
    """Raised once by the ``train.inject_fault_at_step`` testing hook."""


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------


def load_init(init: str, download_dir: Path | None = None) -> tuple[dict[str, Any] | None, str]:
    """Load the export an ``init`` names.

    Args:
        init: ``random``, a path to an export, or an MLflow URI.
        download_dir: Where MLflow artifacts go.

    Returns:
        ``(export dict or None for random, local path or "random")``.

    Raises:
        ValueError: The file does not exist, is not a compatible export, or the URI does not resolve.
    """
    if init == "random":
        return None, "random"
    path = resolve_model_file(init, download_dir, key="init")
    try:
        return load_export(path), str(path)
    except ExportError as e:
        raise ExportError(f"init: {e}") from None


def _build_model(
    cfg: FinetuneConfig,
    export: dict[str, Any] | None,
    source: str,
    in_channels: int,
    num_classes: int,
    size: tuple[int, int],
) -> tuple[UNet, LoadReport]:
    mcfg = cfg.model.unet_config(in_channels) if export is None else export["model_config"]
    if size[0] % mcfg.divisor or size[1] % mcfg.divisor:
        raise ValueError(
            f"data.preprocess.size: {list(size)} must be divisible by {mcfg.divisor} for "
            f"widths {list(mcfg.widths)}"
        )
    try:
        return build_unet(
            export, num_classes, source=source, strict=False, model_config=mcfg, in_channels=in_channels,
            parts=("encoder",) if cfg.transfer == "encoder" else ("encoder", "decoder", "head"),
        )
    except ExportError as e:
        raise ExportError(f"init: {e}") from None


# ---------------------------------------------------------------------------------------------
# batches and augmentation
# ---------------------------------------------------------------------------------------------


class PatchSampler:
    """Draws training batches of ``size`` patches from whole slices; a share is centred on foreground.

    Slices keep their whole field of view (any ``H, W`` at least ``size``); a foreground draw picks a
    slice with foreground and centres the patch on one of its foreground pixels (clamped inside the
    slice), the other draws pick any slice and a uniform patch position.

    Args:
        volumes: Training volumes (image ``(S, C, H, W)``, label ``(S, H, W)``; ``H, W`` may differ
            between volumes).
        batch_size: Patches per batch.
        foreground_fraction: Share of each batch centred on foreground.
        size: Patch ``(h, w)``.
    """

    def __init__(
        self, volumes: list[Volume], batch_size: int, foreground_fraction: float, size: tuple[int, int]
    ) -> None:
        self.images = [torch.from_numpy(v.image) for v in volumes]
        self.labels = [torch.from_numpy(v.label.astype(np.int64)) for v in volumes]
        self.slices = [(vi, s) for vi, v in enumerate(volumes) for s in range(v.image.shape[0])]
        self.fg = [i for i, (vi, s) in enumerate(self.slices) if bool(self.labels[vi][s].any())]
        self.batch_size, self.size = batch_size, (int(size[0]), int(size[1]))
        self.n_fg = round(batch_size * foreground_fraction) if self.fg else 0

    def _corner(self, vi: int, s: int, centred: bool, gen: torch.Generator) -> tuple[int, int]:
        (h, w), (big_h, big_w) = self.size, self.images[vi].shape[-2:]
        if centred:
            pix = torch.nonzero(self.labels[vi][s])
            cy, cx = pix[int(torch.randint(len(pix), (1,), generator=gen))].tolist()
            return min(max(cy - h // 2, 0), big_h - h), min(max(cx - w // 2, 0), big_w - w)
        top = int(torch.randint(big_h - h + 1, (1,), generator=gen))
        return top, int(torch.randint(big_w - w + 1, (1,), generator=gen))

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (B, C, h, w), label (B, h, w) int64)``."""
        idx_any = torch.randint(len(self.slices), (self.batch_size - self.n_fg,), generator=gen).tolist()
        idx_fg = [self.fg[i] for i in torch.randint(len(self.fg), (self.n_fg,), generator=gen).tolist()]
        images, labels = [], []
        for k, centred in [(i, True) for i in idx_fg] + [(i, False) for i in idx_any]:
            vi, s = self.slices[k]
            top, left = self._corner(vi, s, centred, gen)
            h, w = self.size
            images.append(self.images[vi][s, :, top : top + h, left : left + w])
            labels.append(self.labels[vi][s, top : top + h, left : left + w])
        return torch.stack(images), torch.stack(labels)


def build_augmentation(aug: FinetuneAugmentConfig, size: tuple[int, int]) -> Any:
    """The MONAI transforms of one ``{"image": (C, h, w), "label": (1, h, w)}`` training sample.

    Affine and elastic deformation (image bilinear, label nearest), bias field, gamma, Gaussian noise
    and smoothing, low-resolution simulation, left-right mirroring; ranges scale with
    ``aug.strength``; shifts and the elastic grid follow the patch ``size``. Seeded per batch from the
    run's generator (:func:`augment`), never globally.
    """
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandSimulateLowResolutiond,
    )

    s, both, img = aug.strength, ("image", "label"), ("image",)
    geo = {"mode": ("bilinear", "nearest"), "padding_mode": ("border", "zeros")}
    return Compose([
        RandAffined(both, prob=aug.p_affine, rotate_range=math.radians(15) * s, scale_range=(0.15 * s, 0.15 * s),
                    translate_range=(0.06 * size[0] * s, 0.06 * size[1] * s), **geo),
        Rand2DElasticd(both, spacing=(max(4, size[0] // 4), max(4, size[1] // 4)), magnitude_range=(0.0, 1.5 * s),
                       prob=aug.p_elastic, **geo),
        RandBiasFieldd(img, prob=aug.p_bias_field, coeff_range=(0.0, 0.2 * s)),
        RandAdjustContrastd(img, prob=aug.p_gamma, gamma=(max(0.1, 1 - 0.3 * s), 1 + 0.5 * s)),
        RandGaussianNoised(img, prob=aug.p_noise, std=0.1 * s),
        RandGaussianSmoothd(img, prob=aug.p_smooth, sigma_x=(0.25, 0.25 + 0.75 * s),
                            sigma_y=(0.25, 0.25 + 0.75 * s)),
        RandSimulateLowResolutiond(img, prob=aug.p_low_resolution, upsample_mode="bilinear",
                                   zoom_range=(max(0.25, 1 - 0.5 * s), 1.0)),
        RandFlipd(both, prob=aug.p_flip, spatial_axis=1),
    ])


def augment(
    transforms: Any, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply :func:`build_augmentation`'s transforms to every sample, seeded from the run's generator.

    The seed of the batch is drawn from ``gen`` (whose state the checkpoint holds), so a resumed run
    augments exactly as an uninterrupted one.

    Args:
        transforms: The :func:`build_augmentation` compose.
        image: ``(B, C, h, w)`` float.
        label: ``(B, h, w)`` int64.
        gen: The run's generator (CPU).

    Returns:
        Augmented ``(image, label)`` of the same shapes and dtypes.
    """
    transforms.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    images, labels = [], []
    for x, y in zip(image, label, strict=True):
        d = transforms({"image": x, "label": y[None].float()})
        images.append(torch.as_tensor(d["image"]).float())
        labels.append(torch.as_tensor(d["label"])[0].round().long())
    return torch.stack(images), torch.stack(labels)


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# evaluation, figures, files
# ---------------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module,
    volumes: dict[str, Volume],
    num_classes: int,
    device: torch.device,
    *,
    roi_size: tuple[int, int],
    overlap: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean foreground Dice of every volume on its preprocessed grid (validation, model selection).

    Returns:
        ``({id: Dice}, {id: prediction (S, H, W)})``.
    """
    per: dict[str, float] = {}
    preds: dict[str, np.ndarray] = {}
    for sid, vol in volumes.items():
        pred = predict_slices(model, vol.image, roi_size=roi_size, overlap=overlap, device=device)
        preds[sid] = pred
        per[sid] = float(np.mean([dice_score(pred == c, vol.label == c) for c in range(1, num_classes)]))
    return per, preds


def _original_label(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The label map of a subject on its file's own voxel grid, with that grid's spacing in mm."""
    img = load_nifti(path, kind="label")
    lab = np.asanyarray(img.dataobj)
    lab = lab[..., 0] if lab.ndim == 4 else lab
    return np.rint(lab).astype(np.uint8), tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_test(
    model: torch.nn.Module,
    data: PreparedData,
    ids: tuple[str, ...],
    device: torch.device,
    *,
    overlap: float,
    mirror_axes: tuple[int, ...] = (),
    largest_component: list[int] | tuple[int, ...] = (),
    nsd_tolerance: float | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Volume], dict[str, np.ndarray]]:
    """3D Dice / HD95 of whole-volume predictions mapped back to each file's grid, against its label file.

    Nothing is cropped away: a structure anywhere in the field of view counts. The prediction is
    made exactly as ``predict.py`` makes it (mirroring TTA and largest-component classes included).

    Returns:
        ``({id: {"dice": [...], "hd95": [...]}}, {id: preprocessed volume}, {id: prediction on it})``.
    """
    by_id = {s.id: s for s in data.dataset.subjects}
    vols = data.volumes(ids)
    per: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, np.ndarray] = {}
    for sid, vol in vols.items():
        preds[sid] = predict_slices(model, vol.image, roi_size=data.params.size, overlap=overlap,
                                    mirror_axes=mirror_axes, device=device)
        truth, spacing = _original_label(by_id[sid].label)
        pred = keep_largest_component(to_original_grid(preds[sid], vol.geometry), largest_component)
        per[sid] = volume_metrics(pred, truth, spacing=spacing, num_classes=data.dataset.num_classes,
                                  nsd_tolerance=nsd_tolerance)
    return per, vols, preds


def contour_figure(volumes: dict[str, Volume], preds: dict[str, np.ndarray], title: str, n: int = 4) -> Any:
    """Matplotlib figure: ``n`` test slices with true (green) and predicted (red) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for sid, vol in volumes.items():
        area = vol.label.reshape(vol.label.shape[0], -1).astype(bool).sum(1)
        picks.append((sid, int(area.argmax())))
    picks = picks[:n]
    fig, axes = plt.subplots(1, max(1, len(picks)), figsize=(3 * max(1, len(picks)), 3.2), squeeze=False)
    for ax, (sid, s) in zip(axes[0], picks, strict=False):
        vol = volumes[sid]
        ax.imshow(vol.image[s, 0], cmap="gray")
        if vol.label[s].any():
            ax.contour(vol.label[s] > 0, levels=[0.5], colors="lime", linewidths=1.0)
        if preds[sid][s].any():
            ax.contour(preds[sid][s] > 0, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"{sid} z={s}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title} (green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    return fig






def _prepare_data(cfg: FinetuneConfig, export: dict[str, Any] | None, source: str) -> PreparedData:
    params = choose_preprocessing(cfg.data.preprocess, [(source, export)] if export is not None else [])
    return prepare(
        cfg.data.root,
        params,
        n_val=cfg.data.n_val,
        n_test=cfg.data.n_test,
        split_seed=cfg.data.split_seed,
        cache_dir=cfg.data.cache_dir or Path(cfg.out_dir) / "cache",
        splits_file=cfg.data.splits,
        out_dir=cfg.out_dir,
    )


# ---------------------------------------------------------------------------------------------
# the run: state, setup, loop, final evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneState:
    """Everything of a run that changes while it trains, besides the modules; saved at every evaluation.

    Args:
        step: Optimizer steps taken.
        best_dice: Best validation Dice so far (``-1`` before the first evaluation).
        best_step: Step of ``best_dice``.
        bad_evals: Evaluations since the last improvement (early stopping).
        history: One row per evaluation (step, train loss, val Dice, lr, encoder frozen).
        best_model: State dict of the best model so far.
    """

    step: int = 0
    best_dice: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: Path, run: _Run, logger: RunLogger) -> None:
        """Write this state with the run's modules, config and MLflow run id atomically to ``path``.

        The checkpoint it replaces is kept as ``state.prev.pt``, the fallback when ``path`` turns out
        truncated (a disk full or a kill during a copy).
        """
        payload = {
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "generator": run.gen.get_state(),
            "best_model": self.best_model,
            "step": self.step,
            "best_dice": self.best_dice,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "config": result_config(run.cfg),
            "mlflow_run_id": logger.run_id,
        }
        if path.is_file():
            os.replace(path, path.with_name(_PREV))
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def restore(cls, payload: dict[str, Any], run: _Run) -> FinetuneState:
        """Load a checkpoint payload (see :func:`read_checkpoint`) into the run's modules; return the state."""
        run.model.load_state_dict(payload["model"])
        run.opt.load_state_dict(payload["optimizer"])
        run.sched.load_state_dict(payload["scheduler"])
        run.gen.set_state(payload["generator"])
        return cls(payload["step"], payload["best_dice"], payload["best_step"], payload["bad_evals"],
                   list(payload["history"]), payload["best_model"])


_CKPT, _PREV = "state.pt", "state.prev.pt"
# config keys that do not change what a run computes: they may differ between a run and its resume
_NOT_RESULT = ("out_dir", "resume", "data.cache_dir", "train.device", "train.num_threads",
               "train.inject_fault_at_step")


def result_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The flat config keys that decide a run's result (init, n_labeled, seed, data, model, train)."""
    flat = flatten(cfg)
    flat["data.root"] = str(Path(cfg.data.root).resolve())
    return {k: v for k, v in flat.items() if k not in _NOT_RESULT and not k.startswith("tracking.")}


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Read a finetuning checkpoint, falling back to the previous kept one when it is unreadable.

    Args:
        path: A checkpoint folder (``state.pt``, ``state.prev.pt``) or one checkpoint file.

    Returns:
        ``(the file read, its payload)``.

    Raises:
        ValueError: One line when no readable checkpoint is there.
    """
    p = Path(path)
    folder, first = (p, p / _CKPT) if p.is_dir() else (p.parent, p)
    bad: list[str] = []
    for c in [first, folder / _PREV] if first.name == _CKPT else [first]:
        if not c.is_file():
            continue
        try:
            payload = torch.load(c, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "step" not in payload:
                raise TypeError("not a finetuning checkpoint")
        except Exception as e:  # torch raises many types for truncated files
            bad.append(f"{c} ({type(e).__name__})")
            continue
        if bad:
            log.warning("checkpoint %s is unreadable; resuming from the previous one, %s", bad[0], c)
        return c, payload
    if not bad:
        raise ValueError(f"resume: {first} does not exist")
    raise ValueError(
        f"{first}: unreadable checkpoint ({', '.join(bad)}) and no readable previous one; "
        f"delete {folder} to start over"
    )


def _check_same_config(payload: dict[str, Any], cfg: FinetuneConfig, path: Path) -> None:
    """Refuse to resume a checkpoint whose run would compute something else than ``cfg``."""
    saved, now = payload.get("config"), result_config(cfg)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: checkpoint records no config (older mri-ssl); delete it or use another out_dir")
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ValueError(
            f"{path}: checkpoint of another config: {shown}{more}; rerun with its values to resume, "
            "or use another out_dir"
        )


def _resume_source(cfg: FinetuneConfig, resume: str | os.PathLike[str] | None) -> Path | None:
    """The checkpoint to continue: the one given, else ``<out_dir>/checkpoint`` with ``resume=auto``."""
    if resume is not None:
        return Path(resume)
    folder = Path(cfg.out_dir) / "checkpoint"
    if not ((folder / _CKPT).is_file() or (folder / _PREV).is_file()):
        return None
    if cfg.resume == "never":
        raise ValueError(f"{folder}: holds a checkpoint; set resume=auto to continue it or choose another out_dir")
    return folder


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
    model: UNet
    load_report: LoadReport
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator

    @property
    def num_classes(self) -> int:
        return self.data.dataset.num_classes

    @property
    def pretrained(self) -> bool:
        return self.export is not None and bool(self.load_report.loaded)


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(cfg: FinetuneConfig, model: UNet, load_report: LoadReport) -> torch.optim.Optimizer:
    """AdamW; parameters loaded from the init train at ``train.pretrained_lr_scale`` × ``train.lr``."""
    loaded = set(load_report.loaded)
    named = list(model.named_parameters())
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
    export, init_source = load_init(cfg.init, out / "init")
    data = _prepare_data(cfg, export, init_source)
    train_ids = draw_labeled(data.splits.train_pool, cfg.n_labeled, cfg.seed)
    first = data.volumes(train_ids[:1])[train_ids[0]]
    torch.manual_seed(cfg.seed)
    model, load_report = _build_model(
        cfg, export, init_source, int(first.image.shape[1]), data.dataset.num_classes, data.params.size
    )
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
    source = _resume_source(cfg, resume)
    payload: dict[str, Any] | None = None
    if source is not None:
        source, payload = read_checkpoint(source)
        _check_same_config(payload, cfg, source)
    own = logger is None
    logger = _start_logger(cfg, out, payload) if own else logger
    try:
        run = _build_run(cfg)
        state = FinetuneState(best_model=copy.deepcopy(run.model.state_dict()))
        if payload is not None:
            state = FinetuneState.restore(payload, run)
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
    transforms = build_augmentation(cfg.train.aug, run.data.params.size) if cfg.train.augment else None
    sampler = PatchSampler(list(run.data.volumes(run.train_ids).values()), cfg.train.batch_size,
                           cfg.train.foreground_fraction, run.data.params.size)
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
                loss = loss_fn(model(image).float(), label[:, None])
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.sched.step()
            state.step += 1
            bar.update(1)
            running.append(float(loss.detach()))  # host sync once per step: CPU-sized runs, cheap
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
    per, _ = evaluate(run.model, val_vols, run.num_classes, run.device, roi_size=run.data.params.size,
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
    state.save(run.out / "checkpoint" / _CKPT, run, logger)
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
    _, val_preds = evaluate(run.model, val_vols, run.num_classes, run.device, roi_size=run.data.params.size,
                            overlap=cfg.train.sw_overlap)
    lcc = choose_largest_component([val_preds[i] for i in val_vols], [v.label for v in val_vols.values()],
                                   run.num_classes)
    per_test, test_vols, preds = evaluate_test(
        run.model, run.data, run.data.splits.test, run.device, overlap=cfg.train.sw_overlap,
        mirror_axes=(2, 3) if cfg.train.test_tta else (),
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
        "pretrain_info": dict(export["info"]) if export is not None else {},
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
    save_export(
        out / "model.pt",
        task="segmentation",
        model_config=model.cfg,
        encoder_state=model.encoder.state_dict(),
        decoder_state=model.decoder.state_dict(),
        head_state=model.head.state_dict(),
        num_classes=run.num_classes,
        preprocessing=run.data.params.to_dict(),
        info={k: result[k] for k in _EXPORT_INFO},
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
