"""More construction checks against NumPy references (written from mutation-testing survivors):
the ReLU interpolants, Richardson's step, and the studies' measured quantities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from construct_references import numpy_cg_iterates
from mi_krr.construct import cg_transformer, richardson_transformer
from mi_krr.construct.primitives import Product, Reciprocal, ReluArithmetic, ReluRangeError, coord, compile_mlp
from mi_krr.construct.studies import cg_rate_study, conditioned_linear_task, relu_width_study, width_study
from mi_krr.feature_maps import ProjectedKernelFeatures
from mi_krr.tasks import GPRegressionSampler


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny tensor ops: intra-op threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- NumPy references ---------------------------------------------------------------------
def numpy_gaussian(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))


def numpy_rowsum_richardson(K: np.ndarray, y: np.ndarray, lam: float, step: float, n_steps: int) -> np.ndarray:
    """alpha <- alpha + w D^-1 (y - (K + lam I) alpha), D = diag(K 1), from 0: `[T+1, n]`."""
    D = K.sum(1)
    alpha, iterates = np.zeros_like(y), [np.zeros_like(y)]
    for _ in range(n_steps):
        alpha = alpha + step * (y - K @ alpha - lam * alpha) / D
        iterates.append(alpha)
    return np.stack(iterates)


# ----- primitives -----------------------------------------------------------------------------
U, V, FLAG, OUT = 0, 1, 2, 3


def _residual(u, v, off) -> torch.Tensor:
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.stack([u, torch.as_tensor(v, dtype=torch.float64), torch.as_tensor(off, dtype=torch.float64), torch.zeros_like(u)], -1)


def test_relu_product_is_the_numpy_interpolant_of_the_two_squares():
    """ReLU u v equals (I(u+v) - I(u-v)) / 4 with I NumPy's interpolant of s^2 on linspace(-b, b, width)."""
    relu = ReluArithmetic(width=9, bound=3.0)
    grid = np.linspace(-1.5, 1.5, 21)  # |u +- v| up to 3 = bound: the last knots are covered too
    u, v = (a.ravel() for a in np.meshgrid(grid, grid, indexing="ij"))
    got = compile_mlp([Product(OUT, coord(U), coord(V))], 4, "relu", relu)(_residual(u, v, np.ones_like(u))[None])[0, :, OUT]
    knots = np.linspace(-3.0, 3.0, 9)
    expected = (np.interp(u + v, knots, knots**2) - np.interp(u - v, knots, knots**2)) / 4
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("u, v", [(2.0, 1.5), (-2.0, 1.5), (0.0, -3.5)])
def test_relu_product_refuses_inputs_beyond_its_bound_naming_mlp_bound(u, v):
    """|u + v| or |u - v| = 3.5 > bound 3: the square's interpolant is clamped there (the product
    would be off by O(1)), so the forward pass raises, naming mlp_bound and the value reached."""
    mlp = compile_mlp([Product(OUT, coord(U), coord(V))], 4, "relu", ReluArithmetic(width=9, bound=3.0))
    with pytest.raises(ValueError, match=r"reached 3\.5, beyond mlp_bound=3 .*rebuild the model with mlp_bound >= 3\.5"):
        mlp(_residual([0.0, u], [0.0, v], [1.0, 1.0])[None])


def test_relu_reciprocal_overshoot_is_the_largest_ratio_of_the_interpolant_to_one_over_s():
    """(r + 1)^2 / (4 r), r the knot ratio, against the maximum of s I(s) over a fine grid, I NumPy's
    interpolant of 1/s on geomspace(low, high, width)."""
    for width, low, high in ((8, 1e-3, 2.0), (12, 0.01, 100.0), (256, 1e-3, 2.0)):
        knots = np.geomspace(low, high, width)
        s = np.geomspace(low, high, 200_001)
        largest = (s * np.interp(s, knots, 1 / knots)).max()
        got = ReluArithmetic(width=width, low=low, high=high).reciprocal_overshoot()
        np.testing.assert_allclose(got, largest, rtol=1e-8)
        assert got > 1.0


def test_relu_reciprocal_is_the_numpy_interpolant_on_geometric_knots():
    """ReLU 2/s equals 2 I(s), I NumPy's interpolant of 1/s on geomspace(low, high, width), clamped
    below low; 0 where off; an input above high is refused naming recip_range (1/s would be
    1/high there, s / high times too large)."""
    relu = ReluArithmetic(width=8, low=0.01, high=100.0)  # 1 is not a knot: the off-correction g(1) is inexact
    s = np.logspace(-3, 2, 51)
    mlp = compile_mlp([Reciprocal(OUT, coord(U), off=coord(FLAG), coef=2.0)], 4, "relu", relu)
    got = mlp(_residual(s, np.zeros_like(s), np.zeros_like(s))[None])[0, :, OUT].numpy()
    knots = np.geomspace(0.01, 100.0, 8)
    np.testing.assert_allclose(got, 2 * np.interp(s, knots, 1 / knots), rtol=1e-10)
    off = mlp(_residual(np.zeros(2), np.zeros(2), np.ones(2))[None])[0, :, OUT]
    assert off.abs().max() < 1e-12
    with pytest.raises(ReluRangeError, match=r"reached 250, beyond recip_range's high end 100 .* 2\.5x too large"):
        mlp(_residual(np.array([1.0, 250.0]), np.zeros(2), np.zeros(2))[None])


