"""The label-efficiency report from trial rows: selection on validation Dice, mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from downstream.report import build_report, select_rows
from downstream.stats import analyze


def _row(init: str, n: int, seed: int, val: float, test: float, pool: int = 6) -> dict:
    return {"init_tag": init, "n_labeled": n, "seed": seed, "best_val_dice": val, "test_dice": test,
            "test_hd95": 10.0 * (1 - test), "train_ids": [f"s{i}" for i in range(n or pool)],
            "history": [{"step": 10, "val_dice": val / 2}, {"step": 20, "val_dice": val}]}


def test_report_table_plots_and_budget(tmp_path: Path) -> None:
    rows = [
        _row("random", 1, 0, 0.50, 0.40), _row("random", 1, 1, 0.60, 0.60),
        # a second lr sample for (random, 1, seed 0): better on test but worse on validation → not chosen
        _row("random", 1, 0, 0.45, 0.99),
        _row("contrastive", 1, 0, 0.70, 0.70), _row("contrastive", 1, 1, 0.80, 0.80),
        _row("random", 0, 0, 0.90, 0.85), _row("contrastive", 0, 0, 0.91, 0.86),
    ]
    sel = select_rows(rows)
    assert len(sel) == 6 and all(r["test_dice"] != 0.99 for r in sel)
    rep = build_report(rows, tmp_path / "r", budgets={"contrastive": {"steps": 300, "samples_seen": 9600}},
                       errors=["trial random-n2-s0-abc failed: boom"], dataset="toy")
    table = rep["table"].splitlines()
    assert table[0] == "| init | n=1 | n=all (6) |"
    assert f"| random | 0.500 ± {np.std([0.4, 0.6]):.3f} (2) | 0.850 ± 0.000 (1) |" in table
    assert "| contrastive | 0.750 ± 0.050 (2) | 0.860 ± 0.000 (1) |" in table
    md = rep["markdown"].read_text()
    assert "| contrastive | 300 | 9600 | n/a | n/a | n/a |" in md and "boom" in md
    assert rep["plot"].stat().st_size > 1000 and rep["curves"].stat().st_size > 1000
    assert (tmp_path / "r" / "results.json").is_file()


VOLS = [f"v{i}" for i in range(6)]
SITES = {v: {"site": "A" if i < 2 else "B"} for i, v in enumerate(VOLS)}


def _vol_row(init: str, n: int, seed: int, dice: float, *, site_b: float = 0.0, nsd: bool = False) -> dict:
    """A trial whose per-volume Dice is ``dice`` at site A and ``dice + site_b`` at site B."""
    per = {}
    for v in VOLS:
        d = dice + (site_b if SITES[v]["site"] == "B" else 0.0) + 0.01 * (seed - 0.5)
        per[v] = {"dice": [d], "hd95": [2.0]} | ({"nsd": [d - 0.1]} if nsd else {})
    return {"init_tag": init, "n_labeled": n, "seed": seed, "best_val_dice": 0.5, "test_dice": dice,
            "test_hd95": 2.0, "train_ids": [f"p{(seed + i) % 9}" for i in range(n)],
            "history": [{"step": 10, "val_dice": 0.5}], "test_per_volume": per}


def test_report_opens_with_labels_saved_and_breaks_down_by_site(tmp_path: Path) -> None:
    rows = [_vol_row("random", n, s, d, site_b=-0.2, nsd=True) for n, d in ((1, .6), (2, .7), (4, .8)) for s in (0, 1)]
    rows += [_vol_row("contrastive", 1, s, 0.7, site_b=-0.2, nsd=True) for s in (0, 1)]
    rep = build_report(rows, tmp_path / "r", dataset="toy", attributes=SITES, n_boot=500)
    md = rep["markdown"].read_text()
    first = md.split("\n")[2]
    assert first == rep["sentences"]["contrastive"]
    assert first.startswith("contrastive with 1 labeled volume matches random init with 2.0 (95 % CI")
    assert "From 6 test volumes and 2 labeled draws" in md and "same labeled volumes" in md
    assert "| contrastive | +0.100 [+0.100, +0.100], wins 2/2 |" in md
    assert "| init | n | site=A (2) | site=B (4) |" in md
    assert "| contrastive | 1 | 0.700 ± 0.005 | 0.500 ± 0.005 |" in md
    assert "Test NSD" in md
    for name in ("labels_saved.png", "subgroups.png", "label_efficiency.png"):
        assert (tmp_path / "r" / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "r" / "results.json").read_text())["stats"]
    assert saved["comparisons"][0]["labels"]["text"] == "2.0" and saved["subgroups"]["site"]["volumes"]["A"] == VOLS[:2]


def test_report_without_random_init_says_why(tmp_path: Path) -> None:
    rows = [_vol_row("contrastive", n, 0, 0.7) for n in (1, 2)]
    md = build_report(rows, tmp_path / "r", dataset="toy")["markdown"].read_text()
    assert "No paired statistics: the sweep has no init=random" in md and "| contrastive |" in md
    assert "Paired difference" not in md and not (tmp_path / "r" / "labels_saved.png").exists()


def test_report_says_when_a_comparison_cannot_resolve_003(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for init, base in (("random", 0.6), ("contrastive", 0.65)):
        for s in (0, 1):
            r = _vol_row(init, 1, s, base)
            for v in VOLS[3:]:
                del r["test_per_volume"][v]  # 3 test volumes
            for v in r["test_per_volume"].values():
                v["dice"] = [float(base + 0.15 * rng.standard_normal())]
            rows.append(r)
    md = build_report(rows, tmp_path / "r", dataset="toy", n_boot=500)["markdown"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("- contrastive vs random, n=1: CI half-width"))
    assert "cannot be resolved" in line and "test volumes (now 3)" in line


def test_sweep_logs_the_sentences_and_numbers_on_the_parent_run(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    from downstream.sweep import _log_answer
    from ssl_pretrain.tracking import MLflowLogger

    rows = [_vol_row("random", n, s, d) for n, d in ((1, .6), (2, .7), (4, .8)) for s in (0, 1)]
    rows += [_vol_row("contrastive", n, s, d) for n, d in ((1, .7), (4, .9)) for s in (0, 1)]
    stats = analyze(select_rows(rows), n_boot=200)
    rep = {"sentences": stats["sentences"], "stats": stats, "budget": []}
    parent = MLflowLogger("mri-ssl/finetune", run_name="sweep")
    _log_answer(parent, rep)
    parent.end()
    run = MlflowClient().get_run(parent.run_id)
    assert run.data.tags["labels_saved/contrastive"] == rep["sentences"]["contrastive"]
    assert "≥ 4" in rep["sentences"]["contrastive"]
    assert run.data.metrics["labels_matched_contrastive_n1"] == pytest.approx(2.0)
    assert "labels_matched_contrastive_n4" not in run.data.metrics  # beyond the measured range
    assert run.data.metrics["paired_delta_contrastive_n4"] == pytest.approx(0.1)


BUDGETS = {f"contrastive-step{s}": {"steps": s, "samples_seen": 8 * s, "wall_time_s": 0.5 * s, "probe_dice": None}
           for s in (10, 40, 160)}


def _budget_rows(deltas: dict[str, dict[int, float]], noise: float = 0.05) -> list[dict]:
    """Random init at n ∈ {1, 2}, and per budget tag a trial whose per-volume Dice is random init's plus
    ``deltas[tag][n]`` plus noise (so an interval around a zero difference straddles zero)."""
    rng = np.random.default_rng(7)
    rows = [_vol_row("random", n, s, 0.5 + 0.1 * n) for n in (1, 2) for s in (0, 1, 2)]
    for tag, by_n in deltas.items():
        for n, delta in by_n.items():
            for s in (0, 1, 2):
                r = _vol_row(tag, n, s, 0.5 + 0.1 * n + delta)
                for v in r["test_per_volume"].values():
                    v["dice"] = [v["dice"][0] + float(noise * rng.standard_normal())]
                r["test_dice"] = float(np.mean([v["dice"][0] for v in r["test_per_volume"].values()]))
                rows.append(r)
    return rows


def test_budget_sweep_names_the_smallest_budget_with_its_interval_above_zero(tmp_path: Path) -> None:
    # n=1: useless at 80 samples, useful from 320; n=2: useful only at 1280
    deltas = {"contrastive-step10": {1: 0.0, 2: 0.0}, "contrastive-step40": {1: 0.12, 2: 0.0},
              "contrastive-step160": {1: 0.15, 2: 0.12}}
    rep = build_report(_budget_rows(deltas), tmp_path / "r", dataset="toy", budgets=BUDGETS, n_boot=1000,
                       budget_series={"runs/c1/export/step-*": list(BUDGETS)[::-1]})
    [b] = rep["budget"]
    paired = {(c["init"], c["n_labeled"]): c["paired"] for c in rep["stats"]["comparisons"]}
    assert paired[("contrastive-step10", 1)]["ci95"][0] < 0 < paired[("contrastive-step10", 1)]["ci95"][1]
    assert paired[("contrastive-step40", 2)]["ci95"][0] < 0  # the noise makes these intervals straddle zero
    assert b["name"] == "c1" and b["tags"] == list(BUDGETS)  # ordered by samples seen
    assert [(x["n_labeled"], x["useful"] and x["useful"]["samples_seen"]) for x in b["per_n"]] == [(1, 320), (2, 1280)]
    assert b["smallest"]["tag"] == "contrastive-step40" and b["smallest"]["n_labeled"] == 1
    lo, hi = paired[("contrastive-step40", 1)]["ci95"]
    assert b["sentence"] == (
        "Pretraining budget (runs/c1/export/step-*: 3 exports, 80 to 1,280 samples seen): the smallest budget at "
        "which the pretrained init beats random init with its 95 % CI above zero is 320 samples seen (step 40; n=1: "
        f"{paired[('contrastive-step40', 1)]['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]). By n: n=1 from 320; n=2 from 1,280."
    )
    assert rep["budget_sentences"] == [b["sentence"]]
    md = rep["markdown"].read_text()
    assert b["sentence"] in md.split("\n\n")[1]  # with the labels-saved sentences at the top
    assert "## Pretraining budget: runs/c1/export/step-*" in md and "| random | 0 | 0 | n/a |" in md
    row = next(x for x in md.splitlines() if x.startswith("| contrastive-step40 | 320 | 40 | n/a | "))
    cells = row.strip("| ").split(" | ")  # init, samples, steps, probe, n=1, n=2
    assert "(smallest useful)" in cells[4] and "(smallest useful)" not in cells[5]
    assert (tmp_path / "r" / "budget_c1.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "r" / "results.json").read_text())["stats"]["budget"]
    assert saved[0]["smallest"]["samples_seen"] == 320


def test_budget_sweep_says_none_was_found(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    from downstream.sweep import _log_answer
    from ssl_pretrain.tracking import MLflowLogger

    deltas = {t: {1: 0.0, 2: -0.05} for t in BUDGETS}
    rep = build_report(_budget_rows(deltas), tmp_path / "r", dataset="toy", budgets=BUDGETS, n_boot=1000,
                       budget_series={"runs/c1/export/step-*": list(BUDGETS)})
    [b] = rep["budget"]
    assert b["smallest"] is None and all(x["useful"] is None for x in b["per_n"])
    assert b["sentence"].startswith("Pretraining budget (runs/c1/export/step-*: 3 exports, 80 to 1,280 samples seen): "
                                    "none found; at no budget is the paired difference to random init positive")
    assert "(at the largest, 1,280 samples seen: n=1 " in b["sentence"] and "; n=2 -0.0" in b["sentence"]
    assert (tmp_path / "r" / "budget_c1.png").is_file()

    # the answer is a tag of the sweep's parent run (and a metric when a budget was found)
    found = build_report(_budget_rows({t: {1: 0.2} for t in BUDGETS}), tmp_path / "r2", budgets=BUDGETS,
                         n_boot=500, budget_series={"runs/c1/export/step-*": list(BUDGETS)})
    for r in (rep, found):
        parent = MLflowLogger("mri-ssl/finetune", run_name="sweep")
        _log_answer(parent, r)
        parent.end()
        run = MlflowClient().get_run(parent.run_id)
        assert run.data.tags["smallest_useful_budget/c1"] == r["budget"][0]["sentence"]
        got = run.data.metrics.get("smallest_useful_samples_seen_c1")
        assert got == (None if r is rep else 80.0)


def test_budget_sweep_without_random_init_says_why(tmp_path: Path) -> None:
    rows = [r for r in _budget_rows({t: {1: 0.1} for t in BUDGETS}) if r["init_tag"] != "random"]
    [b] = build_report(rows, tmp_path / "r", budgets=BUDGETS, n_boot=200,
                       budget_series={"runs/c1/export/step-*": list(BUDGETS)})["budget"]
    assert "no useful budget can be named without paired differences to random init (the sweep has no init=random" \
        in b["sentence"]
