"""The TransformerLens hook names probes read, shared by every model class (own, bridge, Garg)."""

from __future__ import annotations

from mi_krr.models.adapter import AttentionHooks


def residual_hook_names(n_layers: int) -> list[str]:
    """`blocks.0.hook_resid_pre` (embeddings), then `blocks.{l}.hook_resid_post` for l < n_layers."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


def attention_hook_names(n_layers: int, with_scores: bool) -> list[AttentionHooks]:
    """One `AttentionHooks` per block; `scores` is None where the model's `hook_attn_scores`
    does not carry pre-normalisation scores (native TransformerBridge blocks)."""
    return [
        AttentionHooks(
            pattern=f"blocks.{layer}.attn.hook_pattern",
            scores=f"blocks.{layer}.attn.hook_attn_scores" if with_scores else None,
            q=f"blocks.{layer}.attn.hook_q",
            k=f"blocks.{layer}.attn.hook_k",
        )
        for layer in range(n_layers)
    ]
