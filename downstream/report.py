"""The label-efficiency report: how many labeled volumes pretraining saves, with its uncertainty.

From the finished trials of a sweep: per ``(init, n_labeled, seed)`` the trial with the best
validation Dice is kept (lr / weight-decay selection never looks at the test set). The report opens
with one sentence per pretrained init — the labeled volumes random init needs to match it, with a
bootstrap 95 % interval (:mod:`downstream.stats`) — then gives the paired differences to random init
(mean, interval, draws won), says which comparisons are too uncertain to resolve a 0.03 Dice
difference and what sample would, breaks test Dice down by subject attributes (site, protocol, …),
and shows mean ± std tables of Dice and HD95 over seeds.

Written as ``report.md``, ``label_efficiency.png`` (the figure the paper is about),
``labels_saved.png`` (random init's curve with the pretrained points projected onto it),
``subgroups.png`` (when the dataset has attributes), ``budget_<run>.png`` (test Dice against
pretraining samples seen, when ``init`` globbed a pretraining run's intermediate exports; the report
then names the smallest budget whose paired difference to random init has its interval above zero),
``val_dice_curves.png`` (validation Dice vs finetuning step per init: pretrained inits often converge
faster early and are caught up later, and a reader must see that) and ``results.json`` (rows,
statistics, sentences).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from downstream.stats import RESOLVE, analyze, smallest_useful_budget, volume_scores
from ssl_pretrain.fileio import atomic_savefig, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["build_report", "select_rows"]

_BUDGET_KEYS = ("steps", "samples_seen", "wall_time_s", "final_loss", "world_size", "probe_dice")


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


def _with_nsd(sel: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows with ``test_nsd`` (mean over volumes) when their per-volume metrics have NSD; else ``[]``."""
    if not any("nsd" in v for r in sel for v in (r.get("test_per_volume") or {}).values()):
        return []
    out = []
    for r in sel:
        per = r.get("test_per_volume") or {}
        scores = volume_scores(per, sorted(per), "nsd")
        out.append({**r, "test_nsd": r.get("test_nsd", float(np.nanmean(scores)) if np.isfinite(scores).any()
                                      else float("nan"))})
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _paired_cell(p: dict[str, Any] | None) -> str:
    if not p:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{_signed(p['mean'])} [{_signed(lo)}, {_signed(hi)}]"


def _paired_table(stats: dict[str, Any]) -> str:
    comps = stats["comparisons"]
    ns = sorted({c["n_labeled"] for c in comps}, key=lambda n: (n == 0, n))
    head = "| init | " + " | ".join(f"n={n or 'all'}" for n in ns) + " |"
    lines = [head, "|" + " --- |" * (len(ns) + 1)]
    for init in dict.fromkeys(c["init"] for c in comps):
        cells = []
        for n in ns:
            c = next((c for c in comps if c["init"] == init and c["n_labeled"] == n), None)
            p = c and c["paired"]
            if not p:
                cells.append("n/a")
                continue
            cells.append(f"{_paired_cell(p)}, wins {p['wins']}/{p['draws']}")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labels_table(stats: dict[str, Any]) -> str:
    lines = ["| init | n | mean test Dice | random init needs | 95 % CI | saved |", "|" + " --- |" * 6]
    for c in stats["comparisons"]:
        lab = c["labels"]
        saved = f"{c['saved']:+.1f}" if c["saved"] is not None and lab["text"][0].isdigit() else "n/a"
        n = c["n_labeled"] or f"all ({c['n']})"
        ci = lab["ci_text"].removeprefix("95 % CI ")
        lines.append(f"| {c['init']} | {n} | {c['mean']:.3f} | {lab['text']} | {ci} | {saved} |")
    return "\n".join(lines)


