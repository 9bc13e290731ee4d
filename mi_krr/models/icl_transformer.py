"""`ICLTransformer`: our own hooked transformer over continuous tokens (a TransformerLens
`HookedRootModule`, so `run_with_cache`, `run_with_hooks` and `ActivationCache` work as usual)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mi_krr._validation import check_device
from mi_krr.models.adapter import AttentionHooks
from mi_krr.models.blocks import TransformerBlock, make_norm
from mi_krr.models.config import ICLTransformerConfig, check_config
from mi_krr.models.hook_names import attention_hook_names, residual_hook_names
from mi_krr.models.masks import allowed_attention
from mi_krr.models.prompting import PromptedModelMixin
from mi_krr.models.registry import describe_model


class ICLTransformer(PromptedModelMixin, HookedRootModule):
    """Read-in Linear (d_token -> d_model), pre-norm blocks, final norm, read-out Linear (d_model -> 1).

    Hooks (TransformerLens names): `hook_embed` (read-in output), `hook_pos_embed` (interleaved
    layout only), per block `blocks.{l}.hook_resid_pre`, `blocks.{l}.attn.hook_q/k/v/z`
    `[batch, pos, head, d_head]`, `blocks.{l}.attn.hook_attn_scores` and `.hook_pattern`
    `[batch, head, query_pos, key_pos]`, `blocks.{l}.hook_attn_out`, `blocks.{l}.hook_resid_mid`
    and `blocks.{l}.hook_mlp_out` (with an MLP), `blocks.{l}.hook_resid_post`,
    `blocks.{l}.mlp.hook_pre/hook_post`.

    Call as `model(tokens, n_support=None)` -> per-position outputs `[batch, seq]`; see
    `PromptedModelMixin` for when n_support is needed (concat layout) and how it is inferred.
    """

    W_pos: nn.Parameter | None  # the learned positional embedding, interleaved layout only

    def __init__(self, cfg: ICLTransformerConfig, device: torch.device | str | None = None):
        super().__init__()
        check_config(cfg)
        device = check_device("device", device)
        self.cfg = cfg
        self.read_in = nn.Linear(cfg.d_token, cfg.d_model)
        self.hook_embed = HookPoint()
        if cfg.layout == "interleaved":
            self.W_pos = nn.Parameter(0.02 * torch.randn(cfg.max_seq_len, cfg.d_model))
            self.hook_pos_embed = HookPoint()
        else:
            self.W_pos = None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg)
        self.read_out = nn.Linear(cfg.d_model, 1)
        self.to(device=device, dtype=cfg.torch_dtype)
        self.setup()

    n_layers = property(lambda self: self.cfg.n_layers)
    n_heads = property(lambda self: self.cfg.n_heads)
    n_dims = property(lambda self: self.cfg.n_dims)
    layout = property(lambda self: self.cfg.layout)
    causal = property(lambda self: self.cfg.causal)

    @property
    def max_seq_len(self) -> int | None:
        """Longest accepted sequence (None: the permutation-invariant concat layout has no limit)."""
        return self.cfg.max_seq_len if self.cfg.layout == "interleaved" else None

    def forward(self, tokens: torch.Tensor, n_support: int | None = None) -> torch.Tensor:
        """tokens `[batch, seq, d_token]` -> per-position outputs `[batch, seq]`."""
        n_support = self._resolve_n_support(tokens, n_support)
        seq_len = tokens.shape[1]
        if tokens.shape[-1] != self.cfg.d_token:
            raise ValueError(
                f"tokens must have width d_token={self.cfg.d_token} ({self.cfg.layout} layout, n_dims={self.cfg.n_dims}), "
                f"got {tokens.shape[-1]}: build them with model.encode(task)"
            )
        if self.max_seq_len is not None and seq_len > self.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens is longer than max_seq_len={self.max_seq_len}: shorten the prompt")
        resid = self.hook_embed(self.read_in(tokens))
        if self.W_pos is not None:
            resid = resid + self.hook_pos_embed(self.W_pos[:seq_len])
        assert self.cfg.causal is not None  # the config's __post_init__ resolves the default
        allowed = allowed_attention(self.cfg.layout, seq_len, n_support, self.cfg.causal, device=tokens.device)
        for block in self.blocks:
            resid = block(resid, allowed)
        return self.readout(resid)

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm and read-out: `[..., d_model]` -> `[...]`."""
        return self.read_out(self.ln_final(resid)).squeeze(-1)

    def residual_hook_names(self) -> list[str]:
        return residual_hook_names(self.n_layers)

    def attention_hook_names(self) -> list[AttentionHooks]:
        return attention_hook_names(self.n_layers, with_scores=True)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description `model_from_config` rebuilds this architecture from, with the
        weights' current dtype (see `describe_model`)."""
        return describe_model(self)
