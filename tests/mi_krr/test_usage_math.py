"""Usage review of the mathematics API (kernels, solvers, task samplers, shifts) as a researcher
calls it from a notebook: awkward-but-legal inputs checked against independent NumPy / SciPy
references written here, and the behaviour of the bugs that review found, now fixed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_krr.checkpoints import task_sets
from mi_krr.train.config import TrainConfig
from mi_krr.kernels import condition_number, effective_dimension, kernel_matrix
from mi_krr.solvers import ALGORITHMS, cg, jacobi_cg, richardson, solve
from mi_krr.tasks import (
    sampler_from_config,
    DEFAULT_SHIFTS,
    GPRegressionSampler,
    LinearRegressionSampler,
    Shift,
    applicable_shifts,
    apply_shift,
    sample_spd_system,
)

RNG = np.random.default_rng(20240611)


# ----- independent references ------------------------------------------------------------------


def numpy_gaussian(x: np.ndarray, z: np.ndarray, bandwidth: float) -> np.ndarray:
    """exp(-|x - z|^2 / (2 bandwidth^2)) by explicit broadcasting of differences (no |x|^2 trick)."""
    diff = x[..., :, None, :] - z[..., None, :, :]
    return np.exp(-(diff**2).sum(-1) / (2 * bandwidth**2))


def textbook_pcg(A: np.ndarray, b: np.ndarray, n_steps: int, M: np.ndarray | None = None) -> np.ndarray:
    """Preconditioned CG (Saad, Alg. 9.1) from x0 = 0, every iterate: `[T+1, n]`."""
    x, r = np.zeros_like(b), b.copy()
    z = r if M is None else M @ r
    p, rz = z.copy(), r @ z
    iterates = [x.copy()]
    for _ in range(n_steps):
        Ap = A @ p
        step = rz / (p @ Ap)
        x, r = x + step * p, r - step * Ap
        z = r if M is None else M @ r
        rz, rz_old = r @ z, rz
        p = z + rz / rz_old * p
        iterates.append(x.copy())
    return np.stack(iterates)


def richardson_closed_form(A: np.ndarray, y: np.ndarray, step: float, P: np.ndarray, n_steps: int) -> np.ndarray:
    """alpha_t = alpha* - (I - step P A)^t alpha*, alpha* = A^-1 y (scipy.linalg.solve): `[T+1, n]`."""
    exact = scipy.linalg.solve(A, y, assume_a="pos")
    contraction = np.eye(len(A)) - step * P @ A
    return np.stack([exact - np.linalg.matrix_power(contraction, t) @ exact for t in range(n_steps + 1)])


def gaussian_kernel_with_duplicates(n: int, d: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian kernel `[n, n]` on points whose last two repeat the first (rank n - 2), and its
    query kernel `[3, n]`, both written out in NumPy."""
    points = RNG.standard_normal((n, d))
    points[-2:] = points[0]
    queries = RNG.standard_normal((3, d))
    return numpy_gaussian(points, points, 1.0), numpy_gaussian(queries, points, 1.0)


INDEFINITE_K = np.array([[0.0, 1.0], [1.0, 0.0]])  # eigenvalues -1, +1: K + 0.1 I is indefinite


# ----- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape, z_shape",
    [((4, 2), (3, 5, 2)), ((1, 4, 2), (3, 5, 2)), ((2, 1, 4, 2), (3, 5, 2)), ((3, 4, 2), (5, 2))],
)
def test_gaussian_kernel_broadcasts_query_support_batches_like_numpy(x_shape, z_shape):
    """kernel_matrix("gaussian", x, z) with x and z of different (broadcasting) batch shapes, points
    offset from the origin, equals NumPy broadcasting of the explicit differences."""
    x, z = RNG.standard_normal(x_shape) + 3.0, RNG.standard_normal(z_shape) + 3.0
    K = kernel_matrix("gaussian", x, z, bandwidth=0.7)
    assert K.dtype == torch.float64  # NumPy inputs become float64
    np.testing.assert_allclose(K.numpy(), numpy_gaussian(x, z, 0.7), rtol=0, atol=1e-14)


