"""NT-Xent loss: Triton kernels (interpreted on the CPU) and the chunked torch path against a
deliberately naive reference that builds the whole similarity matrix in float64
(``tests/kernels/ntxent_reference.py``, whose cases ``python -m benchmarks.gpu_check`` runs on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import NTXentLoss, nt_xent
from kernels.ntxent_torch import lse_backward_torch, lse_forward_torch
from tests.kernels.ntxent_reference import CASES, Case, check_against_reference, check_every_block_config

IMPLS = ["triton", "torch"]
CPU = torch.device("cpu")

INTERPRETER_BF16 = pytest.mark.xfail(
    strict=True,
    reason="the Triton interpreter keeps bf16 as uint16 and tl.dot multiplies the raw bits; "
    "compiled kernels on a GPU are not affected (test_ntxent_cuda.py checks them)",
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_matches_reference(impl: str, case: Case, request: pytest.FixtureRequest) -> None:
    """Loss and both gradients against the fp64 reference (the cases gpu_check runs on CUDA)."""
    if impl == "triton" and case.dtype == torch.bfloat16:
        request.applymarker(INTERPRETER_BF16)
    case.run(impl, CPU)


def test_every_block_config_under_interpreter() -> None:
    check_every_block_config(CPU)


def test_torch_path_large() -> None:
    gen = torch.Generator().manual_seed(6)
    z0, z1 = torch.randn(2, 2000, 32, generator=gen)
    check_against_reference("torch", z0, z1, temperature=0.1)


@pytest.mark.parametrize("temperature", [0.1, 0.01])  # fixed-shift tiles and the fallback
def test_torch_path_tiles_match_one_tile(temperature: float) -> None:
    """The tiling (row and column blocks, diagonal crossing tile borders) changes nothing."""
    gen = torch.Generator().manual_seed(7)
    z = F.normalize(torch.randn(2, 300, 16, generator=gen), dim=-1)
    weight = torch.rand(2, 300, generator=gen) - 0.3
    lse = lse_forward_torch(z, 0, 300, temperature, block_rows=300, block_cols=300)
    torch.testing.assert_close(lse_forward_torch(z, 0, 300, temperature, block_rows=7, block_cols=33), lse)
    dz = lse_backward_torch(z, lse, weight, 0, 300, temperature, block_rows=300, block_cols=300)
    torch.testing.assert_close(lse_backward_torch(z, lse, weight, 0, 300, temperature, 7, 33), dz)
    torch.testing.assert_close(lse_forward_torch(z, 100, 50, temperature, 7, 33), lse[:, 100:150])


# ------------------------------- closed form and properties -----------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_orthogonal_identical_views_by_hand(impl: str) -> None:
    """z0 = z1 = rows of the identity: s_partner = 1/tau, the 2N - 2 others are 0."""
    n, tau = 5, 0.5
    z = torch.eye(n, 8)
    expected = -1 / tau + math.log(math.exp(1 / tau) + 2 * n - 2)
    loss = nt_xent(z, z.clone(), temperature=tau, impl=impl)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_high_temperature_limit(impl: str) -> None:
    """As tau grows every logit tends to 0: the loss tends to log(2N - 1)."""
    z0 = torch.randn(6, 10)
    loss = nt_xent(z0, z0.clone(), temperature=1e6, impl=impl)
    assert loss.item() == pytest.approx(math.log(11), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_symmetric_in_views_and_norm_invariant(impl: str) -> None:
    gen = torch.Generator().manual_seed(8)
    z0, z1 = torch.randn(2, 19, 12, generator=gen)
    loss = nt_xent(z0, z1, impl=impl)
    torch.testing.assert_close(nt_xent(z1, z0, impl=impl), loss)
    torch.testing.assert_close(nt_xent(3.0 * z0, 0.25 * z1, impl=impl), loss)


def test_auto_module_and_no_process_group() -> None:
    gen = torch.Generator().manual_seed(9)
    z0, z1 = torch.randn(2, 11, 12, generator=gen)
    loss = nt_xent(z0, z1, temperature=0.3, impl="torch")
    torch.testing.assert_close(nt_xent(z0, z1, temperature=0.3), loss)
    torch.testing.assert_close(nt_xent(z0, z1, temperature=0.3, gather_distributed=True), loss)
    module = NTXentLoss(temperature=0.3, gather_distributed=True)
    torch.testing.assert_close(module(z0, z1), loss)
    assert "temperature=0.3" in repr(module)


# ------------------------------------- bad input ------------------------------------------

Z = torch.randn(4, 8)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"z0": Z, "z1": torch.randn(5, 8)}, "z1"),
        ({"z0": Z, "z1": torch.randn(4, 8, dtype=torch.float64)}, "z1"),
        ({"z0": Z, "z1": torch.randn(4, 8, device="meta")}, "z1"),
        ({"z0": torch.randn(0, 8), "z1": torch.randn(0, 8)}, "z0"),
        ({"z0": torch.randn(4, 0), "z1": torch.randn(4, 0)}, "z0"),
        ({"z0": torch.randn(8), "z1": torch.randn(8)}, "z0"),
        ({"z0": torch.ones(4, 8, dtype=torch.long), "z1": torch.ones(4, 8, dtype=torch.long)}, "z0"),
        ({"z0": Z, "z1": Z, "temperature": 0.0}, "temperature"),
        ({"z0": Z, "z1": Z, "temperature": -0.1}, "temperature"),
        ({"z0": Z, "z1": Z, "temperature": math.nan}, "temperature"),
        ({"z0": Z, "z1": Z, "temperature": torch.tensor(0.1)}, "temperature"),
        ({"z0": Z, "z1": Z, "impl": "cuda"}, "impl"),
        ({"z0": Z}, "groups"),
        ({"z0": Z, "groups": torch.tensor([0, 0, 1, 2])}, "groups"),
        ({"z0": Z, "groups": torch.tensor([0.0, 0.0, 1.0, 1.0])}, "groups"),
        ({"z0": Z, "groups": torch.tensor([0, 0, 1])}, "groups"),
        ({"z0": Z, "z1": Z, "groups": torch.zeros(4, 1, dtype=torch.long)}, "groups"),
        ({"z0": Z, "z1": Z, "sizes": [4, 4]}, "sizes"),  # one process: one count
        ({"z0": Z, "z1": Z, "sizes": [3]}, "sizes"),  # not this rank's rows
        ({"z0": Z, "z1": Z, "sizes": [-1]}, "sizes"),
        ({"z0": torch.randn(0, 8), "z1": torch.randn(0, 8), "sizes": [0]}, "sizes"),  # no rank holds a row
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        nt_xent(**kwargs)


def test_module_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="^temperature:"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="^impl:"):
        NTXentLoss(impl="fast")  # type: ignore[arg-type]


def test_without_triton_the_torch_path_serves(tmp_path):
    """Where triton is not installed (it is a Linux-only dependency) kernels still imports and runs."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from kernels import nt_xent\n"
        "z0, z1 = torch.randn(5, 8), torch.randn(5, 8)\n"
        "assert torch.isfinite(nt_xent(z0, z1))\n"
        "try:\n"
        "    nt_xent(z0, z1, impl='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "impl: 'triton' needs the triton package" in out.stdout
