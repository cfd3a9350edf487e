"""Fused NT-Xent (SimCLR / SupCon) contrastive loss that never builds the 2N x 2N matrix.

Layout: the derivation, the Triton kernels (``_ntxent_fwd_kernel``, ``_ntxent_bwd_kernel``)
that do only the quadratic part, a masked row log-sum-exp and its gradient, and their plain
launchers (``ntxent_forward``, ``ntxent_backward``) live in ``kernels/ntxent_triton.py``, which
only platforms with triton import. Here: one ``torch.autograd.Function`` that runs either
those launchers or the chunked PyTorch path of ``kernels/ntxent_torch.py``; and on top the
functional ``nt_xent`` and the module ``NTXentLoss``, which add the O(N) positive term and the mean in plain PyTorch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kernels import dist
from kernels.ntxent_torch import lse_backward_torch, lse_forward_torch

try:
    from kernels.ntxent_triton import INTERPRETED, ntxent_backward, ntxent_forward
except ImportError:  # triton is a Linux-only dependency: without it the torch path serves every call
    ntxent_forward = ntxent_backward = None
    INTERPRETED = False

Impl = Literal["auto", "triton", "torch"]


class NTXentRowLSE(torch.autograd.Function):
    """Row log-sum-exp of the query rows (a slice of the keys) with an O(N * D) backward.

    With ``distributed=True`` the keys are all ranks' rows and the query rows are this
    rank's slice; the backward all-gathers the other ranks' ``lse`` and weights (O(N)) so
    that it writes the complete gradient of this rank's rows -- every rank's loss
    included -- and zero elsewhere; the caller's gather-with-grad sums the slices.
    ``row_sizes`` (every rank's query rows) lets the ranks hold different numbers of rows,
    none included.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        row_offset: int,
        num_rows: int,
        temperature: float,
        use_triton: bool,
        distributed: bool,
        row_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        launch = ntxent_forward if use_triton else lse_forward_torch
        lse = launch(z, row_offset, num_rows, temperature) if num_rows else z.new_zeros(z.shape[0], 0).float()
        ctx.save_for_backward(z, lse)
        ctx.args = (row_offset, num_rows, temperature, use_triton, distributed, row_sizes)
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        z, lse = ctx.saved_tensors
        row_offset, num_rows, temperature, use_triton, distributed, row_sizes = ctx.args
        weight = grad_lse.float().contiguous()
        if distributed:
            lse, weight = dist.gather(lse, dim=1, sizes=row_sizes), dist.gather(weight, dim=1, sizes=row_sizes)
        launch = ntxent_backward if use_triton else lse_backward_torch
        dz_rows = launch(z, lse, weight, row_offset, num_rows, temperature) if num_rows else z[:, :0]
        if distributed:
            dz = torch.zeros_like(z)
            dz[:, row_offset : row_offset + num_rows] = dz_rows
        else:
            dz = dz_rows
        return dz, None, None, None, None, None, None


# --------------------------------- validation -----------------------------------------


def _check_embeddings(z0: object, z1: object, rows_may_be_empty: bool = False) -> None:
    """Raise ValueError naming ``z0`` / ``z1`` when they are not matching float embeddings."""
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.dim() not in (2, 3):
        raise ValueError(f"z0: expected a float tensor of shape (N, D) or (B, N, D), got {_describe(z0)}")
    if (z0.shape[-2] == 0 and not rows_may_be_empty) or z0.shape[-1] == 0 or (z0.dim() == 3 and z0.shape[0] == 0):
        raise ValueError(f"z0: needs at least one row and one feature, got shape {tuple(z0.shape)}")
    if z1 is None:
        return
    if not isinstance(z1, torch.Tensor):
        raise ValueError(f"z1: expected a tensor like z0 or None, got {type(z1).__name__}")
    if z1.shape != z0.shape:
        raise ValueError(f"z1: shape {tuple(z1.shape)} does not match z0's {tuple(z0.shape)}")
    if z1.dtype != z0.dtype:
        raise ValueError(f"z1: dtype {z1.dtype} does not match z0's {z0.dtype}")
    if z1.device != z0.device:
        raise ValueError(f"z1: device {z1.device} does not match z0's {z0.device}")


def _check_sizes(sizes: object, n: int, distributed: bool) -> list[int] | None:
    """``sizes`` checked against this rank's ``n`` rows; None when the ranks' rows are equal."""
    if sizes is None:
        return None
    ranks = dist.world_size() if distributed else 1
    if not isinstance(sizes, (list, tuple)) or len(sizes) != ranks or \
            not all(isinstance(m, int) and m >= 0 for m in sizes):
        raise ValueError(f"sizes: expected {ranks} row count(s) >= 0, one per rank, got {sizes!r:.80}")
    mine = sizes[dist.rank() if distributed else 0]
    if mine != n:
        raise ValueError(f"sizes: {list(sizes)} says this rank holds {mine} row(s), its z0 has {n}")
    if not sum(sizes):
        raise ValueError(f"sizes: {list(sizes)}: no rank holds a row")
    return None if len(set(sizes)) == 1 else list(sizes)


def _describe(x: object) -> str:
    """Return a short description of a bad argument for an error message."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_options(temperature: object, impl: object) -> None:
    """Raise ValueError naming ``temperature`` or ``impl`` when either is bad."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a Python float > 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")