def test_effective_dimension_lambda_sweep_matches_the_trace_formula():
    """lam[:, None] against a batch [B] gives d_eff [L, B] equal to tr K (K + lam I)^-1 from
    scipy.linalg.solve, for lam from 1e-4 to 1e6 (where d_eff -> tr K / lam)."""
    K = numpy_gaussian(*(2 * [RNG.standard_normal((3, 6, 2))]), 0.8)
    lams = np.array([1e-4, 0.1, 1.0, 1e6])
    d_eff = effective_dimension(torch.tensor(K, dtype=torch.float32), torch.tensor(lams)[:, None])
    assert d_eff.shape == (4, 3) and d_eff.dtype == torch.float64
    reference = [[np.trace(scipy.linalg.solve(K[b] + lam * np.eye(6), K[b])) for b in range(3)] for lam in lams]
    np.testing.assert_allclose(d_eff.numpy(), reference, rtol=1e-6)  # K went through float32
    np.testing.assert_allclose(d_eff[-1].numpy(), np.trace(K, axis1=-2, axis2=-1) / 1e6, rtol=1e-5)


def test_effective_dimension_of_an_indefinite_matrix_is_refused():
    """K = [[0, 1], [1, 0]] (eigenvalues -1, 1) is not PSD: d_eff is refused with a ValueError
    naming K (it used to clamp the -1 to 0 and return 0.909, where tr K (K + lam I)^-1 is 2.02)."""
    with pytest.raises(ValueError, match="K must be positive semi-definite"):
        effective_dimension(INDEFINITE_K, 0.1)


def test_effective_dimension_clamps_only_rounding_negative_eigenvalues():
    """A rank-1 PSD K = v v^T rounded to float32 has eigenvalues ~ -1e-8 x its largest from
    rounding: accepted, d_eff = |v|^2 / (|v|^2 + lam) as for the exact rank-1 matrix (NumPy)."""
    v = np.random.default_rng(5).standard_normal(8)
    K = torch.tensor(np.outer(v, v), dtype=torch.float32)
    norm = float(v @ v)
    assert float(effective_dimension(K, 0.5)) == pytest.approx(norm / (norm + 0.5), rel=1e-5)


@pytest.mark.parametrize("function", [effective_dimension, condition_number])
def test_a_lam_that_does_not_broadcast_is_a_value_error_naming_lam(function):
    """K batch [3] with lam [4]: one ValueError that names lam (not torch's size-mismatch message)."""
    K = numpy_gaussian(*(2 * [RNG.standard_normal((3, 5, 2))]), 1.0)
    with pytest.raises(ValueError, match="lam"):
        function(K, torch.tensor([0.1, 0.2, 0.3, 0.4]))


