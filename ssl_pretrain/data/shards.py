"""Write preprocessed slices as WebDataset shards with a manifest.

The format (member names, dtypes, the ``meta.json`` schema, the manifest fields) is defined in
:mod:`ssl_pretrain.data.shardformat`; this module preprocesses subjects and fills the shards. With a
validation split (``val_fraction > 0``) the output holds ``train/`` and ``val/``, each a shard
directory, plus a top-level ``manifest.json`` naming the splits. No subject is in both.

Atomicity: everything is written into a temporary sibling directory ``.<out>.tmp-PID`` (each shard
as ``*.tmp`` then renamed, the manifest last) that replaces ``out_dir`` in one rename at the end, so
a failed or interrupted run never leaves a half-written or mixed shard directory. The temporaries
of killed runs (whose PID no longer exists) are removed by the next run, with a warning.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ssl_pretrain.data.ingest import Subject, split_ids
from ssl_pretrain.data.preprocess import MAX_VOXELS, InputError, PreprocessParams, first_file, preprocess
from ssl_pretrain.data.shardformat import (
    FORMAT,
    IMAGE,
    IMAGE_DTYPE,
    LABEL,
    LABEL_DTYPE,
    MANIFEST,
    META,
    META_FIELDS,
    VERSION,
    VOLUME_META_FIELDS,
    TarShardWriter,
    npy_bytes,
    read_manifest_file,
)
from ssl_pretrain.data.volumes import preprocess_volume
from ssl_pretrain.fileio import atomic_write_text

logger = logging.getLogger(__name__)


def _prepare(job: tuple[Subject, PreprocessParams, int]) -> tuple[str, Any]:
    """Worker: preprocess one subject; returns ("ok", payload) or ("skip", (path, reason))."""
    subject, params, max_voxels = job
    try:
        if params.volumetric:
            v = preprocess_volume(subject.image, params, subject.label, allowed_labels=subject.allowed_labels,
                                  max_voxels=max_voxels)
            return "ok", (v.image.astype(np.float16), v.label, v.spacing, v.geometry)
        vol = preprocess(subject.image, params, subject.label, allowed_labels=subject.allowed_labels,
                         max_voxels=max_voxels)
    except InputError as exc:
        return "skip", (str(first_file(subject.image)), str(exc))
    except Exception as exc:  # an unexpected failure of one volume must not lose the cohort
        return "skip", (str(first_file(subject.image)), f"{first_file(subject.image)}: {type(exc).__name__}: {exc}")
    return "ok", (vol.image.astype(np.float16), vol.label, vol.spacing)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker process; the pool provides the parallelism


def _results(jobs: list[tuple[Subject, PreprocessParams, int]], workers: int) -> Iterator[tuple[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_prepare, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        yield from pool.map(_prepare, jobs, chunksize=1)


def split_subjects(subjects: Sequence[Subject], val_fraction: float, seed: int) -> tuple[list[Subject], list[Subject]]:
    """Subject-level split by :func:`~ssl_pretrain.data.ingest.split_ids`: ``round(val_fraction * n)`` go to val.

    At least one subject goes to each side when ``0 < val_fraction < 1`` and there are ≥ 2 subjects.
    Both lists keep the order of ``subjects``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: {val_fraction!r} must be in [0, 1)")
    subjects = list(subjects)
    if val_fraction == 0.0 or not subjects:
        return subjects, []
    n_val = int(round(val_fraction * len(subjects)))
    n_val = min(max(n_val, 1), len(subjects) - 1) if len(subjects) >= 2 else 0
    val_ids, _ = split_ids([s.id for s in subjects], (n_val,), seed)
    return [s for s in subjects if s.id not in val_ids], [s for s in subjects if s.id in val_ids]


def _is_shard_dir(path: Path) -> bool:
    try:
        read_manifest_file(path / MANIFEST)
    except (OSError, ValueError):
        return False
    return True


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it whole")
    if not _is_shard_dir(out_dir):
        raise ValueError(f"{out_dir}: --overwrite refused: not a shard directory (no {FORMAT} manifest.json)")




