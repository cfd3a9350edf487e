"""Distributed negatives: two gloo processes equal one process on the concatenated batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from kernels import nt_xent

WORLD = 2
GRAD_OUTPUT = 1.7
# name -> (impl, form): both paths, pairs, groups spanning ranks, and the batched form.
CASES = {
    "pairs-triton": ("triton", "pairs"),
    "pairs-torch": ("torch", "pairs"),
    "partition-triton": ("triton", "partition"),
    "supcon-torch": ("torch", "supcon"),
    "batched-torch": ("torch", "batched"),
}
# name -> (impl, form, rows of each rank): the end of an epoch, ranks with fewer rows or none.
UNEVEN = {
    "pairs-torch-7-3": ("torch", "pairs", [7, 3]),
    "pairs-triton-2-9": ("triton", "pairs", [2, 9]),
    "partition-torch-8-0": ("torch", "partition", [8, 0]),
    "supcon-triton-0-10": ("triton", "supcon", [0, 10]),
}


def make_inputs(form: str, rows: int = 12 * WORLD) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The whole (all ranks') batch of one case: views stacked along the row dimension."""
    gen = torch.Generator().manual_seed(sum(map(ord, form)))
    if form == "batched":
        z0, z1 = torch.randn(2, 3, rows, 10, generator=gen)
        return z0, z1, None
    z0, z1 = torch.randn(2, rows, 10, generator=gen)
    if form == "pairs":
        return z0, z1, None
    groups = torch.arange(rows) % 5  # every group has members on both ranks
    return z0, (None if form == "supcon" else z1), groups


def _local(x: torch.Tensor | None, rank: int, sizes: list[int] | None = None) -> torch.Tensor | None:
    """This rank's slice of the row dimension (the second to last of embeddings, last of ids)."""
    if x is None:
        return None
    dim = -2 if x.is_floating_point() else -1
    sizes = sizes or [x.shape[dim] // WORLD] * WORLD
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).clone()


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: compute every case with gathered negatives and save loss and gradients."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, (impl, form) in CASES.items():
            z0, z1, groups = (_local(x, rank) for x in make_inputs(form))
            leaves = [x.requires_grad_() for x in (z0, z1) if x is not None]
            loss = nt_xent(z0, z1, groups=groups, impl=impl, gather_distributed=True)
            loss.backward(torch.tensor(GRAD_OUTPUT))
            torch.save([loss.detach()] + [x.grad for x in leaves], Path(out_dir) / f"{name}-{rank}.pt")
        for name, (impl, form, sizes) in UNEVEN.items():
            z0, z1, groups = (_local(x, rank, sizes) for x in make_inputs(form, sum(sizes)))
            leaves = [x.requires_grad_() for x in (z0, z1) if x is not None]
            loss = nt_xent(z0, z1, groups=groups, impl=impl, gather_distributed=True, sizes=sizes)
            # the trainer's weight: this rank's share of the rows, times WORLD (DeepSpeed averages)
            (loss * (sizes[rank] * WORLD / sum(sizes))).backward(torch.tensor(GRAD_OUTPUT))
            torch.save([loss.detach()] + [x.grad for x in leaves], Path(out_dir) / f"{name}-{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case computed once by two gloo ranks (their losses and gradients, one file per case and rank)."""
    out = tmp_path_factory.mktemp("ntxent_dist")
    # pytest imports this file as ``tests.kernels.test_ntxent_dist`` (importlib mode); the
    # spawned children unpickle ``_worker`` by that name with the parent's sys.path.
    with pytest.MonkeyPatch.context() as mp_ctx:
        mp_ctx.syspath_prepend(str(Path(__file__).resolve().parents[2]))
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_rank_on_concatenated_batch(ranks_out: Path) -> None:
    for name, (impl, form) in CASES.items():
        z0, z1, groups = make_inputs(form)
        leaves = [x.clone().requires_grad_() for x in (z0, z1) if x is not None]
        loss = nt_xent(*leaves[:1], *leaves[1:], groups=groups, impl=impl)
        loss.backward(torch.tensor(GRAD_OUTPUT))
        per_rank = [torch.load(ranks_out / f"{name}-{rank}.pt") for rank in range(WORLD)]
        # Each rank's loss is the mean over its rows; their mean is the whole batch's loss.
        torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), loss.detach(), msg=name)
        for i, leaf in enumerate(leaves):
            # Rank r's gradient is WORLD x the one-process gradient of its rows (DDP averages).
            grad = torch.cat([r[1 + i] for r in per_rank], dim=-2) / WORLD
            torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_with_different_rows_equal_one_rank_on_their_rows(ranks_out: Path) -> None:
    """Issue 25.1: at the end of an epoch ranks hold fewer rows, or none; weighted by their share of the rows,
    the ranks' losses and gradients are the one-process loss and gradient of all rows."""
    for name, (impl, form, sizes) in UNEVEN.items():
        z0, z1, groups = make_inputs(form, sum(sizes))
        leaves = [x.clone().requires_grad_() for x in (z0, z1) if x is not None]
        loss = nt_xent(*leaves[:1], *leaves[1:], groups=groups, impl=impl)
        loss.backward(torch.tensor(GRAD_OUTPUT))
        per_rank = [torch.load(ranks_out / f"{name}-{rank}.pt") for rank in range(WORLD)]
        weighted = sum(r[0] * m for r, m in zip(per_rank, sizes, strict=True)) / sum(sizes)
        torch.testing.assert_close(weighted, loss.detach(), msg=name)
        assert all(r[0] == 0 for r, m in zip(per_rank, sizes, strict=True) if m == 0), name
        for i, leaf in enumerate(leaves):
            grad = torch.cat([r[1 + i] for r in per_rank], dim=-2) / WORLD
            torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-4, msg=name)
