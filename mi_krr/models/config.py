"""`ICLTransformerConfig`: the architecture of an in-context regression transformer, validated
once and serialisable to JSON (checkpoints rebuild models from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mi_krr._validation import check_choice, dataclass_from_dict, store_count
from mi_krr.models.encoding import LAYOUTS

ATTENTIONS = ("softmax", "linear", "relu")
NORMS = ("none", "layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ICLTransformerConfig:
    """Architecture of an in-context regression transformer over continuous tokens.

    Attributes:
        n_dims: task input dimension d (tokens are `[x, y]` of width d + 1 in the concat layout,
            width d in the interleaved one).
        d_model: residual stream width.
        n_layers: number of blocks L.
        n_heads: attention heads per block.
        d_head: width of one head (default d_model // n_heads).
        attention: "softmax" (scores q.k / sqrt(d_head)), "linear" (pattern = q.k / n_keys) or
            "relu" (pattern = relu(q.k) / n_keys); n_keys is the number of keys a query may
            attend to (Bai et al.'s normalisation).
        mlp: whether blocks have an MLP after attention.
        d_mlp: MLP hidden width (default 4 * d_model).
        act_fn: MLP activation, "gelu" or "relu".
        norm: "none", "layernorm" or "rmsnorm": pre-norm blocks plus a final norm before read-out.
        causal: concat layout only: support token i sees support tokens j <= i (queries always
            see every support token and themselves). The interleaved layout is always causal;
            None picks the layout's natural choice (concat: False, interleaved: True).
        layout: token layout, "concat" (permutation-invariant, no positional embedding) or
            "interleaved" (Garg et al., learned positional embedding).
        max_seq_len: longest sequence the model accepts (size of the positional embedding in the
            interleaved layout; the concat layout of ICLTransformer has no limit, a bridge model
            has one).
        dtype: "float32" or "float64", the dtype the model is built in. A model's
            `config_dict()` records the dtype its weights hold when called, so a model moved with
            `.to(torch.float64)` saves and reloads as float64.
    """

    n_dims: int
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int | None = None
    attention: str = "softmax"
    mlp: bool = True
    d_mlp: int | None = None
    act_fn: str = "gelu"
    norm: str = "layernorm"
    causal: bool | None = None
    layout: str = "concat"
    max_seq_len: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        store_count(self, "n_dims", minimum=1)
        store_count(self, "d_model", minimum=1)
        store_count(self, "n_layers", minimum=1)
        store_count(self, "n_heads", minimum=1)
        if self.d_head is None:
            if self.d_model < self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} < n_heads={self.n_heads} leaves no width per head: "
                    "raise d_model or set d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        store_count(self, "d_head", minimum=1)
        check_choice("attention", self.attention, ATTENTIONS)
        if not isinstance(self.mlp, bool):
            raise ValueError(f"mlp must be True or False, got {self.mlp!r}")
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        store_count(self, "d_mlp", minimum=1)
        check_choice("act_fn", self.act_fn, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("layout", self.layout, LAYOUTS)
        if self.causal is None:
            self.causal = self.layout == "interleaved"
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be True, False or None, got {self.causal!r}")
        if self.layout == "interleaved" and not self.causal:
            raise ValueError("the interleaved layout is causal (Garg et al.): set causal=True or use layout='concat'")
        store_count(self, "max_seq_len", minimum=1)
        check_choice("dtype", self.dtype, tuple(DTYPES))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def d_token(self) -> int:
        """Token width before the read-in: d + 1 (concat) or d (interleaved)."""
        return self.n_dims + 1 if self.layout == "concat" else self.n_dims

    # TransformerLens' ActivationCache reads these two names from `model.cfg`.
    @property
    def attn_only(self) -> bool:
        return not self.mlp

    @property
    def normalization_type(self) -> str | None:
        return {"none": None, "layernorm": "LN", "rmsnorm": "RMS"}[self.norm]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able field values (defaults resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ICLTransformerConfig":
        """Rebuild a config from `to_dict()` output; unknown or missing keys raise ValueError."""
        return dataclass_from_dict(cls, values)


def check_config(cfg: Any) -> None:
    """Refuse anything but an `ICLTransformerConfig` (a model class's `cfg` argument)."""
    if not isinstance(cfg, ICLTransformerConfig):
        hint = "ICLTransformerConfig.from_dict(cfg)" if isinstance(cfg, dict) else "ICLTransformerConfig(n_dims=..., ...)"
        raise ValueError(f"cfg must be an ICLTransformerConfig, got {type(cfg).__name__}: pass {hint}")
