"""Streaming loader over WebDataset shards: node/worker split, seeded shuffle, fast decode, resume.

The pipeline of one DataLoader worker is a ``wds.DataPipeline`` of four stages::

    shard plan  →  tar reader  →  seeded shuffle buffer  →  batcher
    (per round)    (fast, raw)    (flushed per round)       (tensors, padding)

* **Splitting.** Shards are split explicitly by node (``rank::world_size``) and then by worker
  (``worker::num_workers``), the same slicing as ``wds.split_by_node`` / ``wds.split_by_worker``
  but with the rank given by the caller instead of read from the environment.
* **Modes.** ``resampled`` (pretraining): an infinite stream of *rounds*; round ``r`` of a worker
  draws shards with replacement from its own node × worker split of the shards (all shards when
  there are fewer shards than ranks) with a seed of (seed, rank, worker, r).
  ``epoch`` (evaluation): one round per epoch, shards permuted by (seed, epoch) identically on
  every rank, so every sample is delivered exactly once across ranks × workers.
* **Equal batch counts.** In epoch mode each worker's sample count is known from the manifest,
  so every rank computes the same plan: a worker yields ``ceil(n / batch_size)`` real batches
  (the last one may be short) plus *padding batches* (zeros, ``valid`` all False) so that every
  rank yields the same number of batches (``len(loader)``) and collectives never hang. Every
  batch carries ``valid`` (bool ``(B,)``); only padding batches have False entries.
* **Fast decode.** The tar stream is parsed directly (512-byte headers, no ``tarfile``; the reader
  and the format live in :mod:`ssl_pretrain.data.shardformat`), the ``.npy`` header is checked
  against the expected header bytes once per sample and the float16 payloads are converted into
  the float32 batch by one vectorised copy per slice.
* **Resume.** The stream is a pure function of (seed, rank, worker, round). The state is
  (epoch, batches consumed); torch's DataLoader hands out worker batches round-robin (skipping
  exhausted workers), so on restore each worker knows how many of its batches were consumed and
  fast-forwards: whole rounds are skipped from the manifest's counts without reading, the rest of
  the current round is read and shuffled but not decoded. Same config → same next batches. The
  arithmetic is in :mod:`ssl_pretrain.data.epochs`.
* **Corruption.** Each shard is checked against its manifest entry when opened (``verify``: size,
  and by default sha256, hashed once per stream and file). A mismatch, a truncated tar or a
  corrupt member raises ``CorruptShardError`` naming the shard (and member); with
  ``skip_corrupt`` the shard's remainder (or the bad sample) is skipped, logged and counted in
  ``loader.corrupt_skipped``, and a resampled stream whose shards all give no sample stops with
  one ``CorruptShardError`` instead of redrawing them forever.

Example:
    >>> loader = build_pretrain_loader(LoaderConfig(shards="data/shards"), rank=0, world_size=1)  # doctest: +SKIP
    >>> batch = next(iter(loader)); batch["image"].shape  # (B, C, H, W) float32  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_pretrain.config import option, validate
from ssl_pretrain.data.epochs import EpochDone, buffer_shuffle, consumed, epoch_plan, resume_position, shuffle_seed
from ssl_pretrain.data.shardformat import (
    CorruptShardError,
    NpySpec,
    check_meta,
    is_local,
    iter_tar_members,
    open_verified,
    read_manifest,
    read_manifest_file,
    split_name,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class LoaderConfig:
    """Streaming loader settings (the ``data:`` section of the pretraining config)."""

    shards: str = option("", "shard directory, brace pattern, or pipe: URL(s)")
    batch_size: int = option(32, "per-rank micro batch", ge=1)
    num_workers: int = option(2, "DataLoader worker processes (0 = in-process)", ge=0)
    shuffle_buffer: int = option(1000, "sample shuffle buffer per worker (≤1: off)", ge=0)
    mode: Literal["resampled", "epoch"] = option(
        "resampled", "resampled: infinite stream; epoch: each sample once per epoch"
    )
    skip_corrupt: bool = option(False, "skip and count corrupt shards/samples")
    verify: Literal["none", "size", "sha256"] = option(
        "sha256", "check each shard against the manifest when opened: none, size (cheap) or size and sha256"
    )
    seed: int = option(0, "seed of shard order and sample shuffle", ge=0)
    split: str = option("train", "split to read when shards has train/ and val/")
    manifest: str = option("", "manifest.json for URL patterns (default: beside them)")
    labels: bool = option(True, "deliver 'label' when every sample has one")
    prefetch_factor: int = option(2, "batches prefetched per worker", ge=1)
    pin_memory: bool = option(False, "pin batches (GPU hosts)")
    patch_size: tuple[int, ...] = option(
        (64, 64, 64), "3D shards: patch (D, H, W) cut from each volume (padded where the volume is smaller)",
        ge=1, length=3,
    )
    patches_per_volume: int = option(2, "3D shards: random patches cut from each volume read", ge=1)
    foreground_fraction: float = option(
        0.0, "3D shards with labels: share of patches centred on a random foreground voxel (nnU-Net: 0.33)",
        ge=0, le=1,
    )



# ----------------------------------------------------------------------------------------------
# the per-worker stream
# ----------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """One undecoded sample."""

    key: str
    image: memoryview  # array bytes, .npy header stripped
    meta: dict
    label: memoryview | None
    url: str
    shape: tuple[int, ...] | None = None  # volumes: the image's (C, D, H, W); slices: the manifest's
    index: int = 0  # position in its shard (corrupt samples counted)


@dataclass
class _Patch:
    """One patch of a volume: where it starts (may be negative or run past the end: padded)."""

    volume: _Raw
    origin: tuple[int, int, int]


def _overlap(size: tuple[int, ...], origin: tuple[int, ...], patch: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """``(source slices in the volume, destination slices in the patch)`` of a patch at ``origin``."""
    src, dst = [], []
    for n, o, p in zip(size, origin, patch, strict=True):
        lo, hi = max(0, o), min(n, o + p)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - o, lo - o + max(0, hi - lo)))
    return tuple(src), tuple(dst)


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor, allocated where handing it on is cheapest.

    In a DataLoader worker it is allocated straight in shared memory, as torch's own
    ``default_collate`` does, so passing it to the main process copies nothing (otherwise the
    batch would be copied into shared memory on the way out). In-process it comes from numpy's
    allocator: a fresh multi-MB torch allocation page-faults on every batch here, while malloc
    reuses numpy's freed blocks.
    """
    if get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
        return proto.new(storage).view(shape)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


