"""The softmax Richardson transformer runs row-sum preconditioned Richardson on a Gaussian kernel
exactly: checked against mi_krr.solvers.richardson and an independent NumPy iteration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_krr.construct import richardson_transformer
from mi_krr.kernels import gaussian_kernel
from mi_krr.solvers import richardson
from mi_krr.tasks import GPRegressionSampler, ICLTask

LAM, BANDWIDTH, STEP = 0.1, 0.6, 1.0


@pytest.fixture(scope="module")
def gp_task():
    return GPRegressionSampler(3, kernel="gaussian", bandwidth=BANDWIDTH).sample(4, 48, 6, seed=2, dtype=torch.float64)


@pytest.fixture(scope="module")
def exact_run(gp_task):
    """15 exact steps and the residual stream after each step's blocks (one cached pass)."""
    model = richardson_transformer(15, LAM, BANDWIDTH, STEP, dim=3)
    prompt = model.encode(gp_task)
    names = [f"blocks.{t * model.layers_per_step - 1}.hook_resid_post" for t in range(1, 16)]
    _, cache = model.run_with_cache(prompt.tokens, names_filter=names + ["blocks.1.attn.hook_pattern"])
    resid = torch.stack([cache[name] for name in names], dim=1)
    return model, prompt, resid, cache["blocks.1.attn.hook_pattern"]


def numpy_gaussian(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * BANDWIDTH**2))


def test_richardson_transformer_prediction_matches_rowsum_richardson_at_every_step(gp_task, exact_run):
    model, prompt, resid, _ = exact_run
    K = gaussian_kernel(gp_task.x_support, bandwidth=BANDWIDTH)
    K_query = gaussian_kernel(gp_task.x_query, gp_task.x_support, bandwidth=BANDWIDTH)
    reference = richardson(K, gp_task.y_support, LAM, 15, step=STEP, precond="rowsum", K_query=K_query)
    assert model.layers_per_step == 3
    model_pred = model.readout(resid[:, :, prompt.query_positions])
    scale = reference.pred.abs().max().item()
    torch.testing.assert_close(model_pred, reference.pred[:, 1:], rtol=1e-9, atol=1e-9 * scale)