def _power_lines(stats: dict[str, Any]) -> list[str]:
    lines = []
    for c in stats["comparisons"]:
        p = c["paired"]
        if not p:
            continue
        where = f"{c['init']} vs random, n={c['n_labeled'] or 'all'}"
        if p["draws"] < 2:
            lines.append(
                f"- {where}: 1 draw, so the spread between labeled draws is not measured; the interval covers "
                "test volumes only (use ≥ 5 seeds at n ≤ 2)"
            )
        if p["half_width"] <= RESOLVE:
            continue
        vols, draws = p["volumes_needed"], p["draws_needed"]
        fixes = []
        if vols is not None:
            fixes.append(f"about {vols} test volumes (now {p['volumes']}) at {p['draws']} draws")
        if draws is not None:
            fixes.append(f"about {draws} draws (now {p['draws']}) at {p['volumes']} test volumes")
        if not fixes:  # neither alone suffices: scale both by the variance ratio
            f = (p["half_width"] / RESOLVE) ** 2
            fixes.append(
                f"about {math.ceil(p['volumes'] * f)} test volumes (now {p['volumes']}) and "
                f"{math.ceil(p['draws'] * f)} draws (now {p['draws']}) together"
            )
        fix = " or ".join(fixes) + f" would bring it to ±{RESOLVE:g}"
        lines.append(
            f"- {where}: CI half-width {p['half_width']:.4f} > {RESOLVE:g}, so a difference of {RESOLVE:g} Dice "
            f"cannot be resolved; {fix} (from the bootstrap variance)."
        )
    return lines


def _subgroups(stats: dict[str, Any], attributes: dict[str, dict[str, str]]) -> tuple[str, dict[str, Any]]:
    """Markdown tables of test Dice per attribute value, and the numbers behind them."""
    test_ids: list[str] = stats["test_ids"]
    names = sorted({k for sid in test_ids for k in attributes.get(sid, {})})
    parts: list[str] = []
    data: dict[str, Any] = {}
    cells = sorted(stats["cells"].values(), key=lambda c: (c.init, c.n_labeled == 0, c.n_labeled))
    for name in names:
        groups: dict[str, list[int]] = defaultdict(list)
        for j, sid in enumerate(test_ids):
            groups[attributes.get(sid, {}).get(name) or "(none)"].append(j)
        values = sorted(groups)
        head = "| init | n | " + " | ".join(f"{name}={v} ({len(groups[v])})" for v in values) + " |"
        lines = [head, "|" + " --- |" * (len(values) + 2)]
        data[name] = {"volumes": {v: [test_ids[j] for j in groups[v]] for v in values}, "rows": []}
        for c in cells:
            per_draw = {v: c.scores[:, groups[v]].mean(1) for v in values}
            lines.append(
                f"| {c.init} | {c.n_labeled or 'all'} | "
                + " | ".join(f"{per_draw[v].mean():.3f} ± {per_draw[v].std():.3f}" for v in values)
                + " |"
            )
            data[name]["rows"].append(
                {"init": c.init, "n_labeled": c.n_labeled, "n": c.n,
                 "mean": {v: float(per_draw[v].mean()) for v in values}}
            )
        parts += [f"By **{name}** (test volumes per value in brackets; mean ± std over draws):", "", *lines, ""]
    return "\n".join(parts), data


