"""The figures of a pretraining run, drawn from its ``metrics.jsonl`` rows.

* ``plots/loss.png``: the pretext loss against the step;
* ``plots/probe.png``: the segmentation probe's Dice against the step, with the random-init
  reference (the probe at step 0) as a dashed line;
* ``plots/health.png``: one panel per label-free health statistic (``health/*`` metrics).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ssl_pretrain.fileio import atomic_savefig

__all__ = ["read_metrics", "loss_curve", "probe_curve", "health_curves"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, out, dpi=100, bbox_inches="tight")  # replaces a planted link, never writes through it
    _pyplot().close(fig)
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    by_step = {r["step"]: r[key] for r in rows if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_curve(rows: list[dict[str, Any]], task: str, out: Path) -> Path | None:
    """Draw ``out`` (the loss against the step); None when no row has a loss."""
    steps, values = _series(rows, "loss")
    if not steps:
        return None
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task} loss")
    ax.set_title(f"pretraining loss ({task})")
    return _save(fig, out)


def probe_curve(history: list[tuple[int, float]], task: str, out: Path) -> Path | None:
    """Draw ``out``: probe Dice of ``history`` ``[(step, dice)]`` with the step-0 value as the reference."""
    if not history:
        return None
    steps, dice = zip(*sorted(history), strict=True)
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    ax.plot(steps, dice, marker="o", label=f"{task} encoder")
    if steps[0] == 0:
        ax.axhline(dice[0], color="gray", linestyle="--", label="random init (step 0)")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("probe Dice (held-out volumes)")
    ax.set_ylim(0, 1)
    ax.set_title(f"segmentation probe ({task})")
    ax.legend(loc="lower right")
    return _save(fig, out)


def health_curves(rows: list[dict[str, Any]], task: str, out: Path) -> Path | None:
    """Draw ``out``: one panel per ``health/*`` metric; None when there is none."""
    keys = sorted({k for r in rows for k in r if k.startswith("health/")})
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = _pyplot().subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        ax.plot(*_series(rows, key))
        ax.set_title(key.removeprefix("health/"))
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    fig.suptitle(f"embedding health ({task})")
    fig.tight_layout()
    return _save(fig, out)
