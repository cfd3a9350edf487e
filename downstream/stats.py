"""Statistics of a label-efficiency sweep: paired bootstrap differences, labels saved, power.

The unit of a sweep's evidence is a matrix of per-volume test Dice, ``(draws, test volumes)``, per
``(init, n_labeled)``. Draws are the labeled training sets drawn by the seeds; the same seed draws the
same volumes for every init (``downstream.data.draw_labeled`` depends on the pool, ``n_labeled`` and
the seed only, and :func:`pair_cells` checks the recorded ``train_ids``), and every trial is tested on
the same fixed test volumes, so a pretrained init and random init are compared *paired*, draw by draw
and volume by volume.

Uncertainty comes from a hierarchical bootstrap: each replicate resamples the draws with
replacement, then the test volumes with replacement. Draws and volumes are crossed (every draw is
tested on every volume), so one volume resample is shared by all draws (and all inits) of a
replicate: a hard test volume stays hard for everyone, as it is in the data. Replicates are counts
(multinomial weights), so a replicate's mean is one ``einsum`` over the matrix and thousands of
replicates cost milliseconds.

Labels saved: random init's mean test Dice against ``log2 n`` is made monotone (isotonic regression
where it is not) and interpolated linearly; a pretrained init's mean Dice at its ``n`` is projected
onto that curve, giving the number of labeled volumes random init needs for the same Dice. Above the
whole curve it is reported as "≥ max n", below it as "≤ min n". Its interval comes from the same
bootstrap replicates (the curve and the point are recomputed in each).

Example:
    >>> rng = np.random.default_rng(0)
    >>> d = 0.05 + 0.02 * rng.standard_normal((5, 20))
    >>> res = paired_difference(d, rng=np.random.default_rng(1))
    >>> bool(res.lo < 0.05 < res.hi)
    True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

log = logging.getLogger(__name__)

__all__ = [
    "RESOLVE",
    "Cell",
    "PairedResult",
    "bootstrap_weights",
    "weighted_mean",
    "paired_difference",
    "monotone",
    "matched_n",
    "fmt_n",
    "volume_scores",
    "make_cells",
    "analyze",
    "smallest_useful_budget",
]

RESOLVE = 0.03
"""Dice difference a comparison should resolve: a 95 % CI half-width above it is reported as too wide."""


@dataclass
class Cell:
    """Per-volume test scores of one ``(init, n_labeled)``: draws × test volumes.

    Args:
        init: Init tag.
        n_labeled: The config value (0 = all).
        n: Labeled volumes actually used (the pool size for ``n_labeled=0``).
        seeds: Seed of each draw (row).
        train_ids: Labeled volumes of each draw.
        scores: ``(draws, volumes)`` test Dice (mean over foreground classes), columns in the order of
            the report's common test volumes.
    """

    init: str
    n_labeled: int
    n: int
    seeds: tuple[int, ...]
    train_ids: tuple[tuple[str, ...], ...]
    scores: np.ndarray


@dataclass
class PairedResult:
    """Paired difference pretrained − random at one ``n_labeled``.

    Args:
        mean: Mean difference over draws and test volumes.
        lo: Lower bound of the bootstrap 95 % interval.
        hi: Upper bound.
        wins: Draws in which the pretrained init's mean Dice is higher.
        draws: Paired draws.
        volumes: Test volumes.
        var_draws: Bootstrap variance of the mean from resampling draws only.
        var_volumes: Bootstrap variance from resampling test volumes only.
    """

    mean: float
    lo: float
    hi: float
    wins: int
    draws: int
    volumes: int
    var_draws: float
    var_volumes: float

    @property
    def half_width(self) -> float:
        """Half the width of the 95 % interval."""
        return (self.hi - self.lo) / 2

    def needed(self, resolve: float = RESOLVE) -> tuple[int | None, int | None]:
        """Test volumes (at the current draws) and draws (at the current volumes) for a half-width of ``resolve``.

        The squared half-width is split between draws and volumes in proportion to the bootstrap
        variance from resampling each alone, and each part scales as ``1 / count``:
        ``h² ≈ h_d²·S/S' + h_v²·V/V'``. ``None`` where the other part alone already exceeds
        ``resolve`` (or there is a single draw, whose spread is unknown).
        """
        total = self.var_draws + self.var_volumes
        if total <= 0:
            return self.volumes, self.draws
        h2, r2 = self.half_width**2, resolve**2
        h2_d, h2_v = h2 * self.var_draws / total, h2 * self.var_volumes / total
        vols = math.ceil(self.volumes * h2_v / (r2 - h2_d)) if r2 > h2_d else None
        draws = math.ceil(self.draws * h2_d / (r2 - h2_v)) if r2 > h2_v and self.draws > 1 else None
        return vols, draws

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the half-width and the sizes needed to resolve :data:`RESOLVE`."""
        vols, draws = self.needed()
        return {
            "mean": self.mean,
            "ci95": [self.lo, self.hi],
            "half_width": self.half_width,
            "wins": self.wins,
            "draws": self.draws,
            "volumes": self.volumes,
            "resolves": self.half_width <= RESOLVE,
            "volumes_needed": vols,
            "draws_needed": draws,
        }