def _use_triton(impl: Impl, z0: torch.Tensor) -> bool:
    """Return True when the Triton kernels should run for ``impl`` on ``z0``'s device."""
    if impl == "triton" and ntxent_forward is None:
        raise ValueError(
            "impl: 'triton' needs the triton package (installed with mri-ssl on Linux); use 'auto' or 'torch'"
        )
    if impl == "triton" and not z0.is_cuda and INTERPRETED:
        return True  # TRITON_INTERPRET=1 was set before import: the kernels run on the CPU.
    if impl == "triton" and not z0.is_cuda:
        raise ValueError(
            "impl: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels), "
            f"got z0 on {z0.device}"
        )
    return impl == "triton" or (impl == "auto" and z0.is_cuda and ntxent_forward is not None)


def _segments(
    groups: torch.Tensor | None,
    batch: int,
    n: int,
    paired: bool,
    gather_distributed: bool,
    device: torch.device,
    sizes: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map every key row to a (batch, group) segment.

    Key rows are, rank after rank, ``[z0 rows; z1 rows]`` of each rank; ``sizes`` holds every
    rank's N where they differ.

    Returns:
        ``segment`` (B, R_keys) long in ``[0, B * G)``, ``count`` (B, R_keys) members of each
        row's segment (fp32), and ``G``.

    Raises:
        ValueError: ``groups`` is not an integer tensor of shape (N,) or (B, N) on z0's
            device, or a row has no other member in its group (this check is a host sync).
    """
    ranks = dist.world_size() if gather_distributed else 1
    if groups is None:
        # Pairs: the two views of the i-th sample of all ranks' samples share group i; no sync needed.
        if sizes is None:
            ids = torch.arange(ranks * n, device=device).view(ranks, 1, n).expand(ranks, 2, n).reshape(1, -1)
        else:
            starts = [sum(sizes[:r]) for r in range(ranks)]
            ids = torch.cat([torch.arange(a, a + m, device=device).repeat(2)
                             for a, m in zip(starts, sizes, strict=True)]).view(1, -1)
        num_groups = ranks * n if sizes is None else sum(sizes)
        segment = ids + num_groups * torch.arange(batch, device=device)[:, None]
        return segment, torch.full(segment.shape, 2.0, device=device), num_groups
    if not isinstance(groups, torch.Tensor) or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(f"groups: expected an integer tensor, got {_describe(groups)}")
    if groups.device != device:
        raise ValueError(f"groups: device {groups.device} does not match z0's {device}")
    if groups.shape not in ((n,), (batch, n)):
        raise ValueError(f"groups: expected shape ({n},) or ({batch}, {n}), got {tuple(groups.shape)}")
    ids = groups.expand(batch, n)
    if paired:
        ids = torch.cat([ids, ids], dim=1)
    if gather_distributed:
        ids = dist.gather(ids, dim=1, sizes=None if sizes is None else [m * (2 if paired else 1) for m in sizes])
    _, inverse = torch.unique(ids, return_inverse=True)
    num_groups = ids.shape[1]  # an upper bound on the distinct ids: no host sync for the size
    segment = inverse + num_groups * torch.arange(batch, device=device)[:, None]
    count = torch.bincount(segment.flatten(), minlength=batch * num_groups)[segment]
    if bool((count < 2).any()):  # host sync: only the grouped form checks data values
        raise ValueError("groups: every row needs at least one other row with the same group id (a positive)")
    return segment, count.float(), num_groups


# ---------------------------------- public API ------------------------------------------


def nt_xent(
    z0: torch.Tensor,
    z1: torch.Tensor | None = None,
    *,
    groups: torch.Tensor | None = None,
    temperature: float = 0.1,
    impl: Impl = "auto",
    gather_distributed: bool = False,
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """NT-Xent (SimCLR) / SupCon contrastive loss in O(N * D) memory.

    Rows ``z = normalize(cat(z0, z1))``; ``s_ij = z_i . z_j / temperature``; row i's loss is
    ``log sum_{j != i} exp(s_ij) - mean_{p in P(i)} s_ip`` and the result is its mean.

    Args:
        z0: (N, D) first views, or (B, N, D) for B independent problems (local contrastive
            loss over feature-map regions). Normalised inside; fp32, bf16 or fp16.
        z1: same shape as ``z0``: second views; row i of z0 and row i of z1 are positives.
            ``None``: ``z0`` alone holds the M rows and ``groups`` says the positives.
        groups: integer ids, shape (N,) or (B, N). With ``z1=None`` every other row of the
            same id is a positive (SupCon average over positives); with ``z1`` the rows
            ``cat(z0, z1)`` get ids ``cat(groups, groups)``: the pair partner and every
            other sample of the same id are positives.
        temperature: the softmax temperature, a Python float > 0.
        impl: ``"triton"`` kernels, the chunked ``"torch"`` path, or ``"auto"`` (Triton on
            CUDA tensors, torch on the CPU).
        gather_distributed: contrast this rank's rows with all ranks' rows (gathered with
            gradients; every rank must pass the same shapes). Each rank returns the mean over
            its own rows: the mean over ranks equals the single-process loss on the
            concatenated batch, and each rank's gradient is ``world_size`` times the
            single-process gradient of its rows -- what DDP / DeepSpeed gradient averaging
            expects. Without an initialised process group it changes nothing.
        sizes: with ``gather_distributed``, every rank's N (rows of ``z0``) when they differ
            (the end of an epoch); a rank may hold none (then its loss is 0, still connected
            to the graph). Each rank returns the mean over its own rows, so weighting rank r's
            loss by ``sizes[r] * world_size / sum(sizes)`` gives the concatenated batch's loss.
            None: every rank holds the same N.

    Returns:
        The scalar fp32 mean loss.

    Raises:
        ValueError: mismatched shapes / dtypes / devices of ``z0``, ``z1`` or ``groups``,
            no rows, ``temperature <= 0``, an unknown ``impl``, ``z1`` and ``groups`` both
            missing, or a group with a single row.

    Example:
        >>> z0, z1 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss = nt_xent(z0, z1, temperature=0.1)
    """
    _check_embeddings(z0, z1, rows_may_be_empty=sizes is not None)
    _check_options(temperature, impl)
    distributed = gather_distributed and dist.world_size() > 1
    sizes = _check_sizes(sizes, z0.shape[-2], distributed)
    use_triton = _use_triton(impl, z0)
    if z1 is None and groups is None:
        raise ValueError("groups: required when z1 is None (otherwise no row has a positive)")
    batched = z0.dim() == 3
    z_rows = z0 if z1 is None else torch.cat([z0, z1], dim=-2)
    if not batched:
        z_rows = z_rows.unsqueeze(0)
    batch, n = z0.shape[0] if batched else 1, z0.shape[-2]
    segment, count, num_groups = _segments(groups, batch, n, z1 is not None, gather_distributed, z0.device, sizes)

    # Normalise in fp32, then hand the kernel the input dtype (bf16 stays bf16 on the GPU).
    z_rows = F.normalize(z_rows.float(), dim=-1).to(z0.dtype)
    num_rows = z_rows.shape[1]
    row_sizes = None if sizes is None else [m * (1 if z1 is None else 2) for m in sizes]
    row_offset = 0
    if distributed:
        row_offset = dist.rank() * num_rows if row_sizes is None else sum(row_sizes[: dist.rank()])
    z_keys = dist.gather_with_grad(z_rows, dim=1, sizes=row_sizes) if distributed else z_rows

    lse = NTXentRowLSE.apply(z_keys, row_offset, num_rows, float(temperature), use_triton, distributed, row_sizes)

    # Positive term, O(N * D): row i's mean positive similarity is
    # z_i . (sum of z over i's segment - z_i) / ((count_i - 1) * tau).
    zf = z_keys.float()
    dim = zf.shape[-1]
    segment_sum = zf.new_zeros(batch * num_groups, dim).index_add(0, segment.flatten(), zf.reshape(-1, dim))
    mine = slice(row_offset, row_offset + num_rows)
    z_i = zf[:, mine]
    positives = segment_sum[segment[:, mine]] - z_i
    pos = torch.einsum("brd,brd->br", z_i, positives) / ((count[:, mine] - 1.0) * temperature)
    loss = lse - pos
    return loss.mean() if loss.numel() else loss.sum()  # a rank without rows: 0, in the graph


class NTXentLoss(torch.nn.Module):
    """Module form of :func:`nt_xent`.

    Args:
        temperature: the softmax temperature, a Python float > 0 (default 0.1).
        impl: ``"auto"`` (default), ``"triton"`` or ``"torch"``.
        gather_distributed: contrast against all ranks' embeddings (default False).

    Raises:
        ValueError: ``temperature <= 0`` or an unknown ``impl``.
    """

    def __init__(
        self, temperature: float = 0.1, impl: Impl = "auto", gather_distributed: bool = False
    ) -> None:
        super().__init__()
        _check_options(temperature, impl)
        self.temperature = float(temperature)
        self.impl: Impl = impl
        self.gather_distributed = gather_distributed

    def forward(
        self, z0: torch.Tensor, z1: torch.Tensor | None = None, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return :func:`nt_xent` of the views with this module's settings (see there for shapes)."""
        return nt_xent(
            z0, z1, groups=groups, temperature=self.temperature, impl=self.impl,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        """Show the settings in ``print(module)``."""
        return (
            f"temperature={self.temperature}, impl={self.impl!r}, "
            f"gather_distributed={self.gather_distributed}"
        )

