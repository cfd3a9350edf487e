"""The pretraining loop: DeepSpeed engine over the infinite shard stream, checkpoints, export, MLflow.

``run_pretraining(cfg)`` is the whole job for one process (launch it once per rank, or call it
in-process for one rank). Everything resuming needs — step, samples seen, loader position, RNG
states, the MLflow run — is saved with each checkpoint; ``resume: auto`` continues from the latest
one, a run that already finished just returns its export, and a finished run given a larger
``train.max_steps`` continues from its last checkpoint and exports again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ssl_pretrain import termination
from ssl_pretrain.config import ConfigError, flatten, save_config
from ssl_pretrain.data.loader import build_pretrain_loader
from ssl_pretrain.data.shardformat import manifest_preprocess, manifest_subjects, meta_fields
from ssl_pretrain.engine import plots
from ssl_pretrain.engine.checkpoint import CheckpointDir, CheckpointError, capture_rng, restore_rng
from ssl_pretrain.engine.config import BatchPlan, PretrainConfig, batch_plan, deepspeed_config
from ssl_pretrain.engine.distributed import (
    DistInfo,
    PeerLost,
    cpu_threads,
    init_distributed,
    lost_peer,
    peer_names,
    shutdown_distributed,
)
from ssl_pretrain.engine.probe import SegmentationProbe
from ssl_pretrain.engine.state import PretrainState
from ssl_pretrain.export import save_export
from ssl_pretrain.fileio import append_text, atomic_savefig, atomic_write_text, read_own_text
from ssl_pretrain.models.dna import patch_divisor
from ssl_pretrain.tasks.health import CollapseWatch
from ssl_pretrain.tasks.registry import TASKS, PretextTask
from ssl_pretrain.tracking import RunLogger, start_logger

__all__ = ["TrainingDiverged", "build_task", "run_name", "run_pretraining", "Trainer"]

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def sample_keys(batch: dict[str, Any]) -> list[str]:
    """One key per real sample of a batch (padding left out): ``subject/slice``, or ``subject/d,h,w`` (a patch's
    origin)."""
    where = batch["origin"].tolist() if "origin" in batch else batch["slice"].tolist()
    valid = batch["valid"].tolist() if "valid" in batch else [True] * len(where)
    return [f"{s}/{','.join(map(str, w)) if isinstance(w, list) else w}" for s, w, ok in
            zip(batch["subject"], where, valid, strict=True) if ok]


def build_task(cfg: PretrainConfig, info: DistInfo) -> PretextTask:
    """The pretext task module (UNet parts + heads) for ``cfg.task`` (from the task table), seeded for this rank."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    task_seed = cfg.seed * 100_003 + info.rank  # different views / corruptions per rank
    return TASKS[cfg.task].task(
        cfg.model, cfg.task_config, seed=task_seed, distributed=info.world_size > 1, device=info.device
    )


def run_pretraining(cfg: PretrainConfig) -> Path:
    """Run (or resume, or recognise as finished) one pretraining job in this process.

    Args:
        cfg: The validated config (see ``launch/configs/``).

    Returns:
        Path of ``<out_dir>/export/model.pt``.

    Raises:
        ConfigError, CheckpointError, ValueError: Bad input, found before any compute.
        TrainingDiverged: The loss became NaN / Inf.
    """
    info = init_distributed(cfg.train.peer_timeout_s)
    threads = torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
    try:
        return Trainer(cfg, info).run()
    finally:
        torch.set_num_threads(threads)  # in-process callers get their setting back
        shutdown_distributed(info)


# where a run writes and how it waits, not what it trains (train.peer_timeout_s came later: old names stay)
_NOT_IN_NAME = ("out_dir", "run_name", "resume", "track", "experiment", "train.peer_timeout_s")


def run_name(cfg: PretrainConfig) -> str:
    """``<task>-<digest>``: the MLflow name of a run without ``run_name``; the digest is of its config
    (what it trains, not where it writes), so two runs of one recipe share a name and others do not."""
    flat = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] not in _NOT_IN_NAME and k not in _NOT_IN_NAME}
    return f"{cfg.task}-{hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _parameter_fingerprint(module: nn.Module) -> torch.Tensor:
    """Per-parameter (sum, sum |x|, sum x²) in float64: equal on all ranks iff replicas agree (practically)."""
    rows = [torch.stack([p.double().sum(), p.double().abs().sum(), p.double().square().sum()])
            for p in module.parameters()]
    return torch.stack(rows)


