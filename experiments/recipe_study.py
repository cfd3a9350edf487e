"""Pretraining recipe study: segmentation-probe Dice against CPU minutes, per recipe (issue 16).

Which pretraining settings make the exported encoder a better start than random weights at a
laptop budget? Each recipe is a set of config overrides of ``launch/configs/debug.yaml`` (the CPU
demo's pretraining settings), run with ``launch/pretrain.py`` for the same CPU time, and judged by
the run's own segmentation probe (``probe:``; issue 9) against its random-init reference (the
probe at step 0 of the same run).

One command (the README's study is this with every recipe, then the checks below)::

    python -m experiments.recipe_study --out runs/recipes --minutes 2 --recipes c-base,r-base

Stages (each is reused when complete, so an interrupted study continues):

1. ``data/unlabeled`` and ``data/labeled``: a DEVELOPMENT cohort of its own (cohort seeds 101 and
   102; the demo's are 1 and 2 and stay out of the study, so the demo remains a fresh test): the
   unlabeled subjects round-robin over the scale's sites, and 6 labeled subjects at ``site-1``
   (like the demo's labeled training pool, which its probe reads), listed in ``data/probe.txt``.
2. ``shards``: the unlabeled cohort, preprocessed like the CPU demo (``SCALES`` of
   :mod:`experiments.label_efficiency`: 64×64 slices at 6 mm for ``--scale cpu``).
3. ``runs/<recipe>``: one pretraining run per recipe. ``--minutes M`` gives every recipe the same
   CPU time: a short timing run (``calibrate/<recipe>``, removed afterwards) measures the seconds
   per step of the recipe on this machine, and ``train.max_steps`` is ``M`` minutes' worth of
   them; ``--steps N`` fixes the steps instead. The probe runs at step 0, about every quarter of
   the run and at the end (2 training and 4 held-out volumes).
4. ``recipe_study.md`` (the table, printed too; with ``--seeds 0,1,…`` a second table of the mean
   and range over seeds) and ``recipe_study.png`` (probe Dice against pretraining minutes per
   recipe, one panel per task, with the random-init references as dashed lines).

Two checks after it, because a probe gain need not survive finetuning:

5. ``--finetune c-base,r-base [--variant …]``: the demo's sweep (n = 1, 2 labeled volumes, its
   seeds and steps) from those recipes' seed-0 exports and from random init, on a labeled
   development cohort of its own in the demo's scenario (seed 104: labels from site-1, validation
   and held-out subjects from every site); ``--variant`` sets how the encoder is handed over
   (:data:`FINETUNE_VARIANTS`). Writes ``finetune-<variant>.md``.
6. ``--budget c-base --budget-minutes 10 --exports 4``: the recipe pretrained longer, exporting
   along the way, and the budget sweep from those exports on the same cohort: the smallest budget
   whose paired gain over random init has its 95 % interval above zero.

Pretraining minutes exclude the probe's own time: a run's ``metrics.jsonl`` probe rows carry the
probe's time and its cumulative share of the run, from which the elapsed time at each probe follows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from experiments.label_efficiency import (
    DEMO_SEEDS,
    SCALES,
    Scale,
    make_cohorts,
    run_stage,
    shard_cohort,
    site_splits,
    sweep_stage,
)
from mri_ssl import CONFIG_DIR
from ssl_pretrain.data.ingest import discover
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.engine.plots import read_metrics

log = logging.getLogger(__name__)

CONFIG = CONFIG_DIR / "debug.yaml"
UNLABELED_SEED, LABELED_SEED = 101, 102  # the demo uses 1 and 2: keep its cohorts out of the study
MIX_SEED = 103  # the other organ's unlabeled phantoms, pooled in for the cohort-mixture recipes
FINETUNE_SEED = 104  # the finetune check's labeled cohort (the demo's scenario on subjects of its own)
assert not {UNLABELED_SEED, LABELED_SEED, MIX_SEED, FINETUNE_SEED} & set(DEMO_SEEDS.values())
FINETUNE_COUNTS = (1, 2)  # labeled volumes in the finetune check (the demo's seeds and steps)
# How the finetune check starts from an export; the sweep selects, per grid point, on validation Dice.
FINETUNE_VARIANTS: dict[str, tuple[str, ...]] = {
    "demo": (),  # the demo's sweep as launch/configs/sweep_debug.yaml sets it
    "lr-loaded1.0": ("train.pretrained_lr_scale=1.0",),  # every parameter at the same lr (the old demo)
    "lr-loaded0.3": ("train.pretrained_lr_scale=0.3",),  # loaded parameters train at 0.3 × lr
    # encoder only, or encoder + decoder loaded, selected on validation Dice (at one lr for all)
    "transfer": ("search.transfer=[encoder, encoder+decoder]", "train.pretrained_lr_scale=1.0"),
}
PROBE_TRAIN, PROBE_EVAL = 2, 4
PROBES_PER_RUN = 4  # probes after step 0: every quarter of the run (the last one at the end)
CALIBRATE_STEPS = 30  # timing run per recipe; its first third (set-up, loader warm-up: slower) is not counted

__all__ = ["Recipe", "RECIPES", "FINETUNE_VARIANTS", "RunResult", "budget_check", "finetune_check", "read_run",
           "run_study", "table_markdown", "plot_study", "main"]


@dataclass(frozen=True)
class Recipe:
    """One pretraining recipe: a task and its overrides of ``debug.yaml`` (after the study's own)."""

    task: Literal["contrastive", "regression"]
    what: str  # what differs from the demo's settings, for the table
    overrides: tuple[str, ...] = ()
    batch: int | None = None  # data.batch_size; None = the scale's (the demo's)
    widths: tuple[int, ...] | None = None  # model.widths; None = the scale's (the demo's)
    cohort: Literal["dev", "mix"] = "dev"  # mix: the development cohort pooled with as many of the other organ


# Keys are checked against the config by launch/pretrain.py itself: an unknown key fails the run.
# debug.yaml's settings are the baseline (c-base, r-base); each other recipe changes one axis of it.
MRI_AUGMENT = ("contrastive.augment.bias_field=0.3", "contrastive.augment.remap_prob=0.8",
               "contrastive.augment.invert_prob=0.5", "contrastive.augment.gamma=0.5")
RECIPES: dict[str, Recipe] = {
    "c-base": Recipe("contrastive", "the demo's settings (views, temperature 0.1, head 32→16, lr 3e-3)"),
    "c-temp0.5": Recipe("contrastive", "temperature 0.5", ("contrastive.temperature=0.5",)),
    "c-temp0.05": Recipe("contrastive", "temperature 0.05", ("contrastive.temperature=0.05",)),
    # One CPU rank: the batch grows as the micro batch (gradient accumulation would not add negatives).
    "c-batch64": Recipe("contrastive", "batch 64 (micro batch of the one CPU rank: 126 negatives per view)",
                        batch=64),
    "c-partition-local": Recipe(
        "contrastive", "positives=partition + local decoder loss (weight 1.0)",
        ("contrastive.positives=partition", "contrastive.local_weight=1.0"),
    ),
    "c-aug-mri": Recipe(
        "contrastive", "MRI intensity augmentation: bias field 0.3, Bézier remap 0.8 (inverted 0.5), gamma 0.5",
        MRI_AUGMENT,
    ),
    "c-aug-mri-mild": Recipe(
        "contrastive", "milder MRI intensity augmentation: bias field 0.15, Bézier remap 0.5 (inverted 0.25)",
        ("contrastive.augment.bias_field=0.15", "contrastive.augment.remap_prob=0.5",
         "contrastive.augment.invert_prob=0.25"),
    ),
    "c-head-large": Recipe("contrastive", "projection head 256→128", ("contrastive.proj_hidden=256",
                                                                     "contrastive.proj_dim=128")),
    "c-lr1e-3": Recipe("contrastive", "learning rate 1e-3", ("train.lr=1.0e-3",)),
    "c-wide": Recipe("contrastive", "UNet widths 24-48-96-192 (1.5x)", widths=(24, 48, 96, 192)),
    "c-mix": Recipe("contrastive", "cohort mixture: + as many prostate phantoms", cohort="mix"),
    "r-base": Recipe("regression", "the demo's settings (Models Genesis + swaps, L2, lr 3e-3)"),
    "r-strong": Recipe(
        "regression", "stronger corruption (shuffle 0.9 of 0.5 blocks, 5 paint boxes, swap 0.9 × 8)",
        ("regression.shuffle_prob=0.9", "regression.shuffle_fraction=0.5", "regression.paint_boxes=5",
         "regression.swap_prob=0.9", "regression.swap_count=8"),
    ),
    "r-l1": Recipe("regression", "L1 restoration loss", ("regression.loss=l1",)),
    "r-mae": Recipe(
        "regression", "masked image modelling only: 60 % of 8-px patches masked, loss on them",
        ("regression.intensity_prob=0", "regression.shuffle_prob=0", "regression.paint_prob=0",
         "regression.swap_prob=0", "regression.mask_ratio=0.6", "regression.mask_patch=8",
         "regression.mask_loss=masked"),
    ),
    "r-genesis-mask": Recipe("regression", "the demo's corruptions + 40 % of 8-px patches masked",
                             ("regression.mask_ratio=0.4", "regression.mask_patch=8")),
    "r-lr1e-3": Recipe("regression", "learning rate 1e-3", ("train.lr=1.0e-3",)),
    "r-wide": Recipe("regression", "UNet widths 24-48-96-192 (1.5x)", widths=(24, 48, 96, 192)),
    "r-mix": Recipe("regression", "cohort mixture: + as many prostate phantoms", cohort="mix"),
}


@dataclass(frozen=True)
class RunResult:
    """What the study reads back from one recipe's run."""

    recipe: str
    task: str
    steps: int
    batch: int
    curve: tuple[tuple[int, float, float], ...]  # (step, pretraining minutes at the probe, probe Dice)
    wall_min: float  # pretraining minutes of the whole run, probe time excluded
    probe_frac: float  # share of the run's wall time spent probing
    seed: int = 0  # the run's seed and data.seed (initial weights, augmentations, data order)

    @property
    def random_init(self) -> float:
        """The probe at step 0: the same network before any pretraining."""
        return self.curve[0][2]

    @property
    def end(self) -> float:
        """The probe at the last step."""
        return self.curve[-1][2]

    @property
    def best(self) -> tuple[float, int]:
        """Best probe Dice after step 0 and its step."""
        step, _, dice = max(self.curve[1:], key=lambda c: (c[2], -c[0]))
        return dice, step


def _say(msg: str) -> None:
    print(f"[recipes] {msg}", flush=True)


def _run(cmd: list[str], cwd: Path, log_file: Path) -> None:
    """Run one command with its output in ``log_file`` (eight runs' progress bars would bury the study's lines).

    Raises:
        SystemExit: the command failed; the message holds the end of its log.
    """
    _say(f"$ (cd {cwd} && {shlex.join(cmd)})  > {log_file}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    code = run_stage(cmd, cwd, log_file)
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise SystemExit(f"{tail}\n[recipes] command failed (exit {code}), log {log_file}: {shlex.join(cmd)}")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"[recipes] {path}: not found; the run wrote no metrics")
    return read_metrics(path)


def _ensure_cohort(path: Path, kind: str, n: int, seed: int, sites: int, *, labels: bool,
                   site_of: list[int] | None = None) -> Path:
    """Generate a phantom cohort at ``path`` unless it is complete (make_cohort writes dataset.json last)."""
    if (path / "dataset.json").is_file():
        _say(f"reusing cohort {path}")
    else:
        _say(f"generating {n} synthetic {kind} subjects (seed {seed}, {sites} sites) in {path}")
        make_cohort(kind, n, path, seed=seed, labels=labels, sites=sites, site_of=site_of)  # type: ignore[arg-type]
    return path


def _cohort(out: Path, scale: Scale, kind: str) -> tuple[Path, Path]:
    """The development cohorts and ``data/probe.txt`` (every labeled subject: the probe's pool)."""
    n_probe = PROBE_TRAIN + PROBE_EVAL
    unlabeled = _ensure_cohort(out / "data" / "unlabeled", kind, scale.n_unlabeled, UNLABELED_SEED, scale.sites,
                               labels=False)
    labeled = _ensure_cohort(out / "data" / "labeled", kind, n_probe, LABELED_SEED, scale.sites, labels=True,
                             site_of=[0] * n_probe)  # site-1, like the demo's labeled pool
    subjects, _ = discover(labeled, labels=True)
    probe = out / "data" / "probe.txt"
    probe.write_text(f"# development cohort (seed {LABELED_SEED}): the probe's labeled volumes\n"
                     + "".join(f"{s.image}\t{s.label}\n" for s in subjects))
    return unlabeled, probe


def _every(steps: int) -> int:
    """Steps between probes (and checkpoints, so a resumed run repeats no probe): a quarter of the run."""
    return max(1, math.ceil(steps / PROBES_PER_RUN))


def _overrides(name: str, recipe: Recipe, scale: Scale, shards: Path, run_dir: Path, steps: int,
               seed: int = 0) -> list[str]:
    """The study's overrides of ``debug.yaml`` for one run, the recipe's last (they win)."""
    return [
        f"task={recipe.task}", f"data.shards={shards}", f"out_dir={run_dir}", "resume=auto", "track=false",
        f"run_name=recipe-{name}", f"seed={seed}", f"data.seed={seed}",
        f"model.widths={list(recipe.widths or scale.widths)}",
        f"data.batch_size={recipe.batch or scale.pretrain_batch}", f"train.max_steps={steps}",
        f"train.ckpt_every={_every(steps)}", f"train.image_every={steps}",
        "train.cpu_threads=null",  # as the demo: debug.yaml pins 1 thread for its tiny model; use the cores here
        *recipe.overrides,
    ]


def _pretrain_cmd(name: str, recipe: Recipe, scale: Scale, shards: Path, run_dir: Path, steps: int,
                  *extra: str, seed: int = 0) -> list[str]:
    """``launch/pretrain.py`` on ``debug.yaml`` with the study's overrides, then ``extra``."""
    return [sys.executable, "-m", "mri_ssl.cli.pretrain", "--config", str(CONFIG),
            *_overrides(name, recipe, scale, shards, run_dir, steps, seed), *extra]


def _probe(probe: Path, every: int) -> tuple[str, ...]:
    """The probe's overrides: the study's probe volumes every ``every`` steps."""
    return (f"probe.root={probe}", f"probe.every={every}", f"probe.n_train={PROBE_TRAIN}", f"probe.n_eval={PROBE_EVAL}")


def _calibrate(out: Path, name: str, recipe: Recipe, scale: Scale, shards: Path, minutes: float) -> int:
    """Steps of ``recipe`` that take ``minutes`` of CPU time here, from a short timing run."""
    run_dir = out / "calibrate" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    # one step's time per row; no checkpoint inside the timed steps
    cmd = _pretrain_cmd(name, recipe, scale, shards, run_dir, CALIBRATE_STEPS, "train.log_every=1",
                        f"train.ckpt_every={CALIBRATE_STEPS}")
    _run(cmd, out, out / "calibrate" / f"{name}.log")
    rows = [r for r in _rows(run_dir) if "samples_per_s" in r and r["step"] > CALIBRATE_STEPS // 3]
    batch = recipe.batch or scale.pretrain_batch
    s_per_step = batch / statistics.median(r["samples_per_s"] for r in rows)
    shutil.rmtree(run_dir)
    steps = max(PROBES_PER_RUN, round(minutes * 60 / s_per_step))
    _say(f"{name}: {s_per_step:.2f} s per step -> {steps} steps for {minutes:g} min")
    return steps


def read_run(name: str, recipe: Recipe, run_dir: Path, seed: int = 0) -> RunResult:
    """Read one finished run's probe curve, steps and time from its ``metrics.jsonl`` and ``summary.json``.

    The probe rows carry ``probe/time_s`` (that probe) and ``probe/time_frac`` (probing so far over
    the elapsed run time including that probe), so the elapsed time at a probe is the cumulative
    probe time over ``time_frac``; minus the probe time it is the pretraining time.

    Raises:
        SystemExit: the run has no summary or no probe at step 0 (one line naming the file).
    """
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"[recipes] {summary_path}: not found; the run did not finish")
    summary = json.loads(summary_path.read_text())
    curve, probe_s = [], 0.0
    for row in _rows(run_dir):
        if "probe/dice" not in row:
            continue
        probe_s += row["probe/time_s"]
        elapsed = probe_s / row["probe/time_frac"]
        curve.append((int(row["step"]), (elapsed - probe_s) / 60, float(row["probe/dice"])))
    if len(curve) < 2 or curve[0][0] != 0:
        raise SystemExit(f"[recipes] {run_dir / 'metrics.jsonl'}: needs the probe at step 0 and after it")
    steps = int(summary["steps"])
    return RunResult(
        recipe=name, task=recipe.task, steps=steps, batch=int(summary["samples_seen"]) // max(1, steps),
        curve=tuple(curve), wall_min=(summary["wall_time_s"] - summary["probe"]["time_s"]) / 60,
        probe_frac=float(summary["probe"]["time_frac"]), seed=seed,
    )


def table_markdown(results: Sequence[RunResult]) -> str:
    """The study's table: one row per run; gains are over the same run's random-init probe.

    With several seeds of a recipe a second table gives, per recipe, the mean over its seeds and
    the range of the gains.
    """
    lines = [
        "| recipe | what changes | seed | steps | batch | CPU min | probe Dice (end) | best (step) | random init "
        "| gain (end) | gain (best) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        best, best_step = r.best
        lines.append(
            f"| {r.recipe} | {RECIPES[r.recipe].what} | {r.seed} | {r.steps} | {r.batch} | {r.wall_min:.2f} "
            f"| {r.end:.3f} | {best:.3f} ({best_step}) | {r.random_init:.3f} | {r.end - r.random_init:+.3f} "
            f"| {best - r.random_init:+.3f} |"
        )
    by_recipe: dict[str, list[RunResult]] = {}
    for r in results:
        by_recipe.setdefault(r.recipe, []).append(r)
    if all(len(runs) == 1 for runs in by_recipe.values()):
        return "\n".join(lines)
    lines += [
        "", "Mean over seeds (range of the per-seed gains in brackets):", "",
        "| recipe | seeds | probe Dice (end) | random init | gain (end) | gain (best) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in by_recipe.items():
        gains = [r.end - r.random_init for r in runs]
        best_gains = [r.best[0] - r.random_init for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {statistics.mean(r.end for r in runs):.3f} "
            f"| {statistics.mean(r.random_init for r in runs):.3f} "
            f"| {statistics.mean(gains):+.3f} [{min(gains):+.3f}, {max(gains):+.3f}] "
            f"| {statistics.mean(best_gains):+.3f} [{min(best_gains):+.3f}, {max(best_gains):+.3f}] |"
        )
    return "\n".join(lines)


def plot_study(results: Sequence[RunResult], out: Path) -> Path:
    """Draw ``out``: probe Dice against pretraining minutes, one line per recipe, random-init references dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ssl_pretrain.fileio import atomic_savefig

    tasks = sorted({r.task for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = [r for r in results if r.task == task]
        colours = plt.get_cmap("tab20")(range(20))
        refs: dict[float, list[str]] = {}
        for i, r in enumerate(runs):
            _, minutes, dice = zip(*r.curve, strict=True)
            label = r.recipe if r.seed == 0 else f"{r.recipe} (seed {r.seed})"
            ax.plot(minutes, dice, marker="o", markersize=3, color=colours[i % 20],
                    linestyle="-" if r.seed == 0 else "--", label=label)
            refs.setdefault(round(r.random_init, 4), []).append(label)
        # runs whose probe reads the same features of the same seed's network share their random init
        styles = itertools.cycle(("--", ":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2))))
        for (value, names), style in zip(refs.items(), styles, strict=False):  # cycle: endless
            ax.axhline(value, color="gray", linestyle=style, linewidth=1,
                       label=f"random init ({', '.join(names) if len(names) <= 3 else f'{len(names)} runs'})")
        ax.set_xlabel("pretraining CPU minutes (probe time excluded)")
        ax.set_title(f"{task}: segmentation probe by recipe")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2)
    axes[0][0].set_ylabel("probe Dice (held-out volumes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _shards(out: Path, scale: Scale, kind: str, unlabeled: Path, cohorts: set[str]) -> dict[str, Path]:
    """Shards of each of ``cohorts``, with the demo's preprocessing at this scale.

    ``"dev"``: the development cohort; ``"mix"``: it pooled with as many unlabeled phantoms of the
    other organ (seed :data:`MIX_SEED`).
    """
    params = PreprocessParams(spacing=(scale.spacing, scale.spacing), size=(scale.size, scale.size))
    shards = {}
    if "dev" in cohorts:
        shards["dev"] = shard_cohort([unlabeled], out / "shards", params)
    if "mix" in cohorts:
        other = "prostate" if kind == "liver" else "liver"
        pooled = _ensure_cohort(out / "data" / f"unlabeled-{other}", other, scale.n_unlabeled, MIX_SEED,
                                scale.sites, labels=False)
        shards["mix"] = shard_cohort([unlabeled, pooled], out / f"shards-mix-{other}", params)
    return shards


def _finetune_cohort(out: Path, scale: Scale, kind: str) -> tuple[Path, Path]:
    """The finetune checks' labeled cohort (seed :data:`FINETUNE_SEED`, the demo's scenario) and its splits."""
    labeled = make_cohorts(out / "finetune", kind, scale, scale.sites, seeds={"labeled": FINETUNE_SEED})["labeled"]
    return labeled, site_splits(labeled, scale)


def run_study(out: Path, names: Sequence[str], *, scale: Scale, minutes: float | None = None,
              steps: int | None = None, kind: str = "liver", seeds: Sequence[int] = (0,),
              command: str = "") -> list[RunResult]:
    """Run (or finish) the study under ``out`` and write ``recipe_study.md`` and ``recipe_study.png``.

    Args:
        out: Directory for everything the study writes.
        names: Keys of :data:`RECIPES`, in table order.
        scale: Cohort size, preprocessing, widths and default batch (the demo's scales).
        minutes: CPU minutes of pretraining per recipe (the steps are measured per recipe, once for
            all its seeds).
        steps: Fixed steps per recipe instead of ``minutes``.
        kind: ``"liver"`` or ``"prostate"`` phantoms.
        seeds: Run seeds of every recipe (``runs/<recipe>`` for seed 0, ``runs/<recipe>-seed<k>`` otherwise).
        command: The command line, recorded in the table's file.

    Returns:
        One result per recipe and seed.

    Raises:
        ValueError: an unknown recipe, neither / both of ``minutes`` and ``steps``, or no seeds.
    """
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ValueError(f"--recipes: unknown {unknown or 'empty list'}; choose from {', '.join(RECIPES)}")
    if (minutes is None) == (steps is None):
        raise ValueError("give one of --minutes and --steps")
    if (minutes is not None and not minutes > 0) or (steps is not None and steps < PROBES_PER_RUN):
        raise ValueError(f"--minutes must be > 0 and --steps >= {PROBES_PER_RUN}; got {minutes}, {steps}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: distinct non-negative integers, got {list(seeds)}")
    t0 = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    unlabeled, probe = _cohort(out, scale, kind)
    cohort_shards = _shards(out, scale, kind, unlabeled, {"dev"} | {RECIPES[n].cohort for n in names})
    results = []
    for name, seed in itertools.product(names, seeds):
        recipe = RECIPES[name]
        shards = cohort_shards[recipe.cohort]
        run_dir = out / "runs" / (name if seed == 0 else f"{name}-seed{seed}")
        if (run_dir / "summary.json").is_file():
            _say(f"reusing finished run {run_dir}")
        else:
            # every seed of a recipe, and a resumed run, keep the steps measured first (checkpoints hold them)
            budget = out / "runs" / f"{name}.steps"
            if budget.is_file():
                n = int(budget.read_text())
            else:
                n = steps if steps is not None else _calibrate(out, name, recipe, scale, shards, minutes or 0.0)
                budget.parent.mkdir(parents=True, exist_ok=True)
                budget.write_text(f"{n}\n")
                if minutes is not None:  # what the steps are worth, for budget_check
                    budget.with_suffix(".minutes").write_text(f"{minutes:g}\n")
            cmd = _pretrain_cmd(name, recipe, scale, shards, run_dir, n, *_probe(probe, _every(n)), seed=seed)
            _run(cmd, out, run_dir.with_name(run_dir.name + ".log"))
        results.append(read_run(name, recipe, run_dir, seed))
    table = table_markdown(results)
    budget_line = f"{minutes:g} CPU minutes" if minutes is not None else f"{steps} steps"
    text = (
        f"# Pretraining recipe study\n\n`{command}`\n\n"
        f"Development cohort: {scale.n_unlabeled} unlabeled {kind} phantoms over {scale.sites} sites (seed "
        f"{UNLABELED_SEED}; the *mix* recipes pool as many of the other organ, seed {MIX_SEED}), "
        f"{PROBE_TRAIN + PROBE_EVAL} labeled at site-1 (seed {LABELED_SEED}); "
        f"{scale.size}x{scale.size} slices at {scale.spacing} mm, UNet widths {list(scale.widths)} unless the "
        f"recipe says otherwise; budget {budget_line} per recipe on {os.cpu_count()} cores (the steps are "
        f"measured once per recipe and kept for its other seeds). Probe: {PROBE_TRAIN} training and "
        f"{PROBE_EVAL} held-out volumes; *random init* is the probe at step 0 of the same run, the gains are "
        f"over it. The probe reads the decoder's output when the task trains the decoder (regression, the "
        f"local loss) and the encoder's hypercolumns otherwise, so their random-init references differ. "
        f"CPU min: pretraining time without the probe's. Overrides of `launch/configs/debug.yaml` "
        f"per recipe: `RECIPES` in `experiments/recipe_study.py`.\n\n{table}\n"
    )
    (out / "recipe_study.md").write_text(text)
    plot_study(results, out / "recipe_study.png")
    print(table, flush=True)
    _say(f"table {out / 'recipe_study.md'}, plot {out / 'recipe_study.png'}; {(time.time() - t0) / 60:.1f} min")
    return results


def finetune_check(out: Path, names: Sequence[str], *, scale: Scale, kind: str = "liver",
                   variant: str = "demo") -> Path:
    """Finetune from the seed-0 exports of ``names`` and from random weights, on development subjects.

    The demo's scenario (labels from site-1, validation and held-out subjects from every site) on a
    labeled cohort of its own (seed :data:`FINETUNE_SEED`), with the demo's sweep for
    :data:`FINETUNE_COUNTS` labeled volumes, and the ``variant``'s overrides
    (:data:`FINETUNE_VARIANTS`): whether a recipe's probe gain survives finetuning, and how to
    hand the encoder over, without touching the demo's test subjects.

    Returns:
        ``finetune-<variant>.md``: mean held-out Dice per init and count, and the paired gain over random init.

    Raises:
        ValueError: an unknown recipe or variant.
        SystemExit: a recipe's seed-0 run has no export yet (run the study first).
    """
    if variant not in FINETUNE_VARIANTS:
        raise ValueError(f"--variant: one of {', '.join(FINETUNE_VARIANTS)}; got {variant!r}")
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ValueError(f"--finetune: unknown {unknown or 'empty list'}; choose from {', '.join(RECIPES)}")
    out = out.resolve()
    exports = {n: out / "runs" / n / "export" / "model.pt" for n in names}
    for name, path in exports.items():
        if not path.is_file():
            raise SystemExit(f"[recipes] {path}: not found; run the study for {name} first")
        if RECIPES[name].widths not in (None, scale.widths):
            raise ValueError(f"--finetune: {name} has widths {list(RECIPES[name].widths or ())}; the check finetunes "
                             f"the scale's {list(scale.widths)} (random init would be another network)")
    labeled, splits = _finetune_cohort(out, scale, kind)
    sweep_dir = sweep_stage(out / "finetune" / variant, labeled, exports, scale, splits,
                            extra=(f"n_labeled={list(FINETUNE_COUNTS)}", *FINETUNE_VARIANTS[variant]))
    return _finetune_table(out, sweep_dir, exports, variant)


def _finetune_table(out: Path, sweep_dir: Path, exports: Mapping[str, Path], variant: str) -> Path:
    """Write ``finetune-<variant>.md`` from the sweep's ``report/results.json``; print its table."""
    from downstream.report import select_rows

    results = json.loads((sweep_dir / "report" / "results.json").read_text())
    # the report's own numbers: per draw the searched option with the best validation Dice, paired bootstrap CIs
    by_ref = {str(path): name for name, path in exports.items()}
    name_of = {r["init_tag"]: by_ref.get(r["init_ref"], r["init_ref"]) for r in results["rows"]}
    dice: dict[tuple[str, int], list[float]] = {}
    for row in select_rows(results["rows"]):
        dice.setdefault((name_of[row["init_tag"]], row["n_labeled"]), []).append(row["test_dice"])
    paired = {(name_of[c["init"]], c["n_labeled"]): c["paired"] for c in results["stats"]["comparisons"]
              if c.get("paired")}
    draws = max((len(v) for v in dice.values()), default=0)
    how = " ".join(FINETUNE_VARIANTS[variant]) or "no overrides"
    lines = [
        f"# Finetune check ({variant})\n",
        f"Development labeled cohort (seed {FINETUNE_SEED}, the demo's scenario); the demo's sweep over "
        f"{list(FINETUNE_COUNTS)} labeled volumes × {draws} draws with `{how}`. Mean Dice on its held-out "
        f"subjects (per draw the searched option with the best validation Dice) and the paired gain over random "
        f"init [95 % CI] (the report's hierarchical bootstrap). Full report: "
        f"`{(sweep_dir / 'report' / 'report.md').relative_to(out)}` (beside this file).\n",
        "| init | " + " | ".join(f"n={n}" for n in FINETUNE_COUNTS) + " | "
        + " | ".join(f"gain n={n}" for n in FINETUNE_COUNTS) + " |",
        "|---|" + "---:|" * (2 * len(FINETUNE_COUNTS)),
    ]
    for init in ["random", *exports]:
        means = [f"{statistics.mean(dice[init, n]):.3f}" if (init, n) in dice else "–" for n in FINETUNE_COUNTS]
        gains = []
        for n in FINETUNE_COUNTS:
            p = paired.get((init, n))
            gains.append(f"{p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p else "")
        lines.append(f"| {init} | " + " | ".join(means) + " | " + " | ".join(gains) + " |")
    path = out / f"finetune-{variant}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]), flush=True)
    _say(f"finetune check: {path}")
    return path


def budget_check(out: Path, name: str, minutes: float, *, scale: Scale, kind: str = "liver", exports: int = 4) -> Path:
    """Does a longer pretraining budget pay after finetuning? The budget sweep on development subjects.

    Pretrains ``name`` for ``minutes`` CPU minutes (``budget/<name>``, the steps scaled from the
    recipe's measured ``runs/<name>.steps``, so the study has to have run it), exporting
    ``exports`` times along the way (``train.export_every``), then runs the finetune check's sweep
    from every export (``init`` = the export glob: the sweep's budget series) and from random
    init. The report names the smallest budget whose paired gain over random init has its 95 %
    interval above zero.

    Returns:
        The sweep's ``report.md``.

    Raises:
        ValueError: an unknown recipe, ``minutes <= 0`` or ``exports < 1``.
        SystemExit: the study has not measured the recipe's steps yet.
    """
    if name not in RECIPES:
        raise ValueError(f"--budget: unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    if not minutes > 0 or exports < 1:
        raise ValueError(f"--budget-minutes must be > 0 and --exports >= 1; got {minutes}, {exports}")
    out = out.resolve()
    measured = out / "runs" / f"{name}.minutes"  # written with runs/<name>.steps by a study with --minutes
    if not measured.is_file():
        raise SystemExit(f"[recipes] {measured}: not found; run the study for {name} with --minutes first")
    recipe = RECIPES[name]
    steps_per_min = int(measured.with_suffix(".steps").read_text()) / float(measured.read_text())
    every = max(1, round(steps_per_min * minutes / exports))
    steps = every * exports  # exports land on multiples of export_every: the last one is the final step
    run_dir = out / "budget" / name
    unlabeled, probe = _cohort(out, scale, kind)
    shards = _shards(out, scale, kind, unlabeled, {recipe.cohort})[recipe.cohort]
    if (run_dir / "summary.json").is_file():
        _say(f"reusing finished run {run_dir}")
    else:
        _say(f"{name}: {steps} steps for {minutes:g} min, an export every {every} steps")
        cmd = _pretrain_cmd(name, recipe, scale, shards, run_dir, steps, f"train.export_every={every}",
                            *_probe(probe, every))
        _run(cmd, out, run_dir.with_name(run_dir.name + ".log"))
    labeled, splits = _finetune_cohort(out, scale, kind)
    sweep_dir = sweep_stage(out / "finetune" / f"budget-{name}", labeled, {name: run_dir / "export" / "step-*"},
                            scale, splits, extra=(f"n_labeled={list(FINETUNE_COUNTS)}",))
    report = sweep_dir / "report" / "report.md"
    answer = next((line for line in report.read_text().splitlines() if line.startswith("Pretraining budget (")), None)
    _say(answer or f"{report}: no budget sentence (see the report)")
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the study. Returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for cohort, shards, runs, table and plot")
    p.add_argument("--minutes", type=float, default=None, help="CPU minutes of pretraining per recipe (default 2)")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per recipe instead of --minutes")
    p.add_argument("--recipes", default=None,
                   help=f"comma-separated (default: all, or none with --finetune), from: {', '.join(RECIPES)}")
    p.add_argument("--scale", choices=("cpu", "tiny"), default="cpu", help="the demo's scale of cohort and model")
    p.add_argument("--kind", choices=("liver", "prostate"), default="liver")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds of every recipe (default 0)")
    p.add_argument("--finetune", default="", metavar="RECIPES",
                   help="after the study: finetune from these recipes' seed-0 exports and random init on a labeled "
                        "development cohort (the demo's sweep, n = 1, 2)")
    p.add_argument("--variant", choices=tuple(FINETUNE_VARIANTS), default="demo",
                   help="how the finetune check hands the encoder over (FINETUNE_VARIANTS)")
    p.add_argument("--budget", default="", metavar="RECIPE",
                   help="after the study: pretrain RECIPE for --budget-minutes with --exports exports and run the "
                        "budget sweep from them on the finetune check's cohort")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="CPU minutes of the --budget run (default 10)")
    p.add_argument("--exports", type=int, default=4, help="exports along the --budget run (default 4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    minutes = 2.0 if args.minutes is None and args.steps is None else args.minutes
    command = shlex.join(["python", "-m", "experiments.recipe_study", *(sys.argv[1:] if argv is None else argv)])
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        print(f"error: --seeds: comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    after = bool(args.finetune or args.budget)  # checks after the study; alone, they run on its finished runs
    recipes = args.recipes if args.recipes is not None else "" if after else ",".join(RECIPES)
    try:
        if recipes or not after:  # an empty --recipes alone is an error (run_study says so)
            run_study(args.out, [n for n in recipes.split(",") if n], scale=SCALES[args.scale], minutes=minutes,
                      steps=args.steps, kind=args.kind, seeds=seeds, command=command)
        if args.finetune:
            finetune_check(args.out, [n for n in args.finetune.split(",") if n], scale=SCALES[args.scale],
                           kind=args.kind, variant=args.variant)
        if args.budget:
            budget_check(args.out, args.budget, args.budget_minutes, scale=SCALES[args.scale], kind=args.kind,
                         exports=args.exports)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
