"""Checkpoints through DeepSpeed ``save_checkpoint`` / ``load_checkpoint``, never half-written as latest.

Layout under ``<out_dir>/checkpoints``::

    step-00000100/               one checkpoint (DeepSpeed's model / optimizer / scheduler files)
        trainer_rank{r}.pt       per-rank state: loader position, RNG states
        meta.json                step, samples seen, world size, task, model, batch plan, MLflow run
    latest                       the tag of the newest *complete* checkpoint

A checkpoint is written under ``.tmp-<tag>`` by every rank; only when all ranks are done does
rank 0 rename it to ``<tag>`` and then replace ``latest`` atomically. A ``kill -9`` at any moment
therefore leaves ``latest`` pointing at a complete checkpoint (or missing); leftovers named
``.tmp-*`` are ignored and removed by the next save. Several nodes need a shared file system for
``checkpoints/`` (as DeepSpeed itself does).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ssl_pretrain.fileio import atomic_write_text

__all__ = ["CheckpointError", "CheckpointDir", "capture_rng", "restore_rng"]

log = logging.getLogger(__name__)

META_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that this run cannot continue from; the message names it and why."""


def capture_rng() -> dict[str, Any]:
    """The process-wide RNG states (torch CPU and CUDA, Python, NumPy) as tensors, ints and strings.

    NumPy's key array is stored as a tensor so that the rank file loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointDir:
    """The ``checkpoints/`` directory of one run.

    Args:
        root: ``<out_dir>/checkpoints``.
        rank: This process's global rank.
        keep: How many complete checkpoints to keep (older ones are deleted after a save).
    """

    def __init__(self, root: str | os.PathLike[str], rank: int, keep: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.keep = keep

    @staticmethod
    def tag(step: int) -> str:
        """Directory name of the checkpoint after ``step`` optimizer steps."""
        return f"step-{step:08d}"

    def latest_tag(self) -> str | None:
        """The tag named by ``latest``, or None when there is no complete checkpoint."""
        latest = self.root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not tag or not (self.root / tag / "meta.json").is_file():
            raise CheckpointError(f"{latest}: names {tag!r}, which is not a complete checkpoint in {self.root}")
        return tag

    def readable_tag(self) -> str | None:
        """The newest checkpoint whose files are intact: ``latest``, else the newest older kept one.

        Falling back logs a warning that names the damaged checkpoint and its bad file. The check
        reads every ``*.pt`` of a checkpoint as a zip archive and verifies its CRCs (``torch.save``
        writes zip archives), which catches truncated and bit-flipped files without unpickling them.

        Returns:
            The tag to resume from, or None when there is no complete checkpoint.

        Raises:
            CheckpointError: Checkpoints exist but none is readable (one line naming each and why).
        """
        latest = self.latest_tag()
        if latest is None:
            return None
        older = sorted((p.name for p in self.root.glob("step-*") if p.is_dir() and p.name < latest), reverse=True)
        damaged: list[str] = []
        for tag in (latest, *older):
            problem = self._damage(tag)
            if problem is None:
                if damaged and self.rank == 0:
                    log.warning("checkpoint %s is unreadable; resuming from the previous kept checkpoint %s",
                                "; ".join(damaged), self.root / tag)
                return tag
            damaged.append(f"{self.root / tag} ({problem})")
        raise CheckpointError(
            f"{self.root}: no readable checkpoint: {'; '.join(damaged)}; restore the files or use another out_dir"
        )

    def _damage(self, tag: str) -> str | None:
        """What is wrong with checkpoint ``tag``'s files, or None when they are intact."""
        folder = self.root / tag
        try:
            self.read_meta(tag)
        except CheckpointError as e:
            return str(e).rsplit(": ", 1)[-1]
        if not any(folder.glob("*model_states.pt")):
            return "no DeepSpeed *model_states.pt file"
        for f in sorted(folder.glob("*.pt")):
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError):
                return f"{f.name} is truncated or not a torch file"
            if bad is not None:
                return f"{f.name}: member {bad} fails its CRC check"
        return None

    def read_meta(self, tag: str | None = None) -> dict[str, Any] | None:
        """``meta.json`` of ``tag`` (default: latest), or None when there is no checkpoint."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        path = self.root / tag / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            raise CheckpointError(f"{path}: not an mri-ssl checkpoint (version {META_VERSION} expected)")
        return meta

    @staticmethod
    def check_compatible(meta: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
        """Refuse to continue a checkpoint made by a different job.

        Another number of ranks is accepted (the state is re-sharded: :meth:`to_universal`, the
        loader's position is mapped) when the global batch — micro batch × accumulation × ranks —
        stays the same; on the same ranks, micro batch and accumulation must stay as they were.

        Args:
            meta: The checkpoint's ``meta.json``.
            expected: This run's ``world_size``, ``task``, ``model``, ``micro_batch``, ``grad_accum``, ``zero_stage``.
            where: The checkpoint directory (for the message).

        Raises:
            CheckpointError: One line naming the first difference and how to proceed.
        """
        hints = {
            "task": "use another out_dir for another task",
            "model": "use another out_dir for another model",
        }
        if "zero_stage" in meta:  # checkpoints written before it was recorded are not checked
            hints["zero_stage"] = "keep train.zero_stage as it was (each ZeRO stage stores the optimizer its own way)"
        if meta.get("world_size") == expected["world_size"]:
            hints.update(micro_batch="keep data.batch_size / train.batch_size as they were",
                         grad_accum="keep train.grad_accum as it was")
        for key, hint in hints.items():
            if meta.get(key) != expected[key]:
                raise CheckpointError(
                    f"{where}: checkpoint has {key}={meta.get(key)!r}, this run has {expected[key]!r}; {hint}"
                )
        old, new = (m["micro_batch"] * m["grad_accum"] * m["world_size"] for m in (meta, expected))
        if old != new:
            raise CheckpointError(
                f"{where}: checkpoint has a global batch of {old} ({meta['micro_batch']} x {meta['grad_accum']} "
                f"accumulation x {meta['world_size']} ranks), this run {new} on {expected['world_size']} rank(s); "
                f"set train.batch_size={old} to resume on {expected['world_size']} rank(s)"
            )

    def to_universal(self, tag: str) -> Path:
        """DeepSpeed's universal checkpoint of ``tag`` (ZeRO's optimizer partitions merged per parameter), which a
        job of another number of ranks loads (``checkpoint.load_universal``). Rank 0 converts; every rank must call.

        Returns:
            The directory to load ``tag`` from (``<root>/universal``); :meth:`load` removes it once loaded.
        """
        import argparse
        import contextlib

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        out = self.root / "universal"
        problem = [None]
        if self.rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(input_folder=str(self.root / tag), output_folder=str(out / tag),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    ds_to_universal(args)  # its banners and progress bars
            except Exception as e:  # DeepSpeed's converter asserts and raises many types
                problem[0] = f"{type(e).__name__}: {e}"
        if dist.is_initialized():  # every rank stops alike, none waits for a failed rank 0
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(f"{self.root / tag}: DeepSpeed cannot convert it for another number of ranks "
                                  f"({problem[0]}); resume on the number of ranks that wrote it")
        return out

    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write one complete checkpoint and point ``latest`` at it. Every rank must call this.

        Args:
            engine: The DeepSpeed engine.
            step: Optimizer steps done.
            meta: JSON-able run facts (``version`` is added).
            rank_state: This rank's loader and RNG state.

        Returns:
            The checkpoint directory.
        """
        tag = self.tag(step)
        tmp_tag = f".tmp-{tag}"
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, tmp_dir / f"trainer_rank{self.rank}.pt")
        _barrier()  # every rank's files are in tmp_dir
        if self.rank == 0:
            atomic_write_text(tmp_dir / "meta.json", json.dumps({**meta, "version": META_VERSION, "tag": tag}))
            if final_dir.exists():  # the same step saved again (e.g. the final save after a resume)
                old = self.root / f".tmp-old-{tag}"
                os.replace(final_dir, old)
                os.replace(tmp_dir, final_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp_dir, final_dir)
            atomic_write_text(self.root / "latest", tag)
            self._prune(keep_tag=tag)
        _barrier()
        log.info("checkpoint %s written", final_dir)
        return final_dir

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def read_rank_state(self, tag: str, rank: int | None = None) -> dict[str, Any]:
        """The loader / RNG state saved with ``tag`` by ``rank`` (default: this rank), read before the engine exists.

        Raises:
            CheckpointError: The checkpoint lacks that rank's file.
        """
        rank_file = self.root / tag / f"trainer_rank{self.rank if rank is None else rank}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file}: missing; the checkpoint was written by fewer ranks")
        try:  # tensors, numbers, strings and containers only: nothing in it can run code
            return torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise CheckpointError(f"{rank_file}: not a readable trainer state ({type(e).__name__})") from None

    def load(self, engine: Any, tag: str, universal: Path | None = None) -> None:
        """Load ``tag`` into ``engine``: model, optimizer and LR scheduler (from ``universal``: its
        :meth:`to_universal` form, which is removed afterwards).

        Raises:
            CheckpointError: DeepSpeed cannot read it.
        """
        path, _client = engine.load_checkpoint(
            str(universal or self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{self.root / tag}: DeepSpeed could not load this checkpoint")
        if universal is not None:
            _barrier()
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