def _rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch cut to ``rows`` (tensors and lists along their first dimension; other values as they are)."""
    idx = rows.tolist()
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim else [v[i] for i in idx] if isinstance(v, list) else v
            for k, v in batch.items()}


@contextlib.contextmanager
def _buffers_kept(module: nn.Module, frozen: bool) -> Iterator[None]:
    """With ``frozen``, the module's buffers (batch-norm running statistics) are restored on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()] if frozen else []
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@dataclasses.dataclass
class _Window:
    """Throughput of the steps since the last metrics row: summed over ranks, with the latest step's table."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    wait: float = 0.0
    time: float = 0.0
    last: Any = None

    def add(self, table: torch.Tensor) -> None:
        """One step's ``(ranks, [loss, data wait, step time])`` table."""
        self.steps += 1
        self.wait += float(table[:, 1].sum())
        self.time += float(table[:, 2].sum())
        self.last = table

    def reset(self) -> None:
        self.t0, self.steps, self.wait, self.time = time.perf_counter(), 0, 0.0, 0.0


class Trainer:
    """One rank of a pretraining job (see :func:`run_pretraining`).

    Args:
        cfg: The run config.
        info: This process's place in the job (from :func:`init_distributed`).
    """

    def __init__(self, cfg: PretrainConfig, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.out = Path(cfg.out_dir)
        self.export_path = self.out / "export" / "model.pt"
        self.ckpt = CheckpointDir(self.out / "checkpoints", info.rank, cfg.train.keep_checkpoints)
        self.logger: RunLogger | None = None
        self._mlflow_from = 0  # first step whose metrics MLflow does not hold yet (after a resume)
        self.probe: SegmentationProbe | None = None  # rank 0 only
        self.state = PretrainState()  # what the run has done: saved in every checkpoint, restored on resume
        self._collapse = CollapseWatch(cfg.train.collapse_std, cfg.train.collapse_logs)
        self._zero_stage = 0  # DeepSpeed's ZeRO stage of this run (its config's)

    # ---- checks before any compute -------------------------------------------------------------

    def _expected_meta(self, micro: int) -> dict[str, Any]:
        return {
            "world_size": self.info.world_size,
            "task": self.cfg.task,
            "model": self.cfg.model.to_dict(),
            "micro_batch": micro,
            "grad_accum": self.cfg.train.grad_accum,
            "zero_stage": self._zero_stage,
        }

    def _check_manifest(self, manifest: Any, needs_position: bool) -> None:
        """Fields the task needs, as the manifest lists them (before reading any sample)."""
        fields = meta_fields(manifest)
        if needs_position and fields is not None and "position" not in fields:
            raise ValueError(
                f"data.shards={self.cfg.data.shards}: contrastive.positives=partition needs each slice's relative "
                f"position in meta.json, but these shards' meta has only {', '.join(fields)} "
                f"(use positives=views or re-shard)"
            )

    def _check_batch(self, batch: dict[str, Any], task: str, needs_position: bool) -> None:
        where = f"data.shards={self.cfg.data.shards}"
        image = batch.get("image")
        dims = self.cfg.model.spatial_dims
        if not isinstance(image, torch.Tensor) or image.ndim != dims + 2:
            want = ("(B, C, H, W) slices" if dims == 2
                    else "(B, C, D, H, W) patches of 3D shards (make_shards --spacing Z Y X)")
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else None
            raise ValueError(f"{where}: model.spatial_dims={dims} needs {want}; these shards give images of "
                             f"shape {got}")
        c = image.shape[1]
        if c != self.cfg.model.in_channels:
            raise ConfigError(f"model.in_channels: is {self.cfg.model.in_channels}, but the shards have {c} channels")
        if dims == 3:
            assert self.cfg.model.arch is not None  # the model config's check
            div = patch_divisor(self.cfg.model.arch)
            if any(n % d for n, d in zip(image.shape[2:], div, strict=True)):
                raise ConfigError(f"data.patch_size: {list(image.shape[2:])} must be multiples of {list(div)} per axis "
                                  f"(the product of model.arch.strides)")
            return
        h, w = image.shape[2:]
        div = self.cfg.model.divisor
        if h % div or w % div:
            raise ConfigError(
                f"model.widths: depth {self.cfg.model.depth} needs H, W divisible by {div}; the shards have {h}×{w}"
            )
        if needs_position:
            pos = batch.get("position")
            if not isinstance(pos, torch.Tensor) or pos.shape[:1] != image.shape[:1] or not torch.isfinite(pos).all():
                raise ValueError(
                    f"{where}: {task} with contrastive.positives=partition needs every slice's relative "
                    f"position in meta.json; these shards lack it (use positives=views or re-shard)"
                )

    # ---- the job ---------------------------------------------------------------------------------

    def run(self) -> Path:
        """Check inputs, build, resume if asked, train to ``max_steps``, export. Returns the export path."""
        import deepspeed

        cfg, info = self.cfg, self.info
        plan = batch_plan(cfg, info.world_size)
        ds_config = deepspeed_config(cfg, info.world_size)
        self._zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        meta = self._resume_meta(plan)
        if meta is not None and meta["step"] == cfg.train.max_steps and meta.get("finished") \
                and self.export_path.is_file():
            if info.is_main:
                log.info("%s: already finished (%d steps); export %s", cfg.out_dir, meta["step"], self.export_path)
            return self.export_path
        rank_state = self._rank_state(meta)
        universal = None
        if meta is not None and meta["world_size"] != info.world_size and self._zero_stage > 0:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
            universal = self.ckpt.to_universal(meta["tag"])  # ZeRO's partitions, merged per parameter
        resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=plan.micro))
        task = build_task(cfg, info)
        loader = build_pretrain_loader(resolved.data, info.rank, info.world_size)
        self._check_manifest(loader.manifest, task.needs_position)
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
        stream = self._stream(loader)
        first = self._next_batch(stream)
        self._check_batch(first, cfg.task, task.needs_position)
        self._build_probe(loader)
        if info.is_main:
            save_config(resolved, self.out / "config.yaml")
        engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=[p for p in task.parameters() if p.requires_grad], config=ds_config,
            dist_init_required=False,
        )
        self._restore(engine, task, meta, rank_state, universal)
        peers = peer_names(info)
        self._start_tracking(resolved)
        assert self.logger is not None
        try:
            try:
                self._loop(engine, task, loader, stream, first, plan)
                self._finish(task, loader)
            except RuntimeError as e:
                peer = lost_peer(e, info, peers)
                if peer is None:
                    raise
                raise PeerLost(
                    f"rank {info.rank} of {info.world_size} lost {peer}, at step {self.state.step}; every rank "
                    f"stops (train.peer_timeout_s={cfg.train.peer_timeout_s}): rerun the same command once every "
                    f"node is back, it resumes from the last checkpoint in {self.ckpt.root}") from e
        except BaseException as e:
            self.logger.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            stream.close()  # stops the DataLoader workers now, not at garbage collection (in-process callers)
        self.logger.end("FINISHED")
        return self.export_path

    def _resume_meta(self, plan: BatchPlan) -> dict[str, Any] | None:
        """The ``meta.json`` of the checkpoint to continue (None: start fresh), checked against this run."""
        cfg = self.cfg
        if cfg.resume == "never" and self.ckpt.latest_tag() is not None:
            raise CheckpointError(
                f"{self.ckpt.root}: holds checkpoint {self.ckpt.latest_tag()}; set resume=auto to continue it or "
                f"choose another out_dir"
            )
        tag = self.ckpt.readable_tag()  # a damaged latest checkpoint falls back to the previous one
        meta = self.ckpt.read_meta(tag) if tag is not None else None
        if meta is None:
            return None
        CheckpointDir.check_compatible(meta, self._expected_meta(plan.micro), self.ckpt.root)
        if meta["step"] > cfg.train.max_steps:
            raise CheckpointError(
                f"{self.ckpt.root}: checkpoint {tag} is at step {meta['step']}, beyond train.max_steps="
                f"{cfg.train.max_steps}; set train.max_steps >= {meta['step']} (larger continues training)"
            )
        if meta.get("finished") and meta["step"] < cfg.train.max_steps and self.info.is_main:
            # the scheduler state is only its step count: the cosine decay is recomputed for the new length
            log.info("%s: extending a finished run from %d to %d steps", cfg.out_dir, meta["step"],
                     cfg.train.max_steps)
        return meta

    def _build_probe(self, loader: Any) -> None:
        """The segmentation probe; every rank checks its input, so bad input stops all ranks alike."""
        cfg, info = self.cfg, self.info
        if not cfg.probe.enabled:
            return
        divisor = patch_divisor(cfg.model.arch) if cfg.model.arch is not None else None  # 3D: whole volumes
        probe = SegmentationProbe(cfg.probe, manifest_preprocess(loader.manifest), cfg.model.in_channels, info.device,
                                  divisor)
        self.probe = probe if info.is_main else None
        if cfg.probe.every > cfg.train.max_steps and info.is_main:
            log.warning("probe.every=%d is larger than train.max_steps=%d: the probe runs at step 0 and at the "
                        "end only", cfg.probe.every, cfg.train.max_steps)

    def _rank_state(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        """This rank's loader / RNG state from the checkpoint ``meta`` describes (None: a fresh run).

        On another number of ranks, a rank the checkpoint had keeps its RNG states; a new rank gets
        none (it is seeded afresh); every rank maps the job's loader position (any rank's state holds it).
        """
        if meta is None:
            return None
        if meta["world_size"] == self.info.world_size:
            return self.ckpt.read_rank_state(meta["tag"])
        if self.info.rank < meta["world_size"]:
            return self.ckpt.read_rank_state(meta["tag"], self.info.rank)
        return {"loader": self.ckpt.read_rank_state(meta["tag"], 0)["loader"]}

    def _restore(self, engine: Any, task: PretextTask, meta: dict[str, Any] | None,
                 rank_state: dict[str, Any] | None, universal: Path | None) -> None:
        """Load the checkpoint into the engine, the RNGs and :attr:`state`; or seed a fresh run."""
        cfg, info = self.cfg, self.info
        if meta is not None and rank_state is not None:
            self.ckpt.load(engine, meta["tag"], universal)
            self.state.load_state_dict(meta)
            if "rng" in rank_state:
                restore_rng(rank_state["rng"])
                task.set_rng_state(rank_state["task_rng"])
            else:  # a rank the checkpoint did not have
                seed = self._seed(7_919 * self.state.step)
                task.set_rng_state(torch.Generator(device=info.device).manual_seed(seed).get_state())
            if info.is_main:
                log.info("resuming %s from step %d", cfg.out_dir, self.state.step)
                if meta["world_size"] != info.world_size:
                    log.info("the checkpoint was written by %d rank(s), this run has %d: model and optimizer "
                             "re-sharded%s, the data position mapped", meta["world_size"], info.world_size,
                             " (DeepSpeed universal checkpoint)" if universal is not None else "")
                logged_until = self._truncate_metrics(self.state.step)
                if self.state.mlflow_run_id is not None:  # MLflow holds what metrics.jsonl held: log later steps
                    self._mlflow_from = logged_until + 1
            return
        if info.is_main:  # rows of an attempt killed before its first checkpoint are not this run's
            self._truncate_metrics(-1)
        self._seed(0)

    def _seed(self, offset: int) -> int:
        """Seed the process RNGs for this rank (dropout differs per rank; the task generators are seeded apart).

        Returns:
            The seed used.
        """
        seed = self.cfg.seed * 100_003 + self.info.rank + offset
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return seed

    def _start_tracking(self, resolved: PretrainConfig) -> None:
        """The run's MLflow run on rank 0 (the checkpoint's on a resume); params and config when it is new."""
        cfg, info = self.cfg, self.info
        tags = {"git_commit": _git_commit(), "task": cfg.task, "world_size": info.world_size}
        run_id = self.state.mlflow_run_id
        self.logger = start_logger(
            info.is_main and cfg.track, cfg.experiment, run_name=cfg.run_name or run_name(resolved), tags=tags,
            run_id=run_id,
        )
        self.state.mlflow_run_id = self.logger.run_id
        if run_id is None:
            self.logger.log_params(flatten(resolved))
            self.logger.log_artifact(self.out / "config.yaml")

    def _next_batch(self, stream: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch; in epoch mode every sample trains once (issue 25).

        Epoch mode ends each epoch with short and padding batches (equal counts on all ranks). A
        short batch trains as it is; a padding batch trains as one padding row whose loss weighs
        nothing, so that its rank still takes part in the collectives. ``rank_sizes`` lists every
        rank's samples (one small all-gather per micro batch, epoch mode only); a micro batch that
        is padding on every rank (corrupt samples skipped) is passed over by all ranks alike.
        """
        while True:
            batch = next(stream)
            if self.cfg.data.mode != "epoch":
                return batch
            valid = batch["valid"]
            mine = torch.tensor([int(valid.sum())], device=self.info.device)
            everyone = [torch.zeros_like(mine) for _ in range(self.info.world_size)]
            dist.all_gather(everyone, mine)
            sizes = [int(t.item()) for t in everyone]
            if sum(sizes):
                rows = valid.nonzero().flatten() if valid.any() else torch.zeros(1, dtype=torch.long)
                return {**_rows(batch, rows), "rank_sizes": sizes}

    @staticmethod
    def _stream(loader: Any) -> Iterator[dict[str, Any]]:
        while True:  # the loader is an endless stream; a finite one simply starts over
            yield from loader

    def _loop(self, engine: Any, task: PretextTask, loader: Any, stream: Iterator[dict[str, Any]],
              first: dict[str, Any], plan: BatchPlan) -> None:
        """Train from :attr:`state`'s step to ``train.max_steps``: log, probe, export, draw and checkpoint."""
        cfg, info, t, st = self.cfg, self.info, self.cfg.train, self.state
        pending: dict[str, Any] | None = first
        self._seen: list[str] = []  # every sample trained on, repeats kept (train.track_samples)
        started, wall_before = time.perf_counter(), st.wall_time_s
        window = _Window()
        pbar = tqdm(total=t.max_steps, initial=st.step, disable=not info.is_main, desc=f"pretrain {cfg.task}")
        if st.step == 0 and cfg.probe.enabled:
            self._probe(task, 0)  # the random-init reference of every probe curve
        try:
            while st.step < t.max_steps:
                batch, task_metrics = self._step(engine, stream, pending, plan, window)
                pending = None
                st.wall_time_s = wall_before + time.perf_counter() - started
                pbar.update(1)
                if st.step % t.log_every == 0 or st.step == t.max_steps:
                    self._log_window(engine, window, plan, task_metrics, pbar)
                if cfg.probe.enabled and (st.step % cfg.probe.every == 0 or st.step == t.max_steps):
                    self._probe(task, st.step)
                if info.is_main and t.export_every and st.step % t.export_every == 0:
                    st.wall_time_s = wall_before + time.perf_counter() - started
                    self._export(self.out / "export" / f"step-{st.step:07d}" / "model.pt", task, loader)
                if info.is_main and st.step % t.image_every == 0:
                    self._figure(task, batch, st.step)
                stop = bool(window.last[:, 3].max() > 0)  # SIGTERM on any rank: save now, then stop
                if st.step % t.ckpt_every == 0 or st.step == t.max_steps or stop:
                    st.wall_time_s = wall_before + time.perf_counter() - started
                    self._save(engine, task, loader, plan)
                if stop and st.step < t.max_steps:
                    raise termination.Terminated(f"SIGTERM: stopped at step {st.step} after its checkpoint")
        finally:
            pbar.close()
        st.wall_time_s = wall_before + time.perf_counter() - started

    def _step(self, engine: Any, stream: Iterator[dict[str, Any]], pending: dict[str, Any] | None,
              plan: BatchPlan, window: _Window) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One optimizer step (``grad_accum`` micro batches); updates :attr:`state` and ``window``."""
        info, st = self.info, self.state
        step_t0 = time.perf_counter()
        wait = 0.0
        loss_sum = torch.zeros((), device=info.device)
        task_metrics: dict[str, torch.Tensor] = {}
        samples = 0
        for _ in range(plan.grad_accum):
            w0 = time.perf_counter()
            batch = pending if pending is not None else self._next_batch(stream)
            pending = None
            wait += time.perf_counter() - w0
            if self.cfg.train.track_samples:
                self._seen.extend(sample_keys(batch))
            sizes = batch.get("rank_sizes")
            if sizes is None:
                loss, task_metrics = engine(batch)
                weight, samples = 1.0, samples + plan.micro * info.world_size
            else:  # this rank's share of the micro batch's samples (DeepSpeed averages over ranks)
                weight, samples = sizes[info.rank] * info.world_size / sum(sizes), samples + sum(sizes)
                with _buffers_kept(engine.module, frozen=sizes[info.rank] == 0):  # padding: no BN statistics
                    loss, metrics = engine(batch)
                task_metrics = metrics if sizes[info.rank] else task_metrics
            loss = loss * weight
            engine.backward(loss)  # DeepSpeed scales the loss by 1 / grad_accum
            engine.step()
            loss_sum += loss.detach().float()
        st.step += 1
        st.samples_seen += samples
        # one small collective per step: every rank's loss, data wait, step time and whether SIGTERM
        # arrived (this is a host sync, needed by the NaN guard anyway; all ranks stop at the same step)
        mine = torch.tensor([0.0, wait, time.perf_counter() - step_t0, float(termination.requested())],
                            dtype=torch.float64, device=info.device)
        mine[0] = loss_sum.double() / plan.grad_accum
        everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
        dist.all_gather(everyone, mine)
        table = torch.stack(everyone).cpu()
        st.loss = float(table[:, 0].mean())
        if not math.isfinite(st.loss):
            raise TrainingDiverged(
                f"step {st.step}: loss is {st.loss} (not finite); stopped without saving. The last good "
                f"checkpoint is {self.ckpt.latest_tag() or 'none'} in {self.ckpt.root}; lower train.lr "
                f"or check the data, then resume"
            )
        window.add(table)
        return batch, task_metrics

    def _log_window(self, engine: Any, window: _Window, plan: BatchPlan, task_metrics: dict[str, torch.Tensor],
                    pbar: Any) -> None:
        """The metrics row of the steps since the last log (rank 0 writes it); starts a new window."""
        st, info = self.state, self.info
        row = {
            "step": st.step,
            "loss": st.loss,
            "lr": float(engine.get_lr()[0]),
            "samples_per_s": window.steps * plan.global_batch / max(time.perf_counter() - window.t0, 1e-9),
            "data_wait_frac": window.wait / max(window.time, 1e-9),
            **{f"data_wait_s/rank{r}": float(window.last[r, 1]) for r in range(info.world_size)},
            **{k: float(v) for k, v in task_metrics.items()},
        }
        if info.is_main:
            self._log_row(row)
            pbar.set_postfix(loss=f"{st.loss:.4f}", lr=f"{row['lr']:.2e}")
            warning = self._collapse.update(st.step, row["health/std_norm"]) if "health/std_norm" in row else None
            if warning:
                log.warning(warning)
        window.reset()

    def _log_row(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row, and to MLflow unless it holds that step already (rank 0)."""
        assert self.logger is not None
        if row["step"] >= self._mlflow_from:
            self.logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        append_text(self.out / "metrics.jsonl", json.dumps(row) + "\n")

    def _probe(self, task: PretextTask, step: int) -> None:
        """Run the segmentation probe on rank 0 (the other ranks wait) and log it with ``probe.png``."""
        if self.probe is not None:
            assert self.logger is not None
            decoder = task.decoder if "decoder" in task.export_parts() else None
            result = self.probe.evaluate(task.encoder, decoder)
            history = self.state.probe_history
            self.state.probe_time_s += result["time_s"]
            history.append((step, result["dice"]))
            row: dict[str, Any] = {"step": step, **{f"probe/{k}": v for k, v in result.items()}}
            if history[0][0] == 0:
                row["probe/dice_random"] = history[0][1]
            row["probe/time_frac"] = self.state.probe_time_s / max(self.state.wall_time_s + result["time_s"], 1e-9)
            self._log_row(row)
            log.info("step %d: probe Dice %.4f (random init %.4f), %.1f s", step, result["dice"],
                     row.get("probe/dice_random", float("nan")), result["time_s"])
            curve = plots.probe_curve(history, self.cfg.task, self.out / "plots" / "probe.png")
            if curve is not None:
                self.logger.log_artifact(curve, "plots")
        if dist.is_initialized():
            dist.barrier()

    def _truncate_metrics(self, step: int) -> int:
        """Drop the ``metrics.jsonl`` rows after checkpoint ``step`` (they are computed again).

        Returns:
            The last step the file held before (the metrics are logged to MLflow first, then to
            the file, so MLflow holds at least the steps up to it).
        """
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return 0
        kept, last = [], 0
        for line in read_own_text(path).splitlines():  # a planted link is refused, not read or replaced
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a line cut by a kill while it was written
                continue
            last = max(last, row_step)
            if row_step <= step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        return last

    def _save(self, engine: Any, task: PretextTask, loader: Any, plan: BatchPlan) -> None:
        meta = {**self._expected_meta(plan.micro), **self.state.state_dict(),
                "finished": self.state.step == self.cfg.train.max_steps}
        rank_state = {"loader": loader.state_dict(), "rng": capture_rng(), "task_rng": task.rng_state()}
        self.ckpt.save(engine, self.state.step, meta, rank_state)

    def _figure(self, task: nn.Module, batch: dict[str, Any], step: int) -> None:
        import matplotlib.pyplot as plt

        fig = task.figure(batch)
        path = self.out / "plots" / f"{self.cfg.task}-step{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savefig(fig, path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        assert self.logger is not None
        self.logger.log_artifact(path, "plots")

    def _finish(self, task: PretextTask, loader: Any) -> None:
        cfg, info, st = self.cfg, self.info, self.state
        assert self.logger is not None
        summary: dict[str, Any] = {}
        if cfg.train.check_replicas:
            mine = _parameter_fingerprint(task).to(info.device)
            everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
            dist.all_gather(everyone, mine)
            diff = max(float((e - everyone[0]).abs().max()) for e in everyone)
            summary["replica_max_abs_diff"] = diff
            if diff != 0.0 and info.is_main:
                log.warning("ranks hold different parameters after training (max fingerprint diff %g)", diff)
        if cfg.train.track_samples:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, sorted(self._seen))
            summary["samples_by_rank"] = gathered
        if info.is_main:
            summary.update(self._export(self.export_path, task, loader), export=str(self.export_path))
            if st.probe_history:
                summary["probe"] = self._probe_summary()
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
            rows = plots.read_metrics(self.out / "metrics.jsonl")
            figures = [
                plots.loss_curve(rows, cfg.task, self.out / "plots" / "loss.png"),
                plots.probe_curve(st.probe_history, cfg.task, self.out / "plots" / "probe.png"),
                plots.health_curves(rows, cfg.task, self.out / "plots" / "health.png"),
            ]
            summary_file = self.out / "summary.json"
            uploads = [(self.export_path, "export"), *((f, "plots") for f in figures), (summary_file, None)]
            for path, where in uploads:
                if path is not None:
                    self.logger.log_artifact(path, where)
            log.info("pretraining done: %s", self.export_path)
        if dist.is_initialized():
            dist.barrier()

    def _probe_summary(self) -> dict[str, Any]:
        """The probe's best Dice, its random-init reference and its share of the run's time."""
        st = self.state
        best_step, best = max(st.probe_history, key=lambda h: (h[1], -h[0]))
        out = {
            "best_dice": best, "best_step": best_step,
            "random_init_dice": st.probe_history[0][1] if st.probe_history[0][0] == 0 else None,
            "time_s": st.probe_time_s, "time_frac": st.probe_time_s / max(st.wall_time_s, 1e-9),
        }
        log.info("probe: best Dice %.4f at step %d; probing took %.1f s of %.1f s (%.1f %%)", best, best_step,
                 st.probe_time_s, st.wall_time_s, 100 * out["time_frac"])
        return out

    def _export(self, path: Path, task: PretextTask, loader: Any) -> dict[str, Any]:
        """Write an export of the current weights (rank 0); returns its ``info`` (the budget and probe Dice)."""
        st = self.state
        step = st.step
        info_dict: dict[str, Any] = {
            "steps": step,
            "samples_seen": st.samples_seen,
            "wall_time_s": st.wall_time_s,
            "final_loss": st.loss,
            "world_size": self.info.world_size,
        }
        subjects = manifest_subjects(getattr(loader, "manifest", None))
        if subjects is not None:  # the sweep's report checks them against its test subjects (leakage)
            info_dict["pretrain_subjects"] = subjects
        done = [h for h in st.probe_history if h[0] <= step]
        if done:
            info_dict["probe_step"], info_dict["probe_dice"] = done[-1]
        save_export(
            path,
            task=self.cfg.task,
            model_config=self.cfg.model,
            encoder_state={k: v.float() for k, v in task.encoder.state_dict().items()},
            decoder_state={k: v.float() for k, v in task.decoder.state_dict().items()}
            if "decoder" in task.export_parts() and task.decoder is not None else None,
            preprocessing=manifest_preprocess(getattr(loader, "manifest", None)),
            info=info_dict,
        )
        return info_dict
