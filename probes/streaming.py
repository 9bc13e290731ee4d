"""Hook-side reductions: every probe reads activations through these, and each hook keeps only
what its probe needs.

`stream_probes` is the one pass everything else uses: a hook on a residual-stream name gathers
the query positions the moment it fires and applies the model's read-out there (`[batch,
n_query]` per layer kept), and attention hooks cut the pattern down to its support x support and
query x support blocks inside the hook; both kinds ride on ONE forward pass, so a diagnosis reads
the model once. No hook keeps a `[batch', seq, ...]` activation: everything stored is a small
tensor in its own storage, never a view that would keep the full activation alive.

Probes talk to models only through `mi_krr.models.adapter.ICLModel` (encode, hook names, the
structural attention mask, readout).
"""

from __future__ import annotations

import itertools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, cast

import einops
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import as_tuple, check_choice, check_count
from mi_krr.models.adapter import ICLModel, adapter_for, encode_unrecorded
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task

Reduction = Callable[[torch.Tensor], Any]


class _HookedModel(Protocol):
    """What `run_with_reductions` calls beyond `ICLModel`: the TransformerLens hook context and hook
    points of a HookedRootModule or bridge (`adapter_for` requires one) and the forward call."""

    def hooks(self, fwd_hooks: list[tuple[str, Callable[..., None]]]) -> AbstractContextManager[Any]: ...

    @property
    def hook_dict(self) -> dict[str, torch.nn.Module]: ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...


ATTENTION_BLOCKS = ("support", "query")


def probe_model(model: Any) -> ICLModel:
    """The mi-krr ICL model a probe reads: `model` itself, or the model inside a `probes.attach`
    result, after `adapter_for`'s check (a missing method or hook raises a ValueError naming it)."""
    from probes.attach import ProbedModel  # attach imports the probes, and so this module

    return adapter_for(model.model if isinstance(model, ProbedModel) else model)


def encode_for_probe(model: ICLModel, task: ICLTask) -> EncodedPrompt:
    """`model.encode(task)`, leaving no record on the model (`encode_unrecorded`), after checking
    `task` is an `ICLTask` with at least one query (probes read the model at its queries); every
    mi-krr model's `encode` checks the task's dimension and length against the model
    (`check_task_fits`)."""
    check_task("task", task)
    if task.n_query < 1:
        raise ValueError("task has no query points (n_query=0): probes read the model at its queries; sample with n_query >= 1")
    prompt = encode_unrecorded(model, task)
    problem = _prompt_mismatch(prompt, task, *model_device_dtype(model))
    if problem:
        raise ValueError(f"{type(model).__name__}.encode(task) returned a prompt that does not fit the task: {problem}")
    return prompt


def _prompt_mismatch(prompt: EncodedPrompt, task: ICLTask, device: torch.device, dtype: torch.dtype) -> str | None:
    """What makes `prompt` disagree with `task` (its `EncodedPrompt` contract) or with a model on
    `device` in `dtype` (`_prompt_tensor_problem`), or None."""
    if not isinstance(prompt, EncodedPrompt):
        return f"expected an mi_krr.models.encoding.EncodedPrompt, got {type(prompt).__name__}"
    tensor_problem = _prompt_tensor_problem(prompt, device, dtype)
    if tensor_problem:
        return tensor_problem
    counts = {"batch_size": (prompt.batch_size, task.batch_size), "n_support": (prompt.n_support, task.n_support),
              "n_query": (prompt.n_query, task.n_query)}
    for name, (given, expected) in counts.items():
        if given != expected:
            return f"its {name} is {given}, the task's {expected}"
    sequences, positions = prompt.tokens.shape[0], prompt.query_positions.numel()
    if sequences % prompt.batch_size or prompt.groups * positions != prompt.n_query:
        return (f"{sequences} sequences of {positions} query positions cannot hold {prompt.batch_size} prompts x {prompt.n_query} "
                "queries (needs sequences = batch_size x groups and groups x query positions = n_query)")
    if prompt.support_positions.numel() != prompt.n_support or prompt.label_positions.numel() != prompt.n_support:
        return f"support_positions and label_positions must list n_support = {prompt.n_support} positions each"
    return None


