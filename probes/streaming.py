"""Hook-side reductions: every probe reads activations through these, and each hook keeps only
what its probe needs.

A hook on a residual-stream name gathers the query positions the moment it fires (and, for the
read-out lens, applies the model's read-out there), so a forward pass retains `[batch, n_query]`
or `[batch, n_query, d_model]` per layer, never the `[batch', seq, d_model]` stream of every
layer. Attention hooks cut the pattern down to its support x support and query x support blocks
inside the hook. Everything the hooks store is a fresh tensor (gathered by index), not a view that
would keep the full activation's storage alive.

Probes talk to models only through `mi_krr.models.adapter.ICLModel` (encode, hook names, readout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import einops
import torch

from mi_krr._validation import check_count
from mi_krr.models.adapter import ICLModel
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.tasks import ICLTask

Reduction = Callable[[torch.Tensor], Any]


def encode_for_probe(model: ICLModel, task: ICLTask) -> EncodedPrompt:
    """`model.encode(task)` after checking `task` is an `ICLTask`; every mi-krr model's `encode`
    checks the task's dimension and length against the model (`check_task_fits`)."""
    if not isinstance(task, ICLTask):
        raise ValueError(f"task must be an mi_krr.tasks.ICLTask, got {type(task).__name__}")
    return model.encode(task)


def resolve_layers(model: ICLModel, layers: Sequence[int] | None) -> list[int]:
    """Residual-stream indices to probe: None -> all of 0..L (0 = embeddings, l = after block l).

    Raises ValueError for an empty list, a non-integer, or an index outside [0, L]."""
    n_layers = model.n_layers
    if layers is None:
        return list(range(n_layers + 1))
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers must name at least one residual index in [0, {n_layers}], got an empty list")
    for layer in layers:
        check_count("layers entry", layer)
        if layer > n_layers:
            raise ValueError(f"layers entry {layer} is out of range: residual indices run 0..{n_layers} (0 = embeddings)")
    return [int(layer) for layer in layers]


def run_with_reductions(
    model: ICLModel,
    tokens: torch.Tensor,
    reductions: Sequence[tuple[str, Reduction]],
    grad: bool = False,
) -> list[Any]:
    """One forward pass of `model` on `tokens` with `reduce(activation)` run inside the hook named
    beside it; returns what each reduction returned, in order.

    Only the reductions' outputs outlive the pass. `grad=False` runs under `torch.no_grad`.
    Raises ValueError if a named hook never fired.
    """
    results: list[Any] = [None] * len(reductions)
    fired = [False] * len(reductions)

    def make_hook(index: int, reduce: Reduction) -> Callable[..., None]:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            results[index] = reduce(activation)
            fired[index] = True

        return hook

    fwd_hooks = [(name, make_hook(index, reduce)) for index, (name, reduce) in enumerate(reductions)]
    with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=fwd_hooks):
        model(tokens)
    silent = [name for (name, _), did in zip(reductions, fired) if not did]
    if silent:
        raise ValueError(f"hook {silent[0]!r} did not fire during the forward pass: the model does not use the hook it names")
    return results


def query_readouts(model: ICLModel, prompt: EncodedPrompt, layers: Sequence[int], grad: bool = False) -> torch.Tensor:
    """The read-out lens: `model.readout` (the model's own final norm and read-out, exactly as in
    training and `predict`) applied to each listed layer's residual stream at the query positions.

    Returns `[batch, len(layers), n_query]` (the model's dtype; in the autograd graph if `grad`).
    """
    names = model.residual_hook_names()
    reductions = [(names[layer], lambda resid: model.readout(prompt.gather_queries(resid))) for layer in layers]
    per_layer = run_with_reductions(model, prompt.tokens, reductions, grad=grad)
    return torch.stack(per_layer, dim=1)


def query_residuals(model: ICLModel, prompt: EncodedPrompt, layers: Sequence[int]) -> torch.Tensor:
    """Each listed layer's residual stream at the query positions, `[batch, len(layers), n_query,
    d_model]` (no gradients)."""
    names = model.residual_hook_names()
    reductions = [(names[layer], prompt.gather_queries) for layer in layers]
    return torch.stack(run_with_reductions(model, prompt.tokens, reductions), dim=1)


def _rows_of_interest(prompt: EncodedPrompt) -> torch.Tensor:
    """Positions whose attention rows the kernels need: support x tokens, then the query tokens
    of one sequence `[n_support + q]`."""
    return torch.cat([prompt.support_positions, prompt.query_positions])


def _split_blocks(rows: torch.Tensor, prompt: EncodedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rows `[batch * groups, head, n_support + q, n_support]` (support rows first, then
    the sequence's query rows; columns = support keys) -> support block `[batch, head, n, n]`
    and query block `[batch, head, n_query, n]`.

    The support block is averaged over a prompt's groups: identical where support tokens never see
    a query (causal layouts, and every concat mask in mi-krr). Query rows are folded back into
    prompts by `EncodedPrompt.gather_queries` itself, pointed at the query rows of `rows`.
    """
    n = prompt.n_support
    support = einops.reduce(rows[:, :, :n], "(batch group) head i j -> batch head i j", "mean", batch=prompt.batch_size)
    query_rows = dataclasses.replace(prompt, query_positions=torch.arange(n, rows.shape[2], device=rows.device))
    query = query_rows.gather_queries(einops.rearrange(rows, "seqs head row key -> seqs row head key"))
    return support, einops.rearrange(query, "batch query head key -> batch head query key")


def attention_blocks(
    model: ICLModel, prompt: EncodedPrompt, source: str = "pattern"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer attention between support x tokens and support / query tokens, reduced in hooks.

    source "pattern": the weights applied (`AttentionHooks.pattern`). "scores": pre-normalisation
    scores from `AttentionHooks.scores` where the model has them (blocked entries carry the
    model's mask value, e.g. -inf), else rebuilt as q . k / sqrt(d_head) from `hook_q`/`hook_k`
    (exact for plain dot-product attention; a model that transforms q and k after those hooks,
    e.g. rotary, must expose `scores`).

    Returns (support `[batch, layer, head, n, n]`, query `[batch, layer, head, n_query, n]`),
    rows = attending token, columns = support keys (x tokens in the interleaved layout).
    """
    rows = _rows_of_interest(prompt)
    keys = prompt.support_positions

    def blocks_of(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [seqs, head, pos, pos]
        return _split_blocks(pattern[:, :, rows][..., keys], prompt)

    reductions: list[tuple[str, Reduction]] = []
    rebuilt: list[bool] = []
    for hooks in model.attention_hook_names():
        if source == "pattern" or hooks.scores is not None:
            reductions.append((hooks.pattern if source == "pattern" else hooks.scores, blocks_of))
            rebuilt.append(False)
        else:  # q fires before k is known: keep q's rows and k's support keys, combine after
            reductions += [(hooks.q, lambda q: q[:, rows]), (hooks.k, lambda k: k[:, keys])]
            rebuilt.append(True)
    results = iter(run_with_reductions(model, prompt.tokens, reductions))
    blocks = []
    for needs_qk in rebuilt:
        if needs_qk:
            q, k = next(results), next(results)  # [seqs, rows, head, d_head], [seqs, n, head, d_head]
            scores = einops.einsum(q, k, "seqs row head e, seqs key head e -> seqs head row key") / q.shape[-1] ** 0.5
            blocks.append(_split_blocks(scores, prompt))
        else:
            blocks.append(next(results))
    support = torch.stack([support for support, _ in blocks], dim=1)
    query = torch.stack([query for _, query in blocks], dim=1)
    return support, query
