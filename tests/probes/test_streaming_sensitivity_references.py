"""Streamed hook reductions and label sensitivities against independent references: activations
read from a full `run_with_cache` and gathered / normed / read out in NumPy, central finite
differences in float64, and closed-form derivatives of the linear-in-y solvers (matrix
polynomials built in NumPy from their defining recursions or their spectral closed forms)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mi_krr.kernels import gaussian_kernel
from mi_krr.models import AttentionHooks, ICLTransformer, ICLTransformerConfig
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.models.masks import allowed_attention
from mi_krr.solvers import ALGORITHMS, cg
from mi_krr.tasks import ICLTask
from probes import attention_kernels, label_sensitivities, solver_sensitivities, stream_probes
from probes.sensitivity import LINEAR_IN_Y, batch_jacobian
from probes.streaming import query_readouts, query_residuals, resolve_layers, run_with_reductions
from brute_force import lens_finite_differences, solver_finite_differences
from grouped_models import GroupedQueries
from prompts import random_task

D, N, M = 2, 5, 4


def make_config(layout: str = "concat", **overrides) -> ICLTransformerConfig:
    settings = dict(n_dims=D, d_model=12, n_layers=2, n_heads=3, d_head=4, layout=layout, max_seq_len=32, dtype="float64")
    settings.update(overrides)
    return ICLTransformerConfig(**settings)


def make_model(layout: str = "concat", cls: type = ICLTransformer, **overrides) -> ICLTransformer:
    torch.manual_seed(0)
    return cls(make_config(layout, **overrides)).eval()


def make_task(batch: int = 2, seed: int = 0) -> ICLTask:
    return random_task(batch, N, M, D, seed)


class WithoutScoreHook(ICLTransformer):
    """No pre-softmax score hook: `source='scores'` rebuilds q . k / sqrt(d_head) from hook_q / hook_k."""

    def attention_hook_names(self) -> list[AttentionHooks]:
        return [AttentionHooks(pattern=h.pattern, scores=None, q=h.q, k=h.k) for h in super().attention_hook_names()]


class SkipsItsLastBlock(ICLTransformer):
    """Concat model whose forward never runs its last block: that block's hooks never fire."""

    def forward(self, tokens: torch.Tensor, n_support: int | None = None) -> torch.Tensor:
        n_support = self._resolve_n_support(tokens, n_support)
        allowed = allowed_attention("concat", tokens.shape[1], n_support, self.cfg.causal, device=tokens.device)
        resid = self.hook_embed(self.read_in(tokens))
        for block in self.blocks[:-1]:
            resid = block(resid, allowed)
        return self.readout(resid)


class DetachingEncode(ICLTransformer):
    """An encode() that cuts the labels out of the autograd graph."""

    def encode(self, task: ICLTask) -> EncodedPrompt:
        return super().encode(dataclasses.replace(task, y_support=task.y_support.detach()))


def residual_name(layer: int) -> str:
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def cached_concat(model: ICLTransformer, task: ICLTask) -> dict:
    """Full run_with_cache of an ungrouped concat model, as NumPy arrays."""
    _, cache = model.run_with_cache(model.encode(task).tokens)
    return {name: value.detach().numpy() for name, value in cache.items()}


def numpy_readout(model: ICLTransformer, resid: np.ndarray) -> np.ndarray:
    """LayerNorm (eps 1e-5) with ln_final's affine, then the read-out Linear, in NumPy."""
    mean = resid.mean(-1, keepdims=True)
    var = ((resid - mean) ** 2).mean(-1, keepdims=True)
    normed = (resid - mean) / np.sqrt(var + 1e-5) * model.ln_final.weight.detach().numpy() + model.ln_final.bias.detach().numpy()
    return normed @ model.read_out.weight.detach().numpy()[0] + model.read_out.bias.detach().numpy()[0]


def concat_readout_lens(model: ICLTransformer, task: ICLTask, layers: list[int]) -> np.ndarray:
    """[batch, len(layers), m] read from the cache at concat query positions n..n+m-1."""
    cache = cached_concat(model, task)
    return np.stack([numpy_readout(model, cache[residual_name(layer)][:, N : N + M]) for layer in layers], axis=1)


# --- streamed reductions ----------------------------------------------------------------------------


