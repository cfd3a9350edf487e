"""Contrastive views and the geometry that relates them: batched random augmentations, matching points.

Two parts, both used by the contrastive task only:

* **Views.** Every sample of a batch gets its own random parameters, but the work is done for the
  whole batch at once: one ``affine_grid`` / ``grid_sample`` for random resized crop + flips +
  small rotation, per-sample brightness / contrast / gamma, Gaussian noise and a
  grouped-convolution Gaussian blur; for the protocol variety of multi-site MRI, optionally a
  random monotone or inverted Bézier intensity remap (``remap_prob``, ``invert_prob``) and a smooth
  multiplicative bias field (``bias_field``, ``bias_order``), see :mod:`ssl_pretrain.tasks.intensity`.
  All randomness comes from an explicit ``torch.Generator`` so
  a run (and its resume) is reproducible.
* **Local-loss geometry.** The geometric part of a view is returned as ``theta`` (``(B, 2, 3)``,
  the ``affine_grid`` convention: input coordinate = ``theta @ [output x, output y, 1]``), which
  lets the local contrastive loss find the same anatomical point in both views
  (:func:`matching_points`) and read features there (:func:`sample_at`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_pretrain.config import FieldError, option
from ssl_pretrain.tasks.intensity import bezier_remap, bias_field

__all__ = ["ContrastiveAugmentConfig", "random_view", "two_views", "matching_points", "sample_at"]


@dataclass
class ContrastiveAugmentConfig:
    """Ranges of the random view augmentations (SimCLR-style, tuned down for MRI)."""

    crop_scale: tuple[float, ...] = option(
        (0.5, 1.0), "random resized crop: (min, max) area fraction kept", gt=0, le=1, length=2
    )
    crop_ratio: tuple[float, ...] = option(
        (0.75, 1.333), "random resized crop: (min, max) aspect ratio", gt=0, length=2
    )
    flip_prob: float = option(0.5, "probability of a left-right flip", ge=0, le=1)
    vflip_prob: float = option(
        0.0, "probability of an up-down flip (off: slices are in canonical RAS, upside-down anatomy is implausible)",
        ge=0, le=1,
    )
    rotate_deg: float = option(10.0, "small rotation: angle drawn uniformly in ±rotate_deg degrees", ge=0)
    brightness: float = option(0.2, "brightness shift: ± this many image standard deviations", ge=0)
    contrast: float = option(0.2, "contrast factor drawn in 1 ± contrast", ge=0, lt=1)
    gamma: float = option(0.3, "gamma drawn as exp(U(-gamma, gamma)), applied on the min-max rescaled image", ge=0)
    noise_std: float = option(0.05, "Gaussian noise std, as a fraction of the image standard deviation", ge=0)
    blur_prob: float = option(0.3, "probability of a Gaussian blur", ge=0, le=1)
    blur_sigma: tuple[float, ...] = option((0.3, 1.0), "blur sigma range in pixels", gt=0, length=2)
    remap_prob: float = option(
        0.0, "probability of a random monotone Bézier intensity remap on the min-max rescaled image (0 = off)",
        ge=0, le=1,
    )
    invert_prob: float = option(
        0.0, "probability that a remap is a decreasing curve (contrast inversion-like, T1 vs T2); needs remap_prob > 0",
        ge=0, le=1,
    )
    bias_field: float = option(
        0.0, "MRI bias field: exp(Legendre polynomial in x, y), coefficients drawn in ± this (0 = off)", ge=0
    )
    bias_order: int = option(3, "polynomial degree of the bias field", ge=1)

    def check_fields(self) -> None:
        """Ranges must be ordered (each value's bounds are checked by the config loader)."""
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise FieldError(f"{name}: need min <= max, got {[lo, hi]}")

def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _random_theta(b: int, cfg: ContrastiveAugmentConfig, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample affine ``(B, 2, 3)``: random resized crop, flips, rotation."""
    area = _uniform(b, cfg.crop_scale[0], cfg.crop_scale[1], g, device)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, device)
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    # the crop centre keeps the crop inside the image
    tx = (2 * torch.rand(b, generator=g, device=device) - 1) * (1 - sx)
    ty = (2 * torch.rand(b, generator=g, device=device) - 1) * (1 - sy)
    fx = torch.where(torch.rand(b, generator=g, device=device) < cfg.flip_prob, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=g, device=device) < cfg.vflip_prob, -1.0, 1.0)
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, g, device) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3, device=device)
    # A = R(angle) @ diag(sx * fx, sy * fy); input = A @ output + t
    theta[:, 0, 0] = cos * sx * fx
    theta[:, 0, 1] = -sin * sy * fy
    theta[:, 1, 0] = sin * sx * fx
    theta[:, 1, 1] = cos * sy * fy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each sample of ``x`` ``(B, C, H, W)`` with its own ``sigma`` ``(B,)`` (separable, grouped conv)."""
    b, c, h, w = x.shape
    # the kernel size comes from the config, not from sigma: no host sync
    radius = max(1, min(math.ceil(3 * max_sigma), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None].to(x.dtype)) ** 2)  # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def random_view(
    x: torch.Tensor, cfg: ContrastiveAugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view of every sample of a batch.

    Args:
        x: Images ``(B, C, H, W)`` float.
        cfg: Augmentation ranges.
        g: Generator on ``x.device``; the only source of randomness.

    Returns:
        ``(view (B, C, H, W), theta (B, 2, 3))`` where ``theta`` maps view coordinates to ``x``
        coordinates (normalised to [-1, 1], ``align_corners=False``).
    """
    b, c, h, w = x.shape
    dev = x.device
    theta = _random_theta(b, cfg, g, dev)
    grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, 1, 1, 1).to(x.dtype)

    # tissue contrast, then the coil's bias field, then the scanner-level changes below; each is
    # skipped (and draws nothing) when off, so runs with the defaults reproduce older ones bit for bit
    if cfg.remap_prob > 0:
        do_remap = torch.rand(b, generator=g, device=dev) < cfg.remap_prob
        v = torch.where(per_sample(do_remap).bool(), bezier_remap(v, g, cfg.invert_prob), v)
    if cfg.bias_field > 0:
        v = bias_field(v, g, cfg.bias_field, cfg.bias_order)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    std = v.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    contrast = per_sample(_uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, dev))
    shift = per_sample(_uniform(b, -cfg.brightness, cfg.brightness, g, dev))
    v = (v - mean) * contrast + mean + shift * std
    # gamma on the min-max rescaled image, mapped back to the original range
    lo = v.amin(dim=(1, 2, 3), keepdim=True)
    hi = v.amax(dim=(1, 2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    gamma = per_sample(torch.exp(_uniform(b, -cfg.gamma, cfg.gamma, g, dev)))
    v = ((v - lo) / span).clamp(0, 1).pow(gamma) * span + lo
    v = v + per_sample(torch.full((b,), cfg.noise_std, device=dev)) * std * torch.randn(
        v.shape, generator=g, device=dev, dtype=v.dtype
    )
    if cfg.blur_prob > 0:
        do_blur = torch.rand(b, generator=g, device=dev) < cfg.blur_prob
        sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], g, dev)
        v = torch.where(per_sample(do_blur).bool(), _gaussian_blur(v, sigma, cfg.blur_sigma[1]), v)
    return v, theta


def two_views(
    x: torch.Tensor, cfg: ContrastiveAugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two independent random views of every slice: ``(v0, v1, theta0, theta1)``, see :func:`random_view`."""
    v0, t0 = random_view(x, cfg, g)
    v1, t1 = random_view(x, cfg, g)
    return v0, v1, t0, t1


def matching_points(
    theta0: torch.Tensor, theta1: torch.Tensor, k: int, g: torch.Generator, margin: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``k`` points per sample that both views show, in each view's own coordinates.

    Candidates are drawn in view 0, mapped to the original image and into view 1; the ``k``
    candidates that land inside view 1 (random order among them) are kept — no host sync.

    Args:
        theta0: ``(B, 2, 3)`` view-0 → image affine.
        theta1: ``(B, 2, 3)`` view-1 → image affine.
        k: Points per sample.
        g: Generator on the thetas' device.
        margin: Points stay within ``[-margin, margin]`` of both views.

    Returns:
        ``(u0, u1)``, each ``(B, k, 2)`` (x, y) in ``[-1, 1]`` view coordinates.
    """
    b = theta0.shape[0]
    m = 4 * k
    u0 = (2 * torch.rand(b, m, 2, generator=g, device=theta0.device) - 1) * margin
    p = torch.einsum("bij,bmj->bmi", theta0[:, :, :2], u0) + theta0[:, None, :, 2]
    a1_inv = torch.linalg.inv(theta1[:, :, :2])
    u1 = torch.einsum("bij,bmj->bmi", a1_inv, p - theta1[:, None, :, 2])
    inside = (u1.abs() <= margin).all(-1).float()
    score = inside + 0.5 * torch.rand(b, m, generator=g, device=theta0.device)
    idx = score.topk(k, dim=1).indices[..., None].expand(b, k, 2)
    return u0.gather(1, idx), u1.gather(1, idx)


def sample_at(fmap: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample feature vectors at points.

    Args:
        fmap: ``(B, D, h, w)``.
        points: ``(B, k, 2)`` (x, y) in ``[-1, 1]``.

    Returns:
        ``(B, k, D)``.
    """
    out = F.grid_sample(fmap, points[:, :, None, :].to(fmap.dtype), mode="bilinear", align_corners=False)
    return out[..., 0].transpose(1, 2)