def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove ``.<out>.tmp-PID`` directories that killed runs left beside ``out_dir`` (their PID is gone).

    A temporary of a process that still runs (e.g. a concurrent run) is left alone.
    """
    prefix = f".{out_dir.name}.tmp-"
    for tmp in sorted(out_dir.parent.glob(glob.escape(prefix) + "*")):
        pid = tmp.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("removed %s: partial shards of an interrupted run (process %s no longer exists)", tmp, pid)


def write_shards(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    params: PreprocessParams,
    *,
    samples_per_shard: int = 512,
    val_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 2,
    strict: bool = False,
    overwrite: bool = False,
    skipped: Sequence[tuple[str, str]] = (),
    mix_subjects: int = 8,
    label_names: dict[str, str] | None = None,
    progress: bool = True,
    max_voxels: int = MAX_VOXELS,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Preprocess ``subjects`` and write them as WebDataset shards plus ``manifest.json``.

    Args:
        subjects: from :func:`ssl_pretrain.data.ingest.discover`.
        out_dir: output shard directory (must not exist or be empty unless ``overwrite``).
        params: preprocessing parameters (recorded in the manifest and every ``meta.json``).
        samples_per_shard: slices per tar (default 512 ≈ 64 MB at 256×256, one channel).
        val_fraction: fraction of subjects written to ``val/`` (0 = one shard directory).
        seed: seed of the split and of the slice interleaving.
        workers: preprocessing processes (≤ 1 runs in this process).
        strict: any skipped input is an error and nothing is written.
        overwrite: replace an existing shard directory whole (never mixes old and new shards).
        skipped: inputs already skipped by discovery, as ``(path, reason)``, recorded too.
        mix_subjects: slices of this many consecutive subjects are interleaved in a seeded random
            order before writing (1 = subject order), so a shard mixes subjects.
        label_names: label value → name (e.g. MSD ``labels``), recorded in the manifest.
        progress: show a tqdm progress bar.
        max_voxels: largest volume a file may claim; a larger one is skipped before it is read.
        exclude: subject ids left out (evaluation subjects: :func:`~ssl_pretrain.data.ingest.read_exclusions`),
            listed in the manifest's ``excluded``.

    Returns:
        The manifest (the top-level one, with per-split manifests under ``"splits"``, when split).

    Raises:
        ValueError: bad arguments or ``out_dir`` exists (message says how to proceed).
        InputError: ``strict`` and at least one input was skipped, or no subject could be written.
    """
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: {samples_per_shard!r} must be a positive integer")
    if mix_subjects < 1:
        raise ValueError(f"mix_subjects: {mix_subjects!r} must be ≥ 1")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    excluded = sorted(s.id for s in subjects if s.id in exclude)
    subjects = [s for s in subjects if s.id not in exclude]
    if excluded:
        logger.info("left out %d excluded subject(s): %s", len(excluded), ", ".join(excluded[:8]))
    if not subjects and not skipped:
        raise InputError(f"{out_dir}: no input subjects to write")
    train, val = split_subjects(subjects, val_fraction, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp_root = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.mkdir()
    try:
        skips = [{"path": p, "reason": r} for p, r in skipped]
        splits = {"train": train, "val": val} if val else {"all": train}
        manifests: dict[str, dict[str, Any]] = {}
        split_of = {s.id: name for name, group in splits.items() for s in group}
        jobs = [(s, params, max_voxels) for name in splits for s in splits[name]]
        writers = {}
        for name in splits:
            d = tmp_root if name == "all" else tmp_root / name
            d.mkdir(exist_ok=True)
            kind = _VolumeWriter if params.volumetric else _SplitWriter
            writers[name] = kind(d, name, params, samples_per_shard, mix_subjects, seed, label_names)
        results = _results(jobs, workers)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="shards", unit="subject")
        for (subject, _, _), (status, payload) in zip(jobs, results, strict=True):
            if status == "skip":
                path, reason = payload
                logger.warning("skipped %s", reason)
                skips.append({"path": path, "reason": reason})
                continue
            problem = writers[split_of[subject.id]].add(subject, *payload)
            if problem:
                logger.warning("skipped %s", problem)
                skips.append({"path": str(first_file(subject.image)), "reason": problem})
        if strict and skips:
            raise InputError(f"{len(skips)} input(s) skipped and --strict is set; first: {skips[0]['reason']}")
        for name, w in writers.items():
            manifests[name] = w.finish(skips, excluded)
        if sum(m["num_samples"] for m in manifests.values()) == 0:
            raise InputError(f"{out_dir}: no subject could be written ({len(skips)} skipped)")
        if "all" in manifests:
            top = manifests["all"]
        else:
            top = {
                "format": FORMAT,
                "version": VERSION,
                **({"layout": "volume"} if params.volumetric else {}),
                "preprocess": params.to_dict(),
                "splits": {n: {"dir": n, "num_samples": m["num_samples"], "num_subjects": m["num_subjects"],
                               "subjects": [s["id"] for s in m["subjects"]]} for n, m in manifests.items()},
                "skipped": skips,
                "excluded": excluded,
            }
            atomic_write_text(tmp_root / MANIFEST, json.dumps(top, indent=1) + "\n")
        _commit(tmp_root, out_dir)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    if "splits" in top:
        return {**top, "splits": {n: {**top["splits"][n], "manifest": manifests[n]} for n in manifests}}
    return top