def test_grouped_prompts_fold_query_blocks_and_readouts_back_into_task_query_order():
    """A layout with 2 groups of 2 queries per prompt: the streamed read-outs, the query block and the
    (group-averaged) support block equal the ungrouped model's cached activations, read out in NumPy
    and sliced at positions n..n+m-1 / 0..n-1, in the task's query order; one stream_probes pass keeps
    read-outs (in the listed layer order) and both blocks."""
    grouped, plain, task = make_model(cls=GroupedQueries), make_model(), make_task(batch=3)
    prompt = grouped.encode(task)
    assert prompt.groups == 2 and prompt.query_positions.numel() == 2
    streamed = stream_probes(grouped, prompt, layers=[2, 0, 1], blocks=("query", "support"))
    np.testing.assert_allclose(streamed.readouts.numpy(), concat_readout_lens(plain, task, [2, 0, 1]), rtol=1e-10, atol=1e-12)
    cache = cached_concat(plain, task)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        np.testing.assert_allclose(streamed.query[:, layer].numpy(), pattern[:, :, N : N + M, :N], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(streamed.support[:, layer].numpy(), pattern[:, :, :N, :N], rtol=1e-10, atol=1e-13)
    query_only = stream_probes(grouped, prompt, blocks=("query",))
    assert query_only.readouts is None and query_only.support is None
    torch.testing.assert_close(query_only.query, streamed.query, rtol=0, atol=0)


def test_query_readouts_and_residuals_equal_the_cache_at_the_query_positions():
    """query_readouts `[B, L', m]` and query_residuals `[B, L', m, d_model]` (layers in the listed order)
    equal run_with_cache's residual streams at n..n+m-1, read out in NumPy for the former."""
    model, task = make_model(), make_task()
    prompt, cache, layers = model.encode(task), cached_concat(model, task), [2, 0]
    residuals = query_residuals(model, prompt, layers)
    assert residuals.shape == (2, 2, M, 12) and not residuals.requires_grad
    for index, layer in enumerate(layers):
        np.testing.assert_allclose(residuals[:, index].numpy(), cache[residual_name(layer)][:, N : N + M], rtol=1e-12, atol=0)
    readouts = query_readouts(model, prompt, layers)
    np.testing.assert_allclose(readouts.numpy(), concat_readout_lens(model, task, layers), rtol=1e-10, atol=1e-12)
    assert query_readouts(model, prompt, layers, grad=True).requires_grad and not readouts.requires_grad


def test_rebuilt_scores_keep_only_q_rows_and_support_keys_in_their_own_storage(retained_reductions):
    """Without a score hook, source='scores' keeps per layer {block: q rows} and k at the support keys,
    each in its own storage (concat: consecutive positions, where a slice is a view of the whole
    activation), and the scores equal q . k / sqrt(d_head) built in NumPy from the cached q and k."""
    model, task = make_model(cls=WithoutScoreHook), make_task()
    kernels = attention_kernels(model, task, source="scores")
    assert len(retained_reductions) == 2 * model.cfg.n_layers
    for q_rows, k in zip(retained_reductions[0::2], retained_reductions[1::2]):
        assert set(q_rows) == {"support", "query"} and k.shape == (2, N, 3, 4)
        for value in (q_rows["support"], q_rows["query"], k):
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
    cache = cached_concat(model, task)
    for layer in range(2):
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]  # [B, pos, head, e]
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / 2.0
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), scores[:, :, N : N + M, :N], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), scores[:, :, :N, :N], rtol=1e-10, atol=1e-12)


def test_run_with_reductions_returns_in_listed_order_and_names_the_first_silent_hook():
    """Results come back in the order the reductions are listed (not the order the hooks fire);
    grad=True keeps the graph, grad=False does not; a hook that never fires is named."""
    model, task = make_model(), make_task()
    prompt, cache = model.encode(task), cached_concat(model, task)
    names = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"]
    results = run_with_reductions(model, prompt.tokens, [(name, lambda a: a.sum()) for name in names])
    np.testing.assert_allclose([float(r) for r in results], [cache[name].sum() for name in names], rtol=1e-12)
    assert not any(r.requires_grad for r in results)
    assert all(r.requires_grad for r in run_with_reductions(model, prompt.tokens, [(names[0], lambda a: a.sum())], grad=True))
    skipping = make_model(cls=SkipsItsLastBlock)
    tokens = skipping.encode(task).tokens
    silent = [("blocks.0.hook_resid_post", torch.clone), ("blocks.1.attn.hook_pattern", torch.clone), ("blocks.1.hook_resid_post", torch.clone)]
    with pytest.raises(ValueError, match=r"hook 'blocks\.1\.attn\.hook_pattern' did not fire"):
        run_with_reductions(skipping, tokens, silent)


