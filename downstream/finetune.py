"""Finetune a UNet for segmentation on ``n_labeled`` volumes from a random or pretrained init.

One function, :func:`finetune`, serves ``launch/finetune.py`` and every Ray Tune trial of a sweep.
It prepares the labeled data (with the init's preprocessing), builds the UNet from the init's
export (reporting which keys were loaded, missing and unexpected), trains with MONAI's Dice + CE
loss, on-the-fly augmentation and AdamW with warmup + cosine schedule, optionally with a frozen
encoder first, evaluates 3D validation Dice every ``train.eval_every`` steps with early stopping,
and finally evaluates the best model on the fixed test set (3D Dice and HD95 in mm per volume).

Everything resuming needs (weights, optimizer, schedule, step, the one random generator, best
model, history) is saved in ``<out_dir>/checkpoint/state.pt`` at every evaluation, so a crashed
run (or Ray trial) continues exactly where it was.

Outputs under ``out_dir``: ``model.pt`` (export format + head + preprocessing: all that
``predict.py`` needs), ``config.yaml``, ``metrics.json`` (per-volume test metrics),
``result.json`` (the returned dict), ``contours.png``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from downstream.config import FinetuneConfig
from downstream.data import PreparedData, draw_labeled, prepare, shw_spacing
from downstream.metrics import summarize, volume_metrics
from downstream.mlflow_uri import resolve_model_file
from downstream.predict import predict_slices
from ssl_pretrain.config import flatten, save_config
from ssl_pretrain.data.preprocess import PreprocessParams, Volume
from ssl_pretrain.export import ExportError, LoadReport, build_unet, choose_preprocessing, load_export, save_export
from ssl_pretrain.fileio import atomic_path, atomic_write_text
from ssl_pretrain.models.unet import UNet
from ssl_pretrain.tracking import NullLogger, RunLogger

log = logging.getLogger(__name__)

__all__ = ["finetune", "load_init", "InjectedFault", "Report"]

Report = Callable[[dict[str, Any], "str | None"], None]
"""``report(metrics, checkpoint_dir)``: called after every evaluation (with the checkpoint folder)
and once at the end (test metrics, ``checkpoint_dir=None``)."""

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
            export, num_classes, source=source, strict=False, model_config=mcfg, in_channels=in_channels
        )
    except ExportError as e:
        raise ExportError(f"init: {e}") from None


# ---------------------------------------------------------------------------------------------
# batches and augmentation
# ---------------------------------------------------------------------------------------------


class SliceSampler:
    """Draws training batches of slices; a share comes from slices that contain foreground.

    Args:
        volumes: Training volumes (image ``(S, C, H, W)``, label ``(S, H, W)``).
        batch_size: Slices per batch.
        foreground_fraction: Share of each batch drawn from foreground slices.
    """

    def __init__(self, volumes: list[Volume], batch_size: int, foreground_fraction: float) -> None:
        self.images = torch.from_numpy(np.concatenate([v.image for v in volumes]))
        self.labels = torch.from_numpy(np.concatenate([v.label for v in volumes]).astype(np.int64))
        self.fg = torch.nonzero(self.labels.flatten(1).amax(dim=1) > 0).flatten()
        self.batch_size = batch_size
        self.n_fg = round(batch_size * foreground_fraction) if len(self.fg) else 0

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image (B, C, H, W), label (B, H, W) int64)``."""
        idx_any = torch.randint(len(self.images), (self.batch_size - self.n_fg,), generator=gen)
        idx_fg = (
            self.fg[torch.randint(len(self.fg), (self.n_fg,), generator=gen)] if self.n_fg else idx_any[:0]
        )
        idx = torch.cat([idx_fg, idx_any])
        return self.images[idx], self.labels[idx]


