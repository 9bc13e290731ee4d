"""Second usage review of the mathematics a researcher calls directly: every registry solver
against NumPy / SciPy reference iterations written here (per-prompt parameters, many or one
query, nearly singular systems, far past convergence, label sensitivities), the scoring and
identifiability functions on hand-built layer / step predictions whose answer is known, and the
task samplers' seeding. Bugs it found are fixed; their tests check the correct behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import torch

from mi_krr.kernels import condition_number, effective_dimension, kernel_matrix
from mi_krr.solvers import ALGORITHMS, chebyshev, feature_gd, heavy_ball, solve
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler, bayes_optimal_ridge, sample_spd_system
from probes.identifiability import identifiability_verdict
from probes.scoring import (
    bootstrap_weights,
    kappa_strata,
    monotone_alignment,
    percentile_interval,
    r2_matrix,
    score_algorithm,
    score_algorithms,
)

RNG = np.random.default_rng(20241124)


# ----- independent references ------------------------------------------------------------------


def gaussian(x: np.ndarray, z: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    """exp(-|x - z|^2 / (2 bandwidth^2)) by explicit differences."""
    diff = x[..., :, None, :] - z[..., None, :, :]
    return np.exp(-(diff**2).sum(-1) / (2 * bandwidth**2))


def scipy_cg_iterates(A: np.ndarray, b: np.ndarray, n_steps: int, M: np.ndarray | None = None) -> np.ndarray:
    """Every iterate `[T+1, n]` of scipy.sparse.linalg.cg from x0 = 0 (M: P, applied as M @ r),
    recorded by its callback; tolerance 0 so that it runs all n_steps."""
    iterates = [np.zeros_like(b)]
    scipy.sparse.linalg.cg(A, b, x0=np.zeros_like(b), rtol=0.0, atol=0.0, maxiter=n_steps, M=M, callback=lambda x: iterates.append(x.copy()))
    return np.array(iterates)


def richardson_loop(A, b, n_steps, step, P):
    """alpha <- alpha + step P (b - A alpha) from 0: `[T+1, n]`."""
    alpha, out = np.zeros_like(b), [np.zeros_like(b)]
    for _ in range(n_steps):
        alpha = alpha + step * P @ (b - A @ alpha)
        out.append(alpha)
    return np.array(out)


def heavy_ball_loop(A, b, n_steps, step, momentum):
    """alpha_{t+1} = alpha_t + step (b - A alpha_t) + momentum (alpha_t - alpha_{t-1}): `[T+1, n]`."""
    alpha = previous = np.zeros_like(b)
    out = [alpha]
    for _ in range(n_steps):
        alpha, previous = alpha + step * (b - A @ alpha) + momentum * (alpha - previous), alpha
        out.append(alpha)
    return np.array(out)


def chebyshev_loop(A, b, n_steps, low, high):
    """Chebyshev acceleration (Saad, Iterative Methods, Alg. 12.1) from x0 = 0: `[T+1, n]`."""
    theta, delta = (high + low) / 2, (high - low) / 2
    sigma = theta / delta
    rho = 1 / sigma
    x, r = np.zeros_like(b), b.copy()
    d = r / theta
    out = [x]
    for _ in range(n_steps):
        x = x + d
        r = r - A @ d
        rho_next = 1 / (2 * sigma - rho)
        d = rho_next * rho * d + 2 * rho_next / delta * r
        rho = rho_next
        out.append(x)
    return np.array(out)


def newton_schulz_loop(A, b, n_steps):
    """alpha_t = M_{t-1} b with M_0 = c A, c = 2 / ((1 + 4 n eps) mu_max^2 + mu_min^2), M <- 2M - M A M."""
    mu = np.linalg.eigvalsh(A)
    M = 2 / ((1 + 4 * len(b) * np.finfo(np.float64).eps) * mu[-1] ** 2 + mu[0] ** 2) * A
    out = [np.zeros_like(b)]
    for _ in range(n_steps):
        out.append(M @ b)
        M = 2 * M - M @ A @ M
    return np.array(out)


def optimal_richardson_step(A, P):
    """2 / (mu_min + mu_max) of P A (eigenvalues of the similar P^1/2 A P^1/2)."""
    root = np.sqrt(P)
    mu = np.linalg.eigvalsh(root @ A @ root)
    return 2 / (mu[0] + mu[-1])


def reference_iterates(name: str, K: np.ndarray, y: np.ndarray, lam: float, n_steps: int) -> np.ndarray:
    """The iterates `[T+1, n]` of registry algorithm `name` written out in NumPy / SciPy, every
    default (step, momentum, bounds) computed here from np.linalg.eigvalsh."""
    n = len(y)
    A = K + lam * np.eye(n)
    mu = np.linalg.eigvalsh(A)
    jacobi, rowsum = np.diag(1 / np.diag(A)), np.diag(1 / K.sum(1))
    if name == "cg":
        return scipy_cg_iterates(A, y, n_steps)
    if name == "jacobi_cg":
        return scipy_cg_iterates(A, y, n_steps, M=jacobi)
    if name in ("gd", "richardson_jacobi", "richardson_rowsum"):
        P = {"gd": np.eye(n), "richardson_jacobi": jacobi, "richardson_rowsum": rowsum}[name]
        return richardson_loop(A, y, n_steps, optimal_richardson_step(A, P), P)
    if name == "chebyshev":
        return chebyshev_loop(A, y, n_steps, mu[0], mu[-1])
    if name == "heavy_ball":
        lo, hi = np.sqrt(mu[0]), np.sqrt(mu[-1])
        return heavy_ball_loop(A, y, n_steps, 4 / (hi + lo) ** 2, ((hi - lo) / (hi + lo)) ** 2)
    assert name == "newton"
    return newton_schulz_loop(A, y, n_steps)


EXPECTED_FIELDS = {  # method, preconditioner, params keys recorded by each registry entry
    "cg": ("cg", "none", set()),
    "jacobi_cg": ("jacobi_cg", "jacobi", set()),
    "gd": ("richardson", "none", set()),
    "richardson_jacobi": ("richardson", "jacobi", set()),
    "richardson_rowsum": ("richardson", "rowsum", set()),
    "chebyshev": ("chebyshev", "none", {"eig_bounds"}),
    "heavy_ball": ("heavy_ball", "none", {"momentum"}),
    "newton": ("newton", "none", {"scale"}),
}


# ----- solvers ---------------------------------------------------------------------------------


def test_the_registry_is_the_eight_documented_algorithms():
    """The fields table below covers every registry entry (a new entry needs a reference here)."""
    assert set(ALGORITHMS) == set(EXPECTED_FIELDS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
@pytest.mark.parametrize("m", [1, 40], ids=["one_query", "many_queries"])
def test_every_registry_algorithm_follows_its_numpy_reference_iteration(name, m):
    """Batch [2] of Gaussian kernels (n = 7, lam = 0.05), T = 6 < n steps: every alpha_t equals
    the NumPy / SciPy iteration written above (scipy.sparse.linalg.cg with a callback for CG),
    pred = K_query alpha_t for one or 40 queries, residual_norm = ||y - (K + lam I) alpha_t||,
    and the Trajectory's shapes and recorded fields are the documented ones."""
    n, lam, T = 7, 0.05, 6
    x, q = RNG.standard_normal((2, n, 2)), RNG.standard_normal((2, m, 2))
    K, K_query, y = gaussian(x, x), gaussian(q, x), RNG.standard_normal((2, n))
    trajectory = solve(name, K, y, lam, T, K_query=K_query)
    assert trajectory.alpha.shape == (2, T + 1, n) and trajectory.pred.shape == (2, T + 1, m)
    assert trajectory.residual_norm.shape == (2, T + 1) and trajectory.n_steps == T
    method, preconditioner, params = EXPECTED_FIELDS[name]
    assert (trajectory.method, trajectory.preconditioner, set(trajectory.params)) == (method, preconditioner, params)
    assert trajectory.lam == lam
    for b in range(2):
        expected = reference_iterates(name, K[b], y[b], lam, T)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(trajectory.pred[b].numpy(), expected @ K_query[b].T, rtol=0, atol=1e-9 * scale)
        true_residual = np.linalg.norm(y[b] - expected @ (K[b] + lam * np.eye(n)), axis=-1)
        np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), true_residual, rtol=0, atol=1e-9 * np.linalg.norm(y[b]))


