"""The label-efficiency experiment end to end, sized for the machine it runs on.

Stages (each is skipped, with a message, when its output is already complete, so an interrupted
run picks up where it stopped):

1. ``data/unlabeled`` and ``data/labeled``: two synthetic cohorts with separate subjects,
   ``data/splits.json`` (the split every stage uses) and ``data/probe.txt`` (the labeled training
   pool, which the pretraining runs' segmentation probe reads: never a validation or test
   subject). The scenario is the common one: unlabeled scans pooled from every site (scanners and
   protocols, :data:`ssl_pretrain.data.phantoms.SITES`), labels from one site (``site-1``, a T2w
   site, fixed before anything was run: labeled liver and prostate data in the field are T2w),
   validation and test subjects from every site. ``sites=1`` is the single-protocol cohort of
   earlier versions, split as the sweep's seeded split would split it.
2. ``shards``: the unlabeled cohort as WebDataset shards (``dims=2.5``: each slice with its
   neighbours as channels; ``dims=3``: whole volumes).
3. ``pretrain/<pretext>`` (:data:`PRETEXTS`: contrastive and regression in 2D / 2.5D, mim and
   contrastive3d in 3D): ``launch/pretrain.py`` (DeepSpeed; one
   CPU process, or every GPU through the ``deepspeed`` launcher), resumed from the last
   checkpoint when interrupted; a segmentation probe on the labeled training pool
   (``probe.png``, with its random-init reference) shows while it runs how useful the encoder is.
4. ``sweep``: ``launch/sweep.py``, a Ray Tune grid over init × number of labeled volumes × seed,
   ending in the label-efficiency report and the registered best model.

Every stage is the command a user would type; the demo prints each before running it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mri_ssl import CONFIG_DIR
from ssl_pretrain.data.ingest import discover, read_exclusions
from ssl_pretrain.data.phantoms import SITES, make_cohort
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.data.shards import write_shards
from ssl_pretrain.engine.plots import read_metrics

log = logging.getLogger(__name__)

CONFIGS = CONFIG_DIR

__all__ = ["DEMO_SEEDS", "PRETEXTS", "Scale", "SCALES", "VOLUMES", "Volumes", "make_cohorts", "pick_scale",
           "preprocessing", "run_experiment", "shard_cohort", "site_splits", "sweep_stage"]


@dataclass(frozen=True)
class Scale:
    """How big each stage is."""

    name: str
    n_unlabeled: int  # subjects in the pretraining cohort (round-robin over the sites)
    n_labeled: int  # sites=1: subjects in the labeled cohort (val + test + training pool, split by the sweep)
    sites: int  # default number of sites (scanners / protocols)
    n_train_pool: int  # sites > 1: labeled training pool, all at site-1
    val_per_site: int  # sites > 1: validation subjects of every site
    test_per_site: int  # sites > 1: test subjects of every site
    size: int  # slice height = width after preprocessing
    spacing: float  # in-plane spacing (mm) after preprocessing
    widths: tuple[int, ...]  # UNet channels per level
    pretrain_steps: int
    pretrain_batch: int
    ckpt_every: int  # pretraining steps between checkpoints (an interrupted run resumes from the last)
    probe_every: int  # pretraining steps between segmentation probes (one more at step 0: the random-init reference)
    pretrain_config: str  # file in launch/configs for pretraining (task set by override)
    sweep_config: str  # file in launch/configs for the sweep
    labeled_counts: tuple[int, ...]
    seeds: tuple[int, ...]
    finetune_steps: int
    eval_every: int


SCALES: dict[str, Scale] = {
    # A CI-sized smoke run: every stage, seconds each.
    "tiny": Scale("tiny", n_unlabeled=4, n_labeled=7, sites=2, n_train_pool=2, val_per_site=1,
                  test_per_site=1, size=32, spacing=12.0, widths=(4, 8, 16),
                  pretrain_steps=60, pretrain_batch=8, ckpt_every=10, probe_every=30, pretrain_config="debug.yaml",
                  sweep_config="sweep_debug.yaml", labeled_counts=(1, 2), seeds=(0,),
                  finetune_steps=6, eval_every=3),
    # A 2-core CPU: 64×64 slices, a narrow UNet, a few minutes of pretraining per pretext.
    "cpu": Scale("cpu", n_unlabeled=32, n_labeled=12, sites=4, n_train_pool=6, val_per_site=1,
                 test_per_site=4, size=64, spacing=6.0, widths=(16, 32, 64, 128),
                 pretrain_steps=800, pretrain_batch=32, ckpt_every=100, probe_every=200, pretrain_config="debug.yaml",
                 sweep_config="sweep_debug.yaml", labeled_counts=(1, 2, 4), seeds=(0, 1),
                 finetune_steps=150, eval_every=25),
    # GPUs: the cluster-sized configs on a larger synthetic cohort.
    "gpu": Scale("gpu", n_unlabeled=200, n_labeled=30, sites=6, n_train_pool=16, val_per_site=2,
                 test_per_site=10, size=256, spacing=1.5,
                 widths=(32, 64, 128, 256, 512), pretrain_steps=5000, pretrain_batch=64, ckpt_every=500,
                 probe_every=500,
                 pretrain_config="{task}.yaml", sweep_config="sweep.yaml", labeled_counts=(1, 2, 4, 8),
                 seeds=(0, 1, 2), finetune_steps=2000, eval_every=100),
}


@dataclass(frozen=True)
class Volumes:
    """The 3D sizes of a scale (``--dims 3``): whole volumes at an isotropic spacing, patches of them."""

    spacing: float  # isotropic mm of the preprocessed volumes
    pretrain_config: str  # file in launch/configs ("{task}" is filled in)
    sweep_config: str
    pretrain_patch: tuple[int, int, int]
    pretrain_steps: int
    pretrain_batch: int
    finetune_patch: tuple[int, int, int]
    finetune_batch: int
    finetune_steps: int


VOLUMES: dict[str, Volumes] = {
    "tiny": Volumes(12.0, "debug3d.yaml", "sweep_debug3d.yaml", (16, 16, 16), 20, 2, (16, 16, 16), 2, 6),
    # the CPU scale's cohorts at 8 mm: (D, H, W) ≈ (20, 40, 50) voxels a volume after cropping to the body
    "cpu": Volumes(8.0, "debug3d.yaml", "sweep_debug3d.yaml", (16, 32, 32), 400, 8, (16, 32, 32), 4, 150),
    # GPUs: the cluster configs (nnssl's MAE recipe, ResEnc-L), 1.5 mm volumes (not run here: no GPU)
    "gpu": Volumes(1.5, "{config3d}", "sweep3d.yaml", (96, 160, 160), 5000, 8, (96, 160, 160), 2, 2000),
}
PRETEXTS = {2: ("contrastive", "regression"), 2.5: ("contrastive", "regression"), 3: ("mim", "contrastive3d")}
"""The pretexts each dimensionality compares with random init."""
_CONFIG3D = {"mim": "mae3d.yaml", "contrastive3d": "contrastive3d.yaml"}
CONTEXT_SLICES = 1  # --dims 2.5: a slice and one neighbour on each side


def pick_scale(requested: Literal["auto", "tiny", "cpu", "gpu"] = "auto") -> Scale:
    """Return the requested scale, or ``gpu`` when CUDA is available and ``cpu`` otherwise."""
    if requested == "auto":
        requested = "gpu" if torch.cuda.is_available() else "cpu"
    if requested not in SCALES:
        raise ValueError(f"--scale: must be one of auto, {', '.join(SCALES)}; got {requested!r}")
    return SCALES[requested]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_stage(cmd: list[str], cwd: Path, log_file: Path | None = None) -> int:
    """Run one stage's command in ``cwd`` (its output to ``log_file`` when given) and return its exit code.

    The stage runs in a process group of its own, so everything it starts (data-loader workers, ranks) stops
    together: the demo's Ctrl-C or SIGTERM is passed on to the group, which gets up to 60 s to stop
    (pretraining writes its checkpoint), and whatever of it is left is then killed. Killing the stage alone
    (what ``subprocess.run`` does on Ctrl-C) left orphaned data-loader workers that kept the terminal's
    output open.
    """
    with open(log_file, "w") if log_file else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, lambda *_: _signal_group(proc.pid, signal.SIGTERM)) if main else None
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _signal_group(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _signal_group(proc.pid, signal.SIGKILL)  # what is left of the stage's group
    return code


def _run(cmd: list[str], cwd: Path) -> None:
    """Run one stage's command in ``cwd``, printing it first; a failure stops the demo."""
    _say(f"$ (cd {cwd} && {shlex.join(cmd)})")
    code = run_stage(cmd, cwd)
    if code != 0:
        raise SystemExit(f"[demo] stage failed (exit {code}): {shlex.join(cmd)}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _check_scenario(out: Path, kind: str, scale: Scale, sites: int, dims: float = 2) -> None:
    """Record what ``out`` holds; refuse to mix another kind, scale, number of sites or dimensionality into it."""
    path = out / "scenario.json"
    want: dict[str, object] = {"kind": kind, "scale": scale.name, "sites": sites}
    if dims != 2:  # 2D runs written before --dims existed stay valid
        want["dims"] = dims
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise SystemExit(f"[demo] {out} holds a run with {have}, not {want}: pass another --out")
    else:
        path.write_text(json.dumps(want) + "\n")


def _labeled_sites(scale: Scale, sites: int) -> list[int]:
    """Site of each labeled subject: site-1 holds the training pool, every site its val and test subjects."""
    per_site = scale.val_per_site + scale.test_per_site
    return [0] * (scale.n_train_pool + per_site) + [k for k in range(1, sites) for _ in range(per_site)]


DEMO_SEEDS = {"unlabeled": 1, "labeled": 2}  # cohort seeds of the demo; studies keep theirs apart


def make_cohorts(out: Path, kind: str, scale: Scale, sites: int,
                 seeds: Mapping[str, int] = DEMO_SEEDS) -> dict[str, Path]:
    """The scenario's cohorts under ``out/data``: ``"unlabeled"`` and / or ``"labeled"``, the keys of ``seeds``.

    Returns:
        Each cohort's folder by name.
    """
    labeled_sites = _labeled_sites(scale, sites)
    paths = {}
    for name, seed in seeds.items():
        labels = name == "labeled"
        n = scale.n_unlabeled if not labels else scale.n_labeled if sites == 1 else len(labeled_sites)
        path = out / "data" / name
        # make_cohort writes dataset.json last: its presence means the cohort is complete.
        if (path / "dataset.json").is_file():
            _say(f"reusing {name} cohort at {path}")
        else:
            _say(f"generating {n} synthetic {kind} subjects ({name}, {sites} site{'s' * (sites > 1)}, seed {seed}) "
                 f"in {path}")
            site_of = labeled_sites if labels and sites > 1 else None
            make_cohort(kind, n, path, seed=seed, labels=labels, sites=sites, site_of=site_of)  # type: ignore[arg-type]
        paths[name] = path
    return paths


def site_splits(labeled: Path, scale: Scale) -> Path:
    """Write ``splits.json`` beside the labeled cohort: per site, its first test and val subjects; the rest train.

    Only site-1 has subjects left for the training pool (:func:`_labeled_sites`).
    """
    with open(labeled / "subjects.csv", newline="") as f:
        by_site: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            by_site.setdefault(row["site"], []).append(row["subject"])
    splits: dict[str, list[str]] = {"train_pool": [], "val": [], "test": []}
    for site in sorted(by_site):
        ids = sorted(by_site[site])
        splits["test"] += ids[:scale.test_per_site]
        splits["val"] += ids[scale.test_per_site:scale.test_per_site + scale.val_per_site]
        splits["train_pool"] += ids[scale.test_per_site + scale.val_per_site:]
    path = labeled.parent / "splits.json"
    path.write_text(json.dumps(splits, indent=2) + "\n")
    _say(f"splits {path}: training pool {len(splits['train_pool'])} subjects (site-1), "
         f"validation {len(splits['val'])} and test {len(splits['test'])} from {len(by_site)} sites")
    return path


def _seeded_splits(labeled: Path, scale: Scale) -> Path:
    """Write ``splits.json`` for the single-protocol cohort: the split the sweep's config would draw."""
    from downstream.config import SweepConfig
    from downstream.data import make_splits, open_labeled
    from ssl_pretrain.config import load_config

    data = load_config(SweepConfig, CONFIGS / scale.sweep_config).data
    ids = [s.id for s in open_labeled(labeled).subjects]
    s = make_splits(ids, data.n_val, data.n_test, data.split_seed)
    path = labeled.parent / "splits.json"
    path.write_text(json.dumps({"train_pool": list(s.train_pool), "val": list(s.val), "test": list(s.test)},
                               indent=2) + "\n")
    _say(f"splits {path}: training pool {len(s.train_pool)}, validation {len(s.val)}, test {len(s.test)} "
         f"(the sweep's seeded split, data.split_seed={data.split_seed})")
    return path


def _probe_pool(labeled: Path, splits: Path) -> tuple[Path, int]:
    """``data/probe.txt``: image and label of each training-pool subject, for the pretraining probe.

    Returns:
        The list file and the number of subjects in it.
    """
    from downstream.data import open_labeled

    pool = set(json.loads(splits.read_text())["train_pool"])
    lines = [f"{s.image}\t{s.label}" for s in open_labeled(labeled).subjects if s.id in pool]
    path = labeled.parent / "probe.txt"
    path.write_text("# the labeled training pool (no validation or test subject): the probe's data\n"
                    + "\n".join(lines) + "\n")
    return path, len(lines)


def shard_cohort(cohorts: Sequence[Path], shards: Path, params: PreprocessParams,
                 exclude: Path | None = None) -> Path:
    """Shard the unlabeled volumes of ``cohorts`` (one folder, or several pooled) into ``shards``.

    Reuses ``shards`` when its manifest (written last) is there. Small shards (~64 slices, or 4
    volumes) are the unit of shard shuffling and of splitting across ranks and workers. ``exclude``: a split file whose
    validation and test subjects are kept out (``make_shards --exclude``).
    """
    if (shards / "manifest.json").is_file():
        _say(f"reusing shards at {shards}")
        return shards
    subjects, skipped = [], []
    for cohort in cohorts:
        found, missed = discover(cohort)
        subjects += found
        skipped += missed
    _say(f"sharding {len(subjects)} unlabeled volumes from {', '.join(map(str, cohorts))} into {shards}")
    per_shard = 4 if params.volumetric else 64  # a 3D sample is a whole volume
    write_shards(subjects, shards, params, samples_per_shard=per_shard, workers=min(2, os.cpu_count() or 1),
                 skipped=skipped, exclude=read_exclusions(exclude) if exclude is not None else ())
    return shards


def preprocessing(scale: Scale, dims: float = 2) -> PreprocessParams:
    """How the demo prepares its data: slices, slices with their neighbours (2.5D) or whole volumes (3D)."""
    if dims == 3:
        return PreprocessParams(spacing=(VOLUMES[scale.name].spacing,) * 3)
    return PreprocessParams(spacing=(scale.spacing, scale.spacing), size=(scale.size, scale.size),
                            context_slices=CONTEXT_SLICES if dims == 2.5 else 0)


def _model_overrides(scale: Scale, dims: float) -> list[str]:
    """The network of a 2D / 2.5D run: the scale's widths (a 2.5D pretraining run also sets its input channels,
    in :func:`_pretrain`; finetuning takes them from the data); 3D takes its config's network."""
    if dims == 3:
        return []
    return [f"model.widths={list(scale.widths)}"]


def _pretrain(out: Path, task: str, shards: Path, scale: Scale, probe: tuple[Path, int], dims: float = 2) -> Path:
    run_dir = out / "pretrain" / task
    export = run_dir / "export" / "model.pt"
    if export.is_file():
        _say(f"reusing finished {task} pretraining: {export}")
        return export
    if (run_dir / "checkpoints").is_dir():
        _say(f"resuming {task} pretraining from its last checkpoint in {run_dir / 'checkpoints'}")
    vol = VOLUMES[scale.name]
    pattern = vol.pretrain_config if dims == 3 else scale.pretrain_config
    config = CONFIGS / pattern.format(task=task, config3d=_CONFIG3D.get(task, ""))
    script = ["mri_ssl.cli.pretrain", "--config", str(config)]  # a module: runs from an installed mri-ssl
    steps, batch = (vol.pretrain_steps, vol.pretrain_batch) if dims == 3 else (scale.pretrain_steps,
                                                                               scale.pretrain_batch)
    overrides = [
        f"task={task}", f"data.shards={shards}", f"out_dir={run_dir}", "resume=auto",
        f"train.max_steps={steps}", f"data.batch_size={batch}",
        f"train.ckpt_every={scale.ckpt_every}", f"train.image_every={scale.ckpt_every}",
        "train.cpu_threads=null",  # debug.yaml pins 1 thread for its tiny model; use the cores here
        *_model_overrides(scale, dims), f"run_name=demo-{task}",
    ]
    if dims == 2.5:
        overrides.append(f"model.in_channels={2 * CONTEXT_SLICES + 1}")
    if dims == 3:  # nnssl's 16 mm mask blocks; the patch of the scale
        overrides += [f"data.patch_size={list(vol.pretrain_patch)}", "mim.mask_block=16.0"]
    probe_file, pool = probe
    n_train = min(2, pool - 1)
    if n_train >= 1:  # the probe: 2 training volumes, the rest of the pool (up to 4) held out
        overrides += [f"probe.root={probe_file}", f"probe.every={scale.probe_every}",
                      f"probe.n_train={n_train}", f"probe.n_eval={min(4, pool - n_train)}"]
    gpus = torch.cuda.device_count()
    if gpus > 0:
        cmd = ["deepspeed", "--num_gpus", str(gpus), "--module", *script, *overrides]
    else:
        cmd = [sys.executable, "-m", *script, *overrides]
    _run(cmd, out)
    return export


def _say_probe(task: str, run_dir: Path) -> None:
    """Print the probe's Dice curve beside its random-init reference, and its share of the run's time."""
    summary = json.loads((run_dir / "summary.json").read_text()).get("probe")
    if not summary:
        return
    rows = read_metrics(run_dir / "metrics.jsonl")
    curve = {r["step"]: r["probe/dice"] for r in rows if "probe/dice" in r}
    points = ", ".join(f"{step}: {dice:.3f}" for step, dice in sorted(curve.items()))
    line = f"{task} probe Dice by step {{{points}}}"
    if summary["random_init_dice"] is not None:
        line += f"; random-init reference (the probe at step 0) {summary['random_init_dice']:.3f}"
    _say(line)
    _say(f"{task} probe: best {summary['best_dice']:.3f} at step {summary['best_step']}, "
         f"{summary['time_s']:.1f} s = {100 * summary['time_frac']:.1f} % of pretraining time")


def sweep_stage(out: Path, labeled: Path, exports: Mapping[str, Path], scale: Scale, splits: Path,
                extra: Sequence[str] = (), dims: float = 2) -> Path:
    """Run ``launch/sweep.py`` in ``out/sweep``: random init and ``exports`` × the scale's grid.

    ``extra``: further overrides of the sweep's config, applied last.
    """
    sweep_dir = out / "sweep"
    out.mkdir(parents=True, exist_ok=True)  # the sweep runs in out (MLflow's local store lands there)
    inits = ["random", *[str(p) for p in exports.values()]]
    vol = VOLUMES[scale.name]
    preprocess = json.dumps(preprocessing(scale, dims).to_dict())  # JSON is YAML: one override
    cmd = [
        sys.executable, "-m", "mri_ssl.cli.sweep",
        "--config", str(CONFIGS / (vol.sweep_config if dims == 3 else scale.sweep_config)),
        f"data.root={labeled}", f"out_dir={sweep_dir}", f"init={inits}",
        f"n_labeled={list(scale.labeled_counts)}", f"seeds={list(scale.seeds)}",
        f"train.max_steps={vol.finetune_steps if dims == 3 else scale.finetune_steps}",
        f"train.eval_every={scale.eval_every}", *_model_overrides(scale, dims), f"data.preprocess={preprocess}",
    ]
    if dims == 3:
        cmd += [f"train.patch_size={list(vol.finetune_patch)}", f"train.batch_size={vol.finetune_batch}"]
    cmd += [f"data.splits={splits}", *extra]
    _run(cmd, out)
    return sweep_dir


class _StageClock:
    """Wall time of each stage of one invocation: ``with clock("shards"): …``; ``str`` lists them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[stage] = time.time() - t0

    def __str__(self) -> str:
        return ", ".join(f"{stage} {s:.0f} s" for stage, s in self.seconds.items())


def run_experiment(out: Path, *, kind: str = "liver", scale: Scale, sites: int | None = None,
                   dims: float = 2, cohort_seeds: Mapping[str, int] = DEMO_SEEDS) -> Path:
    """Run (or finish) every stage under ``out`` and print the label-efficiency table.

    Args:
        out: Directory for everything the demo writes.
        kind: ``"liver"`` or ``"prostate"`` phantoms.
        scale: Sizes of the stages (:func:`pick_scale`).
        sites: Scanners / protocols in the cohorts (default: the scale's); 1 is the
            single-protocol cohort of earlier versions, split by the sweep's seed.
        dims: 2 (slices), 2.5 (slices with their neighbours as channels) or 3 (whole volumes, the
            library's 3D network, MIM and 3D contrastive pretraining).
        cohort_seeds: Seeds of the two cohorts; settings are chosen on development seeds of one's own,
            never on the demo's (:data:`DEMO_SEEDS`).

    Returns:
        The sweep directory holding the report.
    """
    t0 = time.time()
    sites = scale.sites if sites is None else sites
    if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= len(SITES[kind]):
        raise ValueError(f"--sites: must be an integer from 1 to {len(SITES[kind])}, got {sites!r}")
    if dims not in PRETEXTS:
        raise ValueError(f"--dims: must be one of 2, 2.5, 3; got {dims!r}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_scenario(out, kind, scale, sites, dims)
    n_labeled = scale.n_labeled if sites == 1 else len(_labeled_sites(scale, sites))
    scenario = ("one protocol" if sites == 1 else
                f"{sites} sites; labels from site-1 ({scale.n_train_pool} in the training pool), "
                f"{scale.val_per_site} validation + {scale.test_per_site} test subjects per site")
    vol = VOLUMES[scale.name]
    what = (f"{scale.size}x{scale.size} slices{' with one neighbour on each side as channels' * (dims == 2.5)}, "
            f"UNet widths {list(scale.widths)}, {scale.pretrain_steps}" if dims != 3 else
            f"whole volumes at {vol.spacing} mm, {list(vol.pretrain_patch)} patches, the library's 3D network, "
            f"{vol.pretrain_steps}")
    _say(f"scale '{scale.name}' in {dims}D: {scale.n_unlabeled} unlabeled + {n_labeled} labeled subjects "
         f"({scenario}), {what} pretraining steps per pretext ({', '.join(PRETEXTS[dims])}); everything goes under "
         f"{out}")
    params = preprocessing(scale, dims)
    clock = _StageClock()
    with clock("cohorts"):
        cohorts = make_cohorts(out, kind, scale, sites, cohort_seeds)
        unlabeled, labeled = cohorts["unlabeled"], cohorts["labeled"]
        splits = _seeded_splits(labeled, scale) if sites == 1 else site_splits(labeled, scale)
        probe = _probe_pool(labeled, splits)
    with clock("shards"):
        shards = shard_cohort([unlabeled], out / "shards", params, exclude=splits)  # no evaluation subject pretrains
    exports = {}
    for task in PRETEXTS[dims]:
        with clock(f"pretrain {task}"):
            exports[task] = _pretrain(out, task, shards, scale, probe, dims)
    for task, export in exports.items():
        _say_probe(task, export.parent.parent)
    with clock("sweep"):
        sweep_dir = sweep_stage(out, labeled, exports, scale, splits, dims=dims)  # prints the label-efficiency table
    _say(f"wall time per stage (this invocation; a reused stage takes ~0 s): {clock}")
    # The stages run with `out` as working directory, so MLflow's local default store lands there.
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    _say(f"finished in {(time.time() - t0) / 60:.1f} min")
    _say(f"label-efficiency table and plots: {sweep_dir / 'report' / 'report.md'}")
    _say(f"shards: {shards}   pretraining runs and checkpoints: {out / 'pretrain'}")
    _say(f"MLflow store: {uri}   browse it with: mlflow ui --backend-store-uri {uri}")
    return sweep_dir
