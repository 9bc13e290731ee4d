"""ICLTransformer: hook names and shapes, masking claims, the von Oswald GD construction, config
and checkpoint round trips, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformer_lens import ActivationCache

from mi_krr.models import (
    ICLTransformer,
    ICLTransformerConfig,
    adapter_for,
    allowed_attention,
    check_task_fits,
    model_from_config,
)
from mi_krr.tasks import ICLTask
from prompts import random_task

D, N, M = 3, 6, 4


def make_task(batch: int = 2, n: int = N, m: int = M, d: int = D, seed: int = 0, dtype=torch.float64) -> ICLTask:
    return random_task(batch, n, m, d, seed, dtype)


def make_model(seed: int = 0, **overrides) -> ICLTransformer:
    settings = dict(n_dims=D, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(**settings)).eval()


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("norm", ["none", "layernorm", "rmsnorm"])
@pytest.mark.parametrize("attention", ["softmax", "linear", "relu"])
def test_every_hook_fires_with_documented_shape(attention, norm, layout):
    model = make_model(attention=attention, norm=norm, layout=layout)
    task = make_task()
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    batch, seq = prompt.tokens.shape[:2]
    resid, head = (batch, seq, 16), (batch, seq, 2, 8)
    expected = {"hook_embed": resid}
    if layout == "interleaved":
        expected["hook_pos_embed"] = (seq, 16)
    for layer in range(2):
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            expected[f"blocks.{layer}.{name}"] = resid
        for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
            expected[f"blocks.{layer}.attn.{name}"] = head
        for name in ("hook_attn_scores", "hook_pattern"):
            expected[f"blocks.{layer}.attn.{name}"] = (batch, 2, seq, seq)
        for name in ("hook_pre", "hook_post"):
            expected[f"blocks.{layer}.mlp.{name}"] = (batch, seq, 64)
    assert {name: tuple(value.shape) for name, value in cache.items()} == expected
    adapter_for(model)


def test_attention_only_blocks_have_no_mlp_hooks():
    model = make_model(mlp=False)
    _, cache = model.run_with_cache(model.encode(make_task()).tokens)
    assert not any("mlp" in name or "resid_mid" in name for name in cache)
    assert "blocks.1.hook_resid_post" in cache


@pytest.mark.parametrize("attention", ["softmax", "linear", "relu"])
def test_hook_pattern_is_the_weighting_applied_to_values(attention):
    """Independent rebuild from q, k, v: the documented score/normalisation rule, then z = pattern v."""
    model = make_model(attention=attention, layout="concat", causal=True)
    prompt = model.encode(make_task())
    _, cache = model.run_with_cache(prompt.tokens)
    q, k, v = (cache[f"blocks.1.attn.hook_{name}"].numpy() for name in "qkv")
    raw = np.einsum("bqhd,bkhd->bhqk", q, k)
    allowed = np.zeros((prompt.tokens.shape[1],) * 2, dtype=bool)
    n = prompt.n_support
    for i in range(allowed.shape[0]):
        allowed[i, : (i + 1 if i < n else n)] = True
        allowed[i, i] = True
    if attention == "softmax":
        scaled = np.where(allowed, raw / np.sqrt(8), -np.inf)
        pattern = np.exp(scaled - scaled.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
    else:
        weights = raw if attention == "linear" else np.maximum(raw, 0)
        pattern = np.where(allowed, weights, 0) / allowed.sum(-1, keepdims=True)
    np.testing.assert_allclose(cache["blocks.1.attn.hook_pattern"].numpy(), pattern, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cache["blocks.1.attn.hook_z"].numpy(), np.einsum("bhqk,bkhd->bqhd", pattern, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("layout", "causal"), [("interleaved", True), ("concat", True)])
def test_causal_outputs_do_not_change_when_later_tokens_change(layout, causal):
    model = make_model(layout=layout, causal=causal)
    prompt = model.encode(make_task())
    tokens = prompt.tokens
    base = model(tokens)
    last_causal = tokens.shape[1] if layout == "interleaved" else prompt.n_support
    for position in range(1, last_causal):
        changed = tokens.clone()
        changed[:, position:last_causal] += 1.0
        out = model(changed)
        assert torch.equal(out[:, :position], base[:, :position])
        assert not torch.allclose(out[:, position], base[:, position])


def assert_prefix_equals_queries_from_first_pairs(model, task, prefix):
    """prefix[:, i] (i >= 1) equals the model's query prediction at x_i from the first i pairs."""
    for i in range(1, task.n_support):
        truncated = ICLTask(task.x_support[:, :i], task.y_support[:, :i], task.x_support[:, i : i + 1], task.y_support[:, i : i + 1])
        torch.testing.assert_close(prefix[:, i], model.predict(truncated)[:, 0], rtol=1e-12, atol=1e-12)


