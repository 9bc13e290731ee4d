"""The attention module of the test files' own models (a researcher's model on TransformerLens's
`HookedRootModule`, not an mi-krr class), with hooks `hook_q`, `hook_k` `[batch, pos, head, e]`,
`hook_attn_scores` and `hook_pattern` `[batch, head, query_pos, key_pos]`."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint


class OwnAttention(nn.Module):
    """Multi-head attention without biases. softmax: masked scores -inf, pattern = softmax.
    linear: masked scores 0, pattern = scores / number of visible keys (no normalisation)."""

    def __init__(self, d_model: int, n_heads: int, kind: str = "softmax"):
        super().__init__()
        self.e, self.kind = d_model // n_heads, kind
        shape = (n_heads, d_model, self.e)
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.randn(shape) / math.sqrt(d_model)) for _ in range(3))
        self.W_O = nn.Parameter(torch.randn(n_heads, self.e, d_model) / math.sqrt(d_model))
        self.hook_q, self.hook_k, self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x `[batch, pos, d_model]`, allowed bool `[pos, pos]` (True: may attend) -> `[batch, pos, d_model]`."""
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q))
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K))
        v = torch.einsum("bpd,hde->bphe", x, self.W_V)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.e)
        if self.kind == "softmax":
            pattern = self.hook_pattern(self.hook_attn_scores(scores.masked_fill(~allowed, -math.inf)).softmax(-1))
        else:
            pattern = self.hook_pattern(self.hook_attn_scores(scores.masked_fill(~allowed, 0.0)) / allowed.sum(-1, keepdim=True))
        return torch.einsum("bqhe,hed->bqd", torch.einsum("bhqk,bkhe->bqhe", pattern, v), self.W_O)
