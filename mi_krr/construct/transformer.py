"""`ConstructedTransformer`: the hooked transformer every hand-built construction compiles to.

A construction is a residual layout (named coordinates), an embedding, and per block a list of
attention heads (`HeadSpec`) and MLP scalar ops (`mi_krr.construct.primitives`). The module has
the hook names of `mi_krr.models.ICLTransformer` (`hook_embed`, `blocks.{l}.hook_resid_pre`,
`blocks.{l}.attn.hook_q/k/v/attn_scores/pattern/z`, `blocks.{l}.hook_attn_out`,
`blocks.{l}.hook_resid_mid`, `blocks.{l}.mlp.hook_pre/post`, `blocks.{l}.hook_mlp_out`,
`blocks.{l}.hook_resid_post`) and implements the `ICLModel` protocol, so every probe runs on it.

Tokens (`encode`): support tokens, then query tokens, then `n_aux` auxiliary tokens (CG's
aggregator, Richardson's sink). Each token is (x zero-padded to `dim`, y (0 off support tokens),
is_support, is_query, is_aux) `[d_token = dim + 4]`. The embedding copies x, y and the three
type flags into fixed residual coordinates (flags at 0, 1, 2; blocks never write them), adds
constant initial states, and applies per-token feature functions (a kernel feature map, |x|^2):
a nonlinear read-in, documented per construction.

Attention: head h lets tokens of types `query_types` attend to tokens of types `key_types`
(read from the flag coordinates; a structural mask like a causal one). Scores are q . k with no
1/sqrt(d_head) (scales live in the weights). "linear" attention applies the scores themselves
(`hook_attn_scores` = `hook_pattern`, 0 at masked entries); "softmax" applies softmax over the
allowed keys (`hook_attn_scores` -inf at keys of other types), and tokens that do not query the
head get weight 0. `hook_pattern` carries the weights actually applied. Values are scalars in column 0 of `d_head`-wide value vectors.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

import mi_krr
from mi_krr._repr import compact_repr
from mi_krr._validation import check_choice, check_device, check_float_dtype
from mi_krr.construct.primitives import Op, Readout, ReluArithmetic, compile_mlp, coord
from mi_krr.models.adapter import AttentionHooks
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.models.hook_names import attention_hook_names, residual_hook_names
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task

if TYPE_CHECKING:
    from mi_krr.feature_maps import FeatureMap, PromptFeatureMap

TOKEN_TYPES = ("support", "query", "aux")
ATTENTION_KINDS = ("linear", "softmax")


class ResidualLayout:
    """Named residual coordinates: `layout.index(name)` for a scalar, `layout.span(name)` for a
    block (e.g. "x" `[dim]`). The three type flags always come first (0, 1, 2)."""

    def __init__(self, fields: list[tuple[str, int]]):
        self._spans: dict[str, range] = {}
        start = 0
        for name, width in [("is_support", 1), ("is_query", 1), ("is_aux", 1), *fields]:
            self._spans[name] = range(start, start + width)
            start += width
        self.d_model = start

    def index(self, name: str) -> int:
        span = self._spans[name]
        if len(span) != 1:
            raise ValueError(f"{name!r} is a block of {len(span)} coordinates: use span({name!r})")
        return span.start

    def span(self, name: str) -> range:
        return self._spans[name]

    def other_types(self, token_type: str) -> Readout:
        """The sum of the flags of every type but `token_type`: exactly 0 on its tokens, 1 on
        all others (the `off` readout of a `Reciprocal` restricted to `token_type`)."""
        flags = {"support": "is_support", "query": "is_query", "aux": "is_aux"}
        readout = Readout()
        for other in TOKEN_TYPES:
            if other != token_type:
                readout = readout + coord(self.index(flags[other]))
        return readout

    def scalars(self) -> dict[str, int]:
        """name -> index of every width-1 coordinate (flags included)."""
        return {name: span.start for name, span in self._spans.items() if len(span) == 1}

    def spans(self) -> dict[str, tuple[int, int]]:
        """name -> (start, stop) of every field."""
        return {name: (span.start, span.stop) for name, span in self._spans.items()}


@dataclass(frozen=True)
class HeadSpec:
    """One attention head.

    Attributes:
        query_types, key_types: token types (from TOKEN_TYPES) that query / serve as keys.
        query, key: readouts giving the query and key vectors (equal lengths, <= d_head).
        value: the scalar value readout.
        writes: (residual coordinate, coefficient) pairs the head's scalar output is added to.
    """

    query_types: tuple[str, ...]
    key_types: tuple[str, ...]
    query: tuple[Readout, ...]
    key: tuple[Readout, ...]
    value: Readout
    writes: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class BlockSpec:
    """One block: its heads (possibly none) and its MLP's scalar ops (possibly none)."""

    heads: tuple[HeadSpec, ...] = ()
    mlp: tuple[Op, ...] = ()


