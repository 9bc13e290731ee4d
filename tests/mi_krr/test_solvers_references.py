"""Solver facts the other solver tests leave open, each against an independent NumPy/SciPy
reference: registry names against their documented iterations, per-prompt parameters, residual
norms of heavy ball and Chebyshev, boundary parameter values, Jacobi blocks, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as chebyshev_polynomials

from mi_krr.solvers import cg_error_bound, chebyshev, heavy_ball, jacobi_cg, richardson, solve
from solver_systems import brute_force_heavy_ball, gaussian_kernel, scipy_cg_iterates, spd_matrix

RNG = np.random.default_rng(31337)




def richardson_loop(A: np.ndarray, y: np.ndarray, step: float, P: np.ndarray, n_steps: int) -> np.ndarray:
    """alpha <- alpha + step P (y - A alpha) from 0, written out: `[T+1, n]`."""
    alpha = np.zeros(len(y))
    iterates = [alpha]
    for _ in range(n_steps):
        alpha = alpha + step * P @ (y - A @ alpha)
        iterates.append(alpha)
    return np.stack(iterates)




def chebyshev_closed_form(A: np.ndarray, y: np.ndarray, low: float, high: float, n_steps: int) -> np.ndarray:
    """alpha_t = A^-1 (I - p_t(A)) y, p_t(mu) = T_t((c - mu) / h) / T_t(c / h), from numpy eigh."""
    centre, half_width = (high + low) / 2, (high - low) / 2
    eigenvalues, vectors = np.linalg.eigh(A)
    coefficients = vectors.T @ y
    iterates = []
    for t in range(n_steps + 1):
        unit = np.eye(t + 1)[t]
        error = chebyshev_polynomials.chebval((centre - eigenvalues) / half_width, unit) / chebyshev_polynomials.chebval(
            centre / half_width, unit
        )
        iterates.append(vectors @ ((1 - error) / eigenvalues * coefficients))
    return np.stack(iterates)


def gd_closed_form(A: np.ndarray, y: np.ndarray, step: float, n_steps: int) -> np.ndarray:
    """alpha_t = A^-1 (I - (I - step A)^t) y from numpy eigh: `[T+1, n]`."""
    eigenvalues, vectors = np.linalg.eigh(A)
    coefficients = vectors.T @ y
    return np.stack([vectors @ ((1 - (1 - step * eigenvalues) ** t) / eigenvalues * coefficients) for t in range(n_steps + 1)])


def registry_reference(name: str, K: np.ndarray, y: np.ndarray, lam: float, n_steps: int) -> np.ndarray:
    """The documented iteration behind each registry name, with its spectrum-optimal defaults."""
    A = K + lam * np.eye(len(K))
    if name == "cg":
        return scipy_cg_iterates(A, y, n_steps)
    if name == "jacobi_cg":
        return scipy_cg_iterates(A, y, n_steps, M=np.diag(1.0 / np.diag(A)))
    if name in ("gd", "richardson_jacobi", "richardson_rowsum"):
        P = {"gd": np.eye(len(K)), "richardson_jacobi": np.diag(1.0 / np.diag(A)), "richardson_rowsum": np.diag(1.0 / K.sum(1))}[name]
        mu = np.sort(np.linalg.eigvals(P @ A).real)
        return richardson_loop(A, y, 2.0 / (mu[0] + mu[-1]), P, n_steps)
    mu = np.linalg.eigvalsh(A)
    if name == "heavy_ball":
        low, high = np.sqrt(mu[[0, -1]])
        return brute_force_heavy_ball(A, y, 4 / (high + low) ** 2, ((high - low) / (high + low)) ** 2, n_steps)
    if name == "chebyshev":
        return chebyshev_closed_form(A, y, mu[0], mu[-1], n_steps)
    assert name == "newton"
    M = 2.0 / (mu[0] ** 2 + mu[-1] ** 2) * A
    iterates = [np.zeros(len(y))]
    for _ in range(n_steps):
        iterates.append(M @ y)
        M = 2 * M - M @ A @ M
    return np.stack(iterates)


@pytest.mark.parametrize(
    "name", ["cg", "jacobi_cg", "gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"]
)
def test_registry_names_run_their_documented_iterations(name):
    """solve(name) iterates (and predictions) equal the named method's NumPy/SciPy reference loop."""
    K, K_query = gaussian_kernel(RNG, 6, m=2)
    K = np.diag(np.linspace(0.5, 2.0, 6)) @ K @ np.diag(np.linspace(0.5, 2.0, 6))  # unequal diagonal and row sums
    y = RNG.standard_normal(6)
    lam, n_steps = 0.1, 4
    trajectory = solve(name, K, y, lam, n_steps, K_query=K_query)
    expected = registry_reference(name, K, y, lam, n_steps)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(trajectory.pred.numpy(), expected @ K_query.T, rtol=0, atol=1e-9 * scale)