# ----- solvers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_support_point_is_solved_exactly_in_one_step(name):
    """n = 1: (k + lam) alpha = y has alpha = y / (k + lam); every registry solver reaches it at
    step 1 and stays there; predictions are k_query * alpha (closed form)."""
    trajectory = solve(name, [[2.0]], [3.0], 0.5, 3, K_query=[[1.0], [-2.0]])
    np.testing.assert_allclose(trajectory.alpha.numpy().ravel(), [0.0, 1.2, 1.2, 1.2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(trajectory.pred[-1].numpy(), [1.2, -2.4], rtol=1e-12)
    np.testing.assert_allclose(trajectory.residual_norm.numpy(), [3.0, 0, 0, 0], atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_zero_steps_with_size_one_batch_dims_and_float32_inputs(name):
    """n_steps = 0 on float32 tensors with batch dims (1, 1): float64 outputs with the batch dims
    restored, alpha_0 = 0, pred_0 = 0 and residual_norm_0 = ||y|| (NumPy)."""
    K, K_query = gaussian_kernel_with_duplicates(5)
    y = RNG.standard_normal(5)
    as32 = lambda a: torch.tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    trajectory = solve(name, as32(K), as32(y), 0.3, 0, K_query=as32(K_query))
    assert trajectory.alpha.shape == (1, 1, 1, 5) and trajectory.pred.shape == (1, 1, 1, 3)
    assert trajectory.alpha.dtype == trajectory.pred.dtype == trajectory.residual_norm.dtype == torch.float64
    assert not trajectory.alpha.any() and not trajectory.pred.any()
    np.testing.assert_allclose(trajectory.residual_norm.numpy().ravel(), [np.linalg.norm(y.astype(np.float32))], rtol=1e-6)


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_on_duplicated_support_points_follows_textbook_pcg(backend, preconditioned):
    """Batch [2, 3] of Gaussian kernels with repeated support points (singular K, lam > 0), NumPy
    inputs: every CG / Jacobi-PCG iterate equals textbook PCG, the predictions are K_query alpha_t,
    and after n steps alpha is scipy.linalg.solve's."""
    n, lam, n_steps = 7, 0.05, 7
    pairs = [gaussian_kernel_with_duplicates(n) for _ in range(6)]
    K = np.stack([k for k, _ in pairs]).reshape(2, 3, n, n)
    K_query = np.stack([q for _, q in pairs]).reshape(2, 3, 3, n)
    y = RNG.standard_normal((2, 3, n))
    solver = jacobi_cg if preconditioned else cg
    trajectory = solver(K, y, lam, n_steps, K_query=K_query, backend=backend)
    for index in np.ndindex(2, 3):
        A = K[index] + lam * np.eye(n)
        M = np.diag(1.0 / np.diag(A)) if preconditioned else None
        expected = textbook_pcg(A, y[index], n_steps, M)
        np.testing.assert_allclose(trajectory.alpha[index].numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())
        expected_pred = expected @ K_query[index].T
        np.testing.assert_allclose(trajectory.pred[index].numpy(), expected_pred, rtol=0, atol=1e-9 * np.abs(expected_pred).max())
        exact = scipy.linalg.solve(A, y[index], assume_a="pos")
        np.testing.assert_allclose(trajectory.alpha[index][-1].numpy(), exact, rtol=0, atol=1e-7 * np.abs(exact).max())


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - {"richardson_rowsum"}))
def test_a_very_large_ridge_is_solved_in_one_step(name):
    """lam = 1e8 >> ||K||: (K + lam I)^-1 y = y / lam to O(||K|| / lam), so every solver's first
    iterate is within 1e-6 (relative) of scipy.linalg.solve's answer. (Not row-sum Richardson:
    P (K + lam I) ~ lam diag(K 1)^-1 keeps the spread of K's row sums however large lam is.)"""
    K, _ = gaussian_kernel_with_duplicates(6)
    y = RNG.standard_normal(6)
    exact = scipy.linalg.solve(K + 1e8 * np.eye(6), y)
    first = solve(name, K, y, 1e8, 1).alpha[1].numpy()
    np.testing.assert_allclose(first, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(2, 8),
    precond=st.sampled_from(["none", "jacobi", "rowsum"]),
    step_scale=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**16),
)
def test_richardson_with_per_prompt_steps_is_the_closed_form_error_polynomial(n, precond, step_scale, seed):
    """richardson with a per-prompt step [2, 1] broadcast over batch [2, 3] equals
    alpha* - (I - w P A)^t alpha* for each prompt (NumPy matrix powers, P written out)."""
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((2, 3, n, 2))
    K = numpy_gaussian(points, points, 1.0)
    y = rng.standard_normal((2, 3, n))
    lam, n_steps = 0.2, 5
    steps = np.array([[step_scale], [0.5 * step_scale]])
    trajectory = richardson(K, y, lam, n_steps, step=steps, precond=precond)
    for i, j in np.ndindex(2, 3):
        A = K[i, j] + lam * np.eye(n)
        P = {"none": np.eye(n), "jacobi": np.diag(1 / np.diag(A)), "rowsum": np.diag(1 / K[i, j].sum(1))}[precond]
        expected = richardson_closed_form(A, y[i, j], steps[i, 0], P, n_steps)
        np.testing.assert_allclose(trajectory.alpha[i, j].numpy(), expected, rtol=0, atol=1e-10 * max(1, np.abs(expected).max()))
    np.testing.assert_array_equal(trajectory.step.numpy(), np.broadcast_to(steps, (2, 3)))


