"""The fp64 reference of the NT-Xent loss and the cases every implementation is checked on.

Plain functions, no pytest: ``tests/kernels/test_ntxent.py`` runs the cases on the CPU (the
Triton kernels under ``TRITON_INTERPRET=1``), ``python -m benchmarks.gpu_check`` runs the same
cases compiled on CUDA, and ``tests/kernels/test_ntxent_cuda.py`` reports the latter in pytest.

Inputs are drawn on the CPU from a seeded generator and then moved, so every device checks
the same numbers; the reference is computed on the CPU in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.ntxent import nt_xent
from kernels.ntxent_torch import lse_backward_torch, lse_forward_torch

#: The one dtype -> tolerance table: inputs of this dtype are compared with the fp64 reference.
TOLERANCE = {
    torch.float32: {"atol": 5e-5, "rtol": 2e-4},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}
#: The upstream gradient of every check: != 1, so a kernel that ignores it fails.
GRAD_OUTPUT = 1.7

Inputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def reference_nt_xent(
    z0: torch.Tensor, z1: torch.Tensor | None, groups: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Textbook NT-Xent / SupCon in float64: the whole (B, R, R) matrix, positives as a mask.

    Args:
        z0: (N, D) or (B, N, D) first views (or all rows when ``z1`` is None).
        z1: second views like ``z0``, or None.
        groups: (N,) or (B, N) integer ids, or None for pairs.
        temperature: the softmax temperature.

    Returns:
        The scalar float64 mean loss.
    """
    z = z0 if z1 is None else torch.cat([z0, z1], dim=-2)
    if z.dim() == 2:
        z = z[None]
    batch, rows, _ = z.shape
    n = z0.shape[-2]
    if groups is None:
        ids = torch.arange(n, device=z.device).repeat(2).expand(batch, rows)
    else:
        ids = groups.expand(batch, n)
        ids = ids if z1 is None else torch.cat([ids, ids], dim=1)
    z = F.normalize(z.double(), dim=-1)
    sim = torch.einsum("bid,bjd->bij", z, z) / temperature
    diag_mask = torch.eye(rows, dtype=torch.bool, device=z.device)
    pos_mask = (ids[:, :, None] == ids[:, None, :]) & ~diag_mask
    log_prob = sim - torch.logsumexp(sim.masked_fill(diag_mask, -math.inf), dim=-1, keepdim=True)
    loss = -(log_prob * pos_mask).sum(-1) / pos_mask.sum(-1)
    return loss.mean()