def test_jacobi_cg_torch_blocks_use_each_prompts_own_diagonal():
    """Blocked torch Jacobi-PCG (block_size < batch) equals SciPy PCG with each prompt's diag(A)^-1."""
    lam, n, batch = 0.2, 8, 5
    K = []
    for _ in range(batch):  # a different badly scaled diagonal per prompt
        scaling = np.diag(RNG.permutation(np.geomspace(0.2, 5.0, n)))
        K.append(scaling @ spd_matrix(RNG, n, 1.0, 4.0) @ scaling)
    K = np.stack(K)
    y = RNG.standard_normal((batch, n))
    trajectory = jacobi_cg(K, y, lam, 5, block_size=2, backend="torch")
    for b in range(batch):
        A = K[b] + lam * np.eye(n)
        expected = scipy_cg_iterates(A, y[b], 5, M=np.diag(1.0 / np.diag(A)))
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
        np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), np.linalg.norm(y[b] - expected @ A, axis=1), rtol=1e-8)


def test_heavy_ball_and_chebyshev_residual_norms_are_true_residual_norms():
    """residual_norm of heavy ball and Chebyshev equals ||y - (K + lam I) alpha_t||_2 of NumPy reference iterates."""
    lam, n, n_steps = 0.3, 7, 6
    K = np.stack([spd_matrix(RNG, n, 0.5, 12.0) for _ in range(2)])
    y = RNG.standard_normal((2, n))
    ball = heavy_ball(K, y, lam, n_steps)
    cheb = chebyshev(K, y, lam, n_steps)
    for b in range(2):
        A = K[b] + lam * np.eye(n)
        mu = np.linalg.eigvalsh(A)
        low, high = np.sqrt(mu[[0, -1]])
        references = {
            "heavy_ball": (ball, brute_force_heavy_ball(A, y[b], 4 / (high + low) ** 2, ((high - low) / (high + low)) ** 2, n_steps)),
            "chebyshev": (cheb, chebyshev_closed_form(A, y[b], mu[0], mu[-1], n_steps)),
        }
        for trajectory, expected in references.values():
            np.testing.assert_allclose(
                trajectory.residual_norm[b].numpy(), np.linalg.norm(y[b] - expected @ A, axis=1), rtol=1e-8, atol=1e-12
            )


def test_heavy_ball_with_zero_momentum_is_gradient_descent():
    """momentum=0 (inside the documented [0, 1)) gives GD's eigendecomposition closed form."""
    lam, n, n_steps, step = 0.2, 6, 8, 0.15
    K, _ = gaussian_kernel(RNG, n)
    y = RNG.standard_normal(n)
    trajectory = heavy_ball(K, y, lam, n_steps, step=step, momentum=0.0)
    expected = gd_closed_form(K + lam * np.eye(n), y, step, n_steps)
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert trajectory.params["momentum"] == 0.0


