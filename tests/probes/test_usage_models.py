"""Usage review: the probes on every kind of model mi-krr supports (ICLTransformer in each
attention / layout / mask / MLP variant, the TransformerBridge model, a Garg-format checkpoint
written here, the hand-built constructions), with awkward but legal task sizes (one prompt, one
query, one support point), checked against independent references: attention recomputed from
the weights (NumPy / plain HF GPT-2), central finite differences of the model's own
predictions, closed-form KRR, and the solver the construction was built to run.

Tests marked xfail(strict=True) document bugs found in the review (the reason says which)."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import yaml

import probes
from mi_krr import solvers
from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.kernels import kernel_matrix
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, load_garg_checkpoint
from mi_krr.models.masks import allowed_attention
from mi_krr.tasks import ICLTask
from brute_force import lens_finite_differences
from prompts import random_task

SIZES = [(1, 1, 1), (3, 2, 2)]  # (batch, n_support, n_query): the smallest task, and a small odd one


def icl_model(cls: type = ICLTransformer, **overrides):
    settings = dict(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(0)
    return cls(ICLTransformerConfig(**settings)).eval()


def numpy_attention_patterns(model: ICLTransformer, task: ICLTask) -> tuple[list[np.ndarray], object]:
    """Every block's applied attention weights [seqs, head, seq, seq], from a NumPy forward written
    from the parameters (LayerNorm, q/k/v projections, the layout's mask, softmax of
    q.k / sqrt(d_head) or q.k / n_keys, GELU MLP)."""
    cfg, prompt = model.cfg, model.encode(task)
    weight = lambda p: p.detach().numpy()  # noqa: E731
    tokens = prompt.tokens.detach().numpy()
    seq = tokens.shape[1]
    x = tokens @ weight(model.read_in.weight).T + weight(model.read_in.bias)
    if cfg.layout == "interleaved":
        x = x + weight(model.W_pos)[:seq]
    allowed = allowed_attention(cfg.layout, seq, prompt.n_support, cfg.causal).numpy()

    def norm(h, module):
        if isinstance(module, torch.nn.LayerNorm):
            centred = h - h.mean(-1, keepdims=True)
            return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * weight(module.weight) + weight(module.bias)
        return h

    patterns = []
    for block in model.blocks:
        attn, h = block.attn, norm(x, block.ln1)
        q, k, v = (np.einsum("bpd,hde->bphe", h, weight(w)) + weight(b) for w, b in
                   ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)))
        scores = np.einsum("bqhe,bkhe->bhqk", q, k)
        if cfg.attention == "softmax":
            scores = np.where(allowed, scores / math.sqrt(cfg.d_head), -np.inf)
            pattern = np.exp(scores - scores.max(-1, keepdims=True))
            pattern /= pattern.sum(-1, keepdims=True)
        else:
            scores = np.where(allowed, scores, 0.0)
            pattern = (scores if cfg.attention == "linear" else np.maximum(scores, 0.0)) / allowed.sum(-1, keepdims=True)
        patterns.append(pattern)
        x = x + np.einsum("bqhe,hed->bqd", np.einsum("bhqk,bkhe->bqhe", pattern, v), weight(attn.W_O)) + weight(attn.b_O)
        if block.mlp is not None:
            pre = norm(x, block.ln2) @ weight(block.mlp.fc_in.weight).T + weight(block.mlp.fc_in.bias)
            post = 0.5 * pre * (1.0 + np.vectorize(math.erf)(pre / math.sqrt(2.0)))
            x = x + post @ weight(block.mlp.fc_out.weight).T + weight(block.mlp.fc_out.bias)
    return patterns, prompt


def blocks_of(pattern: np.ndarray, prompt, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(support [B, H, n, n], query [B, H, m, n]) of a full pattern [B * groups, H, seq, seq]."""
    support_pos, query_pos = prompt.support_positions.numpy(), prompt.query_positions.numpy()
    groups, heads, n = prompt.groups, pattern.shape[1], len(support_pos)
    support = pattern[:, :, support_pos][..., support_pos].reshape(batch, groups, heads, n, n).mean(1)
    query = pattern[:, :, query_pos][..., support_pos].reshape(batch, groups, heads, len(query_pos), n)
    return support, query.transpose(0, 2, 1, 3, 4).reshape(batch, heads, -1, n)


