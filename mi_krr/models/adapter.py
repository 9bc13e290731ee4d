"""The contract between models and probes.

Probes only ever talk to a model through `ICLModel`: how a task becomes input (`encode`), which
hook names hold the residual stream after each block and each layer's attention, which token may
attend to which (`allowed_attention`), and how a residual vector becomes a prediction
(`readout`). Every model class in mi-krr (`ICLTransformer`, the TransformerBridge model,
Garg-format checkpoints, the constructed reference models) implements it; `adapter_for` checks a
model does, naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

import torch

from mi_krr.models.encoding import EncodedPrompt
from mi_krr.models.prompting import PromptedModelMixin
from mi_krr.tasks import ICLTask


@dataclass(frozen=True)
class AttentionHooks:
    """Hook names of one attention layer. `pattern` fires with the weights actually applied
    `[batch, head, query_pos, key_pos]`; `scores` with pre-normalisation scores of the same shape,
    or None where the model cannot expose them; `q`/`k` fire with `[batch, pos, head, d_head]`."""

    pattern: str
    scores: str | None
    q: str
    k: str


@runtime_checkable
class ICLModel(Protocol):
    """What a model must offer for probes to work on it.

    Attributes:
        n_layers: number of blocks L.
        n_heads: attention heads per block.
    """

    n_layers: int
    n_heads: int

    def encode(self, task: ICLTask) -> EncodedPrompt:
        """Token sequences for `task` (see `EncodedPrompt`): tokens in the model's dtype and on
        its device, positions as 1-D long tensors."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position scalar outputs `[batch', seq]` for tokens `[batch', seq, d_token]`."""

    def residual_hook_names(self) -> list[str]:
        """L + 1 hook names: index 0 holds the residual stream entering block 0 (embeddings),
        index l the residual stream after block l. Each fires with `[batch', seq, d_model]`, once
        per forward pass, in this order (probes refuse a hook that fires twice or out of order)."""

    def attention_hook_names(self) -> list[AttentionHooks]:
        """One `AttentionHooks` per block, in forward order (empty names are not allowed); each
        hook fires once per forward pass. An empty list declares a model without attention to
        read: the lens and sensitivities work, attention probes refuse it."""

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor | None:
        """The structural mask the model applies to `prompt`'s token sequences: bool
        `[query_pos, key_pos]` (the same for every sequence), True where a token may attend to
        the key; None where the model has no such mask (e.g. per-head masks), and probes then
        take a head's nonzero attention weights as the keys it could see."""

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and read-out: `[..., d_model]` -> `[...]`. Applied to the
        residual stream after the last block it must give `forward`'s outputs (probes check this
        on every pass that reads that layer)."""

    def predict(self, task: ICLTask) -> torch.Tensor:
        """Query predictions `[batch, n_query]`."""


def adapter_for(model: object) -> ICLModel:
    """Return `model` after checking it implements `ICLModel`: its methods, L + 1 residual hook
    names and L attention hook sets, or none (L = `n_layers`), each name in its `hook_dict`. (Whether a
    hook fires is checked where probes run the model: a hook that never fires is named there.)

    Raises ValueError naming the missing method or hook, or the list of the wrong length.
    """
    for method in ("encode", "forward", "residual_hook_names", "attention_hook_names", "allowed_attention", "readout", "predict"):
        if not callable(getattr(model, method, None)):
            raise ValueError(
                f"{type(model).__name__} has no method {method!r}: implement the mi_krr.models.ICLModel protocol for your "
                "own model, or use an mi-krr model (ICLTransformer, BridgeICLModel, load_garg_checkpoint(...), mi_krr.construct)"
            )
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise ValueError(f"{type(model).__name__} has no hook_dict: it must be a TransformerLens HookedRootModule or bridge")
    n_layers = getattr(model, "n_layers", None)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"{type(model).__name__}.n_layers must be its number of blocks (an int >= 1), got {n_layers!r}")
    adapter = cast(ICLModel, model)  # its methods and n_layers are checked above, its hooks below
    names = list(adapter.residual_hook_names())
    attention = list(adapter.attention_hook_names())
    for method, found, expected in (("residual_hook_names", names, (n_layers + 1,)), ("attention_hook_names", attention, (n_layers, 0))):
        if len(found) not in expected:
            raise ValueError(
                f"{type(model).__name__}.{method}() gives {len(found)} entries, but n_layers = {n_layers} needs {expected[0]} "
                "(residual: embeddings + one per block; attention: one per block, or none for a model without attention)"
            )
    for hooks in attention:
        if not isinstance(hooks, AttentionHooks):
            raise ValueError(
                f"{type(model).__name__}.attention_hook_names() must give one mi_krr.models.AttentionHooks(pattern=, scores=, "
                f"q=, k=) per block, got {type(hooks).__name__} {hooks!r}"
            )
        names += [hooks.pattern, hooks.q, hooks.k] + ([hooks.scores] if hooks.scores else [])
    missing = [name for name in names if name not in hook_dict]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks hook {missing[0]!r} that probes need (missing: {len(missing)} hooks)")
    return adapter


def encode_unrecorded(model: ICLModel, task: ICLTask) -> EncodedPrompt:
    """`model.encode(task)` for a probe's own use: on mi-krr's prompted models (which remember the
    n_support of each sequence length they encoded, for untagged tokens) under
    `encodes_unrecorded`, so that probing never changes how the model later runs a user's tokens."""
    if isinstance(model, PromptedModelMixin):
        with model.encodes_unrecorded():
            return model.encode(task)
    return model.encode(task)
