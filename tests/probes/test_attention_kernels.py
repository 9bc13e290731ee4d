"""Attention-induced similarity blocks, gathered inside hooks, against the full attention
pattern / scores of run_with_cache read at hand-picked positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mi_krr.construct import richardson_transformer
from mi_krr.models import AttentionHooks, BridgeICLModel, ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from probes import attention_kernels
from prompts import random_task

D, N, M = 2, 5, 3


def make_task(batch: int = 2, seed: int = 0) -> ICLTask:
    return random_task(batch, N, M, D, seed)


def make_model(layout: str, cls: type = ICLTransformer, causal: bool | None = None) -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(
        n_dims=D, d_model=12, n_layers=2, n_heads=3, d_head=4, layout=layout, causal=causal, max_seq_len=32, dtype="float64"
    )
    return cls(cfg).eval()


class ModelWithoutScoreHook(ICLTransformer):
    """Announces no pre-softmax score hook (as a native bridge does): scores must be rebuilt."""

    def attention_hook_names(self) -> list[AttentionHooks]:
        return [AttentionHooks(pattern=h.pattern, scores=None, q=h.q, k=h.k) for h in super().attention_hook_names()]


def cached_blocks(model: ICLTransformer, task: ICLTask, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(support [B, L, H, n, n], query [B, L, H, m, n]) read from a full run_with_cache."""
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    supports, queries = [], []
    for layer in range(model.cfg.n_layers):
        full = cache[f"blocks.{layer}.attn.{hook}"]  # [B * groups, H, seq, seq]
        if model.cfg.layout == "concat":
            supports.append(full[:, :, :N, :N])
            queries.append(full[:, :, N : N + M, :N])
        else:  # x tokens at even positions; query j of prompt b is the last token of sequence b * m + j
            x_pos = torch.arange(0, 2 * N, 2)
            supports.append(full[0::M][:, :, x_pos][..., x_pos])
            queries.append(full[:, :, 2 * N, x_pos].reshape(task.batch_size, M, -1, N).transpose(1, 2))
    return torch.stack(supports, 1).detach(), torch.stack(queries, 1).detach()


@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("source, hook", [("pattern", "hook_pattern"), ("scores", "hook_attn_scores")])
def test_attention_kernels_equal_cached_attention_at_support_and_query_positions(layout, source, hook):
    model, task = make_model(layout), make_task()
    kernels = attention_kernels(model, task, source=source)
    support, query = cached_blocks(model, task, hook)
    assert kernels.support.shape == (2, 2, 3, N, N) and kernels.query.shape == (2, 2, 3, M, N)
    torch.testing.assert_close(kernels.support, support, rtol=1e-12, atol=0)
    torch.testing.assert_close(kernels.query, query, rtol=1e-12, atol=0)


def test_interleaved_support_block_is_causal():
    kernels = attention_kernels(make_model("interleaved"), make_task())
    upper = torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)
    assert (kernels.support[..., upper] == 0).all() and (kernels.support[..., ~upper] > 0).all()


@pytest.mark.parametrize("layout, causal", [("concat", False), ("concat", True), ("interleaved", True)])
def test_scores_rebuilt_from_q_and_k_when_the_model_has_no_score_hook(layout, causal):
    """Rebuilt scores equal the cached hook_attn_scores of the same model, -inf included where its
    mask blocks a support key (the causal support blocks' upper triangle)."""
    plain, rebuilt = make_model(layout, causal=causal), make_model(layout, ModelWithoutScoreHook, causal=causal)
    task = make_task()
    kernels = attention_kernels(rebuilt, task, source="scores")
    support, query = cached_blocks(plain, task, "hook_attn_scores")
    assert torch.isneginf(support).any() == causal
    torch.testing.assert_close(kernels.support, support, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernels.query, query, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout, causal", [("concat", False), ("concat", True), ("interleaved", True)])
def test_attention_kernels_carry_the_models_mask_on_each_block(layout, causal):
    """support_allowed [n, n] is lower-triangular under a causal mask and all True otherwise;
    query_allowed [m, n] is all True (a query sees every support key in both layouts)."""
    kernels = attention_kernels(make_model(layout, causal=causal), make_task())
    expected = np.tril(np.ones((N, N), dtype=bool)) if causal else np.ones((N, N), dtype=bool)
    np.testing.assert_array_equal(kernels.support_allowed.numpy(), expected)
    np.testing.assert_array_equal(kernels.query_allowed.numpy(), np.ones((M, N), dtype=bool))


def test_a_construction_has_no_model_wide_mask_so_its_kernels_carry_none():
    """Constructions mask per head (token types): allowed_attention gives None, and so do the blocks."""
    kernels = attention_kernels(richardson_transformer(n_steps=1, lam=0.5, bandwidth=0.9, step=0.1, dim=D), make_task())
    assert kernels.support_allowed is None and kernels.query_allowed is None


def test_bridge_scores_rebuilt_from_q_and_k_are_the_log_pattern_up_to_a_row_constant():
    """A native bridge has no pre-softmax score hook; softmax makes log pattern_ij - s_ij the
    same for every key j of a row."""
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=D, d_model=8, n_layers=2, n_heads=2, layout="interleaved", max_seq_len=32, dtype="float64")
    model, task = BridgeICLModel(cfg).eval(), make_task()
    pattern, scores = attention_kernels(model, task), attention_kernels(model, task, source="scores")
    offset = pattern.query.log() - scores.query
    torch.testing.assert_close(offset, offset[..., :1].expand_as(offset), rtol=0, atol=1e-12)
    assert scores.query.std() > 0.01


def test_attention_hooks_retain_only_the_blocks(retained_reductions):
    """What outlives the forward pass is, per layer, the support block [batch, head, n, n] and the
    query block [batch, head, m, n] in their own storage: never the [batch', head, seq, seq]
    pattern, nor a view of it."""
    model, task = make_model("interleaved"), make_task()
    attention_kernels(model, task)
    assert len(retained_reductions) == model.cfg.n_layers
    for blocks in retained_reductions:
        support, query = blocks["support"], blocks["query"]
        assert support.shape == (2, 3, N, N) and query.shape == (2, 3, M, N)
        for value in (support, query):
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_unknown_source_raises():
    with pytest.raises(ValueError, match="source must be one of"):
        attention_kernels(make_model("concat"), make_task(), source="values")
