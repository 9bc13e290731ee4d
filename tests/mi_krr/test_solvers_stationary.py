"""Richardson (plain, Jacobi, row-sum), heavy ball, Chebyshev and Newton–Schulz against closed
forms from numpy.linalg.eigh and brute-force NumPy loops written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial import chebyshev as chebyshev_polynomials

from mi_krr.solvers import chebyshev, heavy_ball, iterative_newton, newton_schulz, richardson
from solver_systems import a_norm_errors, brute_force_heavy_ball, gaussian_kernel, spd_matrix

RNG = np.random.default_rng(7)


def spectral_iterates(A: np.ndarray, y: np.ndarray, error_polynomial, n_steps: int) -> np.ndarray:
    """alpha_t = A^-1 (I - p_t(A)) y from the eigendecomposition, given the error polynomial
    p_t evaluated on eigenvalues, for t = 0..T -> `[T+1, n]`."""
    eigenvalues, vectors = np.linalg.eigh(A)
    coefficients = vectors.T @ y
    return np.stack(
        [vectors @ ((1 - error_polynomial(t, eigenvalues)) / eigenvalues * coefficients) for t in range(n_steps + 1)]
    )


def preconditioner(K: np.ndarray, lam: float, kind: str) -> np.ndarray:
    if kind == "none":
        return np.eye(len(K))
    if kind == "jacobi":
        return np.diag(1.0 / (np.diag(K) + lam))
    return np.diag(1.0 / K.sum(1))


def brute_force_richardson(K, y, lam, step, P, n_steps):
    A = K + lam * np.eye(len(K))
    alpha = np.zeros(len(K))
    iterates = [alpha.copy()]
    for _ in range(n_steps):
        residual = [y[i] - sum(A[i, j] * alpha[j] for j in range(len(K))) for i in range(len(K))]
        alpha = alpha + step * np.array([sum(P[i, j] * residual[j] for j in range(len(K))) for i in range(len(K))])
        iterates.append(alpha.copy())
    return np.stack(iterates)




def test_gd_matches_the_eigendecomposition_closed_form():
    lam, n_steps = 0.1, 12
    K, K_query = gaussian_kernel(RNG, 10, m=3)
    y = RNG.standard_normal(10)
    A = K + lam * np.eye(10)
    eigenvalues = np.linalg.eigvalsh(A)
    optimal = 2 / (eigenvalues[0] + eigenvalues[-1])
    trajectory = richardson(K, y, lam, n_steps, K_query=K_query)
    expected = spectral_iterates(A, y, lambda t, mu: (1 - optimal * mu) ** t, n_steps)
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(trajectory.pred.numpy(), expected @ K_query.T, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(trajectory.step), optimal, rtol=1e-12)
    assert trajectory.preconditioner == "none"
    fixed = richardson(K, y, lam, n_steps, step=0.3)
    expected_fixed = spectral_iterates(A, y, lambda t, mu: (1 - 0.3 * mu) ** t, n_steps)
    np.testing.assert_allclose(fixed.alpha.numpy(), expected_fixed, rtol=1e-9, atol=1e-11)
    assert fixed.step == 0.3


@pytest.mark.parametrize("kind", ["jacobi", "rowsum"])
def test_preconditioned_richardson_matches_a_brute_force_loop(kind):
    lam, n_steps = 0.05, 6
    K = np.stack([gaussian_kernel(RNG, 7)[0] for _ in range(3)])
    y = RNG.standard_normal((3, 7))
    trajectory = richardson(K, y, lam, n_steps, precond=kind)
    assert trajectory.preconditioner == kind
    for b in range(3):
        P = preconditioner(K[b], lam, kind)
        eigenvalues = np.sort(np.linalg.eigvals(P @ (K[b] + lam * np.eye(7))).real)
        optimal = 2 / (eigenvalues[0] + eigenvalues[-1])
        np.testing.assert_allclose(trajectory.step[b].item(), optimal, rtol=1e-10)
        expected = brute_force_richardson(K[b], y[b], lam, optimal, P, n_steps)
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=1e-9, atol=1e-11)
        residuals = np.linalg.norm(y[b] - expected @ (K[b] + lam * np.eye(7)), axis=1)
        np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), residuals, rtol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 12),
    log_lam=st.floats(-3, 1),
    kind=st.sampled_from(["none", "jacobi", "rowsum"]),
    seed=st.integers(0, 2**16),
)
def test_richardson_with_the_default_step_contracts_the_a_norm_error(n, log_lam, kind, seed):
    # I - w P A is self-adjoint in the A inner product with eigenvalues 1 - w mu(PA): the
    # optimal w makes every step shrink the A-norm error by at least (kappa - 1) / (kappa + 1).
    rng = np.random.default_rng(seed)
    K, _ = gaussian_kernel(rng, n)
    lam = 10.0**log_lam
    y = rng.standard_normal(n)
    A = K + lam * np.eye(n)
    eigenvalues = np.sort(np.linalg.eigvals(preconditioner(K, lam, kind) @ A).real)
    rate = (eigenvalues[-1] - eigenvalues[0]) / (eigenvalues[-1] + eigenvalues[0])
    errors = a_norm_errors(A, y, richardson(K, y, lam, 10, precond=kind).alpha.numpy())
    assert np.all(errors[1:] <= rate * errors[:-1] * (1 + 1e-7) + 1e-10 * errors[0])


def test_heavy_ball_matches_a_brute_force_loop_with_polyak_parameters():
    lam, n_steps = 0.2, 15
    K = spd_matrix(RNG, 9, 0.5, 20.0)
    y = RNG.standard_normal(9)
    A = K + lam * np.eye(9)
    low, high = np.sqrt(np.linalg.eigvalsh(A)[[0, -1]])
    step, momentum = 4 / (high + low) ** 2, ((high - low) / (high + low)) ** 2
    trajectory = heavy_ball(K, y, lam, n_steps)
    np.testing.assert_allclose(float(trajectory.step), step, rtol=1e-10)
    np.testing.assert_allclose(float(trajectory.params["momentum"]), momentum, rtol=1e-10)
    expected = brute_force_heavy_ball(A, y, step, momentum, n_steps)
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=1e-9, atol=1e-11)
    given_parameters = heavy_ball(K, y, lam, n_steps, step=0.05, momentum=0.5)
    expected = brute_force_heavy_ball(A, y, 0.05, 0.5, n_steps)
    np.testing.assert_allclose(given_parameters.alpha.numpy(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bounds", [None, (0.5, 40.0)])
def test_chebyshev_matches_the_chebyshev_error_polynomial(bounds):
    lam, n_steps = 0.1, 10
    K = spd_matrix(RNG, 11, 1.0, 25.0)
    y = RNG.standard_normal(11)
    A = K + lam * np.eye(11)
    low, high = np.linalg.eigvalsh(A)[[0, -1]] if bounds is None else bounds
    centre, half_width = (high + low) / 2, (high - low) / 2

    def error_polynomial(t, mu):
        unit = np.zeros(t + 1)
        unit[t] = 1
        return chebyshev_polynomials.chebval((centre - mu) / half_width, unit) / chebyshev_polynomials.chebval(
            centre / half_width, unit
        )

    trajectory = chebyshev(K, y, lam, n_steps, eig_bounds=bounds)
    expected = spectral_iterates(A, y, error_polynomial, n_steps)
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=1e-8, atol=1e-10)


def documented_newton_scale(eigenvalues: np.ndarray) -> float:
    """c = 2 / ((1 + delta) mu_max^2 + mu_min^2), delta = 4 n eps, from ascending eigenvalues."""
    delta = 4 * len(eigenvalues) * np.finfo(np.float64).eps
    return 2 / ((1 + delta) * eigenvalues[-1] ** 2 + eigenvalues[0] ** 2)


def test_newton_schulz_matches_the_eigendecomposition_closed_form():
    lam, n_steps = 0.3, 7
    K = np.stack([spd_matrix(RNG, 8, 0.1, 10.0) for _ in range(2)])
    y = RNG.standard_normal((2, 8))
    trajectory = newton_schulz(K, y, lam, n_steps)
    assert iterative_newton is newton_schulz
    for b in range(2):
        A = K[b] + lam * np.eye(8)
        eigenvalues = np.linalg.eigvalsh(A)
        scale = documented_newton_scale(eigenvalues)
        # I - M_s A = (I - c A^2)^(2^s); alpha[t] = M_{t-1} y, alpha[0] = 0
        expected = spectral_iterates(
            A, y[b], lambda t, mu: np.ones_like(mu) if t == 0 else (1 - scale * mu**2) ** (2 ** (t - 1)), n_steps
        )
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(trajectory.params["scale"][b].item(), scale, rtol=1e-10)
        residuals = np.linalg.norm(y[b] - expected @ A, axis=1)
        np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), residuals, rtol=1e-7, atol=1e-12)


def test_newton_schulz_matches_a_brute_force_matrix_loop():
    lam, n_steps = 0.5, 5
    K, _ = gaussian_kernel(RNG, 6)
    y = RNG.standard_normal(6)
    A = K + lam * np.eye(6)
    eigenvalues = np.linalg.eigvalsh(A)
    M = documented_newton_scale(eigenvalues) * A
    expected = [np.zeros(6)]
    for _ in range(n_steps):
        expected.append(M @ y)
        M = 2 * M - M @ A @ M
    np.testing.assert_allclose(newton_schulz(K, y, lam, n_steps).alpha.numpy(), np.stack(expected), rtol=1e-9, atol=1e-11)


def newton_gain(x: np.ndarray, t: int) -> np.ndarray:
    """1 - (1 - x)^(2^(t-1)) for x = c mu^2 in (0, 2) and t >= 1, through log1p / expm1 so that a
    tiny x (an ill-conditioned system's small modes, where 1 - x rounds to 1) keeps its digits."""
    if t == 1:
        return x
    with np.errstate(divide="ignore"):  # x == 1 exactly: log 0 = -inf, gain 1
        log_abs = np.where(x < 0.5, np.log1p(-np.minimum(x, 0.5)), np.log(np.abs(1 - np.maximum(x, 0.5))))
    return -np.expm1(2.0 ** (t - 1) * log_abs)


def test_newton_schulz_follows_its_closed_form_when_kappa_squared_exceeds_one_over_eps():
    """kappa = 1e9, where the margin-free scale 2 / (mu_max^2 + mu_min^2) put I - c A^2 at -1 to
    rounding and overflowed: every iterate must be the eigendecomposition closed form
    alpha_t = A^-1 (I - (I - c A^2)^(2^(t-1))) y with the documented c, to the accuracy of a direct
    solve (n eps kappa relative), and after log2(kappa^2) + 8 steps NumPy's solve."""
    n, lam = 12, 1e-10
    vectors, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    A = (vectors * np.geomspace(1e-9, 1.0, n)) @ vectors.T
    A = (A + A.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(A)
    kappa = eigenvalues[-1] / eigenvalues[0]
    scale = documented_newton_scale(eigenvalues)
    n_steps = int(np.ceil(np.log2(kappa**2))) + 8
    y = RNG.standard_normal((2, n))
    trajectory = newton_schulz(np.stack([A, A]) - lam * np.eye(n), y, lam, n_steps)
    solution = np.linalg.solve(A, y.T).T
    for b in range(2):
        coefficients = eigenvectors.T @ y[b]
        gains = [np.zeros(n)] + [newton_gain(scale * eigenvalues**2, t) for t in range(1, n_steps + 1)]
        expected = np.stack([eigenvectors @ (gain / eigenvalues * coefficients) for gain in gains])
        tolerance = n * np.finfo(np.float64).eps * kappa * np.abs(solution[b]).max()
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=tolerance)
        np.testing.assert_allclose(trajectory.alpha[b, -1].numpy(), solution[b], rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "solver",
    [
        lambda K, y, T, **kw: richardson(K, y, 1.0, T, **kw),
        lambda K, y, T, **kw: richardson(K, y, 1.0, T, precond="jacobi", **kw),
        lambda K, y, T, **kw: heavy_ball(K, y, 1.0, T, **kw),
        lambda K, y, T, **kw: chebyshev(K, y, 1.0, T, **kw),
        lambda K, y, T, **kw: newton_schulz(K, y, 1.0, T, **kw),
    ],
    ids=["gd", "jacobi", "heavy_ball", "chebyshev", "newton"],
)
def test_stationary_solvers_stay_finite_on_exact_convergence_and_zero_labels(solver):
    # K = 0, lam = 1: a single eigenvalue, exact after one step; y = 0: nothing to solve
    K = torch.zeros(2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    trajectory = solver(K, y, 4, K_query=torch.ones(2, 1, 3, dtype=torch.float64))
    np.testing.assert_allclose(trajectory.alpha[0, -1].detach().numpy(), [1.0, -2.0, 3.0], rtol=1e-12)
    assert torch.equal(trajectory.alpha[1], torch.zeros(5, 3, dtype=torch.float64))
    (trajectory.pred.sum() + trajectory.residual_norm.sum()).backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(K.grad).all()


def test_richardson_rowsum_rejects_nonpositive_row_sums():
    K = np.array([[1.0, -2.0], [-2.0, 1.0]])
    with pytest.raises(ValueError, match="row sum"):
        richardson(K, np.ones(2), 0.1, 3, precond="rowsum")
