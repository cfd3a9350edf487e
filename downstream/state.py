"""What a finetuning run resumes from: its typed training state and the checkpoint files that hold it.

:class:`FinetuneState` is everything of a run that changes while it trains besides the modules
(step, best model, early-stopping count, history), with ``state_dict()`` / ``load_state_dict()``
like a module's. A checkpoint payload is that state plus the modules' state dicts (model,
optimizer, schedule, generator: see ``finetune._Run.state_dict``), the result-deciding config
(:func:`result_config`) and the MLflow run id, written by :func:`save_checkpoint` to
``<out_dir>/checkpoint/state.pt`` (the previous one kept as ``state.prev.pt``) and read back by
:func:`read_checkpoint`, which falls back to the previous one when the latest is unreadable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from downstream.config import FinetuneConfig
from ssl_pretrain.config import flatten
from ssl_pretrain.fileio import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT", "PREV_CHECKPOINT", "FinetuneState", "check_same_config", "read_checkpoint", "result_config",
    "resume_source", "save_checkpoint",
]


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

    def state_dict(self) -> dict[str, Any]:
        """The fields as a dict (the keys of a checkpoint payload this state owns)."""
        return {"step": self.step, "best_dice": self.best_dice, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "history": self.history, "best_model": self.best_model}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Set the fields from :meth:`state_dict`'s keys (other keys of a payload are ignored)."""
        self.step, self.best_dice, self.best_step = int(d["step"]), float(d["best_dice"]), int(d["best_step"])
        self.bad_evals, self.history, self.best_model = int(d["bad_evals"]), list(d["history"]), d["best_model"]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint payload atomically to ``path``, keeping the one it replaces as ``state.prev.pt``.

    The previous one is the fallback when ``path`` turns out truncated (a disk full or a kill during a copy).
    """
    if path.is_file():
        os.replace(path, path.with_name(PREV_CHECKPOINT))
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


CHECKPOINT, PREV_CHECKPOINT = "state.pt", "state.prev.pt"
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
    folder, first = (p, p / CHECKPOINT) if p.is_dir() else (p.parent, p)
    bad: list[str] = []
    for c in [first, folder / PREV_CHECKPOINT] if first.name == CHECKPOINT else [first]:
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


def check_same_config(payload: dict[str, Any], cfg: FinetuneConfig, path: Path) -> None:
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


def resume_source(cfg: FinetuneConfig, resume: str | os.PathLike[str] | None) -> Path | None:
    """The checkpoint to continue: the one given, else ``<out_dir>/checkpoint`` with ``resume=auto``."""
    if resume is not None:
        return Path(resume)
    folder = Path(cfg.out_dir) / "checkpoint"
    if not ((folder / CHECKPOINT).is_file() or (folder / PREV_CHECKPOINT).is_file()):
        return None
    if cfg.resume == "never":
        raise ValueError(f"{folder}: holds a checkpoint; set resume=auto to continue it or choose another out_dir")
    return folder