def volume_scores(per_volume: dict[str, dict[str, list[float]]], ids: list[str], metric: str = "dice") -> np.ndarray:
    """Per-volume score (mean over foreground classes) in the order of ``ids``; ``nan`` where missing."""
    out = np.full(len(ids), np.nan)
    for j, sid in enumerate(ids):
        vals = (per_volume.get(sid) or {}).get(metric)
        if vals:
            out[j] = float(np.mean(vals))
    return out


def bootstrap_weights(rng: np.random.Generator, n_boot: int, k: int) -> np.ndarray:
    """Resampling counts ``(n_boot, k)``: each row draws ``k`` of ``k`` items with replacement."""
    return rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)


def weighted_mean(scores: np.ndarray, w_draws: np.ndarray, w_vols: np.ndarray) -> np.ndarray:
    """Mean of ``scores (S, V)`` under each replicate's draw and volume counts: ``(B,)``."""
    total = np.einsum("bs,sv,bv->b", w_draws, scores, w_vols)
    return total / (w_draws.sum(1) * w_vols.sum(1))


def paired_difference(
    diff: np.ndarray,
    *,
    rng: np.random.Generator,
    n_boot: int = 2000,
    w_vols: np.ndarray | None = None,
) -> PairedResult:
    """Mean paired difference with a hierarchical-bootstrap 95 % interval.

    Args:
        diff: ``(draws, volumes)`` per-volume Dice of the pretrained init minus random init's, same
            draw and same volume in each cell.
        rng: Random generator (seeded by the caller: reports are reproducible).
        n_boot: Bootstrap replicates.
        w_vols: Volume counts ``(n_boot, V)`` to share with other statistics (drawn here when ``None``).

    Returns:
        The result (mean, percentile interval, wins, variance by source).
    """
    s, v = diff.shape
    wd = bootstrap_weights(rng, n_boot, s)
    wv = bootstrap_weights(rng, n_boot, v) if w_vols is None else w_vols
    both = weighted_mean(diff, wd, wv)
    ones_d, ones_v = np.ones_like(wd), np.ones_like(wv)
    lo, hi = np.percentile(both, [2.5, 97.5])
    return PairedResult(
        mean=float(diff.mean()),
        lo=float(lo),
        hi=float(hi),
        wins=int((diff.mean(1) > 0).sum()),
        draws=s,
        volumes=v,
        var_draws=float(weighted_mean(diff, wd, ones_v).var()),
        var_volumes=float(weighted_mean(diff, ones_d, wv).var()),
    )


def monotone(curve: np.ndarray) -> np.ndarray:
    """Make each row of ``curve (B, K)`` (or one curve ``(K,)``) non-decreasing: isotonic where it is not."""
    y = np.array(curve, dtype=np.float64, copy=True)
    rows = y.reshape(-1, y.shape[-1])
    bad = np.nonzero((np.diff(rows, axis=1) < 0).any(axis=1))[0]
    for i in bad:  # only non-monotone replicates pay for the regression
        rows[i] = isotonic_regression(rows[i]).x
    return rows.reshape(y.shape)


