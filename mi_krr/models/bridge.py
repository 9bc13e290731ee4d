"""Models whose backbone is a TransformerLens `TransformerBridge` fed float `inputs_embeds` from
our own read-in: `BridgeICLModel` (a native bridge built from an `ICLTransformerConfig`) and,
through `BridgeBackedMixin`, the Garg-format checkpoints in `mi_krr.models.garg`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import nn

from mi_krr._validation import check_device
from mi_krr.models.adapter import AttentionHooks
from mi_krr.models.config import ICLTransformerConfig, check_config
from mi_krr.models.hook_names import attention_hook_names, residual_hook_names
from mi_krr.models.masks import allowed_attention
from mi_krr.models.prompting import PromptedModelMixin
from mi_krr.models.registry import describe_model

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge


class BridgeBackedMixin:
    """Hook API of a model = read-in Linear + `TransformerBridge` (+ its read-out).

    The subclass sets `read_in` (d_token -> d_model), `bridge`, and implements
    `_bridge_mask(tokens, n_support)` (a bool `[batch|1, 1, q_pos, k_pos]` blocked-entry mask or
    None) and `_outputs(bridge_output)` (`[batch, seq, 1]` -> `[batch, seq]`).
    `run_with_cache`, `run_with_hooks`, `hooks`, `reset_hooks`, `add_hook`, `add_perma_hook`,
    `remove_all_hook_fns` and `hook_dict` take our continuous tokens and reach the bridge's hooks;
    hook names are the bridge's (TransformerLens) names.
    """

    read_in: nn.Linear
    bridge: TransformerBridge

    if TYPE_CHECKING:  # supplied by PromptedModelMixin and the model class

        layout: str

        @property
        def max_seq_len(self) -> int | None: ...

        def _resolve_n_support(self, tokens: torch.Tensor, n_support: int | None) -> int | None: ...

        def _bridge_mask(self, tokens: torch.Tensor, n_support: int | None) -> torch.Tensor | None: ...

        def _outputs(self, bridge_output: torch.Tensor) -> torch.Tensor: ...

    def _embed(self, tokens: torch.Tensor, n_support: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
        n_support = self._resolve_n_support(tokens, n_support)
        if tokens.shape[-1] != self.read_in.in_features:
            raise ValueError(
                f"tokens must have width d_token={self.read_in.in_features} ({self.layout} layout), got {tokens.shape[-1]}: "
                "build them with model.encode(task)"
            )
        if self.max_seq_len is not None and tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than max_seq_len={self.max_seq_len}: shorten the prompt")
        mask = self._bridge_mask(tokens, n_support)
        return self.read_in(tokens), ({} if mask is None else {"attention_mask": mask})

    def _finish(self, output: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        # stop_at_layer makes the bridge return a residual stream, not read-out logits.
        return output if kwargs.get("stop_at_layer") is not None else self._outputs(output)

    def forward(self, tokens: torch.Tensor, n_support: int | None = None) -> torch.Tensor:
        """tokens `[batch, seq, d_token]` -> per-position outputs `[batch, seq]`."""
        embeds, mask_kwargs = self._embed(tokens, n_support)
        return self._outputs(self.bridge(embeds, **mask_kwargs))

    def run_with_cache(self, tokens: torch.Tensor, *args: Any, n_support: int | None = None, **kwargs: Any):
        """`(outputs [batch, seq], ActivationCache)`; other arguments go to the bridge's
        `run_with_cache` (names_filter, stop_at_layer, ...)."""
        embeds, mask_kwargs = self._embed(tokens, n_support)
        run: Callable[..., tuple[Any, Any]] = self.bridge.run_with_cache  # *args may fill any of its overloads' parameters
        output, cache = run(embeds, *args, **mask_kwargs, **kwargs)
        return self._finish(output, kwargs), cache

    def run_with_hooks(self, tokens: torch.Tensor, *args: Any, n_support: int | None = None, **kwargs: Any):
        """Outputs `[batch, seq]` with the given `fwd_hooks`/`bwd_hooks` (bridge `run_with_hooks`)."""
        embeds, mask_kwargs = self._embed(tokens, n_support)
        run: Callable[..., Any] = self.bridge.run_with_hooks  # *args may fill any of its parameters
        return self._finish(run(embeds, *args, **mask_kwargs, **kwargs), kwargs)

    def hooks(self, *args: Any, **kwargs: Any):
        """The bridge's hook context manager (`with model.hooks(fwd_hooks=[...]): model(tokens)`)."""
        return self.bridge.hooks(*args, **kwargs)

    def reset_hooks(self, *args: Any, **kwargs: Any) -> None:
        self.bridge.reset_hooks(*args, **kwargs)

    def add_hook(self, *args: Any, **kwargs: Any) -> None:
        """The bridge's `add_hook(name, hook, dir="fwd", ...)`: a hook kept until `reset_hooks`."""
        self.bridge.add_hook(*args, **kwargs)

    def add_perma_hook(self, *args: Any, **kwargs: Any) -> None:
        """The bridge's `add_perma_hook(name, hook, dir="fwd")`: a hook `reset_hooks` keeps."""
        self.bridge.add_perma_hook(*args, **kwargs)

    def remove_all_hook_fns(self, *args: Any, **kwargs: Any) -> None:
        self.bridge.remove_all_hook_fns(*args, **kwargs)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return self.bridge.hook_dict

    def _rebuild_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) that build this model's architecture, freshly initialised, on the CPU."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickling (`pickle`, `torch.save(model)`, process pools) goes through the class, the
        arguments that build it, its parameter and buffer objects and its train / eval mode: the
        `TransformerBridge` holds classes local to TransformerLens functions, which pickle cannot
        name. Parameters keep their identity (an optimizer pickled beside the model still trains
        it), dtype, device and requires_grad; hooks added to the model are not pickled
        (`copy.deepcopy` copies the whole object, hooks included)."""
        module = cast(nn.Module, self)
        parameters = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        return (_rebuilt_bridge_backed_model, (type(self), self._rebuild_arguments(), parameters, buffers, module.training))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """The default deep copy of every attribute (which `__reduce__` would otherwise replace)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class BridgeICLModel(BridgeBackedMixin, PromptedModelMixin, nn.Module):
    """An `ICLTransformerConfig` architecture on `TransformerBridge.boot_native` blocks.

    Read-in Linear (ours) -> bridge (positional embedding, pre-norm blocks, final norm
    `ln_final`, read-out `unembed` = Linear(d_model, 1) without bias) + `read_out_bias`.
    Softmax attention only. Concat layout: the bridge runs bidirectionally under the concat mask of
    `allowed_attention` (passed as a 4-d attention mask) and its positional embedding is zeroed and
    frozen, so the model stays permutation-invariant over support tokens. Interleaved layout:
    causal, learned positional embedding.

    Differences from `ICLTransformer` a probe may meet: `hook_attn_scores` of a native bridge
    carries the post-softmax pattern, so `attention_hook_names()` gives `scores=None` (rebuild
    scores from `hook_q`/`hook_k`: q.k / sqrt(d_head)); `run_with_cache` returns an
    `ActivationCache` (not a dict); `hook_embed` does not fire (the read-in is outside the bridge);
    RMS norms compute in float32 even in a float64 model; pickling (`torch.save(model)`) rebuilds
    the architecture and puts the pickled parameters in place (`BridgeBackedMixin.__reduce__`),
    so added hooks are not pickled.
    """

    def __init__(self, cfg: ICLTransformerConfig, device: torch.device | str | None = None):
        super().__init__()
        check_config(cfg)
        device = check_device("device", device)
        if cfg.attention != "softmax":
            raise ValueError(
                f"BridgeICLModel supports attention='softmax' only (TransformerBridge native blocks), got {cfg.attention!r}: "
                "use ICLTransformer for linear or relu attention"
            )
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        self.cfg = cfg
        assert cfg.d_head is not None  # check_config: __post_init__ resolves the default
        bridge_cfg = TransformerBridgeConfig(
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=cfg.d_mlp,
            act_fn=cfg.act_fn,
            attn_only=not cfg.mlp,
            normalization_type=cfg.normalization_type,
            n_ctx=cfg.max_seq_len,
            d_vocab=1,
            d_vocab_out=1,
            positional_embedding_type="standard",
            attention_dir="causal" if cfg.layout == "interleaved" else "bidirectional",
        )
        self.read_in = nn.Linear(cfg.d_token, cfg.d_model, device=device, dtype=cfg.torch_dtype)
        self.bridge = TransformerBridge.boot_native(bridge_cfg, device=device, dtype=cfg.torch_dtype)  # type: ignore[attr-defined]  # attached with setattr by transformer_lens.model_bridge.sources.native
        self.read_out_bias = nn.Parameter(torch.zeros((), device=device, dtype=cfg.torch_dtype))
        if cfg.layout == "concat":
            positional = self.bridge.pos_embed.original_component.weight
            with torch.no_grad():
                positional.zero_()
            positional.requires_grad_(False)

    n_layers = property(lambda self: self.cfg.n_layers)
    n_heads = property(lambda self: self.cfg.n_heads)
    n_dims = property(lambda self: self.cfg.n_dims)
    layout = property(lambda self: self.cfg.layout)
    causal = property(lambda self: self.cfg.causal)
    max_seq_len = property(lambda self: self.cfg.max_seq_len)

    def _bridge_mask(self, tokens: torch.Tensor, n_support: int | None) -> torch.Tensor | None:
        if self.cfg.layout == "interleaved":
            return None  # the bridge's own causal mask
        assert self.cfg.causal is not None  # the config's __post_init__ resolves the default
        allowed = allowed_attention("concat", tokens.shape[1], n_support, self.cfg.causal, device=tokens.device)
        return ~allowed[None, None]

    def _outputs(self, bridge_output: torch.Tensor) -> torch.Tensor:
        return bridge_output[..., 0] + self.read_out_bias

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm and read-out: `[..., d_model]` -> `[...]`."""
        return self.bridge.unembed(self.bridge.ln_final(resid))[..., 0] + self.read_out_bias

    def residual_hook_names(self) -> list[str]:
        return residual_hook_names(self.n_layers)

    def attention_hook_names(self) -> list[AttentionHooks]:
        return attention_hook_names(self.n_layers, with_scores=False)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description `model_from_config` rebuilds this architecture from, with the
        weights' current dtype (see `describe_model`)."""
        return describe_model(self)

    def _rebuild_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.cfg,), {}


def _rebuilt_bridge_backed_model(cls: type, arguments: tuple[tuple[Any, ...], dict[str, Any]], parameters: dict[str, nn.Parameter],
                                 buffers: dict[str, torch.Tensor], training: bool) -> nn.Module:
    """The model `BridgeBackedMixin.__reduce__` describes: `cls(*args, **kwargs)` built on the CPU
    without drawing from torch's generators, then the pickled parameter and buffer objects put in
    place of its own (so an optimizer pickled with the model still holds them)."""
    args, kwargs = arguments
    with torch.random.fork_rng(devices=[]):
        model = cls(*args, **kwargs)
    for kind, tensors in (("_parameters", parameters), ("_buffers", buffers)):
        for name, tensor in tensors.items():
            owner, _, leaf = name.rpartition(".")
            getattr(model.get_submodule(owner), kind)[leaf] = tensor
    return model.train(training)
