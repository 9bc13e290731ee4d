"""How close is an attention head's similarity to a classical kernel?

Softmax attention applies the row-normalised kernel D^-1 K of K = exp(q . k / sqrt(d_head)), so a
head is compared with a reference kernel only after the same normalisation: both matrices are
restricted to the support keys each row may see under the model's structural mask (where the
model has none, e.g. the constructions' per-head masks, the head's nonzero pattern entries) and
each row is scaled to sum to one. A row with no weight on any support key (all of it on its own
token, a y token or a sink) has no pattern over them and is left out of the fit and the metrics.
References: the exponential kernel exp(x . x' / tau) and the Gaussian kernel exp(-|x - x'|^2 / (2 sigma^2)) (`mi_krr.kernels`
conventions), on the raw inputs or a given representation, with tau / sigma fitted per layer and
head (one value pooled over prompts).

The scales are fitted by `probes.kernel_scale_fit`; the comparison uses the metrics of
`probes.alignment_metrics` (relative operator-norm distance, CKA, Spearman rank correlation of the
entries, overall and per row), with each row's reference ranks found once per kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import as_float64, check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.alignment_metrics import ComparisonTerms, compare_terms, sort_with_hint
from probes.attention_kernels import AttentionKernels, attention_kernels
from probes.kernel_scale_fit import (
    REFERENCE_KERNELS, fit_inverse_scale, head_invariant, log_similarity, prompt_chunks, row_normalised_kernel,
)

BLOCKS = ("query", "support")
FITS = ("distance", "log_lstsq")
METRICS = ("operator_distance", "cka", "spearman", "row_spearman")

FLAT_REFERENCE = 0.05
"""A head's fitted reference counts as uniform (the `u` mark) when its rows deviate from uniform
attention by less than this on average over prompts (`KernelAlignment.reference_spread`): at a
fitted scale far beyond the inputs' spread (tau ~ 1000, or sigma ~ 25 on inputs of std 0.7, as
randomly initialised heads fit) the reference is mean pooling to within 5%, and its distance says
how flat the head is, not whether it ranks keys like the kernel."""

ROW_SUM_SLACK = 1e-4
"""How far above 1 an attention row's weight on the support keys may sum before the pattern is
refused as not softmax-normalised (float32 softmax rows sum to 1 within ~1e-6)."""


@dataclass
class KernelAlignment:
    """Alignment of every layer's and head's attention with reference kernels.

    Attributes:
        block: "query" (query x support rows) or "support" (support x support).
        scale: per kernel, the fitted parameter `[layer, head]`: temperature tau for "exp",
            bandwidth sigma for "gaussian". inf: the best reference is uniform over the keys
            (the head attends uniformly, or at least no kernel is closer), always so where the
            similarity is constant over each row's keys, e.g. identical support points or, for
            "exp", queries at 0. NaN: the head puts no weight on this block's support keys from
            any row (no row to fit), or fit="log_lstsq" found it anti-aligned with the kernel
            (beta < 0) or had no two keys of distinct similarity with a weight in any row
            (one-hot attention: no logs to regress).
        metrics: per kernel, per metric (`METRICS`), the mean over prompts `[layer, head]`
            (NaN-ignoring: row Spearman is undefined on rows that see one key, CKA on prompts
            whose block double centring removes: one row, identical rows, a uniform reference).
            Each compares the attention with the reference at the fitted scale, or at tau =
            sigma = inf (uniform) for an anti-aligned head: no exp(beta * S) with beta < 0 is a
            kernel of this family. NaN for a head whose scale is NaN for want of rows or logs
            to fit; per prompt, also NaN where no row of that prompt has weight on the keys.
        per_prompt: the same per prompt `[batch, layer, head]`.
        reference_spread: per kernel, how far the fitted reference is from uniform attention: the
            mean over prompts of max |n_i R_ij - 1| over rows i (with n_i >= 2 visible keys) and
            their keys j `[layer, head]`; 0 at scale inf, below `FLAT_REFERENCE` for a nearly flat
            reference. None in an alignment saved before session 22 (then only scale inf counts
            as uniform).
    """

    __repr__ = compact_repr

    block: str
    scale: dict[str, torch.Tensor]
    metrics: dict[str, dict[str, torch.Tensor]]
    per_prompt: dict[str, dict[str, torch.Tensor]]
    reference_spread: dict[str, torch.Tensor] | None = None

    @property
    def tau(self) -> torch.Tensor:
        """Fitted exp-kernel temperature `[layer, head]`."""
        return self.scale["exp"]

    @property
    def bandwidth(self) -> torch.Tensor:
        """Fitted Gaussian bandwidth `[layer, head]`."""
        return self.scale["gaussian"]

    def best_heads(self, kernel: str) -> tuple[np.ndarray, np.ndarray]:
        """Per layer, the head closest to `kernel` (smallest finite relative operator distance)
        among the heads whose fitted reference ranks the keys (not `uniform_heads`), or among all
        heads where every one is uniform, and that distance: int64 `[layer]` (-1 for a layer
        without a finite distance) and float64 `[layer]` (NaN there). A nearly flat head is
        close to a nearly flat reference whatever it attends to, so it never outranks one that
        ranks keys."""
        if kernel not in self.metrics:
            raise ValueError(f"kernel must be one this alignment measured, one of {tuple(self.metrics)}; got {kernel!r}")
        distance = np.asarray(self.metrics[kernel]["operator_distance"].cpu(), dtype=np.float64)  # [layer, head]
        finite = np.where(np.isfinite(distance), distance, np.inf)
        ranking = np.where(self.uniform_heads(kernel), np.inf, finite)
        ranks = np.isfinite(ranking).any(axis=1, keepdims=True)  # some head of the layer ranks keys
        head = np.where(ranks, ranking, finite).argmin(axis=1)
        best = finite[np.arange(len(head)), head]
        missing = ~np.isfinite(best)
        return np.where(missing, -1, head), np.where(missing, np.nan, best)

    def uniform_heads(self, kernel: str) -> np.ndarray:
        """Whether each head's fitted reference is uniform over the keys, bool `[layer, head]`:
        scale inf, or `reference_spread` below `FLAT_REFERENCE`. Its distance is one to mean
        pooling, not to a kernel that ranks the keys."""
        distance = self.metrics[kernel]["operator_distance"]
        if kernel not in self.scale:  # an alignment built by hand without scales: none known to be uniform
            return np.zeros(tuple(distance.shape), dtype=bool)
        scale = np.asarray(self.scale[kernel].cpu(), dtype=np.float64)  # [layer, head]
        if self.reference_spread is None:
            return np.isinf(scale)
        return np.isinf(scale) | (np.asarray(self.reference_spread[kernel].cpu(), dtype=np.float64) < FLAT_REFERENCE)

    def uniform_best_heads(self, kernel: str) -> np.ndarray:
        """Per layer, whether the head `best_heads(kernel)` picks is uniform (`uniform_heads`),
        bool `[layer]` (False for a layer without a best head): every head of the layer is."""
        head, _ = self.best_heads(kernel)
        return (head >= 0) & self.uniform_heads(kernel)[np.arange(len(head)), np.maximum(head, 0)]

    def plot(self, title: str = "attention"):
        """Heatmaps per block and head of the operator distance, row Spearman and CKA (the
        entry-wise Spearman is in `metrics` only), one row of panels per kernel
        (`probes.plots.plot_alignment`)."""
        from probes.plots import plot_alignment

        return plot_alignment(self, title)

    def to_dict(self) -> dict[str, Any]:
        """Nested lists of floats (inf / NaN stay floats here: pass it through
        `probes.diagnosis.strict_json` before `json.dumps(..., allow_nan=False)`, as
        `Diagnosis.to_json` does, to write them as null)."""
        return {
            "block": self.block,
            "scale": {kernel: value.tolist() for kernel, value in self.scale.items()},
            "metrics": {k: {name: v.tolist() for name, v in ms.items()} for k, ms in self.metrics.items()},
            "per_prompt": {k: {name: v.tolist() for name, v in ms.items()} for k, ms in self.per_prompt.items()},
        }


def kernel_alignment(
    model: ICLModel,
    task: ICLTask,
    kernels: Sequence[str] = REFERENCE_KERNELS,
    representation: tuple[torch.Tensor, torch.Tensor] | None = None,
    block: str = "query",
    fit: str = "distance",
    attention: AttentionKernels | None = None,
) -> KernelAlignment:
    """Compare each head's attention pattern with row-normalised reference kernels.

    Args:
        kernels: any of "exp", "gaussian".
        representation: None (the raw inputs x) or (support features `[batch, n_support, p]`,
            query features `[batch, n_query, p]`) to evaluate the reference kernels on.
        block: "query" compares query x support rows, "support" support x support rows.
        fit: "distance" (1-d bounded minimisation of the squared Frobenius distance, in log
            scale) or "log_lstsq" (least squares on row-centred log-similarities over the weights
            that are normal numbers in the attention's dtype; exact when the attention is exactly
            a row-normalised kernel).
        attention: the model's `attention_kernels(model, task)` (source "pattern") when already
            read, e.g. by `diagnose`'s single streaming pass; None reads it here (one forward,
            keeping only the block compared). Only that block is needed (the other may be None).
    """
    kernels = reference_kernel_names(kernels)
    if not kernels:
        raise ValueError(f"kernels must name at least one of {REFERENCE_KERNELS}")
    check_choice("block", block, BLOCKS)
    check_choice("fit", fit, FITS)
    if attention is None:
        attention = attention_kernels(model, task, source="pattern", blocks=(block,))
    elif not isinstance(attention, AttentionKernels) or attention.source != "pattern":
        raise ValueError("attention must be the AttentionKernels of attention_kernels(model, task, source='pattern'), or None")
    pattern = attention.query if block == "query" else attention.support
    allowed = attention.query_allowed if block == "query" else attention.support_allowed
    if pattern is None:
        raise ValueError(f"attention lacks the {block!r} block that block={block!r} compares: read it with that block")
    rows = task.n_query if block == "query" else task.n_support
    expected = (task.batch_size, rows, task.n_support)
    if (pattern.shape[0], *pattern.shape[-2:]) != expected:
        raise ValueError(
            f"attention's {block} block is [batch, L, H, rows, keys] = {tuple(pattern.shape)}, but this task needs "
            f"batch, rows, keys = {expected}: pass the attention_kernels of this task (or attention=None)"
        )
    smallest_normal = _smallest_normal(pattern)
    pattern = as_float64("attention pattern", pattern)
    if (pattern < 0).any():
        raise ValueError(
            "this model's attention pattern has negative entries (not softmax-normalised): compare "
            "attention_kernels(model, task) with a kernel through alignment_metrics instead"
        )
    support_x, query_x = _representation(task, representation)
    rows_x = query_x if block == "query" else support_x
    support_share = pattern.sum(dim=-1, keepdim=True)  # [B, L, H, r, 1]
    if (support_share > 1.0 + ROW_SUM_SLACK).any():  # a softmax row sums to 1 over all its keys, so to <= 1 over the support
        raise ValueError(
            f"this model's attention rows sum to up to {float(support_share.max()):.3g} over the support keys (not "
            "softmax-normalised, e.g. ReLU attention): compare attention_kernels(model, task) with a kernel through "
            "alignment_metrics instead"
        )
    keys = _visible_keys(pattern, allowed, support_share)  # [B, L, H, r, n]
    attn = pattern / support_share.clamp_min(1e-300)
    min_weight = smallest_normal / support_share  # attn below it: the model's weight was subnormal or 0
    similarities = {
        kernel: log_similarity(kernel, rows_x.to(attn.device), support_x.to(attn.device))[:, None, None] for kernel in kernels
    }
    betas = {kernel: fit_inverse_scale(attn, similarity, keys, fit, min_weight) for kernel, similarity in similarities.items()}
    per_prompt, spread = _alignment_per_prompt(attn, keys, similarities, betas)
    metrics = {kernel: {name: torch.nanmean(value, dim=0) for name, value in values.items()} for kernel, values in per_prompt.items()}
    reference_spread = {kernel: torch.nanmean(value, dim=0) for kernel, value in spread.items()}
    scale = {}
    for kernel, beta in betas.items():
        positive = torch.where(beta >= 0, beta, torch.nan)
        scale[kernel] = positive.reciprocal() if kernel == "exp" else positive.rsqrt()
    return KernelAlignment(block=block, scale=scale, metrics=metrics, per_prompt=per_prompt, reference_spread=reference_spread)


def _visible_keys(pattern: torch.Tensor, allowed: torch.Tensor | None, support_share: torch.Tensor) -> torch.Tensor:
    """The support keys each row may see, bool like pattern `[B, L, H, r, n]`: the model's
    structural mask `allowed` `[r, n]` broadcast (no copy where every row has weight on some key)
    less the rows whose `support_share` (pattern summed over the keys `[B, L, H, r, 1]`) is 0
    (nothing to compare: their weight lies on non-support tokens), or, where the model has none,
    the pattern's nonzero entries (then a softmax weight that underflowed to 0 counts as masked,
    and such rows have no keys either).
    A pattern with weight on a key `allowed` blocks is refused (the mask misstates the model's)."""
    if allowed is None:
        return pattern > 0
    if tuple(allowed.shape) != tuple(pattern.shape[-2:]):
        raise ValueError(
            f"attention's allowed mask is {tuple(allowed.shape)} but its block has rows, keys = {tuple(pattern.shape[-2:])}: "
            "pass the AttentionKernels that attention_kernels(model, task) returns"
        )
    keys = allowed.to(pattern.device).expand_as(pattern)
    if bool(pattern.masked_fill(keys, 0.0).any()):
        raise ValueError(
            "attention puts weight on support keys that the model's allowed_attention(prompt) blocks: the model's "
            "allowed_attention must return the mask its attention applies (True where a token may attend)"
        )
    silent = support_share == 0  # [B, L, H, r, 1]
    return keys & ~silent if bool(silent.any()) else keys


def _smallest_normal(pattern: Any) -> float:
    """The smallest normal number of the pattern's floating dtype (float64's for other input):
    a weight below it has lost its relative precision (subnormal) or underflowed to 0."""
    dtype = getattr(pattern, "dtype", None)
    return torch.finfo(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float64).tiny


def reference_kernel_names(kernels: Any) -> tuple[str, ...]:
    """`kernels` (names from `REFERENCE_KERNELS`, or one name alone) as a tuple; () allowed."""
    if isinstance(kernels, str):
        kernels = (kernels,)
    if not isinstance(kernels, (tuple, list)):
        raise ValueError(f"kernels must name reference kernels from {REFERENCE_KERNELS} (or be () for none), got {kernels!r}")
    for kernel in kernels:
        check_choice("kernels entry", kernel, REFERENCE_KERNELS)
    if len(set(kernels)) != len(kernels):
        raise ValueError(f"kernels must be distinct, got {tuple(kernels)}")
    return tuple(kernels)


def _alignment_per_prompt(attn, keys, similarities, betas) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """`alignment_metrics` of attn `[B, L, H, r, n]` against each kernel's reference at its fitted
    beta `[L, H]` clamped to >= 0 (beta < 0, an anti-aligned head, is no kernel of the family:
    its closest member is uniform, beta = 0), built and compared a chunk of prompts at a time (the
    attention's side prepared once per chunk for every kernel) -> (kernel -> metric -> `[B, L, H]`,
    NaN where beta is; kernel -> the reference's spread `[B, L, H]`, see `_reference_spread`). A reference row orders its keys as the similarity does (exp(beta * S)
    increases with S), so the similarity's order, found once for all heads, is tried first for
    its row ranks (`sort_with_hint` checks it)."""
    visible = head_invariant(keys)
    row_orders = {kernel: sort_with_hint(torch.where(visible, similarity, math.inf))[0] for kernel, similarity in similarities.items()}
    admissible = {kernel: beta.clamp_min(0.0).nan_to_num(0.0)[:, :, None, None] for kernel, beta in betas.items()}
    parts: dict[str, list[dict[str, torch.Tensor]]] = {kernel: [] for kernel in similarities}
    spreads: dict[str, list[torch.Tensor]] = {kernel: [] for kernel in similarities}
    for chunk in prompt_chunks(attn):
        attn_side = ComparisonTerms.of(attn[chunk], keys[chunk])
        for kernel, similarity in similarities.items():
            reference = row_normalised_kernel(admissible[kernel] * similarity[chunk], keys[chunk])
            parts[kernel].append(compare_terms(attn_side, ComparisonTerms.of(reference, keys[chunk], row_orders[kernel][chunk])))
            spreads[kernel].append(_reference_spread(reference, keys[chunk]))
    metrics = {
        kernel: {name: torch.cat([part[name] for part in chunks]).masked_fill(betas[kernel].isnan(), torch.nan) for name in METRICS}
        for kernel, chunks in parts.items()
    }
    return metrics, {kernel: torch.cat(chunks).masked_fill(betas[kernel].isnan(), torch.nan) for kernel, chunks in spreads.items()}


def _reference_spread(reference: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per prompt, layer and head, max |n_i R_ij - 1| over the rows i of the row-normalised
    reference `[b, L, H, r, n]` that see n_i >= 2 of the keys `keys` (bool, broadcastable) and
    their visible keys j -> `[b, L, H]`: 0 for uniform rows (NaN where no row sees two keys)."""
    counts = keys.sum(-1, keepdim=True).to(reference.dtype)  # [.., r, 1]
    compared = keys & (counts > 1)
    deviation = torch.where(compared, (reference * counts - 1.0).abs(), 0.0).amax(dim=(-2, -1))
    return deviation.masked_fill(~compared.expand_as(reference).any(dim=-1).any(dim=-1), torch.nan)


def _representation(task: ICLTask, representation: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(support `[B, n, p]`, query `[B, m, p]`) float64 points for the reference kernels."""
    if representation is None:
        return task.x_support.detach().to(torch.float64), task.x_query.detach().to(torch.float64)
    if not isinstance(representation, (tuple, list)) or len(representation) != 2:
        raise ValueError("representation must be None or a pair (support features [batch, n, p], query features [batch, m, p])")
    support = as_float64("representation[0]", representation[0]).detach()
    query = as_float64("representation[1]", representation[1]).detach()
    expected = [(task.batch_size, task.n_support), (task.batch_size, task.n_query)]
    for name, value, (batch, count) in zip(("representation[0]", "representation[1]"), (support, query), expected):
        if value.dim() != 3 or tuple(value.shape[:2]) != (batch, count):
            raise ValueError(f"{name} must be [batch={batch}, {count}, p], got shape {tuple(value.shape)}")
    if support.shape[-1] != query.shape[-1]:
        raise ValueError("representation's support and query features must have the same width p")
    return support, query