def _commit(tmp_root: Path, out_dir: Path) -> None:
    """Swap the finished temporary directory into place (old content removed only afterwards)."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp_root, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _SplitWriter:
    """Writes one split: interleaves slices of ``mix`` subjects, rolls shards, builds the manifest."""

    def __init__(self, out_dir: Path, split: str, params: PreprocessParams, samples_per_shard: int,
                 mix: int, seed: int, label_names: dict[str, str] | None) -> None:
        self.out_dir = out_dir
        self.split = split
        self.params = params
        self.params_dict = params.to_dict()
        self.writer = TarShardWriter(out_dir, samples_per_shard)
        self.mix = mix
        self.rng = random.Random(f"{seed}-{split}")
        self.label_names = label_names
        self.pending: list[tuple[Subject, np.ndarray, np.ndarray | None, tuple[float, float, float]]] = []
        self.subjects: list[dict[str, Any]] = []
        self.shape: tuple[int, ...] | None = None
        self.n_labeled = 0
        self.n_samples = 0

    def add(self, subject: Subject, image: np.ndarray, label: np.ndarray | None,
            spacing: tuple[float, float, float]) -> str | None:
        """Queue one preprocessed subject; returns a skip reason when it does not fit the split."""
        if self.shape is None:
            self.shape = tuple(image.shape[1:])
        elif tuple(image.shape[1:]) != self.shape:
            return (f"{first_file(subject.image)}: slices of shape {tuple(image.shape[1:])} (C, H, W) differ from the "
                    f"cohort's {self.shape}; select channels with --channels")
        self.pending.append((subject, image, label, spacing))
        if len(self.pending) >= self.mix:
            self._flush()
        return None

    def _flush(self) -> None:
        order = [(i, z) for i, (_, img, _, _) in enumerate(self.pending) for z in range(img.shape[0])]
        if self.mix > 1:
            self.rng.shuffle(order)
        shards_of: dict[int, set[str]] = {i: set() for i in range(len(self.pending))}
        for i, z in order:
            subject, image, label, spacing = self.pending[i]
            n = image.shape[0]
            meta = {
                "subject": subject.id,
                "slice": z,
                "num_slices": n,
                "position": z / (n - 1) if n > 1 else 0.5,
                "spacing": [round(float(s), 6) for s in spacing],
                "source": subject.source or str(first_file(subject.image)),
                "preprocess": self.params_dict,
            }
            members = [(IMAGE, npy_bytes(image[z]))]
            if label is not None:
                members.append((LABEL, npy_bytes(label[z])))
            members.append((META, json.dumps(meta, separators=(",", ":")).encode()))
            shards_of[i].add(self.writer.write(f"{subject.id}_{z:04d}", members))
            self.n_samples += 1
        for i, (subject, image, label, spacing) in enumerate(self.pending):
            self.n_labeled += label is not None
            self.subjects.append({
                "id": subject.id,
                "source": subject.source or str(first_file(subject.image)),
                "label": label is not None,
                "slices": int(image.shape[0]),
                "spacing": [round(float(s), 6) for s in spacing],
                "shards": sorted(shards_of[i]),
            })
        self.pending = []

    def finish(self, skipped: list[dict[str, str]], excluded: list[str]) -> dict[str, Any]:
        """Flush, close the last shard and write ``manifest.json`` (last)."""
        self._flush()
        c, h, w = self.shape if self.shape is not None else (0, *self.params.size)
        return self._write_manifest({}, [c, h, w], [h, w], META_FIELDS, {"size": [h, w]}, skipped, excluded)

    def _write_manifest(self, head: dict[str, Any], image_shape: list[Any], label_shape: list[Any],
                        meta_fields: Sequence[str], grid: dict[str, Any], skipped: list[dict[str, str]],
                        excluded: list[str]) -> dict[str, Any]:
        """Close the last shard and write the split's ``manifest.json`` (the one field order of both layouts)."""
        shards = self.writer.finish()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **head,
            "split": self.split,
            "preprocess": self.params_dict,
            "sample": {
                IMAGE: {"dtype": IMAGE_DTYPE, "shape": image_shape},
                LABEL: {"dtype": LABEL_DTYPE, "shape": label_shape} if self.n_labeled else None,
                META: list(meta_fields),
            },
            "channels": image_shape[0],
            **grid,
            "has_labels": bool(self.subjects) and self.n_labeled == len(self.subjects),
            "label_names": self.label_names,
            "num_samples": self.n_samples,
            "num_subjects": len(self.subjects),
            "shards": shards,
            "subjects": self.subjects,
            "skipped": skipped,
            "excluded": excluded,
        }
        atomic_write_text(self.out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest


class _VolumeWriter(_SplitWriter):
    """Writes one split of volumes: one sample per subject (``layout: volume`` in the manifest).

    Volumes of ``mix`` consecutive subjects are written in a seeded random order. Shapes differ
    between subjects (each is cropped to its own non-zero box), so the manifest gives ``null`` for
    the spatial sizes and each ``meta.json`` the sample's ``shape``, ``spacing`` and ``crop_box``.
    """

    def add(self, subject: Subject, image: np.ndarray, label: np.ndarray | None,  # type: ignore[override]
            spacing: tuple[float, float, float], geometry: dict[str, Any]) -> str | None:
        """Queue one preprocessed volume; returns a skip reason when its channels differ from the split's."""
        if self.shape is None:
            self.shape = (image.shape[0],)
        elif image.shape[0] != self.shape[0]:
            return (f"{first_file(subject.image)}: {image.shape[0]} channel(s) differ from the cohort's "
                    f"{self.shape[0]}; select channels with --channels")
        self.pending.append((subject, image, label, spacing, geometry))
        if len(self.pending) >= self.mix:
            self._flush()
        return None

    def _flush(self) -> None:
        order = list(range(len(self.pending)))
        if self.mix > 1:
            self.rng.shuffle(order)
        for i in order:
            subject, image, label, spacing, geometry = self.pending[i]
            meta = {
                "subject": subject.id,
                "shape": list(image.shape[1:]),
                "spacing": [round(float(s), 6) for s in spacing],
                "crop_box": geometry["crop_box"],
                "source": subject.source or str(first_file(subject.image)),
                "preprocess": self.params_dict,
            }
            members = [(IMAGE, npy_bytes(image))]
            if label is not None:
                members.append((LABEL, npy_bytes(label)))
            members.append((META, json.dumps(meta, separators=(",", ":")).encode()))
            shard = self.writer.write(subject.id, members)
            self.n_samples += 1
            self.n_labeled += label is not None
            self.subjects.append({
                "id": subject.id,
                "source": meta["source"],
                "label": label is not None,
                "shape": meta["shape"],
                "spacing": meta["spacing"],
                "crop_box": meta["crop_box"],
                "shards": [shard],
            })
        self.pending = []

    def finish(self, skipped: list[dict[str, str]], excluded: list[str]) -> dict[str, Any]:
        """Flush, close the last shard and write ``manifest.json`` (last)."""
        self._flush()
        c = self.shape[0] if self.shape is not None else 0
        return self._write_manifest({"layout": "volume"}, [c, None, None, None], [None, None, None],
                                    VOLUME_META_FIELDS, {"spacing": list(self.params.spacing)}, skipped, excluded)
