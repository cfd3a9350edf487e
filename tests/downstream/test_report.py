"""The label-efficiency report from trial rows: selection on validation Dice, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from downstream.report import build_report, select_rows


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
