"""The recipe study (experiments/recipe_study.py): its table is the runs' own probe numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.recipe_study import RECIPES, main, read_run, table_markdown


def _write_run(run_dir: Path, probes: list[tuple[int, float, float, float]], wall_s: float) -> None:
    """A finished run's files: probe rows ``(step, dice, probe seconds, elapsed seconds after it)``."""
    run_dir.mkdir(parents=True)
    rows, probe_s = [], 0.0
    for step, dice, t, elapsed in probes:
        probe_s += t
        rows.append({"step": step, "probe/dice": dice, "probe/time_s": t, "probe/time_frac": probe_s / elapsed})
        rows.append({"step": step + 1, "loss": 1.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"steps": probes[-1][0], "samples_seen": 32 * probes[-1][0], "wall_time_s": wall_s,
               "probe": {"time_s": probe_s, "time_frac": probe_s / wall_s}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_read_run_takes_probe_time_out_of_the_minutes(tmp_path):
    # probes of 6 s each; 60 s of pretraining between them
    _write_run(tmp_path / "r", [(0, 0.5, 6.0, 6.0), (10, 0.6, 6.0, 72.0), (20, 0.55, 6.0, 138.0)], wall_s=138.0)
    r = read_run("c-base", RECIPES["c-base"], tmp_path / "r")
    assert [c[0] for c in r.curve] == [0, 10, 20]
    assert [round(c[1] * 60, 6) for c in r.curve] == [0.0, 60.0, 120.0]
    assert r.random_init == 0.5 and r.end == 0.55 and r.best == (0.6, 10)
    assert r.wall_min == pytest.approx(2.0) and r.batch == 32 and r.steps == 20


def test_read_run_without_step_0_probe_names_the_file(tmp_path):
    _write_run(tmp_path / "r", [(10, 0.6, 6.0, 72.0), (20, 0.55, 6.0, 138.0)], wall_s=138.0)
    with pytest.raises(SystemExit, match="metrics.jsonl: needs the probe at step 0"):
        read_run("c-base", RECIPES["c-base"], tmp_path / "r")


def test_seeds_of_a_recipe_get_their_mean_and_range(tmp_path):
    runs = []
    for seed, (start, end) in enumerate(((0.5, 0.6), (0.4, 0.7))):
        _write_run(tmp_path / str(seed), [(0, start, 6.0, 6.0), (10, end, 6.0, 72.0)], wall_s=72.0)
        runs.append(read_run("c-base", RECIPES["c-base"], tmp_path / str(seed), seed))
    _write_run(tmp_path / "r", [(0, 0.3, 6.0, 6.0), (10, 0.35, 6.0, 72.0)], wall_s=72.0)
    runs.append(read_run("r-l1", RECIPES["r-l1"], tmp_path / "r"))
    text = table_markdown(runs)
    assert "| c-base | 2 | 0.650 | 0.450 | +0.200 [+0.100, +0.300] | +0.200 [+0.100, +0.300] |" in text
    assert "| r-l1 | 1 | 0.350 | 0.300 | +0.050 [+0.050, +0.050] |" in text
    assert [line.split("|")[3].strip() for line in text.splitlines()[2:5]] == ["0", "1", "0"]  # the seed column
    # one seed per recipe: no second table
    assert "Mean over seeds" not in table_markdown(runs[:1])


def test_unknown_recipe_is_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--recipes", "c-base,c-nope", "--steps", "8"]) == 2
    assert "unknown ['c-nope']" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--recipes", "c-base", "--steps", "8", "--seeds", "0,x"]) == 2
    assert "--seeds: comma-separated integers" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--recipes", "c-base", "--steps", "8", "--seeds", "1,1"]) == 2
    assert "--seeds: distinct non-negative integers" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_study_tiny(tmp_path, capsys):
    out = tmp_path / "study"
    tiny = ["--out", str(out), "--scale", "tiny"]
    assert main([*tiny, "--steps", "8", "--recipes", "c-base"]) == 0
    capsys.readouterr()
    # the second call reuses the finished c-base run and gives r-l1 a budget in minutes (a timing run first)
    names = ["c-base", "r-l1"]
    assert main([*tiny, "--minutes", "0.02", "--recipes", ",".join(names)]) == 0
    printed = capsys.readouterr().out
    assert "reusing finished run" in printed and "r-l1: " in printed and "steps for 0.02 min" in printed
    assert not (out / "calibrate" / "r-l1").exists()  # the timing run is removed
    assert (out / "recipe_study.png").stat().st_size > 0
    text = (out / "recipe_study.md").read_text()
    assert "--minutes 0.02" in text  # the command is recorded with its table
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| [cr]-", line)]
    assert [r[0].strip() for r in rows] == names
    assert text.split("\n| recipe")[1].strip() in printed  # the printed table is the file's
    budgets = {"c-base": 8, "r-l1": int((out / "runs" / "r-l1.steps").read_text())}
    assert budgets["r-l1"] >= 4
    for name, row in zip(names, rows, strict=True):
        n = budgets[name]
        probes = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        probes = [p for p in probes if "probe/dice" in p]
        every = -(-n // 4)  # step 0, every quarter of the run (rounded up), the end
        assert [p["step"] for p in probes] == sorted({*range(0, n + 1, every), n})
        seed, steps, batch, minutes, end, best, random_init, gain = (row[i].strip() for i in range(2, 10))
        assert (seed, steps, batch) == ("0", str(n), "8")
        assert float(minutes) > 0
        assert end == f"{probes[-1]['probe/dice']:.3f}"
        assert random_init == f"{probes[0]['probe/dice']:.3f}"
        top = max(probes[1:], key=lambda p: (p["probe/dice"], -p["step"]))
        assert best == f"{top['probe/dice']:.3f} ({top['step']})"
        assert gain == f"{probes[-1]['probe/dice'] - probes[0]['probe/dice']:+.3f}"

    # the finetune check: the demo's sweep on a labeled development cohort, from c-base's export and random init
    assert main([*tiny, "--finetune", "c-base"]) == 0
    table = (out / "finetune-demo.md").read_text()
    rows = json.loads((out / "finetune" / "demo" / "sweep" / "report" / "results.json").read_text())["rows"]
    assert {r["seed"] for r in rows} == {0} and {r["n_labeled"] for r in rows} == {1, 2}
    held_out = {i for r in rows for i in r["test_ids"]}
    assert all("_s104_" in i for i in held_out)  # the check's own subjects, never the demo's (seed 2)
    dice = {(r["init_tag"], r["n_labeled"]): r["test_dice"] for r in rows}  # one draw, one searched option
    stats = json.loads((out / "finetune" / "demo" / "sweep" / "report" / "results.json").read_text())["stats"]
    ci = {c["n_labeled"]: c["paired"] for c in stats["comparisons"] if c["init"] == "contrastive"}
    gains = [f"{ci[n]['mean']:+.3f} [{ci[n]['ci95'][0]:+.3f}, {ci[n]['ci95'][1]:+.3f}]" for n in (1, 2)]
    assert ci[1]["mean"] == pytest.approx(dice["contrastive", 1] - dice["random", 1])  # paired: same draw
    c = [dice["contrastive", n] for n in (1, 2)]
    assert f"| c-base | {c[0]:.3f} | {c[1]:.3f} | {gains[0]} | {gains[1]} |" in table
    assert f"| random | {dice['random', 1]:.3f} | {dice['random', 2]:.3f} |" in table

    # the budget check: r-l1 (measured in minutes above) for twice its budget, two exports, the budget sweep
    assert main([*tiny, "--budget", "r-l1", "--budget-minutes", "0.04", "--exports", "2"]) == 0
    printed = capsys.readouterr().out
    every = max(1, round(int((out / "runs" / "r-l1.steps").read_text()) * 0.04 / 0.02 / 2))
    assert f"r-l1: {2 * every} steps for 0.04 min, an export every {every} steps" in printed
    assert len(list((out / "budget" / "r-l1" / "export").glob("step-*/model.pt"))) == 2
    assert "[recipes] Pretraining budget (" in printed and "2 exports" in printed


def test_budget_check_needs_a_study_in_minutes(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c-base.steps").write_text("8\n")  # a --steps study: no minutes to scale from
    with pytest.raises(SystemExit, match=r"c-base.minutes: not found; run the study for c-base with --minutes"):
        main(["--out", str(tmp_path), "--budget", "c-base"])