def _save(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend, layout; write ``path`` and close the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def _labels_plot(stats: dict[str, Any], path: Path, dataset: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = stats["curve"]
    ns = np.asarray(curve["n"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(ns, curve["mean"], "o", color="k", label="random (measured)")
    ax.plot(ns, curve["monotone"], "-", color="k", alpha=0.6, label="random (monotone fit)")
    floor = min(curve["mean"]) - 0.02
    for k, init in enumerate(dict.fromkeys(c["init"] for c in stats["comparisons"])):
        color = f"C{k}"
        comps = [c for c in stats["comparisons"] if c["init"] == init]
        ax.plot([c["n"] for c in comps], [c["mean"] for c in comps], "s", color=color, label=init)
        for c in comps:
            y, lab = c["mean"], c["labels"]
            # points beyond random init's range are drawn at its edge ("≥ max n" / "≤ min n")
            x, lo, hi = (min(max(v, ns[0]), ns[-1]) for v in (lab["value"], *lab["ci95"]))
            ax.annotate("", xy=(x, y), xytext=(c["n"], y),
                        arrowprops={"arrowstyle": "->", "color": color, "linestyle": "--"})
            ax.plot([x, x], [floor, y], ":", color=color)
            ax.hlines(y, lo, hi, color=color, linewidth=4, alpha=0.25)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [f"{x:g}" for x in ns])
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel("mean test Dice")
    ax.set_title(f"Labels saved — {dataset}\n(arrow: pretrained point projected onto random init; band: 95 % CI)",
                 fontsize=9)
    return _save(fig, ax, path)


def _subgroup_plot(data: dict[str, Any], path: Path, dataset: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data)
    width = max(len(d["volumes"]) for d in data.values())
    fig, axes = plt.subplots(len(names), width, figsize=(3.6 * width, 3.0 * len(names)), squeeze=False,
                             sharey=True)
    for i, name in enumerate(names):
        values = list(data[name]["volumes"])
        for j in range(width):
            ax = axes[i][j]
            if j >= len(values):
                ax.axis("off")
                continue
            v = values[j]
            inits = list(dict.fromkeys(r["init"] for r in data[name]["rows"]))
            for init in inits:
                pts = sorted((r["n"], r["mean"][v]) for r in data[name]["rows"] if r["init"] == init)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=init)
            ax.set_xscale("log", base=2)
            ticks = sorted({r["n"] for r in data[name]["rows"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_title(f"{name}={v} ({len(data[name]['volumes'][v])} test vols)", fontsize=9)
            ax.set_xlabel("labeled volumes")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("test Dice")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Test Dice by subject attribute — {dataset}", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def _series_name(pattern: str, taken: set[str]) -> str:
    """Short name of a budget sweep, usable in file names and MLflow keys: its pretraining run folder
    (``c1`` for ``runs/c1/export/step-*``), made unique among ``taken``."""
    p = Path(pattern)
    base = re.sub(r"[^\w.\-]", "_", p.parent.parent.name if p.parent.name == "export" else p.parent.name) or "budget"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


def _samples(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _budget_sweep(pattern: str, name: str, tags: list[str], budgets: dict[str, dict[str, Any]],
                  stats: dict[str, Any], sel: list[dict[str, Any]]) -> dict[str, Any]:
    """One budget sweep's answer: the smallest useful budget, its sentence, its Markdown table."""
    order = sorted(tags, key=lambda t: (budgets[t]["samples_seen"], budgets[t].get("steps") or 0))
    found = smallest_useful_budget(stats["comparisons"], order, budgets)
    comps = {(c["init"], c["n_labeled"]): c for c in stats["comparisons"]}
    head = (f"Pretraining budget ({pattern}: {len(order)} exports, {_samples(budgets[order[0]]['samples_seen'])} to "
            f"{_samples(budgets[order[-1]]['samples_seen'])} samples seen)")
    u = found["smallest"]
    if not found["per_n"]:
        why = stats["reason"] or "no trial of these exports finished"
        sentence = f"{head}: no useful budget can be named without paired differences to random init ({why})."
    elif u is not None:
        lo, hi = u["ci95"]
        sentence = (
            f"{head}: the smallest budget at which the pretrained init beats random init with its 95 % CI above "
            f"zero is {_samples(u['samples_seen'])} samples seen (step {u['steps']}; n={u['n_labeled'] or 'all'}: "
            f"{_signed(u['mean'])} [{_signed(lo)}, {_signed(hi)}])."
        )
        if len(found["per_n"]) > 1:
            sentence += " By n: " + "; ".join(
                f"n={x['n_labeled'] or 'all'} "
                + (f"from {_samples(x['useful']['samples_seen'])}" if x["useful"] else "none")
                for x in found["per_n"]
            ) + "."
    else:
        last = order[-1]
        at_last = [(x["n_labeled"], (comps.get((last, x["n_labeled"])) or {}).get("paired")) for x in found["per_n"]]
        sentence = (
            f"{head}: none found; at no budget is the paired difference to random init positive with its 95 % CI "
            f"above zero (at the largest, {_samples(budgets[last]['samples_seen'])} samples seen: "
            + "; ".join(f"n={n or 'all'} {_paired_cell(p)}" for n, p in at_last)
            + ")."
        )
    ns = sorted({r["n_labeled"] for r in sel if r["init_tag"] in order or r["init_tag"] == "random"},
                key=lambda n: (n == 0, n))
    lines = ["| init | samples seen | steps | probe Dice | " + " | ".join(
        f"n={n or 'all'}: test Dice; paired diff [95 % CI]" for n in ns) + " |", "|" + " --- |" * (len(ns) + 4)]
    useful = {(x["useful"]["tag"], x["n_labeled"]) for x in found["per_n"] if x["useful"]}
    for t in ["random", *order]:
        info = budgets.get(t, {"samples_seen": 0, "steps": 0})
        cells = []
        for n in ns:
            dice = [r["test_dice"] for r in sel if r["init_tag"] == t and r["n_labeled"] == n]
            cell = _fmt(dice)
            if t != "random":
                cell += f"; {_paired_cell((comps.get((t, n)) or {}).get('paired'))}"
                cell += " (smallest useful)" if (t, n) in useful else ""
            cells.append(cell)
        probe = info.get("probe_dice")
        lines.append(f"| {t} | {_samples(info['samples_seen'])} | {info.get('steps', 'n/a')} | "
                     f"{f'{probe:.3f}' if isinstance(probe, (int, float)) else 'n/a'} | " + " | ".join(cells) + " |")
    return {"pattern": pattern, "name": name, "tags": order, "ns": ns, **found, "sentence": sentence,
            "table": "\n".join(lines), "plot": f"budget_{name}.png"}


def _budget_plot(b: dict[str, Any], budgets: dict[str, dict[str, Any]], sel: list[dict[str, Any]], path: Path,
                 dataset: str) -> Path:
    """Test Dice against pretraining samples seen, one line per n_labeled, random init at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs_all = [0.0] + [float(budgets[t]["samples_seen"]) for t in b["tags"]]
    useful = {x["n_labeled"]: x["useful"] for x in b["per_n"]}
    for k, n in enumerate(b["ns"]):
        pts = []
        for x, t in zip(xs_all, ["random", *b["tags"]], strict=True):
            dice = [r["test_dice"] for r in sel if r["init_tag"] == t and r["n_labeled"] == n]
            if dice:
                pts.append((x, float(np.mean(dice)), float(np.std(dice))))
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    color=f"C{k}", label=f"n_labeled={_n_label(n, sel)}")
        u = useful.get(n)
        if u is not None:
            y = next(p[1] for p in pts if p[0] == float(u["samples_seen"]))
            ax.plot([u["samples_seen"]], [y], "*", markersize=16, color=f"C{k}", markeredgecolor="k")
    positive = [x for x in xs_all if x > 0]
    if positive and max(positive) / min(positive) > 10:  # budgets spanning decades; 0 stays on the axis
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(xs_all, [_samples(x) for x in xs_all], fontsize=8)
    ax.set_xlabel("pretraining samples seen (0 = random init)")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    shown = b["pattern"] if len(b["pattern"]) <= 50 else "…/" + "/".join(Path(b["pattern"]).parts[-4:])
    ax.set_title(f"Pretraining budget — {dataset}\n{shown}\n★ smallest budget whose paired 95 % CI is above 0",
                 fontsize=8)
    return _save(fig, ax, path)


def build_report(
    rows: list[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    budgets: dict[str, dict[str, Any]] | None = None,
    errors: list[str] | None = None,
    stopped: list[str] | None = None,
    dataset: str = "dataset",
    attributes: dict[str, dict[str, str]] | None = None,
    budget_series: dict[str, list[str]] | None = None,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Write the Markdown report, its plots and ``results.json``.

    Args:
        rows: Finished trials (``result.json`` contents plus ``init_tag``).
        out_dir: Report folder (created).
        budgets: ``{init_tag: export info}`` of the pretrained inits (steps, samples_seen, …).
        errors: One line per failed trial.
        stopped: One line per trial the scheduler (ASHA) stopped early.
        dataset: Dataset name for titles.
        attributes: ``{subject id: {attribute: value}}`` (``downstream.data.subject_attributes``)
            for the subgroup breakdown.
        budget_series: ``{glob: init tags}`` of pretraining-budget sweeps (one init per intermediate
            export; their ``budgets`` have ``samples_seen``): adds the Dice-vs-budget plot and the smallest
            budget whose paired difference to random init has its 95 % interval above zero.
        n_boot: Bootstrap replicates of the intervals.

    Returns:
        ``{"table": Markdown Dice table, "sentences": {init: labels-saved sentence}, "budget": per budget
        sweep its answer (``pattern``, ``name``, ``smallest``, ``per_n``, ``sentence``), "budget_sentences":
        those sentences, "stats": the statistics (:func:`downstream.stats.analyze` without the cells),
        "markdown": path, "plot": path, "curves": path, "files": every written path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sel = select_rows(rows)
    table = _table(sel, "test_dice", 3) if sel else "(no finished trials)"
    stats = analyze(sel, n_boot=n_boot)
    taken: set[str] = set()
    sweeps = [_budget_sweep(pattern, _series_name(pattern, taken), tags, budgets or {}, stats, sel)
              for pattern, tags in (budget_series or {}).items()]
    parts = _head_section(stats, sweeps, table, dataset, n_boot, leaks := _leak_lines(budgets or {}, sel), sel)
    files: list[Path] = []
    if stats["comparisons"]:
        parts += _comparison_section(stats)
        files.append(_labels_plot(stats, out / "labels_saved.png", dataset))
        parts += ["![labels saved](labels_saved.png)", ""]
    against_nnunet = _against_nnunet(sel, n_boot, parts)
    files += _budget_sections(sweeps, budgets or {}, sel, out, dataset, parts)
    if notes := [*stats["notes"], *_empty_notes(sel)]:
        parts += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    subgroups, subgroup_text = _subgroup_section(stats, attributes, out, dataset, parts, files)
    if sel:
        parts += _metric_section(sel)
        files += _plots(sel, rows, out, dataset)
    parts += _tail_section(budgets, errors, stopped, leaks)
    public = {k: v for k, v in stats.items() if k != "cells"} | {
        "subgroups": subgroups, "budget": [{k: v for k, v in b.items() if k != "table"} for b in sweeps]}
    md, res = _write_report(out, parts, rows, errors, budgets, public)
    log.info("label-efficiency report: %s", md)  # the table and sentences are in the result (the CLI prints them)
    return {
        "table": table,
        "sentences": stats["sentences"],
        "paired_table": _paired_table(stats) if stats["comparisons"] else "",
        "subgroups_table": subgroup_text,
        "budget": public["budget"],
        "budget_sentences": [b["sentence"] for b in sweeps],
        "nnunet_sentences": against_nnunet["sentences"],
        "leaks": leaks,
        "stats": public,
        "markdown": md,
        "plot": out / "label_efficiency.png",
        "curves": out / "val_dice_curves.png",
        "files": [md, res, *files],
    }


def _head_section(stats: dict[str, Any], sweeps: list[dict[str, Any]], table: str, dataset: str,
                  n_boot: int, leaks: list[str], sel: list[dict[str, Any]]) -> list[str]:
    """Title, the labels-saved and budget sentences, the basis of the intervals, the Dice table and each init's
    dimensionality (every trial's test metrics are computed on the files' own grids, whatever it is)."""
    draws = sorted({len(c.seeds) for c in stats["cells"].values()})
    basis = (
        f"From {stats['volumes']} test volumes and {'/'.join(map(str, draws)) or 0} labeled draws (seeds) per n; "
        f"95 % intervals from a hierarchical bootstrap ({n_boot} resamples of the draws, then of the test volumes). "
        "For a seed, every init trains on the same labeled volumes (checked from each trial's train_ids), so "
        "differences are paired by draw and by test volume."
    )
    warnings = [line for line in leaks if line.startswith("WARNING")]
    parts = [f"# Label efficiency — {dataset}", ""] + ([*warnings, ""] if warnings else [])
    top = [*stats["sentences"].values(), *[b["sentence"] for b in sweeps]]
    if top:
        parts += [*top, ""] + ([basis, ""] if stats["comparisons"] else [])
    if stats["reason"]:
        parts += [f"No paired statistics: {stats['reason']}.", ""]
    return parts + [
        "Test Dice (3D, per volume, mean over foreground classes), mean ± std over seeds (number of "
        "seeds); per seed the lr / weight decay with the best validation Dice.",
        "",
        table,
        "",
    ] + ([f"Dimensionality of each init's network: {dims} (test metrics on each file's own grid alike).", ""]
         if (dims := ", ".join(dict.fromkeys(f"{r['init_tag']} {r.get('spatial_dims', 2)}D" for r in sel))) else [])


def _empty_notes(sel: list[dict[str, Any]]) -> list[str]:
    """Say where a class absent from both prediction and label scored Dice 1 inside a mean."""
    counts = {(r["init_tag"], r["n_labeled"], r["seed"]): r.get("test_dice_empty_both", 0) for r in sel}
    hit = {k: n for k, n in counts.items() if n}
    if not hit:
        return []
    return [f"{sum(hit.values())} (test volume, class) pair(s) in {len(hit)} trial(s) had the class in neither the "
            "label nor the prediction and entered the mean Dice as 1.0 (e.g. "
            + ", ".join(f"{i} n={n} seed {s}: {c}" for (i, n, s), c in list(hit.items())[:3]) + ")"]


def _leak_lines(budgets: dict[str, dict[str, Any]], sel: list[dict[str, Any]]) -> list[str]:
    """Per pretrained init: does its pretraining set (the subjects its export records) hold a test subject?

    A line starting with ``WARNING`` where it does: that init's test Dice was measured on subjects it
    was pretrained on (``make_shards --exclude`` keeps them out).
    """
    test = sorted({i for r in sel for i in r.get("test_ids", ())})
    lines = []
    for tag, info in budgets.items():
        seen = info.get("pretrain_subjects")
        if not isinstance(seen, list):
            lines.append(f"{tag}: unknown (its export records no pretraining subjects)")
            continue
        leaked = sorted(set(seen) & set(test))
        if leaked:
            lines.append(f"WARNING {tag}: its pretraining shards hold {len(leaked)} of the {len(test)} test subjects "
                         f"({', '.join(leaked[:5])}{', …' if len(leaked) > 5 else ''}): it was pretrained on subjects "
                         "it is tested on; re-shard with make_shards --exclude")
        else:
            lines.append(f"{tag}: none of the {len(test)} test subjects among its {len(seen)} pretraining subjects")
    return lines


def _subgroup_section(stats: dict[str, Any], attributes: dict[str, dict[str, str]] | None, out: Path,
                      dataset: str, parts: list[str], files: list[Path]) -> tuple[dict[str, Any], str]:
    """Append the subgroup breakdown and its plot (when there are attributes); return it and its table."""
    if not (attributes and stats["cells"]):
        return {}, ""
    text, subgroups = _subgroups(stats, attributes)
    if not subgroups:
        return {}, ""
    parts += ["## Subgroups", "", text]
    files.append(_subgroup_plot(subgroups, out / "subgroups.png", dataset))
    parts += ["![subgroups](subgroups.png)", ""]
    return subgroups, text


def _comparison_section(stats: dict[str, Any]) -> list[str]:
    """Paired differences to random init, the power lines and the labels-saved table."""
    parts = [
        "## Paired difference to random init",
        "",
        "Test Dice of the init minus random init's, same draw and same test volume: mean [95 % CI], and "
        "the draws in which the init's mean Dice is higher.",
        "",
        _paired_table(stats),
        "",
    ]
    power = _power_lines(stats)
    parts += ["Power:", "", *power, ""] if power else [
        f"Power: every interval's half-width is at most {RESOLVE:g} Dice.", ""]
    return parts + [
        "## Labels saved",
        "",
        "Labeled volumes random init needs to reach the init's mean test Dice: random init's curve made "
        "monotone (isotonic regression) and interpolated in log n; '≥ max n' when beyond the measured range.",
        "",
        _labels_table(stats),
        "",
    ]


def _budget_sections(sweeps: list[dict[str, Any]], budgets: dict[str, dict[str, Any]], sel: list[dict[str, Any]],
                     out: Path, dataset: str, parts: list[str]) -> list[Path]:
    """One section (added to ``parts``) and plot (returned) per pretraining-budget sweep."""
    files = []
    for b in sweeps:
        parts += [f"## Pretraining budget: {b['pattern']}", "", b["sentence"], "",
                  "A budget is useful at n when the paired difference to random init (same draws, same test "
                  "volumes) has its 95 % bootstrap interval above zero.", "", b["table"], ""]
        if sel:
            files.append(_budget_plot(b, budgets, sel, out / b["plot"], dataset))
            parts += [f"![pretraining budget]({b['plot']})", ""]
    return files


def _against_nnunet(sel: list[dict[str, Any]], n_boot: int, parts: list[str]) -> dict[str, Any]:
    """Statistics against nnU-Net from scratch when the sweep has ``init: nnunet`` (their section added to
    ``parts``); no comparisons otherwise."""
    if not any(r["init_tag"] == "nnunet" for r in sel):
        return {"comparisons": [], "sentences": {}}
    stats = analyze(sel, reference="nnunet", n_boot=n_boot)
    if not stats["comparisons"]:
        return stats
    parts += [
        "## Against nnU-Net from scratch",
        "",
        "Test Dice of the init minus nnU-Net's (trained by nnU-Net itself on the same draw, predicted by it, "
        "scored here on the same test volumes): mean [95 % CI], draws won.",
        "",
        _paired_table(stats),
        "",
        *[f"- {sentence}" for sentence in stats["sentences"].values()],
        "",
    ]
    return stats


def _metric_section(sel: list[dict[str, Any]]) -> list[str]:
    """HD95 and NSD tables, and the label-efficiency and validation-curve figures."""
    parts = ["Test HD95 in mm (mean ± std over seeds; volumes with an undefined HD95 are left out):", "",
             _table(sel, "test_hd95", 2), ""]
    nsd = _with_nsd(sel)
    if nsd:
        parts += ["Test NSD (normalised surface Dice, mean ± std over seeds):", "", _table(nsd, "test_nsd", 3), ""]
    return parts + [
        "![label efficiency](label_efficiency.png)",
        "",
        "Validation Dice vs finetuning step (pretrained inits often lead early and are caught up later):",
        "",
        "![validation curves](val_dice_curves.png)",
        "",
    ]


def _tail_section(budgets: dict[str, dict[str, Any]] | None, errors: list[str] | None,
                  stopped: list[str] | None, leaks: list[str]) -> list[str]:
    """The pretraining budget and data of each init, failed trials and trials the scheduler stopped."""
    parts: list[str] = []
    if budgets:
        parts += ["Pretraining budget of each pretrained init (from its export):", "", _budget_table(budgets), ""]
        parts += ["Pretraining data and the test subjects:", "", *[f"- {line}" for line in leaks], ""]
    if errors:
        parts += ["Failed trials:", ""] + [f"- {e}" for e in errors] + [""]
    if stopped:
        parts += ["Stopped early by the scheduler (lr / weight-decay samples that lagged):", ""]
        parts += [f"- {s}" for s in stopped] + [""]
    return parts


def _write_report(out: Path, parts: list[str], rows: list[dict[str, Any]], errors: list[str] | None,
                  budgets: dict[str, dict[str, Any]] | None, public: dict[str, Any]) -> tuple[Path, Path]:
    """``report.md`` and ``results.json`` (the rows without their histories), atomically."""
    md = out / "report.md"
    atomic_write_text(md, "\n".join(parts))
    res = out / "results.json"
    slim = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    atomic_write_text(
        res,
        json.dumps({"rows": slim, "errors": errors or [], "budgets": budgets or {}, "stats": public}, indent=1,
                   default=float),
    )
    return md, res