def _prompt_tensor_problem(prompt: EncodedPrompt, device: torch.device, dtype: torch.dtype) -> str | None:
    """What makes `prompt`'s tensors unusable by a model on `device` in `dtype`, or None: tokens
    must be a `[sequences, seq, d_token]` tensor there; positions 1-D integer tensors in [0, seq)."""
    tokens = prompt.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        return f"tokens must be a torch tensor [sequences, seq, d_token], got {type(tokens).__name__} {getattr(tokens, 'shape', '')}"
    if tokens.dtype != dtype or tokens.device != device:
        return f"tokens are {tokens.dtype} on {tokens.device}, the model's weights {dtype} on {device}: encode in the model's dtype and device"
    seq_len = tokens.shape[1]
    for name in ("query_positions", "support_positions", "label_positions"):
        positions = getattr(prompt, name)
        if not isinstance(positions, torch.Tensor) or positions.ndim != 1 or positions.dtype not in (torch.int32, torch.int64):
            return f"{name} must be a 1-D integer (long) tensor of positions, got {type(positions).__name__} {getattr(positions, 'dtype', '')}"
        if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < seq_len):
            return f"{name} {positions.tolist()} leave the sequence's positions 0..{seq_len - 1}"
    return None


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter, else of its first floating-point buffer
    (fixed weights held as buffers), else CPU / float32."""
    tensors = itertools.chain(*(getattr(model, kind)() for kind in ("parameters", "buffers") if hasattr(model, kind)))
    weight = next((tensor for tensor in tensors if tensor.is_floating_point()), None)
    if weight is None:
        return torch.device("cpu"), torch.float32
    return weight.device, weight.dtype


def resolve_layers(model: ICLModel, layers: Sequence[int] | int | None, allow_empty: bool = False) -> list[int]:
    """Residual-stream indices to probe: None -> all of 0..L (0 = embeddings, l = after block l);
    one index, or a sequence / array / tensor of them.

    Raises ValueError for a non-integer, an index outside [0, L], or (unless `allow_empty`) an
    empty list."""
    n_layers = model.n_layers
    if layers is None:
        return list(range(n_layers + 1))
    if hasattr(layers, "tolist"):  # NumPy arrays and tensors
        layers = layers.tolist()
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers and not allow_empty:
        raise ValueError(f"layers must name at least one residual index in [0, {n_layers}], got an empty list")
    for layer in layers:
        check_count("layers entry", layer)
        if layer > n_layers:
            raise ValueError(f"layers entry {layer} is out of range: residual indices run 0..{n_layers} (0 = embeddings)")
    return [int(layer) for layer in layers]


@dataclass(frozen=True)
class ForwardOrder:
    """Where a hook sits in the forward pass, by how the model lists it: `rank` 2 l for residual
    index l (`residual_hook_names()[l]`), 2 b + 1 for block b's attention hooks (fired between
    residual indices b and b + 1); `method` the `ICLModel` method that lists it."""

    rank: int
    method: str


def residual_order(layer: int) -> ForwardOrder:
    """The `ForwardOrder` of residual index `layer` (0 = embeddings)."""
    return ForwardOrder(2 * layer, "residual_hook_names")


def attention_order(block: int) -> ForwardOrder:
    """The `ForwardOrder` of block `block`'s attention hooks (0-based)."""
    return ForwardOrder(2 * block + 1, "attention_hook_names")


