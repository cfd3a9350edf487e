"""Fused NT-Xent (SimCLR / SupCon) contrastive loss that never builds the 2N x 2N matrix.

Layout, top to bottom: the derivation; the Triton kernels (``_ntxent_fwd_kernel``,
``_ntxent_bwd_kernel``) that do only the quadratic part, a masked row log-sum-exp and its
gradient; plain launchers (``ntxent_forward``, ``ntxent_backward``); one
``torch.autograd.Function`` that runs either those launchers or the chunked PyTorch path
of ``kernels/ntxent_torch.py``; and on top the functional ``nt_xent`` and the module
``NTXentLoss``, which add the O(N) positive term and the mean in plain PyTorch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import dist
from kernels.ntxent_torch import lse_backward_torch, lse_forward_torch

Impl = Literal["auto", "triton", "torch"]

# ---------------------------------------------------------------------------------------
# Derivation
#
# z = normalize(rows) in R^{R x D} (the keys; R = 2N for pairs, or W * 2N with W ranks),
# s_ij = z_i . z_j / tau, and for every row i a set P(i) of positives (its pair partner,
# or every other member of its group).  The loss of row i is
#
#     loss_i = lse_i - (1/|P(i)|) sum_{p in P(i)} s_ip,    lse_i = log sum_{j != i} exp(s_ij)
#
# (SupCon's average of -log softmax over the positives), and the loss is the mean over the
# rows.  Only lse is quadratic: the positive term is z_i . (sum of z over i's group - z_i),
# a segment sum, and stays in PyTorch.
#
# Forward kernel: for a block of query rows, sweep tiles of key columns, s = q k^T / tau,
# set s = -inf on the diagonal and past the last row, and keep a running max m and sum l
# (online log-sum-exp, base 2: s2 = s * log2(e)): m' = max(m, max_j s2_ij),
# l' = l * 2^(m - m') + sum_j 2^(s2_ij - m'), lse = (m + log2 l) * ln 2.
#
# Backward: with w_i = dLoss/dlse_i and P_ij = exp(s_ij - lse_i) (0 on the diagonal),
#
#     d(sum_i w_i lse_i)/dz_k = (1/tau) sum_j (w_k P_kj + w_j P_jk) z_j
#
# (row k's own softmax, plus k as a column of every other row's softmax).  S is symmetric,
# so P_jk = exp(s_kj - lse_j) comes from the same recomputed tile as P_kj: a row-block
# program sweeps the columns once and writes the whole gradient of its rows, no atomics and
# no second recomputation.  The gradient then flows through the normalisation in PyTorch.
# ---------------------------------------------------------------------------------------


@triton.jit
def _similarity_tile(
    z_b,
    rows,
    row_mask,
    cols,
    col_mask,
    D: tl.constexpr,
    stride_zr,
    stride_zd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Return the fp32 tile z[rows] . z[cols]^T, summed over D in chunks of BLOCK_D.

    D is a compile-time constant, so for D <= BLOCK_D the loop is one static step and the
    row block's load is loop-invariant in the caller's column loop (hoisted by the compiler).
    """
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(
            z_b + rows[:, None] * stride_zr + offs_d[None, :] * stride_zd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        k = tl.load(
            z_b + cols[:, None] * stride_zr + offs_d[None, :] * stride_zd,
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def _ntxent_fwd_kernel(
    z_ptr,
    lse_ptr,
    stride_zb,
    stride_zr,
    stride_zd,
    stride_lb,
    R,
    D: tl.constexpr,
    row_offset,
    num_rows,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """lse[b, i] = log sum_{j != row_offset + i} exp(z[b, row_offset + i] . z[b, j] / tau)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < num_rows
    rows = row_offset + offs_m
    z_b = z_ptr + pid_b * stride_zb

    # A finite start keeps 2^(m - m') at 0, not NaN, when a row's first tile is all masked.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, R, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < R
        s = _similarity_tile(
            z_b, rows, row_mask, cols, col_mask, D, stride_zr, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION,
        )
        valid = col_mask[None, :] & (cols[None, :] != rows[:, None])
        s2 = tl.where(valid, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + pid_b * stride_lb + offs_m, lse, mask=row_mask)


@triton.jit
def _ntxent_bwd_kernel(
    z_ptr,
    lse_ptr,
    w_ptr,
    w_scale_ptr,
    dz_ptr,
    stride_zb,
    stride_zr,
    stride_zd,
    stride_lb,
    stride_db,
    stride_dr,
    stride_dd,
    R,
    D: tl.constexpr,
    row_offset,
    num_rows,
    scale_log2,
    inv_tau,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dz[b, k, d-chunk] = (1/tau) sum_{j != k} (w_k P_kj + w_j P_jk) z[b, j, d-chunk]."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < num_rows
    rows = row_offset + offs_m
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    do_mask = offs_do < D
    z_b = z_ptr + pid_b * stride_zb
    lse_b = lse_ptr + pid_b * stride_lb
    w_b = w_ptr + pid_b * stride_lb

    LOG2E: tl.constexpr = 1.4426950408889634
    lse_k = tl.load(lse_b + rows, mask=row_mask, other=0.0) * LOG2E
    w_k = tl.load(w_b + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, R, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < R
        s = _similarity_tile(
            z_b, rows, row_mask, cols, col_mask, D, stride_zr, stride_zd,
            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION,
        )
        s2 = s * scale_log2
        lse_j = tl.load(lse_b + cols, mask=col_mask, other=0.0) * LOG2E
        w_j = tl.load(w_b + cols, mask=col_mask, other=0.0)
        # w_k P_kj (row k's softmax) + w_j P_jk (k as a column of row j's softmax).
        weights = w_k[:, None] * tl.exp2(s2 - lse_k[:, None]) + w_j[None, :] * tl.exp2(s2 - lse_j[None, :])
        valid = col_mask[None, :] & (cols[None, :] != rows[:, None])
        weights = tl.where(valid, weights, 0.0)
        z_j = tl.load(
            z_b + cols[:, None] * stride_zr + offs_do[None, :] * stride_zd,
            mask=col_mask[:, None] & do_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(weights.to(z_j.dtype), z_j, acc, input_precision=INPUT_PRECISION)
    dz = acc * (inv_tau * tl.load(w_scale_ptr))
    tl.store(
        dz_ptr + pid_b * stride_db + offs_m[:, None] * stride_dr + offs_do[None, :] * stride_dd,
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & do_mask[None, :],
    )


def _block_d(dim: int) -> int:
    """Return the D chunk of one ``tl.dot``: a power of two in [16, 128]."""
    return min(128, max(16, triton.next_power_of_2(dim)))


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16 / fp16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def ntxent_forward(z: torch.Tensor, row_offset: int, num_rows: int, temperature: float) -> torch.Tensor:
    """Launch the forward kernel: masked row log-sum-exp for some rows of ``z`` against all.

    Args:
        z: (B, R, D) L2-normalised embeddings, fp32 / bf16 / fp16, any strides.
        row_offset: index of the first query row.
        num_rows: number of query rows.
        temperature: the softmax temperature ``tau > 0``.

    Returns:
        (B, num_rows) fp32 row log-sum-exps (see ``lse_forward_torch``).
    """
    batch, total, dim = z.shape
    lse = torch.empty(batch, num_rows, dtype=torch.float32, device=z.device)
    block_m, block_n = 128, 64
    grid = (triton.cdiv(num_rows, block_m), batch)
    _ntxent_fwd_kernel[grid](
        z, lse, z.stride(0), z.stride(1), z.stride(2), lse.stride(0),
        total, dim, row_offset, num_rows, math.log2(math.e) / temperature,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(dim),
        INPUT_PRECISION=_input_precision(z.dtype), num_warps=8, num_stages=3,
    )
    return lse


def ntxent_backward(
    z: torch.Tensor,
    lse: torch.Tensor,
    weight: torch.Tensor,
    row_offset: int,
    num_rows: int,
    temperature: float,
) -> torch.Tensor:
    """Launch the backward kernel: gradient of ``sum_i weight_i lse_i`` for the query rows.

    Args:
        z: (B, R, D) L2-normalised embeddings.
        lse: (B, R) fp32 contiguous log-sum-exps of all rows.
        weight: (B, R) fp32 contiguous weights of all rows.
        row_offset: index of the first row whose gradient is wanted.
        num_rows: number of those rows.
        temperature: the softmax temperature ``tau > 0``.

    Returns:
        (B, num_rows, D) in ``z.dtype`` (see ``lse_backward_torch``).
    """
    batch, total, dim = z.shape
    dz = torch.empty(batch, num_rows, dim, dtype=z.dtype, device=z.device)
    # The tile weights w P go through a 16-bit dot on bf16 / fp16 inputs; with w ~ 1 / rows
    # they would underflow fp16. Scale w to at most 1 on the device (no host sync) and undo
    # the scale on the fp32 accumulator.
    w_scale = weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    weight = weight / w_scale
    block_m, block_n, block_d = 64, 64, _block_d(dim)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(dim, block_d), batch)
    _ntxent_bwd_kernel[grid](
        z, lse, weight, w_scale, dz,
        z.stride(0), z.stride(1), z.stride(2), lse.stride(0),
        dz.stride(0), dz.stride(1), dz.stride(2),
        total, dim, row_offset, num_rows, math.log2(math.e) / temperature, 1.0 / temperature,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        INPUT_PRECISION=_input_precision(z.dtype), num_warps=4, num_stages=2,
    )
    return dz


class NTXentRowLSE(torch.autograd.Function):
    """Row log-sum-exp of the query rows (a slice of the keys) with an O(N * D) backward.

    With ``distributed=True`` the keys are all ranks' rows and the query rows are this
    rank's slice; the backward all-gathers the other ranks' ``lse`` and weights (O(N)) so
    that it writes the complete gradient of this rank's rows -- every rank's loss
    included -- and zero elsewhere; the caller's gather-with-grad sums the slices.
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
    ) -> torch.Tensor:
        launch = ntxent_forward if use_triton else lse_forward_torch
        lse = launch(z, row_offset, num_rows, temperature)
        ctx.save_for_backward(z, lse)
        ctx.args = (row_offset, num_rows, temperature, use_triton, distributed)
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        z, lse = ctx.saved_tensors
        row_offset, num_rows, temperature, use_triton, distributed = ctx.args
        weight = grad_lse.float().contiguous()
        if distributed:
            lse, weight = dist.gather(lse, dim=1), dist.gather(weight, dim=1)
        launch = ntxent_backward if use_triton else lse_backward_torch
        dz_rows = launch(z, lse, weight, row_offset, num_rows, temperature)
        if distributed:
            dz = torch.zeros_like(z)
            dz[:, row_offset : row_offset + num_rows] = dz_rows
        else:
            dz = dz_rows
        return dz, None, None, None, None, None


# --------------------------------- validation -----------------------------------------


def _check_embeddings(z0: object, z1: object) -> None:
    """Raise ValueError naming ``z0`` / ``z1`` when they are not matching float embeddings."""
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point() or z0.dim() not in (2, 3):
        raise ValueError(f"z0: expected a float tensor of shape (N, D) or (B, N, D), got {_describe(z0)}")
    if z0.shape[-2] == 0 or z0.shape[-1] == 0 or (z0.dim() == 3 and z0.shape[0] == 0):
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
    if impl == "triton" and not z0.is_cuda and not isinstance(_ntxent_fwd_kernel, triton.runtime.JITFunction):
        return True  # TRITON_INTERPRET=1 was set before import: the kernels run on the CPU.
    if impl == "triton" and not z0.is_cuda:
        raise ValueError(
            "impl: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels), "
            f"got z0 on {z0.device}"
        )
    return impl == "triton" or (impl == "auto" and z0.is_cuda)


def _segments(
    groups: torch.Tensor | None,
    batch: int,
    n: int,
    paired: bool,
    gather_distributed: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map every key row to a (batch, group) segment.

    Key rows are, rank after rank, ``[z0 rows; z1 rows]`` of each rank.

    Returns:
        ``segment`` (B, R_keys) long in ``[0, B * G)``, ``count`` (B, R_keys) members of each
        row's segment (fp32), and ``G``.

    Raises:
        ValueError: ``groups`` is not an integer tensor of shape (N,) or (B, N) on z0's
            device, or a row has no other member in its group (this check is a host sync).
    """
    ranks = dist.world_size() if gather_distributed else 1
    if groups is None:
        # Pairs: the two views of sample i on rank r share the group r * N + i; no sync needed.
        ids = torch.arange(ranks * n, device=device).view(ranks, 1, n).expand(ranks, 2, n).reshape(1, -1)
        num_groups = ranks * n
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
        ids = dist.gather(ids, dim=1)
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
    _check_embeddings(z0, z1)
    _check_options(temperature, impl)
    use_triton = _use_triton(impl, z0)
    if z1 is None and groups is None:
        raise ValueError("groups: required when z1 is None (otherwise no row has a positive)")
    batched = z0.dim() == 3
    z_rows = z0 if z1 is None else torch.cat([z0, z1], dim=-2)
    if not batched:
        z_rows = z_rows.unsqueeze(0)
    batch, n = z0.shape[0] if batched else 1, z0.shape[-2]
    segment, count, num_groups = _segments(groups, batch, n, z1 is not None, gather_distributed, z0.device)

    # Normalise in fp32, then hand the kernel the input dtype (bf16 stays bf16 on the GPU).
    z_rows = F.normalize(z_rows.float(), dim=-1).to(z0.dtype)
    num_rows = z_rows.shape[1]
    distributed = gather_distributed and dist.world_size() > 1
    row_offset = dist.rank() * num_rows if distributed else 0
    z_keys = dist.gather_with_grad(z_rows, dim=1) if distributed else z_rows

    lse = NTXentRowLSE.apply(z_keys, row_offset, num_rows, float(temperature), use_triton, distributed)

    # Positive term, O(N * D): row i's mean positive similarity is
    # z_i . (sum of z over i's segment - z_i) / ((count_i - 1) * tau).
    zf = z_keys.float()
    dim = zf.shape[-1]
    segment_sum = zf.new_zeros(batch * num_groups, dim).index_add(0, segment.flatten(), zf.reshape(-1, dim))
    rows = slice(row_offset, row_offset + num_rows)
    z_i = zf[:, rows]
    positives = segment_sum[segment[:, rows]] - z_i
    pos = torch.einsum("brd,brd->br", z_i, positives) / ((count[:, rows] - 1.0) * temperature)
    return (lse - pos).mean()


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

