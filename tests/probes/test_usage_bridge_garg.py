"""Usage review: the TransformerBridge model (`BridgeICLModel`) and Garg et al. checkpoints
(`load_garg_checkpoint`) run through the whole probe stack as a researcher would: several bridge
shapes (heads, d_head != d_model / n_heads, attention-only, no norm, ReLU MLP), a float32 model
moved with `.to(torch.float64)`, models in train mode, a user's own hook context around the
probes, and Garg run folders written here (config.yaml + state.pt + model_<step>.pt).

References are independent of the library: a NumPy forward written from the bridge's parameters,
plain HF GPT-2 (eager attention, its own hidden states and attention weights), a NumPy ridge
regression, NumPy operator norms and SciPy Spearman correlations, and central finite differences.

Tests marked xfail(strict=True) document bugs found in the review (the reason says which)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import spearmanr

import probes
from mi_krr.models import BridgeICLModel, ICLTransformerConfig, load_garg_checkpoint
from mi_krr.models.encoding import interleave_pairs
from mi_krr.models.masks import allowed_attention
from mi_krr.tasks import ICLTask
from brute_force import lens_finite_differences
from prompts import random_task

# ---------------------------------------------------------------- BridgeICLModel


def bridge_model(seed: int = 0, dtype: str = "float64", **overrides) -> BridgeICLModel:
    """A BridgeICLModel whose trainable parameters (biases, norm weights included) are moved off
    their initial values, so every term of the forward matters."""
    settings = dict(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype=dtype)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = BridgeICLModel(ICLTransformerConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def numpy_bridge_forward(model: BridgeICLModel, tokens: torch.Tensor, n_support: int):
    """NumPy forward written from the state dict: read-in, positional rows, pre-norm blocks
    (LayerNorm / none, softmax(q.k / sqrt(d_head)) under the layout mask, GELU / ReLU MLP), final
    norm, unembed + read_out_bias. Returns (residual streams L + 1 of [seqs, seq, d_model],
    patterns L of [seqs, head, seq, seq], readout function)."""
    cfg = model.cfg
    assert cfg.norm in ("layernorm", "none")
    sd = {key: value.detach().double().numpy() for key, value in model.state_dict().items()}
    x = tokens.detach().double().numpy()
    seq = x.shape[1]
    h = x @ sd["read_in.weight"].T + sd["read_in.bias"] + sd["bridge.pos_embed._original_component.weight"][:seq]
    allowed = allowed_attention(cfg.layout, seq, n_support, cfg.causal).numpy()

    def norm(value, prefix):
        if cfg.norm == "none":
            return value
        centred = value - value.mean(-1, keepdims=True)
        scaled = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
        return scaled * sd[prefix + "._original_component.weight"] + sd[prefix + "._original_component.bias"]

    def linear(prefix, value):
        return value @ sd[prefix + "._original_component.weight"].T + sd[prefix + "._original_component.bias"]

    resids, patterns = [h], []
    for layer in range(cfg.n_layers):
        block = f"bridge.blocks.{layer}."
        normed = norm(h, block + "ln1")
        q, k, v = (linear(block + f"attn.{name}", normed).reshape(*h.shape[:2], cfg.n_heads, cfg.d_head) for name in "qkv")
        scores = np.where(allowed, np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head), -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        patterns.append(pattern)
        h = h + linear(block + "attn.o", np.einsum("bhqk,bkhe->bqhe", pattern, v).reshape(*h.shape[:2], -1))
        if cfg.mlp:
            hidden = linear(block + "mlp.in", norm(h, block + "ln2"))
            hidden = np.maximum(hidden, 0) if cfg.act_fn == "relu" else torch.nn.functional.gelu(torch.from_numpy(hidden)).numpy()
            h = h + linear(block + "mlp.out", hidden)
        resids.append(h)

    def readout(resid):
        out = norm(resid, "bridge.ln_final") @ sd["bridge.unembed._original_component.weight"].T
        return out[..., 0] + sd.get("bridge.unembed._original_component.bias", np.zeros(1))[0] + sd["read_out_bias"]

    return resids, patterns, readout


def blocks_of(pattern: np.ndarray, prompt, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Support x support (mean over a prompt's sequences) and query x support blocks of a full
    pattern [batch * groups, head, seq, seq], as AttentionKernels documents them."""
    support, query = prompt.support_positions.numpy(), prompt.query_positions.numpy()
    groups, heads = prompt.groups, pattern.shape[1]
    sup = pattern[:, :, support][..., support].reshape(batch, groups, heads, len(support), len(support)).mean(1)
    qry = pattern[:, :, query][..., support].reshape(batch, groups, heads, len(query), len(support))
    return sup, qry.transpose(0, 2, 1, 3, 4).reshape(batch, heads, groups * len(query), len(support))


