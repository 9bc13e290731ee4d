"""Model outputs, hooks, encodings and masks checked against independent references: a NumPy
forward pass written out from the parameters, prompts and masks built by brute-force loops, and
plain HF GPT-2 for the Garg loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformer_lens.model_bridge  # noqa: F401  (heavy import paid once at collection, not inside a test)
import yaml

from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, allowed_attention, load_garg_checkpoint
from mi_krr.models.encoding import encode
from mi_krr.models.garg import read_garg_config
from icl_numpy_forward import EPS, brute_force_allowed, numpy_forward
from prompts import random_task

D, D_MODEL, HEADS = 3, 8, 2
D_HEAD = D_MODEL // HEADS


# ------------------------------------------------------------------------------------------------
# Independent references


def make_perturbed_model(seed: int = 0, **overrides) -> ICLTransformer:
    """A float64 model whose every parameter (norm gains and biases included) is randomised, so
    that layers or norms swapped for one another give different outputs."""
    settings = dict(n_dims=D, d_model=D_MODEL, n_layers=2, n_heads=HEADS, max_seq_len=32, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(seed)
    model = ICLTransformer(ICLTransformerConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


FORWARD_CASES = [
    ("concat", "layernorm", "softmax", False),
    ("concat", "rmsnorm", "relu", True),
    ("interleaved", "layernorm", "linear", True),
    ("interleaved", "rmsnorm", "softmax", True),
]


# ------------------------------------------------------------------------------------------------
# ICLTransformer


@pytest.mark.parametrize(("layout", "norm", "attention", "causal"), FORWARD_CASES)
def test_forward_matches_numpy_reference_written_from_the_parameters(layout, norm, attention, causal):
    """model(tokens) equals a NumPy pre-norm transformer (read-in, pos-embed, blocks, final norm, read-out)."""
    model = make_perturbed_model(layout=layout, norm=norm, attention=attention, causal=causal)
    prompt = model.encode(random_task(2, 5, 3, D, seed=4))
    tokens = prompt.tokens.numpy()
    allowed = brute_force_allowed(layout, tokens.shape[1], prompt.n_support, causal)
    with torch.no_grad():
        out = model(prompt.tokens).numpy()
    np.testing.assert_allclose(out, numpy_forward(model, tokens, allowed)["output"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("layout", "norm", "attention", "causal"), FORWARD_CASES[:3])
def test_every_hook_carries_the_numpy_reference_intermediate(layout, norm, attention, causal):
    """Each cached hook value equals the same-named intermediate of the NumPy forward (scores before normalisation, MLP pre/post activation, ...)."""
    model = make_perturbed_model(layout=layout, norm=norm, attention=attention, causal=causal)
    prompt = model.encode(random_task(2, 4, 3, D, seed=5))
    allowed = brute_force_allowed(layout, prompt.tokens.shape[1], prompt.n_support, causal)
    reference = numpy_forward(model, prompt.tokens.numpy(), allowed)
    _, cache = model.run_with_cache(prompt.tokens)
    checked = 0
    for name, value in cache.items():
        if name in reference:
            np.testing.assert_allclose(value.detach().numpy(), reference[name], rtol=1e-10, atol=1e-10, err_msg=name)
            checked += 1
    assert checked == 1 + 2 * 13  # hook_embed, and per block 13 intermediates of the reference


def test_readout_of_a_residual_applies_final_norm_then_read_out():
    """model.readout(r) equals LayerNorm(r) . w + b computed by hand, on an arbitrary residual."""
    model = make_perturbed_model()
    resid = torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    r = resid.numpy()
    normed = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + EPS)
    expected = (normed * model.ln_final.weight.detach().numpy() + model.ln_final.bias.detach().numpy()) @ model.read_out.weight.detach().numpy()[0]
    expected = expected + model.read_out.bias.item()
    np.testing.assert_allclose(model.readout(resid).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Encoding and masks


def test_interleaved_encoding_equals_garg_sequence_built_by_loops():
    """encode(task, 'interleaved') is x_1, (y_1, 0..), ..., x_n, (y_n, 0..), x*_j per query, with positions at x's, y's and the query."""
    task = random_task(2, 4, 3, D, seed=2)
    prompt = encode(task, "interleaved")
    n, m = 4, 3
    expected = np.zeros((2 * m, 2 * n + 1, D))
    for b in range(2):
        for j in range(m):
            for i in range(n):
                expected[b * m + j, 2 * i] = task.x_support[b, i].numpy()
                expected[b * m + j, 2 * i + 1, 0] = task.y_support[b, i].item()
            expected[b * m + j, 2 * n] = task.x_query[b, j].numpy()
    np.testing.assert_array_equal(prompt.tokens.numpy(), expected)
    assert prompt.query_positions.tolist() == [2 * n]
    assert prompt.support_positions.tolist() == [0, 2, 4, 6]
    assert prompt.label_positions.tolist() == [1, 3, 5, 7]


def test_concat_encoding_positions_hold_the_tasks_tensors():
    """Concat tokens at support/label positions hold (x_i, y_i); at query positions (x*_j, 0)."""
    task = random_task(2, 5, 3, D, seed=3)
    prompt = encode(task, "concat")
    tokens = prompt.tokens
    np.testing.assert_array_equal(tokens[:, prompt.support_positions, :D].numpy(), task.x_support.numpy())
    np.testing.assert_array_equal(tokens[:, prompt.label_positions, D].numpy(), task.y_support.numpy())
    np.testing.assert_array_equal(tokens[:, prompt.query_positions, :D].numpy(), task.x_query.numpy())
    np.testing.assert_array_equal(tokens[:, prompt.query_positions, D].numpy(), np.zeros((2, 3)))


@pytest.mark.parametrize("n_support", [0, -1, 7])
def test_concat_mask_refuses_support_counts_outside_one_to_seq_len(n_support):
    """allowed_attention('concat', 6, n) raises ValueError for n outside [1, 6], and so does a forward with that n."""
    with pytest.raises(ValueError, match="needs n_support in"):
        allowed_attention("concat", seq_len=6, n_support=n_support)
    model = make_perturbed_model()
    with pytest.raises(ValueError, match="needs n_support in"):
        model(torch.zeros(1, 6, D + 1, dtype=torch.float64), n_support=n_support)


def test_prompt_of_exactly_max_seq_len_tokens_fits_and_one_pair_more_does_not():
    """Interleaved, max_seq_len=13: n=6 gives 2n+1 = 13 tokens and is accepted; n=7 (15 tokens) is refused."""
    model = make_perturbed_model(layout="interleaved", max_seq_len=13)
    assert model.predict(random_task(1, 6, 2, D)).shape == (1, 2)
    with pytest.raises(ValueError, match="has 15 tokens"):
        model.predict(random_task(1, 7, 2, D))


# ------------------------------------------------------------------------------------------------
# BridgeICLModel


def test_bridge_causal_concat_pattern_is_softmax_under_the_brute_force_causal_mask():
    """A causal concat bridge's pattern equals softmax(q.k / sqrt(d_head)) under the loop-built causal concat mask."""
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=D, d_model=D_MODEL, n_layers=2, n_heads=HEADS, max_seq_len=16, dtype="float64", causal=True)
    model = BridgeICLModel(cfg).eval()
    prompt = model.encode(random_task(2, 5, 3, D, seed=1))
    _, cache = model.run_with_cache(prompt.tokens)
    allowed = brute_force_allowed("concat", prompt.tokens.shape[1], prompt.n_support, causal=True)
    for hooks in model.attention_hook_names():
        scores = np.einsum("bqhd,bkhd->bhqk", cache[hooks.q].numpy(), cache[hooks.k].numpy()) / math.sqrt(D_HEAD)
        scores = np.where(allowed, scores, -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(cache[hooks.pattern].numpy(), pattern / pattern.sum(-1, keepdims=True), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Garg checkpoints


GARG = {"family": "gpt2", "n_dims": D, "n_positions": 6, "n_embd": 8, "n_layer": 2, "n_head": 2}


def write_garg_run(folder, model_section=GARG, state=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model_section}))
    if state is not None:
        torch.save({"model_state_dict": state, "train_step": 1}, folder / "state.pt")
    return folder