def test_interleaved_prefix_prediction_i_equals_query_prediction_from_first_i_pairs():
    model = make_model(layout="interleaved")
    task = make_task(n=5)
    prefix = model.prefix_predictions(task)
    assert prefix.shape == (2, 5)
    assert_prefix_equals_queries_from_first_pairs(model, task, prefix)
    scored = model.training_predictions(task)
    assert torch.equal(scored.pred, prefix) and torch.equal(scored.target, task.y_support)
    torch.testing.assert_close(scored.mse(), ((prefix - task.y_support) ** 2).mean())


def test_interleaved_prefix_predictions_fill_the_positions_and_one_more_pair_is_refused():
    """prefix_predictions feeds 2n tokens (no query token): with max_seq_len=12, n=6 pairs fit, and
    entry i still equals the query prediction from the first i pairs; n=7 is refused with one line
    counting the 14 tokens it would feed."""
    model = make_model(layout="interleaved", max_seq_len=12)
    task = make_task(n=6)
    prefix = model.prefix_predictions(task)
    assert prefix.shape == (2, 6)
    assert_prefix_equals_queries_from_first_pairs(model, task, prefix)
    assert torch.equal(model.training_predictions(task).pred, prefix)
    message = r"^the interleaved support sequence x_1, y_1, \.\.\., x_n, y_n for n_support=7 has 14 tokens, more than this model's max_seq_len=12"
    for method in (model.prefix_predictions, model.training_predictions):
        with pytest.raises(ValueError, match=message):
            method(make_task(n=7))


@pytest.mark.parametrize("attention", ["softmax", "linear", "relu"])
def test_full_attention_concat_model_is_permutation_invariant_over_support(attention):
    model = make_model(attention=attention, layout="concat", causal=False)
    task = make_task()
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = ICLTask(task.x_support[:, order], task.y_support[:, order], task.x_query, task.y_query)
    pred = model.predict(task)
    torch.testing.assert_close(model.predict(permuted), pred, rtol=1e-12, atol=1e-12)
    relabelled = ICLTask(task.x_support, task.y_support + 1.0, task.x_query, task.y_query)
    assert not torch.allclose(model.predict(relabelled), pred)


@pytest.mark.parametrize("causal", [False, True])
def test_concat_query_prediction_does_not_depend_on_other_queries(causal):
    model = make_model(layout="concat", causal=causal)
    task = make_task()
    alone = ICLTask(task.x_support, task.y_support, task.x_query[:, 1:2], task.y_query[:, 1:2])
    torch.testing.assert_close(model.predict(task)[:, 1], model.predict(alone)[:, 0], rtol=1e-12, atol=1e-12)


