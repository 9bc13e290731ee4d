"""Multi-head self-attention with TransformerLens hook names, for softmax, linear and ReLU
attention over a given mask."""

from __future__ import annotations

import math

import einops
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mi_krr.models.config import ICLTransformerConfig


class Attention(nn.Module):
    """Self-attention with per-head weights `W_Q`, `W_K`, `W_V` `[head, d_model, d_head]` and
    `W_O` `[head, d_head, d_model]` (TransformerLens' parametrisation).

    Hooks: `hook_q`/`hook_k`/`hook_v`/`hook_z` `[batch, pos, head, d_head]`; `hook_attn_scores`
    `[batch, head, query_pos, key_pos]`, the scores before normalisation (softmax: q.k / sqrt(d_head)
    with blocked entries at -inf; linear/relu: raw q.k with blocked entries at 0); `hook_pattern`
    the weights actually applied to the values (softmax of the scores, scores / n_keys, or
    relu(scores) / n_keys).
    """

    def __init__(self, cfg: ICLTransformerConfig):
        super().__init__()
        self.cfg = cfg
        heads, d_model, d_head = cfg.n_heads, cfg.d_model, cfg.d_head
        assert d_head is not None  # the config's __post_init__ resolves the default
        self.W_Q = nn.Parameter(torch.randn(heads, d_model, d_head) / math.sqrt(d_model))
        self.W_K = nn.Parameter(torch.randn(heads, d_model, d_head) / math.sqrt(d_model))
        self.W_V = nn.Parameter(torch.randn(heads, d_model, d_head) / math.sqrt(d_model))
        self.W_O = nn.Parameter(torch.randn(heads, d_head, d_model) / math.sqrt(heads * d_head))
        self.b_Q = nn.Parameter(torch.zeros(heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return einops.einsum(x, weight, "batch pos d_model, head d_model d_head -> batch pos head d_head") + bias

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x `[batch, pos, d_model]`, allowed `[query_pos, key_pos]` bool -> `[batch, pos, d_model]`."""
        q = self.hook_q(self._project(x, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(x, self.W_K, self.b_K))
        v = self.hook_v(self._project(x, self.W_V, self.b_V))
        scores = einops.einsum(q, k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos")
        if self.cfg.attention == "softmax":
            assert self.cfg.d_head is not None  # the config's __post_init__ resolves the default
            scores = self.hook_attn_scores((scores / math.sqrt(self.cfg.d_head)).masked_fill(~allowed, float("-inf")))
            pattern = torch.softmax(scores, dim=-1)
        else:
            scores = self.hook_attn_scores(scores.masked_fill(~allowed, 0.0))
            n_keys = allowed.sum(dim=-1, keepdim=True).to(scores.dtype)  # [query_pos, 1]
            weights = scores if self.cfg.attention == "linear" else torch.relu(scores)
            pattern = weights / n_keys
        pattern = self.hook_pattern(pattern)
        z = self.hook_z(einops.einsum(pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head"))
        return einops.einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + self.b_O