@pytest.mark.parametrize("name", ["cg", "jacobi_cg", "gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball"])
def test_an_indefinite_system_is_refused_like_krr_refuses_it(name):
    """K = [[0, 1], [1, 0]], lam = 0.1: K + lam I has eigenvalues 1.1 and -0.9, so it is no KRR
    system; krr raises "not positive definite", and so does every solver whose iteration needs
    it (it used to give cg -> 1e307, heavy_ball -> NaN, gd -> residual growing x10 per step)."""
    with pytest.raises(ValueError, match="K \\+ lam I is not positive definite"):
        solve(name, INDEFINITE_K, [1.0, 0.5], 0.1, 2)


def test_a_float32_kernel_with_rounding_asymmetry_is_accepted():
    """A float32 Gaussian kernel built with torch.cdist is symmetric up to 1 ulp (1.2e-7);
    effective_dimension accepts it, and cg (which takes float32 inputs) should too, giving
    scipy.linalg.solve's answer after n steps."""
    x = torch.tensor(RNG.standard_normal((4, 30, 3)), dtype=torch.float32)
    K = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    assert 0 < float((K - K.mT).abs().max()) < 1e-6  # asymmetric at float32 rounding only
    effective_dimension(K, 0.1)  # accepted there
    y = RNG.standard_normal((4, 30))
    trajectory = cg(K, y, 0.1, 30)
    K64 = K.double().numpy()
    for b in range(4):
        exact = scipy.linalg.solve((K64[b] + K64[b].T) / 2 + 0.1 * np.eye(30), y[b])
        np.testing.assert_allclose(trajectory.alpha[b, -1].numpy(), exact, rtol=1e-4, atol=1e-6)


# ----- tasks and shifts ------------------------------------------------------------------------


def test_mean_shift_after_anisotropy_moves_the_mean_and_keeps_the_covariance():
    """anisotropy (kappa 25) then mean_shift (offset 1): Monte-Carlo mean = input_std * offset on
    every coordinate, covariance = the sampler's input_covariance() (NumPy np.cov, generous bars)."""
    base = LinearRegressionSampler(3, input_std=2.0)
    shifted = apply_shift(apply_shift(base, Shift("anisotropy", {"condition_number": 25.0})), Shift("mean_shift", {"offset": 1.0}))
    x = shifted.sample(2000, 4, 0, seed=5, dtype=torch.float64).x_support.reshape(-1, 3).numpy()
    np.testing.assert_allclose(x.mean(0), 2.0, atol=5 * 2.0 / math.sqrt(len(x)))
    covariance = shifted.input_covariance().numpy()
    np.testing.assert_allclose(np.cov(x.T), covariance, atol=0.15)
    eigenvalues = np.linalg.eigvalsh(covariance)
    assert eigenvalues[-1] / eigenvalues[0] == pytest.approx(25.0)
    assert eigenvalues[-1] == pytest.approx(4.0)