VARIANTS = [
    dict(attention="softmax", layout="concat", causal=False),
    dict(attention="softmax", layout="concat", causal=True, mlp=False),
    dict(attention="softmax", layout="interleaved", norm="none"),
    dict(attention="linear", layout="concat", causal=True),
    dict(attention="relu", layout="interleaved", mlp=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{value}" for value in v.values()))
@pytest.mark.parametrize("sizes", SIZES, ids=["1x1x1", "3x2x2"])
def test_icl_transformer_attention_kernels_equal_a_numpy_forward_from_the_weights(variant, sizes):
    """Support and query blocks of every attention kind, layout and mask (one prompt / support
    point / query included) equal the weights a NumPy forward applies."""
    batch, n, m = sizes
    model, task = icl_model(**variant), random_task(batch, n, m, 2, seed=2)
    kernels = probes.attention_kernels(model, task)
    patterns, prompt = numpy_attention_patterns(model, task)
    for layer, pattern in enumerate(patterns):
        support, query = blocks_of(pattern, prompt, batch)
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), support, rtol=0, atol=1e-13)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), query, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{value}" for value in v.values()))
def test_icl_transformer_label_sensitivities_equal_finite_differences_at_odd_sizes(variant):
    """d yhat / d y of every layer, on one prompt with one support point and on 3 prompts x 2
    supports x 2 queries, against central differences of the model's own predictions."""
    model = icl_model(**variant)
    for batch, n, m in SIZES:
        task = random_task(batch, n, m, 2, seed=1)
        sensitivities = probes.attach(model).label_sensitivities(task)
        assert sensitivities.shape == (batch, 3, m, n)
        torch.testing.assert_close(sensitivities, lens_finite_differences(model, task), rtol=1e-6, atol=1e-8)


def bridge_attention_from_weights(model: BridgeICLModel, task: ICLTask, layer: int) -> tuple[torch.Tensor, object]:
    """Softmax of q.k / sqrt(d_head) under the layout's mask, q and k from the bridge block's own
    ln1 / q / k weights applied to its residual stream entering that block."""
    cfg, prompt = model.cfg, model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    block = model.bridge.blocks[layer]
    ln = block.ln1._original_component
    h = torch.nn.functional.layer_norm(cache[f"blocks.{layer}.hook_resid_pre"], (cfg.d_model,), ln.weight, ln.bias, 1e-5)
    q_proj, k_proj = block.attn.q._original_component, block.attn.k._original_component
    q = (h @ q_proj.weight.T + q_proj.bias).unflatten(-1, (cfg.n_heads, cfg.d_head))
    k = (h @ k_proj.weight.T + k_proj.bias).unflatten(-1, (cfg.n_heads, cfg.d_head))
    seq = prompt.tokens.shape[1]
    allowed = allowed_attention(cfg.layout, seq, prompt.n_support, cfg.causal)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).detach(), prompt


@pytest.mark.parametrize("layout, causal", [("concat", True), ("interleaved", True)])
def test_bridge_attention_kernels_equal_a_softmax_computed_from_its_weights(layout, causal):
    """BridgeICLModel (concat under a causal support mask, interleaved): the probe's blocks equal
    softmax(q.k / sqrt(d_head)) recomputed from the bridge's q / k weights under the layout mask."""
    model, task = icl_model(BridgeICLModel, layout=layout, causal=causal), random_task(2, 3, 2, 2, seed=3)
    kernels = probes.attention_kernels(model, task)
    for layer in range(2):
        pattern, prompt = bridge_attention_from_weights(model, task, layer)
        support, query = blocks_of(pattern.numpy(), prompt, 2)
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), support, rtol=0, atol=1e-13)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), query, rtol=0, atol=1e-13)


