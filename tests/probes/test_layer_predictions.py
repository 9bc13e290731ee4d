"""The read-out lens: the model's own final norm and read-out applied to every layer's residual
stream at the query positions, computed from hooks that keep only what they need."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from probes import layer_predictions
from prompts import random_task

D, N, M = 3, 6, 4


def make_task(batch: int = 3, n: int = N, m: int = M, d: int = D, seed: int = 0) -> ICLTask:
    return random_task(batch, n, m, d, seed)


def make_model(layout: str, seed: int = 0, **overrides) -> ICLTransformer:
    settings = dict(n_dims=D, d_model=16, n_layers=3, n_heads=2, layout=layout, max_seq_len=32, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(**settings)).eval()


def manual_readout_lens(model: ICLTransformer, task: ICLTask) -> torch.Tensor:
    """[batch, L+1, m] from a full run_with_cache: LayerNorm + read-out applied here by hand,
    query positions picked by hand for each layout."""
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    per_layer = []
    for name in names:
        resid = cache[name]
        if model.cfg.layout == "concat":
            at_queries = resid[:, N : N + M]  # [B, m, d_model]
        else:  # one sequence per query, read at the last position 2n
            at_queries = resid[:, 2 * N].reshape(task.batch_size, M, -1)
        normed = F.layer_norm(at_queries, (model.cfg.d_model,), model.ln_final.weight, model.ln_final.bias, eps=1e-5)
        per_layer.append(normed @ model.read_out.weight[0] + model.read_out.bias[0])
    return torch.stack(per_layer, dim=1)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_readout_lens_matches_final_norm_and_readout_applied_by_hand(layout):
    model, task = make_model(layout), make_task()
    lens = layer_predictions(model, task)
    assert lens.shape == (3, 4, M) and lens.dtype == torch.float64
    torch.testing.assert_close(lens, manual_readout_lens(model, task).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_readout_lens_last_layer_equals_model_predict(layout):
    model, task = make_model(layout, seed=1), make_task(seed=1)
    lens = layer_predictions(model, task)
    torch.testing.assert_close(lens[:, -1], model.predict(task).detach(), rtol=1e-12, atol=1e-12)


def test_readout_lens_layers_subset_picks_those_residual_indices():
    model, task = make_model("concat"), make_task()
    full = layer_predictions(model, task)
    torch.testing.assert_close(layer_predictions(model, task, layers=[3, 0]), full[:, [3, 0]])


def test_readout_lens_returns_no_autograd_graph():
    assert not layer_predictions(make_model("concat"), make_task()).requires_grad


def test_readout_hooks_retain_only_query_predictions(retained_reductions):
    """No hook keeps a [batch', seq, d_model] activation (nor a view of one): what outlives the
    forward pass is [batch, n_query] per layer, plus the model's own outputs at the queries (checked
    against the last layer's read-out), each in its own storage."""
    model, task = make_model("interleaved"), make_task(batch=5)
    layer_predictions(model, task)
    assert len(retained_reductions) == model.cfg.n_layers + 2
    for value in retained_reductions:
        assert value.shape == (5, M)
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_bad_arguments_raise_one_line_errors():
    model, task = make_model("concat"), make_task()
    with pytest.raises(ValueError, match="method must be one of"):
        layer_predictions(model, task, method="logit_lens")
    with pytest.raises(ValueError, match="at least one residual index"):
        layer_predictions(model, task, layers=[])
    with pytest.raises(ValueError, match="out of range"):
        layer_predictions(model, task, layers=[4])
    with pytest.raises(ValueError, match="needs train_task"):
        layer_predictions(model, task, method="ridge")
    with pytest.raises(ValueError, match="dimension d=5"):
        layer_predictions(model, make_task(d=5))
    with pytest.raises(ValueError, match="ICLTask"):
        layer_predictions(model, task.x_support)