@dataclass(frozen=True)
class FeatureSlot:
    """The embedding writes fn(x) `[..., width]` into residual `coordinates` on tokens of `token_type`."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    token_type: str
    coordinates: range


def _type_mask(types: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([float(name in types) for name in TOKEN_TYPES], dtype=torch.float64)


@dataclass(frozen=True)
class ConstructionShape:
    """The TransformerLens config fields `ActivationCache` reads (`ConstructedTransformer.cfg`), so
    `ActivationCache(cache, construction)`'s `accumulated_resid`, `stack_activation` and
    `cache["resid_post", l]` work as on other hooked models. No normalisation (the constructions
    have none); `d_mlp` None: their MLPs' hidden widths differ by block."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None = None
    attn_only: bool = False
    normalization_type: str | None = None


class ConstructedAttention(nn.Module):
    """Multi-head attention with per-head type masks; TransformerLens weights and hooks."""

    # buffers registered by name in __init__: the token types each head reads queries / keys from `[head, 3]`
    query_types: torch.Tensor
    key_types: torch.Tensor

    def __init__(self, heads: tuple[HeadSpec, ...], n_heads: int, d_head: int, d_model: int, kind: str):
        super().__init__()
        self.kind = check_choice("attention", kind, ATTENTION_KINDS)
        shape = (n_heads, d_model, d_head)
        W_Q, W_K, W_V = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        b_Q, b_K, b_V = (torch.zeros(n_heads, d_head, dtype=torch.float64) for _ in range(3))
        W_O = torch.zeros(n_heads, d_head, d_model, dtype=torch.float64)
        query_types = torch.zeros(n_heads, len(TOKEN_TYPES), dtype=torch.float64)
        key_types = torch.zeros(n_heads, len(TOKEN_TYPES), dtype=torch.float64)
        for h, head in enumerate(heads):
            for dim, (q, k) in enumerate(zip(head.query, head.key, strict=True)):
                W_Q[h, :, dim], b_Q[h, dim] = q.vector(d_model), q.bias
                W_K[h, :, dim], b_K[h, dim] = k.vector(d_model), k.bias
            W_V[h, :, 0], b_V[h, 0] = head.value.vector(d_model), head.value.bias
            for target, coef in head.writes:
                W_O[h, 0, target] += coef
            query_types[h], key_types[h] = _type_mask(head.query_types), _type_mask(head.key_types)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.W_Q, self.W_K, self.W_V, self.W_O = map(frozen, (W_Q, W_K, W_V, W_O))
        self.b_Q, self.b_K, self.b_V = map(frozen, (b_Q, b_K, b_V))
        self.register_buffer("query_types", query_types)
        self.register_buffer("key_types", key_types)
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """x `[batch, pos, d_model]`, token-type flags `[batch, pos, 3]` -> `[batch, pos, d_model]`."""
        n_heads, d_model, d_head = self.W_Q.shape
        # One matmul for q, k and v (written with matmul/permute: einsum's overhead dominates at
        # these sizes); hooks see TransformerLens shapes [batch, pos, head, d_head].
        weights = torch.cat([self.W_Q, self.W_K, self.W_V]).permute(1, 0, 2).reshape(d_model, 3 * n_heads * d_head)
        biases = torch.cat([self.b_Q, self.b_K, self.b_V]).reshape(-1)
        qkv = (x @ weights + biases).unflatten(-1, (3, n_heads, d_head))
        q = self.hook_q(qkv[..., 0, :, :])
        k = self.hook_k(qkv[..., 1, :, :])
        v = self.hook_v(qkv[..., 2, :, :])
        # Type masks as [batch, head, pos] 0/1 factors: cheaper than a [batch, head, q, k] mask.
        queries = (flags @ self.query_types.T > 0.5).transpose(1, 2).to(x.dtype)
        keys = (flags @ self.key_types.T > 0.5).transpose(1, 2)
        if self.kind == "linear":  # masking q and k zeroes exactly the masked scores
            masked_q = q.transpose(1, 2) * queries.unsqueeze(-1)
            masked_k = k.permute(0, 2, 3, 1) * keys.to(x.dtype).unsqueeze(-2)
            pattern = self.hook_attn_scores(masked_q @ masked_k)  # [batch, head, q_pos, k_pos]
        else:
            scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)
            # -inf on keys of other types (a head without any such key keeps its scores finite;
            # its rows are zeroed below with every row of a token that does not query the head)
            blocked = ~keys & keys.any(dim=-1, keepdim=True)
            scores = self.hook_attn_scores(scores.masked_fill(blocked.unsqueeze(-2), float("-inf")))
            pattern = torch.softmax(scores, dim=-1) * queries.unsqueeze(-1)
        pattern = self.hook_pattern(pattern)
        z = self.hook_z((pattern @ v.transpose(1, 2)).transpose(1, 2))  # [batch, pos, head, d_head]
        return z.flatten(-2) @ self.W_O.reshape(n_heads * d_head, d_model)