def check_against_reference(
    impl: str,
    z0: torch.Tensor,
    z1: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> None:
    """Assert loss and both inputs' gradients (upstream gradient ``GRAD_OUTPUT``) match the reference.

    Args:
        impl: ``"triton"`` or ``"torch"``, passed to :func:`nt_xent`.
        z0, z1, groups, temperature: the inputs, on the device under test.

    Raises:
        AssertionError: a loss or gradient outside ``TOLERANCE[z0.dtype]``.
    """
    inputs = [z0] if z1 is None else [z0, z1]
    leaves = [x.detach().requires_grad_() for x in inputs]
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    loss = nt_xent(*leaves, groups=groups, temperature=temperature, impl=impl)  # type: ignore[arg-type]
    loss.backward(torch.tensor(GRAD_OUTPUT, device=loss.device))
    ref_groups = None if groups is None else groups.cpu()
    ref = reference_nt_xent(*ref_leaves, *([None] if z1 is None else []), ref_groups, temperature)
    ref.backward(torch.tensor(GRAD_OUTPUT, dtype=torch.float64))
    tol = TOLERANCE[z0.dtype]
    torch.testing.assert_close(loss.detach().cpu().double(), ref, **tol)
    # Gradients are sums of terms of size ~ 1 / (rows * tau) that may cancel (to exactly 0 at
    # N = 1): compare them relative to their largest entry, or to that term size if larger.
    term = 1.0 / (sum(x.numel() for x in inputs) / z0.shape[-1] * temperature)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        scale = ref_leaf.grad.abs().max().clamp_min(term)
        torch.testing.assert_close(leaf.grad.cpu().double() / scale, ref_leaf.grad / scale, **tol)


@dataclass(frozen=True)
class Case:
    """One comparison with the reference.

    Args:
        name: short identifier (test id, gpu_check line).
        make: draws the inputs from a seeded CPU generator and puts them on a device:
            ``make(generator, device) -> (z0, z1, groups)``.
        temperature: the softmax temperature.
        dtype: the input dtype (the tolerance table's key).
        seed: the generator's seed.
    """

    name: str
    make: Callable[[torch.Generator, torch.device], Inputs]
    temperature: float
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def run(self, impl: str, device: torch.device) -> None:
        """Check :func:`nt_xent` with ``impl`` on ``device`` against the reference (raises AssertionError)."""
        z0, z1, groups = self.make(torch.Generator().manual_seed(self.seed), device)
        cast = [None if x is None else x.to(self.dtype) for x in (z0, z1)]
        check_against_reference(impl, cast[0], cast[1], groups, self.temperature)


def _pairs(n: int, dim: int, batch: int | None = None) -> Callable[[torch.Generator, torch.device], Inputs]:
    """Two views of ``n`` samples, (N, D) or (B, N, D)."""

    def make(gen: torch.Generator, device: torch.device) -> Inputs:
        shape = (2, n, dim) if batch is None else (2, batch, n, dim)
        z0, z1 = torch.randn(shape, generator=gen).to(device)
        return z0, z1, None

    return make


def _non_contiguous(grouped: bool) -> Callable[[torch.Generator, torch.device], Inputs]:
    """Column-major and strided views; with ``grouped`` z0 alone reaches the kernel strided."""

    def make(gen: torch.Generator, device: torch.device) -> Inputs:
        z0 = torch.randn(40, 70, generator=gen).to(device).T  # (70, 40), column-major
        z1 = torch.randn(70, 80, generator=gen).to(device)[:, ::2]
        if not grouped:
            return z0, z1, None
        return z0, None, (torch.arange(70) % 9).to(device)

    return make


def _grouped_single_view(gen: torch.Generator, device: torch.device) -> Inputs:
    """SupCon: one view, arbitrary non-contiguous ids, every id at least twice."""
    z = torch.randn(150, 24, generator=gen)
    groups = torch.randint(0, 12, (150,), generator=gen) * 7 - 30
    groups[:24] = torch.arange(12).repeat(2) * 7 - 30
    return z.to(device), None, groups.to(device)


def _pairs_with_partition_groups(gen: torch.Generator, device: torch.device) -> Inputs:
    """Pairs plus same-group positives; a singleton group still has its partner."""
    z0, z1 = torch.randn(2, 66, 32, generator=gen)
    groups = torch.randint(0, 5, (66,), generator=gen)
    return z0.to(device), z1.to(device), groups.to(device)


def _batched_groups(gen: torch.Generator, device: torch.device) -> Inputs:
    """(B, N, D) single views with different groups per problem."""
    z0 = torch.randn(2, 3, 37, 20, generator=gen)[0]
    groups = torch.randint(0, 4, (3, 37), generator=gen)
    groups[:, :8] = torch.arange(4).repeat(2)
    return z0.to(device), None, groups.to(device)


def _antipodal(gen: torch.Generator, device: torch.device) -> Inputs:
    """Partners at s = -1/tau, the extreme of the logits."""
    z0 = torch.randn(9, 8, generator=gen).to(device)
    return z0, -z0, None


# Every N, D and tau of the kernel issue appears at least once (not the whole product: the
# interpreter is slow); 130 pairs = 260 rows span several row and column blocks, D = 130 two
# D chunks; 300 pairs in 16-bit span several blocks too.
CASES: list[Case] = [
    Case("pairs-n1-d16", _pairs(1, 16), 0.05, seed=1016),
    Case("pairs-n2-d130", _pairs(2, 130), 0.1, seed=2130),
    Case("pairs-n3-d1", _pairs(3, 1), 0.5, seed=3001),
    Case("pairs-n17-d64", _pairs(17, 64), 1.0, seed=17064),
    Case("pairs-n130-d130", _pairs(130, 130), 0.05, seed=130130),
    Case("pairs-n130-d1", _pairs(130, 1), 0.1, seed=130001),
    Case("non-contiguous-pairs", _non_contiguous(grouped=False), 0.2, seed=1),
    Case("non-contiguous-grouped", _non_contiguous(grouped=True), 0.2, seed=1),
    Case("grouped-single-view", _grouped_single_view, 0.1, seed=2),
    Case("pairs-partition-groups", _pairs_with_partition_groups, 0.1, seed=3),
    Case("batched-pairs", _pairs(37, 20, batch=3), 0.1, seed=4),
    Case("batched-groups", _batched_groups, 0.5, seed=4),
    Case("fp16-pairs-n300", _pairs(300, 32), 0.5, torch.float16, seed=5),
    Case("bf16-pairs-n300", _pairs(300, 32), 0.5, torch.bfloat16, seed=5),
    Case("tau0.01-antipodal", _antipodal, 0.01, seed=10),
    Case("tau0.01-random", _pairs(9, 8), 0.01, seed=10),
    Case("tau0.025-antipodal", _antipodal, 0.025, seed=10),
    Case("tau0.025-random", _pairs(9, 8), 0.025, seed=10),
]


def check_every_block_config(device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Every autotuning candidate of both kernels computes what the torch path computes.

    Autotuning launches whichever candidate is fastest, so each must be right, not only the
    one the other cases happen to get. 150 key rows, the 130 query rows from row 20 on (a
    rank's slice, as with ``gather_distributed``) and D = 24 are multiples of no block.

    Raises:
        AssertionError: a candidate's ``lse`` or gradient differs from the torch path's.
    """
    from kernels.ntxent_triton import BWD_CONFIGS, FWD_CONFIGS, describe_config, ntxent_backward, ntxent_forward

    gen = torch.Generator().manual_seed(11)
    rows, first, count, tau = 150, 20, 130, 0.1
    # Rounded to dtype first: the torch path then sees exactly the kernels' inputs.
    z = F.normalize(torch.randn(1, rows, 24, generator=gen), dim=-1).to(dtype).float()
    weight = torch.rand(1, rows, generator=gen) - 0.3
    lse = lse_forward_torch(z, 0, rows, tau)
    dz = lse_backward_torch(z, lse, weight, first, count, tau).double()
    z_dev, lse_dev, weight_dev = z.to(device, dtype), lse.to(device), weight.to(device)
    tol = TOLERANCE[dtype]
    for config in FWD_CONFIGS:
        got = ntxent_forward(z_dev, first, count, tau, config=config)
        torch.testing.assert_close(
            got.cpu(), lse[:, first:], **tol, msg=lambda m, c=config: f"forward {describe_config(c)}: {m}"
        )
    scale = dz.abs().max()
    for config in BWD_CONFIGS:
        got = ntxent_backward(z_dev, lse_dev, weight_dev, first, count, tau, config=config)
        torch.testing.assert_close(
            got.cpu().double() / scale, dz / scale, **tol, msg=lambda m, c=config: f"backward {describe_config(c)}: {m}"
        )