def run_with_reductions(
    model: ICLModel,
    tokens: torch.Tensor,
    reductions: Sequence[tuple[str, Reduction]],
    grad: bool = False,
    order: Sequence[ForwardOrder] | None = None,
    output: Reduction | None = None,
) -> list[Any]:
    """One forward pass of `model` on `tokens` with `reduce(activation)` run inside the hook named
    beside it; returns what each reduction returned, in order, then `output(model(tokens))` if
    `output` is given (the model's own outputs `[batch', seq]`, reduced).

    Only the reductions' outputs outlive the pass. `grad=False` runs under `torch.no_grad`.
    `order`: each reduction's `ForwardOrder`; the hooks must fire in that order (a model listing
    its hooks out of forward order would silently give one layer's reading to another).
    Only this pass is read: a forward of the same model that a user's hook starts inside it (an
    activation patch computed on first use) fires the hooks too, and is ignored. (Hook points are
    leaves, so in one pass no hook point runs inside another; a firing while another hook point's
    call is under way belongs to a pass started from that point's hooks.)
    Raises ValueError if a named hook never fired, fired more than once (it would be read at its
    last firing), or fired out of `order`.
    """
    results: list[Any] = [None] * len(reductions)
    firings: list[list[int]] = [[] for _ in reductions]
    clock = itertools.count()
    depth = [0]  # hook-point calls under way

    def make_hook(index: int, reduce: Reduction) -> Callable[..., None]:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            if depth[0] == 1:  # its own call only: not inside a pass a user's hook started
                results[index] = reduce(activation)
                firings[index].append(next(clock))

        return hook

    def enter(*_: Any) -> None:
        depth[0] += 1

    def leave(*_: Any) -> None:
        depth[0] -= 1

    fwd_hooks = [(name, make_hook(index, reduce)) for index, (name, reduce) in enumerate(reductions)]
    hooked = cast(_HookedModel, model)  # a HookedRootModule or bridge (adapter_for)
    points = {id(point): point for point in hooked.hook_dict.values()}.values()
    handles = []
    try:
        with torch.set_grad_enabled(grad), hooked.hooks(fwd_hooks=fwd_hooks):
            # `enter` runs before any hook of a point; `leave`, added after every other hook, after them all
            # (also when one raises), so a point's depth is 1 while its own hooks run in this pass
            for point in points:
                handles += [point.register_forward_pre_hook(enter), point.register_forward_hook(leave, always_call=True)]
            model_output = hooked(tokens)
    finally:
        for handle in handles:
            handle.remove()
    for (name, _), fired in zip(reductions, firings):
        if not fired:
            raise ValueError(f"hook {name!r} did not fire during the forward pass: the model does not use the hook it names")
        if len(fired) > 1:
            raise ValueError(
                f"hook {name!r} fired {len(fired)} times in one forward pass: probes read each hook once, so each listed hook "
                "must fire once (give a reused module its own HookPoint per use)"
            )
    if order is not None:
        by_time = sorted(range(len(reductions)), key=lambda index: firings[index][0])
        for earlier, later in zip(by_time, by_time[1:]):
            if order[later].rank < order[earlier].rank:
                methods = " / ".join(dict.fromkeys(f"{type(model).__name__}.{order[i].method}()" for i in (later, earlier)))
                raise ValueError(
                    f"hook {reductions[later][0]!r} fired after {reductions[earlier][0]!r}, but {methods} list it earlier in the "
                    "forward pass: list the hooks in the order the forward pass runs them (embeddings first, then block by block)"
                )
    return (results + [output(model_output)]) if output is not None else results


def query_readouts(model: ICLModel, prompt: EncodedPrompt, layers: Sequence[int], grad: bool = False) -> torch.Tensor:
    """The read-out lens: `model.readout` (the model's own final norm and read-out, exactly as in
    training and `predict`) applied to each listed layer's residual stream at the query positions.

    Returns `[batch, len(layers), n_query]` (the model's dtype; in the autograd graph if `grad`).
    """
    readouts = stream_probes(model, prompt, layers=layers, grad=grad).readouts
    assert readouts is not None  # stream_probes refuses empty layers when no blocks are asked for
    return readouts


def query_residuals(model: ICLModel, prompt: EncodedPrompt, layers: Sequence[int]) -> torch.Tensor:
    """Each listed layer's residual stream at the query positions, `[batch, len(layers), n_query,
    d_model]` (no gradients)."""
    names = model.residual_hook_names()
    reductions = [(names[layer], prompt.gather_queries) for layer in layers]
    order = [residual_order(layer) for layer in layers]
    return torch.stack(run_with_reductions(model, prompt.tokens, reductions, order=order), dim=1)