def test_stream_probes_rejects_an_unknown_block_an_unknown_source_and_an_empty_request():
    model, task = make_model(), make_task()
    prompt = model.encode(task)
    with pytest.raises(ValueError, match="blocks entry must be one of 'support', 'query'"):
        stream_probes(model, prompt, blocks=("keys",))
    with pytest.raises(ValueError, match="source must be one of 'pattern', 'scores'"):
        stream_probes(model, prompt, blocks=("query",), source="values")
    with pytest.raises(ValueError, match="needs layers .* or blocks"):
        stream_probes(model, prompt)


class MaskOfItsSupport(ICLTransformer):
    """An allowed_attention of the wrong shape: [n, n] instead of [seq, seq]."""

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor:
        return torch.ones(prompt.n_support, prompt.n_support, dtype=torch.bool)


def test_stream_probes_names_a_models_allowed_attention_of_the_wrong_shape():
    """A model's allowed_attention must be bool [seq, seq]: [n, n] is refused with a one-line
    ValueError naming the method and the expected shape (only when attention blocks are read)."""
    model, task = make_model(cls=MaskOfItsSupport), make_task()
    prompt = model.encode(task)
    with pytest.raises(ValueError, match=rf"MaskOfItsSupport.allowed_attention\(prompt\) must be a bool tensor \[{N + M}, {N + M}\]"):
        stream_probes(model, prompt, blocks=("query",))
    assert stream_probes(model, prompt, layers=[1]).readouts.shape == (2, 1, M)


def test_resolve_layers_normalises_every_accepted_form_to_python_ints():
    """None -> 0..L; an int, a list, a NumPy array and a tensor -> the same indices as Python ints."""
    model = make_model()
    assert resolve_layers(model, None) == [0, 1, 2]
    for layers, expected in ((1, [1]), ([2, np.int64(0)], [2, 0]), (np.array([1, 2]), [1, 2]), (torch.tensor([0, 2]), [0, 2]), (torch.tensor(2), [2])):
        resolved = resolve_layers(model, layers)
        assert resolved == expected and all(type(layer) is int for layer in resolved), layers
    for bad, message in (([], "at least one"), ([3], "out of range"), ([-1], "layers entry"), ([1.5], "layers entry")):
        with pytest.raises(ValueError, match=message):
            resolve_layers(model, bad)


