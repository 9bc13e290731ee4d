"""The scalar MLP arithmetic: exact units are exact, ReLU units meet their interpolation bounds."""

from __future__ import annotations

import math

import pytest
import torch

from mi_krr.construct.primitives import RECIPROCAL_FLOOR, Linear, Product, Reciprocal, ReluArithmetic, coord, compile_mlp

# residual: [u, v, off, out]; the reciprocal applies where off = 0
U, V, FLAG, OUT = 0, 1, 2, 3
OFF = coord(FLAG)


def run(ops, arithmetic, h, relu=None):
    return compile_mlp(ops, 4, arithmetic, relu)(h.unsqueeze(0)).squeeze(0)[:, OUT]


def residual(u, v, off):
    return torch.stack([torch.as_tensor(u), torch.as_tensor(v), torch.as_tensor(off), torch.zeros_like(torch.as_tensor(u))], -1).to(torch.float64)


def test_exact_units_compute_linear_product_and_gated_reciprocal():
    generator = torch.Generator().manual_seed(0)
    u, v = torch.rand(50, generator=generator, dtype=torch.float64) + 0.1, torch.randn(50, generator=generator, dtype=torch.float64)
    applies = (torch.arange(50) % 2).to(torch.float64)
    u = u * applies * torch.logspace(-30, 30, 50, dtype=torch.float64)  # u = 0 where off = 1, as Reciprocal requires
    h = residual(u, v, 1 - applies)
    ops = [Linear(OUT, coord(V), 2.0), Product(OUT, coord(U), coord(V), -1.0), Reciprocal(OUT, coord(U), off=OFF, coef=3.0)]
    expected = 2 * v - u * v + torch.where(applies > 0, 3 / torch.where(applies > 0, u, 1.0), 0.0)
    # relative accuracy even for u = 1e-30: the gate adds exactly 0 where the reciprocal applies
    torch.testing.assert_close(run(ops, "exact", h), expected, rtol=1e-14, atol=0)


def test_exact_reciprocal_is_zero_with_zero_gradient_at_or_below_its_floor():
    """Above RECIPROCAL_FLOOR (~1.5e-154) the unit gives 1/s with gradient -1/s^2 (closed forms,
    finite); at or below it, where -1/s^2 would overflow, it gives 0 with gradient 0."""
    s = torch.tensor([1e-200, RECIPROCAL_FLOOR, 2e-154, 1e-100, 3.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(5, dtype=torch.float64)
    got = run([Reciprocal(OUT, coord(U), off=OFF)], "exact", residual(s, zeros, zeros))
    (gradient,) = torch.autograd.grad(got.sum(), s)
    s, above = s.detach(), torch.tensor([False, False, True, True, True])
    torch.testing.assert_close(got.detach(), torch.where(above, 1 / s, 0.0), rtol=1e-15, atol=0)
    torch.testing.assert_close(gradient, torch.where(above, -1 / s**2, 0.0), rtol=1e-14, atol=0)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("width", [16, 64, 256])
def test_relu_product_error_within_the_square_interpolation_bound(width):
    relu = ReluArithmetic(width=width, bound=4.0)
    grid = torch.linspace(-2, 2, 41, dtype=torch.float64)
    u, v = torch.meshgrid(grid, grid, indexing="ij")
    got = run([Product(OUT, coord(U), coord(V))], "relu", residual(u.flatten(), v.flatten(), torch.ones(u.numel())), relu)
    spacing = 2 * relu.bound / (width - 1)
    # each interpolated square is off by at most spacing^2 / 4; the product takes a quarter of two
    assert (got - (u * v).flatten()).abs().max() <= 2 * spacing**2 / 4 / 4 + 1e-12
    # u v = 0 exactly when v = 0 (the two squares cancel)
    assert (got[(v.flatten() == 0)] == 0).all()


@pytest.mark.parametrize("width", [16, 64, 256])
def test_relu_reciprocal_relative_error_within_the_geometric_interpolation_bound(width):
    relu = ReluArithmetic(width=width, low=1e-3, high=1e3)
    s = torch.logspace(-3, 3, 301, dtype=torch.float64)
    got = run([Reciprocal(OUT, coord(U), off=OFF)], "relu", residual(s, torch.zeros_like(s), torch.zeros_like(s)), relu)
    ratio = 1e6 ** (1 / (width - 1))  # consecutive knots
    # linear interpolation of 1/s between t and q t: relative error <= (q - 1)^2 / (4 q)
    assert ((got - 1 / s) * s).abs().max() <= (ratio - 1) ** 2 / (4 * ratio) + 1e-12
    off = run([Reciprocal(OUT, coord(U), off=OFF)], "relu", residual(torch.zeros(3), torch.zeros(3), torch.ones(3)), relu)
    assert off.abs().max() < 1e-12


def test_relu_linear_terms_are_exact():
    h = residual(torch.linspace(-50, 50, 11), torch.zeros(11), torch.zeros(11))
    torch.testing.assert_close(run([Linear(OUT, coord(U), 0.5)], "relu", h), 0.5 * torch.linspace(-50, 50, 11, dtype=torch.float64))


def test_relu_arithmetic_rejects_bad_ranges():
    with pytest.raises(ValueError, match="mlp_width"):
        ReluArithmetic(width=1)
    with pytest.raises(ValueError, match="recip_range"):
        ReluArithmetic(low=2.0, high=1.0)
    assert math.isfinite(ReluArithmetic().high)
