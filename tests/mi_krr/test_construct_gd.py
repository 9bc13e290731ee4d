"""One linear self-attention layer per GD step equals feature-space gradient descent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_krr.construct import gd_transformer
from mi_krr.models.adapter import adapter_for
from mi_krr.solvers import feature_gd
from mi_krr.tasks import LinearRegressionSampler


@pytest.fixture(scope="module")
def linear_task():
    return LinearRegressionSampler(5, noise_std=0.1, condition_number=4.0).sample(4, 40, 7, seed=1, dtype=torch.float64)


def per_step_predictions(model, task) -> torch.Tensor:
    prompt = model.encode(task)
    names = [f"blocks.{t * model.layers_per_step - 1}.hook_resid_post" for t in range(1, model.n_steps + 1)]
    _, cache = model.run_with_cache(prompt.tokens, names_filter=names)
    return torch.stack([prompt.gather_queries(model.readout(cache[name])) for name in names], dim=1)


def test_gd_transformer_matches_feature_gd_with_ridge(linear_task):
    model = gd_transformer(12, lr=0.01, lam=0.5, dim=5)
    reference = feature_gd(linear_task.x_support, linear_task.y_support, 0.5, 12, step=0.01, X_query=linear_task.x_query)
    assert model.layers_per_step == 1 and model.n_heads == 1
    scale = reference.pred.abs().max().item()
    torch.testing.assert_close(per_step_predictions(model, linear_task), reference.pred[:, 1:], rtol=1e-9, atol=1e-9 * scale)


def test_gd_transformer_without_ridge_is_plain_least_squares_gd(linear_task):
    # feature_gd requires lam > 0, so lam = 0 is checked against NumPy GD on 1/2 |X w - y|^2
    model = gd_transformer(12, lr=0.01, dim=5)
    got = per_step_predictions(model, linear_task).numpy()
    for b in range(linear_task.batch_size):
        X, y = linear_task.x_support[b].numpy(), linear_task.y_support[b].numpy()
        w, expected = np.zeros(5), []
        for _ in range(12):
            w = w - 0.01 * X.T @ (X @ w - y)
            expected.append(linear_task.x_query[b].numpy() @ w)
        np.testing.assert_allclose(got[b], np.stack(expected), rtol=1e-9, atol=1e-12)


def test_gd_transformer_pattern_is_the_linear_kernel_over_support_keys(linear_task):
    model = adapter_for(gd_transformer(1, lr=0.01, dim=6))  # dim 6 > task dim 5: zero-padded
    prompt = model.encode(linear_task)
    _, cache = model.run_with_cache(prompt.tokens, names_filter="blocks.0.attn.hook_pattern")
    n = linear_task.n_support
    x = torch.cat([linear_task.x_support, linear_task.x_query], dim=1)
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"][:, 0, :, :n], x @ linear_task.x_support.mT)
    assert (cache["blocks.0.attn.hook_pattern"][:, 0, :, n:] == 0).all()


@pytest.mark.parametrize("kwargs, argument", [({"n_steps": 0}, "n_steps"), ({"lr": 0.0}, "lr"), ({"lam": -0.1}, "lam")])
def test_gd_transformer_rejects_bad_arguments_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        gd_transformer(**{"n_steps": 2, "lr": 0.1, **kwargs})
