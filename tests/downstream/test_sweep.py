"""Ray Tune sweeps end to end: pretrained init in the grid, crash + resume, MLflow server, registry, report,
and the pretraining-budget sweep over a run's intermediate exports.

Multi-process (local Ray workers, an ``mlflow server`` subprocess): marked slow, still run in CI.
One Ray session is shared by all tests of the module (see ``ray_session`` in conftest).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from downstream.config import SweepConfig
from downstream.model_refs import resolve_model_file
from downstream.sweep import _fingerprint, _resolve_inits, run_sweep
from ssl_pretrain.config import load_config
from ssl_pretrain.data.phantoms import make_cohort
from ssl_pretrain.data.preprocess import preprocess
from ssl_pretrain.export import save_export
from ssl_pretrain.models.unet import UNetConfig
from ssl_pretrain.tasks.regression import RegressionConfig, RegressionTask
from tests.netcheck import is_loopback, listeners

from .conftest import PARAMS32, make_export, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def launch_sweep():
    """``(launch/sweep.py as a module, repo root)``; afterwards the root log handlers its ``main`` added are
    removed (they write to this test's captured stderr, closed once the test ends)."""
    handlers = list(logging.root.handlers)
    root = Path(__file__).parents[2]
    spec = importlib.util.spec_from_file_location("launch_sweep", root / "launch/sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod, root
    logging.root.handlers[:] = handlers


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite backend and artifact folder."""
    d = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(exe),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{d / 'server.db'}",
        "--artifacts-destination",
        str(d / "artifacts"),
    ]
    log = open(d / "server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _pretrain_against(cohort: Path, out: Path) -> Path:
    """The pipeline's first half: the cohort's images as shards (the sweep's 32×32 preprocessing) and a
    short real contrastive pretraining run, tracked wherever ``MLFLOW_TRACKING_URI`` points."""
    from ssl_pretrain.data.ingest import discover
    from ssl_pretrain.data.shards import write_shards
    from ssl_pretrain.engine.config import PretrainConfig
    from ssl_pretrain.engine.trainer import run_pretraining

    subjects, _ = discover(cohort)
    write_shards(subjects, out / "shards", PARAMS32, samples_per_shard=16, workers=1, progress=False)
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(PretrainConfig, root / "launch" / "configs" / "debug.yaml", [
        f"data.shards={out / 'shards'}", f"out_dir={out / 'run'}", "train.max_steps=4", "train.warmup_steps=1",
        "data.num_workers=0", "probe.root=", "track=true", "run_name=team-pretrain"])
    return run_pretraining(cfg)


def test_pipeline_against_a_team_mlflow_server_pretrain_sweep_crash_resume_registry(
    cohort: Path, tmp_path: Path, ray_session, mlflow_server: str, monkeypatch
) -> None:
    """Issue 25.6: pretraining and the sweep log to an ``mlflow server`` with a SQL backend and its own
    artifact root; the sweep's pretrained init is the pretraining run's URI; everything is read back
    through the server."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    export = _pretrain_against(cohort, tmp_path / "pre")
    client = MlflowClient(mlflow_server)
    [pre_run] = client.search_runs([client.get_experiment_by_name("mri-ssl/pretrain").experiment_id],
                                   "attributes.run_name = 'team-pretrain'")
    assert pre_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(pre_run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert "export/model.pt" in {a.path for a in client.list_artifacts(pre_run.info.run_id, "export")}
    # the artifact comes back through the server (proxied artifact root), byte for byte
    got = resolve_model_file(f"runs:/{pre_run.info.run_id}", tmp_path / "dl2")
    assert got.read_bytes() == export.read_bytes()
    cfg = load_config(
        SweepConfig,
        overrides=[
            *tiny_overrides(cohort, tmp_path / "sweep", size=32),
            "tracking.enabled=true",
            f"init=[random, runs:/{pre_run.info.run_id}]",
            "n_labeled=[1, 2]",
            "seeds=[0]",
            "search.fault_at_step=10",
        ],
    )
    res = run_sweep(cfg)
    assert res["errors"] == [] and len(res["rows"]) == 4
    assert {(r["init_tag"], r["n_labeled"]) for r in res["rows"]} == {
        ("random", 1),
        ("random", 2),
        ("contrastive", 1),
        ("contrastive", 2),
    }

    # the first grid trial crashed after its step-10 checkpoint, was restarted by Ray, resumed and finished
    crashed = next(r for r in res["rows"] if r["init_tag"] == "random" and r["n_labeled"] == 1)
    assert (Path(crashed["out_dir"]) / ".fault_injected").is_file()
    assert crashed["resumed_from_step"] == 10 and crashed["steps"] == 20
    assert all(r["resumed_from_step"] is None for r in res["rows"] if r is not crashed)

    # report: table, plots, pretraining budget of the pretrained init
    md = res["report"]["markdown"].read_text()
    assert "| contrastive |" in md and "| random |" in md and res["table"] in md
    assert "| contrastive | 4 | 32 |" in md  # the pretraining run's own budget: 4 steps of 8 slices
    assert res["report"]["plot"].stat().st_size > 1000 and res["report"]["curves"].stat().st_size > 1000

    # MLflow (through the server): parent run, 4 nested runs, the crashed trial kept one nested run
    parent = client.get_run(res["parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    nested = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")
    assert len(nested) == 4 and all(r.info.status == "FINISHED" for r in nested), [
        (r.info.run_name, r.info.status) for r in nested
    ]
    run = next(r for r in nested if r.info.run_name == crashed["trial_key"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [10, 20]
    assert "test_dice" in run.data.metrics
    assert {a.path for a in client.list_artifacts(res["parent_run_id"], "report")} >= {
        "report/report.md",
        "report/label_efficiency.png",
        "report/val_dice_curves.png",
    }
    assert len(res["models"]) == 4
    name = f"mri-ssl-{res['dataset']}"
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == str(res["version"])

    # the registered champion resolves to its export and segments a volume
    assert resolve_model_file(f"models:/{name}@champion", tmp_path / "dl").is_file()
    src = cohort / "imagesTr" / f"{crashed['test_ids'][0]}.nii.gz"
    from downstream.predict import predict

    [mask] = predict(f"models:/{name}@champion", src, tmp_path / "m.nii.gz")
    assert nib.load(mask).shape == nib.load(src).shape


    # running the same sweep again reuses the finished trials (Tuner.restore), nothing is retrained
    stamps = {r["trial_key"]: (Path(r["out_dir"]) / "result.json").stat().st_mtime_ns for r in res["rows"]}
    again = run_sweep(cfg)
    assert {r["trial_key"]: r["test_dice"] for r in again["rows"]} == {
        r["trial_key"]: r["test_dice"] for r in res["rows"]
    }
    assert {r["trial_key"]: (Path(r["out_dir"]) / "result.json").stat().st_mtime_ns for r in again["rows"]} == stamps
    assert again["parent_run_id"] == res["parent_run_id"]
    # ... and logs no duplicate models or registry versions
    assert again["version"] == res["version"] and again["models"] == res["models"]
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_failing_trial_does_not_end_the_sweep_cli(cohort: Path, tmp_path: Path, ray_session, capsys,
                                                  launch_sweep) -> None:
    mod, root = launch_sweep
    code = mod.main(
        [
            "--config",
            str(root / "launch/configs/sweep_debug.yaml"),
            *tiny_overrides(cohort, tmp_path / "sw", size=32),
            "tracking.enabled=false",
            "n_labeled=[1]",
            "seeds=[0, 1]",
            "search.max_failures=0",
            "search.fault_at_step=10",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("trial ")]
    assert len(errors) == 1 and "random-n1-s0" in errors[0] and "inject_fault_at_step=10" in errors[0]
    report = (tmp_path / "sw" / "report" / "report.md").read_text()
    assert "Failed trials" in report and "| random | " in report
    assert (tmp_path / "sw" / "trials").is_dir() and len(list((tmp_path / "sw" / "trials").glob("*/result.json"))) == 1


# ---------------------------------------------------------------------------------------------
# local Ray listens on loopback only
# ---------------------------------------------------------------------------------------------


def _assert_loopback_only(found: list[tuple[str, str, int]]) -> None:
    # the scan must have found Ray itself, or the check below would pass on nothing
    assert any("gcs_server" in c for c, _, _ in found) and any("raylet" in c for c, _, _ in found)
    assert any("ray::" in c for c, _, _ in found)  # workers
    wide = [(c, a, p) for c, a, p in found if not is_loopback(a)]
    assert not wide, f"Ray listens beyond loopback: {wide}"


_SWEEP_RAY = """
import os, sys
from downstream.config import SearchConfig, SweepConfig
from downstream.sweep import _init_ray
assert _init_ray(SweepConfig(search=SearchConfig(ray_num_cpus=2)))
import ray

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Actor:  # Tune runs trials in actors
    def pid(self):
        return os.getpid()

a = Actor.remote()
print(sorted(set(ray.get([pid.remote() for _ in range(4)]))), ray.get(a.pid.remote()), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def test_the_sweeps_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the sweep must set it up itself
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SWEEP_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, cwd=tmp_path)
        try:
            assert proc.stdout.readline(), (tmp_path / "stderr.txt").read_text()[-3000:]
            _assert_loopback_only(listeners(proc.pid))
        finally:
            proc.stdin.close()
            proc.wait(timeout=120)


def test_the_tests_ray_session_listens_on_loopback_only(ray_session) -> None:
    import ray

    @ray.remote
    def pid() -> int:
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])
    _assert_loopback_only(listeners(os.getpid()))


def test_local_ray_refuses_when_ray_was_imported_without_the_switch(tmp_path: Path) -> None:
    code = "import ray\nfrom downstream.sweep import start_local_ray\nstart_local_ray(1)\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode != 0
    assert "RuntimeError: ray was imported before a loopback-only local instance could be set up" in r.stderr




@pytest.fixture(scope="module")
def step_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) regression pretraining run on an unlabeled phantom cohort of its own, exported at
    steps 4, 12 and 30 as ``train.export_every`` writes them: ``<run>/export/step-NNNNNNN/model.pt``
    with the budget (steps, samples_seen, wall_time_s, probe_dice) in ``info``."""
    base = tmp_path_factory.mktemp("pretrain")
    raw = make_cohort("liver", 2, base / "unlabeled", seed=11, labels=False)
    slices = torch.from_numpy(np.concatenate([preprocess(f, PARAMS32).image for f in sorted(raw.glob("imagesTr/*"))]))
    torch.manual_seed(0)
    task = RegressionTask(UNetConfig(in_channels=1, widths=(8, 16, 32)), RegressionConfig(), seed=0)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    run, batch, t0 = base / "r1", 8, time.time()
    for step in range(1, 31):
        loss, _ = task({"image": slices[torch.randint(len(slices), (batch,), generator=g)]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (4, 12, 30):
            save_export(run / "export" / f"step-{step:07d}" / "model.pt", task="regression",
                        model_config=task.model_cfg, encoder_state=task.encoder.state_dict(),
                        decoder_state=task.decoder.state_dict(),
                        preprocessing=PARAMS32.to_dict(),
                        info={"steps": step, "samples_seen": step * batch, "wall_time_s": time.time() - t0,
                              "probe_dice": None})
    return run


def test_init_glob_expands_to_one_init_per_step_export(step_exports: Path, tmp_path: Path, capsys,
                                                        launch_sweep) -> None:
    run = tmp_path / "r1"
    shutil.copytree(step_exports, run)  # this test adds folders; the end-to-end test keeps three exports
    (run / "export" / "step-0000099").mkdir()  # an export still being written: skipped
    pattern = str(run / "export" / "step-*")
    cfg = load_config(SweepConfig, overrides=[f"data.root={tmp_path}", f"out_dir={tmp_path / 'sw'}",
                                              f"init=[random, {pattern}]"])
    specs = _resolve_inits(cfg, tmp_path / "sw")
    assert [s.tag for s in specs] == ["random", "regression-step4", "regression-step12", "regression-step30"]
    assert [s.info.get("samples_seen") for s in specs] == [None, 32, 96, 240]
    assert {s.series for s in specs[1:]} == {pattern} and specs[0].series == ""
    assert specs[2].ref == specs[2].local == str(run / "export" / "step-0000012" / "model.pt")
    # random init is prepared like the exports, on whole slices (finetuning keeps the field of view)
    assert specs[0].params == {**PARAMS32.to_dict(), "field_of_view": "pad"}

    # pretraining wrote one more export since: the same command is a new grid, not a restore of the old one
    fp = _fingerprint(cfg, specs)
    assert _fingerprint(cfg, _resolve_inits(cfg, tmp_path / "sw")) == fp
    shutil.copytree(run / "export" / "step-0000030", run / "export" / "step-0000040")
    assert _fingerprint(cfg, _resolve_inits(cfg, tmp_path / "sw")) != fp

    # a glob that matches no export: one line naming the pattern
    missing = str(tmp_path / "nothing" / "export" / "step-*")
    cfg = load_config(SweepConfig, overrides=[f"data.root={tmp_path}", f"out_dir={tmp_path / 'sw'}",
                                              f"init=[random, {missing}]"])
    with pytest.raises(ValueError, match=r"^init: .*nothing/export/step-\* matches no export") as e:
        _resolve_inits(cfg, tmp_path / "sw")
    assert "\n" not in str(e.value)
    mod, root = launch_sweep
    code = mod.main(["--config", str(root / "launch/configs/sweep_debug.yaml"), f"data.root={tmp_path}",
                     f"out_dir={tmp_path / 'sw'}", "tracking.enabled=false", f"init=[random, {missing}]"])
    assert code == 2 and capsys.readouterr().err == f"error: {e.value}\n"

    # a matched export without its budget cannot be placed on the budget axis
    make_export(tmp_path / "old" / "export" / "step-0000001" / "model.pt")
    old = make_export(tmp_path / "old" / "export" / "step-0000002" / "model.pt")
    torch.save({**torch.load(old, weights_only=True), "info": {"steps": 2}}, old)
    cfg = load_config(SweepConfig, overrides=[f"data.root={tmp_path}", f"out_dir={tmp_path / 'sw'}",
                                              f"init=[{tmp_path / 'old' / 'export' / 'step-*'}]"])
    with pytest.raises(ValueError, match=r"step-0000002/model.pt: export info has no samples_seen"):
        _resolve_inits(cfg, tmp_path / "sw")


def test_budget_sweep_over_three_exports_cli(cohort: Path, step_exports: Path, tmp_path: Path, ray_session,
                                             capsys, launch_sweep) -> None:
    mod, root = launch_sweep
    pattern = str(step_exports / "export" / "step-*")
    code = mod.main(
        [
            "--config",
            str(root / "launch/configs/sweep_debug.yaml"),
            *tiny_overrides(cohort, tmp_path / "sw", size=32),
            f"init=[random, {pattern}]",
            "n_labeled=[1]",
            "seeds=[0, 1]",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "sw" / "report" / "results.json").read_text())
    [b] = results["stats"]["budget"]
    assert b["pattern"] == pattern and b["name"] == "r1"
    assert b["tags"] == ["regression-step4", "regression-step12", "regression-step30"]
    assert len(results["rows"]) == 8 and results["errors"] == []

    # the named budget is the smallest whose paired difference has its interval above zero, or none
    paired = {c["init"]: c["paired"] for c in results["stats"]["comparisons"]}
    # (tests/downstream/test_report.py constructs both answers; here the real sweep's must follow the rule)
    useful = [t for t in b["tags"] if paired[t]["mean"] > 0 and paired[t]["ci95"][0] > 0]
    assert (b["smallest"] or {}).get("tag") == (useful[0] if useful else None)
    expected = (f"is {b['smallest']['samples_seen']} samples seen (step {b['smallest']['steps']}; n=1:"
                if useful else ": none found; at no budget")
    assert expected in b["sentence"]
    print(b["sentence"])  # the measured answer, for the record (pytest -s)

    # printed after the table: the labels-saved sentences and the budget sentence
    lines = out.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("| "))
    after = lines[table_end + 1 :]
    assert b["sentence"] in after
    assert any(line.startswith("regression-step12 with 1 labeled volume") for line in after)  # number if resolved

    md = (tmp_path / "sw" / "report" / "report.md").read_text()
    assert b["sentence"] in md and "![pretraining budget](budget_r1.png)" in md
    assert "| random | 0 | 0 | n/a |" in md and "| regression-step30 | 240 | 30 | n/a |" in md
    assert (tmp_path / "sw" / "report" / "budget_r1.png").stat().st_size > 1000


def test_3d_sweep_two_inits_two_n_two_seeds_writes_the_report(cohort: Path, tmp_path: Path, ray_session,
                                                                capsys, launch_sweep) -> None:
    """Issue 23: launch/sweep.py with sweep_debug3d.yaml and a 3D export: 2 inits × 2 n × 2 seeds of 3D
    finetuning; the report has its labels-saved sentences and names each init's dimensionality."""
    from tests.downstream.test_finetune3d import _pretrained_3d_export

    mod, root = launch_sweep
    exp = _pretrained_3d_export(tmp_path / "mim" / "export" / "model.pt")
    code = mod.main(["--config", str(root / "launch/configs/sweep_debug3d.yaml"), f"data.root={cohort}",
                     f"out_dir={tmp_path / 'sw'}", f"data.cache_dir={cohort.parent / 'cache3d'}", "data.n_val=1",
                     "data.n_test=2", f"init=[random, {exp}]", "n_labeled=[1, 2]", "seeds=[0, 1]",
                     "train.max_steps=10", "train.eval_every=5", "train.aug={p_elastic: 0.0}",
                     "tracking.enabled=false"])
    assert code == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "sw" / "report" / "results.json").read_text())
    assert len(results["rows"]) == 8 and results["errors"] == []
    assert {r["spatial_dims"] for r in results["rows"]} == {3}
    assert {r["init_tag"] for r in results["rows"]} == {"random", "mim"}
    md = (tmp_path / "sw" / "report" / "report.md").read_text()
    assert "Dimensionality of each init's network: random 3D, mim 3D" in md or \
        "Dimensionality of each init's network: mim 3D, random 3D" in md
    [sentence] = results["stats"]["sentences"].values()
    assert sentence.startswith("mim with ") and sentence in out and sentence in md


def test_sweep_on_a_two_node_ray_cluster_survives_losing_the_worker_node(cohort: Path, tmp_path: Path, ray_session,
                                                                        launch_sweep) -> None:
    """Issue 25.3: launch/sweep.py against a two-node Ray cluster on 127.0.0.1 (RAY_ADDRESS). Trials run on both
    nodes; the worker node is killed while one of its trials runs; Tune reruns that trial on the head from its last
    checkpoint, the sweep finishes every trial, and its results equal an undisturbed sweep's. Every listener of both
    nodes is on loopback."""
    grid = ["init=[random]", "n_labeled=[1, 2]", "seeds=[0, 1]", "train.max_steps=20", "train.eval_every=5",
            "search.cpus_per_trial=1"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    out = tmp_path / "cluster"
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_cluster.py"))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            address, head, worker = cluster.stdout.readline().split()
            sweep = subprocess.Popen(
                [sys.executable, str(Path(__file__).parents[2] / "launch" / "sweep.py"), "--config", "sweep_debug",
                 *tiny_overrides(cohort, out, size=32), *grid], env={**env, "RAY_ADDRESS": address},
                stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 240
            while time.time() < deadline and sweep.poll() is None:  # a trial on the worker with a checkpoint
                on_worker = [d for d in (out / "trials").glob("*") if (d / "ray_nodes.txt").is_file()
                             and worker in (d / "ray_nodes.txt").read_text() and (d / "checkpoint").is_dir()]
                if on_worker:
                    break
                time.sleep(0.05)
            assert on_worker and sweep.poll() is None, (tmp_path / "cluster.log").read_text()[-3000:]
            found = listeners(cluster.pid)  # both raylets, the GCS, the workers of both nodes
            assert sum("raylet" in c for c, _, _ in found) >= 2, found
            _assert_loopback_only(found)
            cluster.stdin.write("kill\n")
            cluster.stdin.flush()
            assert cluster.stdout.readline().strip() == "killed"
            assert sweep.wait(timeout=300) == 0, (tmp_path / "cluster.log").read_text()[-3000:]
        finally:
            cluster.stdin.close()
            cluster.wait(timeout=120)
    nodes = {d.name: (d / "ray_nodes.txt").read_text().split() for d in (out / "trials").glob("*")}
    assert {n for ran in nodes.values() for n in ran} == {head, worker}  # both nodes ran trials
    moved = nodes[on_worker[0].name]
    assert moved[0] == worker and moved[-1] == head, nodes  # the killed node's trial finished on the head
    assert list((out / "ray").rglob("checkpoint_*")) and list((out / "ray").rglob("result.json"))  # shared storage
    disturbed = json.loads((out / "report" / "results.json").read_text())
    assert len(disturbed["rows"]) == 4 and disturbed["errors"] == []

    mod, root = launch_sweep  # the same grid on the tests' local Ray, undisturbed
    assert mod.main(["--config", "sweep_debug", *tiny_overrides(cohort, tmp_path / "plain", size=32), *grid]) == 0
    plain = json.loads((tmp_path / "plain" / "report" / "results.json").read_text())

    def dice(res: dict) -> dict:
        return {(r["n_labeled"], r["seed"]): (r["best_val_dice"], r["test_dice"]) for r in res["rows"]}

    assert dice(disturbed) == dice(plain) and disturbed["stats"]["sentences"] == plain["stats"]["sentences"]