def test_gp_exp_kernel_labels_have_the_kernel_cross_covariance():
    """GP regression with the exp kernel: E[y_support_i y_query_j] = E[k(x_i, x*_j)] and
    Var(y_support) = E[k(x, x)] + noise_std^2 (Monte Carlo over 3000 prompts, kernel from NumPy)."""
    sampler = GPRegressionSampler(2, kernel="exp", temperature=2.0, noise_std=0.3)
    task = sampler.sample(3000, 3, 2, seed=11, dtype=torch.float64)
    xs, xq = task.x_support.numpy(), task.x_query.numpy()
    cross = np.exp(np.einsum("bnd,bmd->bnm", xs, xq) / 2.0).mean(0)
    empirical = np.einsum("bn,bm->nm", task.y_support.numpy(), task.y_query.numpy()) / task.batch_size
    np.testing.assert_allclose(empirical, cross, atol=0.1)
    variance = np.exp((xs**2).sum(-1) / 2.0).mean() + 0.09
    assert task.y_support.numpy().var() == pytest.approx(variance, rel=0.08)


@pytest.mark.parametrize("sampler", [LinearRegressionSampler(1), GPRegressionSampler(1)], ids=["linear", "gp"])
def test_every_applicable_shift_of_a_one_dimensional_sampler_applies(sampler):
    """applicable_shifts promises 'the rest would raise in apply_shift': every shift it returns
    applies, and a 1-D sampler has no anisotropy shift (it used to list 'anisotropy_kappa10',
    which then raised 'condition_number must be 1 when dim == 1' and crashed task_sets)."""
    for shift in applicable_shifts(sampler).values():
        apply_shift(sampler, shift)
    assert "anisotropy_kappa10" not in applicable_shifts(sampler)
    with pytest.raises(ValueError, match="anisotropy shift needs inputs of dim >= 2"):
        apply_shift(sampler, DEFAULT_SHIFTS["anisotropy_kappa10"])
    sets, _ = task_sets(sampler, 2, 4, 1, seed=0)
    assert "in_distribution" in sets


def test_an_overflowing_exp_kernel_error_gives_the_right_advice():
    """temperature = 1e-3 makes x.z / temperature ~ 1000 > 709, exp overflows float64 and the
    covariance holds inf/NaN; the fix is a LARGER temperature (or smaller inputs), not a lower one."""
    with pytest.raises(ValueError) as error:
        GPRegressionSampler(2, kernel="exp", temperature=1e-3).sample(2, 16, 2, seed=0)
    message = str(error.value)
    assert "lower temperature" not in message
    assert "overflows" in message and "raise temperature" in message


def test_apply_shift_with_a_shift_label_names_the_argument():
    """A DEFAULT_SHIFTS label applies the labelled shift (input_std 1 -> 2); an unknown label or a
    non-Shift is a ValueError naming shift (it used to be an AttributeError)."""
    sampler = LinearRegressionSampler(2)
    shifted = apply_shift(sampler, "input_scale_x2")
    assert shifted.input_std == 2.0 and shifted == apply_shift(sampler, DEFAULT_SHIFTS["input_scale_x2"])
    with pytest.raises(ValueError, match="shift must be one of"):
        apply_shift(sampler, "input_scale_x3")
    with pytest.raises(ValueError, match="shift must be a Shift"):
        apply_shift(sampler, {"kind": "input_scale"})


@pytest.mark.parametrize("index, as_list", [(0, [0]), ((0, 2), [0, 2])], ids=["int", "tuple"])
def test_select_with_an_int_or_tuple_selects_or_names_the_index(index, as_list):
    """select(0) / select((0, 2)) select the same prompts as select([0]) / select([0, 2]), the
    batch dimension kept (they used to fail on x_support's shape / with a raw IndexError)."""
    task = LinearRegressionSampler(2).sample(4, 3, 2, seed=0)
    selected = task.select(index)
    assert selected.batch_size == len(as_list)
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(selected, name), getattr(task, name)[as_list])


def test_a_zero_dimensional_tensor_input_mean_is_a_scalar_mean():
    """input_mean = torch.tensor(1.0) (e.g. from x.mean()) means 1.0 on every coordinate, as
    np.float32(1.0) does."""
    sampler = LinearRegressionSampler(2, input_mean=torch.tensor(1.0))
    assert sampler.input_mean == 1.0