def test_richardson_per_prompt_steps_match_each_prompts_closed_form():
    """A per-prompt step array gives each prompt GD's closed form with its own step, and is recorded as given."""
    lam, n, n_steps = 0.1, 5, 7
    K = np.stack([gaussian_kernel(RNG, n)[0] for _ in range(3)])
    y = RNG.standard_normal((3, n))
    steps = np.array([0.1, 0.3, 0.6])
    trajectory = richardson(K, y, lam, n_steps, step=steps)
    np.testing.assert_array_equal(trajectory.step.numpy(), steps)
    for b in range(3):
        expected = gd_closed_form(K[b] + lam * np.eye(n), y[b], steps[b], n_steps)
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_chebyshev_accepts_equal_bounds_and_is_exact_after_one_step_on_a_scaled_identity():
    """eig_bounds (c, c), allowed by 0 < low <= high, on A = c I gives alpha_t = y / c for t >= 1 (closed form)."""
    y = RNG.standard_normal(4)
    K, lam = 2.0 * np.eye(4), 0.5  # A = 2.5 I: its single eigenvalue is both bounds
    trajectory = chebyshev(K, y, lam, 3, eig_bounds=(2.5, 2.5))
    np.testing.assert_allclose(trajectory.alpha[1:].numpy(), np.tile(y / 2.5, (3, 1)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(trajectory.residual_norm[1:].numpy(), 0.0, atol=1e-12 * np.linalg.norm(y))


def test_chebyshev_records_low_then_high_eig_bounds():
    """params['eig_bounds'] is (mu_min, mu_max) of K + lam I from numpy eigvalsh, or the given pair, in that order."""
    lam = 0.1
    K = np.stack([spd_matrix(RNG, 5, 0.5, 9.0), spd_matrix(RNG, 5, 2.0, 3.0)])
    y = RNG.standard_normal((2, 5))
    low, high = chebyshev(K, y, lam, 2).params["eig_bounds"]
    expected = np.array([np.linalg.eigvalsh(k + lam * np.eye(5))[[0, -1]] for k in K])  # [[0.6, 9.1], [2.1, 3.1]]
    np.testing.assert_allclose(low.numpy(), expected[:, 0], rtol=1e-10)
    np.testing.assert_allclose(high.numpy(), expected[:, 1], rtol=1e-10)
    low, high = chebyshev(K, y, lam, 2, eig_bounds=(0.4, 10.0)).params["eig_bounds"]
    np.testing.assert_array_equal(low.numpy(), [0.4, 0.4])
    np.testing.assert_array_equal(high.numpy(), [10.0, 10.0])


@pytest.mark.parametrize("to_input", [float, np.asarray, torch.tensor], ids=["float", "numpy", "torch"])
@pytest.mark.parametrize("kappa", [np.inf, np.nan])
def test_cg_error_bound_rejects_a_non_finite_kappa(kappa, to_input):
    """kappa must be a finite condition number: inf and NaN raise ValueError on every input type."""
    with pytest.raises(ValueError, match="kappa"):
        cg_error_bound(to_input(kappa), 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda K, y: jacobi_cg(K, y, 0.1, 2),
        lambda K, y: jacobi_cg(K, y, 0.1, 2, backend="torch"),
        lambda K, y: richardson(K, y, 0.1, 2, precond="jacobi"),
    ],
    ids=["jacobi_cg", "jacobi_cg_torch", "richardson_jacobi"],
)
def test_jacobi_preconditioner_rejects_a_diagonal_entry_at_or_below_minus_lam(call):
    """diag(K + lam I) must be > 0 for P = diag(K + lam I)^-1: a symmetric K with K_11 + lam = -0.4 raises."""
    K = np.diag([1.0, -0.5])
    with pytest.raises(ValueError, match="diagonal"):
        call(K, np.ones(2))


def test_an_asymmetric_prompt_is_refused_beside_a_large_scale_one():
    """Symmetry is judged per prompt: an asymmetric K next to a 1e9-scale symmetric one still raises."""
    asymmetric = np.array([[1.0, 0.5], [0.0, 1.0]])
    K = np.stack([1e9 * np.eye(2), asymmetric])
    for call in (lambda: solve("cg", K, np.ones((2, 2)), 0.1, 2), lambda: solve("gd", K, np.ones((2, 2)), 0.1, 2)):
        with pytest.raises(ValueError, match="symmetric"):
            call()
