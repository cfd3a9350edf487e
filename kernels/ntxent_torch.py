"""Chunked PyTorch path of the NT-Xent row log-sum-exp: O(tile) memory, CPU-friendly.

This is the readable twin of the Triton kernels in ``kernels/ntxent.py`` and computes the
same two quantities (see the derivation there):

- forward: ``lse_i = log sum_{j != i} exp(z_i . z_j / tau)`` for the query rows
  ``i in [row_offset, row_offset + num_rows)`` of the key matrix ``z``;
- backward: ``dz_k = (1/tau) sum_{j != k} (w_k P_kj + w_j P_jk) z_j`` for the same rows,
  with ``P_ij = exp(z_i . z_j / tau - lse_i)`` and ``w`` the per-row weights
  (the gradient flowing into ``lse``).

It walks over tiles of ``block_rows x block_cols`` similarities, so its memory is a few
tiles (``O(block_rows * block_cols)``) plus ``O(N * D)``, never the ``2N x 2N`` matrix, and
each tile is a matmul (the FLOPs) followed by few element-wise passes that stay in the cache.

On a CPU those passes, not the matmuls, set the speed, hence a fixed shift instead of a
running max. The rows are L2-normalised, so ``|s_ij| <= 1/tau =: c`` and

- forward: ``lse_i = c + log sum_j E_ij`` with ``E_ij = exp(s_ij - c)`` in ``[e^{-2c}, 1]``
  (one ``exp`` pass and one sum, no max);
- backward: ``w_k P_kj + w_j P_jk = E_kj (a_k + a_j)`` with ``a_i = w_i exp(c - lse_i)``, so
  ``dz_k = (1/tau) (a_k sum_j E_kj z_j + sum_j E_kj a_j z_j)``: one ``exp`` pass and one
  matmul of each tile with ``[z | a z]``.

Both need ``exp(+-2c)`` inside fp32's normal range: below ``FIXED_SHIFT_MIN_TEMPERATURE``
the tiles fall back to a per-tile log-sum-exp and the two-exponential form.
"""

from __future__ import annotations

import math

import torch

#: Rows of one tile: large enough that each tile's matmul reuses its key rows well.
BLOCK_ROWS = 512
#: Columns of one tile: a ``BLOCK_ROWS x BLOCK_COLS`` fp32 tile is 2 MiB and stays in cache.
BLOCK_COLS = 1024
#: Smallest temperature of the fixed-shift tiles: exp(2 / tau) stays below fp32's maximum.
FIXED_SHIFT_MIN_TEMPERATURE = 0.025


def _tiles(total: int, block: int) -> range:
    """Return the start of every tile of ``block`` along ``total``."""
    return range(0, total, block)


def _mask_self(s: torch.Tensor, first_row: int, first_col: int, value: float) -> None:
    """Set ``s[:, i, j] = value`` in place where row ``first_row + i`` is column ``first_col + j``."""
    offset = first_row - first_col
    if -s.shape[-2] < offset < s.shape[-1]:
        s.diagonal(offset=offset, dim1=-2, dim2=-1).fill_(value)


def lse_forward_torch(
    z: torch.Tensor,
    row_offset: int,
    num_rows: int,
    temperature: float,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
) -> torch.Tensor:
    """Masked row log-sum-exp of the similarities of some rows of ``z`` against all its rows.

    Args:
        z: (B, R, D) L2-normalised embeddings (the keys; any float dtype, computed in fp32).
        row_offset: index of the first query row in ``z``.
        num_rows: number of query rows, ``row_offset + num_rows <= R``.
        temperature: the softmax temperature ``tau > 0``.
        block_rows: rows per tile.
        block_cols: columns per tile.

    Returns:
        (B, num_rows) fp32: ``lse_i = log sum_{j != row_offset + i} exp(z_{row_offset+i} . z_j / tau)``.
    """
    batch, total, _ = z.shape
    shift = 1.0 / temperature
    fixed_shift = temperature >= FIXED_SHIFT_MIN_TEMPERATURE
    zf = z.float()
    lse = torch.empty(batch, num_rows, dtype=torch.float32, device=z.device)
    for r0 in _tiles(num_rows, block_rows):
        r1 = min(r0 + block_rows, num_rows)
        # Scaling the (small) query block once is cheaper than scaling every tile.
        q = zf[:, row_offset + r0 : row_offset + r1] * shift
        sums, chunk_lse = torch.zeros(batch, r1 - r0, device=z.device), []
        for c0 in _tiles(total, block_cols):
            s_qk = torch.einsum("bmd,bnd->bmn", q, zf[:, c0 : c0 + block_cols])
            if fixed_shift:
                e_qk = s_qk.sub_(shift).exp_()  # E = exp(s - c)
                _mask_self(e_qk, row_offset + r0, c0, 0.0)
                sums += e_qk.sum(dim=-1)
            else:
                _mask_self(s_qk, row_offset + r0, c0, -math.inf)
                chunk_lse.append(torch.logsumexp(s_qk, dim=-1))
        if fixed_shift:
            lse[:, r0:r1] = sums.log_().add_(shift)
        else:
            lse[:, r0:r1] = torch.logsumexp(torch.stack(chunk_lse, dim=-1), dim=-1)
    return lse