def matched_n(ns: np.ndarray, curve: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Labeled volumes at which a non-decreasing curve reaches ``target``, interpolating in ``log2 n``.

    Args:
        ns: Increasing labeled-volume counts ``(K,)``.
        curve: Non-decreasing mean Dice at ``ns``: ``(K,)`` or ``(B, K)``.
        target: Dice to reach: scalar or ``(B,)``.

    Returns:
        The smallest ``n`` with ``curve(n) >= target`` (``float``, shape of ``target``); ``inf`` when
        the target is above the whole curve, ``0.0`` when it is below the curve's first point.
    """
    y = np.atleast_2d(np.asarray(curve, dtype=np.float64))
    t = np.broadcast_to(np.asarray(target, dtype=np.float64), (y.shape[0],)).copy()
    x = np.log2(np.asarray(ns, dtype=np.float64))
    reached = y >= t[:, None]
    k = reached.argmax(axis=1)
    rows = np.arange(len(t))
    lo = np.maximum(k - 1, 0)
    y0, y1 = y[rows, lo], y[rows, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(y1 > y0, (t - y0) / (y1 - y0), 1.0)
    out = np.exp2(x[lo] + frac * (x[k] - x[lo]))
    out = np.where(k == 0, ns[0], out)
    out = np.where(t < y[:, 0], 0.0, out)
    out = np.where(~reached.any(axis=1), np.inf, out)
    return out if np.ndim(target) or np.ndim(curve) > 1 else out[0]


def fmt_n(value: float, ns: np.ndarray | list[int]) -> str:
    """``n`` as the report prints it: ``3.4``, ``≥ 4`` above the measured range, ``≤ 1`` below it."""
    lo, hi = float(min(ns)), float(max(ns))
    if not math.isfinite(value) or value > hi + 1e-9:
        return f"≥ {hi:g}"
    if value < lo - 1e-9:
        return f"≤ {lo:g}"
    return f"{value:.1f}"


def make_cells(rows: list[dict[str, Any]], test_ids: list[str], metric: str = "dice") -> dict[tuple[str, int], Cell]:
    """Group selected trial rows (one per ``(init, n_labeled, seed)``) into :class:`Cell` s."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["init_tag"], r["n_labeled"]), []).append(r)
    cells = {}
    for (init, n_lab), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        cells[(init, n_lab)] = Cell(
            init=init,
            n_labeled=n_lab,
            n=max(len(r["train_ids"]) for r in rs),
            seeds=tuple(int(r["seed"]) for r in rs),
            train_ids=tuple(tuple(r["train_ids"]) for r in rs),
            scores=np.stack([volume_scores(r["test_per_volume"], test_ids, metric) for r in rs]),
        )
    return cells


def _ci_text(lo: float, hi: float, ns: np.ndarray) -> str:
    a, b = fmt_n(lo, ns), fmt_n(hi, ns)
    if a == b:
        return f"95 % CI {a}"
    return f"95 % CI {a}–{b}" if a[0].isdigit() and b[0].isdigit() else f"95 % CI {a} to {b}"


def _volumes(n_labeled: int, n: int) -> str:
    if n_labeled == 0:
        return f"all {n} labeled volumes"
    return f"{n} labeled volume{'s' if n != 1 else ''}"


def analyze(
    rows: list[dict[str, Any]],
    *,
    reference: str = "random",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired differences to ``reference``, labels saved and power for the selected trials of a sweep.

    Args:
        rows: One trial per ``(init_tag, n_labeled, seed)`` with ``train_ids`` and ``test_per_volume``.
        reference: Init tag of the baseline.
        n_boot: Bootstrap replicates.
        seed: Seed of the bootstrap.

    Returns:
        ``{"test_ids", "volumes", "cells", "reason"`` (why there are no paired statistics, else
        ``None``), ``"notes"`` (draws left out of the pairing), ``"curve"`` (reference's n, mean,
        monotone mean), ``"comparisons"`` (per pretrained init and ``n_labeled``: mean, paired
        difference, labels matched with interval), ``"sentences"`` (``{init: the labels-saved
        sentence}``)}``.
    """
    out: dict[str, Any] = {"test_ids": [], "volumes": 0, "cells": {}, "reason": None, "notes": [],
                           "curve": None, "comparisons": [], "sentences": {}}
    usable, test_ids = _common_test_volumes(rows, out)
    if not usable:
        return out
    cells = make_cells(usable, test_ids)
    out.update(test_ids=test_ids, volumes=len(test_ids), cells=cells)
    inits = list(dict.fromkeys(c.init for c in cells.values()))
    out["reason"] = (
        f"the sweep has no init={reference}, so there is no baseline to pair with: no paired differences "
        "or labels saved (add 'random' to init)" if reference not in inits
        else None if test_ids else "trials share no test volume"
    )
    if out["reason"]:
        return out
    rng = np.random.default_rng(seed)
    w_vols = bootstrap_weights(rng, n_boot, len(test_ids))
    w_draws: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

    def boot_mean(c: Cell) -> np.ndarray:
        key = (c.n_labeled, c.seeds)  # cells with the same draws share the draw resample: paired
        if key not in w_draws:
            w_draws[key] = bootstrap_weights(rng, n_boot, len(c.seeds))
        return weighted_mean(c.scores, w_draws[key], w_vols)

    ref = sorted((c for c in cells.values() if c.init == reference), key=lambda c: c.n)
    ns = np.array([c.n for c in ref], dtype=np.float64)
    means = np.array([c.scores.mean() for c in ref])
    curve = monotone(means)
    curve_boot = monotone(np.stack([boot_mean(c) for c in ref], axis=1))
    out["curve"] = {"n": ns.tolist(), "n_labeled": [c.n_labeled for c in ref], "mean": means.tolist(),
                    "monotone": curve.tolist()}
    ref_by_n = {c.n_labeled: c for c in ref}
    pieces: dict[str, list[str]] = {}
    for init in inits:
        if init == reference:
            continue
        for c in sorted((c for c in cells.values() if c.init == init), key=lambda c: c.n):
            comp: dict[str, Any] = {"init": init, "n_labeled": c.n_labeled, "n": c.n, "mean": float(c.scores.mean()),
                                    "draws": len(c.seeds), "paired": None}
            r = ref_by_n.get(c.n_labeled)
            if r is None:
                out["notes"].append(f"{init} n={c.n_labeled}: no {reference} trials at this n to pair with")
            else:
                diff = _paired_scores(c, r, reference, out["notes"])
                if diff is not None:
                    comp["paired"] = paired_difference(diff, rng=rng, n_boot=n_boot, w_vols=w_vols).to_dict()
            comp["labels"] = _labels_matched(ns, curve, curve_boot, comp["mean"], boot_mean(c))
            point = comp["labels"]["value"]
            comp["saved"] = point - c.n if math.isfinite(point) and point > 0 else None
            out["comparisons"].append(comp)
            said = any(f" matches {reference_name(reference)} with " in piece for piece in pieces.get(init, []))
            pieces.setdefault(init, []).append(_saving_piece(comp, _volumes(c.n_labeled, c.n), said,
                                                             reference_name(reference)))
    out["sentences"] = {init: f"{init} " + "; ".join(p) + "." for init, p in pieces.items()}
    return out


def reference_name(reference: str) -> str:
    """How sentences name a baseline init tag: ``random init``, ``nnU-Net from scratch``, or the tag."""
    return {"random": "random init", "nnunet": "nnU-Net from scratch"}.get(reference, reference)


def _saving_piece(comp: dict[str, Any], volumes: str, said: bool, ref_name: str = "random init") -> str:
    """One n's part of the labels-saved sentence, never claiming more than its paired difference supports.

    A number of labeled volumes is stated only when the paired difference to random init at that n has
    its 95 % interval above zero (``"with 2 labeled volumes matches random init with 3.4 (…)"``, or
    ``", 3.4 (…)"`` once the sentence has said it); otherwise the interval is quoted and no saving is
    claimed (random init's curve, made monotone, can manufacture a "saving" where the draws show none).
    """
    lab, paired = comp["labels"], comp["paired"]
    lab["claimed"] = paired is not None and paired["ci95"][0] > 0
    if lab["claimed"]:
        return f"with {volumes}{',' if said else f' matches {ref_name} with'} {lab['text']} ({lab['ci_text']})"
    if paired is None:
        return f"with {volumes}, no saving resolved (no paired draws)"
    lo, hi = paired["ci95"]
    where = "below zero" if hi < 0 else "includes zero"
    return (f"with {volumes}, no saving resolved (paired difference {paired['mean']:+.3f}, "
            f"95 % CI [{lo:+.3f}, {hi:+.3f}] {where})")


def _common_test_volumes(rows: list[dict[str, Any]], out: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The trials with per-volume test metrics and the test volumes they all share (notes and reason in ``out``)."""
    usable = [r for r in rows if r.get("test_per_volume")]
    if not usable:
        out["reason"] = "no trial has per-volume test metrics (test_per_volume in result.json)"
        return [], []
    test_ids = sorted(set.intersection(*(set(r["test_per_volume"]) for r in usable)))
    if len(usable) < len(rows):
        out["notes"].append(f"{len(rows) - len(usable)} trial(s) without per-volume test metrics left out")
    if set().union(*(set(r["test_per_volume"]) for r in usable)) != set(test_ids):
        out["notes"].append(f"trials were tested on different volumes: statistics use the {len(test_ids)} common ones")
    return usable, test_ids


def _paired_scores(c: Cell, r: Cell, reference: str, notes: list[str]) -> np.ndarray | None:
    """``c``'s scores minus the reference's, draw by draw (same seed, same training volumes), or None.

    A seed whose two trials trained on different volumes is left out with a note.
    """
    pairs = []
    for i, s in enumerate(c.seeds):
        if s not in r.seeds:
            continue
        j = r.seeds.index(s)
        if c.train_ids[i] != r.train_ids[j]:
            notes.append(
                f"{c.init} n={c.n_labeled} seed {s}: trained on {list(c.train_ids[i])} but {reference} on "
                f"{list(r.train_ids[j])} (different training pools): left out of the pairing"
            )
            continue
        pairs.append((i, j))
    if not pairs:
        return None
    ii, jj = zip(*pairs, strict=True)
    return c.scores[list(ii)] - r.scores[list(jj)]


def _labels_matched(ns: np.ndarray, curve: np.ndarray, curve_boot: np.ndarray, mean: float,
                    boot: np.ndarray) -> dict[str, Any]:
    """Labeled volumes the reference needs to reach ``mean``, with its bootstrap interval and texts."""
    point = float(matched_n(ns, curve, mean))
    matched = matched_n(ns, curve_boot, boot)
    # beyond the curve is +inf (or 0 below it): percentiles over a large finite stand-in
    lo, hi = np.percentile(np.where(np.isinf(matched), 1e12, matched), [2.5, 97.5])
    return {"value": point, "ci95": [float(lo), float(hi)], "text": fmt_n(point, ns),
            "ci_text": _ci_text(float(lo), float(hi), ns)}


def smallest_useful_budget(
    comparisons: list[dict[str, Any]], tags: list[str], budgets: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The smallest pretraining budget whose paired difference to random init is positive with its CI above zero.

    Args:
        comparisons: ``analyze(...)["comparisons"]``.
        tags: Init tags of one pretraining run's intermediate exports.
        budgets: ``{tag: export info}``, each with ``samples_seen`` (and ``steps``).

    Returns:
        ``{"per_n": [{"n_labeled", "useful"}], "smallest"}``: per ``n_labeled`` the smallest budget (in
        samples seen) whose paired difference has mean > 0 and 95 % CI lower bound > 0, as ``{"tag",
        "samples_seen", "steps", "n_labeled", "mean", "ci95"}`` or ``None``; ``smallest`` is the smallest of
        those over all ``n_labeled`` (``None`` when no budget qualifies at any n).

    Example:
        >>> comps = [{"init": "c-step1", "n_labeled": 1, "paired": {"mean": 0.01, "ci95": [-0.02, 0.04]}},
        ...          {"init": "c-step9", "n_labeled": 1, "paired": {"mean": 0.05, "ci95": [0.01, 0.09]}}]
        >>> b = {"c-step1": {"samples_seen": 8, "steps": 1}, "c-step9": {"samples_seen": 72, "steps": 9}}
        >>> smallest_useful_budget(comps, ["c-step1", "c-step9"], b)["smallest"]["samples_seen"]
        72
    """
    order = sorted(tags, key=lambda t: (budgets[t]["samples_seen"], budgets[t].get("steps") or 0))
    by_key = {(c["init"], c["n_labeled"]): c for c in comparisons if c["init"] in tags}
    ns = sorted({n for _, n in by_key}, key=lambda n: (n == 0, n))
    per_n = []
    for n in ns:
        useful = None
        for t in order:
            p = (by_key.get((t, n)) or {}).get("paired")
            if p and p["mean"] > 0 and p["ci95"][0] > 0:
                useful = {"tag": t, "samples_seen": budgets[t]["samples_seen"], "steps": budgets[t].get("steps"),
                          "n_labeled": n, "mean": p["mean"], "ci95": list(p["ci95"])}
                break
        per_n.append({"n_labeled": n, "useful": useful})
    found = [x["useful"] for x in per_n if x["useful"]]
    smallest = min(found, key=lambda u: (u["samples_seen"], u["n_labeled"] == 0, u["n_labeled"])) if found else None
    return {"per_n": per_n, "smallest": smallest}