@pytest.mark.parametrize("layout, causal, mlp", [("concat", True, False), ("interleaved", True, True)])
def test_bridge_label_sensitivities_and_readout_lens_at_one_support_point(layout, causal, mlp):
    """BridgeICLModel (float64, LayerNorm): last lens row = predict; sensitivities = central
    differences, on 1 prompt x 1 support x 1 query and 3 x 2 x 2."""
    model = icl_model(BridgeICLModel, layout=layout, causal=causal, mlp=mlp)
    for batch, n, m in SIZES:
        task = random_task(batch, n, m, 2, seed=1)
        lens = probes.layer_predictions(model, task)
        torch.testing.assert_close(lens[:, -1], model.predict(task).detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(probes.label_sensitivities(model, task), lens_finite_differences(model, task),
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_bridge_scores_carry_the_mask_at_blocked_support_entries(layout):
    """Causal support block: entry (i, j > i) is blocked by the model's mask. ICLTransformer's
    scores hold -inf there; AttentionKernels documents 'blocked entries carry the model's mask
    value'; a bridge of the same config should agree (a softmax over these rows must be causal)."""
    task = random_task(2, 3, 2, 2, seed=3)
    upper = torch.triu(torch.ones(3, 3, dtype=torch.bool), diagonal=1)
    own = probes.attention_kernels(icl_model(layout=layout, causal=True), task, source="scores").support
    assert torch.isneginf(own[..., upper]).all()  # ICLTransformer: the mask value
    bridge = probes.attention_kernels(icl_model(BridgeICLModel, layout=layout, causal=True), task, source="scores").support
    assert torch.isneginf(bridge[..., upper]).all()


# ---------------------------------------------------------------- Garg-format checkpoint

GARG = dict(n_dims=3, n_positions=8, n_embd=16, n_layer=2, n_head=2)


class GargReference(torch.nn.Module):
    """Garg et al.'s TransformerModel from plain HF modules."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        conf = GPT2Config(n_positions=2 * GARG["n_positions"], n_embd=GARG["n_embd"], n_layer=GARG["n_layer"],
                          n_head=GARG["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        self._read_in = torch.nn.Linear(GARG["n_dims"], GARG["n_embd"])
        self._backbone = GPT2Model(conf)
        self._read_out = torch.nn.Linear(GARG["n_embd"], 1)
        self.eval()


@pytest.fixture(scope="module")
def garg(tmp_path_factory):
    """(loaded GargICLModel, the plain HF reference it was saved from)."""
    reference = GargReference()
    folder = tmp_path_factory.mktemp("garg_usage") / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", **GARG}}))
    torch.save({"model_state_dict": reference.state_dict(), "train_step": 3}, folder / "state.pt")
    return load_garg_checkpoint(folder), reference


def test_garg_probes_match_plain_hf_gpt2(garg):
    """On a Garg checkpoint (3 prompts, 2 support pairs, 2 queries): the lens' last row equals
    Garg's forward (plain HF GPT-2 on x_1, y_1, ..., x_*), and each attention block equals the
    softmax of q.k / sqrt(d_head) computed from HF's c_attn weights under the causal mask."""
    model, reference = garg
    batch, n, m = 3, 2, 2
    task = random_task(batch, n, m, GARG["n_dims"], seed=1, dtype=torch.float32)
    prompt = model.encode(task)
    with torch.no_grad():
        out = reference._backbone(inputs_embeds=reference._read_in(prompt.tokens), output_hidden_states=True)
        hf_pred = reference._read_out(out.last_hidden_state)[:, -1, 0].reshape(batch, m)
    lens = probes.layer_predictions(model, task)
    np.testing.assert_allclose(lens[:, -1].numpy(), hf_pred.numpy(), rtol=1e-5, atol=1e-6)
    kernels = probes.attention_kernels(model, task)
    d_head, seq = GARG["n_embd"] // GARG["n_head"], prompt.tokens.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer, block in enumerate(reference._backbone.h):
        with torch.no_grad():
            q, k, _ = block.attn.c_attn(block.ln_1(out.hidden_states[layer])).split(GARG["n_embd"], -1)
            scores = torch.einsum("bqhe,bkhe->bhqk", q.unflatten(-1, (GARG["n_head"], d_head)),
                                  k.unflatten(-1, (GARG["n_head"], d_head))) / math.sqrt(d_head)
        support, query = blocks_of(torch.softmax(scores.masked_fill(~causal, -math.inf), -1).numpy(), prompt, batch)
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), support, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), query, rtol=1e-5, atol=1e-6)