# --- label sensitivities of the model ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_label_sensitivities_are_chunk_size_invariant_and_follow_the_listed_layers(layout):
    """Chunk sizes 1, 3 and 1000 (rows per backward pass) all equal central finite differences, for the
    layers [2, 0, 1] in that order and for one int layer."""
    model, task = make_model(layout, n_layers=2), make_task()
    expected = lens_finite_differences(model, task, [2, 0, 1], eps=1e-5)
    assert expected[:, 0].abs().max() > 1e-3
    for chunk_size in (1, 3, 1000):
        torch.testing.assert_close(label_sensitivities(model, task, layers=[2, 0, 1], chunk_size=chunk_size), expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(label_sensitivities(model, task, layers=1), expected[:, 2:3], rtol=1e-6, atol=1e-8)


def test_label_sensitivities_of_a_float32_model_are_returned_in_float64():
    """A float32 model on a float32 task (so autograd's gradients are float32): the sensitivities come
    back as float64 and agree with those of the model's float64 copy."""
    model32 = make_model(dtype="float32")
    model64 = make_model(dtype="float32").double()
    task = random_task(2, N, M, D, seed=0, dtype=torch.float32)
    sens32 = label_sensitivities(model32, task, layers=[2])
    assert sens32.dtype == torch.float64
    torch.testing.assert_close(sens32, label_sensitivities(model64, task, layers=[2]), rtol=1e-3, atol=1e-5)


def test_labels_cut_out_of_the_graph_by_a_frozen_models_encode_raise():
    """With frozen parameters nothing in the read-outs needs a gradient: the encode() that detaches
    the labels is named instead of a torch autograd error."""
    model = make_model(cls=DetachingEncode).requires_grad_(False)
    with pytest.raises(ValueError, match="do not depend differentiably on task.y_support"):
        label_sensitivities(model, make_task())


def test_labels_cut_out_of_the_graph_raise_even_when_the_parameters_require_grad():
    """An encode() that detaches the labels is refused by name (it once gave all-zero sensitivities:
    the parameters alone made the predictions require grad)."""
    model = make_model(cls=DetachingEncode)
    with pytest.raises(ValueError, match="do not depend differentiably on task.y_support"):
        label_sensitivities(model, make_task())


def test_label_sensitivities_under_no_grad_equal_those_outside():
    """A caller's torch.no_grad() does not change the result (it once raised, blaming encode())."""
    model, task = make_model(), make_task()
    expected = label_sensitivities(model, task, layers=[2])
    with torch.no_grad():
        torch.testing.assert_close(label_sensitivities(model, task, layers=[2]), expected, rtol=1e-12, atol=0)


def test_batch_jacobian_matches_the_analytic_per_sample_jacobian_at_every_chunk_size():
    """outputs[b] = A sin(x[b]) -> Jacobian A diag(cos x[b]) (NumPy), for chunk sizes 1..k+2; an input the
    outputs do not use has a zero Jacobian."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    outputs = torch.sin(x) @ A.T  # [4, 5]
    expected = A.numpy()[None] * np.cos(x.detach().numpy())[:, None, :]
    for chunk_size in range(1, 8):
        np.testing.assert_allclose(batch_jacobian(outputs, x, chunk_size).numpy(), expected, rtol=1e-13, atol=1e-15)
    unused = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zero = batch_jacobian(outputs, unused, chunk_size=2)
    assert zero.shape == (4, 5, 6) and zero.abs().max() == 0


# --- solver sensitivities: closed forms -------------------------------------------------------------


def kernel_system(batch: int = 3, seed: int = 0, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, D, generator=g, dtype=torch.float64)
    x_query = torch.randn(batch, m, D, generator=g, dtype=torch.float64)
    y = torch.randn(batch, N, generator=g, dtype=torch.float64)
    return gaussian_kernel(x), gaussian_kernel(x_query, x), y


def gd_closed_form(K: np.ndarray, K_query: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """GD step map S_t = sum_{s<t} (I - w A)^s w, w = 2 / (mu_min + mu_max); returns K_q S_t [T+1, m, n]."""
    A = K + lam * np.eye(len(K))
    mu = np.linalg.eigvalsh(A)
    w = 2.0 / (mu[0] + mu[-1])
    S, out = np.zeros_like(A), [np.zeros((len(K_query), len(K)))]
    for _ in range(steps):
        S = S + w * (np.eye(len(K)) - A @ S)
        out.append(K_query @ S)
    return np.stack(out)


def heavy_ball_closed_form(K: np.ndarray, K_query: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """S_{t+1} = S_t + w (I - A S_t) + beta (S_t - S_{t-1}), S_{-1} = S_0 = 0, with Polyak's
    w = 4 / (sqrt(mu_max) + sqrt(mu_min))^2, beta = ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2."""
    A = K + lam * np.eye(len(K))
    mu = np.linalg.eigvalsh(A)
    lo, hi = np.sqrt(mu[0]), np.sqrt(mu[-1])
    w, beta = 4.0 / (hi + lo) ** 2, ((hi - lo) / (hi + lo)) ** 2
    previous, S, out = np.zeros_like(A), np.zeros_like(A), [np.zeros((len(K_query), len(K)))]
    for _ in range(steps):
        previous, S = S, S + w * (np.eye(len(K)) - A @ S) + beta * (S - previous)
        out.append(K_query @ S)
    return np.stack(out)


def chebyshev_closed_form(K: np.ndarray, K_query: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """alpha_t = (I - T_t((c - A) / h) / T_t(c / h)) A^-1 y on [mu_min, mu_max] of A (spectral form)."""
    A = K + lam * np.eye(len(K))
    mu, V = np.linalg.eigh(A)
    c, h = (mu[-1] + mu[0]) / 2, (mu[-1] - mu[0]) / 2
    out = []
    for t in range(steps + 1):
        coefficients = np.zeros(t + 1)
        coefficients[t] = 1.0
        ratio = np.polynomial.chebyshev.chebval((c - mu) / h, coefficients) / np.polynomial.chebyshev.chebval(c / h, coefficients)
        out.append(K_query @ (V * ((1 - ratio) / mu)) @ V.T)
    return np.stack(out)


def newton_closed_form(K: np.ndarray, K_query: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """alpha_t = M_{t-1} y, M_s = (I - (I - c A^2)^(2^s)) A^-1, c = 2 / (mu_max^2 + mu_min^2)."""
    A = K + lam * np.eye(len(K))
    mu, V = np.linalg.eigh(A)
    scale = 2.0 / (mu[-1] ** 2 + mu[0] ** 2)
    out = [np.zeros((len(K_query), len(K)))]
    for s in range(steps):
        out.append(K_query @ (V * ((1 - (1 - scale * mu**2) ** (2**s)) / mu)) @ V.T)
    return np.stack(out)


CLOSED_FORMS = {"gd": gd_closed_form, "heavy_ball": heavy_ball_closed_form, "chebyshev": chebyshev_closed_form, "newton": newton_closed_form}


@pytest.mark.parametrize("algorithm", sorted(CLOSED_FORMS))
def test_linear_solver_sensitivities_need_no_labels_and_equal_their_closed_forms(algorithm):
    """Registry solvers that are linear in y: no y needed; every prompt's [T+1, m, n] equals the NumPy
    closed form with its own spectrum-optimal parameters."""
    assert algorithm in LINEAR_IN_Y
    K, K_query, _ = kernel_system()
    lam, steps = 0.1, 5
    sensitivities = solver_sensitivities(algorithm, K, K_query, lam, steps)
    assert sensitivities.shape == (3, steps + 1, 3, N) and sensitivities.dtype == torch.float64
    for b in range(3):
        expected = CLOSED_FORMS[algorithm](K[b].numpy(), K_query[b].numpy(), lam, steps)
        np.testing.assert_allclose(sensitivities[b].numpy(), expected, rtol=1e-8, atol=1e-11)


def test_linear_in_y_false_on_a_registry_name_takes_the_autograd_path():
    """linear_in_y=False overrides the registry: y becomes required, and the sensitivity at y is the
    same closed form (GD is linear in y)."""
    K, K_query, y = kernel_system()
    with pytest.raises(ValueError, match="nonlinear in y"):
        solver_sensitivities("gd", K, K_query, 0.1, 4, linear_in_y=False)
    by_autograd = solver_sensitivities("gd", K, K_query, 0.1, 4, y=y, linear_in_y=False, chunk_size=1)
    for b in range(3):
        np.testing.assert_allclose(by_autograd[b].numpy(), gd_closed_form(K[b].numpy(), K_query[b].numpy(), 0.1, 4), rtol=1e-9, atol=1e-12)


def test_leading_dimensions_broadcast_between_K_and_K_query():
    """K [B, n, n] with one shared K_query [m, n], and one K [n, n] with K_query [B, m, n]: each prompt
    equals the GD closed form of its own pair."""
    K, K_query, _ = kernel_system()
    shared_query = solver_sensitivities("gd", K, K_query[0], 0.1, 3)
    shared_kernel = solver_sensitivities("gd", K[1], K_query, 0.1, 3)
    assert shared_query.shape == shared_kernel.shape == (3, 4, 3, N)
    for b in range(3):
        np.testing.assert_allclose(shared_query[b].numpy(), gd_closed_form(K[b].numpy(), K_query[0].numpy(), 0.1, 3), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(shared_kernel[b].numpy(), gd_closed_form(K[1].numpy(), K_query[b].numpy(), 0.1, 3), rtol=1e-9, atol=1e-12)


def test_cg_sensitivities_are_chunk_size_invariant_broadcast_a_shared_y_and_work_under_no_grad():
    """CG (nonlinear in y) by autograd: chunk sizes 1, 4 and 1000 and a call under torch.no_grad all
    equal central finite differences; one y [n] broadcasts to every prompt."""
    K, K_query, y = kernel_system()
    lam, steps = 0.1, 3
    expected = solver_finite_differences(cg, K, K_query, y, lam, steps)
    for chunk_size in (1, 4, 1000):
        torch.testing.assert_close(solver_sensitivities("cg", K, K_query, lam, steps, y=y, chunk_size=chunk_size), expected, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(solver_sensitivities("cg", K, K_query, lam, steps, y=y), expected, rtol=1e-6, atol=1e-8)
    shared = solver_sensitivities("cg", K, K_query, lam, steps, y=y[1])
    torch.testing.assert_close(shared, solver_finite_differences(cg, K, K_query, y[1].expand(3, N), lam, steps), rtol=1e-6, atol=1e-8)


def test_solver_sensitivities_reject_a_non_square_K_and_a_zero_chunk_size():
    K, K_query, y = kernel_system()
    with pytest.raises(ValueError, match=r"K must be \[\.\.\., n, n\]"):
        solver_sensitivities("gd", K[:, :, :4], K_query[..., :4], 0.1, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        solver_sensitivities("gd", K, K_query, 0.1, 3, chunk_size=0)
    with pytest.raises(ValueError, match="algorithm must be a name"):
        solver_sensitivities(3, K, K_query, 0.1, 3)
    assert set(LINEAR_IN_Y) <= set(ALGORITHMS)
