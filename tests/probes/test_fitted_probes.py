"""Ridge probes per layer: closed form equal to NumPy's, fitted and evaluated on disjoint prompts,
and a shuffled-target control that finds nothing where the real probe finds a clear signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from probes import fit_layer_probes, layer_predictions
from probes.fitted_probes import random_derangement

D, N, M = 3, 5, 4


def make_model(layout: str = "concat") -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=D, d_model=12, n_layers=2, n_heads=2, layout=layout, max_seq_len=32, dtype="float64")
    return ICLTransformer(cfg).eval()


def linear_task(batch: int, seed: int) -> ICLTask:
    """Targets y = x . w with one fixed w for every prompt: a signal linear in the query token."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x_support = torch.randn(batch, N, D, generator=g, dtype=torch.float64)
    x_query = torch.randn(batch, M, D, generator=g, dtype=torch.float64)
    return ICLTask(x_support=x_support, y_support=x_support @ w, x_query=x_query, y_query=x_query @ w)


def query_residuals_from_cache(model: ICLTransformer, task: ICLTask, layer: int) -> np.ndarray:
    """[batch * m, d_model] residual stream at the concat layout's query positions n..n+m-1."""
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    name = "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
    return cache[name][:, N : N + M].reshape(-1, model.cfg.d_model).detach().numpy()


def numpy_ridge(x: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin mean (x w + b - t)^2 + lam |w|^2, intercept unpenalised."""
    xc, tc = x - x.mean(0), t - t.mean()
    w = np.linalg.solve(xc.T @ xc / len(x) + lam * np.eye(x.shape[1]), xc.T @ tc / len(x))
    return w, t.mean() - x.mean(0) @ w


def test_ridge_probes_equal_numpy_closed_form_at_the_chosen_penalty():
    model, train, test = make_model(), linear_task(40, seed=0), linear_task(10, seed=1)
    # Layer 0 spans only 4 of 12 directions: penalties >= 1e-4 keep the NumPy solve well conditioned.
    probes = fit_layer_probes(model, train, lam_grid=np.logspace(-4, 1, 11))
    assert probes.layers == [0, 1, 2] and probes.weight.shape == (3, 12)
    for index, layer in enumerate(probes.layers):
        w, b = numpy_ridge(query_residuals_from_cache(model, train, layer), train.y_query.reshape(-1).numpy(), float(probes.lam[index]))
        np.testing.assert_allclose(probes.weight[index].numpy(), w, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(float(probes.fit.bias[index]), b, rtol=1e-7, atol=1e-9)
        expected = (query_residuals_from_cache(model, test, layer) @ w + b).reshape(10, M)
        np.testing.assert_allclose(probes.predict(model, test)[:, index].numpy(), expected, rtol=1e-7, atol=1e-9)


def test_layer_predictions_ridge_matches_fitted_probes_on_held_out_prompts():
    model, train, test = make_model(), linear_task(40, seed=0), linear_task(10, seed=1)
    expected = fit_layer_probes(model, train, layers=[2]).predict(model, test)
    torch.testing.assert_close(layer_predictions(model, test, method="ridge", layers=[2], train_task=train), expected)
    # the fit's settings reach the probes: a single huge penalty shrinks them to the (unpenalised) intercept
    options = dict(val_fraction=0.5, lam_grid=[1e8], seed=4)
    shrunk = layer_predictions(model, test, method="ridge", layers=[2], train_task=train, **options)
    torch.testing.assert_close(shrunk, fit_layer_probes(model, train, layers=[2], **options).predict(model, test))
    assert shrunk.std() < 1e-3 * expected.std()


def test_shuffled_target_control_scores_near_zero_where_the_probe_finds_the_signal():
    """Layer 0 (the read-in of the query token) holds x_query linearly, so y = x . w is read off
    almost perfectly; the same probe on targets shuffled across prompts explains nothing."""
    model, train = make_model(), linear_task(200, seed=0)
    probes = fit_layer_probes(model, train, layers=[0], seed=3)
    assert float(probes.val_r2[0]) > 0.99
    assert abs(float(probes.control.val_r2[0])) < 0.1
    test = linear_task(50, seed=1)
    target = test.y_query.numpy()
    control = probes.predict_control(model, test)[:, 0].numpy()
    control_r2 = 1 - ((control - target) ** 2).sum() / ((target - target.mean()) ** 2).sum()
    assert abs(control_r2) < 0.1


def test_predicting_on_a_training_prompt_raises():
    model, train = make_model(), linear_task(20, seed=0)
    probes = fit_layer_probes(model, train, layers=[1])
    overlapping = ICLTask(
        x_support=torch.cat([linear_task(3, seed=5).x_support, train.x_support[4:5]]),
        y_support=torch.cat([linear_task(3, seed=5).y_support, train.y_support[4:5]]),
        x_query=torch.cat([linear_task(3, seed=5).x_query, train.x_query[4:5]]),
        y_query=torch.cat([linear_task(3, seed=5).y_query, train.y_query[4:5]]),
    )
    with pytest.raises(ValueError, match="shares 1 prompt"):
        probes.predict(model, overlapping)
    with pytest.raises(ValueError, match="shares"):
        layer_predictions(model, train.select([0, 1]), method="ridge", train_task=train)


def test_custom_targets_are_probed_and_checked_for_shape():
    model, train = make_model(), linear_task(60, seed=0)
    probes = fit_layer_probes(model, train, targets=train.x_query[..., 0], layers=[0])
    assert probes.targets == "custom" and float(probes.val_r2[0]) > 0.99
    with pytest.raises(ValueError, match="targets must be"):
        fit_layer_probes(model, train, targets=train.y_support)
    with pytest.raises(ValueError, match="targets must be 'y_query'"):
        fit_layer_probes(model, train, targets="y_support")
    with pytest.raises(ValueError, match="val_fraction"):
        fit_layer_probes(model, train, val_fraction=1.0)
    with pytest.raises(ValueError, match="lam_grid"):
        fit_layer_probes(model, train, lam_grid=[1.0, -1.0])


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_control_shuffle_moves_every_prompt(n):
    """random_derangement is a permutation without fixed points for every seed (brute-force check);
    with 2 prompts a plain shuffle would leave them in place half the time."""
    for seed in range(50):
        permutation = random_derangement(n, torch.Generator().manual_seed(seed)).tolist()
        assert sorted(permutation) == list(range(n))
        assert all(permutation[i] != i for i in range(n)), (seed, permutation)


def test_control_is_never_the_probe_itself():
    """Batches and seeds where a plain shuffle was the identity: the control's weights differ from the fit's."""
    model = make_model()
    for batch, seed in ((3, 1), (2, 3), (4, 13)):
        probes = fit_layer_probes(model, linear_task(batch, seed=7), layers=[2], seed=seed)
        assert not torch.allclose(probes.control.weight, probes.fit.weight)