class ConstructedBlock(nn.Module):
    """resid_mid = resid_pre + attn(resid_pre); resid_post = resid_mid + mlp(resid_mid). No norms."""

    def __init__(self, attn: ConstructedAttention, mlp: nn.Module):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(resid, flags)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(resid)))


@dataclass
class StepStates:
    """The construction's state coordinates after every step, read from the residual stream.

    Attributes:
        support: state name -> values on the support tokens `[batch, T+1, n_support]`.
        query: state name -> values on the query tokens `[batch, T+1, n_query]`.
        aux: state name -> values on the first auxiliary token `[batch, T+1]`.
        pred: the read-out prediction on the query tokens `[batch, T+1, n_query]`.
        hook_names: the T + 1 residual hooks read (step 0: the embeddings).
    """

    __repr__ = compact_repr

    support: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    pred: torch.Tensor
    hook_names: list[str]


FINGERPRINT_POINTS = 3
"""Probe points per prompt of `_feature_fingerprint`."""


def _feature_fingerprint(features: list[FeatureSlot], dim: int, n_aux: int) -> torch.Tensor:
    """What the embedding's feature functions write for one fixed probe prompt of
    `FINGERPRINT_POINTS` points (and `n_aux` auxiliary tokens), `[1, FINGERPRINT_POINTS + n_aux, dim]`
    float64, concatenated and flattened: builds whose features differ (seed, width, kernel) differ
    here, so a state dict records which features its weights were built around."""
    n_tokens = FINGERPRINT_POINTS + n_aux
    probe = torch.sin(torch.arange(1, n_tokens * dim + 1, dtype=torch.float64)).reshape(1, n_tokens, dim)
    return torch.cat([slot.fn(probe).flatten() for slot in features] + [torch.zeros(0, dtype=torch.float64)])


def _first_caller_outside(*packages) -> int:
    """The `warnings.warn` stacklevel of the nearest frame outside `packages` (modules), counted
    from the function that calls this helper (stacklevel 1): a warning raised inside a forward
    pass names the user's line, not torch's `Module.__call__`."""
    roots = tuple(str(Path(package.__file__).parent) + os.sep for package in packages)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


