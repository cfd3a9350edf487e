"""The label-efficiency report: test Dice vs number of labeled volumes, one line per init.

From the finished trials of a sweep: per ``(init, n_labeled, seed)`` the trial with the best
validation Dice is kept (lr / weight-decay selection never looks at the test set), then test Dice
and HD95 are reported as mean ± std over seeds. Written as ``report.md`` (tables, pretraining
budget of each pretrained init, failed trials), ``label_efficiency.png`` (the figure the paper is
about), ``val_dice_curves.png`` (validation Dice vs finetuning step per init: pretrained inits
often converge faster early and are caught up later, and a reader must see that) and
``results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ssl_pretrain.fileio import atomic_savefig, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["build_report", "select_rows"]

_BUDGET_KEYS = ("steps", "samples_seen", "wall_time_s", "final_loss", "world_size")


def select_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep, per ``(init_tag, n_labeled, seed)``, the trial with the best validation Dice."""
    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in rows:
        k = (r["init_tag"], r["n_labeled"], r["seed"])
        if k not in best or r["best_val_dice"] > best[k]["best_val_dice"]:
            best[k] = r
    return [best[k] for k in sorted(best)]


def _fmt(values: list[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f} ({len(v)})"


def _n_label(n: int, rows: list[dict[str, Any]]) -> str:
    if n != 0:
        return str(n)
    sizes = {len(r["train_ids"]) for r in rows if r["n_labeled"] == 0}
    return f"all ({', '.join(map(str, sorted(sizes)))})"


def _table(sel: list[dict[str, Any]], key: str, digits: int) -> str:
    inits = list(dict.fromkeys(r["init_tag"] for r in sel))
    ns = sorted({r["n_labeled"] for r in sel}, key=lambda n: (n == 0, n))
    head = "| init | " + " | ".join(f"n={_n_label(n, sel)}" for n in ns) + " |"
    lines = [head, "|" + " --- |" * (len(ns) + 1)]
    for init in inits:
        cells = [
            _fmt(
                [r.get(key, float("nan")) for r in sel if r["init_tag"] == init and r["n_labeled"] == n],
                digits,
            )
            for n in ns
        ]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _budget_table(budgets: dict[str, dict[str, Any]]) -> str:
    lines = ["| init | " + " | ".join(_BUDGET_KEYS) + " |", "|" + " --- |" * (len(_BUDGET_KEYS) + 1)]
    for tag, info in budgets.items():
        cells = []
        for k in _BUDGET_KEYS:
            v = info.get(k)
            cells.append("n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(sel: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path, dataset: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    inits = list(dict.fromkeys(r["init_tag"] for r in sel))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for init in inits:
        by_n: dict[int, list[float]] = defaultdict(list)
        for r in sel:
            if r["init_tag"] == init:
                by_n[len(r["train_ids"])].append(r.get("test_dice", float("nan")))
        xs = sorted(by_n)
        mean = [float(np.nanmean(by_n[x])) for x in xs]
        std = [float(np.nanstd(by_n[x])) for x in xs]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=init)
    ax.set_xscale("log", base=2)
    xs_all = sorted({len(r["train_ids"]) for r in sel})
    ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_title(f"Label efficiency — {dataset}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "label_efficiency.png")
    atomic_savefig(fig, paths[-1], dpi=110)
    plt.close(fig)

    ns = sorted({r["n_labeled"] for r in rows}, key=lambda n: (n == 0, n))
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], ns, strict=True):
        for init in inits:
            curves: dict[int, list[float]] = defaultdict(list)
            for r in sel:
                if r["init_tag"] == init and r["n_labeled"] == n:
                    for h in r["history"]:
                        curves[int(h["step"])].append(float(h["val_dice"]))
            if curves:
                steps = sorted(curves)
                ax.plot(steps, [np.mean(curves[s]) for s in steps], marker=".", label=init)
        ax.set_title(f"n_labeled={_n_label(n, rows)}")
        ax.set_xlabel("finetuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation Dice (mean over seeds)")
    axes[0][-1].legend()
    fig.tight_layout()
    paths.append(out / "val_dice_curves.png")
    atomic_savefig(fig, paths[-1], dpi=110)
    plt.close(fig)
    return paths




def build_report(
    rows: list[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    budgets: dict[str, dict[str, Any]] | None = None,
    errors: list[str] | None = None,
    stopped: list[str] | None = None,
    dataset: str = "dataset",
) -> dict[str, Any]:
    """Write the Markdown report, the two plots and ``results.json``.

    Args:
        rows: Finished trials (``result.json`` contents plus ``init_tag``).
        out_dir: Report folder (created).
        budgets: ``{init_tag: export info}`` of the pretrained inits (steps, samples_seen, …).
        errors: One line per failed trial.
        stopped: One line per trial the scheduler (ASHA) stopped early.
        dataset: Dataset name for titles.

    Returns:
        ``{"table": Markdown Dice table, "markdown": path, "plot": path, "curves": path,
        "files": every written path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sel = select_rows(rows)
    table = _table(sel, "test_dice", 3) if sel else "(no finished trials)"
    parts = [
        f"# Label efficiency — {dataset}",
        "",
        "Test Dice (3D, per volume, mean over foreground classes), mean ± std over seeds (number of "
        "seeds); per seed the lr / weight decay with the best validation Dice.",
        "",
        table,
        "",
    ]
    files: list[Path] = []
    if sel:
        parts += [
            "Test HD95 in mm (mean ± std over seeds; volumes with an undefined HD95 are left out):",
            "",
            _table(sel, "test_hd95", 2),
            "",
        ]
        files += _plots(sel, rows, out, dataset)
        parts += [
            "![label efficiency](label_efficiency.png)",
            "",
            "Validation Dice vs finetuning step (pretrained inits often lead early and are caught up later):",
            "",
            "![validation curves](val_dice_curves.png)",
            "",
        ]
    if budgets:
        parts += [
            "Pretraining budget of each pretrained init (from its export):",
            "",
            _budget_table(budgets),
            "",
        ]
    if errors:
        parts += ["Failed trials:", ""] + [f"- {e}" for e in errors] + [""]
    if stopped:
        parts += ["Stopped early by the scheduler (lr / weight-decay samples that lagged):", ""]
        parts += [f"- {s}" for s in stopped] + [""]
    md = out / "report.md"
    atomic_write_text(md, "\n".join(parts))
    res = out / "results.json"
    slim = [{k: v for k, v in r.items() if k not in ("history", "test_per_volume")} for r in rows]
    atomic_write_text(
        res,
        json.dumps({"rows": slim, "errors": errors or [], "budgets": budgets or {}}, indent=1, default=float),
    )
    files = [md, res, *files]
    log.info("label-efficiency report: %s\n%s", md, table)
    return {
        "table": table,
        "markdown": md,
        "plot": out / "label_efficiency.png",
        "curves": out / "val_dice_curves.png",
        "files": files,
    }
