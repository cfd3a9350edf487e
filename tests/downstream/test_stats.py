"""Sweep statistics with constructed results whose answer is known: labels saved, bootstrap coverage, power."""

from __future__ import annotations

import math

import numpy as np
import pytest

from downstream.stats import analyze, fmt_n, matched_n, monotone, paired_difference

VOLS = [f"v{i}" for i in range(4)]


def _row(init: str, n: int, seed: int, dice: float | list[float], train: list[str] | None = None) -> dict:
    per = dice if isinstance(dice, list) else [dice] * len(VOLS)
    return {"init_tag": init, "n_labeled": n, "seed": seed,
            "train_ids": train or [f"p{(seed + i) % 9}" for i in range(n)],
            "test_per_volume": {v: {"dice": [d], "hd95": [1.0]} for v, d in zip(VOLS, per, strict=True)}}


def _random_curve(seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    return [_row("random", n, s, d) for n, d in ((1, 0.60), (2, 0.70), (4, 0.80)) for s in seeds]


def test_labels_saved_matches_the_constructed_curve() -> None:
    res = analyze(_random_curve() + [_row("contrastive", 1, s, 0.70) for s in (0, 1)])
    (comp,) = res["comparisons"]
    assert comp["labels"]["value"] == pytest.approx(2.0, abs=1e-12) and comp["labels"]["text"] == "2.0"
    assert comp["saved"] == pytest.approx(1.0)
    sentence = res["sentences"]["contrastive"]
    assert sentence.startswith("contrastive with 1 labeled volume matches random init with 2.0 (")
    assert comp["paired"]["mean"] == pytest.approx(0.10) and comp["paired"]["wins"] == 2


def test_above_the_whole_curve_is_at_least_max_n() -> None:
    res = analyze(_random_curve() + [_row("contrastive", 1, s, 0.90) for s in (0, 1)])
    assert res["comparisons"][0]["labels"]["text"] == "≥ 4"
    expected = "contrastive with 1 labeled volume matches random init with ≥ 4 (95 % CI ≥ 4)."
    assert res["sentences"]["contrastive"] == expected
    below = analyze(_random_curve() + [_row("contrastive", 1, s, 0.50) for s in (0, 1)])
    assert below["comparisons"][0]["labels"]["text"] == "≤ 1"


def test_matched_n_interpolates_in_log_n_on_a_monotone_curve() -> None:
    ns = np.array([1.0, 2.0, 4.0])
    assert matched_n(ns, np.array([0.6, 0.7, 0.8]), 0.75) == pytest.approx(2 ** 1.5)
    assert matched_n(ns, np.array([0.6, 0.7, 0.8]), 0.6) == 1.0
    assert np.isinf(matched_n(ns, np.array([0.6, 0.7, 0.8]), 0.81))
    fixed = monotone(np.array([0.6, 0.75, 0.70, 0.8]))  # a dip is pooled, not interpolated through
    assert np.allclose(fixed, [0.6, 0.725, 0.725, 0.8])
    batch = matched_n(ns, np.array([[0.6, 0.7, 0.8], [0.5, 0.6, 0.7]]), np.array([0.7, 0.7]))
    assert np.allclose(batch, [2.0, 4.0])
    assert fmt_n(np.inf, ns) == "≥ 4" and fmt_n(0.0, ns) == "≤ 1" and fmt_n(3.44, ns) == "3.4"


def test_non_monotone_random_curve_is_made_monotone() -> None:
    rows = [_row("random", n, s, d) for n, d in ((1, 0.60), (2, 0.80), (4, 0.70)) for s in (0, 1)]
    res = analyze(rows + [_row("contrastive", 1, s, 0.75) for s in (0, 1)])
    assert np.allclose(res["curve"]["monotone"], [0.60, 0.75, 0.75])
    assert res["comparisons"][0]["labels"]["value"] == pytest.approx(2.0)  # first n reaching 0.75


def test_bootstrap_interval_covers_the_true_difference() -> None:
    """200 simulated sweeps (5 draws × 20 test volumes, noisy per-volume Dice): a 95 % interval's coverage.

    A nominal 95 % interval covers the truth in Binomial(200, 0.95) of 200 sweeps: fewer than its 0.1 %
    quantile (179) means the interval is too narrow, more than its 99.9 % quantile (198) too wide.
    """
    rng = np.random.default_rng(2026)
    true_delta, s, v = 0.04, 5, 20
    covered = 0
    for _ in range(200):
        volume = 0.75 + 0.08 * rng.standard_normal((1, v))  # hard and easy test volumes, shared by both inits
        draw = 0.03 * rng.standard_normal((s, 1))  # some labeled draws are luckier, for both inits
        rand = volume + draw + 0.04 * rng.standard_normal((s, v))
        pre = volume + draw + true_delta + 0.02 * rng.standard_normal((s, 1)) + 0.015 * rng.standard_normal((1, v)) \
            + 0.04 * rng.standard_normal((s, v))
        res = paired_difference(pre - rand, rng=rng, n_boot=1000)
        covered += res.lo <= true_delta <= res.hi
    from scipy.stats import binom

    lo, hi = binom.ppf([0.001, 0.999], 200, 0.95)
    assert (lo, hi) == (179, 198)
    assert lo <= covered <= hi, covered


def test_power_says_what_sample_would_resolve_003() -> None:
    rng = np.random.default_rng(0)
    noisy = paired_difference(0.05 + 0.15 * rng.standard_normal((2, 3)), rng=rng)
    assert noisy.half_width > 0.03
    vols, draws = noisy.needed()
    assert vols is not None and vols > 3  # more volumes resolve it ...
    # a known answer: every draw gives the same differences, so only the volumes vary: the half-width
    # shrinks as 1/sqrt(volumes) and more draws cannot help (None)
    per_volume = 0.05 + 0.10 * rng.standard_normal((1, 12))
    volumes_only = paired_difference(np.repeat(per_volume, 4, axis=0), rng=rng)
    assert volumes_only.var_draws == pytest.approx(0.0, abs=1e-12) and volumes_only.half_width > 0.03
    assert volumes_only.needed() == (math.ceil(12 * (volumes_only.half_width / 0.03) ** 2), None)
    tight = paired_difference(0.05 + 0.01 * rng.standard_normal((5, 40)), rng=rng)
    assert tight.half_width < 0.03 and tight.to_dict()["resolves"]


def test_pairing_is_checked_and_no_random_gives_a_reason() -> None:
    rows = _random_curve() + [_row("contrastive", 1, 0, 0.7), _row("contrastive", 1, 1, 0.7, train=["other"])]
    res = analyze(rows)
    assert res["comparisons"][0]["paired"]["draws"] == 1
    assert any("seed 1" in n and "left out of the pairing" in n for n in res["notes"])
    alone = analyze([_row("contrastive", 1, s, 0.7) for s in (0, 1)])
    assert not alone["comparisons"] and "no init=random" in alone["reason"]


def test_a_dipping_random_curve_never_manufactures_a_saving() -> None:
    """Random init dips at n=2; at n=1 the init equals random init draw for draw (paired difference ~0).

    The isotonic curve pools random init's n=1 and n=2 into one level, so the init's n=1 mean sits at
    that level and "matches random init with ≥ 2" would be read off the curve: the sentence must
    quote the paired interval instead, while a real gain at n=4 keeps its number.
    """
    rng = np.random.default_rng(0)
    noise = {s: list(rng.normal(0, 0.01, len(VOLS))) for s in (0, 1, 2)}
    rows = []
    for s in (0, 1, 2):
        rows += [_row("random", 1, s, [0.70 + e for e in noise[s]]), _row("random", 2, s, [0.60 + e for e in noise[s]]),
                 _row("random", 4, s, [0.75 + e for e in noise[s]])]
        rows += [_row("contrastive", 1, s, [0.70 + e + 0.001 * (s - 1) for e in noise[s]]),
                 _row("contrastive", 4, s, [0.85 + e for e in noise[s]])]
    res = analyze(rows)
    n1, n4 = res["comparisons"]
    lo, hi = n1["paired"]["ci95"]
    assert lo <= 0 <= hi  # the draws show no difference at n=1 ...
    assert n1["labels"]["value"] > 1.0  # ... while the smoothed curve alone would claim a saving
    sentence = res["sentences"]["contrastive"]
    assert sentence.startswith("contrastive with 1 labeled volume, no saving resolved (paired difference ")
    assert "includes zero);" in sentence and not n1["labels"]["claimed"]
    # the real gain at n=4 keeps its number, with the phrase the unresolved n=1 did not say
    assert n4["paired"]["ci95"][0] > 0 and "; with 4 labeled volumes matches random init with ≥ 4 (" in sentence