def augment(
    image: torch.Tensor, label: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation (±15°), scale (0.85–1.15), shift (±6 %), intensity scale/shift and noise.

    Args:
        image: ``(B, C, H, W)`` float.
        label: ``(B, H, W)`` int64.
        gen: The run's generator (CPU), so augmentation is reproducible and resumable.

    Returns:
        Augmented ``(image, label)`` of the same shapes.
    """
    b = image.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)
    angle = (u(b) * 2 - 1) * math.radians(15)
    scale = 0.85 + 0.3 * u(b)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    shift = (u(b, 2) * 2 - 1) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    # background after normalisation is the minimum: pad with it instead of 0 (= mean for z-score)
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    img = F.grid_sample(image - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    lab = F.grid_sample(
        label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    gain = 0.9 + 0.2 * u(b, 1, 1, 1)
    bias = (u(b, 1, 1, 1) * 2 - 1) * 0.1
    noise = torch.randn(image.shape, generator=gen) * 0.03 * (u(b, 1, 1, 1) < 0.3)
    return img * gain + bias + noise, lab[:, 0].round().long()


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
    hd95: bool = True,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, np.ndarray]]:
    """3D metrics of every volume, on the volume reassembled from its slice predictions.

    Returns:
        ``({id: {"dice": [...], "hd95": [...]}}, {id: prediction (S, H, W)})``.
    """
    per: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, np.ndarray] = {}
    for sid, vol in volumes.items():
        pred = predict_slices(model, vol.image, device=device)
        preds[sid] = pred
        if hd95:
            per[sid] = volume_metrics(pred, vol.label, spacing=shw_spacing(vol), num_classes=num_classes)
        else:
            from downstream.metrics import dice_score

            per[sid] = {
                "dice": [dice_score(pred == c, vol.label == c) for c in range(1, num_classes)],
                "hd95": [float("nan")] * (num_classes - 1),
            }
    return per, preds


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
    try:
        configured = PreprocessParams.from_dict(dict(cfg.data.preprocess))
    except ValueError as e:
        raise ValueError(f"data.{e}") from None
    params = choose_preprocessing(configured, [(source, export)] if export is not None else [])
    return prepare(
        cfg.data.root,
        params,
        n_val=cfg.data.n_val,
        n_test=cfg.data.n_test,
        split_seed=cfg.data.split_seed,
        cache_dir=cfg.data.cache_dir or Path(cfg.out_dir) / "cache",
    )


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def finetune(
    cfg: FinetuneConfig,
    report: Report | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    logger: RunLogger | None = None,
) -> dict[str, Any]:
    """Finetune one model and evaluate it on the fixed test set.

    Args:
        cfg: The run's config (data, init, n_labeled, seed, train).
        report: Called after each evaluation with metrics and the checkpoint folder, and at the end.
        resume: A checkpoint folder (or its ``state.pt``) to continue from.
        logger: Where params, metrics and figures go (default: no tracking).

    Returns:
        The result: ids, steps, best validation Dice, test Dice/HD95 mean ± std, per-eval history,
        init load report and pretraining budget, ``model_path``.

    Raises:
        ValueError: Bad data, ``n_labeled`` larger than the pool, incompatible init.
        InjectedFault: The ``train.inject_fault_at_step`` testing hook fired.
    """
    logger = logger or NullLogger()
    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = _device(cfg.train.device)

    export, init_source = load_init(cfg.init, out / "init")
    data = _prepare_data(cfg, export, init_source)
    train_ids = draw_labeled(data.splits.train_pool, cfg.n_labeled, cfg.seed)
    train_vols = list(data.volumes(train_ids).values())
    val_vols = data.volumes(data.splits.val)
    num_classes = data.dataset.num_classes
    in_channels = int(train_vols[0].image.shape[1])
    torch.manual_seed(cfg.seed)
    model, load_report = _build_model(cfg, export, init_source, in_channels, num_classes, data.params.size)
    model.to(device)
    pretrained = export is not None and bool(load_report.loaded)

    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = cfg.train.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, cfg.train.warmup_steps, total, cfg.train.schedule)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = SliceSampler(train_vols, cfg.train.batch_size, cfg.train.foreground_fraction)

    step, best_dice, best_step, bad_evals = 0, -1.0, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    resumed_from: int | None = None
    ckpt_dir = out / "checkpoint"
    if resume is not None:
        rpath = Path(resume)
        state = torch.load(
            rpath / "state.pt" if rpath.is_dir() else rpath, map_location="cpu", weights_only=True
        )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        best_state = state["best_model"]
        step, best_dice, best_step, bad_evals = (
            state["step"],
            state["best_dice"],
            state["best_step"],
            state["bad_evals"],
        )
        history = list(state["history"])
        resumed_from = step
        log.info("resumed from %s at step %d", rpath, step)
    else:
        logger.log_params(flatten(cfg) | {"n_train_volumes": len(train_ids), "init_source": init_source})
        logger.set_tags(
            {"init": cfg.init, "n_labeled": cfg.n_labeled, "seed": cfg.seed, "pretrained": pretrained}
        )
        atomic_write_text(out / "init_load_report.json", json.dumps(load_report.to_dict(), indent=1))
        logger.log_artifact(out / "init_load_report.json")
        logger.log_artifact(out / "config.yaml")

    def set_frozen(frozen: bool) -> None:
        for p in model.encoder.parameters():
            p.requires_grad_(not frozen)

    stopped_early = False
    running: list[float] = []
    model.train()
    # a progress bar for interactive runs; sweep trials (report given) log through Ray instead
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=report is not None)
    while step < total:
        frozen = pretrained and step < cfg.train.freeze_encoder_steps
        set_frozen(frozen)
        image, label = sampler.sample(gen)
        if cfg.train.augment:
            image, label = augment(image, label, gen)
        image, label = image.to(device), label.to(device)
        loss = loss_fn(model(image), label[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        running.append(float(loss.detach()))  # host sync once per step: CPU-sized runs, cheap
        if step % cfg.train.eval_every and step != total:
            continue
        per, _ = evaluate(model, val_vols, num_classes, device, hd95=False)
        val_dice = summarize(list(per.values()))["dice"]
        model.train()
        if val_dice > best_dice:
            best_dice, best_step, bad_evals = val_dice, step, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_evals += 1
        row = {
            "step": step,
            "train_loss": float(np.mean(running)),
            "val_dice": val_dice,
            "lr": opt.param_groups[0]["lr"],
            "encoder_frozen": float(frozen),
        }
        running = []
        history.append(row)
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        stop = cfg.train.patience and bad_evals >= cfg.train.patience
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "best_model": best_state,
            "step": step,
            "best_dice": best_dice,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "history": history,
        }
        with atomic_path(ckpt_dir / "state.pt") as tmp:
            torch.save(state, tmp)
        if report is not None:
            report({**row, "best_val_dice": best_dice, "final": False}, str(ckpt_dir))
        if cfg.train.inject_fault_at_step == step and not (out / _FAULT_MARKER).exists():
            (out / _FAULT_MARKER).write_text(f"fault injected after the checkpoint at step {step}\n")
            raise InjectedFault(f"train.inject_fault_at_step={step}: injected fault after the checkpoint")
        if stop:
            stopped_early = True
            log.info("early stop at step %d: no validation Dice gain for %d evaluations", step, bad_evals)
            break

    bar.close()
    model.load_state_dict(best_state)
    test_vols = data.volumes(data.splits.test)
    per_test, preds = evaluate(model, test_vols, num_classes, device)
    test = summarize(list(per_test.values()), "test_")
    fig = contour_figure(
        test_vols,
        preds,
        f"init={Path(cfg.init).name if cfg.init != 'random' else 'random'} n={cfg.n_labeled} seed={cfg.seed}",
    )
    fig.savefig(out / "contours.png", dpi=100, bbox_inches="tight")
    logger.log_figure(fig, "plots/contours.png")
    import matplotlib.pyplot as plt

    plt.close(fig)

    pretrain_info = dict(export["info"]) if export is not None else {}
    result: dict[str, Any] = {
        "out_dir": str(out),
        "model_path": str(out / "model.pt"),
        "init": cfg.init,
        "init_source": init_source,
        "init_task": export["task"] if export is not None else "random",
        "n_labeled": cfg.n_labeled,
        "seed": cfg.seed,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "train_ids": list(train_ids),
        "val_ids": list(data.splits.val),
        "test_ids": list(data.splits.test),
        "skipped": [list(s) for s in data.skipped],
        "steps": step,
        "best_step": best_step,
        "best_val_dice": best_dice,
        "stopped_early": stopped_early,
        "resumed_from_step": resumed_from,
        **test,
        "test_per_volume": per_test,
        "history": history,
        "pretrain_info": pretrain_info,
        "load_report": load_report.counts(),
        "dataset": data.dataset.name,
        "num_classes": num_classes,
        "label_names": {str(k): v for k, v in data.dataset.label_names.items()},
        "wall_time_s": time.time() - t0,
    }
    save_export(
        out / "model.pt",
        task="segmentation",
        model_config=model.cfg,
        encoder_state=model.encoder.state_dict(),
        decoder_state=model.decoder.state_dict(),
        head_state=model.head.state_dict(),
        num_classes=num_classes,
        preprocessing=data.params.to_dict(),
        info={
            k: result[k]
            for k in (
                "init",
                "init_task",
                "n_labeled",
                "seed",
                "best_val_dice",
                "test_dice",
                "dataset",
                "label_names",
                "pretrain_info",
            )
        },
    )
    atomic_write_text(out / "metrics.json", json.dumps({"per_volume": per_test, **test}, indent=1, default=float))
    atomic_write_text(out / "result.json", json.dumps(result, indent=1, default=float))
    logger.log_metrics(
        {k: v for k, v in test.items() if isinstance(v, float) and math.isfinite(v)}, step=step
    )
    logger.log_metrics({"best_val_dice": best_dice}, step=step)
    logger.log_artifact(out / "metrics.json")
    if report is not None:
        report(
            {
                "step": step,
                "val_dice": history[-1]["val_dice"] if history else float("nan"),
                "best_val_dice": best_dice,
                "final": True,
                **{k: v for k, v in test.items()},
            },
            None,
        )
    log.info(
        "finetune %s n=%d seed=%d: val Dice %.3f (step %d), test Dice %.3f ± %.3f",
        cfg.init,
        cfg.n_labeled,
        cfg.seed,
        best_dice,
        best_step,
        test.get("test_dice", float("nan")),
        test.get("test_dice_std", float("nan")),
    )
    return result