@dataclass
class StreamedProbes:
    """What one forward pass with probe hooks keeps (None: not requested).

    Attributes:
        readouts: the read-out lens at the query positions `[batch, len(layers), n_query]`.
        support: attention of support x tokens on support keys `[batch, layer, head, n, n]`.
        query: attention of query tokens on support keys `[batch, layer, head, n_query, n]`.
        support_allowed, query_allowed: the model's structural mask on those blocks, bool
            `[n, n]` and `[n_query, n]` (the same for every prompt, layer and head; True: the
            row's token may attend to the key), None where the block was not read or the model
            has no such mask (`ICLModel.allowed_attention`).
    """

    __repr__ = compact_repr

    readouts: torch.Tensor | None
    support: torch.Tensor | None
    query: torch.Tensor | None
    support_allowed: torch.Tensor | None = None
    query_allowed: torch.Tensor | None = None


def stream_probes(
    model: ICLModel,
    prompt: EncodedPrompt,
    layers: Sequence[int] = (),
    blocks: Sequence[str] = (),
    source: str = "pattern",
    grad: bool = False,
) -> StreamedProbes:
    """ONE forward pass of `model` that keeps, reduced inside the hooks as they fire, the read-out
    lens of each residual index in `layers` (`[batch, n_query]` per layer) and the attention
    `blocks` ("support", "query") of every layer (`[batch, head, rows, n]` per layer; rows =
    attending token, columns = support keys, the x tokens in the interleaved layout), with the
    model's structural mask on each block. No hook keeps an activation, or a view of one: at any
    time the pass holds one layer's activations plus these reductions.

    source "pattern": the weights applied (`AttentionHooks.pattern`). "scores": pre-normalisation
    scores from `AttentionHooks.scores` where the model has them, else rebuilt as
    q . k / sqrt(d_head) from `hook_q`/`hook_k` (exact for plain softmax dot-product attention; a
    model that transforms q and k after those hooks, e.g. rotary, must expose `scores`); either
    way -inf where `model.allowed_attention(prompt)` blocks the entry (a model without that mask:
    its own scores as given, rebuilt ones finite everywhere).

    Raises ValueError for an unknown block or source, or when nothing is requested.
    """
    model = probe_model(model)
    blocks = as_tuple("blocks", blocks, "('query',)")
    for block in blocks:
        check_choice("blocks entry", block, ATTENTION_BLOCKS)
    check_choice("source", source, ("pattern", "scores"))
    layers = resolve_layers(model, layers, allow_empty=True)
    if not layers and not blocks:
        raise ValueError("stream_probes needs layers (read-out lens) or blocks (attention) to keep: both are empty")
    names = model.residual_hook_names()
    reductions: list[tuple[str, Reduction]] = [
        (names[layer], lambda resid: model.readout(prompt.gather_queries(resid))) for layer in layers
    ]
    order = [residual_order(layer) for layer in layers]
    if blocks and not model.attention_hook_names():
        raise ValueError(
            f"{type(model).__name__}.attention_hook_names() is empty: the model exposes no attention to read, so attention "
            "probes (attention_kernels, kernel_alignment, diagnose's kernels=) cannot run on it; use diagnose(..., kernels=())"
        )
    allowed = _allowed_blocks(model, prompt, blocks) if blocks else {}
    finish_attention = _attention_reductions(model, prompt, blocks, source, allowed, reductions, order) if blocks else None
    reads_last_layer = model.n_layers in layers
    results = run_with_reductions(
        model, prompt.tokens, reductions, grad=grad, order=order, output=prompt.gather_queries if reads_last_layer else None
    )
    readouts = torch.stack(results[: len(layers)], dim=1) if layers else None
    if readouts is not None and readouts.shape != (prompt.batch_size, len(layers), prompt.n_query):
        raise ValueError(
            f"{type(model).__name__}.readout must map [..., d_model] to [...] (one prediction per position), but the query "
            f"residuals [{prompt.batch_size}, {prompt.n_query}, d_model] gave {tuple(readouts.shape[:1] + readouts.shape[2:])}: "
            "e.g. squeeze a trailing dimension of size 1"
        )
    if reads_last_layer:
        assert readouts is not None  # layers is not empty
        _check_readout_is_forward(model, readouts[:, layers.index(model.n_layers)], results.pop())
    support, query = finish_attention(results[len(layers) :]) if finish_attention is not None else (None, None)
    return StreamedProbes(
        readouts=readouts, support=support, query=query, support_allowed=allowed.get("support"), query_allowed=allowed.get("query")
    )


