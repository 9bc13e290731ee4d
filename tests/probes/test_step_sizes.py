"""The fitted global step: recovered from layers that run a known fixed-step solver (NumPy
references), and cross-fitting's split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_krr.kernels import gaussian_kernel
from probes.step_sizes import cross_fit_folds, cross_fit_step, fit_step

B, N, M, LAM, T = 16, 8, 3, 0.05, 6


def system(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(B, M, 2, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, generator=g, dtype=torch.float64)
    return gaussian_kernel(x), y, gaussian_kernel(xq, x)


def numpy_layers(K, y, K_query, step, momentum=0.0, preconditioner=None) -> np.ndarray:
    """Per-step predictions [B, T+1, m] of alpha <- alpha + w P (y - A alpha) + beta (alpha - alpha_prev):
    the 'layers' of a network running that fixed-step iteration, one step per layer."""
    out = []
    for b in range(B):
        Kb, yb, Kq = K[b].numpy(), y[b].numpy(), K_query[b].numpy()
        A = Kb + LAM * np.eye(N)
        P = np.eye(N) if preconditioner is None else np.diag(preconditioner(Kb))
        alpha = previous = np.zeros(N)
        rows = [np.zeros(M)]
        for _ in range(T):
            alpha, previous = alpha + step * P @ (yb - A @ alpha) + momentum * (alpha - previous), alpha
            rows.append(Kq @ alpha)
        out.append(np.stack(rows))
    return np.stack(out)


@pytest.mark.parametrize(
    "algorithm, step, preconditioner",
    [("gd", 0.137, None), ("richardson_rowsum", 0.61, lambda K: 1.0 / K.sum(1)), ("richardson_jacobi", 0.3, lambda K: 1.0 / (np.diag(K) + LAM))],
)
def test_fitted_step_recovers_the_fixed_step_of_the_layers(algorithm, step, preconditioner):
    K, y, K_query = system()
    layers = numpy_layers(K, y, K_query, step, preconditioner=preconditioner)
    fitted, momentum, score = fit_step(algorithm, K, y, LAM, T + 4, K_query, layers, np.arange(1, T + 1))
    assert fitted == pytest.approx(step, rel=1e-5) and momentum is None and score == pytest.approx(1.0, abs=1e-9)


def test_heavy_ball_fit_recovers_step_and_a_grid_momentum():
    K, y, K_query = system(1)
    layers = numpy_layers(K, y, K_query, 0.08, momentum=0.5)
    step, momentum, score = fit_step("heavy_ball", K, y, LAM, T, K_query, layers, np.arange(1, T + 1))
    assert momentum == pytest.approx(0.5) and step == pytest.approx(0.08, rel=1e-5) and score > 1 - 1e-9


def test_cross_fit_uses_each_half_for_its_own_step_only():
    """Halves whose layers run different steps get those steps: the fit never sees the other half."""
    K, y, K_query = system(2)
    folds = cross_fit_folds(B, seed=3)
    layers = np.where(folds[:, None, None] == 0, numpy_layers(K, y, K_query, 0.1), numpy_layers(K, y, K_query, 0.2))
    fit = cross_fit_step("gd", K, y, LAM, T, K_query, layers, np.arange(1, T + 1), seed=3)
    np.testing.assert_array_equal(fit.folds, folds)
    np.testing.assert_allclose(fit.step, [0.1, 0.2], rtol=1e-5)


def test_cross_fit_needs_two_prompts():
    with pytest.raises(ValueError, match="step_sizes='optimal'"):
        cross_fit_folds(1, seed=0)
