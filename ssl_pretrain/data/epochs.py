"""Epoch and resume arithmetic of the streaming loader: pure functions of the manifest's counts.

:func:`epoch_plan` splits the shards of one epoch over ranks × workers and pads every rank to the
same number of batches; :func:`resume_position` says where each DataLoader worker stands after
the loader yielded ``n`` batches, so a resumed loader continues the same order.
"""

from __future__ import annotations

import math
import random

__all__ = ["epoch_plan", "resume_position"]


def epoch_plan(counts: list[int], epoch: int, seed: int, world_size: int, num_workers: int,
               batch_size: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Shard assignment and batch counts of one epoch, identical on every rank.

    Args:
        counts: samples per shard (manifest order).
        epoch: epoch number.
        seed: loader seed.
        world_size: ranks.
        num_workers: workers per rank (≥ 1).
        batch_size: per-rank batch size.

    Returns:
        (shards ``[rank][worker] -> [shard index]``, batches ``[rank][worker] -> count``), where
        each rank's batch counts sum to the same total (real batches plus padding batches).
    """
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
