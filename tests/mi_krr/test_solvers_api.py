"""Solver registry, feature-space solvers, shapes, batching and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_krr.solvers import ALGORITHMS, cg, chebyshev, feature_cg, feature_gd, heavy_ball, jacobi_cg, krr, richardson, solve
from solver_systems import gaussian_kernel

RNG = np.random.default_rng(99)
EXPECTED_NAMES = {"cg", "jacobi_cg", "gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"}


def linear_regression_prompt(n: int, d: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return RNG.standard_normal((n, d)), RNG.standard_normal(n), RNG.standard_normal((m, d))


def test_registry_holds_every_named_algorithm_and_solve_rejects_unknown_names():
    assert set(ALGORITHMS) == EXPECTED_NAMES
    with pytest.raises(ValueError, match="name must be one of .*'cg'.*'newton'"):
        solve("conjugate_gradient", np.eye(2), np.ones(2), 0.1, 3)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_every_registered_solver_converges_to_krr(name):
    K, K_query = gaussian_kernel(RNG, 6, m=2)
    y = RNG.standard_normal(6)
    lam = 1.0  # well conditioned, so that every method, GD included, converges in 300 steps
    trajectory = solve(name, K, y, lam, 300, K_query=K_query)
    expected = scipy.linalg.solve(K + lam * np.eye(6), y)
    np.testing.assert_allclose(trajectory.alpha[-1].numpy(), expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(trajectory.pred[-1].numpy(), K_query @ expected, rtol=1e-7, atol=1e-9)


def test_feature_gd_predicts_like_kernel_gd_with_the_linear_kernel():
    X, y, X_query = linear_regression_prompt(n=9, d=4, m=3)
    lam, step, n_steps = 0.2, 0.02, 12
    primal = feature_gd(X, y, lam, n_steps, step=step, X_query=X_query)
    dual = richardson(X @ X.T, y, lam, n_steps, step=step, K_query=X_query @ X.T)
    assert primal.method == "feature_gd" and primal.alpha.shape == (n_steps + 1, 4)
    np.testing.assert_allclose(primal.pred.numpy(), dual.pred.numpy(), rtol=1e-9, atol=1e-11)
    # w_t = X^T alpha_t
    np.testing.assert_allclose(primal.alpha.numpy(), dual.alpha.numpy() @ X, rtol=1e-9, atol=1e-11)
    default = feature_gd(X, y, lam, 3)
    eigenvalues = np.linalg.eigvalsh(X.T @ X + lam * np.eye(4))
    np.testing.assert_allclose(float(default.step), 2 / (eigenvalues[0] + eigenvalues[-1]), rtol=1e-10)
    residuals = np.linalg.norm(X.T @ y - default.alpha.numpy() @ (X.T @ X + lam * np.eye(4)), axis=1)
    np.testing.assert_allclose(default.residual_norm.numpy(), residuals, rtol=1e-9)


def test_feature_cg_matches_scipy_cg_on_the_normal_equations_and_reaches_ridge():
    X, y, X_query = linear_regression_prompt(n=12, d=5, m=4)
    lam = 0.3
    trajectory = feature_cg(X, y, lam, 5, X_query=X_query)
    assert trajectory.method == "feature_cg" and trajectory.alpha.shape == (6, 5)
    gram = X.T @ X + lam * np.eye(5)
    iterates = [np.zeros(5)]
    scipy.sparse.linalg.cg(gram, X.T @ y, x0=np.zeros(5), rtol=0, atol=0, maxiter=5, callback=lambda w: iterates.append(w.copy()))
    np.testing.assert_allclose(trajectory.alpha.numpy(), np.stack(iterates), rtol=1e-9, atol=1e-11)
    ridge = scipy.linalg.solve(gram, X.T @ y)
    np.testing.assert_allclose(trajectory.pred[-1].numpy(), X_query @ ridge, rtol=1e-8, atol=1e-10)
    kernel_ridge = krr(X @ X.T, y, lam).numpy()
    np.testing.assert_allclose(trajectory.pred[-1].numpy(), X_query @ X.T @ kernel_ridge, rtol=1e-8, atol=1e-10)


def test_feature_cg_and_kernel_cg_differ_before_convergence():
    # Same Krylov space, different norms: kernel CG minimises the (K + lam I)-norm error of
    # alpha, feature CG the (X^T X + lam I)-norm error of w = X^T alpha, i.e. the
    # K (K + lam I)-norm error of alpha. Their first-step predictions differ.
    X, y, X_query = linear_regression_prompt(n=8, d=3, m=2)
    lam = 0.1
    primal = feature_cg(X, y, lam, 1, X_query=X_query)
    dual = cg(X @ X.T, y, lam, 1, K_query=X_query @ X.T)
    K = X @ X.T
    kernel_scale = (y @ y) / (y @ (K + lam * np.eye(8)) @ y)
    feature_scale = (y @ K @ y) / (y @ K @ (K + lam * np.eye(8)) @ y)
    np.testing.assert_allclose(dual.pred[1].numpy(), kernel_scale * X_query @ X.T @ y, rtol=1e-10)
    np.testing.assert_allclose(primal.pred[1].numpy(), feature_scale * X_query @ X.T @ y, rtol=1e-10)
    assert abs(kernel_scale - feature_scale) > 1e-3 * kernel_scale


@settings(max_examples=25, deadline=None)
@given(
    batch_shape=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    n=st.integers(1, 12),
    m=st.integers(1, 4),
    n_steps=st.integers(0, 6),
    log_lam=st.floats(-2, 1),
    name=st.sampled_from(sorted(EXPECTED_NAMES)),
    seed=st.integers(0, 2**16),
)
def test_batched_trajectories_have_documented_shapes_and_equal_per_prompt_runs(
    batch_shape, n, m, n_steps, log_lam, name, seed
):
    rng = np.random.default_rng(seed)
    count = int(np.prod(batch_shape))
    pairs = [gaussian_kernel(rng, n, m=m) for _ in range(count)]
    K = np.stack([k for k, _ in pairs]).reshape(*batch_shape, n, n)
    K_query = np.stack([q for _, q in pairs]).reshape(*batch_shape, m, n)
    y = rng.standard_normal((*batch_shape, n))
    lam = 10.0**log_lam
    trajectory = solve(name, K, y, lam, n_steps, K_query=K_query)
    assert trajectory.alpha.shape == (*batch_shape, n_steps + 1, n)
    assert trajectory.residual_norm.shape == (*batch_shape, n_steps + 1)
    assert trajectory.pred.shape == (*batch_shape, n_steps + 1, m)
    assert trajectory.alpha.dtype == torch.float64 and trajectory.n_steps == n_steps
    for index in np.ndindex(*batch_shape):
        single = solve(name, K[index], y[index], lam, n_steps, K_query=K_query[index])
        scale = max(1.0, float(single.alpha.abs().max()))
        np.testing.assert_allclose(trajectory.alpha[index].numpy(), single.alpha.numpy(), rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_an_empty_batch_gives_empty_trajectories(name):
    trajectory = solve(name, np.zeros((0, 3, 3)), np.zeros((0, 3)), 0.1, 2, K_query=np.zeros((0, 2, 3)))
    assert trajectory.alpha.shape == (0, 3, 3) and trajectory.pred.shape == (0, 3, 2)


def test_solvers_accept_tensors_and_keep_their_device_and_float64():
    K, K_query = gaussian_kernel(RNG, 5, m=2)
    trajectory = cg(torch.tensor(K, dtype=torch.float32), torch.ones(5), 0.1, 3, K_query=torch.tensor(K_query))
    assert trajectory.alpha.dtype == torch.float64 and trajectory.alpha.device == torch.device("cpu")
    assert trajectory.pred.dtype == torch.float64
    assert cg(K, np.ones(5), 0.1, 3).pred is None


def test_symmetry_check_rejects_small_asymmetry_and_accepts_rounding():
    K, _ = gaussian_kernel(RNG, 6)
    skew = np.zeros((6, 6))
    skew[1, 4], skew[4, 1] = 1e-6, -1e-6
    with pytest.raises(ValueError, match="^K must be symmetric"):
        cg(np.stack([K, K + skew]), np.ones((2, 6)), 0.1, 2)
    assert cg(K + 1e-14 * skew / 1e-6, np.ones(6), 0.1, 2).alpha.shape == (3, 6)


K_GOOD, KQ_GOOD = gaussian_kernel(RNG, 4, m=2)
Y_GOOD = RNG.standard_normal(4)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        (dict(lam=0.0), "lam"),
        (dict(lam=-1.0), "lam"),
        (dict(lam=float("nan")), "lam"),
        (dict(lam=float("inf")), "lam"),
        (dict(K=np.where(np.eye(4) > 0, np.nan, K_GOOD)), "K"),
        (dict(K=np.full((4, 4), np.inf)), "K"),
        (dict(K=np.ones((4, 3))), "K"),
        (dict(K=np.ones(4)), "K"),
        (dict(K=np.triu(K_GOOD)), "K"),
        (dict(y=np.array([1.0, np.nan, 0.0, 0.0])), "y"),
        (dict(y=np.ones(5)), "y"),
        (dict(y=np.ones((2, 4))), "y"),
        (dict(K_query=np.full((2, 4), np.inf)), "K_query"),
        (dict(K_query=np.ones((2, 3))), "K_query"),
        (dict(K_query=np.ones((3, 2, 4))), "K_query"),
        (dict(n_steps=-1), "n_steps"),
        (dict(n_steps=2.5), "n_steps"),
        (dict(n_steps="3"), "n_steps"),
    ],
)
@pytest.mark.parametrize("solver", sorted(EXPECTED_NAMES))
def test_bad_inputs_raise_a_value_error_naming_the_argument(arguments, name, solver):
    call = dict(K=K_GOOD, y=Y_GOOD, lam=0.1, n_steps=3, K_query=KQ_GOOD) | arguments
    with pytest.raises(ValueError, match=rf"^{name}\b") as raised:
        solve(solver, **call)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: richardson(K_GOOD, Y_GOOD, 0.1, 3, precond="cholesky"), "precond"),
        (lambda: richardson(K_GOOD, Y_GOOD, 0.1, 3, step=0.0), "step"),
        (lambda: richardson(K_GOOD, Y_GOOD, 0.1, 3, step=np.ones(3)), "step"),
        (lambda: heavy_ball(K_GOOD, Y_GOOD, 0.1, 3, momentum=1.0), "momentum"),
        (lambda: chebyshev(K_GOOD, Y_GOOD, 0.1, 3, eig_bounds=(2.0, 1.0)), "eig_bounds"),
        (lambda: chebyshev(K_GOOD, Y_GOOD, 0.1, 3, eig_bounds=(-1.0, 1.0)), "eig_bounds"),
        (lambda: cg(K_GOOD, Y_GOOD, 0.1, 3, block_size=0), "block_size"),
        (lambda: jacobi_cg(K_GOOD, Y_GOOD, 0.1, True), "n_steps"),
        (lambda: krr(K_GOOD, Y_GOOD, 0.0), "lam"),
        (lambda: krr(-np.eye(4), Y_GOOD, 0.1), "K"),
        (lambda: feature_gd(np.ones((4, 2)), np.ones(3), 0.1, 3), "y"),
        (lambda: feature_cg(np.ones((4, 2)), np.ones(4), 0.1, 3, X_query=np.ones((2, 3))), "X_query"),
        (lambda: feature_cg(np.full((4, 2), np.nan), np.ones(4), 0.1, 3), "X"),
    ],
)
def test_bad_solver_options_raise_a_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


def test_finite_entries_whose_sum_overflows_are_accepted_and_a_lone_inf_is_not():
    # finiteness is decided by one summation pass, with the exact entrywise test when the sum is
    # not finite: 8 entries of 1e308 overflow the sum but are all finite
    from mi_krr._validation import as_float64

    huge = np.full((2, 4), 1e308)
    np.testing.assert_array_equal(as_float64("K_query", huge).numpy(), huge)
    with pytest.raises(ValueError, match=r"^K_query contains NaN or inf"):
        as_float64("K_query", np.where(np.eye(2, 4) > 0, np.inf, huge))
    with pytest.raises(ValueError, match=r"^K_query contains NaN or inf"):
        as_float64("K_query", np.array([[np.inf, -np.inf]]))  # the sum is NaN, not inf