@pytest.mark.parametrize("name", ["cg", "jacobi_cg", "chebyshev", "heavy_ball", "newton"])
def test_far_past_convergence_iterates_stay_at_the_exact_solution(name):
    """T = 300 on a system with cond ~ 10^2 (n = 8): alpha stays finite and ends at
    scipy.linalg.solve's answer, and residual_norm (CG's recursive one included) equals the true
    ||y - (K + lam I) alpha_t|| to rounding of ||y|| at every step."""
    n, lam = 8, 0.05
    x = RNG.standard_normal((n, 2))
    K, y = gaussian(x, x), RNG.standard_normal(n)
    A = K + lam * np.eye(n)
    trajectory = solve(name, K, y, lam, 300)
    alpha = trajectory.alpha.numpy()
    assert np.isfinite(alpha).all()
    exact = scipy.linalg.solve(A, y, assume_a="pos")
    np.testing.assert_allclose(alpha[-1], exact, rtol=0, atol=1e-10 * np.abs(exact).max())
    true_residual = np.linalg.norm(y - alpha @ A, axis=-1)
    np.testing.assert_allclose(trajectory.residual_norm.numpy(), true_residual, rtol=0, atol=1e-12 * np.linalg.norm(y))


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_nearly_singular_kernel_with_a_tiny_ridge_follows_the_reference(name):
    """Three of ten support points repeat the first (K has rank 8) and lam = 1e-8, so
    cond(K + lam I) ~ 4e8: every algorithm's first n iterates still follow the NumPy / SciPy
    reference (to 1e-6 of their size: CG's rounding grows with the condition number)."""
    n, lam = 10, 1e-8
    x = np.random.default_rng(3).standard_normal((n, 2))
    x[-3:] = x[0]
    K, y = gaussian(x, x), np.random.default_rng(4).standard_normal(n)
    expected = reference_iterates(name, K, y, lam, n)
    trajectory = solve(name, K, y, lam, n)
    assert np.isfinite(trajectory.alpha.numpy()).all()
    np.testing.assert_allclose(trajectory.alpha.numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_per_prompt_lam_is_refused_by_name_and_a_zero_dim_lam_is_a_number():
    """The solvers take one ridge for the batch (lam: float): a per-prompt lam tensor [B] is a
    ValueError naming lam, and a 0-d float64 tensor gives the same iterates as the number."""
    x = RNG.standard_normal((3, 5, 2))
    K, y = gaussian(x, x), RNG.standard_normal((3, 5))
    with pytest.raises(ValueError, match="lam must be a positive number"):
        solve("cg", K, y, torch.tensor([0.1, 0.2, 0.3]), 3)
    for name in ALGORITHMS:
        assert torch.equal(solve(name, K, y, torch.tensor(0.1, dtype=torch.float64), 3).alpha, solve(name, K, y, 0.1, 3).alpha)


def test_chebyshev_and_heavy_ball_with_per_prompt_parameters_follow_numpy_loops():
    """chebyshev(eig_bounds=(low [3], high [3])) and heavy_ball(step [3], momentum [3]) run
    each prompt with its own parameters (NumPy loops above), and record them per prompt."""
    x = RNG.standard_normal((3, 6, 2))
    K, y, lam, T = gaussian(x, x), RNG.standard_normal((3, 6)), 0.1, 7
    lows, highs = np.array([0.05, 0.1, 0.08]), np.array([5.0, 4.0, 6.0])
    steps, momenta = np.array([0.2, 0.3, 0.25]), np.array([0.0, 0.5, 0.9])
    cheb = chebyshev(K, y, lam, T, eig_bounds=(lows, highs))
    ball = heavy_ball(K, y, lam, T, step=steps, momentum=momenta)
    for b in range(3):
        A = K[b] + lam * np.eye(6)
        np.testing.assert_allclose(cheb.alpha[b].numpy(), chebyshev_loop(A, y[b], T, lows[b], highs[b]), rtol=0, atol=1e-13)
        np.testing.assert_allclose(ball.alpha[b].numpy(), heavy_ball_loop(A, y[b], T, steps[b], momenta[b]), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(cheb.params["eig_bounds"][0].numpy(), lows)
    np.testing.assert_array_equal(ball.step.numpy(), steps)
    np.testing.assert_array_equal(ball.params["momentum"].numpy(), momenta)


def test_label_sensitivities_by_autograd_match_closed_forms():
    """d pred_t / d y by torch.autograd: GD's is K_query (I - (I - w A)^t) A^-1 (w its optimal
    step, which does not depend on y) and Newton-Schulz's is K_query M_{t-1} (NumPy); CG's,
    nonlinear in y, matches central differences, also 20 steps past convergence (n = 5)."""
    n, lam = 5, 0.1
    x, q = RNG.standard_normal((n, 2)), RNG.standard_normal((2, 2))
    K, K_query, y = gaussian(x, x), gaussian(q, x), RNG.standard_normal(n)
    A = K + lam * np.eye(n)

    def jacobian(name, T):
        function = lambda labels: solve(name, torch.tensor(K), labels, lam, T, K_query=torch.tensor(K_query)).pred  # noqa: E731
        return torch.autograd.functional.jacobian(function, torch.tensor(y)).numpy(), function  # [T+1, m, n]

    w = optimal_richardson_step(A, np.eye(n))
    gd, _ = jacobian("gd", 4)
    expected = [K_query @ (np.eye(n) - np.linalg.matrix_power(np.eye(n) - w * A, t)) @ np.linalg.inv(A) for t in range(5)]
    np.testing.assert_allclose(gd, expected, rtol=0, atol=1e-12)
    newton, _ = jacobian("newton", 4)
    mu = np.linalg.eigvalsh(A)
    M, expected = 2 / (mu[0] ** 2 + mu[-1] ** 2) * A, [np.zeros((2, n))]
    for _ in range(4):
        expected.append(K_query @ M)
        M = 2 * M - M @ A @ M
    np.testing.assert_allclose(newton, expected, rtol=0, atol=1e-12)
    cg_jacobian, function = jacobian("cg", 25)
    eps = 1e-6
    central = np.stack([(function(torch.tensor(y + eps * e)) - function(torch.tensor(y - eps * e))).numpy() / (2 * eps) for e in np.eye(n)], -1)
    assert np.isfinite(cg_jacobian).all()
    np.testing.assert_allclose(cg_jacobian, central, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cg_jacobian[-1], K_query @ np.linalg.inv(A), rtol=0, atol=1e-10)


def test_registry_gd_on_the_linear_kernel_predicts_as_feature_space_gd_at_the_same_step():
    """registry.gradient_descent's docstring: on the linear kernel its predictions equal
    feature-space GD's run with the same step, while the two default steps differ when n > d
    (2 / (mu_min + mu_max) of X X^T + lam I, where mu_min = lam, and of X^T X + lam I)."""
    X, Q, y = RNG.standard_normal((6, 2)), RNG.standard_normal((3, 2)), RNG.standard_normal(6)
    kernel = solve("gd", X @ X.T, y, 0.1, 5, K_query=Q @ X.T)
    np.testing.assert_allclose(feature_gd(X, y, 0.1, 5, step=kernel.step, X_query=Q).pred.numpy(), kernel.pred.numpy(), atol=1e-12)
    gram, features = np.linalg.eigvalsh(X @ X.T + 0.1 * np.eye(6)), np.linalg.eigvalsh(X.T @ X + 0.1 * np.eye(2))
    default = feature_gd(X, y, 0.1, 5, X_query=Q)
    assert float(kernel.step) == pytest.approx(2 / (gram[0] + gram[-1]), rel=1e-12)
    assert float(default.step) == pytest.approx(2 / (features[0] + features[-1]), rel=1e-12)
    assert not np.allclose(default.pred.numpy(), kernel.pred.numpy(), atol=1e-3)


# ----- scoring ---------------------------------------------------------------------------------


def random_walk_steps(batch: int, n_steps: int, m: int, seed: int) -> np.ndarray:
    """Step predictions `[B, T+1, m]`: a random walk from 0 (step 0 predicts 0, as every solver)."""
    steps = np.cumsum(np.random.default_rng(seed).standard_normal((batch, n_steps + 1, m)), axis=1)
    steps[:, 0] = 0.0
    return steps


def test_layers_copied_from_known_steps_align_there_with_score_one():
    """Layers that ARE steps 0, 2, 3, 5 of the algorithm align to [0, 2, 3, 5] with MSE 0 there,
    path R2 1 and interval (1, 1); with noise added, the path R2 equals
    1 - sum SSE / sum SST along that path written out in NumPy (layer 0 not scored)."""
    steps = random_walk_steps(30, 6, 4, seed=0)
    layers = steps[:, [0, 2, 3, 5]]
    score = score_algorithms(layers, {"a": steps}, steps[:, -1], bootstrap=50)["a"]
    assert score.aligned_steps.tolist() == [0, 2, 3, 5] and score.score == 1.0 and score.score_ci == (1.0, 1.0)
    np.testing.assert_array_equal(score.mse[[0, 1, 2, 3], [0, 2, 3, 5]], 0.0)
    noisy = layers + 0.3 * np.random.default_rng(1).standard_normal(layers.shape)
    score = score_algorithms(noisy, {"a": steps}, steps[:, -1], bootstrap=0)["a"]
    assert score.aligned_steps.tolist() == [0, 2, 3, 5]
    sse = sum(((noisy[:, l] - steps[:, t]) ** 2).sum() for l, t in [(1, 2), (2, 3), (3, 5)])
    sst = sum(((steps[:, t] - steps[:, t].mean()) ** 2).sum() for t in [2, 3, 5])
    assert score.score == pytest.approx(1 - sse / sst, rel=1e-12)


def test_one_prompt_one_scored_layer_and_zero_steps():
    """B = 1 with one scored layer equal to step 3: score 1 at step 3. T = 0 (only the start,
    prediction 0): every layer aligns to step 0, R2 is NaN there and the path R2 is -inf
    (error over no variance), as the module docstring defines."""
    steps = random_walk_steps(1, 4, 3, seed=2)
    score = score_algorithm("a", steps[:, [3]], steps, steps[:, -1], layers=[1])
    assert score.aligned_steps.tolist() == [3] and score.score == 1.0
    steps = random_walk_steps(5, 4, 3, seed=3)
    score = score_algorithm("a", steps[:, [0, 1, 3]], steps[:, :1], steps[:, -1])
    assert score.aligned_steps.tolist() == [0, 0, 0] and score.score == -np.inf and np.isnan(score.r2).all()


def test_monotone_alignment_of_a_cost_with_nan_is_refused_or_skips_the_nan():
    """1 - r2_matrix(...) is a natural cost, and its step-0 column is NaN by definition (step 0
    has no variance). Layers = steps 0, 1, 3 + small noise align to [0, 1, 3] under the MSE;
    under 1 - R2 monotone_alignment returns [0, 0, 0] with total NaN (np.minimum.accumulate
    spreads the NaN, argmin picks it). It should raise a ValueError naming NaN, or treat NaN
    as +inf and give a finite total."""
    steps = random_walk_steps(20, 4, 3, seed=4)
    layers = steps[:, [0, 1, 3]] + 0.05 * np.random.default_rng(5).standard_normal((20, 3, 3))
    cost = 1 - r2_matrix(layers, steps)
    assert np.isnan(cost[:, 0]).all()
    try:
        aligned, total = monotone_alignment(cost)
    except ValueError as error:
        assert "NaN" in str(error)
    else:
        assert np.isfinite(total) and aligned.tolist()[1:] == [1, 3]


@pytest.mark.parametrize("which", ["krr_pred", "step_preds"])
def test_a_batch_mismatch_is_one_error_naming_the_argument(which):
    """layer_pred for 5 prompts with krr_pred (or step_preds) for 4: the error should name that
    argument, as paired_sums' "must share the batch" does; log_error_profile is reached first and
    raises NumPy's broadcast error."""
    steps = random_walk_steps(5, 3, 2, seed=6)
    layers = steps[:, [0, 1]]
    krr_pred, step_preds = steps[:, -1], {"a": steps}
    if which == "krr_pred":
        krr_pred = krr_pred[:4]
    else:
        step_preds = {"a": steps[:4]}
    with pytest.raises(ValueError, match=f"{which}|share the batch"):
        score_algorithms(layers, step_preds, krr_pred, bootstrap=0)


def test_resamples_for_another_number_of_prompts_are_refused():
    """score_algorithm(resamples=bootstrap_weights(10, 6, 0)) on 20 prompts: the [6, 10] weights
    are reshaped to [3, 20] (3 'resamples' mixing two draws each) and scored; resamples must be
    [R, B] with B the number of prompts (docstring), so this should be a ValueError naming them."""
    steps = random_walk_steps(20, 4, 3, seed=7)
    with pytest.raises(ValueError, match="resamples"):
        score_algorithm("a", steps[:, [0, 1, 3]], steps, steps[:, -1], resamples=bootstrap_weights(10, 6, 0))


@pytest.mark.parametrize("level", [1.5, -0.5])
def test_a_confidence_level_outside_0_1_is_refused_by_name(level):
    """percentile_interval([1, 2, 3], level=-0.5) returns (3.0, 1.0) and level=1.5 raises NumPy's
    quantile error without naming level; both should be a ValueError naming level."""
    with pytest.raises(ValueError, match="level"):
        percentile_interval([1.0, 2.0, 3.0], level)


def test_verdict_on_scores_with_unshared_resamples_names_the_problem():
    """Two score_algorithm results made with 200 and 150 resamples cannot be paired; the verdict
    should say the scores must share their bootstrap resamples (score_algorithms), not 'operands
    could not be broadcast together with shapes (200,) (150,)'."""
    steps_a, steps_b = random_walk_steps(30, 4, 3, seed=8), random_walk_steps(30, 4, 3, seed=9)
    layers = steps_a[:, [0, 1, 3]]
    scores = {
        "a": score_algorithm("a", layers, steps_a, steps_a[:, -1], resamples=bootstrap_weights(30, 200, 0)),
        "b": score_algorithm("b", layers, steps_b, steps_a[:, -1], resamples=bootstrap_weights(30, 150, 0)),
    }
    with pytest.raises(ValueError, match="resample"):
        identifiability_verdict(scores, {"a": steps_a, "b": steps_b})


def test_step_preds_that_is_not_a_dict_is_a_value_error_naming_it():
    steps = random_walk_steps(5, 3, 2, seed=10)
    with pytest.raises(ValueError, match="step_preds"):
        score_algorithms(steps[:, [0, 1]], [steps], steps[:, -1], bootstrap=0)


def test_non_integer_layer_indices_are_refused():
    """layers=[0.5, 1.5, 2.5] becomes [0, 1, 2] via astype(int64): the first row is then taken as
    the unscored embedding without a word; it should be a ValueError naming layers."""
    steps = random_walk_steps(5, 3, 2, seed=11)
    with pytest.raises(ValueError, match="layers"):
        score_algorithms(steps[:, [0, 1, 2]], {"a": steps}, steps[:, -1], layers=[0.5, 1.5, 2.5], bootstrap=0)


def test_step_sensitivities_under_an_unknown_name_are_refused():
    """A typo ("A" for "a") leaves every sensitivity score None without a word; names that are
    not keys of step_preds should be a ValueError naming step_sensitivities."""
    steps = random_walk_steps(6, 3, 2, seed=12)
    sensitivities = np.random.default_rng(13).standard_normal((6, 4, 2, 5))
    with pytest.raises(ValueError, match="step_sensitivities"):
        score_algorithms(
            steps[:, [0, 1, 3]], {"a": steps}, steps[:, -1], bootstrap=0,
            layer_sensitivity=sensitivities[:, [0, 1, 3]], step_sensitivities={"A": sensitivities},
        )


def test_a_negative_bootstrap_seed_is_refused_by_name():
    steps = random_walk_steps(5, 3, 2, seed=14)
    with pytest.raises(ValueError, match="seed"):
        score_algorithms(steps[:, [0, 1]], {"a": steps}, steps[:, -1], bootstrap=5, seed=-1)


def test_kappa_strata_of_no_prompts_is_a_value_error():
    with pytest.raises(ValueError, match="kappa"):
        kappa_strata(np.array([]), 3)
    with pytest.raises(ValueError, match=r"kappa must hold one condition number per prompt \[B\]"):
        kappa_strata(np.ones((4, 2)), 3)  # a [B, 2] table is not B condition numbers


def test_identical_candidates_are_equivalent_and_a_far_one_is_the_runner_up():
    """40 prompts, layers = steps 0, 1, 3, 5 of "a" + noise 0.05: "a" is identified with its
    exact copy as equivalent (agreement 1); "b" (an independent walk, every layer closer to its
    step 0) is the runner-up with path R2 -inf."""
    steps_a, steps_b = random_walk_steps(40, 5, 3, seed=15), random_walk_steps(40, 5, 3, seed=16)
    layers = steps_a[:, [0, 1, 3, 5]] + 0.05 * np.random.default_rng(17).standard_normal((40, 4, 3))
    preds = {"a": steps_a, "b": steps_b, "a_copy": steps_a.copy()}
    scores = score_algorithms(layers, preds, steps_a[:, -1], bootstrap=200, seed=0)
    verdict = identifiability_verdict(scores, preds)
    assert verdict.best in ("a", "a_copy") and verdict.identified
    assert verdict.equivalent == [{"a": "a_copy", "a_copy": "a"}[verdict.best]] and verdict.runner_up == "b"
    assert scores["b"].score == -np.inf and scores["a"].aligned_steps.tolist() == [0, 1, 3, 5]


# ----- kernels and samplers --------------------------------------------------------------------


def test_exp_and_linear_kernels_and_spectral_summaries_match_numpy():
    """exp kernel with temperature 2 = exp(x.z / 2); linear = x.z; d_eff of the 1x1 K = [[2]] at
    lam 0.5 is 2 / 2.5; cond(diag(1, 0)) is inf and cond(diag(1, 0) + 0.5 I) = 3."""
    x, z = RNG.standard_normal((2, 5, 3)), RNG.standard_normal((2, 4, 3))
    np.testing.assert_allclose(kernel_matrix("exp", x, z, temperature=2.0).numpy(), np.exp(np.einsum("bnd,bmd->bnm", x, z) / 2), rtol=1e-14)
    np.testing.assert_allclose(kernel_matrix("linear", x).numpy(), np.einsum("bnd,bmd->bnm", x, x), rtol=0, atol=1e-14)
    assert float(effective_dimension([[2.0]], 0.5)) == pytest.approx(0.8, rel=1e-15)
    assert float(condition_number(np.diag([1.0, 0.0]))) == np.inf
    assert float(condition_number(np.diag([1.0, 0.0]), 0.5)) == pytest.approx(3.0, rel=1e-15)


def test_a_seed_gives_the_same_prompts_on_every_device_spelling_and_dtype():
    """seed=7: device None, "cpu" and torch.device("cpu") give bit-identical prompts, float32 is
    the float64 draw rounded; a shared generator advances between calls; a seed drawn by
    seed=None is recorded and replays the draw."""
    sampler = LinearRegressionSampler(3, noise_std=0.1)
    first = sampler.sample(4, 5, 2, seed=7)
    for device in ("cpu", torch.device("cpu")):
        again = sampler.sample(4, 5, 2, seed=7, device=device)
        assert torch.equal(again.x_support, first.x_support) and torch.equal(again.y_support, first.y_support)
    wide = sampler.sample(4, 5, 2, seed=7, dtype=torch.float64)
    assert torch.equal(wide.y_query.float(), first.y_query) and wide.dtype == torch.float64
    generator = torch.Generator().manual_seed(3)
    assert not torch.equal(sampler.sample(2, 3, 1, generator=generator).x_support, sampler.sample(2, 3, 1, generator=generator).x_support)
    drawn = sampler.sample(2, 3, 1)
    assert torch.equal(sampler.sample(2, 3, 1, seed=drawn.info["seed"]).x_support, drawn.x_support)


def test_an_unknown_device_string_is_refused_by_name():
    with pytest.raises(ValueError, match="device"):
        LinearRegressionSampler(2).sample(1, 2, 1, seed=0, device="gpu")


def test_gp_covariance_spd_systems_and_bayes_ridge_match_closed_forms():
    """GP covariance = Gaussian kernel (bandwidth 0.5, NumPy) + jitter x mean(diag) I; an SPD
    system with kappa 100 has cond exactly 100 and the documented spectrum (np.linalg.eigvalsh),
    and its float32 copy is the float64 draw rounded; Bayes ridge = noise^2 d (linear) or
    noise^2 (GP)."""
    x = RNG.standard_normal((4, 2))
    covariance = GPRegressionSampler(2, bandwidth=0.5, jitter=1e-6).covariance(torch.tensor(x)).numpy()
    np.testing.assert_allclose(covariance, gaussian(x, x, 0.5) + 1e-6 * np.eye(4), rtol=0, atol=1e-15)
    system = sample_spd_system(3, 5, 100.0, seed=1)
    for matrix in system.matrix.numpy():
        eigenvalues = np.linalg.eigvalsh(matrix)
        assert eigenvalues[-1] / eigenvalues[0] == pytest.approx(100.0, rel=1e-12)
        np.testing.assert_allclose(eigenvalues[::-1], 100.0 ** (-np.arange(5) / 4), rtol=1e-12)
    assert torch.equal(sample_spd_system(3, 5, 100.0, seed=1, dtype=torch.float32).matrix, system.matrix.float())
    assert bayes_optimal_ridge(LinearRegressionSampler(3, noise_std=0.1)) == pytest.approx(0.03)
    assert bayes_optimal_ridge(GPRegressionSampler(2)) == pytest.approx(0.01)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_zero_dimensional_integer_tensor_is_a_step_count_and_other_tensors_are_refused(algorithm):
    """n_steps=torch.tensor(3) (e.g. read back from a tensor of settings) runs exactly 3 steps,
    as n_steps=3 does; a float, bool or 1-element 1-d tensor is refused by name."""
    x = torch.tensor(RNG.standard_normal((2, 4, 2)))
    K = torch.exp(-0.5 * torch.cdist(x, x) ** 2)  # Gaussian: positive row sums, so row-sum Richardson applies
    y = torch.tensor(RNG.standard_normal((2, 4)))
    expected = solve(algorithm, K, y, 0.1, 3)
    got = solve(algorithm, K, y, 0.1, torch.tensor(3))
    assert got.n_steps == 3 and isinstance(got.n_steps, int)
    torch.testing.assert_close(got.alpha, expected.alpha, rtol=0, atol=0)
    for bad in (torch.tensor(3.0), torch.tensor(True), torch.tensor([3])):
        with pytest.raises(ValueError, match="n_steps must be an integer"):
            solve(algorithm, K, y, 0.1, bad)
