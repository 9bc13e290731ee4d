"""BridgeICLModel: TransformerBridge hooks, masking claims under the bridge, determinism, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mi_krr.models import BridgeICLModel, ICLTransformerConfig, adapter_for, model_from_config
from mi_krr.tasks import ICLTask
from prompts import random_task

D = 3


def make_task(n: int = 5, m: int = 3, seed: int = 0) -> ICLTask:
    return random_task(2, n, m, D, seed)


def make_bridge(**overrides) -> BridgeICLModel:
    settings = dict(n_dims=D, d_model=16, n_layers=2, n_heads=2, max_seq_len=24, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(0)
    return BridgeICLModel(ICLTransformerConfig(**settings)).eval()


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_bridge_hooks_fire_with_documented_shapes(layout):
    model = make_bridge(layout=layout, norm="rmsnorm")
    adapter_for(model)
    prompt = model.encode(make_task())
    out, cache = model.run_with_cache(prompt.tokens)
    batch, seq = prompt.tokens.shape[:2]
    assert out.shape == (batch, seq)
    for name in model.residual_hook_names():
        assert cache[name].shape == (batch, seq, 16)
    for hooks in model.attention_hook_names():
        assert hooks.scores is None
        assert cache[hooks.pattern].shape == (batch, 2, seq, seq)
        assert cache[hooks.q].shape == cache[hooks.k].shape == (batch, seq, 2, 8)
    torch.testing.assert_close(model.readout(cache[model.residual_hook_names()[-1]]), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout, causal", [("concat", False), ("concat", True), ("interleaved", True)])
def test_bridge_allowed_attention_is_where_its_pattern_is_nonzero(layout, causal):
    """model.allowed_attention(prompt) is the mask the bridge applies: where every block's applied
    weights are nonzero (random weights: no softmax weight underflows), in every sequence and head."""
    model = make_bridge(layout=layout, causal=causal)
    prompt = model.encode(make_task())
    allowed = model.allowed_attention(prompt)
    _, cache = model.run_with_cache(prompt.tokens)
    for hooks in model.attention_hook_names():
        assert ((cache[hooks.pattern] > 0) == allowed).all()


def test_bridge_pattern_is_softmax_of_scores_rebuilt_from_q_and_k_under_the_concat_mask():
    model = make_bridge(layout="concat")
    prompt = model.encode(make_task())
    _, cache = model.run_with_cache(prompt.tokens)
    n, seq = prompt.n_support, prompt.tokens.shape[1]
    allowed = np.zeros((seq, seq), dtype=bool)
    allowed[:, :n] = True
    allowed[np.arange(seq), np.arange(seq)] = True
    for hooks in model.attention_hook_names():
        scores = np.einsum("bqhd,bkhd->bhqk", cache[hooks.q].numpy(), cache[hooks.k].numpy()) / np.sqrt(8)
        scores = np.where(allowed, scores, -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(cache[hooks.pattern].numpy(), pattern / pattern.sum(-1, keepdims=True), rtol=1e-10, atol=1e-12)


def test_bridge_predictions_are_deterministic_in_eval_mode():
    model = make_bridge(layout="interleaved")
    task = make_task()
    first = model.predict(task)
    assert torch.equal(first, model.predict(task))
    assert first.shape == (2, 3) and first.std() > 0


def test_bridge_concat_model_is_permutation_invariant_over_support_and_queries_are_independent():
    model = make_bridge(layout="concat")
    task = make_task()
    order = torch.tensor([4, 2, 0, 3, 1])
    permuted = ICLTask(task.x_support[:, order], task.y_support[:, order], task.x_query, task.y_query)
    pred = model.predict(task)
    torch.testing.assert_close(model.predict(permuted), pred, rtol=1e-12, atol=1e-12)
    alone = ICLTask(task.x_support, task.y_support, task.x_query[:, 2:], task.y_query[:, 2:])
    torch.testing.assert_close(model.predict(alone)[:, 0], pred[:, 2], rtol=1e-12, atol=1e-12)
    relabelled = ICLTask(task.x_support, task.y_support + 1.0, task.x_query, task.y_query)
    assert not torch.allclose(model.predict(relabelled), pred)


def test_bridge_interleaved_prefix_predictions_ignore_later_pairs():
    model = make_bridge(layout="interleaved")
    task = make_task()
    base = model.prefix_predictions(task)
    y = task.y_support.clone()
    y[:, 3:] += 1.0
    changed = model.prefix_predictions(ICLTask(task.x_support, y, task.x_query, task.y_query))
    assert torch.equal(changed[:, :4], base[:, :4])
    assert not torch.allclose(changed[:, 4], base[:, 4])


def test_bridge_state_dict_and_config_round_trip_gives_bit_exact_predictions():
    model = make_bridge(layout="concat", norm="none")
    rebuilt = model_from_config(json.loads(json.dumps(model.config_dict())))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert type(rebuilt) is BridgeICLModel
    task = make_task()
    assert torch.equal(rebuilt.predict(task), model.predict(task))


def test_bridge_refuses_non_softmax_attention():
    with pytest.raises(ValueError, match="supports attention='softmax' only"):
        make_bridge(attention="linear")


def test_bridge_task_of_wrong_dimension_raises_clear_error():
    with pytest.raises(ValueError, match="does not fit this model"):
        make_bridge().predict(ICLTask(torch.randn(1, 2, 4), torch.randn(1, 2), torch.randn(1, 1, 4), torch.randn(1, 1)))


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("training", [False, True])
def test_pickle_and_torch_save_rebuild_the_bridge_model_with_its_weights_flags_and_mode(layout, training):
    """The bridge holds classes local to TransformerLens functions, which pickle cannot name:
    the model pickles through its description and weights, so the copy predicts bit for bit what
    the original does, keeps float64, its frozen parameters and its mode, and unpickling draws
    nothing from torch's global generator."""
    import io
    import pickle

    model = make_bridge(layout=layout).train(training)
    model.read_in.weight.requires_grad_(False)
    task = make_task()
    generator_state = torch.random.get_rng_state()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert type(copy_) is BridgeICLModel and copy_.training is training
        assert {name: p.requires_grad for name, p in copy_.named_parameters()} == {name: p.requires_grad for name, p in model.named_parameters()}
        assert not copy_.read_in.weight.requires_grad
        originals = model.state_dict()
        for name, value in copy_.state_dict().items():
            assert value.dtype == torch.float64 and torch.equal(value, originals[name]), name
        with torch.no_grad():
            model.eval(), copy_.eval()
            assert torch.equal(copy_.predict(task), model.predict(task))
            model.train(training)
    assert torch.equal(torch.random.get_rng_state(), generator_state)


def test_deepcopy_still_copies_the_whole_bridge_model_hooks_included():
    """copy.deepcopy keeps its default meaning (every attribute copied, a forward hook included),
    not pickling's rebuild from the description."""
    import copy

    model = make_bridge()
    calls = []
    model.read_in.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    clone = copy.deepcopy(model)
    assert clone.read_in.weight is not model.read_in.weight
    with torch.no_grad():
        torch.testing.assert_close(clone.predict(make_task()), model.predict(make_task()), rtol=0, atol=0)
    assert len(calls) == 2  # the copy's hook fired too
