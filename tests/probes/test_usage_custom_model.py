"""Usage review: models a researcher writes from the `mi_krr.models.ICLModel` docs alone, on
TransformerLens's `HookedRootModule` + `HookPoint`, and the whole probe stack run on them.

Two models of our own: a Garg-style interleaved softmax transformer (x_1, y_1, ..., x_n, y_n, x_*,
one causal sequence per query, final LayerNorm) and a concat-layout linear-attention one (pattern
q.k / sqrt(e) / visible-key count, no final norm, read-out a Linear on the query token). The
references are independent of probes: a NumPy forward written from the weights (one loop over
prompts and queries for the interleaved model), NumPy softmax of q.k, central differences of that
NumPy forward, and a head built to be exactly a row-normalised exp kernel of known temperature.

Then the typical implementation mistakes, each a one-line error naming the method at fault (the
README's promise), including a `readout` that disagrees with `forward` and a model without
attention hooks (the probes that read none still work)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

import probes
from mi_krr.models import AttentionHooks, EncodedPrompt
from own_attention import OwnAttention
from prompts import random_task


# ---------------------------------------------------------------- the researcher's models


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, kind: str):
        super().__init__()
        self.attn = OwnAttention(d_model, n_heads, kind)
        self.hook_resid_post = HookPoint()


class InterleavedModel(HookedRootModule):
    """Tokens x_i -> (x_i, 0), y_i -> (0, y_i), query (x_*, 0); Linear read-in (hook_embed), L causal
    softmax blocks, final LayerNorm and Linear read-out. One sequence per query (prompt-major)."""

    def __init__(self, n_layers=2, n_heads=2, d_model=8, dim=2, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.n_layers, self.n_heads = n_layers, n_heads
        self.read_in = nn.Linear(dim + 1, d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([Block(d_model, n_heads, "softmax") for _ in range(n_layers)])
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, 1)
        self.to(dtype)
        self.setup()

    def encode(self, task) -> EncodedPrompt:
        weight = self.unembed.weight
        task = task.to(device=weight.device, dtype=weight.dtype)
        batch, n, m, d = task.batch_size, task.n_support, task.n_query, task.dim
        x_tokens = torch.cat([task.x_support, torch.zeros(batch, n, 1, dtype=weight.dtype)], -1)
        y_tokens = torch.cat([torch.zeros(batch, n, d, dtype=weight.dtype), task.y_support[..., None]], -1)
        pairs = torch.stack([x_tokens, y_tokens], 2).reshape(batch, 2 * n, d + 1).repeat_interleave(m, 0)
        queries = torch.cat([task.x_query, torch.zeros(batch, m, 1, dtype=weight.dtype)], -1).reshape(batch * m, 1, d + 1)
        return EncodedPrompt(tokens=torch.cat([pairs, queries], 1), query_positions=torch.tensor([2 * n]), batch_size=batch,
                             n_query=m, n_support=n, support_positions=torch.arange(0, 2 * n, 2),
                             label_positions=torch.arange(1, 2 * n, 2))

    def causal(self, seq: int) -> torch.Tensor:
        return torch.ones(seq, seq, dtype=torch.bool).tril()

    def blocks_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        allowed = self.causal(tokens.shape[1])
        x = self.hook_embed(self.read_in(tokens))
        for block in self.blocks:
            x = block.hook_resid_post(x + block.attn(x, allowed))
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.blocks_forward(tokens))

    def residual_hook_names(self) -> list[str]:
        return ["hook_embed"] + [f"blocks.{layer}.hook_resid_post" for layer in range(self.n_layers)]

    def attention_hook_names(self) -> list[AttentionHooks]:
        return [AttentionHooks(pattern=f"blocks.{layer}.attn.hook_pattern", scores=f"blocks.{layer}.attn.hook_attn_scores",
                               q=f"blocks.{layer}.attn.hook_q", k=f"blocks.{layer}.attn.hook_k") for layer in range(self.n_layers)]

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor | None:
        return self.causal(prompt.tokens.shape[1])

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.ln_final(resid))[..., 0]

    def predict(self, task) -> torch.Tensor:
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens))


class ConcatLinearModel(InterleavedModel):
    """Concat layout (x_i, y_i) then (x_*, 0); linear attention, queries see the support and
    themselves; no final norm: the read-out is a Linear on the query token."""

    def __init__(self, n_layers=2, n_heads=1, d_model=6, dim=2, seed=1):
        HookedRootModule.__init__(self)
        torch.manual_seed(seed)
        self.n_layers, self.n_heads, self.n_support = n_layers, n_heads, None
        self.read_in = nn.Linear(dim + 1, d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([Block(d_model, n_heads, "linear") for _ in range(n_layers)])
        self.unembed = nn.Linear(d_model, 1)
        self.to(torch.float64)
        self.setup()

    def encode(self, task) -> EncodedPrompt:
        task = task.to(dtype=torch.float64)
        n, m = task.n_support, task.n_query
        self.n_support = n
        support = torch.cat([task.x_support, task.y_support[..., None]], -1)
        query = torch.cat([task.x_query, torch.zeros_like(task.y_query)[..., None]], -1)
        return EncodedPrompt(tokens=torch.cat([support, query], 1), query_positions=torch.arange(n, n + m),
                             batch_size=task.batch_size, n_query=m, n_support=n, support_positions=torch.arange(n),
                             label_positions=torch.arange(n))

    def mask(self, seq: int, n: int) -> torch.Tensor:
        i = torch.arange(seq)
        return (i[None, :] < n) | (i[None, :] == i[:, None])

    def blocks_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        allowed = self.mask(tokens.shape[1], self.n_support)
        x = self.hook_embed(self.read_in(tokens))
        for block in self.blocks:
            x = block.hook_resid_post(x + block.attn(x, allowed))
        return x

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor | None:
        return self.mask(prompt.tokens.shape[1], prompt.n_support)

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return self.unembed(resid)[..., 0]


# ---------------------------------------------------------------- NumPy references


def weights(model) -> dict[str, np.ndarray]:
    return {name: p.detach().double().numpy() for name, p in model.named_parameters()}


def numpy_interleaved(model: InterleavedModel, xs, ys, xq) -> tuple[np.ndarray, list[np.ndarray]]:
    """The interleaved model in NumPy, one prompt and query at a time: (lens [B, L + 1, m], per block
    the patterns [B, head, seq, seq, m])."""
    w = weights(model)
    batch, n, d = xs.shape
    m = xq.shape[1]
    seq = 2 * n + 1
    lens = np.zeros((batch, model.n_layers + 1, m))
    patterns = [np.zeros((batch, model.n_heads, seq, seq, m)) for _ in range(model.n_layers)]

    def readout(h):
        centred = h - h.mean()
        normed = centred / np.sqrt((centred**2).mean() + 1e-5) * w["ln_final.weight"] + w["ln_final.bias"]
        return normed @ w["unembed.weight"][0] + w["unembed.bias"][0]

    for b in range(batch):
        for j in range(m):
            tokens = []
            for i in range(n):
                tokens += [np.r_[xs[b, i], 0.0], np.r_[np.zeros(d), ys[b, i]]]
            x = np.array(tokens + [np.r_[xq[b, j], 0.0]]) @ w["read_in.weight"].T + w["read_in.bias"]
            lens[b, 0, j] = readout(x[-1])
            for layer in range(model.n_layers):
                out = np.zeros_like(x)
                for head in range(model.n_heads):
                    q, k, v = (x @ w[f"blocks.{layer}.attn.{name}"][head] for name in ("W_Q", "W_K", "W_V"))
                    scores = q @ k.T / math.sqrt(q.shape[1])
                    scores[np.triu_indices(seq, 1)] = -np.inf
                    pattern = np.exp(scores - scores.max(1, keepdims=True))
                    pattern /= pattern.sum(1, keepdims=True)
                    patterns[layer][b, head, :, :, j] = pattern
                    out += pattern @ v @ w[f"blocks.{layer}.attn.W_O"][head]
                x = x + out
                lens[b, layer + 1, j] = readout(x[-1])
    return lens, patterns


def numpy_concat_linear(model: ConcatLinearModel, task) -> tuple[np.ndarray, list[np.ndarray]]:
    """The linear-attention model in NumPy: (lens [B, L + 1, m], per block the pattern [B, head, seq, seq])."""
    w = weights(model)
    xs, ys, xq = (t.double().numpy() for t in (task.x_support, task.y_support, task.x_query))
    n, m = task.n_support, task.n_query
    tokens = np.concatenate([np.concatenate([xs, ys[..., None]], -1), np.concatenate([xq, np.zeros(xq.shape[:2] + (1,))], -1)], 1)
    i, j = np.arange(n + m)[:, None], np.arange(n + m)[None, :]
    allowed = (j < n) | (i == j)
    x = tokens @ w["read_in.weight"].T + w["read_in.bias"]
    readout = lambda h: (h @ w["unembed.weight"].T + w["unembed.bias"])[..., 0]  # noqa: E731
    lens, patterns = [readout(x)[:, n:]], []
    for layer in range(model.n_layers):
        q, k, v = (np.einsum("bpd,hde->bphe", x, w[f"blocks.{layer}.attn.{name}"]) for name in ("W_Q", "W_K", "W_V"))
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
        pattern = np.where(allowed, scores, 0.0) / allowed.sum(-1, keepdims=True)
        patterns.append(pattern)
        x = x + np.einsum("bqhe,hed->bqd", np.einsum("bhqk,bkhe->bqhe", pattern, v), w[f"blocks.{layer}.attn.W_O"])
        lens.append(readout(x)[:, n:])
    return np.stack(lens, 1), patterns


def task_arrays(task):
    return tuple(t.double().numpy() for t in (task.x_support, task.y_support, task.x_query))


# ---------------------------------------------------------------- the happy path, checked


@pytest.mark.parametrize("sizes", [(1, 1, 1), (3, 4, 2)])
def test_interleaved_model_lens_equals_a_numpy_forward_and_its_last_layer_is_predict(sizes):
    """Read-out lens of the interleaved model (one causal sequence per query, final LayerNorm) at
    every layer equals the per-prompt, per-query NumPy forward; a layer subset in any order picks
    those rows; the last layer equals `model.predict`."""
    batch, n, m = sizes
    model, task = InterleavedModel(), random_task(batch, n, m, 2, seed=3)
    reference, _ = numpy_interleaved(model, *task_arrays(task))
    lens = probes.attach(model).layer_predictions(task)
    assert lens.dtype == torch.float64 and lens.shape == (batch, 3, m)
    np.testing.assert_allclose(lens.numpy(), reference, atol=1e-12)
    np.testing.assert_allclose(probes.layer_predictions(model, task, layers=[2, 0]).numpy(), reference[:, [2, 0]], atol=1e-12)
    np.testing.assert_allclose(model.predict(task).detach().numpy(), reference[:, -1], atol=1e-12)


def test_interleaved_attention_blocks_are_the_numpy_softmax_of_q_k():
    """Query block: row 2n (the query token) on the x keys 0, 2, ..., 2n-2 of each query's own
    sequence; support block: rows and keys at the x tokens (causal, so every query's sequence has
    the same support block); scores are q.k / sqrt(e) there, -inf above the diagonal."""
    model, task = InterleavedModel(), random_task(2, 3, 2, 2, seed=4)
    _, patterns = numpy_interleaved(model, *task_arrays(task))
    n, x_keys = 3, slice(0, 6, 2)
    kernels = probes.attention_kernels(model, task)
    query = np.stack([p[:, :, 2 * n, x_keys, :].transpose(0, 1, 3, 2) for p in patterns], 1)  # [B, L, H, m, n]
    support = np.stack([p[:, :, x_keys, x_keys, 0] for p in patterns], 1)
    np.testing.assert_allclose(kernels.query.numpy(), query, atol=1e-13)
    np.testing.assert_allclose(kernels.support.numpy(), support, atol=1e-13)
    assert kernels.query_allowed.all() and torch.equal(kernels.support_allowed, torch.ones(n, n, dtype=torch.bool).tril())
    scores = probes.attention_kernels(model, task, source="scores").support
    log_ratio = np.log(support[..., 1, 0] / support[..., 1, 1])  # softmax: the score difference of row 1's keys 0 and 1
    np.testing.assert_allclose((scores[..., 1, 0] - scores[..., 1, 1]).numpy(), log_ratio, atol=1e-12)
    assert torch.isinf(scores[..., 0, 1]).all()


@pytest.mark.parametrize("model_class", [InterleavedModel, ConcatLinearModel])
def test_sensitivities_equal_central_differences_of_the_numpy_forward(model_class):
    """`label_sensitivities` of both own models equal central differences (h = 1e-6) of the
    NumPy forward in each support label, at every layer."""
    model, task = model_class(), random_task(2, 3, 2, 2, seed=5)
    sens = probes.label_sensitivities(model, task)
    xs, ys, xq = task_arrays(task)

    def lens(labels):
        if model_class is InterleavedModel:
            return numpy_interleaved(model, xs, labels, xq)[0]
        return numpy_concat_linear(model, dataclasses.replace(task, y_support=torch.from_numpy(labels)))[0]

    columns = []
    for i in range(task.n_support):
        shift = np.zeros_like(ys)
        shift[:, i] = 1e-6
        columns.append((lens(ys + shift) - lens(ys - shift)) / 2e-6)
    assert sens.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(sens.numpy(), np.stack(columns, -1), atol=1e-8)


def test_linear_attention_model_lens_and_unnormalised_blocks_equal_numpy():
    """The concat linear-attention model (no final norm, Linear read-out on the query token): lens
    and both attention blocks (q.k / sqrt(e) / visible keys, signed) equal the NumPy forward."""
    model, task = ConcatLinearModel(), random_task(3, 4, 2, 2, seed=6)
    reference, patterns = numpy_concat_linear(model, task)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), reference, atol=1e-12)
    kernels = probes.attention_kernels(model, task)
    np.testing.assert_allclose(kernels.query.numpy(), np.stack([p[:, :, 4:, :4] for p in patterns], 1), atol=1e-13)
    np.testing.assert_allclose(kernels.support.numpy(), np.stack([p[:, :, :4, :4] for p in patterns], 1), atol=1e-13)
    assert (kernels.query < 0).any()  # the reference really is signed, so the refusal below is meaningful


def test_linear_attention_kernel_alignment_is_refused_in_one_line_and_diagnose_notes_it():
    """Signed linear-attention weights are no softmax kernel: `kernel_alignment` refuses in one
    line, and `diagnose` (default kernels) runs and records that it skipped the alignment."""
    model, task = ConcatLinearModel(), random_task(24, 5, 2, 2, seed=7)
    with pytest.raises(ValueError, match="negative entries") as error:
        probes.kernel_alignment(model, task)
    assert "\n" not in str(error.value)
    result = probes.diagnose(model, task, kernel="gaussian", lam=0.1, algorithms=("cg", "gd"), bootstrap=0, progress=False)["tasks"]
    assert result.kernel_alignment is None and any("kernel alignment skipped" in note for note in result.notes)
    np.testing.assert_allclose(result.layer_predictions, numpy_concat_linear(model, task)[0], atol=1e-12)


def exp_kernel_interleaved(n_heads: int = 2) -> InterleavedModel:
    """One block, identity read-in; head h's q = k = (h + 1) x on the x coordinates, so q.k with a
    y token is 0 and, renormalised over the x keys, the query row is softmax((h + 1)^2 x.x' / sqrt(e)):
    exactly the row-normalised exp kernel with tau_h = sqrt(e) / (h + 1)^2."""
    model = InterleavedModel(n_layers=1, n_heads=n_heads, d_model=4)
    with torch.no_grad():
        model.read_in.weight.copy_(torch.eye(4, 3, dtype=torch.float64))
        model.read_in.bias.zero_()
        weight = torch.zeros(n_heads, 4, 4 // n_heads, dtype=torch.float64)
        for head in range(n_heads):
            weight[head, 0, 0] = weight[head, 1, 1] = head + 1
        model.blocks[0].attn.W_Q.copy_(weight)
        model.blocks[0].attn.W_K.copy_(weight)
    return model


@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
@pytest.mark.parametrize("block", ["query", "support"])
def test_exact_exp_kernel_head_in_the_interleaved_layout_recovers_its_temperature(fit, block):
    """Kernel alignment through the interleaved layout (x keys among y tokens, several sequences
    per prompt): the fitted tau is sqrt(2) / (h + 1)^2 and the operator distance ~0."""
    alignment = probes.kernel_alignment(exp_kernel_interleaved(), random_task(4, 5, 3, 2, seed=8), fit=fit, block=block)
    np.testing.assert_allclose(alignment.tau.numpy(), [[math.sqrt(2), math.sqrt(2) / 4]], rtol=1e-9)
    assert alignment.metrics["exp"]["operator_distance"].max() < 1e-10


def test_float32_model_lens_is_float64_and_float32_accurate():
    """A float32 own model given a float64 task: the lens comes back float64 and within float32
    rounding of the NumPy float64 forward of the same (float32) weights."""
    model, task = InterleavedModel(dtype=torch.float32), random_task(2, 3, 2, 2, seed=9)
    lens = probes.layer_predictions(model, task)
    assert lens.dtype == torch.float64
    np.testing.assert_allclose(lens.numpy(), numpy_interleaved(model, *task_arrays(task))[0], atol=1e-5)


def test_a_hook_the_forward_never_calls_is_named():
    """An attention hook that exists but that the forward skips: the error names it."""
    class SkipsPattern(InterleavedModel):
        def attention_hook_names(self):
            hooks = super().attention_hook_names()
            hooks[1] = dataclasses.replace(hooks[1], pattern="hook_embed_unused")
            return hooks

    model = SkipsPattern()
    model.hook_embed_unused = HookPoint()
    model.setup()
    with pytest.raises(ValueError, match=r"hook 'hook_embed_unused' did not fire"):
        probes.attention_kernels(model, random_task(1, 2, 1, 2))


# ---------------------------------------------------------------- implementation mistakes


class ReversedResidualNames(InterleavedModel):
    def residual_hook_names(self):
        return super().residual_hook_names()[::-1]


class ReversedAttentionNames(InterleavedModel):
    def attention_hook_names(self):
        return super().attention_hook_names()[::-1]


class HookFiresTwice(InterleavedModel):
    """Reuses its embedding HookPoint after the last block (as a weight-tied / looped model reuses
    one block's hooks): `hook_embed` fires twice per forward."""

    def forward(self, tokens):
        return self.readout(self.hook_embed(self.blocks_forward(tokens)))


class ReadoutWithoutFinalNorm(InterleavedModel):
    """readout forgets the final LayerNorm that forward applies."""

    def readout(self, resid):
        return self.unembed(resid)[..., 0]

    def forward(self, tokens):
        return self.unembed(self.ln_final(self.blocks_forward(tokens)))[..., 0]


def test_forward_with_a_trailing_output_dimension_is_named_and_layers_before_the_last_are_not_checked():
    """forward returning `[batch', seq, 1]` (a Linear's output, unsqueezed) breaks the protocol's
    `[batch', seq]`: the lens, whose last layer is compared with forward, names forward. Probing
    only earlier layers compares nothing, so it still equals the NumPy forward there."""

    class ForwardKeepsDim(InterleavedModel):
        def forward(self, tokens):
            return super().forward(tokens)[..., None]

    model, task = ForwardKeepsDim(), random_task(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"forward must give one output per position"):
        probes.layer_predictions(model, task)
    np.testing.assert_allclose(probes.layer_predictions(model, task, layers=[0, 1]).numpy(),
                               numpy_interleaved(model, *task_arrays(task))[0][:, :2], atol=1e-12)


def test_a_model_whose_outputs_are_nan_reads_nan_rather_than_a_readout_mismatch():
    """NaN weights (a diverged training run): forward and readout both give NaN, which agree; the
    lens returns the NaNs for the user to see instead of blaming readout."""
    model, task = InterleavedModel(), random_task(2, 3, 2, 2)
    with torch.no_grad():
        model.unembed.weight.fill_(float("nan"))
    assert torch.isnan(probes.layer_predictions(model, task)[:, -1]).all()


def test_residual_hook_names_out_of_forward_order_are_refused():
    """Hooks fire in forward order; names listed in another order make layer l's lens another
    layer's (verified: today the result equals the NumPy lens reversed). Expected: a ValueError
    naming residual_hook_names."""
    with pytest.raises(ValueError, match="residual_hook_names"):
        probes.layer_predictions(ReversedResidualNames(), random_task(2, 3, 2, 2))


def test_attention_hook_names_out_of_forward_order_are_refused():
    """The same for attention_hook_names: expected a ValueError naming it."""
    with pytest.raises(ValueError, match="attention_hook_names"):
        probes.attention_kernels(ReversedAttentionNames(), random_task(2, 3, 2, 2))


def test_a_hook_that_fires_twice_is_refused():
    """`hook_embed` fires at the embeddings and again after the last block: the layer-0 lens is
    today the last block's (0.37 off the NumPy embedding lens). Expected: a ValueError saying the
    hook fired more than once."""
    with pytest.raises(ValueError, match="hook_embed"):
        probes.layer_predictions(HookFiresTwice(), random_task(2, 3, 2, 2))


def test_readout_that_disagrees_with_the_forward_is_refused():
    """`layer_predictions` documents that its last index equals `model.predict(task)`; a readout
    without the final LayerNorm breaks that (0.2 apart here). The forward the probes already run
    returns the model's own outputs, so the lens checks its last layer against them: a ValueError
    naming readout."""
    model, task = ReadoutWithoutFinalNorm(), random_task(3, 4, 2, 2, seed=1)
    np.testing.assert_allclose(model.predict(task).detach().numpy(), numpy_interleaved(model, *task_arrays(task))[0][:, -1], atol=1e-12)
    with pytest.raises(ValueError, match="readout"):
        probes.layer_predictions(model, task)


def with_prompt(**changes):
    """An InterleavedModel whose encode returns its prompt with `changes` (name -> f(prompt))."""

    class Changed(InterleavedModel):
        def encode(self, task):
            prompt = super().encode(task)
            return dataclasses.replace(prompt, **{name: change(prompt) for name, change in changes.items()})

    return Changed()


BAD_PROMPTS = {
    "query position past the end": dict(query_positions=lambda p: p.query_positions + 1),
    "query positions as a list": dict(query_positions=lambda p: p.query_positions.tolist()),
    "query positions as floats": dict(query_positions=lambda p: p.query_positions.double()),
    "support positions past the end": dict(support_positions=lambda p: p.support_positions + 10),
    "float64 tokens for a float32 model": dict(tokens=lambda p: p.tokens.double()),
    "numpy tokens": dict(tokens=lambda p: p.tokens.numpy()),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_malformed_encoded_prompt_is_a_one_line_error_naming_encode(case):
    """Today: 'index 9 is out of bounds for dimension 0 with size 9', "'list' object has no
    attribute 'numel'", 'tensors used as indices must be long...', 'index out of range in self',
    'mat1 and mat2 must have the same dtype', 'linear(): argument input must be Tensor'. Expected:
    one ValueError naming encode (the check `_prompt_mismatch` already does for the counts)."""
    model = with_prompt(**BAD_PROMPTS[case])
    if "float32" in case:
        model.to(torch.float32)
    with pytest.raises(ValueError, match=r"encode") as error:
        probes.attach(model).layer_predictions(random_task(2, 3, 2, 2)) if "support" not in case else probes.attention_kernels(model, random_task(2, 3, 2, 2))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("entry", ["string", "dict", "none"])
def test_attention_hook_entries_of_the_wrong_type_are_named(entry):
    """A researcher returning hook-name strings or dicts (or None) per block: expected a ValueError
    naming attention_hook_names and AttentionHooks."""

    class WrongEntries(InterleavedModel):
        def attention_hook_names(self):
            hooks = super().attention_hook_names()
            return [{"string": h.pattern, "dict": dataclasses.asdict(h), "none": None}[entry] for h in hooks]

    with pytest.raises(ValueError, match="AttentionHooks"):
        probes.attach(WrongEntries())


def test_model_without_attention_hooks_gets_the_lens_and_a_clear_error_only_for_attention_probes():
    """attention_hook_names() == [] (e.g. a model whose mixing is not attention): the read-out lens
    and sensitivities still equal the NumPy forward and its central differences, and diagnose runs
    (its kernel alignment skipped with a note); only the attention probes refuse, naming
    attention_hook_names."""

    class NoAttentionHooks(InterleavedModel):
        def attention_hook_names(self):
            return []

    model, task = NoAttentionHooks(), random_task(2, 3, 2, 2)
    xs, ys, xq = task_arrays(task)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), numpy_interleaved(model, xs, ys, xq)[0], atol=1e-12)
    step = 1e-6 * np.eye(task.n_support)[:, None, :]  # [label, 1, n]: shift one support label
    central = [(numpy_interleaved(model, xs, ys + s, xq)[0] - numpy_interleaved(model, xs, ys - s, xq)[0]) / 2e-6 for s in step]
    np.testing.assert_allclose(probes.label_sensitivities(model, task).numpy(), np.stack(central, -1), atol=1e-8)
    with pytest.raises(ValueError, match="attention_hook_names"):
        probes.attention_kernels(model, task)
    result = probes.diagnose(model, task, kernel="gaussian", lam=0.1, algorithms=("cg", "gd"), n_steps=2, bootstrap=0, progress=False)
    diagnosis = result["tasks"]
    assert diagnosis.kernel_alignment is None
    assert any("kernel alignment skipped" in note and "attention_hook_names" in note for note in diagnosis.notes)
    np.testing.assert_allclose(diagnosis.layer_predictions, numpy_interleaved(model, *task_arrays(task))[0], atol=1e-12)


def test_inverted_mask_is_returned_as_stated_by_attention_kernels_and_refused_by_kernel_alignment():
    """`allowed_attention` returning True where attention is BLOCKED (torch's attn_mask
    convention): `attention_kernels` returns the blocks with the mask as the model states it (by
    design: the raw reading, the contradiction visible as weight on "blocked" keys), and
    `kernel_alignment`, which normalises rows over the allowed keys, refuses it in one line naming
    allowed_attention."""

    class Inverted(InterleavedModel):
        def allowed_attention(self, prompt):
            return ~super().allowed_attention(prompt)

    model, task = Inverted(), random_task(2, 3, 2, 2)
    kernels = probes.attention_kernels(model, task)
    assert (kernels.query * ~kernels.query_allowed).max() > 0.1
    with pytest.raises(ValueError, match="allowed_attention") as error:
        probes.kernel_alignment(model, task)
    assert "\n" not in str(error.value)


def test_missing_protocol_method_names_the_icl_model_protocol():
    """An own model lacking `predict` (which no probe calls): the error should point the
    researcher at the protocol to implement (mi_krr.models.ICLModel), not only at mi-krr's own
    model classes."""

    class NoPredict(InterleavedModel):
        predict = None

    with pytest.raises(ValueError, match=r"predict.*mi_krr\.models\.ICLModel|mi_krr\.models\.ICLModel.*predict"):
        probes.attach(NoPredict())
