"""Label sensitivities d yhat / d y: the model's per layer by autograd against central finite
differences, and solvers' per step against finite differences and Richardson's closed form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mi_krr.construct import cg_transformer
from mi_krr.kernels import gaussian_kernel, linear_kernel
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS
from mi_krr.tasks import ICLTask
from probes import label_sensitivities, layer_predictions, solver_sensitivities
from brute_force import solver_finite_differences
from prompts import random_task

D, N, M = 2, 5, 3


def make_task(batch: int = 2, seed: int = 0) -> ICLTask:
    return random_task(batch, N, M, D, seed)


def make_model(layout: str) -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=D, d_model=12, n_layers=2, n_heads=2, layout=layout, max_seq_len=32, dtype="float64")
    return ICLTransformer(cfg).eval()


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_label_sensitivities_match_central_finite_differences(layout):
    model, task = make_model(layout), make_task()
    sensitivities = label_sensitivities(model, task, chunk_size=4)
    assert sensitivities.shape == (2, 3, M, N)
    eps = 1e-5
    columns = []
    for i in range(N):
        shift = torch.zeros(N, dtype=torch.float64)
        shift[i] = eps
        up = layer_predictions(model, dataclasses.replace(task, y_support=task.y_support + shift))
        down = layer_predictions(model, dataclasses.replace(task, y_support=task.y_support - shift))
        columns.append((up - down) / (2 * eps))
    finite_differences = torch.stack(columns, dim=-1)  # [B, L+1, m, n]
    torch.testing.assert_close(sensitivities, finite_differences, rtol=1e-6, atol=1e-8)
    assert finite_differences[:, -1].abs().max() > 1e-3  # the check is not vacuous


def test_concat_embedding_layer_of_a_query_ignores_every_label():
    """Index 0 is the query token's own embedding (x_*, 0): no label reaches it."""
    sensitivities = label_sensitivities(make_model("concat"), make_task(), layers=[0])
    assert sensitivities.abs().max() == 0


def kernel_system(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, D, generator=g, dtype=torch.float64)
    x_query = torch.randn(batch, M, D, generator=g, dtype=torch.float64)
    y = torch.randn(batch, N, generator=g, dtype=torch.float64)
    return gaussian_kernel(x), gaussian_kernel(x_query, x), y


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_solver_sensitivities_match_central_finite_differences(algorithm):
    K, K_query, y = kernel_system()
    lam, steps, eps = 0.1, 4, 1e-6
    sensitivities = solver_sensitivities(algorithm, K, K_query, lam, steps, y=y)
    assert sensitivities.shape == (3, steps + 1, M, N)
    expected = solver_finite_differences(ALGORITHMS[algorithm], K, K_query, y, lam, steps, eps)
    torch.testing.assert_close(sensitivities, expected, rtol=1e-6, atol=1e-8)


def richardson_closed_form(K: np.ndarray, K_query: np.ndarray, lam: float, steps: int, preconditioner: np.ndarray) -> np.ndarray:
    """S_t = K_q sum_{s<t} (I - w P A)^s w P with A = K + lam I, w = 2 / (mu_min + mu_max) of P A.
    Returns [T+1, m, n]."""
    n = K.shape[0]
    A = K + lam * np.eye(n)
    root = np.sqrt(preconditioner)
    mu = np.linalg.eigvalsh(root[:, None] * A * root[None, :])  # spectrum of P A (P diagonal)
    wP = np.diag(2.0 / (mu[0] + mu[-1]) * preconditioner)
    iteration = np.eye(n) - wP @ A
    out, total, power = [np.zeros((K_query.shape[0], n))], np.zeros((n, n)), np.eye(n)
    for _ in range(steps):
        total = total + power @ wP
        power = iteration @ power
        out.append(K_query @ total)
    return np.stack(out)