@pytest.mark.parametrize("key, value", [("n_layer", 0), ("n_embd", -4), ("n_head", True), ("n_positions", 2.5)])
def test_garg_config_refuses_sizes_that_are_not_positive_integers(tmp_path, key, value):
    """read_garg_config raises ValueError naming model.<key> for 0, negative, bool or float sizes."""
    write_garg_run(tmp_path, {**GARG, key: value})
    with pytest.raises(ValueError, match=f"model.{key} must be a positive integer"):
        read_garg_config(tmp_path / "config.yaml")


def test_garg_predictions_equal_plain_hf_gpt2_on_a_sequence_built_by_loops(tmp_path):
    """load_garg_checkpoint(...).predict equals HF GPT2Model on x_1, (y_1, 0, 0), ..., x_n, (y_n, 0, 0), x* assembled by hand."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    conf = GPT2Config(n_positions=12, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, vocab_size=5)
    read_in, backbone, read_out = torch.nn.Linear(D, 8), GPT2Model(conf).eval(), torch.nn.Linear(8, 1)
    state = {f"_read_in.{k}": v for k, v in read_in.state_dict().items()}
    state.update({f"_backbone.{k}": v for k, v in backbone.state_dict().items()})
    state.update({f"_read_out.{k}": v for k, v in read_out.state_dict().items()})
    model = load_garg_checkpoint(write_garg_run(tmp_path / "run", state=state))
    task = random_task(2, 4, 2, D, seed=6, dtype=torch.float32)
    pred = model.predict(task)
    for b in range(2):
        for j in range(2):
            rows = []
            for i in range(4):
                rows += [task.x_support[b, i], torch.tensor([task.y_support[b, i].item(), 0.0, 0.0])]
            rows.append(task.x_query[b, j])
            with torch.no_grad():
                hidden = backbone(inputs_embeds=read_in(torch.stack(rows))[None]).last_hidden_state
                expected = read_out(hidden)[0, -1, 0]
            torch.testing.assert_close(pred[b, j], expected, rtol=1e-5, atol=1e-5)
