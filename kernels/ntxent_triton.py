"""Triton kernels of the fused NT-Xent loss: the masked row log-sum-exp and its gradient.

Imported by ``kernels/ntxent.py`` when triton is installed (a Linux-only dependency); without
it the chunked PyTorch path of ``kernels/ntxent_torch.py`` serves every call. ``INTERPRETED``
tells whether ``TRITON_INTERPRET=1`` was set before import (the kernels then run on the CPU).

Block sizes are autotuned on GPUs per (rows, query rows, D, dtypes): ``FWD_CONFIGS`` and
``BWD_CONFIGS`` are the candidates, :func:`chosen_configs` says what the last launch used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

#: ``triton.jit`` reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Candidate blocks, the first of each list being the untuned choice. Under the interpreter
# only that one runs: tuning there would time numpy and multiply the CPU tests' runtime.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]
BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
]
#: Problems with fewer logits (rows x query rows) run the first config untuned: timing every
#: candidate (one compile and ~0.1 s of launches each) costs more than it could save there.
TUNE_MIN_LOGITS = 2048 * 2048
#: The autotuning key: a change of any of these (or of an input dtype, which triton adds) tunes again.
TUNE_KEY = ["R", "num_rows", "D"]


def _prune_small(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep only the first config for problems below ``TUNE_MIN_LOGITS`` (see there)."""
    return configs[:1] if named_args["R"] * named_args["num_rows"] < TUNE_MIN_LOGITS else configs


def _autotune(configs: list[triton.Config]) -> Callable[[triton.runtime.JITFunction], triton.runtime.Autotuner]:
    """``triton.autotune`` over ``configs`` on the GPU; the first config alone under the interpreter."""
    return triton.autotune(
        configs=configs[:1] if INTERPRETED else configs,
        key=TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_small},
    )

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


@_autotune(FWD_CONFIGS)
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


@_autotune(BWD_CONFIGS)
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


def _launcher(kernel: triton.runtime.Autotuner, config: triton.Config | None) -> tuple[object, dict]:
    """Return the kernel to launch and its extra launch arguments: autotuned, or ``config`` forced."""
    return (kernel, {}) if config is None else (kernel.fn, config.all_kwargs())


def ntxent_forward(
    z: torch.Tensor, row_offset: int, num_rows: int, temperature: float, config: triton.Config | None = None
) -> torch.Tensor:
    """Launch the forward kernel: masked row log-sum-exp for some rows of ``z`` against all.

    Args:
        z: (B, R, D) L2-normalised embeddings, fp32 / bf16 / fp16, any strides.
        row_offset: index of the first query row.
        num_rows: number of query rows.
        temperature: the softmax temperature ``tau > 0``.
        config: one of ``FWD_CONFIGS`` to launch instead of the autotuned choice (the checks
            run every candidate); default None.

    Returns:
        (B, num_rows) fp32 row log-sum-exps (see ``lse_forward_torch``).
    """
    batch, total, dim = z.shape
    lse = torch.empty(batch, num_rows, dtype=torch.float32, device=z.device)
    kernel, launch_args = _launcher(_ntxent_fwd_kernel, config)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(num_rows, meta["BLOCK_M"]), batch

    kernel[grid](
        z, lse, z.stride(0), z.stride(1), z.stride(2), lse.stride(0),
        total, dim, row_offset, num_rows, math.log2(math.e) / temperature,
        BLOCK_D=_block_d(dim), INPUT_PRECISION=_input_precision(z.dtype), **launch_args,
    )
    return lse


def ntxent_backward(
    z: torch.Tensor,
    lse: torch.Tensor,
    weight: torch.Tensor,
    row_offset: int,
    num_rows: int,
    temperature: float,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: gradient of ``sum_i weight_i lse_i`` for the query rows.

    Args:
        z: (B, R, D) L2-normalised embeddings.
        lse: (B, R) fp32 contiguous log-sum-exps of all rows.
        weight: (B, R) fp32 contiguous weights of all rows.
        row_offset: index of the first row whose gradient is wanted.
        num_rows: number of those rows.
        temperature: the softmax temperature ``tau > 0``.
        config: one of ``BWD_CONFIGS`` to launch instead of the autotuned choice; default None.

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
    block_d = _block_d(dim)
    kernel, launch_args = _launcher(_ntxent_bwd_kernel, config)

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(dim, block_d), batch

    kernel[grid](
        z, lse, weight, w_scale, dz,
        z.stride(0), z.stride(1), z.stride(2), lse.stride(0),
        dz.stride(0), dz.stride(1), dz.stride(2),
        total, dim, row_offset, num_rows, math.log2(math.e) / temperature, 1.0 / temperature,
        BLOCK_D=block_d, INPUT_PRECISION=_input_precision(z.dtype), **launch_args,
    )
    return dz


def describe_config(config: triton.Config) -> str:
    """One-line form of a block configuration, e.g. ``BLOCK_M=128 BLOCK_N=64 warps=8 stages=3``."""
    blocks = " ".join(f"{name}={value}" for name, value in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def chosen_configs() -> dict[str, str]:
    """Return the block configuration of each kernel's last autotuned launch, by kernel name.

    Returns:
        ``{"forward": ..., "backward": ...}``, one-line descriptions; a kernel not launched
        yet is absent.
    """
    kernels = {"forward": _ntxent_fwd_kernel, "backward": _ntxent_bwd_kernel}
    return {
        name: describe_config(kernel.best_config)
        for name, kernel in kernels.items()
        if getattr(kernel, "best_config", None) is not None
    }

