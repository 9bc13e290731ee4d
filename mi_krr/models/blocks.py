"""Pre-norm transformer block and MLP with TransformerLens hook names."""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mi_krr.models.attention import Attention
from mi_krr.models.config import ICLTransformerConfig

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def make_norm(cfg: ICLTransformerConfig) -> nn.Module:
    """The block/final normalisation the config names (identity for "none")."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=1e-5)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.Identity()


class MLP(nn.Module):
    """d_model -> d_mlp -> d_model; hooks `hook_pre`/`hook_post` `[batch, pos, d_mlp]` around the activation."""

    def __init__(self, cfg: ICLTransformerConfig):
        super().__init__()
        assert cfg.d_mlp is not None  # the config's __post_init__ resolves the default
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = _ACTIVATIONS[cfg.act_fn]()
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hook_post(self.act(self.hook_pre(self.fc_in(x)))))


class TransformerBlock(nn.Module):
    """resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).

    Hooks (all `[batch, pos, d_model]`): `hook_resid_pre`, `hook_attn_out`, `hook_resid_post`,
    and with an MLP `hook_resid_mid`, `hook_mlp_out` (attention-only blocks have neither, as in
    TransformerLens).
    """

    mlp: MLP | None

    def __init__(self, cfg: ICLTransformerConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.mlp:
            self.ln2 = make_norm(cfg)
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()
        else:
            self.mlp = None

    def forward(self, resid: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """resid `[batch, pos, d_model]`, allowed `[query_pos, key_pos]` bool -> `[batch, pos, d_model]`."""
        resid = self.hook_resid_pre(resid)
        resid = resid + self.hook_attn_out(self.attn(self.ln1(resid), allowed))
        if self.mlp is not None:
            resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)