def test_relu_arithmetic_rejects_a_non_positive_product_bound():
    """mlp_bound <= 0 (no product range) raises a ValueError naming mlp_bound, directly and via Richardson."""
    for bound in (0.0, -1.0):
        with pytest.raises(ValueError, match="mlp_bound"):
            ReluArithmetic(bound=bound)
    with pytest.raises(ValueError, match="mlp_bound"):
        richardson_transformer(2, 0.1, 1.0, 1.0, dim=2, mlp="relu", mlp_bound=0.0)


# ----- Richardson ---------------------------------------------------------------------------------
def test_richardson_transformer_with_step_below_one_matches_numpy_iteration():
    """step w = 0.6 (every other test uses w = 1): alpha_t and predictions equal a NumPy row-sum Richardson."""
    lam, sigma, step, T = 0.2, 0.7, 0.6, 6
    task = GPRegressionSampler(2, kernel="gaussian", bandwidth=sigma).sample(3, 20, 4, seed=5, dtype=torch.float64)
    states = richardson_transformer(T, lam, sigma, step, dim=2).step_states(task)
    for b in range(3):
        x, xq, y = task.x_support[b].numpy(), task.x_query[b].numpy(), task.y_support[b].numpy()
        alphas = numpy_rowsum_richardson(numpy_gaussian(x, x, sigma), y, lam, step, T)
        np.testing.assert_allclose(states.support["alpha"][b].numpy(), alphas, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(states.pred[b].numpy(), alphas @ numpy_gaussian(xq, x, sigma).T, rtol=1e-9, atol=1e-12)


# ----- studies --------------------------------------------------------------------------------------
WIDTH = dict(widths=(2, 5),  # both < N = 11 points: top_eigen is not exact (rounding-level errors)
             kernels=("exp",), dim=3, n_support=8, n_query=3, lam=0.5, n_steps=16, batch_size=3,
             seed=0, heads=("gaussian_sketch", "top_eigen"), temperature=1.0, n_seeds=2)


@pytest.fixture(scope="module")
def small_width_study():
    return width_study(**WIDTH)


def _width_reference(head: str, width: int) -> np.ndarray:
    """Per-prompt relative query error of exact KRR on the head's Gram (NumPy) against oracle KRR
    on the exp kernel, averaged over the head's draws (seeds 0, 1; one for top_eigen): `[B]`."""
    B, n, lam = WIDTH["batch_size"], WIDTH["n_support"], WIDTH["lam"]
    task = GPRegressionSampler(3, kernel="exp", temperature=1.0).sample(B, n, 3, seed=0, dtype=torch.float64)
    points = torch.cat([task.x_support, task.x_query], -2).numpy()
    y = task.y_support.numpy()
    K = np.exp(points @ points.swapaxes(-1, -2))  # temperature 1
    mu, Q = np.linalg.eigh(K)
    mu = np.clip(mu, 0, None)

    def krr(G):
        alpha = np.linalg.solve(G[:, :n, :n] + lam * np.eye(n), y[..., None])[..., 0]
        return np.einsum("bqn,bn->bq", G[:, n:, :n], alpha)

    oracle = krr(K)
    if head == "top_eigen":
        keep = np.argsort(mu, axis=-1)[:, ::-1][:, :width]
        grams = [np.stack([Q[b][:, keep[b]] @ np.diag(mu[b][keep[b]]) @ Q[b][:, keep[b]].T for b in range(B)])]
    else:
        root = Q @ (np.sqrt(mu)[..., None] * Q.swapaxes(-1, -2))
        grams = []
        for s in range(WIDTH["n_seeds"]):
            R = ProjectedKernelFeatures("exp", 3, width, "gaussian", temperature=1.0, seed=s).sketch((B,), n + 3).numpy()
            features = root @ R / math.sqrt(width)
            grams.append(features @ features.swapaxes(-1, -2))
    errors = [np.linalg.norm(krr(G) - oracle, axis=-1) / np.linalg.norm(oracle, axis=-1) for G in grams]
    return np.mean(errors, axis=0)


@pytest.mark.parametrize("head", ["top_eigen", "gaussian_sketch"])
def test_width_study_error_and_sem_are_over_prompts_of_the_draw_mean(small_width_study, head):
    """Curve error / error_sem equal the NumPy mean / (std ddof=1 / sqrt(B)) over prompts of the
    per-prompt mean over independent head draws."""
    curve = small_width_study.curve("exp", head)
    for w, width in enumerate(WIDTH["widths"]):
        per_prompt = _width_reference(head, width)
        np.testing.assert_allclose(curve.error[w], per_prompt.mean(), rtol=1e-6)
        np.testing.assert_allclose(curve.error_sem[w], per_prompt.std(ddof=1) / math.sqrt(WIDTH["batch_size"]), rtol=1e-5)


def test_cg_rate_study_reports_median_a_norm_and_prediction_errors_of_numpy_cg():
    """a_norm_ratio and pred_error are NumPy medians over 5 prompts of textbook-CG A-norm / prediction errors."""
    lam, n, T, B = 1e-4, 12, 6, 5
    study = cg_rate_study(kappas=(10.0, 50.0), n_support=n, n_steps=T, lam=lam, batch_size=B)
    for kappa in (10.0, 50.0):
        task = conditioned_linear_task(B, n, kappa, lam, n_query=16, seed=0)
        ratios, pred_errors = [], []
        for b in range(B):
            X, Xq, y = task.x_support[b].numpy(), task.x_query[b].numpy(), task.y_support[b].numpy()
            A = X @ X.T + lam * np.eye(n)
            alpha_star = scipy.linalg.solve(A, y, assume_a="pos")
            error = numpy_cg_iterates(A, y, T) - alpha_star
            ratios.append(np.sqrt(np.einsum("ti,ij,tj->t", error, A, error) / (alpha_star @ A @ alpha_star)))
            oracle = Xq @ X.T @ alpha_star
            pred_errors.append(np.linalg.norm(error @ X @ Xq.T, axis=-1) / np.linalg.norm(oracle))
        np.testing.assert_allclose(study.a_norm_ratio[str(kappa)], np.median(ratios, axis=0), rtol=1e-7)
        np.testing.assert_allclose(study.pred_error[str(kappa)], np.median(pred_errors, axis=0), rtol=1e-7)


def test_conditioned_linear_task_queries_have_variance_one_over_n():
    """x_* ~ N(0, I / n): entries have mean 0 and variance 1/n within MC error bars."""
    n = 16
    x = conditioned_linear_task(40, n, 5.0, 0.01, n_query=10, seed=2).x_query.numpy().ravel()
    assert abs(x.mean()) < 5 * math.sqrt(1 / n) / math.sqrt(x.size)
    assert abs(x.var() - 1 / n) < 5 * (1 / n) * math.sqrt(2 / x.size)


def test_relu_width_study_error_is_relative_to_the_exact_peak():
    """error = max |pred_relu - pred_exact| / max |pred_exact| over prompts, steps 0..T and queries,
    with pred_exact from NumPy CG / Richardson (the ReLU side from the relu-mode constructions)."""
    T, n, B, m = 3, 12, 2, 8
    study = relu_width_study(widths=(16,), n_steps=T, n_support=n, batch_size=B, seed=0)
    cg_task = conditioned_linear_task(B, n, 50.0, 1e-2, n_query=m, seed=0)
    exact = np.stack([
        numpy_cg_iterates(X @ X.T + 1e-2 * np.eye(n), y, T) @ X @ Xq.T
        for X, Xq, y in zip(cg_task.x_support.numpy(), cg_task.x_query.numpy(), cg_task.y_support.numpy())
    ])
    relu = cg_transformer(T, 1e-2, dim=n, recip_range=(1e-4, 1e4), mlp="relu", mlp_width=16).step_states(cg_task).pred.numpy()
    np.testing.assert_allclose(study.error["cg"][0], np.abs(relu - exact).max() / np.abs(exact).max(), rtol=1e-6)

    gp_task = GPRegressionSampler(2, kernel="gaussian", bandwidth=0.5).sample(B, n, m, seed=0, dtype=torch.float64)
    xs, xq, ys = gp_task.x_support.numpy(), gp_task.x_query.numpy(), gp_task.y_support.numpy()
    bound = 2.0 + max(1.0 + numpy_gaussian(q, x, 0.5).sum(-1).max() for q, x in zip(xq, xs))
    exact = np.stack([
        numpy_rowsum_richardson(numpy_gaussian(x, x, 0.5), y, 0.1, 1.0, T) @ numpy_gaussian(q, x, 0.5).T
        for x, q, y in zip(xs, xq, ys)
    ])
    model = richardson_transformer(T, 0.1, bandwidth=0.5, step=1.0, dim=2, mlp_bound=bound, mlp="relu", mlp_width=16)
    relu = model.step_states(gp_task).pred.numpy()
    np.testing.assert_allclose(study.error["richardson"][0], np.abs(relu - exact).max() / np.abs(exact).max(), rtol=1e-6)