def _check_readout_is_forward(model: ICLModel, last_readout: torch.Tensor, forward_queries: torch.Tensor) -> None:
    """ValueError unless the read-out lens after the last block (`[batch, n_query]`) is the
    model's own output at the query positions (`forward_queries`, from the same pass): the lens
    promises that its last layer is what the model predicts."""
    forward_queries = forward_queries.detach()
    if forward_queries.shape != last_readout.shape:
        raise ValueError(
            f"{type(model).__name__}.forward must give one output per position [batch', seq], but its outputs at the query "
            f"positions have shape {tuple(forward_queries.shape)}, not {tuple(last_readout.shape)}"
        )
    last_readout = last_readout.detach()
    finite = forward_queries[forward_queries.isfinite()]
    scale = 1.0 + (finite.abs().max().item() if finite.numel() else 0.0)
    tolerance = torch.finfo(last_readout.dtype).eps ** 0.5 * scale
    agrees = torch.isclose(last_readout, forward_queries.to(last_readout.dtype), rtol=0.0, atol=tolerance, equal_nan=True)
    if not agrees.all():
        gap = (last_readout - forward_queries)[~agrees].abs().max().item()
        raise ValueError(
            f"{type(model).__name__}.readout applied to the residual stream after the last block differs from the model's "
            f"own output at the query positions by up to {gap:.3g}: readout must apply the final norm and read-out exactly "
            "as forward does"
        )


