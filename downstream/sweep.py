"""Label-efficiency sweeps with Ray Tune: init × n_labeled × seed grid plus an lr / weight-decay search.

Every trial runs :func:`downstream.finetune.finetune` — the function behind ``launch/finetune.py``
— in a Ray worker, reports validation Dice with a checkpoint after every evaluation and its test
metrics at the end. Fault tolerance: ``FailureConfig(max_failures)`` restarts a crashed trial from
its last checkpoint; a trial that keeps failing is reported in one line and does not end the
sweep; an interrupted sweep is continued with ``Tuner.restore`` by running the same command with
the same ``out_dir`` again (finished trials are reused, not re-run).

Ray: a local instance bound to 127.0.0.1 without a dashboard (:func:`start_local_ray`) unless
``RAY_ADDRESS`` names an existing cluster, or the caller already initialised Ray.

Tracking: one MLflow parent run per sweep (experiment ``tracking.experiment``), a nested run per
trial (params, per-evaluation metrics, test Dice/HD95, a contour PNG), the best model per
``(init, n_labeled)`` (selected on validation Dice) logged with ``mlflow.pytorch.log_model``
(pickle-free ``pt2`` weights with signature and input example, the export ``model.pt`` as an extra
file), the overall best registered as ``mri-ssl-<dataset>`` with the alias ``champion``, and the
label-efficiency report (table + plots) as artifacts of the parent run.

Pretraining budget: an ``init`` with a glob over a pretraining run's intermediate exports
(``runs/c1/export/step-*``) is one init per export (tag ``<task>-step<N>``), ordered by samples seen;
the report plots test Dice against samples seen and names the smallest useful budget.

Fair comparison: when pretrained inits are in the grid, ``init=random`` is prepared with the first
pretrained init's preprocessing (a warning says so when ``data.preprocess`` differs), and a warning
names any export whose widths differ from ``model.widths``.

Testing hook: ``search.fault_at_step=N`` makes the first grid point's trial(s) raise once, right
after the checkpoint at step ``N`` (see ``train.inject_fault_at_step``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from downstream.config import FinetuneConfig, SweepConfig
from downstream.data import draw_labeled, prepare_configured, subject_attributes
from downstream.inference import inference_roi, load_init
from downstream.report import build_report
from ssl_pretrain import termination
from ssl_pretrain.config import flatten, from_dict, save_config, to_dict
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.export import choose_preprocessing
from ssl_pretrain.fileio import append_text, atomic_write_text
from ssl_pretrain.tracking import MLflowLogger, NullLogger, RunLogger, start_logger

log = logging.getLogger(__name__)

__all__ = ["run_sweep", "InitSpec", "start_local_ray"]


@dataclass
class InitSpec:
    """One init of the grid: what the user wrote, the local file, a short tag for tables."""

    ref: str
    local: str
    tag: str
    task: str
    info: dict[str, Any]
    params: dict[str, Any]
    series: str = ""
    """The glob this init was expanded from (a pretraining-budget sweep), else ``""``."""
    engine: str = "mri-ssl"
    """Who trains its trials: ``mri-ssl`` finetuning, or ``nnunet`` (nnU-Net v2: :mod:`downstream.nnunet_arm`)."""


def _absolute_tracking_uri() -> str:
    """The tracking URI with a relative SQLite / file path made absolute (workers run elsewhere)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            rest = uri[len(prefix) :]
            if rest and not rest.startswith("/"):
                return prefix + str(Path(rest).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _expand_init(ref: str) -> list[str]:
    """``[ref]``, or for a glob over a pretraining run's intermediate exports (``runs/c1/export/step-*``)
    every matching export file: a matched folder stands for its ``model.pt``.

    Raises:
        ValueError: The glob matches no export.
    """
    if ref == "random" or ":/" in ref or not glob.has_magic(ref):
        return [ref]
    files = []
    for match in sorted(glob.glob(ref)):
        p = Path(match)
        f = p / "model.pt" if p.is_dir() else p
        if f.is_file():
            files.append(str(f))
        else:  # e.g. a step folder whose export is still being written
            log.info("init %s: %s holds no model.pt, skipped", ref, match)
    if not files:
        raise ValueError(
            f"init: {ref} matches no export (expected folders like <pretraining out_dir>/export/step-0000100 "
            "holding model.pt, written by train.export_every)"
        )
    return files


def _budget_series(ref: str, exports: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The exports a glob matched, in order of pretraining samples seen (every one must record it)."""
    for local, export in exports:
        if not isinstance(export["info"].get("samples_seen"), (int, float)):
            raise ValueError(
                f"init: {local}: export info has no samples_seen, which the budget sweep {ref} needs "
                "(train.export_every records steps and samples_seen in each export)"
            )
    return sorted(exports, key=lambda e: (e[1]["info"]["samples_seen"], e[1]["info"].get("steps") or 0))


def _resolve_inits(cfg: SweepConfig, out: Path) -> list[InitSpec]:
    specs: list[InitSpec] = []
    pretrained: list[tuple[str, dict[str, Any]]] = []
    for i, ref in enumerate(cfg.init):
        if ref == "nnunet":  # nnU-Net from scratch: the data's dimensionality decides 2d or 3d_fullres
            specs.append(InitSpec(ref, "random", "nnunet", "nnunet", {}, {}, engine="nnunet"))
            continue
        inside = ref.startswith("nnunet:")
        expanded = _expand_init(ref.removeprefix("nnunet:"))
        if expanded == ["random"]:
            specs.append(InitSpec(ref, "random", "random", "random", {}, {}))
            continue
        loaded = [load_init(r, out / "inits" / str(i), trust=cfg.trust_checkpoint)[::-1] for r in expanded]
        series = ref if expanded != [ref.removeprefix("nnunet:")] else ""
        if inside and (series or loaded[0][1]["model_config"].spatial_dims != 3):
            raise ValueError(f"init: {ref}: nnU-Net finetunes one 3D export (mri-ssl's 2D model is its own UNet, "
                             "which nnU-Net cannot build)")
        if series:
            loaded = _budget_series(ref, loaded)
        for local, export in loaded:
            source = local if series else ref
            pretrained.append((source, export))
            info = dict(export["info"])
            # one init per budget: "contrastive-step100", named by the pretraining step it was exported at
            step = info.get("steps") if series else None
            tag = export["task"] if step is None else f"{export['task']}-step{step}"
            params = choose_preprocessing(cfg.data.preprocess, [(source, export)]).to_dict()  # what its trials use
            specs.append(InitSpec(source, str(Path(local).resolve()), f"nnunet-{tag}" if inside else tag,
                                  export["task"], info, params, series, "nnunet" if inside else "mri-ssl"))
            mcfg = export["model_config"]
            own, rand = ((mcfg.network_class_name, mcfg.arch), (cfg.model.network_class_name, cfg.model.arch)) \
                if mcfg.spatial_dims == 3 else (list(mcfg.widths), list(cfg.model.widths))
            if own != rand and "random" in cfg.init:
                log.warning("init %s has the network %s but init=random uses %s (model.*): the comparison mixes "
                            "architectures", source, own, rand)
    # init=random sees exactly the data the first pretrained init was prepared for (the one rule)
    random_params = choose_preprocessing(cfg.data.preprocess, pretrained).to_dict()
    for s in specs:
        if s.local == "random":  # random init and nnU-Net from scratch
            s.params = random_params
    seen: dict[str, int] = {}
    for s in specs:  # unique tags for tables and folders: "contrastive", "contrastive-2", …
        seen[s.tag] = seen.get(s.tag, 0) + 1
        if seen[s.tag] > 1:
            s.tag = f"{s.tag}-{seen[s.tag]}"
    return specs


def _cache_dir(cfg: SweepConfig) -> Path:
    """Preprocessed-volume cache shared by the sweep's trials: ``data.cache_dir`` or ``<out_dir>/cache``."""
    return Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache").resolve()


def _check_data(cfg: SweepConfig, specs: list[InitSpec]) -> str:
    """Preprocess the dataset once per distinct preprocessing (warms the cache) and check n_labeled."""
    name = ""
    seen: set[str] = set()
    for s in specs:
        key = json.dumps(s.params, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            params = PreprocessParams.from_dict(s.params)
        except ValueError as e:
            raise ValueError(f"data.{e}") from None
        data = prepare_configured(cfg.data, params, cache_dir=_cache_dir(cfg), out_dir=cfg.out_dir)
        for n in cfg.n_labeled:
            draw_labeled(data.splits.train_pool, n, 0)  # raises one line when n is too large
        name = data.dataset.name
    return cfg.tracking.dataset_name or name


def _fingerprint(cfg: SweepConfig, specs: list[InitSpec]) -> str:
    d = to_dict(cfg)
    d.pop("out_dir")
    d.pop("trust_checkpoint")  # how an init may be read, not what the sweep is
    if not any(s.engine == "nnunet" for s in specs):
        d.pop("nnunet")  # sweeps without an nnunet arm keep the fingerprint of earlier releases
    expanded = [s.local for s in specs if s.series]
    if expanded:  # a budget sweep re-run after pretraining wrote more exports is a new grid (old trials are reused)
        d["init_expanded"] = expanded
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def trial_key(tag: str, n_labeled: int, seed: int, lr: float, wd: float, transfer: str = "encoder+decoder") -> str:
    """Folder name of one trial under ``<out_dir>/trials`` (the default transfer keeps earlier names)."""
    searched = f"{lr:.8g}-{wd:.8g}" + ("" if transfer == "encoder+decoder" else f"-{transfer}")
    h = hashlib.sha256(searched.encode()).hexdigest()[:6]
    return f"{tag}-n{n_labeled}-s{seed}-{h}"


def _trial_config(config: dict[str, Any]) -> tuple[FinetuneConfig, str]:
    base = json.loads(config["base"])
    spec = config["init"]
    base.update(
        init=spec["local"] if spec["local"] != "random" else "random",
        n_labeled=config["n_labeled"],
        seed=config["seed"],
    )
    base["train"].update(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    if spec["local"] == "random":
        base["data"]["preprocess"] = spec["preprocess"]
    base["transfer"] = config["transfer"]
    key = trial_key(spec["tag"], config["n_labeled"], config["seed"], config["lr"], config["weight_decay"],
                    config["transfer"])
    base["out_dir"] = str(Path(config["out_root"]) / "trials" / key)
    if (
        config["fault_at_step"] is not None
        and spec["index"] == 0
        and config["n_labeled"] == config["first_n"]
        and config["seed"] == config["first_seed"]
    ):
        base["train"]["inject_fault_at_step"] = config["fault_at_step"]
    return from_dict(FinetuneConfig, base), key


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: a finetuning run with checkpoints, nested MLflow run and final report."""
    import ray
    from ray import tune

    from downstream.finetune import finetune

    logging.basicConfig(level=logging.INFO)
    cfg, key = _trial_config(config)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    append_text(out / "ray_nodes.txt", f"{ray.get_runtime_context().get_node_id()}\n")  # where each attempt ran
    fp = hashlib.sha256(json.dumps({k: v for k, v in to_dict(cfg).items() if k != "trust_checkpoint"},
                                   sort_keys=True).encode()).hexdigest()[:16]
    done = out / "trial_done.json"
    if done.is_file():  # finished in an earlier sweep run with the same config: reuse it
        saved = json.loads(done.read_text())
        if saved.get("fingerprint") == fp:
            tune.report(saved["metrics"])
            return
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        resume = ckpt.to_directory(str(out / "restored"))
        log.info("trial %s resumes from checkpoint %s", key, resume)
    run_id_file = out / "mlflow_run_id"
    logger: RunLogger = NullLogger()
    if config["tracking_uri"]:
        # a retried trial continues its own nested run (the id is kept in its folder)
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
        logger = MLflowLogger(
            config["experiment"],
            run_name=key,
            parent_run_id=config["parent_run_id"],
            run_id=run_id,
            tracking_uri=config["tracking_uri"],
            tags=None if run_id else {"trial": key, "init_tag": config["init"]["tag"]},
        )
        atomic_write_text(run_id_file, str(logger.run_id))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        metrics = {**metrics, "trial_key": key}
        if checkpoint_dir is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    try:
        if config["init"].get("engine") == "nnunet":  # nnU-Net itself; its own checkpoints, none for Tune
            from downstream.nnunet_arm import nnunet_trial

            result = nnunet_trial(cfg, config["nnunet"], logger=logger)
            report({k: v for k, v in result.items() if k.startswith("test_") and isinstance(v, float)}
                   | {"best_val_dice": result["best_val_dice"]}, None)
        else:
            result = finetune(cfg, on_eval=report, resume=resume, logger=logger)
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end("FINISHED")
    final = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update(final=True, trial_key=key)  # "done" is reserved by Ray Tune (it stops the trial)
    atomic_write_text(done, json.dumps({"fingerprint": fp, "metrics": final}, default=float))


# Ray's switch for a single-machine instance: with it, the node IP is 127.0.0.1 and every Ray
# server (GCS, raylet's node and object managers, workers, runtime-env and dashboard agents)
# binds to loopback. Without it, Linux Ray turns even _node_ip_address="127.0.0.1" back into the
# host's address and listens on all interfaces. Ray reads it once, when ray is imported.
_RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int) -> None:
    """Start a local Ray instance that listens on 127.0.0.1 only, without a dashboard.

    Sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for this process and its children before Ray is
    imported, so this process cannot join a multi-node cluster later (``RAY_ADDRESS`` sweeps
    connect through :func:`_init_ray` without calling this).

    Args:
        num_cpus: CPUs the instance offers to trials.

    Raises:
        RuntimeError: Ray was imported earlier without the switch, or still chose another address.
    """
    os.environ[_RAY_SINGLE_NODE_ENV] = "0"
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            f"ray was imported before a loopback-only local instance could be set up; set "
            f"{_RAY_SINGLE_NODE_ENV}=0 in the environment, or start Ray yourself (ray.init / RAY_ADDRESS)"
        )
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    if ray.util.get_node_ip_address() != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"local Ray chose node IP {ray.util.get_node_ip_address()}, not 127.0.0.1; stopped it")


def _init_ray(cfg: SweepConfig) -> bool:
    """Connect to RAY_ADDRESS or start a loopback-only local instance; return whether this call started Ray."""
    imported = sys.modules.get("ray")  # not imported here: start_local_ray must see Ray's import
    if imported is not None and imported.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        start_local_ray(cfg.search.ray_num_cpus or os.cpu_count() or 1)
    termination.reinstall()  # ray.init replaced the SIGTERM handler with one that dumps a stack and exits 1
    return True


def _space(cfg: SweepConfig, specs: list[InitSpec], extra: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    def dist(v: tuple[float, ...]) -> Any:
        return float(v[0]) if len(v) == 1 or v[0] == v[1] else tune.loguniform(float(v[0]), float(v[1]))

    base = to_dict(FinetuneConfig(data=cfg.data, model=cfg.model, train=cfg.train, tracking=cfg.tracking,
                                  trust_checkpoint=cfg.trust_checkpoint))
    base["data"]["root"] = str(Path(cfg.data.root).resolve())
    if cfg.data.splits:  # trials run in other working directories
        base["data"]["splits"] = str(Path(cfg.data.splits).resolve())
    base["data"]["cache_dir"] = str(_cache_dir(cfg))  # every trial reads the volumes prepared once here
    base["train"]["num_threads"] = max(1, int(cfg.search.cpus_per_trial))
    base["train"]["device"] = "auto" if cfg.search.gpus_per_trial > 0 else "cpu"
    init_items = [{"index": i, "tag": s.tag, "local": s.local, "preprocess": s.params, "engine": s.engine}
                  for i, s in enumerate(specs)]
    return {
        "init": tune.grid_search(init_items),
        "n_labeled": tune.grid_search(list(cfg.n_labeled)),
        "seed": tune.grid_search(list(cfg.seeds)),
        "lr": dist(cfg.search.lr),
        "weight_decay": dist(cfg.search.weight_decay),
        # several transfer options: a grid axis, selected on validation Dice like lr (random init ignores it)
        "transfer": tune.grid_search(list(cfg.search.transfer)) if len(cfg.search.transfer) > 1
        else cfg.search.transfer[0],
        "base": json.dumps(base),
        "first_n": cfg.n_labeled[0],
        "first_seed": cfg.seeds[0],
        "fault_at_step": cfg.search.fault_at_step,
        "nnunet": to_dict(cfg.nnunet),
        **extra,
    }


def _run_tuner(cfg: SweepConfig, specs: list[InitSpec], out: Path, exp_name: str, extra: dict[str, Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(_trainable, {"cpu": cfg.search.cpus_per_trial, "gpu": cfg.search.gpus_per_trial})
    storage = out / "ray"
    path = storage / exp_name
    space = _space(cfg, specs, extra)
    if tune.Tuner.can_restore(str(path)):
        log.info("restoring the interrupted sweep at %s", path)
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_unfinished=True, resume_errored=True, param_space=space
        )
        return tuner.fit()
    max_reports = cfg.train.max_steps // cfg.train.eval_every + 2
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_reports,
            grace_period=min(cfg.search.grace_period, max_reports),
            reduction_factor=2,
        )
        if cfg.search.scheduler == "asha"
        else FIFOScheduler()
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="best_val_dice",
            mode="max",
            scheduler=scheduler,
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=cfg.search.max_concurrent or None,
            search_alg=BasicVariantGenerator(random_state=cfg.seed),
            reuse_actors=True,  # a fresh worker per trial re-imports torch, MONAI and MLflow (seconds each)
        ),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=str(storage),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit()


def _collect(grid: Any, specs: list[InitSpec], out: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Rows of finished trials (their result.json), one line per failed and per scheduler-stopped trial."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    stopped: list[str] = []
    by_index = {i: s for i, s in enumerate(specs)}
    for res in grid:
        cfg = res.config or {}
        if "init" not in cfg:
            continue
        spec = by_index[cfg["init"]["index"]]
        key = trial_key(spec.tag, cfg["n_labeled"], cfg["seed"], cfg["lr"], cfg["weight_decay"],
                        cfg.get("transfer", "encoder+decoder"))
        rfile = out / "trials" / key / "result.json"
        if res.error is not None:
            msg = str(res.error).strip().splitlines()
            line = next((m for m in reversed(msg) if m.strip()), type(res.error).__name__)
            errors.append(f"trial {key} failed: {line.strip()[:300]}")
            continue
        if not rfile.is_file():
            stopped.append(f"trial {key} stopped early by the scheduler (no test metrics)")
            continue
        row = json.loads(rfile.read_text())
        row.update(init_tag=spec.tag, init_ref=spec.ref, trial_key=key)
        rows.append(row)
    return rows, errors, stopped


def _log_answer(parent: RunLogger, rep: dict[str, Any]) -> None:
    """The report's answer on the parent run: one ``labels_saved/<init>`` tag (its sentence) per init, and
    metrics ``labels_matched_<init>_n<N>`` (random init's labeled volumes for the same Dice; left out when
    beyond the measured range) and ``paired_delta_<init>_n<N>`` (mean paired test-Dice difference); per
    budget sweep a ``smallest_useful_budget/<run>`` tag and ``smallest_useful_samples_seen_<run>`` (when found)."""
    parent.set_tags({f"labels_saved/{init}": sentence for init, sentence in rep["sentences"].items()})
    metrics: dict[str, float] = {}
    for b in rep["budget"]:  # a pretraining-budget sweep's answer, named by its pretraining run folder
        name = b["name"]
        parent.set_tags({f"smallest_useful_budget/{name}": b["sentence"]})
        if b["smallest"] is not None:
            metrics[f"smallest_useful_samples_seen_{name}"] = float(b["smallest"]["samples_seen"])
    for c in rep["stats"]["comparisons"]:
        key = f"{c['init']}_n{c['n_labeled']}"
        if c["labels"]["text"][0].isdigit():
            metrics[f"labels_matched_{key}"] = float(c["labels"]["value"])
        if c["paired"]:
            metrics[f"paired_delta_{key}"] = float(c["paired"]["mean"])
    if metrics:
        parent.log_metrics(metrics)


def _log_best_models(rows: list[dict[str, Any]], parent: RunLogger, dataset: str, cfg: SweepConfig) -> dict[str, Any]:
    """Log the best model (validation Dice) per (init, n_labeled); register the overall best. nnU-Net's models
    (the nnunet arms) stay nnU-Net's training folders under their trials."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from downstream.inference import load_segmentation_model

    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in (r for r in rows if r.get("engine") != "nnunet"):
        k = (r["init_tag"], r["n_labeled"])
        if k not in best or r["best_val_dice"] > best[k]["best_val_dice"]:
            best[k] = r
    logged: dict[str, Any] = {"models": {}}
    if not best or parent.run_id is None:
        return logged
    overall = max(best.values(), key=lambda r: (r["best_val_dice"], r["n_labeled"]))
    with mlflow.start_run(run_id=parent.run_id):
        for (tag, n), r in sorted(best.items()):
            model, export = load_segmentation_model(r["model_path"])
            x = np.random.default_rng(0).standard_normal((2, model.cfg.in_channels, *inference_roi(export)))
            x = x.astype(np.float32)
            with torch.no_grad():
                y = model(torch.from_numpy(x)).numpy()
            info = mlflow.pytorch.log_model(
                model,
                name=f"best-{tag}-n{n}",
                serialization_format="pt2",
                signature=infer_signature(x, y),
                input_example=x,
                extra_files=[r["model_path"]],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            )
            logged["models"][f"{tag}/n{n}"] = info.model_uri
            if r is overall:
                logged["champion_uri"] = info.model_uri
    if cfg.tracking.register and "champion_uri" in logged:
        logged.update(_register(logged["champion_uri"], overall, f"mri-ssl-{dataset}", cfg, parent.run_id))
    return logged


def _register(uri: str, r: dict[str, Any], name: str, cfg: SweepConfig, sweep_run_id: str) -> dict[str, Any]:
    """Register the sweep's best model as a new version with its facts; move the alias only when it earns it.

    The alias (``@champion``) moves when the new version's validation Dice beats the current
    champion's on the same validation subjects, or with ``tracking.promote`` (``--promote``); a
    smoke-test sweep never replaces the production model by accident.
    """
    import mlflow

    client = mlflow.MlflowClient()
    tags = {"init": r["init"], "init_tag": r["init_tag"], "n_labeled": str(r["n_labeled"]), "seed": str(r["seed"]),
            "val_dice": f"{r['best_val_dice']:.6f}", "test_dice": f"{r.get('test_dice', float('nan')):.6f}",
            "val_ids": ",".join(r["val_ids"]), "sweep_run_id": sweep_run_id, "trial": r["trial_key"]}
    mv = mlflow.register_model(uri, name, tags=tags)
    client.update_model_version(name, mv.version, description=(
        f"Best of sweep run {sweep_run_id} on validation Dice: init {r['init_tag']}, {r['n_labeled']} labeled "
        f"volume(s), seed {r['seed']}; val Dice {r['best_val_dice']:.3f}, test Dice {float(tags['test_dice']):.3f}"))
    promote, why = _earns_alias(client, name, cfg, tags)
    if promote:
        client.set_registered_model_alias(name, cfg.tracking.alias, mv.version)
    log.info("registered %s version %s (trial %s, val Dice %.3f); @%s %s: %s", name, mv.version, r["trial_key"],
             r["best_val_dice"], cfg.tracking.alias, "moved" if promote else "kept", why)
    return {"registered": f"models:/{name}/{mv.version}", "version": mv.version, "champion": r["trial_key"],
            "promoted": promote, "promotion": why}


def _earns_alias(client: Any, name: str, cfg: SweepConfig, tags: dict[str, str]) -> tuple[bool, str]:
    """Whether the new version takes the alias, and why (one phrase)."""
    from mlflow.exceptions import MlflowException

    if cfg.tracking.promote:
        return True, "promoted (--promote)"
    try:
        current = client.get_model_version_by_alias(name, cfg.tracking.alias)
    except MlflowException:
        return True, "the first model with this alias"
    if current.tags.get("val_ids") != tags["val_ids"]:
        return False, (f"version {current.version} holds it and was validated on other subjects; compare on the "
                       "same validation subjects or use --promote")
    old, new = float(current.tags.get("val_dice", "nan")), float(tags["val_dice"])
    if new > old:
        return True, f"val Dice {new:.3f} beats version {current.version}'s {old:.3f} on the same subjects"
    return False, f"val Dice {new:.3f} does not beat version {current.version}'s {old:.3f} on the same subjects"


def _log_best_models_once(
    rows: list[dict[str, Any]], parent: RunLogger, dataset: str, cfg: SweepConfig, out: Path
) -> dict[str, Any]:
    """:func:`_log_best_models`, skipped when a re-run finds the same finished trials already logged.

    ``<out_dir>/models.json`` records which trials the logged models and the registered version
    came from, so re-running a finished sweep adds no duplicate models or registry versions.
    """
    record = out / "models.json"
    trials = sorted(r["trial_key"] for r in rows)
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("trials") == trials and previous.get("parent_run_id") == parent.run_id:
            log.info("best models of these trials are already logged (%s); registered: %s", record,
                     previous["logged"].get("registered", "nothing"))
            return previous["logged"]
    logged = _log_best_models(rows, parent, dataset, cfg)
    atomic_write_text(record, json.dumps({"trials": trials, "parent_run_id": parent.run_id, "logged": logged}))
    return logged


def _parent_run(cfg: SweepConfig, out: Path, fp: str, dataset: str, tracking_uri: str) -> RunLogger:
    """The sweep's parent MLflow run: the one ``sweep_state.json`` records for this fingerprint, or a new one."""
    state_file = out / "sweep_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    exp_name = f"sweep-{fp}"
    parent = start_logger(
        cfg.tracking.enabled,
        cfg.tracking.experiment,
        run_name=exp_name,
        run_id=state.get(fp),
        tracking_uri=tracking_uri or None,
        tags=None if state.get(fp) else {"sweep": exp_name, "dataset": dataset},
    )
    if parent.run_id and fp not in state:
        state[fp] = parent.run_id
        atomic_write_text(state_file, json.dumps(state))
        parent.log_params(flatten(cfg))
        parent.log_artifact(out / "config.yaml")
    return parent


def _report(cfg: SweepConfig, specs: list[InitSpec], out: Path, dataset: str, rows: list[dict[str, Any]],
            errors: list[str], stopped: list[str]) -> dict[str, Any]:
    """The label-efficiency report of the finished trials (budgets and budget series from the inits)."""
    budgets = {s.tag: s.info for s in specs if s.local != "random"}  # pretrained inits (not nnU-Net from scratch)
    series: dict[str, list[str]] = {}
    for s in specs:
        if s.series:
            series.setdefault(s.series, []).append(s.tag)
    return build_report(rows, out / "report", budgets=budgets, errors=errors, stopped=stopped, dataset=dataset,
                        attributes=subject_attributes(cfg.data.root), budget_series=series)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or continue) a sweep and write the label-efficiency report.

    Args:
        cfg: The sweep config.

    Returns:
        ``{"rows": finished trials, "errors": one line per failed trial, "report": paths and
        ``table`` (Markdown), "parent_run_id", "models", "registered", "out_dir"}``.

    Raises:
        ValueError: Bad dataset, init or ``n_labeled`` (checked before any trial starts).
    """
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    specs = _resolve_inits(cfg, out)
    dataset = _check_data(cfg, specs)
    fp = _fingerprint(cfg, specs)
    exp_name = f"sweep-{fp}"
    tracking_uri = _absolute_tracking_uri() if cfg.tracking.enabled else ""
    parent = _parent_run(cfg, out, fp, dataset, tracking_uri)
    started = _init_ray(cfg)
    try:
        extra = {
            "out_root": str(out),
            "tracking_uri": tracking_uri,
            "parent_run_id": parent.run_id,
            "experiment": cfg.tracking.experiment,
        }
        t0 = time.time()
        grid = _run_tuner(cfg, specs, out, exp_name, extra)
        rows, errors, stopped = _collect(grid, specs, out)
        log.info(
            "sweep %s: %d finished, %d failed trials in %.1f s", exp_name, len(rows), len(errors), time.time() - t0
        )
        t0 = time.time()
        for e in errors:
            log.warning("%s", e)
        rep = _report(cfg, specs, out, dataset, rows, errors, stopped)
        for p in rep["files"]:
            parent.log_artifact(p, "report")
        parent.log_artifact(out / "splits.json")
        _log_answer(parent, rep)
        models = _log_best_models_once(rows, parent, dataset, cfg, out) if cfg.tracking.enabled else {"models": {}}
        log.info("report and model logging took %.1f s", time.time() - t0)
        parent.end("FINISHED")
    except BaseException:
        parent.end("FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return {
        "rows": rows,
        "errors": errors,
        "stopped": stopped,
        "report": rep,
        "table": rep["table"],
        "sentences": rep["sentences"],
        "budget_sentences": rep["budget_sentences"],
        "parent_run_id": parent.run_id,
        "out_dir": str(out),
        "dataset": dataset,
        **models,
    }
