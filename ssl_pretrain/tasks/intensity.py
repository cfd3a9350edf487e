"""Batched random MRI intensity transforms, shared by the pretext tasks.

* :func:`bezier_remap` — a random monotone cubic Bézier curve on the min-max rescaled slice,
  optionally flipped to a decreasing curve (a contrast-inversion-like remap, T1 vs T2). The
  regression task's non-linear intensity corruption and the contrastive views' ``remap_prob`` use it.
* :func:`bias_field` — a smooth multiplicative MRI bias field, ``exp`` of a random Legendre
  polynomial in the normalised x, y coordinates, like MONAI's ``RandBiasField``.

Every sample gets its own random parameters, the work is done for the whole batch at once, and all
randomness comes from an explicit ``torch.Generator`` (MONAI's transforms work per sample and draw
from numpy's RNG, which would break the per-run reproducibility of the tasks).
"""

from __future__ import annotations

import torch

__all__ = ["bezier_remap", "bias_field"]


def _minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(lo, span)`` of ``x`` ``(B, C, *spatial)``, each ``(B, 1, …, 1)``."""
    dims = tuple(range(1, x.ndim))
    lo = x.amin(dim=dims, keepdim=True)
    return lo, (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-6)


def bezier_remap(x: torch.Tensor, g: torch.Generator, invert_prob: float) -> torch.Tensor:
    """Random monotone cubic Bézier intensity curve per sample, on the min-max rescaled slice.

    Args:
        x: ``(B, C, H, W)`` float images (or ``(B, C, D, H, W)`` volumes).
        g: Generator on ``x.device``; draws ``(B, 2)`` and ``(B, 2)`` control points, then ``(B,)``
            inversion draws (always, whatever ``invert_prob``: the draw count does not depend on it).
        invert_prob: Probability per sample that the curve is flipped to a decreasing one.

    Returns:
        ``(B, C, H, W)`` remapped images in each sample's original ``[min, max]`` range.
    """
    b = x.shape[0]
    dev = x.device
    lo, span = _minmax(x)
    n = ((x - lo) / span).clamp(0, 1)
    # control points; p0 = (0, 0), p3 = (1, 1)
    p1, p2 = torch.rand((b, 2), generator=g, device=dev), torch.rand((b, 2), generator=g, device=dev)
    t = torch.linspace(0, 1, 65, device=dev)[None]
    # B(t) = 3(1-t)^2 t p1 + 3(1-t) t^2 p2 + t^3; x(t) is monotone for p1, p2 in the unit square
    c1, c2, c3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
    bx = (c1 * p1[:, :1] + c2 * p2[:, :1] + c3).contiguous()  # (B, 65)
    by = c1 * p1[:, 1:] + c2 * p2[:, 1:] + c3
    flat = n.reshape(b, -1).contiguous()
    hi_idx = torch.searchsorted(bx, flat).clamp(1, bx.shape[1] - 1)
    x0, x1 = bx.gather(1, hi_idx - 1), bx.gather(1, hi_idx)
    y0, y1 = by.gather(1, hi_idx - 1), by.gather(1, hi_idx)
    w = ((flat - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0, 1)
    y = (y0 + w * (y1 - y0)).reshape_as(x)
    flip = (torch.rand((b,), generator=g, device=dev) < invert_prob).view(b, *[1] * (x.ndim - 1))
    y = torch.where(flip, 1 - y, y)
    return y * span + lo


def _legendre(t: torch.Tensor, order: int) -> torch.Tensor:
    """Legendre polynomials ``P_0 .. P_order`` at ``t``: ``(order + 1, len(t))``."""
    p = [torch.ones_like(t), t]
    for n in range(1, order):
        p.append(((2 * n + 1) * t * p[n] - n * p[n - 1]) / (n + 1))
    return torch.stack(p[: order + 1])


def bias_field(x: torch.Tensor, g: torch.Generator, strength: float, order: int) -> torch.Tensor:
    """Multiply every sample by its own smooth random bias field, relative to its minimum.

    The log-field is ``sum c_ij P_i(x) P_j(y)`` over ``i + j <= order`` (Legendre polynomials in the
    coordinates normalised to ``[-1, 1]``, as MONAI's ``RandBiasField`` with
    ``coeff_range=(-strength, strength)``) with ``c_ij ~ U(±strength)``. MONAI's 2-D field keeps
    the terms ``j <= i`` (``tril_indices``, up to degree ``2 * order``); total degree ``<= order``
    is what its 3-D field and its docs mean, and keeps the field as smooth as ``order`` says.
    It multiplies ``x - min`` rather than ``x``: slices are z-scored, so the minimum is background
    (negative) and multiplying ``x`` itself would scale the z-score offset instead of the signal.

    Args:
        x: ``(B, C, H, W)`` float images.
        g: Generator on ``x.device``; draws ``(B, K)`` coefficients, ``K = (order + 1)(order + 2) / 2``.
        strength: Coefficient range.
        order: Polynomial degree (>= 1).

    Returns:
        ``(B, C, H, W)`` images; the same field for every channel of a sample.
    """
    b, _, h, w = x.shape
    dev = x.device
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    coef = strength * (2 * torch.rand((b, len(terms)), generator=g, device=dev) - 1)
    py = _legendre(torch.linspace(-1, 1, h, device=dev), order)  # (order+1, H)
    px = _legendre(torch.linspace(-1, 1, w, device=dev), order)  # (order+1, W)
    basis = torch.stack([py[j][:, None] * px[i][None, :] for i, j in terms])  # (K, H, W)
    field = torch.exp(torch.einsum("bk,khw->bhw", coef, basis))[:, None].to(x.dtype)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    return lo + (x - lo) * field