def test_richardson_transformer_alpha_equals_a_numpy_iteration(gp_task, exact_run):
    model, prompt, resid, _ = exact_run
    alpha_coordinate = model.state_coordinates["alpha"]
    for b in range(gp_task.batch_size):
        x, y = gp_task.x_support[b].numpy(), gp_task.y_support[b].numpy()
        K = numpy_gaussian(x, x)
        D = K.sum(1)
        alpha, expected = np.zeros_like(y), []
        for _ in range(15):
            alpha = alpha + STEP * (y - K @ alpha - LAM * alpha) / D
            expected.append(alpha)
        got = resid[b, :, : gp_task.n_support, alpha_coordinate].numpy()
        np.testing.assert_allclose(got, np.stack(expected), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(resid[b, -1, : gp_task.n_support, model.state_coordinates["dinv"]].numpy(), 1 / D, rtol=1e-12)


def test_richardson_softmax_pattern_is_the_row_normalised_kernel(gp_task, exact_run):
    _, _, _, pattern = exact_run  # block 1 (smoothing): head 0 applies D^-1 K over support keys
    n = gp_task.n_support
    for b in range(gp_task.batch_size):
        x = gp_task.x_support[b].numpy()
        K = numpy_gaussian(x, x)
        np.testing.assert_allclose(pattern[b, 0, :n, :n].numpy(), K / K.sum(1, keepdims=True), rtol=1e-12, atol=1e-15)
    assert (pattern[:, 0, n:, :] == 0).all()


def test_richardson_relu_error_shrinks_with_mlp_width(gp_task, exact_run):
    model, prompt, resid, _ = exact_run
    exact = model.readout(resid[:, :5, prompt.query_positions])
    bound = 2.0 + float(1.0 + gaussian_kernel(gp_task.x_query, gp_task.x_support, bandwidth=BANDWIDTH).sum(-1).max())
    errors = []
    for width in (32, 128, 512):
        relu = richardson_transformer(5, LAM, BANDWIDTH, STEP, dim=3, mlp="relu", mlp_width=width, mlp_bound=bound)
        errors.append((relu.step_states(gp_task).pred[:, 1:] - exact).abs().max().item())
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0


def coincident_task(n: int, m: int, seed: int = 0) -> ICLTask:
    """One prompt whose support and query points all sit at one point: every row sum 1 + D is
    1 + n, the largest a Gaussian kernel (at most 1) allows. Labels N(1, 1), so predictions are O(1)."""
    g = torch.Generator().manual_seed(seed)
    return ICLTask(
        x_support=torch.full((1, n, 2), 0.3, dtype=torch.float64),
        y_support=1.0 + torch.randn(1, n, generator=g, dtype=torch.float64),
        x_query=torch.full((1, m, 2), 0.3, dtype=torch.float64),
        y_query=torch.zeros(1, m, dtype=torch.float64),
    )


def test_relu_richardson_default_bound_covers_the_largest_row_sums_of_max_support_points():
    """mlp_bound left to its default with max_support = n: on prompts whose row sums are all
    1 + n (K = the all-ones matrix), the relu construction follows NumPy row-sum Richardson
    (alpha <- alpha + w D^-1 (y - (K + lam I) alpha), D = n) to 1e-3 of the prediction scale."""
    n, steps = 20, 4
    task = coincident_task(n, 3)
    y = task.y_support[0].numpy()
    K = np.ones((n, n))
    alpha, reference = np.zeros(n), [np.zeros(3)]
    for _ in range(steps):
        alpha = alpha + STEP * (y - K @ alpha - LAM * alpha) / n
        reference.append(np.full(3, alpha.sum()))
    model = richardson_transformer(steps, LAM, BANDWIDTH, STEP, dim=2, mlp="relu", mlp_width=1024, max_support=n)
    pred = model.step_states(task).pred[0].numpy()
    np.testing.assert_allclose(pred, np.stack(reference), rtol=0, atol=1e-3 * np.abs(reference).max())


def test_relu_richardson_refuses_row_sums_beyond_its_product_bound_naming_mlp_bound():
    """Built for max_support = 5 (mlp_bound = 2 + 6 c ~ 8), run on 20 coincident points (row sums
    21): the product o * (1 + D_*) would leave its interpolant's range, so the forward pass raises."""
    model = richardson_transformer(2, LAM, BANDWIDTH, STEP, dim=2, mlp="relu", max_support=5)
    with pytest.raises(ValueError, match=r"beyond mlp_bound=8\.0.*rebuild the model with mlp_bound >= .*max_support"):
        model.step_states(coincident_task(20, 3))


@pytest.mark.parametrize("recip_range", [(0.1, 2.0), (1e-3, 0.9)])
def test_relu_richardson_refuses_a_reciprocal_range_short_of_its_row_sums(recip_range):
    """recip_range must contain [1 / mlp_bound, 1] (default mlp_bound ~ 35 for max_support = 32):
    (0.1, 2) misses 1 / 35, (1e-3, 0.9) misses 1."""
    with pytest.raises(ValueError, match=r"recip_range=.* must contain \[1 / mlp_bound, 1\]"):
        richardson_transformer(2, LAM, BANDWIDTH, STEP, dim=2, mlp="relu", recip_range=recip_range)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_steps": 0}, "n_steps"),
        ({"lam": 0.0}, "lam"),
        ({"bandwidth": -1.0}, "bandwidth"),
        ({"step": 0.0}, "step"),
        ({"mlp": "tanh"}, "mlp"),
        ({"mlp": "relu", "max_support": 0}, "max_support"),
    ],
)
def test_richardson_transformer_rejects_bad_arguments_naming_them(kwargs, argument):
    arguments = {"n_steps": 2, "lam": 0.1, "bandwidth": 1.0, "step": 1.0, **kwargs}
    with pytest.raises(ValueError, match=argument):
        richardson_transformer(**arguments)