def test_garg_model_in_float64_gives_sensitivities_equal_to_finite_differences(garg):
    """A Garg model moved to float64 by the user (`.to(torch.float64)`): the sensitivities match
    central differences of its float64 predictions to 1e-8; one prompt with one support pair and
    one query included."""
    model64 = load_garg_checkpoint(garg[0].source["file"]).to(torch.float64)
    for batch, n, m in SIZES:
        task = random_task(batch, n, m, GARG["n_dims"], seed=1)
        sensitivities = probes.label_sensitivities(model64, task)
        assert probes.layer_predictions(model64, task).dtype == torch.float64
        assert sensitivities.shape == (batch, GARG["n_layer"] + 1, m, n)
        finite = lens_finite_differences(model64, task)
        torch.testing.assert_close(sensitivities, finite, rtol=1e-6, atol=1e-8)
        assert finite[:, -1].abs().max() > 1e-5  # not vacuous


def test_garg_diagnosis_and_comparison_carry_the_models_own_lens(garg):
    """diagnose (small bootstrap) on a Garg model and a bridge model, then compare: each task
    set's stored layer predictions are the model's own lens and the comparison has one row per
    (model, task set)."""
    model, _ = garg
    tasks = {"a": random_task(6, 3, 2, GARG["n_dims"], seed=4), "b": random_task(6, 3, 2, GARG["n_dims"], seed=5)}
    diagnosis = probes.diagnose(model, tasks, kernel="linear", lam=0.1, bootstrap=20, progress=False)
    for name, task in tasks.items():
        np.testing.assert_allclose(diagnosis[name].layer_predictions, probes.layer_predictions(model, task).numpy(), rtol=0, atol=0)
    bridge = icl_model(BridgeICLModel, n_dims=GARG["n_dims"], layout="interleaved")
    other = probes.diagnose(bridge, tasks["a"], kernel="linear", lam=0.1, bootstrap=20, progress=False)
    comparison = probes.compare({"garg": diagnosis, "bridge": other})
    assert [(row.model, row.task_set) for row in comparison.rows] == [("garg", "a"), ("garg", "b"), ("bridge", "tasks")]


# ---------------------------------------------------------------- constructions