BRIDGE_SHAPES = [
    dict(n_layers=1, n_heads=1, d_model=4, layout="concat", causal=False),
    dict(n_layers=2, n_heads=3, d_model=9, d_head=5, layout="interleaved"),
    dict(n_layers=3, n_heads=2, d_model=8, d_head=2, mlp=False, norm="none", layout="concat", causal=True),
    dict(n_layers=2, n_heads=2, d_model=8, norm="none", act_fn="relu", d_mlp=5, layout="interleaved"),
]


@pytest.mark.parametrize("shape", BRIDGE_SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_bridge_shapes_lens_and_attention_equal_a_numpy_forward_from_the_parameters(shape):
    """Bridges of several shapes (one head; three heads of d_head=5 != d_model/n_heads;
    attention-only without norm; ReLU MLP of width 5): the read-out lens of every layer and both
    attention blocks of every layer equal a NumPy forward written from the state dict."""
    model, task = bridge_model(**shape), random_task(2, 3, 2, 2, seed=1)
    prompt = model.encode(task)
    resids, patterns, readout = numpy_bridge_forward(model, prompt.tokens, prompt.n_support)
    expected_lens = np.stack([prompt.gather_queries(torch.from_numpy(readout(r))).numpy() for r in resids], axis=1)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), expected_lens, rtol=0, atol=1e-12)
    kernels = probes.attention_kernels(model, task)
    for layer, pattern in enumerate(patterns):
        support, query = blocks_of(pattern, prompt, task.batch_size)
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), support, rtol=0, atol=1e-13)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), query, rtol=0, atol=1e-13)
        assert pattern.std() > 1e-3  # not uniform: the comparison sees the weights


def test_bridge_moved_to_float64_gives_sensitivities_equal_to_finite_differences():
    """A float32-configured bridge moved with `.to(torch.float64)` (d_head=5, 3 heads, causal
    concat), probed with a float32 task: lens and sensitivities come out float64 and equal
    central differences of the float64 lens to 1e-8 (a float32 path would be off by ~1e-4)."""
    model = bridge_model(dtype="float32", n_heads=3, d_model=9, d_head=5, causal=True).to(torch.float64)
    for batch, n, m in [(1, 1, 1), (2, 4, 3)]:
        task = random_task(batch, n, m, 2, seed=2, dtype=torch.float32)
        sensitivities = probes.label_sensitivities(model, task)
        assert sensitivities.dtype == torch.float64 and sensitivities.shape == (batch, 3, m, n)
        finite = lens_finite_differences(model, task.to(dtype=torch.float64))
        torch.testing.assert_close(sensitivities, finite, rtol=1e-6, atol=1e-8)
        assert finite[:, -1].abs().max() > 1e-2  # not vacuous


