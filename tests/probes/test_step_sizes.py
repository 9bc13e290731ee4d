"""The fitted global step: recovered from layers that run a known fixed-step solver (NumPy
references), cross-fitting's split, and the closed-form (eigenbasis) trajectories the fit
evaluates its candidates with, against the real solvers and a NumPy loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mi_krr.kernels import gaussian_kernel
from mi_krr.solvers import heavy_ball, richardson
from probes.step_sizes import cross_fit_folds, cross_fit_step, fit_step, path_scores, spectral_system

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


@pytest.mark.parametrize("algorithm, precond", [("gd", "none"), ("richardson_jacobi", "jacobi"), ("richardson_rowsum", "rowsum")])
def test_spectral_richardson_trajectories_equal_the_solver_for_every_candidate_step(algorithm, precond):
    K, y, K_query = system(4)
    steps = np.array([0.02, 0.3, 0.9, 1.6])  # the largest diverges on some prompts: compared relative to size
    pred = spectral_system(algorithm, K, y, LAM, K_query).predictions(steps, T + 3)
    assert pred.shape == (B, len(steps), T + 4, M)
    for g, step in enumerate(steps):
        expected = richardson(K, y, LAM, T + 3, step=float(step), precond=precond, K_query=K_query).pred
        torch.testing.assert_close(pred[:, g], expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_spectral_heavy_ball_trajectories_equal_the_solver_and_a_numpy_loop():
    K, y, K_query = system(5)
    steps, momenta = np.array([0.05, 0.08, 0.2]), np.array([0.1, 0.5, 0.9])
    pred = spectral_system("heavy_ball", K, y, LAM, K_query).predictions(steps, T, momenta)
    for g, (step, momentum) in enumerate(zip(steps, momenta)):
        expected = heavy_ball(K, y, LAM, T, step=float(step), momentum=float(momentum), K_query=K_query).pred
        torch.testing.assert_close(pred[:, g], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(pred[:, g].numpy(), numpy_layers(K, y, K_query, step, momentum), rtol=1e-10, atol=1e-12)


def test_spectral_system_keeps_the_rowsum_preconditioners_error_on_a_linear_kernel():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="row sum"):
        spectral_system("richardson_rowsum", x @ x.mT, torch.randn(2, 5, dtype=torch.float64), LAM, x[:, :2] @ x.mT)


def test_batched_path_scores_equal_a_brute_force_monotone_alignment_and_minus_inf_for_divergence():
    """Path R2 by enumerating every non-decreasing layer -> step map (NumPy), per candidate."""
    rng = np.random.default_rng(7)
    layers, steps = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 4, 4, 2))  # [B, L', m], [B, G, T+1, m]
    steps[:, 3, 2, 0] = np.inf  # candidate 3 diverged
    scored = np.arange(1, 3)
    got = path_scores(layers, torch.as_tensor(steps), scored)
    for g in range(3):
        sse = ((layers[:, :, None] - steps[:, g][:, None]) ** 2).sum(axis=(0, 3))  # [L', T+1]
        sst = ((steps[:, g] - steps[:, g].mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))  # [T+1]
        best = min(itertools.combinations_with_replacement(range(4), 3), key=lambda path: sum(sse[l, t] for l, t in enumerate(path)))
        expected = 1 - sum(sse[l, best[l]] for l in scored) / sum(sst[best[l]] for l in scored)
        assert got[g] == pytest.approx(expected, rel=1e-12)
    assert got[3] == -np.inf
