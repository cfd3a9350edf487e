"""Label-free health statistics of pretraining, computed from what a loss step already has.

Contrastive (on the projections ``z0``, ``z1`` ``(B, d)`` of the two views):

==================  =========================================================================
``std``             standard deviation over the batch of the L2-normalised projections, mean
                    over dimensions (lightly's collapse statistic): ≈ 1/√d for embeddings spread
                    over the sphere, → 0 when every slice gets the same embedding
``std_norm``        ``std × √d``: ≈ 1 healthy, → 0 collapsed (what the collapse warning watches)
``eff_rank``        effective rank (Roy & Vetterli 2007) of the normalised batch embeddings:
                    exp of the entropy of the normalised singular values; 1 for identical rows
``alignment``       mean squared distance of positive pairs on the sphere (Wang & Isola 2020;
                    lower is better, 0 = the two views coincide)
``uniformity``      log of the mean Gaussian potential exp(-2 ‖zᵢ - zⱼ‖²) over pairs (Wang &
                    Isola 2020; lower is more uniform, 0 = collapsed)
``top1``            positive-pair top-1 accuracy: view 0's nearest view-1 embedding is its own
==================  =========================================================================

Regression: ``psnr_restored`` and ``psnr_corrupted`` (dB, peak = each slice's intensity range),
and their difference ``psnr_gain`` (the gain over returning the corrupted input).

All are batched torch ops without host syncs; they return detached 0-d tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["contrastive_health", "regression_health", "effective_rank", "normalised_std", "psnr", "CollapseWatch"]


def normalised_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch standard deviation of the L2-normalised rows of ``z`` ``(B, d)``."""
    return F.normalize(z.float(), dim=1).std(dim=0, unbiased=False).mean()


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """Effective rank of the L2-normalised rows of ``z`` ``(B, d)`` (1 ≤ value ≤ min(B, d))."""
    s = torch.linalg.svdvals(F.normalize(z.float(), dim=1))
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def contrastive_health(z0: torch.Tensor, z1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The contrastive statistics of the module docstring for projections ``z0``, ``z1`` ``(B, d)``."""
    z0, z1 = z0.detach().float(), z1.detach().float()
    n0, n1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    both = torch.cat([n0, n1])
    std = normalised_std(both)
    sq_dists = torch.pdist(both).square()
    top1 = ((n0 @ n1.T).argmax(1) == torch.arange(len(n0), device=n0.device)).float().mean()
    return {
        "std": std,
        "std_norm": std * math.sqrt(z0.shape[1]),
        "eff_rank": effective_rank(both),
        "alignment": (n0 - n1).square().sum(1).mean(),
        "uniformity": torch.log(torch.exp(-2 * sq_dists).mean()),
        "top1": top1,
    }


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the PSNR (dB) of ``estimate`` against ``target`` ``(B, C, *spatial)``;
    peak = target's range."""
    dims = tuple(range(1, target.ndim))
    peak = (target.amax(dim=dims) - target.amin(dim=dims)).clamp_min(1e-6)
    mse = (estimate.float() - target.float()).square().mean(dim=dims).clamp_min(1e-12)
    return (10 * torch.log10(peak.square() / mse)).mean()


def regression_health(restored: torch.Tensor, corrupted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """PSNR of the restoration and of the corrupted input, and the gain, for ``(B, C, H, W)`` batches."""
    with torch.no_grad():
        restored_db, corrupted_db = psnr(restored, target), psnr(corrupted, target)
    return {"psnr_restored": restored_db, "psnr_corrupted": corrupted_db, "psnr_gain": restored_db - corrupted_db}


class CollapseWatch:
    """Warns once when ``std_norm`` stays below ``threshold`` for ``patience`` consecutive logs.

    Args:
        threshold: Collapse level of ``std × √d`` (``train.collapse_std``).
        patience: Consecutive logs below it before the warning (``train.collapse_logs``).
    """

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold = threshold
        self.patience = patience
        self.below = 0
        self.warned = False

    def update(self, step: int, std_norm: float) -> str | None:
        """Record one log; returns the one warning line when the collapse is first confirmed."""
        self.below = self.below + 1 if std_norm < self.threshold else 0
        if self.below >= self.patience and not self.warned:
            self.warned = True
            return (f"step {step}: embeddings collapsed? std of the normalised projections × √d is {std_norm:.3g}, "
                    f"below {self.threshold} for {self.below} logs (≈ 1 is healthy)")
        return None