@pytest.mark.parametrize(
    "algorithm, preconditioner",
    [
        ("gd", lambda K, lam: np.ones(K.shape[0])),
        ("richardson_jacobi", lambda K, lam: 1.0 / (np.diag(K) + lam)),
        ("richardson_rowsum", lambda K, lam: 1.0 / K.sum(axis=1)),
    ],
)
def test_richardson_sensitivities_equal_the_closed_form_matrix(algorithm, preconditioner):
    K, K_query, _ = kernel_system()
    lam, steps = 0.05, 6
    sensitivities = solver_sensitivities(algorithm, K, K_query, lam, steps)  # linear in y: no y needed
    for b in range(K.shape[0]):
        Kb, Kqb = K[b].numpy(), K_query[b].numpy()
        expected = richardson_closed_form(Kb, Kqb, lam, steps, preconditioner(Kb, lam))
        np.testing.assert_allclose(sensitivities[b].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_solver_sensitivities_bad_arguments_raise():
    K, K_query, y = kernel_system()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        solver_sensitivities("lanczos", K, K_query, 0.1, 3, y=y)
    with pytest.raises(ValueError, match="nonlinear in y"):
        solver_sensitivities("cg", K, K_query, 0.1, 3)
    with pytest.raises(ValueError, match="K_query"):
        solver_sensitivities("gd", K, K_query[..., :2], 0.1, 3)
    with pytest.raises(ValueError, match="lam"):
        solver_sensitivities("gd", K, K_query, -1.0, 3)


def test_label_sensitivities_bad_arguments_raise():
    model = make_model("concat")
    with pytest.raises(ValueError, match="at least one residual index"):
        label_sensitivities(model, make_task(), layers=[])
    with pytest.raises(ValueError, match="chunk_size"):
        label_sensitivities(model, make_task(), chunk_size=0)


@pytest.mark.parametrize("n_steps", [3, 8])
def test_cg_construction_layer_sensitivities_equal_cg_solver_sensitivities(n_steps):
    """The hand-built CG transformer runs CG exactly; at its step hooks, d yhat / d y by autograd
    through the model equals d pred_t / d y by autograd through `mi_krr.solvers.cg`, also past
    convergence (K = X X^T has rank D = 2, so CG terminates after 3 steps)."""
    model, task = cg_transformer(n_steps=n_steps, lam=0.1, dim=D), make_task()
    names = model.residual_hook_names()
    layers = [names.index(name) for name in model.step_hook_names()]
    from_model = label_sensitivities(model, task, layers=layers)
    K, K_query = linear_kernel(task.x_support), linear_kernel(task.x_query, task.x_support)
    from_solver = solver_sensitivities("cg", K, K_query, 0.1, n_steps, y=task.y_support)
    torch.testing.assert_close(from_model, from_solver, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n_steps", [N, N + 3, 40])
def test_cg_solver_sensitivities_past_convergence_equal_the_krr_map(n_steps):
    """After N steps CG has terminated: d pred_t / d y by autograd through `mi_krr.solvers.cg` is
    K_query (K + lam I)^-1 (NumPy inverse) at every step t >= N, also 40 steps in."""
    K, K_query, y = kernel_system()
    lam = 0.1
    sensitivities = solver_sensitivities("cg", K, K_query, lam, n_steps, y=y)
    krr_map = K_query.numpy() @ np.linalg.inv(K.numpy() + lam * np.eye(N))
    for t in range(N, n_steps + 1):
        np.testing.assert_allclose(sensitivities[:, t].numpy(), krr_map, rtol=1e-9, atol=1e-11)


def test_solver_sensitivities_of_a_fixed_step_callable_equal_the_closed_form():
    """A custom solver (fixed step, not the registry's optimal one) as a callable, linear in y."""
    from functools import partial

    from mi_krr.solvers import richardson

    K, K_query, y = kernel_system()
    lam, steps, step = 0.05, 5, 0.07
    fixed = partial(richardson, step=step)
    linear = solver_sensitivities(fixed, K, K_query, lam, steps, linear_in_y=True)
    by_autograd = solver_sensitivities(fixed, K, K_query, lam, steps, y=y)
    for b in range(K.shape[0]):
        A = K[b].numpy() + lam * np.eye(N)
        total, power, expected = np.zeros((N, N)), np.eye(N), [np.zeros((M, N))]
        for _ in range(steps):
            total, power = total + power * step, (np.eye(N) - step * A) @ power
            expected.append(K_query[b].numpy() @ total)
        np.testing.assert_allclose(linear[b].numpy(), np.stack(expected), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(by_autograd[b].numpy(), np.stack(expected), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="nonlinear in y"):
        solver_sensitivities(fixed, K, K_query, lam, steps)