class _SliceStream(IterableDataset):
    """The IterableDataset every DataLoader worker runs (see the module docstring)."""

    def __init__(self, urls: list[str], counts: list[int] | None, entries: dict[str, dict[str, Any]],
                 image: NpySpec, label: NpySpec | None, cfg: LoaderConfig, rank: int, world_size: int,
                 epoch: int, start: int, done: EpochDone | None = None, generation: int = 0) -> None:
        super().__init__()
        self.done = done  # epoch mode: samples of this epoch an earlier job shape consumed (not delivered)
        # after a change of job shape a resampled stream starts anew: generation g > 0 tags its seeds
        self.seed: int | str = cfg.seed if generation == 0 else f"{cfg.seed}g{generation}"
        self.urls, self.counts, self.entries = urls, counts, entries
        self._shard_of = {u: i for i, u in enumerate(urls)}
        self.image, self.label = image, label
        self.volumes = None in image.shape  # 3D shards: one volume per sample, cut into patches
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = epoch, start

    def _worker(self) -> tuple[int, int]:
        """(logical worker id, number of workers); logical ids are rotated so a resumed DataLoader,
        whose round-robin starts at its worker 0, continues the interrupted order."""
        info = get_worker_info()
        n_workers = 1 if info is None else info.num_workers
        phys = 0 if info is None else info.id
        return (phys + self._rotation) % n_workers, n_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        n_workers = max(1, get_worker_info().num_workers if get_worker_info() is not None else 1)
        planned = None
        if cfg.mode == "epoch":
            assert self.counts is not None  # checked in PretrainLoader
            shard_plan, batch_plan = epoch_plan(self.counts, self.epoch, cfg.seed, self.world_size,
                                                n_workers, cfg.batch_size, self.done)
            planned = batch_plan[self.rank]
        taken, self._rotation = resume_position(self.start, planned, n_workers)
        worker, _ = self._worker()
        if cfg.mode == "epoch":
            self._my_shards = shard_plan[self.rank][worker]
        self._planned = None if planned is None else planned[worker]
        self._skip_batches = taken[worker]
        self._corrupt = 0
        self._verified: set[tuple[Any, ...]] = set()  # local shards hashed by this stream (open_verified)
        self._first_round, self._skip_samples = self._resume_point(
            taken[worker] * cfg.batch_size, worker, n_workers
        )
        stages = [self._rounds, self._read, self._patches, self._shuffle, self._batch]
        return iter(wds.DataPipeline(*(st for st in stages if self.volumes or st != self._patches)))

    def _resample_pool(self, worker: int, n_workers: int) -> list[int]:
        """Shards this rank × worker draws from in resampled mode: its own split of the shard list.

        Split by node, then by worker (as in epoch mode), so nodes read disjoint shards; a level
        with fewer shards than splits shares its whole list instead (see ``PretrainLoader``).
        """
        pool = list(range(len(self.urls)))
        if len(pool) >= self.world_size:
            pool = pool[self.rank :: self.world_size]
        if len(pool) >= n_workers:
            pool = pool[worker::n_workers]
        return pool

    def _round_shards(self, r: int, worker: int, n_workers: int) -> list[int]:
        """Shards of round ``r`` of this worker (resampled mode: drawn with replacement from its split)."""
        pool = self._resample_pool(worker, n_workers)
        rng = random.Random(f"{self.seed}-resampled-{self.rank}-{worker}-{r}")
        return rng.choices(pool, k=len(pool))

    def _resume_point(self, to_skip: int, worker: int, n_workers: int) -> tuple[int, int]:
        """(first round to read, samples to drop from it): whole consumed rounds are not read at all.

        Rounds are skipped by the manifest's sample counts, which are exact unless corrupt
        samples are being skipped; then every round is replayed instead.
        """
        if self.cfg.mode == "epoch" or self.counts is None or self.cfg.skip_corrupt:
            return 0, to_skip
        r = 0
        while to_skip > 0:
            n = sum(self.counts[i] for i in self._round_shards(r, worker, n_workers))
            if n > to_skip:
                break
            to_skip -= n
            r += 1
        return r, to_skip

    # stage 1: shard plan, as (round, shard index) items
    def _rounds(self) -> Iterator[tuple[int, int]]:
        if self.cfg.mode == "epoch":
            for i in self._my_shards:
                yield 0, i
            return
        worker, n_workers = self._worker()
        r = self._first_round
        while True:
            for i in self._round_shards(r, worker, n_workers):
                yield r, i
            r += 1

    # stage 2: tar reader → raw samples, tagged with their round (slices an earlier job shape consumed: left out)
    def _read(self, shards: Iterable[tuple[int, int]]) -> Iterator[tuple[int, _Raw]]:
        worker, n_workers = self._worker()
        pool = {self.urls[i] for i in self._resample_pool(worker, n_workers)}
        dead: set[str] = set()  # shards read since the last good sample that gave none
        for r, i in shards:
            url = self.urls[i]
            done = self.done.of_shard(i) if self.done is not None and not self.volumes else None
            good = False
            try:
                for s in self._read_shard(url):
                    good = True
                    if done is None or s.index >= done.size or not done[s.index]:  # (a shard longer than listed)
                        yield r, s
            except CorruptShardError as exc:
                if not self.cfg.skip_corrupt:
                    raise
                self._corrupt += 1
                logger.warning("skipping the rest of a shard: %s", exc)
            if good:
                dead.clear()
                continue
            dead.add(url)
            if self.cfg.mode == "resampled" and dead >= pool:  # redrawing them would spin forever
                raise CorruptShardError(
                    f"data.skip_corrupt: none of the {len(pool)} shard(s) of rank {self.rank} worker {worker} "
                    f"gave a readable sample (e.g. {url}); see the warnings above"
                )

    def _read_shard(self, url: str) -> Iterator[_Raw]:
        stream = open_verified(url, self.entries.get(url), self.cfg.verify, self._verified, populate=not self.volumes)
        try:
            key, parts, index = None, {}, -1
            for name, data in iter_tar_members(stream, url):
                k, ext = split_name(name)
                if k != key:
                    if key is not None:
                        sample = self._make(key, parts, url, index)
                        if sample is not None:
                            yield sample
                    key, parts, index = k, {}, index + 1
                parts[ext] = data
            if key is not None:
                sample = self._make(key, parts, url, index)
                if sample is not None:
                    yield sample
        except OSError as exc:
            raise CorruptShardError(f"{url}: cannot read shard ({exc})") from None
        finally:
            # a memory map stays open while shuffled samples still view it; it closes when freed
            if not isinstance(stream, (bytes, mmap.mmap)):
                stream.close()

    def _make(self, key: str, parts: dict[str, bytes | memoryview], url: str, index: int) -> _Raw | None:
        try:
            img = parts.get("image.npy")
            meta_b = parts.get("meta.json")
            if img is None or meta_b is None:
                raise CorruptShardError(f"{url}: sample {key} lacks image.npy or meta.json")
            shape, img = self.image.payload_shape(img, url, f"{key}.image.npy")
            lab = parts.get("label.npy") if self.label is not None else None
            if self.label is not None:
                if lab is None:
                    raise CorruptShardError(f"{url}: sample {key} lacks label.npy")
                lab_shape, lab = self.label.payload_shape(lab, url, f"{key}.label.npy")
                if lab_shape != shape[1:]:
                    raise CorruptShardError(f"{url}: {key}.label.npy has shape {lab_shape}, its image {shape}")
            try:
                meta = json.loads(bytes(meta_b))
                check_meta(meta, self.volumes)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise CorruptShardError(f"{url}: corrupt {key}.meta.json ({exc})") from None
        except CorruptShardError as exc:
            if not self.cfg.skip_corrupt:
                raise
            self._corrupt += 1
            logger.warning("skipping a corrupt sample: %s", exc)
            return None
        return _Raw(key, img, meta, lab, url, shape, index)

    # stage 2b (volumes): each volume becomes patches_per_volume patches, drawn by a per-round generator
    # (patches an earlier job shape consumed are left out)
    def _patches(self, volumes: Iterable[tuple[int, _Raw]]) -> Iterator[tuple[int, _Patch]]:
        worker, _ = self._worker()
        cur, rng = None, random.Random()
        n = self.cfg.patches_per_volume
        for r, v in volumes:
            if r != cur:
                cur = r
                rng = random.Random(f"{self.seed}-patch-{self.rank}-{worker}-{self.epoch}-{r}")
            done = None
            if self.done is not None:
                done = self.done.of_shard(self._shard_of[v.url])[v.index * n : (v.index + 1) * n]
            foreground: list[np.ndarray] = []  # this volume's foreground voxels, found once, on first need
            for k in range(n):
                if done is None or k >= done.size or not done[k]:
                    yield r, _Patch(v, self._origin(v, rng, foreground))

    def _origin(self, v: _Raw, rng: random.Random, foreground: list[np.ndarray]) -> tuple[int, int, int]:
        """A random patch origin: uniform over the volume (a smaller volume is padded at a random side),
        or with probability ``foreground_fraction`` (and labels) centred on a random foreground voxel.
        ``foreground`` caches the volume's foreground voxel indices across its patches."""
        assert v.shape is not None
        size, patch = v.shape[1:], self.cfg.patch_size
        centre = None
        if v.label is not None and rng.random() < self.cfg.foreground_fraction:
            if not foreground:
                foreground.append(np.flatnonzero(np.frombuffer(v.label, dtype=np.uint8)))
            fg = foreground[0]
            if fg.size:
                centre = np.unravel_index(int(fg[rng.randrange(fg.size)]), size)
        if centre is not None:
            return tuple(int(c) - p // 2 for c, p in zip(centre, patch, strict=True))  # type: ignore[return-value]
        lows = [min(0, n - p) for n, p in zip(size, patch, strict=True)]
        highs = [max(0, n - p) for n, p in zip(size, patch, strict=True)]
        return tuple(rng.randint(lo, hi) for lo, hi in zip(lows, highs, strict=True))  # type: ignore[return-value]

    # stage 3: seeded shuffle buffer, flushed at the end of each round (so rounds are independent)
    def _shuffle(self, samples: Iterable[tuple[int, _Raw]]) -> Iterator[_Raw]:
        worker, _ = self._worker()
        return buffer_shuffle(samples, self.cfg.shuffle_buffer, shuffle_seed(self.seed, self.rank, worker, self.epoch))

    # stage 4: batches of tensors; skipped batches (resume) are consumed without decoding
    def _batch(self, samples: Iterable[Any]) -> Iterator[dict[str, Any]]:
        bsz = self.cfg.batch_size
        it = iter(samples)
        for _ in range(self._skip_samples):  # resume: replay without decoding
            if next(it, None) is None:
                break
        made = self._skip_batches
        chunk: list[Any] = []
        reported = self._corrupt  # corrupt items met while replaying were counted before the resume
        for s in it:
            chunk.append(s)
            if len(chunk) == bsz:
                yield self._collate(chunk, self._corrupt - reported)
                reported = self._corrupt
                chunk = []
                made += 1
                if self._planned is not None and made >= self._planned:
                    return
        if chunk and (self._planned is None or made < self._planned):
            yield self._collate(chunk, self._corrupt - reported)
            reported = self._corrupt
            made += 1
        while self._planned is not None and made < self._planned:  # padding batches (epoch mode)
            yield self._padding(self._corrupt - reported)
            reported = self._corrupt
            made += 1

    def _collate(self, chunk: list[Any], corrupt: int) -> dict[str, Any]:
        if self.volumes:
            return self._collate_patches(chunk, corrupt)
        n = len(chunk)
        c, h, w = self.image.shape
        # float16 payloads are converted straight from the (memory-mapped) tar into the float32
        # batch by torch, one vectorised copy per slice; numpy's float16 → float32 cast is ~5x slower.
        image = _new_batch((n, c, h, w), torch.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for i, s in enumerate(chunk):
                src = np.frombuffer(s.image, dtype=np.float16).reshape(c, h, w)
                image[i].copy_(torch.from_numpy(src))  # read-only source: torch only reads it
        batch: dict[str, Any] = {
            "image": image,
            "position": torch.tensor([s.meta["position"] for s in chunk], dtype=torch.float32),
            "subject": [s.meta["subject"] for s in chunk],
            "slice": torch.tensor([s.meta["slice"] for s in chunk], dtype=torch.int64),
            "valid": torch.ones(n, dtype=torch.bool),
            "corrupt": corrupt,
        }
        if self.label is not None and self.cfg.labels:
            label = _new_batch((n, h, w), torch.uint8)
            label_np = label.numpy()
            for i, s in enumerate(chunk):
                label_np[i] = np.frombuffer(s.label, dtype=np.uint8).reshape(h, w)  # type: ignore[arg-type]
            batch["label"] = label
        return batch

    def _collate_patches(self, chunk: list[_Patch], corrupt: int) -> dict[str, Any]:
        n, c = len(chunk), self.image.shape[0]
        patch = tuple(self.cfg.patch_size)
        image = _new_batch((n, c, *patch), torch.float32)
        labels = self.label is not None and self.cfg.labels
        label = _new_batch((n, *patch), torch.uint8) if labels else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for i, p in enumerate(chunk):
                v = p.volume
                assert v.shape is not None
                # torch converts the float16 view straight into the float32 batch (numpy's cast is ~5x slower)
                vol = torch.from_numpy(np.frombuffer(v.image, dtype=np.float16).reshape(v.shape))
                src, dst = _overlap(v.shape[1:], p.origin, patch)
                inner = vol[(slice(None), *src)]
                if inner.shape[1:] != patch:  # padded: the background is the patch's own minimum
                    image[i] = inner.amin(dim=(1, 2, 3)).float().view(c, 1, 1, 1)
                image[i][(slice(None), *dst)] = inner
                if label is not None:
                    lab = torch.from_numpy(np.frombuffer(v.label, dtype=np.uint8).reshape(v.shape[1:]))  # type: ignore[arg-type]
                    if lab[src].shape != patch:
                        label[i].zero_()
                    label[i][dst] = lab[src]
        batch: dict[str, Any] = {
            "image": image,
            "subject": [p.volume.meta["subject"] for p in chunk],
            "origin": torch.tensor([p.origin for p in chunk], dtype=torch.int64),
            "spacing": torch.tensor([p.volume.meta["spacing"] for p in chunk], dtype=torch.float32),
            "valid": torch.ones(n, dtype=torch.bool),
            "corrupt": corrupt,
        }
        if label is not None:
            batch["label"] = label
        return batch

    def _padding(self, corrupt: int) -> dict[str, Any]:
        bsz = self.cfg.batch_size
        if self.volumes:
            patch = tuple(self.cfg.patch_size)
            batch = {"image": torch.zeros((bsz, self.image.shape[0], *patch)), "subject": [""] * bsz,
                     "origin": torch.zeros((bsz, 3), dtype=torch.int64), "spacing": torch.ones((bsz, 3)),
                     "valid": torch.zeros(bsz, dtype=torch.bool),
                     "corrupt": corrupt}
            if self.label is not None and self.cfg.labels:
                batch["label"] = torch.zeros((bsz, *patch), dtype=torch.uint8)
            return batch
        c, h, w = self.image.shape
        batch: dict[str, Any] = {
            "image": torch.zeros((bsz, c, h, w), dtype=torch.float32),
            "position": torch.zeros(bsz, dtype=torch.float32),
            "subject": [""] * bsz,
            "slice": torch.full((bsz,), -1, dtype=torch.int64),
            "valid": torch.zeros(bsz, dtype=torch.bool),
            "corrupt": corrupt,
        }
        if self.label is not None and self.cfg.labels:
            batch["label"] = torch.zeros((bsz, h, w), dtype=torch.uint8)
        return batch


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------


def resolve_shards(cfg: LoaderConfig) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs and manifest (``None`` when there is none) for ``cfg.shards``.

    Raises:
        ValueError: empty or missing shard location, or an unreadable manifest.
    """
    spec = cfg.shards.strip()
    if not spec:
        raise ValueError("data.shards: empty; give a shard directory, a brace pattern or pipe: URL(s)")
    if is_local(spec) and Path(spec).is_dir():
        shard_dir, manifest = read_manifest(spec, cfg.split)
        urls = [str(shard_dir / s["name"]) for s in manifest["shards"] if s["samples"] > 0]
        if not urls:
            raise ValueError(f"data.shards: {shard_dir} holds no samples")
        return urls, manifest
    urls = list(wds.shardlists.expand_urls(spec))
    if not urls:
        raise ValueError(f"data.shards: {spec!r} expands to no URLs")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise ValueError(f"data.shards: {missing[0]} not found ({len(missing)} of {len(urls)} shards missing)")
    mpath = cfg.manifest or (str(Path(local[0]).parent / "manifest.json") if local else "")
    manifest = None
    if mpath:
        try:
            manifest = read_manifest_file(mpath)
        except FileNotFoundError:
            if cfg.manifest:
                raise ValueError(f"data.manifest: {mpath} not found") from None
        except ValueError as exc:
            raise ValueError(f"data.manifest: {exc}") from None
    return urls, manifest


def _shard_name(url: str) -> str:
    m = re.search(r"([^/\s]+\.tar)", url)
    return m.group(1) if m else url


class PretrainLoader:
    """Iterable over batches for one rank; resumable via :meth:`state_dict` / :meth:`load_state_dict`.

    Yields dicts: ``image`` float32 ``(B, C, H, W)``, ``position`` float32 ``(B,)`` (relative slice
    position 0..1), ``subject`` list[str], ``slice`` int64 ``(B,)``, ``valid`` bool ``(B,)`` (False
    only in epoch-mode padding batches) and ``label`` uint8 ``(B, H, W)`` when every sample has one.

    Args:
        cfg: loader settings.
        rank: this process's rank.
        world_size: number of ranks.

    Attributes:
        manifest: the shard manifest (preprocessing, channels, size, shards, subjects).
        corrupt_skipped: corrupt shards/samples skipped so far (``skip_corrupt``).
    """

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        validate(cfg, "data.")  # a config built in code has not been through the config loader
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.urls, manifest = resolve_shards(cfg)
        self.counts: list[int] | None = None
        self._entries: dict[str, dict[str, Any]] = {}  # url → its manifest entry (samples, bytes, sha256)
        if manifest is not None:
            by_name = {s["name"]: s for s in manifest.get("shards", [])}
            names = [_shard_name(u) for u in self.urls]
            if all(n in by_name for n in names):
                self.counts = [by_name[n]["samples"] for n in names]
            self._entries = {u: by_name[n] for u, n in zip(self.urls, names, strict=True) if n in by_name}
        if cfg.mode == "epoch" and self.counts is None:
            raise ValueError(f"data.mode: 'epoch' needs per-shard sample counts from a manifest; none found for "
                             f"{cfg.shards!r} (set data.manifest)")
        if manifest is None:
            raise ValueError(f"data.shards: no manifest.json found for {cfg.shards!r} (set data.manifest)")
        self.manifest: dict[str, Any] = manifest
        self.volumes = manifest.get("layout") == "volume"
        if self.volumes and self.counts is not None:  # the stream's samples are patches
            self.counts = [n * cfg.patches_per_volume for n in self.counts]
        spec = manifest["sample"]
        self._image = NpySpec(tuple(spec["image.npy"]["shape"]), spec["image.npy"]["dtype"])
        lab = spec.get("label.npy")
        self._label = NpySpec(tuple(lab["shape"]), lab["dtype"]) if lab and manifest.get("has_labels") else None
        unchecked = len(self.urls) - len(self._entries)
        if cfg.verify != "none" and unchecked:
            logger.warning("data.verify=%s: %d of %d shards are not listed in the manifest and are read unchecked",
                           cfg.verify, unchecked, len(self.urls))
        self.num_workers = max(1, cfg.num_workers)
        if cfg.mode == "resampled" and len(self.urls) < world_size * self.num_workers:
            logger.warning("data.shards: %d shards for %d ranks x %d workers; ranks or workers that cannot get shards "
                        "of their own sample from a shared list (write more, smaller shards: --samples-per-shard)",
                        len(self.urls), world_size, self.num_workers)
        self.epoch = 0
        self.batches = 0
        self.corrupt_skipped = 0
        self.done: EpochDone | None = None  # epoch mode, after a change of job shape: consumed samples of this epoch
        self.generation = 0  # resampled mode: how often the job shape changed

    @property
    def has_labels(self) -> bool:
        """Whether batches carry ``label``."""
        return self._label is not None and self.cfg.labels

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank); epoch mode only."""
        if self.cfg.mode != "epoch":
            raise TypeError("len(): a resampled loader is infinite")
        assert self.counts is not None
        _, batches = epoch_plan(self.counts, self.epoch, self.cfg.seed, self.world_size, self.num_workers,
                                self.cfg.batch_size, self.done)
        return sum(batches[self.rank])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Continue from the current state: rest of the epoch (epoch mode) or forever (resampled)."""
        cfg = self.cfg
        ds = _SliceStream(self.urls, self.counts, self._entries, self._image, self._label, cfg, self.rank,
                          self.world_size, self.epoch, self.batches, self.done, self.generation)
        kw: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kw = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": False}
        dl = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, **kw)
        for batch in dl:
            self.corrupt_skipped += int(batch.pop("corrupt"))
            self.batches += 1
            yield batch
        if cfg.mode == "epoch":
            self.epoch += 1
            self.batches = 0
            self.done = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of the stream (save it with the model checkpoint)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self.batches,
            "corrupt_skipped": self.corrupt_skipped,
            "done": None if self.done is None else self.done.encode(),
            "generation": self.generation,
            **self._shape(),
            **self._identity(),
        }

    def _shape(self) -> dict[str, int]:
        """The job shape the position is counted in: another one is mapped over (:meth:`load_state_dict`)."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.cfg.batch_size}

    def _identity(self) -> dict[str, Any]:
        patches = {"patch_size": list(self.cfg.patch_size), "patches_per_volume": self.cfg.patches_per_volume,
                   "foreground_fraction": self.cfg.foreground_fraction} if self.volumes else {}
        return {
            **patches,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "num_shards": len(self.urls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` by a loader of any rank of the job.

        The same job shape (world size, workers, batch size): the next batches are those that followed.
        Another shape (a resume on fewer or more ranks): in epoch mode the samples of the current
        epoch that the old job consumed are replayed from the counts (:func:`consumed`) and left out,
        so the epoch ends without repeating or skipping a sample; a resampled stream starts anew
        (a new generation of its seeds).

        Raises:
            ValueError: the state comes from an incompatible loader (names the differing key).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: expected version {STATE_VERSION}, got {state!r:.80}")
        for key, now in self._identity().items():
            if state.get(key) != now:
                raise ValueError(f"loader state: {key}={state.get(key)!r} in the checkpoint but {now!r} now; "
                                 f"a resume needs the same {key}")
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.generation = int(state.get("generation", 0))
        assert self.counts is not None or self.cfg.mode == "resampled"  # epoch mode needs counts (__init__)
        done = state.get("done")
        self.done = None if done is None or self.counts is None else EpochDone.decode(self.counts, done)
        old = {k: state.get(k) for k in self._shape()}
        if old == self._shape():
            return
        self.batches = 0
        if self.cfg.mode == "resampled":
            self.generation += 1
            logger.info("loader: resumed on %s (was %s): the resampled stream starts anew (generation %d)",
                        self._shape(), old, self.generation)
            return
        assert self.counts is not None
        done_now = consumed(self.done or EpochDone(self.counts), self.counts, self.epoch, self.cfg.seed,
                            int(old["world_size"]), int(old["num_workers"]), int(old["batch_size"]),
                            self.cfg.shuffle_buffer, int(state["batches"]))
        self.done = done_now
        if done_now.bits.all():
            self.epoch, self.done = self.epoch + 1, None
        logger.info("loader: resumed on %s (was %s): %d of %d samples of epoch %d were delivered; the rest follows",
                    self._shape(), old, int(done_now.bits.sum()), done_now.bits.size, int(state["epoch"]))


def build_pretrain_loader(cfg: LoaderConfig, rank: int, world_size: int) -> PretrainLoader:
    """Build the streaming loader of one rank (see :class:`PretrainLoader`)."""
    return PretrainLoader(cfg, rank, world_size)