def lse_backward_torch(
    z: torch.Tensor,
    lse: torch.Tensor,
    weight: torch.Tensor,
    row_offset: int,
    num_rows: int,
    temperature: float,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
) -> torch.Tensor:
    """Gradient of ``sum_i weight_i * lse_i`` (over ALL rows of ``z``) for the query rows.

    Because the similarity matrix is symmetric, one recomputed tile gives both
    ``P_kj`` (row k's softmax) and ``P_jk`` (row j's softmax, through ``lse_j``), so a row
    block gets its whole gradient from one pass over the columns.

    Args:
        z: (B, R, D) L2-normalised embeddings.
        lse: (B, R) fp32 row log-sum-exps of all rows of ``z``.
        weight: (B, R) fp32 weights of the rows' ``lse`` in the loss.
        row_offset: index of the first row whose gradient is wanted.
        num_rows: number of those rows.
        temperature: the softmax temperature ``tau > 0``.
        block_rows: rows per tile.
        block_cols: columns per tile.

    Returns:
        (B, num_rows, D) in ``z.dtype``: ``dz_k = (1/tau) sum_{j != k} (w_k P_kj + w_j P_jk) z_j``.
    """
    batch, total, dim = z.shape
    shift = 1.0 / temperature
    fixed_shift = temperature >= FIXED_SHIFT_MIN_TEMPERATURE
    zf = z.float()
    if fixed_shift:
        a = weight * torch.exp(shift - lse)  # (B, R): a_i = w_i exp(c - lse_i)
        z_az = torch.cat([zf, zf * a[..., None]], dim=-1)  # (B, R, 2D): [z_j | a_j z_j]
    dz = torch.empty(batch, num_rows, dim, dtype=z.dtype, device=z.device)
    for r0 in _tiles(num_rows, block_rows):
        r1 = min(r0 + block_rows, num_rows)
        rows = slice(row_offset + r0, row_offset + r1)
        q = zf[:, rows] * shift
        acc = torch.zeros(batch, r1 - r0, 2 * dim if fixed_shift else dim, device=z.device)
        for c0 in _tiles(total, block_cols):
            cols = slice(c0, c0 + block_cols)
            s_qk = torch.einsum("bmd,bnd->bmn", q, zf[:, cols])
            if fixed_shift:
                e_qk = s_qk.sub_(shift).exp_()  # E_kj; the weights are E_kj (a_k + a_j)
                _mask_self(e_qk, row_offset + r0, c0, 0.0)
                acc.baddbmm_(e_qk, z_az[:, cols])
            else:
                p_row = torch.sub(s_qk, lse[:, rows, None]).exp_().mul_(weight[:, rows, None])  # w_k P_kj
                # In place on s_qk: w_j P_jk, then the sum of both -- the tile's gradient weights.
                w_qk = s_qk.sub_(lse[:, None, cols]).exp_().mul_(weight[:, None, cols]).add_(p_row)
                _mask_self(w_qk, row_offset + r0, c0, 0.0)
                acc.baddbmm_(w_qk, zf[:, cols])
        if fixed_shift:
            acc = torch.addcmul(acc[..., dim:], a[:, rows, None], acc[..., :dim])
        dz[:, r0:r1] = acc * shift
    return dz