@pytest.mark.parametrize("solver", [cg, jacobi_cg])
def test_cg_torch_schedule_refuses_an_indefinite_system_too(solver):
    """The batched torch schedule (backend="torch", also the one autograd runs) meets the same
    curvature p^T (K + lam I) p < 0 on K = [[0, 1], [1, 0]], lam = 0.1 (eigenvalues 1.1, -0.9;
    y = e_2: by hand, p_1 = [-10, 100] gives p^T A p = -990 at step 2) and raises the same error
    as the fused loop; a PSD K next to it in the batch does not hide it."""
    K = torch.tensor(np.stack([INDEFINITE_K, np.eye(2)]))
    with pytest.raises(ValueError, match="K \\+ lam I is not positive definite"):
        solver(K, torch.tensor([[0.0, 1.0], [1.0, 1.0]]), 0.1, 2, backend="torch")


def test_seeds_beyond_torchs_range_are_refused_by_name():
    """torch's CPU generator keeps 32 bits of a seed (seeds 1 and 1 + 2**32 draw the same
    numbers, checked here on torch itself): 2**32 - 1 samples, 2**32 is a ValueError naming seed
    and the range (it used to be accepted up to 2**64 and repeat smaller seeds)."""
    draw = lambda seed: torch.rand(4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1 + 2**32))
    sampler = LinearRegressionSampler(2)
    assert sampler.sample(1, 2, 1, seed=2**32 - 1).x_support.shape == (1, 2, 2)
    for seed in (2**32, 1 + 2**32, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            sampler.sample(1, 2, 1, seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer"):
        sample_spd_system(1, 3, 2.0, seed=2**32)
    with pytest.raises(ValueError, match="seed must be an integer"):
        TrainConfig(seed=2**32)


def test_task_sets_from_the_last_seed_wrap_to_seed_zero():
    """task_sets draws its shifted sets with seeds seed + 1, seed + 2, ...: from the largest seed,
    2**32 - 1, the first shift wraps to seed 0 (checked against the shifted sampler drawn directly
    with seed 0) instead of raising about a seed the user never passed."""
    sampler = LinearRegressionSampler(2)
    sets, _ = task_sets(sampler, 2, 4, 1, seed=2**32 - 1)
    first_shift = list(sets)[1]
    direct = apply_shift(sampler, DEFAULT_SHIFTS[first_shift]).sample(2, 4, 1, seed=0, dtype=torch.float32)
    assert torch.equal(sets[first_shift].x_support, direct.x_support)
    assert torch.equal(sets["in_distribution"].x_support, sampler.sample(2, 4, 1, seed=2**32 - 1, dtype=torch.float32).x_support)


def test_sampler_config_without_a_required_field_names_it():
    """{"sampler": "linear_regression"} lacks dim: a ValueError naming dim, not a TypeError."""
    with pytest.raises(ValueError, match="config lacks dim"):
        sampler_from_config({"sampler": LinearRegressionSampler.name})


def test_gp_sample_functions_refuses_inputs_of_another_dimension():
    """A 2-D GP sampler handed 3-D points: ValueError naming x and d=2 (it used to draw from a
    kernel on the wrong dimension silently)."""
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., N, d=2\]"):
        GPRegressionSampler(2).sample_functions(torch.zeros(4, 3), seed=0)


def test_a_numpy_scalar_step_is_recorded_as_a_number():
    """richardson(step=np.float32(0.01)) records the step as the float 0.01 (to float32), as a
    Python float step is, not as a 0-d tensor."""
    trajectory = richardson(torch.eye(3), torch.ones(3), 0.1, 2, step=np.float32(0.01))
    assert type(trajectory.step) is float and trajectory.step == pytest.approx(0.01, rel=1e-7)