def test_one_layer_linear_attention_with_hand_set_weights_is_one_gd_step_on_least_squares():
    """von Oswald et al.: token (x, y), query (x*, 0); Q = K = identity on x, V moves y, read y."""
    eta, d, n = 0.7, D, N
    model = make_model(attention="linear", n_layers=1, n_heads=1, d_model=d + 1, d_head=d + 1, mlp=False, norm="none")
    x_block = torch.diag(torch.tensor([1.0] * d + [0.0], dtype=torch.float64))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.read_in.weight.copy_(torch.eye(d + 1))
        attn = model.blocks[0].attn
        attn.W_Q[0] = x_block
        attn.W_K[0] = x_block
        attn.W_V[0, d, d] = 1.0
        # A query attends to the n support tokens and itself (value 0): rescale 1/(n+1) to 1/n.
        attn.W_O[0] = eta * (n + 1) / n * torch.eye(d + 1, dtype=torch.float64)
        model.read_out.weight[0, d] = 1.0
    task = make_task(batch=3)
    pred = model.predict(task).detach().numpy()
    for b in range(3):
        X, y, Xq = task.x_support[b].numpy(), task.y_support[b].numpy(), task.x_query[b].numpy()
        w_after_one_step = eta * X.T @ y / n  # w1 = w0 - eta * grad (1/2n)||Xw - y||^2 at w0 = 0
        np.testing.assert_allclose(pred[b], Xq @ w_after_one_step, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_state_dict_and_config_round_trip_gives_bit_exact_predictions(layout, tmp_path):
    model = make_model(layout=layout, attention="relu", norm="rmsnorm")
    (tmp_path / "model.json").write_text(json.dumps(model.config_dict()))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    rebuilt = model_from_config(json.loads((tmp_path / "model.json").read_text()))
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    rebuilt.eval()
    assert type(rebuilt) is ICLTransformer and rebuilt.cfg == model.cfg
    task = make_task()
    assert torch.equal(rebuilt.predict(task), model.predict(task))


def test_activation_cache_accumulates_residuals_that_read_out_to_the_predictions():
    model = make_model(layout="concat")
    prompt = model.encode(make_task())
    out, raw_cache = model.run_with_cache(prompt.tokens)
    cache = ActivationCache(raw_cache, model)
    stack = cache.accumulated_resid()
    assert stack.shape == (3, *prompt.tokens.shape[:2], 16)
    for index, name in enumerate(model.residual_hook_names()):
        assert torch.equal(stack[index], raw_cache[name])
    torch.testing.assert_close(model.readout(stack[-1]), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(2, 2, 10, dtype=torch.float64))


def test_run_with_hooks_can_ablate_a_layer():
    model = make_model(layout="concat")
    tokens = model.encode(make_task()).tokens

    def zero(activation, hook):
        return torch.zeros_like(activation)

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero), ("blocks.0.hook_mlp_out", zero), ("blocks.1.hook_attn_out", zero), ("blocks.1.hook_mlp_out", zero)])
    expected = model.readout(model.hook_embed(model.read_in(tokens)))
    torch.testing.assert_close(ablated, expected, rtol=1e-12, atol=1e-12)


def test_mask_rows_follow_the_documented_rules():
    allowed = allowed_attention("concat", seq_len=5, n_support=3, causal=False).numpy()
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(allowed, expected)
    np.testing.assert_array_equal(allowed_attention("interleaved", seq_len=4).numpy(), np.tril(np.ones((4, 4), dtype=bool)))


@pytest.mark.parametrize("layout, causal", [("concat", False), ("concat", True), ("interleaved", True)])
def test_allowed_attention_is_where_the_models_own_scores_are_not_masked(layout, causal):
    """model.allowed_attention(prompt) [seq, seq] is exactly where every block's hook_attn_scores
    is finite (softmax: -inf at blocked entries) in every sequence and head."""
    model = make_model(layout=layout, causal=causal)
    prompt = model.encode(make_task())
    allowed = model.allowed_attention(prompt)
    _, cache = model.run_with_cache(prompt.tokens)
    seq = prompt.tokens.shape[1]
    assert allowed.dtype == torch.bool and allowed.shape == (seq, seq)
    for layer in range(2):
        finite = torch.isfinite(cache[f"blocks.{layer}.attn.hook_attn_scores"])  # [seqs, head, seq, seq]
        assert (finite == allowed).all()


