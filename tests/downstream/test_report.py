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
    rep = {"sentences": stats["sentences"], "stats": stats}
    parent = MLflowLogger("mri-ssl/finetune", run_name="sweep")
    _log_answer(parent, rep)
    parent.end()
    run = MlflowClient().get_run(parent.run_id)
    assert run.data.tags["labels_saved/contrastive"] == rep["sentences"]["contrastive"]
    assert "≥ 4" in rep["sentences"]["contrastive"]
    assert run.data.metrics["labels_matched_contrastive_n1"] == pytest.approx(2.0)
    assert "labels_matched_contrastive_n4" not in run.data.metrics  # beyond the measured range
    assert run.data.metrics["paired_delta_contrastive_n4"] == pytest.approx(0.1)