def test_bridge_moved_to_float64_round_trips_through_save_model_as_float64(tmp_path):
    """save_model / load_model of a bridge moved to float64 (weights perturbed below float32
    resolution): the reloaded model is float64 with bit-equal predictions (it came back float32,
    predictions off by ~1e-7, while the stored config recorded cfg.dtype='float32')."""
    from mi_krr.train.checkpoint import load_model, save_model

    model = bridge_model(dtype="float32").to(torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1e-10 * torch.randn_like(parameter))
    save_model(tmp_path / "run", model)
    reloaded = load_model(tmp_path / "run")
    task = random_task(2, 3, 2, 2, seed=0)
    assert next(reloaded.parameters()).dtype == torch.float64
    torch.testing.assert_close(reloaded.predict(task), model.predict(task), rtol=0, atol=0)


# ---------------------------------------------------------------- Garg-format checkpoints

GARG = dict(n_dims=3, n_positions=6, n_embd=12, n_layer=2, n_head=3)


class GargReference(torch.nn.Module):
    """Garg et al.'s TransformerModel from plain HF modules (eager attention, so HF returns its
    attention weights), norm weights moved off their initial values."""

    def __init__(self, seed: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(seed)
        conf = GPT2Config(n_positions=2 * GARG["n_positions"], n_embd=GARG["n_embd"], n_layer=GARG["n_layer"],
                          n_head=GARG["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                          attn_implementation="eager")
        self._read_in = torch.nn.Linear(GARG["n_dims"], GARG["n_embd"])
        self._backbone = GPT2Model(conf)
        self._read_out = torch.nn.Linear(GARG["n_embd"], 1)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if ".ln_" in name:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        self.eval()

    @torch.no_grad()
    def run(self, tokens: torch.Tensor):
        """(per-position predictions [seqs, seq], residual streams L + 1 before ln_f, attention
        weights L of [seqs, head, seq, seq])."""
        captured = {}

        def keep_input(module, inputs, output) -> None:  # returns None: the output stays ln_f's
            captured["final"] = inputs[0]

        handle = self._backbone.ln_f.register_forward_hook(keep_input)
        out = self._backbone(inputs_embeds=self._read_in(tokens), output_hidden_states=True, output_attentions=True)
        handle.remove()
        resids = [*out.hidden_states[:-1], captured["final"]]  # HF's last hidden state has ln_f applied
        return self._read_out(out.last_hidden_state)[..., 0], resids, list(out.attentions)


@pytest.fixture(scope="module")
def garg_run(tmp_path_factory) -> Path:
    """A Garg run folder: config.yaml, state.pt (seed 0, with old attn.bias buffers) and
    model_100.pt (seed 1)."""
    folder = tmp_path_factory.mktemp("garg_bridge") / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", **GARG}, "training": {"task": "linear_regression"}}))
    state = dict(GargReference(0).state_dict())
    positions = 2 * GARG["n_positions"]
    for layer in range(GARG["n_layer"]):
        state[f"_backbone.h.{layer}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}, "train_step": 500}, folder / "state.pt")
    torch.save(GargReference(1).state_dict(), folder / "model_100.pt")
    return folder


@pytest.fixture(scope="module")
def garg(garg_run):
    """(GargICLModel loaded from state.pt, its HF reference)."""
    return load_garg_checkpoint(garg_run), GargReference(0)


def test_garg_boundary_length_prompt_matches_hf_and_one_more_pair_is_refused(garg):
    """n_support = n_positions - 1 (2 n_positions - 1 tokens, the longest query prompt the
    positional table holds): predictions equal HF GPT-2's; one more support pair is refused with
    one line naming max_seq_len."""
    model, reference = garg
    task = random_task(2, GARG["n_positions"] - 1, 2, GARG["n_dims"], seed=3, dtype=torch.float32)
    prompt = model.encode(task)
    expected = prompt.gather_queries(reference.run(prompt.tokens)[0])
    torch.testing.assert_close(model.predict(task), expected, rtol=1e-5, atol=1e-6)
    too_long = random_task(2, GARG["n_positions"], 2, GARG["n_dims"], seed=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_seq_len=12"):
        probes.layer_predictions(model, too_long)


def test_garg_prefix_predictions_at_the_training_length_match_hf(garg):
    """Garg trains on n_positions pairs (2 n_positions tokens, exactly the positional table):
    `prefix_predictions` and `training_predictions` on such prompts equal Garg's
    `prediction[:, ::2]` from plain HF (they once counted a query token they do not feed and
    refused them). One more pair is refused with one line counting the 14 tokens it would feed."""
    model, reference = garg
    task = random_task(2, GARG["n_positions"], 1, GARG["n_dims"], seed=4, dtype=torch.float32)
    expected = reference.run(interleave_pairs(task.x_support, task.y_support))[0][:, ::2]
    torch.testing.assert_close(model.prefix_predictions(task), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.training_predictions(task).pred, expected, rtol=1e-5, atol=1e-6)
    too_long = random_task(2, GARG["n_positions"] + 1, 1, GARG["n_dims"], seed=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"support sequence .* for n_support=7 has 14 tokens, more than this model's max_seq_len=12"):
        model.training_predictions(too_long)


def test_garg_step_argument_and_weight_files_pick_the_right_weights(garg_run):
    """Folder -> state.pt (train_step from the file); step=100 and the model_100.pt path ->
    the seed-1 weights; each reproduces its own HF reference."""
    task = random_task(2, 3, 2, GARG["n_dims"], seed=5, dtype=torch.float32)
    for loaded, seed, step in [(load_garg_checkpoint(garg_run), 0, 500), (load_garg_checkpoint(garg_run, step=100), 1, 100),
                               (load_garg_checkpoint(str(garg_run / "model_100.pt")), 1, 100)]:
        prompt = loaded.encode(task)
        torch.testing.assert_close(loaded.predict(task), prompt.gather_queries(GargReference(seed).run(prompt.tokens)[0]),
                                   rtol=1e-5, atol=1e-6)
        assert loaded.source["train_step"] == step


def test_garg_step_with_a_weights_file_is_not_silently_ignored(garg_run):
    """`load_garg_checkpoint(run / 'state.pt', step=100)` names two different weights: refused in
    one line (it once returned state.pt's model quietly). A file with its own step agrees and
    loads it."""
    with pytest.raises(ValueError, match=r"^step=100 and the weights file state\.pt name different weights: pass the run folder .* with step=100"):
        load_garg_checkpoint(garg_run / "state.pt", step=100)
    assert load_garg_checkpoint(garg_run / "model_100.pt", step=100).source == {"file": str(garg_run / "model_100.pt"), "train_step": 100}


def test_garg_step_without_its_file_lists_the_saved_steps(garg_run, tmp_path):
    """step=7 where model_100.pt and model_20.pt exist names the steps to pick from, in order; in a
    folder with state.pt only it says to omit step."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.yaml", "state.pt", "model_100.pt"):
        (folder / name).write_bytes((garg_run / name).read_bytes())
    (folder / "model_20.pt").write_bytes((garg_run / "model_100.pt").read_bytes())
    with pytest.raises(ValueError, match=r"no model_7\.pt in .*: pick a step whose file exists \(20, 100\)$"):
        load_garg_checkpoint(folder, step=7)
    for name in ("model_20.pt", "model_100.pt"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match=r"no model_7\.pt in .*: it holds no model_<step>\.pt at all; omit step to load state\.pt$"):
        load_garg_checkpoint(folder, step=7)


def test_garg_config_with_indivisible_heads_names_config_yaml(garg_run, tmp_path):
    """config.yaml with n_head=5 for n_embd=12: one line naming config.yaml, both values and the
    fix (HF's own error, '`embed_dim` must be divisible by num_heads', names neither)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", **GARG, "n_head": 5}}))
    (folder / "state.pt").write_bytes((garg_run / "state.pt").read_bytes())
    with pytest.raises(ValueError, match=r"config\.yaml: model\.n_embd=12 is not divisible by model\.n_head=5 .*: set model\.n_head") as error:
        load_garg_checkpoint(folder)
    assert "\n" not in str(error.value)


def test_garg_lens_and_attention_blocks_equal_hf_hidden_states_and_attentions(garg):
    """One prompt x one support pair x one query and 2 x 4 x 3: the lens of every layer equals
    HF's hidden states (before ln_f) through ln_f and the read-out; the pattern blocks equal HF's
    own attention weights."""
    model, reference = garg
    for batch, n, m in [(1, 1, 1), (2, 4, 3)]:
        task = random_task(batch, n, m, GARG["n_dims"], seed=6, dtype=torch.float32)
        prompt = model.encode(task)
        _, resids, attentions = reference.run(prompt.tokens)
        with torch.no_grad():
            lens = torch.stack([prompt.gather_queries(reference._read_out(reference._backbone.ln_f(r))[..., 0]) for r in resids], 1)
        np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), lens.numpy(), rtol=1e-5, atol=1e-6)
        kernels = probes.attention_kernels(model, task)
        for layer, pattern in enumerate(attentions):
            support, query = blocks_of(pattern.numpy(), prompt, batch)
            np.testing.assert_allclose(kernels.support[:, layer].numpy(), support, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(kernels.query[:, layer].numpy(), query, rtol=1e-5, atol=1e-7)


def garg_support_scores(reference: GargReference, tokens: torch.Tensor, layer: int, prompt, batch: int) -> np.ndarray:
    """q.k / sqrt(d_head) of the support x support block from HF's c_attn on the residual stream
    entering `layer` (first sequence of each prompt; all of a prompt's sequences share it)."""
    _, resids, _ = reference.run(tokens)
    block = reference._backbone.h[layer]
    d_head = GARG["n_embd"] // GARG["n_head"]
    with torch.no_grad():
        q, k, _ = block.attn.c_attn(block.ln_1(resids[layer])).split(GARG["n_embd"], -1)
    q, k = (value.unflatten(-1, (GARG["n_head"], d_head)).double().numpy() for value in (q, k))
    scores = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d_head)
    support = prompt.support_positions.numpy()
    return scores[:: prompt.groups][:, :, support][..., support]


def test_garg_visible_scores_equal_q_dot_k_from_hf_weights_and_blocked_ones_are_minus_inf(garg):
    """source='scores' on a Garg model, 2 queries per prompt: visible support entries equal
    q.k / sqrt(d_head) from HF's c_attn weights; blocked (causal) entries are -inf as for every
    other model class."""
    model, reference = garg
    task = random_task(2, 4, 2, GARG["n_dims"], seed=7, dtype=torch.float32)
    prompt = model.encode(task)
    scores = probes.attention_kernels(model, task, source="scores").support.numpy()
    upper = np.triu(np.ones((4, 4), dtype=bool), k=1)
    for layer in range(GARG["n_layer"]):
        expected = garg_support_scores(reference, prompt.tokens, layer, prompt, 2)
        np.testing.assert_allclose(scores[:, layer][..., ~upper], expected[..., ~upper], rtol=1e-4, atol=1e-6)
    assert np.isneginf(scores[..., upper]).all()


def test_garg_blocked_scores_are_minus_inf_with_one_query(garg):
    """The same with ONE query per prompt: blocked entries hold HF's -3.4e38 instead of -inf (with
    several queries the group mean overflows to -inf), so what a masked score is depends on
    n_query."""
    model, _ = garg
    task = random_task(2, 4, 1, GARG["n_dims"], seed=7, dtype=torch.float32)
    scores = probes.attention_kernels(model, task, source="scores").support
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    assert torch.isneginf(scores[..., upper]).all()


def test_garg_ridge_layer_predictions_equal_numpy_ridge_on_hf_residuals(garg):
    """method='ridge' with a one-value penalty grid (lam = c x mean eigenvalue of the centred
    feature covariance, intercept unpenalised, as documented): predictions on held-out prompts
    equal a NumPy ridge fitted on HF's residual streams at the query positions."""
    model, reference = garg
    train = random_task(12, 4, 3, GARG["n_dims"], seed=10, dtype=torch.float32)
    test = random_task(3, 4, 3, GARG["n_dims"], seed=11, dtype=torch.float32)

    def features(task: ICLTask) -> np.ndarray:  # [B, L + 1, m, d]
        prompt = model.encode(task)
        return np.stack([prompt.gather_queries(r).double().numpy() for r in reference.run(prompt.tokens)[1]], axis=1)

    c = 0.01
    predictions = probes.layer_predictions(model, test, method="ridge", train_task=train, lam_grid=[c]).numpy()
    train_features, test_features = features(train), features(test)
    target = train.y_query.double().numpy().reshape(-1)
    for layer in range(GARG["n_layer"] + 1):
        x = train_features[:, layer].reshape(-1, GARG["n_embd"])
        centred = x - x.mean(0)
        lam = c * (centred**2).sum() / x.size
        weight = np.linalg.solve(centred.T @ centred + len(x) * lam * np.eye(x.shape[1]), centred.T @ (target - target.mean()))
        expected = test_features[:, layer] @ weight + target.mean() - x.mean(0) @ weight
        np.testing.assert_allclose(predictions[:, layer], expected, rtol=1e-5, atol=1e-6)


def test_garg_kernel_alignment_equals_numpy_and_scipy_at_the_fitted_scale(garg):
    """Query block, exp and Gaussian kernels, inputs scaled x20 so heads differ from uniform:
    for every layer and head with a finite fitted scale, the operator distance
    ||A - R||_2 / ||R||_2 and the Spearman correlation (mean over prompts) equal NumPy / SciPy on
    HF's attention rows over the support x keys (renormalised) against softmax(S / scale), and the
    fitted scale is a local minimum of the mean squared Frobenius distance (x0.99 and x1.01 are
    no closer)."""
    model, reference = garg
    batch, n, m = 3, 4, 3
    base = random_task(batch, n, m, GARG["n_dims"], seed=5, dtype=torch.float32)
    task = ICLTask(x_support=20 * base.x_support, y_support=base.y_support, x_query=20 * base.x_query, y_query=base.y_query)
    alignment = probes.kernel_alignment(model, task, kernels=("exp", "gaussian"))
    prompt = model.encode(task)
    attentions = reference.run(prompt.tokens)[2]
    xs, xq = task.x_support.double().numpy(), task.x_query.double().numpy()
    similarity = {"exp": np.einsum("bqd,bnd->bqn", xq, xs), "gaussian": -0.5 * ((xq[:, :, None] - xs[:, None]) ** 2).sum(-1)}

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    checked = 0
    for kernel, S in similarity.items():
        for layer, pattern in enumerate(attentions):
            rows = pattern.double().numpy()[:, :, -1, 0 : 2 * n : 2].reshape(batch, m, GARG["n_head"], n).transpose(0, 2, 1, 3)
            rows = rows / rows.sum(-1, keepdims=True)
            for head in range(GARG["n_head"]):
                scale = float(alignment.scale[kernel][layer, head])
                if not math.isfinite(scale):
                    continue
                beta = 1 / scale if kernel == "exp" else 1 / scale**2
                ref = softmax(beta * S)
                operator = np.mean([np.linalg.norm(rows[b, head] - ref[b], 2) / np.linalg.norm(ref[b], 2) for b in range(batch)])
                rank = np.mean([spearmanr(rows[b, head].ravel(), ref[b].ravel())[0] for b in range(batch)])
                assert float(alignment.metrics[kernel]["operator_distance"][layer, head]) == pytest.approx(operator, rel=1e-4, abs=1e-7)
                assert float(alignment.metrics[kernel]["spearman"][layer, head]) == pytest.approx(rank, abs=1e-6)
                loss = [((rows[:, head] - softmax(factor * beta * S)) ** 2).sum() for factor in (0.99, 1.0, 1.01)]
                assert loss[1] <= min(loss[0], loss[2]) + 1e-12
                checked += 1
    assert checked >= 4  # most heads got a finite scale: the checks are not vacuous


# ---------------------------------------------------------------- hooks, modes, repeated calls


def attached_hooks(model) -> int:
    return sum(len(point._forward_hooks) + len(point._backward_hooks) for point in model.hook_dict.values())


def test_garg_probes_leave_no_hooks_behind_after_an_exception_and_repeat_exactly(garg):
    """On a Garg model: lens, sensitivities and kernel alignment called twice give identical
    results; a read-out raising inside a hook during label_sensitivities and during diagnose
    leaves no hook attached, and the next call still gives the first call's numbers."""
    model, _ = garg
    task = random_task(2, 3, 2, GARG["n_dims"], seed=0, dtype=torch.float32)
    first = [probes.layer_predictions(model, task), probes.label_sensitivities(model, task)]
    second = [probes.layer_predictions(model, task), probes.label_sensitivities(model, task)]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    alignment = [probes.kernel_alignment(model, task).metrics["exp"]["operator_distance"] for _ in range(2)]
    torch.testing.assert_close(alignment[0], alignment[1], rtol=0, atol=0, equal_nan=True)
    assert attached_hooks(model) == 0
    calls = []

    def failing(resid):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("read-out failed")
        return type(model).readout(model, resid)

    model.readout = failing
    try:
        for probe in (probes.label_sensitivities,
                      lambda m, t: probes.diagnose(m, t, kernel="linear", lam=0.1, bootstrap=0, progress=False)):
            calls.clear()
            with pytest.raises(RuntimeError, match="read-out failed"):
                probe(model, task)
            assert attached_hooks(model) == 0
    finally:
        del model.readout
    torch.testing.assert_close(probes.layer_predictions(model, task), first[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["garg", "bridge"])
def test_probes_inside_a_users_hook_context_read_the_ablated_model(kind, garg):
    """A researcher ablates head 0 of block 0 with `with model.hooks(fwd_hooks=...)` and calls
    probes twice inside: both lenses end at the ablated model's predict (which differs from the
    clean one), the context's hook survives the probes' own hooks, and is gone after it."""
    model = garg[0] if kind == "garg" else bridge_model(n_dims=GARG["n_dims"], layout="interleaved")
    task = random_task(2, 3, 2, GARG["n_dims"], seed=1)
    clean = model.predict(task).double()

    def ablate(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", ablate)]):
        ablated = model.predict(task).double()
        for _ in range(2):
            torch.testing.assert_close(probes.layer_predictions(model, task)[:, -1], ablated, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.predict(task).double(), ablated, rtol=0, atol=0)
    assert (ablated - clean).abs().max() > 1e-4
    assert attached_hooks(model) == 0
    torch.testing.assert_close(model.predict(task).double(), clean, rtol=0, atol=0)


def test_models_in_train_mode_give_the_eval_mode_probes_and_stay_in_train_mode(garg_run):
    """Bridges start in train mode and a user may call .train() on a Garg model: neither has
    dropout (Garg's config sets every pdrop to 0), so lens and sensitivities equal eval mode's,
    and the probes leave the mode as they found it."""
    bridge = bridge_model(n_dims=GARG["n_dims"])
    models = [(bridge, random_task(2, 3, 2, GARG["n_dims"], seed=2)),
              (load_garg_checkpoint(garg_run), random_task(2, 3, 2, GARG["n_dims"], seed=2, dtype=torch.float32))]
    for model, task in models:
        model.eval()
        expected = probes.layer_predictions(model, task), probes.label_sensitivities(model, task)
        model.train()
        got = probes.layer_predictions(model, task), probes.label_sensitivities(model, task)
        assert model.training
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