class ConstructedTransformer(HookedRootModule):
    """A hand-built transformer running `n_steps` iterations of a solver, `layers_per_step`
    blocks per iteration. Build one with `cg_transformer`, `richardson_transformer` or
    `gd_transformer`; its docstring there documents the residual layout and the blocks.

    Attributes:
        construction: "cg", "richardson" or "gd".
        n_steps, layers_per_step: iterations and blocks per iteration (n_layers = their product).
        dim: largest task dimension accepted (smaller ones are zero-padded).
        layout: the `ResidualLayout`; `state_coordinates` its scalar coordinates by name.
        params: the construction's parameters (lam, step, kernel, head width, arithmetic, ...).

    Every step runs the same weights, so the blocks of steps 2..T share step 1's weight tensors
    (frozen, `requires_grad=False`): memory holds one step's weights whatever `n_steps` (at
    head_width 512 one CG step is ~200 MB). Editing a block's weights in place edits that block
    in every step; to change one step alone, give its block new tensors
    (`block.attn.W_Q = nn.Parameter(block.attn.W_Q.clone(), requires_grad=False)`).

    A forward whose read-out overflows to inf/NaN (a diverging iteration) raises a RuntimeWarning
    that says so; a relu-mode MLP whose inputs leave its interpolants' range raises a
    `ReluRangeError` (`ReluMLP.check_inputs`).
    """

    feature_map: FeatureMap | PromptFeatureMap  # set by cg_transformer only: the phi its heads compute

    def __init__(
        self,
        *,
        construction: str,
        layout: ResidualLayout,
        step_blocks: list[BlockSpec],
        n_steps: int,
        dim: int,
        n_aux: int,
        attention: str,
        placement: list[tuple[int, int, float]],
        constants: list[tuple[str, int, float]],
        features: list[FeatureSlot],
        readout_coordinate: int,
        readout_sign: float,
        state_tokens: dict[str, str],
        arithmetic: str,
        relu: ReluArithmetic | None,
        params: dict,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        dtype = check_float_dtype("dtype", dtype)
        self.construction = construction
        self.layout = layout
        self.n_steps = n_steps
        self.layers_per_step = len(step_blocks)
        self.dim = dim
        self.n_aux = n_aux
        self.params = dict(params, mlp=arithmetic)
        self._state_tokens = dict(state_tokens)
        self._readout_coordinate = readout_coordinate
        self._readout_sign = readout_sign
        self._features = list(features)
        d_model = layout.d_model
        self.d_token = dim + 4
        W_E = torch.zeros(self.d_token, d_model, dtype=torch.float64)
        for token_index, resid_index, weight in placement:
            W_E[token_index, resid_index] += weight
        for flag in range(3):
            W_E[dim + 1 + flag, flag] = 1.0
        for token_type, resid_index, value in constants:
            W_E[dim + 1 + TOKEN_TYPES.index(token_type), resid_index] += value
        self.W_E = nn.Parameter(W_E, requires_grad=False)
        self.register_buffer("feature_fingerprint", _feature_fingerprint(self._features, dim, n_aux))
        self.hook_embed = HookPoint()
        self.n_heads = max(1, max(len(block.heads) for block in step_blocks))
        d_head = max([1] + [len(head.query) for block in step_blocks for head in block.heads])
        self.d_head = d_head
        first_step = [
            ConstructedBlock(
                ConstructedAttention(block.heads, self.n_heads, d_head, d_model, attention),
                compile_mlp(list(block.mlp), d_model, arithmetic, relu),
            )
            for block in step_blocks
        ]
        # later steps: modules and hook points of their own around the first step's weight tensors
        weights = {id(tensor): tensor for block in first_step for tensor in (*block.parameters(), *block.buffers())}
        later_steps = [copy.deepcopy(block, memo=dict(weights)) for _ in range(1, n_steps) for block in first_step]
        self.blocks = nn.ModuleList(first_step + later_steps)
        self.to(device=check_device("device", device), dtype=dtype)
        self.setup()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """`nn.Module`'s load, refusing weights saved from a build whose embedding features differ
        (a feature map is code and its random draws, not weights: another seed, width or kernel
        would silently predict otherwise)."""
        saved = state_dict.get(prefix + "feature_fingerprint")
        own = self.feature_fingerprint
        if saved is not None and (saved.shape != own.shape or not torch.allclose(saved.to(own), own, rtol=1e-5, atol=1e-8)):
            raise ValueError(
                "these weights were saved from a construction with other embedding features (feature map, seed, head_width or "
                "kernel): rebuild it with the saved arguments (construction.json's), then load_state_dict"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def cfg(self) -> ConstructionShape:
        """What TransformerLens's `ActivationCache` reads of a model's config (`ConstructionShape`)."""
        return ConstructionShape(n_layers=self.n_layers, n_heads=self.n_heads, d_model=self.d_model, d_head=self.d_head)

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def state_coordinates(self) -> dict[str, int]:
        """Residual index of every scalar coordinate (flags, states, scratch) by name."""
        return self.layout.scalars()

    @property
    def state_tokens(self) -> dict[str, str]:
        """Which token type ("support", "query", "aux") each state coordinate lives on."""
        return dict(self._state_tokens)

    def _reference(self) -> torch.Tensor:
        return self.W_E

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[batch, seq, d_token]` -> residual `[batch, seq, d_model]`."""
        resid = tokens @ self.W_E
        x = tokens[..., : self.dim]
        for slot in self._features:
            flag = tokens[..., self.dim + 1 + TOKEN_TYPES.index(slot.token_type)].unsqueeze(-1)
            values = slot.fn(x) * flag
            padded = torch.zeros_like(resid)
            padded[..., slot.coordinates.start : slot.coordinates.stop] = values
            resid = resid + padded
        return resid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[batch, seq, d_token]` (from `encode`) -> per-position read-outs `[batch, seq]`."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_token:
            raise ValueError(
                f"tokens must be [batch, seq, d_token={self.d_token}], got shape {tuple(tokens.shape)}: build them with model.encode(task)"
            )
        resid = self.hook_embed(self.embed(tokens))
        flags = tokens[..., self.dim + 1 : self.dim + 4]
        for block in self.blocks:
            resid = block(resid, flags)
        out = self.readout(resid)
        if not torch.isfinite(out).all():
            warnings.warn(
                f"{self.construction} construction ({self.n_steps} steps): the read-out holds inf/NaN: the iteration diverged "
                "(a step size beyond its stable range, e.g. richardson's step or gd's lr above 2 / the largest eigenvalue of "
                "the system) or the task holds huge values",
                RuntimeWarning,
                stacklevel=_first_caller_outside(torch, mi_krr),
            )
        return out

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """The prediction coordinate: `[..., d_model]` -> `[...]` (no norm)."""
        return self._readout_sign * resid[..., self._readout_coordinate]

    def residual_hook_names(self) -> list[str]:
        return residual_hook_names(self.n_layers)

    def attention_hook_names(self) -> list[AttentionHooks]:
        return attention_hook_names(self.n_layers, with_scores=True)

    def allowed_attention(self, prompt: EncodedPrompt) -> None:
        """None: each head has its own token-type mask (`HeadSpec`), not one mask for the model."""
        return None

    def step_hook_names(self) -> list[str]:
        """T + 1 hooks: the embeddings, then `blocks.{t * layers_per_step - 1}.hook_resid_post`
        (the residual stream after step t's blocks) for t = 1..T."""
        return ["blocks.0.hook_resid_pre"] + [
            f"blocks.{t * self.layers_per_step - 1}.hook_resid_post" for t in range(1, self.n_steps + 1)
        ]

    def encode(self, task: ICLTask) -> EncodedPrompt:
        """Tokens `[batch, n + m + n_aux, dim + 4]` for `task` (see the module docstring)."""
        check_task("task", task)
        if task.dim > self.dim:
            raise ValueError(
                f"task dimension d={task.dim} is larger than this construction supports (dim={self.dim}): build it with dim>={task.dim}"
            )
        reference = self._reference()
        task = task.to(device=reference.device, dtype=reference.dtype)
        batch, n, m = task.batch_size, task.n_support, task.n_query
        tokens = torch.zeros(batch, n + m + self.n_aux, self.d_token, dtype=reference.dtype, device=reference.device)
        tokens[:, :n, : task.dim] = task.x_support
        tokens[:, n : n + m, : task.dim] = task.x_query
        tokens[:, :n, self.dim] = task.y_support
        tokens[:, :n, self.dim + 1] = 1.0
        tokens[:, n : n + m, self.dim + 2] = 1.0
        tokens[:, n + m :, self.dim + 3] = 1.0
        device = reference.device
        return EncodedPrompt(
            tokens=tokens,
            query_positions=torch.arange(n, n + m, device=device),
            batch_size=batch,
            n_query=m,
            n_support=n,
            support_positions=torch.arange(n, device=device),
            label_positions=torch.arange(n, device=device),
        )

    def predict(self, task: ICLTask) -> torch.Tensor:
        """Query predictions after all steps `[batch, n_query]`."""
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens))

    def step_states(self, task: ICLTask) -> StepStates:
        """Every state coordinate after every step (one forward pass with a cache of T + 1 hooks)."""
        prompt = self.encode(task)
        names = self.step_hook_names()
        _, cache = self.run_with_cache(prompt.tokens, names_filter=names)
        resid = torch.stack([cache[name] for name in names], dim=1)  # [batch, T+1, seq, d_model]
        n, m = prompt.n_support, prompt.n_query
        positions: dict[str, slice | int] = {"support": slice(0, n), "query": slice(n, n + m), "aux": n + m}
        grouped: dict[str, dict[str, torch.Tensor]] = {"support": {}, "query": {}, "aux": {}}
        for name, token_type in self._state_tokens.items():
            grouped[token_type][name] = resid[:, :, positions[token_type], self.state_coordinates[name]]
        pred = self.readout(resid[:, :, n : n + m])
        return StepStates(grouped["support"], grouped["query"], grouped["aux"], pred, names)