def test_model_runs_in_float32_and_encodes_float64_tasks_to_its_dtype():
    model = make_model(dtype="float32")
    pred = model.predict(make_task(dtype=torch.float64))
    assert pred.dtype == torch.float32 and pred.shape == (2, M)


def test_task_of_wrong_dimension_raises_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"task dimension d=5 does not fit this model \(n_dims=3\)"):
        model.predict(make_task(d=5))
    with pytest.raises(ValueError, match="n_dims=3"):
        check_task_fits(model, make_task(d=2))


def test_prompt_longer_than_max_positions_raises_clear_error():
    model = make_model(layout="interleaved", max_seq_len=12)
    with pytest.raises(ValueError, match=r"has 13 tokens, more than this model's max_seq_len=12"):
        model.predict(make_task(n=6))


def test_concat_tokens_without_known_support_count_raise_clear_error():
    model = make_model(layout="concat")
    tokens = torch.randn(2, 7, D + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="pass n_support=prompt.n_support"):
        model(tokens)
    assert model(tokens, n_support=5).shape == (2, 7)


def test_encoded_tokens_keep_their_support_count_after_other_prompts_are_encoded():
    """Two 8-token prompts split 5 + 3 and 3 + 5, then a third prompt: each prompt's own tokens
    still get its own mask, so every query's output equals the model run on that prompt's support
    tokens and that query alone (n_support given explicitly). A copy of the tokens carries no
    count: at a length encoded with two splits it is refused, at a length with one split it gets
    that one."""
    model = make_model(layout="concat")
    task_a, task_b, task_c = make_task(n=5, m=3, seed=1), make_task(n=3, m=5, seed=2), make_task(n=9, m=2, seed=3)
    prompts = [(model.encode(task_a), 5), (model.encode(task_b), 3)]
    prompt_c = model.encode(task_c)
    with torch.no_grad():
        for prompt, n in prompts:
            out = model(prompt.tokens)
            for j in range(prompt.n_query):
                alone = torch.cat([prompt.tokens[:, :n], prompt.tokens[:, n + j : n + j + 1]], dim=1)
                torch.testing.assert_close(out[:, n + j], model(alone, n_support=n)[:, n], rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match=r"prompts of 8 tokens were encoded with n_support in \[3, 5\]: pass n_support"):
            model(prompts[0][0].tokens.clone())
        torch.testing.assert_close(model(prompt_c.tokens.clone()), model(prompt_c.tokens, n_support=9), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention": "cosine"}, "attention must be one of"),
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"layout": "grid"}, "layout must be one of"),
        ({"n_heads": 0}, "n_heads must be an integer >= 1"),
        ({"d_model": 2, "n_heads": 4}, "leaves no width per head"),
        ({"layout": "interleaved", "causal": False}, "interleaved layout is causal"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"mlp": "yes"}, "mlp must be True or False"),
    ],
)
def test_bad_config_raises_clear_error(overrides, message):
    settings = dict(n_dims=D, d_model=16, n_layers=2, n_heads=2)
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        ICLTransformerConfig(**settings)


def test_config_dict_with_unknown_or_missing_keys_raises_clear_error():
    good = ICLTransformerConfig(n_dims=D, d_model=16, n_layers=2, n_heads=2).to_dict()
    with pytest.raises(ValueError, match=r"unknown ICLTransformerConfig keys \['heads'\]"):
        ICLTransformerConfig.from_dict({**good, "heads": 2})
    with pytest.raises(ValueError, match=r"missing required keys \['n_layers'\]"):
        ICLTransformerConfig.from_dict({key: value for key, value in good.items() if key != "n_layers"})
    with pytest.raises(ValueError, match="model_type must be one of"):
        model_from_config({"model_type": "HookedTransformer", **good})