def _allowed_blocks(model: ICLModel, prompt: EncodedPrompt, blocks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's structural mask (`model.allowed_attention(prompt)`, `[seq, seq]`) cut to each
    of `blocks` like the attention: {block: bool `[rows, n]`}, query rows folded over groups as
    the query block is; empty when the model has no such mask."""
    allowed = model.allowed_attention(prompt)
    if allowed is None:
        return {}
    seq_len = prompt.tokens.shape[1]
    device = prompt.tokens.device
    if (not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or tuple(allowed.shape) != (seq_len, seq_len)
            or allowed.device != device):
        description = (f"{allowed.dtype} {tuple(allowed.shape)} on {allowed.device}" if isinstance(allowed, torch.Tensor)
                       else type(allowed).__name__)
        raise ValueError(
            f"{type(model).__name__}.allowed_attention(prompt) must be a bool tensor [{seq_len}, {seq_len}] (the prompt's "
            f"sequence length) on the prompt's device {device}, or None; got {description}"
        )
    keys = prompt.support_positions
    cut = {block: _take(_take(allowed, 0, positions), 1, keys) for block, positions in _block_rows(prompt, blocks).items()}
    if "query" in cut:
        cut["query"] = einops.repeat(cut["query"], "q key -> (group q) key", group=prompt.groups)
    return {block: mask.clone(memory_format=torch.contiguous_format) for block, mask in cut.items()}


def _attention_reductions(
    model: ICLModel,
    prompt: EncodedPrompt,
    blocks: tuple[str, ...],
    source: str,
    allowed: dict[str, torch.Tensor],
    reductions: list[tuple[str, Reduction]],
    order: list[ForwardOrder],
) -> Callable[[list[Any]], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Append to `reductions` the hooks that cut every layer's attention down to `blocks` (and
    their `ForwardOrder` to `order`); return
    the function that turns their results (in order) into (support, query) `[batch, layer, ...]`.
    Scores, the model's own or rebuilt from q and k, get -inf where `allowed` (`_allowed_blocks`)
    blocks them (a model may fill blocked scores with a large finite negative, e.g. HF GPT-2's
    float minimum, which averaging over a prompt's groups can overflow)."""
    keys, rows = prompt.support_positions, _block_rows(prompt, blocks)

    def blocks_of(pattern: torch.Tensor) -> dict[str, torch.Tensor]:  # [seqs, head, pos, pos]
        folded = {}
        for block, positions in rows.items():
            folded[block] = _fold_block(block, _take(_take(pattern, 2, positions), 3, keys), prompt)
            if source == "scores":
                folded[block] = _blocked_to_minus_inf(folded[block], allowed.get(block))
        return folded

    rebuilt: list[bool] = []
    for block_index, hooks in enumerate(model.attention_hook_names()):
        read = hooks.pattern if source == "pattern" else hooks.scores  # None: the model has no scores hook
        if read is not None:
            reductions.append((read, blocks_of))
            rebuilt.append(False)
        else:  # q fires before k is known: keep q's rows and k's support keys, combine after
            reductions.append((hooks.q, lambda q: {block: _take(q, 1, positions).clone() for block, positions in rows.items()}))
            reductions.append((hooks.k, lambda k: _take(k, 1, keys).clone()))
            rebuilt.append(True)
        order += [attention_order(block_index)] * (len(reductions) - len(order))

    def finish(results: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        remaining = iter(results)
        per_layer = []
        for needs_qk in rebuilt:
            if not needs_qk:
                per_layer.append(next(remaining))
                continue
            q_rows, k = next(remaining), next(remaining)  # {block: [seqs, rows, head, e]}, [seqs, n, head, e]
            per_layer.append({block: _rebuilt_scores(block, q, k, prompt, allowed.get(block)) for block, q in q_rows.items()})
        stacked = {block: torch.stack([layer[block] for layer in per_layer], dim=1) for block in blocks}
        return stacked.get("support"), stacked.get("query")

    return finish


def _rebuilt_scores(
    block: str, q: torch.Tensor, k: torch.Tensor, prompt: EncodedPrompt, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Softmax scores q . k / sqrt(d_head) of one block from q at its rows `[seqs, rows, head, e]`
    and k at the support keys `[seqs, n, head, e]`, folded per prompt (`_fold_block`), with -inf
    where `allowed` (the block's structural mask, `_allowed_blocks`) is False (None: no mask
    known, every entry finite)."""
    scores = einops.einsum(q, k, "seqs row head e, seqs key head e -> seqs head row key") / q.shape[-1] ** 0.5
    return _blocked_to_minus_inf(_fold_block(block, scores, prompt), allowed)


def _blocked_to_minus_inf(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Folded scores `[batch, head, rows, n]` with -inf where `allowed` `[rows, n]` is False (in
    place: the block owns its storage); unchanged when no mask is known."""
    return scores if allowed is None else scores.masked_fill_(~allowed, float("-inf"))


def _block_rows(prompt: EncodedPrompt, blocks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Attending positions of each requested block: support x tokens `[n]`, query tokens `[q]`."""
    positions = {"support": prompt.support_positions, "query": prompt.query_positions}
    return {block: positions[block] for block in ATTENTION_BLOCKS if block in blocks}


def _take(tensor: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`tensor` at `positions` along `dim`: a view when they are consecutive (no copy of the
    activation), else a gathered copy."""
    start, count = int(positions[0]), positions.numel()
    if count and torch.equal(positions.cpu(), torch.arange(start, start + count)):
        return tensor.narrow(dim, start, count)
    return tensor.index_select(dim, positions.to(tensor.device))


def _fold_block(block: str, rows: torch.Tensor, prompt: EncodedPrompt) -> torch.Tensor:
    """Attention rows of one sequence-batch `[batch * groups, head, rows, n]` -> the block per
    prompt, in its own storage.

    "support" `[batch, head, n, n]`: averaged over a prompt's groups (identical where support
    tokens never see a query: causal layouts, and every concat mask in mi-krr). "query"
    `[batch, head, n_query, n]`: groups folded into queries, as `EncodedPrompt.gather_queries` does.
    """
    if block == "support":
        folded = einops.reduce(rows, "(batch group) head i j -> batch head i j", "mean", batch=prompt.batch_size)
    else:
        folded = einops.rearrange(rows, "(batch group) head q key -> batch head (group q) key", batch=prompt.batch_size)
    return folded.clone(memory_format=torch.contiguous_format)
