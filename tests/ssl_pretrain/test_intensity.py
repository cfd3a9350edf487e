"""MRI intensity augmentations: Bézier remap (monotone / inverted) and bias field, in views and regression."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_pretrain.config import ConfigError, validate
from ssl_pretrain.tasks.regression import RegressionConfig, corrupt
from ssl_pretrain.tasks.views import ContrastiveAugmentConfig, random_view, two_views

# geometry and the older intensity augmentations off: a view is the image, up to rounding
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, rotate_deg=0.0,
                brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, blur_prob=0.0)


def _image(b: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(b, 1, size, size, generator=g), 5, 1, 2) * 3


def _ramp(b: int, size: int = 32) -> torch.Tensor:
    return torch.linspace(-2.0, 3.0, size * size).reshape(1, 1, size, size).repeat(b, 1, 1, 1)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _poly_fit_residual(logf: torch.Tensor, mask: torch.Tensor, degree: int) -> float:
    """Max abs residual of a least-squares fit of ``logf`` ``(H, W)`` by monomials x^i y^j, i + j <= degree."""
    h, w = logf.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    cols = [(xx**i * yy**j)[mask] for i in range(degree + 1) for j in range(degree + 1 - i)]
    a = torch.stack(cols, 1)
    target = logf.double()[mask]
    sol = torch.linalg.lstsq(a, target[:, None]).solution
    return float((a @ sol - target[:, None]).abs().max())


def test_defaults_reproduce_the_views_from_before_the_intensity_options() -> None:
    # recorded with the code before remap/bias_field existed (same image, seed 3)
    x = _image()
    g = torch.Generator().manual_seed(3)
    v0, v1, _, t1 = two_views(x, ContrastiveAugmentConfig(), g)
    torch.testing.assert_close(v0.double().sum().item(), 41.14884543442167, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(v1.double().sum().item(), 361.2831840351573, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(v0.abs().double().sum().item(), 2513.5273360947613, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(v0[1, 0, 5, 7].item(), -0.18045054376125336, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1.double().sum().item(), 3.7579987206263468, rtol=1e-6, atol=1e-6)
    # the generator advanced by exactly as many draws as before
    assert torch.rand(1, generator=g).item() == 0.36665642261505127


def test_intensity_options_off_draw_nothing() -> None:
    # remap_prob = 0 and bias_field = 0 switch them off whatever their companion options say
    x = _image()
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = two_views(x, ContrastiveAugmentConfig(), g0)
    off = two_views(x, ContrastiveAugmentConfig(remap_prob=0.0, invert_prob=1.0, bias_field=0.0, bias_order=5), g1)
    for a, b in zip(ref, off, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g0.get_state(), g1.get_state())
    on = two_views(x, ContrastiveAugmentConfig(remap_prob=1.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(on[0], ref[0])


def test_regression_corruption_unchanged_by_moving_the_bezier_curve() -> None:
    # recorded with regression.py's own _bezier_intensity, before it moved to tasks/intensity.py
    x = _image()
    g = torch.Generator().manual_seed(5)
    y = corrupt(x, RegressionConfig(), g)
    torch.testing.assert_close(y.double().sum().item(), -1473.4163937265112, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(y.abs().double().sum().item(), 3778.8033596483, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(y[5, 0, 30, 2].item(), -0.9366701245307922, rtol=1e-5, atol=1e-6)
    assert torch.rand(1, generator=g).item() == 0.2990342974662781
    g = torch.Generator().manual_seed(5)
    only_curve = RegressionConfig(intensity_prob=1.0, shuffle_prob=0.0, paint_prob=0.0, swap_prob=0.0)
    y = corrupt(x, only_curve, g)
    torch.testing.assert_close(y.double().sum().item(), -2668.916538774967, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(y.abs().double().sum().item(), 4135.796283304691, rtol=1e-6, atol=1e-3)


def test_bias_field_is_a_smooth_per_sample_polynomial_field() -> None:
    # a flat image whose minimum (0) is one pixel: the view is the field itself everywhere else
    b, size = 4, 32
    x = torch.ones(b, 1, size, size)
    x[:, :, 0, 0] = 0.0
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[0, 0] = False
    for order in (1, 3):
        cfg = ContrastiveAugmentConfig(**IDENTITY, bias_field=0.3, bias_order=order)
        validate(cfg)
        v, _ = random_view(x, cfg, torch.Generator().manual_seed(0))
        field = v[:, 0]  # x - min = 1 off the minimum pixel
        assert v[:, 0, 0, 0].abs().max() < 1e-6  # the minimum stays where it was
        for i in range(b):
            f = field[i][mask]
            assert f.min() > 0 and f.std() > 0.02  # a real, non-constant multiplicative field
            fi = field[i, 1:, 1:]
            tv = (fi - field[i, :-1, 1:]).abs().mean() + (fi - field[i, 1:, :-1]).abs().mean()
            assert tv < 0.1 * (f.max() - f.min())  # smooth: neighbours differ by a small part of the range
            # log-field is exactly a polynomial of degree `order` in x, y, and not of a lower one
            assert _poly_fit_residual(field[i].log(), mask, order) < 1e-4
            if order == 3:
                assert _poly_fit_residual(field[i].log(), mask, 1) > 1e-3
        assert not torch.allclose(field[0], field[1], atol=1e-3)  # each sample has its own field


def test_bias_field_multiplies_signal_above_the_minimum() -> None:
    x = _image(b=3)
    cfg = ContrastiveAugmentConfig(**IDENTITY, bias_field=0.5)
    v, _ = random_view(x, cfg, torch.Generator().manual_seed(2))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(v.amin(dim=(1, 2, 3), keepdim=True), lo)
    ratio = (v - lo) / (x - lo)
    strong = (x - lo) > 1.0
    assert ratio[strong].std() > 0.02 and ratio[strong].min() > 0


def test_remap_keeps_or_reverses_the_pixel_order() -> None:
    b = 4
    x = _ramp(b)
    up, _ = random_view(x, ContrastiveAugmentConfig(**IDENTITY, remap_prob=1.0), torch.Generator().manual_seed(0))
    down, _ = random_view(x, ContrastiveAugmentConfig(**IDENTITY, remap_prob=1.0, invert_prob=1.0),
                          torch.Generator().manual_seed(0))
    for i in range(b):
        xi, ui, di = x[i].flatten(), up[i].flatten(), down[i].flatten()
        assert (ui.diff() >= -1e-5).all() and _spearman(xi, ui) > 0.999
        assert (di.diff() <= 1e-5).all() and _spearman(xi, di) < -0.999
        # the remap stays in the slice's range
        torch.testing.assert_close(ui.min(), xi.min(), atol=1e-4, rtol=0)
        torch.testing.assert_close(ui.max(), xi.max(), atol=1e-4, rtol=0)
    # a random curve may come close to the identity, but not for all samples (range 5)
    assert (up - x).abs().amax() > 0.2
    # same control points, flipped: the inverted curve mirrors the monotone one inside the range
    lo, hi = x.amin(), x.amax()
    torch.testing.assert_close(down, lo + hi - up, atol=1e-4, rtol=0)


def test_remap_and_inversion_are_drawn_per_sample() -> None:
    b = 16
    x = _ramp(b)
    v, _ = random_view(x, ContrastiveAugmentConfig(**IDENTITY, remap_prob=0.5, invert_prob=0.5),
                       torch.Generator().manual_seed(4))
    changed = (v - x).flatten(1).abs().amax(1) > 1e-3
    rho = torch.tensor([_spearman(x[i].flatten(), v[i].flatten()) for i in range(b)])
    assert 0 < changed.sum() < b  # some samples remapped, some left alone
    assert (rho > 0.999).any() and (rho < -0.999).any()  # some increasing, some inverted
    assert (rho[~changed] > 0.999).all()  # unchanged samples are not inverted either


def test_intensity_views_are_reproducible() -> None:
    x = _image()
    cfg = ContrastiveAugmentConfig(remap_prob=0.5, invert_prob=0.3, bias_field=0.3)
    validate(cfg)
    a = two_views(x, cfg, torch.Generator().manual_seed(7))
    b = two_views(x, cfg, torch.Generator().manual_seed(7))
    c = two_views(x, cfg, torch.Generator().manual_seed(8))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.allclose(a[0], c[0])
    assert all(torch.isfinite(t).all() for t in a)


@pytest.mark.parametrize(
    "key, value",
    [("bias_field", -0.1), ("bias_order", 0), ("remap_prob", 1.5), ("invert_prob", -0.2)],
)
def test_intensity_options_are_validated(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^contrastive\.augment\.{key}: must be"):
        validate(ContrastiveAugmentConfig(**{key: value}), "contrastive.augment.")