def test_gd_and_richardson_constructions_lens_and_sensitivities_equal_their_solvers_at_one_support_point():
    """One prompt, one support point, one query: the GD construction's lens equals feature GD
    (closed form: pred_t = x_* x (1 - (1 - lr (x^2 + lam))^t) / (x^2 + lam) y, d = 1 padded) and
    the Richardson construction's step-layer sensitivities equal the row-sum Richardson map."""
    task = random_task(1, 1, 1, 1, seed=7)
    x, xq, y = float(task.x_support), float(task.x_query), float(task.y_support)
    lr, lam = 0.1, 0.2
    gd = gd_transformer(3, lr=lr, lam=lam, dim=2)
    a = x * x + lam
    closed = [xq * x * (1 - (1 - lr * a) ** t) / a * y for t in range(4)]
    np.testing.assert_allclose(probes.layer_predictions(gd, task)[0, :, 0].numpy(), closed, rtol=1e-12, atol=1e-15)
    rich = richardson_transformer(2, lam=0.5, bandwidth=1.0, step=0.7, dim=2)
    layers = [0, 3, 6]
    K = kernel_matrix("gaussian", task.x_support, bandwidth=1.0)
    K_query = kernel_matrix("gaussian", task.x_query, task.x_support, bandwidth=1.0)
    solver = functools.partial(solvers.richardson, step=0.7, precond="rowsum")
    expected = probes.solver_sensitivities(solver, K, K_query, 0.5, 2, linear_in_y=True)
    torch.testing.assert_close(probes.label_sensitivities(rich, task, layers=layers), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n_support, n_steps", [(1, 2), (3, 4), (3, 24)])
def test_cg_construction_sensitivities_past_convergence_equal_finite_differences(n_support, n_steps):
    """After n_support CG steps the prediction is the KRR prediction for every y (CG terminates),
    so d yhat / d y at the last step layer is k_*^T (K + lam I)^-1, which central differences of
    the model reproduce; so does autograd through the model (it was off by O(1) when the step
    length read r^T r from its overwritten copy, which rounds to 0 with a rounding-size
    derivative, and NaN 24 steps in, where the squared norms near underflow)."""
    model, task = cg_transformer(n_steps, lam=0.5, dim=3), random_task(3, n_support, 2, 3, seed=5)
    last = [4 * n_steps]
    K, K_query = task.x_support @ task.x_support.mT, task.x_query @ task.x_support.mT
    krr_map = K_query @ torch.linalg.inv(K + 0.5 * torch.eye(n_support, dtype=K.dtype))
    finite = lens_finite_differences(model, task, eps=1e-4, layers=last)[:, 0]
    torch.testing.assert_close(finite, krr_map, rtol=1e-8, atol=1e-10)  # the reference is right
    torch.testing.assert_close(probes.label_sensitivities(model, task, layers=last)[:, 0], krr_map, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("step, n, seed", [(0.5, 16, 18), (0.5, 4, 2), (0.3, 8, 5), (0.2, 16, 6), (1.5, 16, 4)])
def test_fitted_step_recovers_the_richardson_constructions_step(step, n, seed):
    """A 2-step row-sum Richardson construction (24 prompts, n support points): the solver at the
    construction's step follows its layers exactly (path R2 1, checked through a fixed-step
    callable), so the fitted step, which maximises path R2, is that step on both halves and scores
    1 (the grid alone used to miss these narrow peaks: at 0.5, n = 16 it fitted 0.29 / 0.12, path
    R2 0.89; at 0.2 and 0.3 it fitted about half the step; `first_step_seeds` now seeds them)."""
    model, task = richardson_transformer(2, lam=0.5, bandwidth=1.0, step=step, dim=2), random_task(24, n, 2, 2, seed=seed)
    fixed = functools.partial(solvers.richardson, step=step, precond="rowsum")
    result = probes.diagnose(model, task, kernel="gaussian", lam=0.5, bootstrap=0, progress=False, kernels=(),
                             algorithms={"richardson_rowsum": solvers.ALGORITHMS["richardson_rowsum"], "fixed": fixed})["tasks"]
    assert result.scores["fixed"].score == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(result.fitted_steps["richardson_rowsum"].step, [step, step], rtol=1e-4)
    assert result.scores["richardson_rowsum"].score == pytest.approx(1.0, abs=1e-6)


def test_cg_and_gd_constructions_attention_refuses_kernel_alignment_but_diagnose_goes_on():
    """Linear-attention constructions have signed patterns: kernel_alignment refuses them with
    the fix, and diagnose records the skip as a note instead of failing (3 prompts, 1 query)."""
    task = random_task(3, 4, 1, 2, seed=0)
    for model in (cg_transformer(1, lam=0.5, dim=2), gd_transformer(2, lr=0.1, dim=2)):
        with pytest.raises(ValueError, match="negative entries.*alignment_metrics"):
            probes.kernel_alignment(model, task)
        result = probes.diagnose(model, task, kernel="linear", lam=0.5, bootstrap=5, progress=False)["tasks"]
        assert result.kernel_alignment is None and any("kernel alignment skipped" in note for note in result.notes)


# ---------------------------------------------------------------- kernel alignment

def test_saturated_head_attending_to_the_wrong_key_is_not_a_perfect_kernel():
    """One concat softmax head with W_Q, W_K scaled 150x: each query's attention is one-hot (the
    other weights underflow to exactly 0), on a key that is the exp / Gaussian kernel's nearest
    key in fewer than 10% of rows. Over the support keys the head actually sees (concat: all of
    them), the best row-normalised kernel at any scale (NumPy scan) is at relative operator
    distance >= 1.5; kernel_alignment reports ~1e-42."""
    model = icl_model(n_layers=1, n_heads=1, mlp=False)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(150.0)
        model.blocks[0].attn.W_K.mul_(150.0)
    task = random_task(8, 10, 4, 2, seed=0)
    attention = probes.attention_kernels(model, task).query[:, 0, 0].numpy()  # [B, m, n]
    assert ((attention > 0).sum(-1) == 1).mean() > 0.9  # saturated: one visible key per row
    xs, xq = task.x_support.numpy(), task.x_query.numpy()
    similarity = {"exp": np.einsum("bmd,bnd->bmn", xq, xs), "gaussian": -0.5 * ((xq[:, :, None] - xs[:, None]) ** 2).sum(-1)}
    result = probes.kernel_alignment(model, task)
    for kernel, s in similarity.items():
        best = np.inf
        for beta in np.logspace(-3, 4, 200):
            reference = np.exp(beta * s - (beta * s).max(-1, keepdims=True))
            reference /= reference.sum(-1, keepdims=True)
            best = min(best, np.mean([np.linalg.norm(attention[b] - reference[b], 2) / np.linalg.norm(reference[b], 2)
                                      for b in range(len(attention))]))
        assert best > 1.5  # the reference: no kernel at any scale is close
        assert float(result.metrics[kernel]["operator_distance"][0, 0]) > 0.5


def test_attention_read_on_another_task_is_refused_with_a_clear_error():
    """Re-using one task's AttentionKernels for a task with another n_support or batch is a
    plausible notebook slip: a one-line ValueError naming attention (it used to be a raw torch
    RuntimeError)."""
    model = icl_model()
    attention = probes.attention_kernels(model, random_task(2, 3, 2, 2, seed=0))
    for other in (random_task(2, 4, 2, 2, seed=0), random_task(3, 3, 2, 2, seed=0)):
        with pytest.raises(ValueError, match="pass the attention_kernels of this task"):
            probes.kernel_alignment(model, other, attention=attention)


# ---------------------------------------------------------------- hooks, repeated calls, misuse

@pytest.mark.parametrize("cls", [ICLTransformer, BridgeICLModel])
def test_probes_leave_no_hooks_behind_even_when_a_reduction_raises(cls):
    """Repeated calls, and a call whose read-out raises inside a hook mid-pass, leave no hook
    attached: the next calls give the same numbers as the first."""
    model, task = icl_model(cls), random_task(2, 3, 2, 2, seed=0)

    def attached() -> int:
        return sum(len(point._forward_hooks) + len(point._backward_hooks) for point in model.hook_dict.values())

    first = probes.layer_predictions(model, task)
    probes.label_sensitivities(model, task)
    probes.attention_kernels(model, task, source="scores")
    assert attached() == 0
    calls = []

    def failing(resid):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("read-out failed")
        return cls.readout(model, resid)

    model.readout = failing
    with pytest.raises(RuntimeError, match="read-out failed"):
        probes.layer_predictions(model, task)
    del model.readout
    assert attached() == 0
    torch.testing.assert_close(probes.layer_predictions(model, task), first, rtol=0, atol=0)


def test_label_sensitivities_under_inference_mode_equal_finite_differences():
    """Notebook users wrap analysis in torch.inference_mode(); label_sensitivities re-enables
    autograd there as under no_grad, on a task sampled inside inference mode too, and matches
    central finite differences (it used to blame the model's encode() for detaching the labels)."""
    model, task = icl_model(), random_task(2, 3, 2, 2, seed=0)
    expected = lens_finite_differences(model, task)
    with torch.inference_mode():
        inference_task = dataclasses.replace(task, **{name: getattr(task, name).clone() for name in ("x_support", "y_support", "x_query", "y_query")})
        assert inference_task.y_support.is_inference()
        result = probes.label_sensitivities(model, inference_task)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-8)


class ShortResidualNames(ICLTransformer):
    """Names L residual hooks, forgetting the embeddings (every name exists and fires)."""

    def residual_hook_names(self) -> list[str]:
        return super().residual_hook_names()[1:]


class ShortAttentionNames(ICLTransformer):
    """Names the attention hooks of block 0 only."""

    def attention_hook_names(self):
        return super().attention_hook_names()[:1]


@pytest.mark.parametrize("cls, method", [(ShortResidualNames, "residual_hook_names"), (ShortAttentionNames, "attention_hook_names")])
def test_attach_refuses_hook_name_lists_of_the_wrong_length(cls, method):
    """ICLModel requires L + 1 residual names and one AttentionHooks per block; attach (which
    'checks all of it once') refuses a model that breaks this, naming the method (it used to
    pass, and later probes crashed with an IndexError or silently dropped layers)."""
    torch.manual_seed(0)
    model = cls(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, dtype="float64"))
    with pytest.raises(ValueError, match=method):
        probes.attach(model)
