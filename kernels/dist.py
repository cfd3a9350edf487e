"""Rank / world-size helpers and an all-gather that keeps gradients.

Every helper works without an initialised process group (one process: rank 0 of 1,
gathers return their input), so the loss has one code path for one process and many.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Return True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def _gather_parts(x: torch.Tensor, dim: int = 0, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """All-gather ``x`` from every rank, in rank order (no autograd).

    ``sizes`` (rank r's length along ``dim``) lets the ranks' lengths differ: each rank sends ``x``
    padded to the longest, and the padding is cut off again.
    """
    x = x.contiguous()
    if sizes is not None:
        padded = x.new_zeros((*x.shape[:dim], max(sizes), *x.shape[dim + 1 :]))
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        x = padded
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    if sizes is not None:
        parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)]
    return parts


def gather(x: torch.Tensor, dim: int = 0, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along ``dim``, without gradients.

    Args:
        x: a tensor of the same shape on every rank, except along ``dim`` where ``sizes`` is given.
        dim: the dimension to concatenate along (≥ 0).
        sizes: every rank's length along ``dim`` (None: all equal).

    Returns:
        ``x`` itself with one process, else the rank-ordered concatenation.
    """
    if world_size() == 1:
        return x
    return torch.cat(_gather_parts(x.detach(), dim, sizes), dim=dim)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands every rank the sum of all ranks' gradients of its slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, dim: int,
                sizes: list[int] | None) -> torch.Tensor:
        ctx.dim = dim
        ctx.size = x.shape[dim]
        ctx.offset = rank() * ctx.size if sizes is None else sum(sizes[: rank()])
        return torch.cat(_gather_parts(x, dim, sizes), dim=dim)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss may depend on every slice: sum the gradients of all ranks
        # (all_reduce works on gloo too, unlike reduce_scatter), then keep our own slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(ctx.dim, ctx.offset, ctx.size), None, None


def gather_with_grad(x: torch.Tensor, dim: int = 0, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along ``dim``; gradients flow back to every rank.

    The backward of rank r returns the sum over all ranks of the gradient with respect
    to rank r's slice (lightly's hand-written gather returned only the local one).

    Args:
        x: a tensor of the same shape on every rank, except along ``dim`` where ``sizes`` is given.
        dim: the dimension to concatenate along (≥ 0).
        sizes: every rank's length along ``dim`` (None: all equal).

    Returns:
        ``x`` itself with one process, else the rank-ordered concatenation.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, dim, sizes)
