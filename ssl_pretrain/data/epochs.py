"""Epoch and resume arithmetic of the streaming loader: pure functions of the manifest's counts.

:func:`epoch_plan` splits the shards of one epoch over ranks × workers and pads every rank to the
same number of batches; :func:`resume_position` says where each DataLoader worker stands after
the loader yielded ``n`` batches, so a resumed loader continues the same order;
:func:`buffer_shuffle` is the workers' seeded shuffle. With them :func:`consumed` replays, from
the counts alone, which samples of an epoch a job of one shape (ranks × workers × batch) has
consumed — what a job of another shape must not deliver again (:class:`EpochDone`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

__all__ = ["EpochDone", "buffer_shuffle", "consumed", "epoch_plan", "resume_position", "shuffle_seed"]

T = TypeVar("T")


class EpochDone:
    """The samples of the current epoch that an earlier job shape consumed: one bit per stream item.

    Items are numbered shard by shard in manifest order, in each shard in stream order (slices;
    for volumes, ``volume × patches_per_volume + patch``).

    Args:
        counts: Items per shard.
        bits: The consumed flags (``sum(counts)`` bools); default none consumed.
    """

    def __init__(self, counts: list[int], bits: np.ndarray | None = None) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.bits = np.zeros(int(self.offsets[-1]), dtype=bool) if bits is None else bits

    def of_shard(self, shard: int) -> np.ndarray:
        """The consumed flags of one shard's items."""
        return self.bits[self.offsets[shard] : self.offsets[shard + 1]]

    def remaining(self) -> list[int]:
        """Items per shard not consumed yet."""
        return [int((~self.of_shard(i)).sum()) for i in range(len(self.offsets) - 1)]

    def encode(self) -> str:
        """A JSON-able form (hex of the packed bits)."""
        return np.packbits(self.bits).tobytes().hex()

    @classmethod
    def decode(cls, counts: list[int], text: str) -> EpochDone:
        """Inverse of :meth:`encode`.

        Raises:
            ValueError: ``text`` does not hold ``sum(counts)`` flags.
        """
        n = int(sum(counts))
        raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
        if raw.size != (n + 7) // 8:
            raise ValueError(f"loader state: 'done' holds {raw.size * 8} flags, the shards {n} samples")
        return cls(counts, np.unpackbits(raw)[:n].astype(bool))


def buffer_shuffle(samples: Iterable[tuple[int, T]], size: int, round_seed: Callable[[int], str]) -> Iterator[T]:
    """The workers' shuffle: a buffer of ``size`` items (≤1: off), seeded and flushed per round.

    Args:
        samples: ``(round, item)`` pairs in stream order.
        size: Buffer size.
        round_seed: The seed string of a round's generator.
    """
    buf: list[T] = []
    cur = None
    rng = random.Random()
    for r, s in samples:
        if r != cur:
            rng.shuffle(buf)
            yield from buf
            buf = []
            cur = r
            rng = random.Random(round_seed(r))
        if size <= 1:
            yield s
        elif len(buf) < size:
            buf.append(s)
        else:
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = s
    rng.shuffle(buf)
    yield from buf


def shuffle_seed(seed: int | str, rank: int, worker: int, epoch: int) -> Callable[[int], str]:
    """The seed string of a worker's shuffle in round ``r`` (one definition for the loader and :func:`consumed`)."""
    return lambda r: f"{seed}-shuffle-{rank}-{worker}-{epoch}-{r}"


def consumed(done: EpochDone, counts: list[int], epoch: int, seed: int, world_size: int, num_workers: int,
             batch_size: int, shuffle_buffer: int, batches: int) -> EpochDone:
    """``done`` plus what a job of this shape consumed of epoch ``epoch`` after ``batches`` batches per rank.

    Replays each rank × worker's stream from the counts (its shards, minus ``done``, through its
    shuffle) and marks the items of the batches the DataLoader had handed out. Exact unless corrupt
    samples were skipped (they are in the counts but not in the stream).
    """
    plan, planned = epoch_plan(counts, epoch, seed, world_size, num_workers, batch_size, done)
    bits = done.bits.copy()
    for rank in range(world_size):
        taken, _ = resume_position(batches, planned[rank], num_workers)
        for worker in range(num_workers):
            left = [(0, int(done.offsets[i] + j)) for i in plan[rank][worker]
                    for j in np.flatnonzero(~done.of_shard(i))]
            order = buffer_shuffle(left, shuffle_buffer, shuffle_seed(seed, rank, worker, epoch))
            for _, item in zip(range(taken[worker] * batch_size), order, strict=False):
                bits[item] = True
    return EpochDone(counts, bits)


def epoch_plan(counts: list[int], epoch: int, seed: int, world_size: int, num_workers: int,
               batch_size: int, done: EpochDone | None = None) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Shard assignment and batch counts of one epoch, identical on every rank.

    Args:
        counts: samples per shard (manifest order).
        epoch: epoch number.
        seed: loader seed.
        world_size: ranks.
        num_workers: workers per rank (≥ 1).
        batch_size: per-rank batch size.
        done: samples of this epoch an earlier job shape consumed: left out of the batch counts.

    Returns:
        (shards ``[rank][worker] -> [shard index]``, batches ``[rank][worker] -> count``), where
        each rank's batch counts sum to the same total (real batches plus padding batches).
    """
    if done is not None:
        counts = done.remaining()
    order = list(range(len(counts)))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    shards = [[order[r::world_size][w::num_workers] for w in range(num_workers)] for r in range(world_size)]
    batches = [[math.ceil(sum(counts[i] for i in s) / batch_size) for s in rank] for rank in shards]
    total = max(sum(b) for b in batches)
    for b in batches:  # pad each rank to `total`, giving extra batches to its least-loaded workers
        while sum(b) < total:
            b[b.index(min(b))] += 1
    return shards, batches


def resume_position(n: int, planned: list[int] | None, num_workers: int) -> tuple[list[int], int]:
    """Where each worker stands after the DataLoader yielded ``n`` batches.

    torch's DataLoader returns worker batches round-robin starting at worker 0 and skipping
    workers that are exhausted, so the order is a pure function of the per-worker batch counts.

    Args:
        n: batches already yielded on this rank.
        planned: batch count of each worker (``None`` = infinite streams).
        num_workers: workers (≥ 1).

    Returns:
        (batches taken from each worker, the worker whose batch comes next in the cycle). A new
        DataLoader must map its worker 0 to that worker to continue the same order.
    """
    limits = planned if planned is not None else [math.inf] * num_workers
    taken = [0] * num_workers
    left, last = n, num_workers - 1
    while left > 0:
        active = [w for w in range(num_workers) if taken[w] < limits[w]]
        if not active:
            break
        full = min(min(limits[w] - taken[w] for w in active), left // len(active))
        if full > 0:  # whole cycles at once (they start at worker 0 and end at the last active one)
            for w in active:
                taken[w] += int(full)
            left -= int(full) * len(active)
            last = active[-1]
            continue
        for w in active[:left]:  # the final partial cycle
            taken[w] += 1
            last = w
        left = 0
    return taken, (last + 1) % num_workers
