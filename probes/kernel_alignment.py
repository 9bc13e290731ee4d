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

Metrics (`alignment_metrics`, usable on any matrices): relative operator-norm distance, CKA of the
centred matrices, and Spearman rank correlation of the entries, overall and per row. Report the
rank correlations beside the distances: a smoother can have small distances (and plausible
prediction error) while ranking neighbours almost at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import as_float64, check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.attention_kernels import AttentionKernels, attention_kernels

REFERENCE_KERNELS = ("exp", "gaussian")
BLOCKS = ("query", "support")
FITS = ("distance", "log_lstsq")
METRICS = ("operator_distance", "cka", "spearman", "row_spearman")

ROW_SUM_SLACK = 1e-4
"""How far above 1 an attention row's weight on the support keys may sum before the pattern is
refused as not softmax-normalised (float32 softmax rows sum to 1 within ~1e-6)."""

CENTRED_RESIDUE = 1e-12
"""Centring removed everything when what is left has a norm of at most this fraction of the
uncentred norm: the rest is rounding residue, which grows with the entries a mean runs over
(measured: ~1e-16 for a [1, n] block, ~2e-14 for 1000 identical rows), while a real spread
(e.g. float32 attention that is not exactly uniform, ~1e-7) lies far above. Used for the
double-centred matrices CKA compares (`alignment_metrics`), for the row-centred similarity a
scale is fitted to (`fit_inverse_scale`), and for the product of row-centred log attention and
similarity that log_lstsq's slope divides (uniform attention: residue, so beta = 0)."""


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
    """

    __repr__ = compact_repr

    block: str
    scale: dict[str, torch.Tensor]
    metrics: dict[str, dict[str, torch.Tensor]]
    per_prompt: dict[str, dict[str, torch.Tensor]]

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
        and that distance: int64 `[layer]` (-1 for a layer without a finite distance) and float64
        `[layer]` (NaN there)."""
        if kernel not in self.metrics:
            raise ValueError(f"kernel must be one this alignment measured, one of {tuple(self.metrics)}; got {kernel!r}")
        distance = np.asarray(self.metrics[kernel]["operator_distance"].cpu(), dtype=np.float64)  # [layer, head]
        finite = np.where(np.isfinite(distance), distance, np.inf)
        head = finite.argmin(axis=1)
        best = finite[np.arange(len(head)), head]
        missing = ~np.isfinite(best)
        return np.where(missing, -1, head), np.where(missing, np.nan, best)

    def uniform_best_heads(self, kernel: str) -> np.ndarray:
        """Per layer, whether the head `best_heads(kernel)` picks has a fitted scale of inf, bool
        `[layer]` (False for a layer without a best head): its closest reference is uniform over
        the keys, so its distance is one to mean pooling, not to a kernel that ranks the keys."""
        head, _ = self.best_heads(kernel)
        scale = np.asarray(self.scale[kernel].cpu(), dtype=np.float64)  # [layer, head]
        return (head >= 0) & np.isinf(scale[np.arange(len(head)), np.maximum(head, 0)])

    def plot(self, title: str = "attention"):
        """Heatmaps per block and head of the operator distance, row Spearman and CKA (the
        entry-wise Spearman is in `metrics` only), one row of panels per kernel
        (`probes.plots.plot_alignment`)."""
        from probes.plots import plot_alignment

        return plot_alignment(self, title)

    def to_dict(self) -> dict[str, Any]:
        """Nested lists of floats (inf / NaN stay floats here: pass it through
        `probes.diagnose.strict_json` before `json.dumps(..., allow_nan=False)`, as
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
    per_prompt = _alignment_per_prompt(attn, keys, similarities, betas)
    metrics = {kernel: {name: torch.nanmean(value, dim=0) for name, value in values.items()} for kernel, values in per_prompt.items()}
    scale = {}
    for kernel, beta in betas.items():
        positive = torch.where(beta >= 0, beta, torch.nan)
        scale[kernel] = positive.reciprocal() if kernel == "exp" else positive.rsqrt()
    return KernelAlignment(block=block, scale=scale, metrics=metrics, per_prompt=per_prompt)


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


def _alignment_per_prompt(attn, keys, similarities, betas) -> dict[str, dict[str, torch.Tensor]]:
    """`alignment_metrics` of attn `[B, L, H, r, n]` against each kernel's reference at its fitted
    beta `[L, H]` clamped to >= 0 (beta < 0, an anti-aligned head, is no kernel of the family:
    its closest member is uniform, beta = 0), built and compared a chunk of prompts at a time (the
    attention's side prepared once per chunk for every kernel) -> kernel -> metric -> `[B, L, H]`,
    NaN where beta is. A reference row orders its keys as the similarity does (exp(beta * S)
    increases with S), so the similarity's order, found once for all heads, is tried first for
    its row ranks (`_sorted` checks it)."""
    visible = _head_invariant(keys)
    row_orders = {kernel: _sorted(torch.where(visible, similarity, math.inf))[0] for kernel, similarity in similarities.items()}
    admissible = {kernel: beta.clamp_min(0.0).nan_to_num(0.0)[:, :, None, None] for kernel, beta in betas.items()}
    parts = {kernel: [] for kernel in similarities}
    for chunk in _prompt_chunks(attn):
        attn_side = _ComparisonTerms.of(attn[chunk], keys[chunk])
        for kernel, similarity in similarities.items():
            reference = row_normalised_kernel(admissible[kernel] * similarity[chunk], keys[chunk])
            parts[kernel].append(_compare(attn_side, _ComparisonTerms.of(reference, keys[chunk], row_orders[kernel][chunk])))
    return {
        kernel: {name: torch.cat([part[name] for part in chunks]).masked_fill(betas[kernel].isnan(), torch.nan) for name in METRICS}
        for kernel, chunks in parts.items()
    }


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


def log_similarity(kernel: str, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """log k(row, key) at unit scale: x . x' for "exp" (so exp kernel = exp(S / tau)), and
    -|x - x'|^2 / 2 for "gaussian" (so Gaussian kernel = exp(S / sigma^2)), the distances from
    the differences (0 for identical points: the expansion |x|^2 + |x'|^2 - 2 x . x' would leave
    rounding residue there, which a fitted scale would read as spread).

    rows `[..., r, p]`, keys `[..., n, p]` -> `[..., r, n]`."""
    check_choice("kernel", kernel, REFERENCE_KERNELS)
    if kernel == "exp":
        return rows @ keys.mT
    return -0.5 * torch.cdist(rows, keys, compute_mode="donot_use_mm_for_euclid_dist").square()


def row_normalised_kernel(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """exp(logits) restricted to `keys` (bool, broadcastable to logits) with each row summing to
    one: the softmax over the visible keys. Rows with no visible key are all zero."""
    return _normalised_exp(_max_shifted(logits, keys))


def _normalised_exp(shifted: torch.Tensor) -> torch.Tensor:
    """exp of logits whose row maximum is 0 (-inf off the keys), each row divided by its sum
    (rows with no key, all -inf, stay zero)."""
    kernel = shifted.exp()
    return kernel / kernel.sum(-1, keepdim=True).clamp_min(1.0)  # the row maximum contributes 1


def _max_shifted(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """logits minus their row maximum over `keys`, -inf off the keys (rows without keys: all -inf)."""
    masked = torch.where(keys, logits, -math.inf)
    row_max = masked.amax(-1, keepdim=True)
    return masked - row_max.masked_fill(row_max == float("-inf"), 0.0)


CHUNK_VALUES = 2**18
"""Numbers per tensor when work is split into chunks of prompts (2 MiB of float64): temporaries
stay in the 1-2 MiB caches per core and are reused by the allocator instead of being mapped afresh
each time, while each chunk's ~50 torch ops still see enough prompts to amortise their dispatch.
`benchmarks/bench_analysis.py` times 2^16 .. 2^19 (2 threads, 256 prompts, query block, two
runs): shipped softmax_gp 178-197, 152-170, 143-165, 189-228 ms; with `--scale`, a 12-layer,
8-head model (40 keys) 2154, 1882, 1772, 1644 ms."""


def _prompt_chunks(attn: torch.Tensor, values_per_prompt: int | None = None) -> list[slice]:
    """Slices of the prompts (dim 0 of attn `[B, ...]`) holding about `CHUNK_VALUES` numbers each
    (`values_per_prompt` numbers per prompt, by default those of attn)."""
    if values_per_prompt is None:
        values_per_prompt = attn[0].numel()
    step = max(1, CHUNK_VALUES // max(values_per_prompt, 1))
    return [slice(start, start + step) for start in range(0, attn.shape[0], step)]


def _summed_over_prompts(
    terms: Callable[..., tuple[torch.Tensor, ...]], tensors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """`terms(*chunk)` summed over chunks of the prompts of `tensors` (each `[B, ...]`; the first
    sets the chunk length)."""
    totals = None
    for chunk in _prompt_chunks(tensors[0]):
        values = terms(*(tensor[chunk] for tensor in tensors))
        totals = values if totals is None else tuple(total + value for total, value in zip(totals, values))
    return totals


def fit_inverse_scale(
    attn: torch.Tensor,
    similarity: torch.Tensor,
    keys: torch.Tensor,
    fit: str = "distance",
    min_weight: float | torch.Tensor = torch.finfo(torch.float64).tiny,
) -> torch.Tensor:
    """Fit beta per layer and head so row-normalised exp(beta * similarity) matches `attn`.

    attn `[B, L, H, r, n]` (rows sum to one over `keys`), similarity broadcastable to it, keys
    bool like attn -> beta `[L, H]` (pooled over prompts and rows; NaN for a head with no key in
    any row). min_weight: a float, or a tensor broadcastable to attn (e.g. per row
    `[B, L, H, r, 1]`). A head whose similarity is constant over each row's keys
    (`_discriminates`) has a reference that is uniform over the keys at every beta: beta = 0.
    Otherwise, "log_lstsq": least squares of row-centred log attn on row-centred similarity
    (through the origin) over the
    weights of at least `min_weight` (an underflowed or subnormal weight's log says nothing of the
    similarity), both centred over those keys (`_log_lstsq_beta`). "distance": the mean squared
    Frobenius distance minimised over log beta within `LOG_SCALE_HALF_WIDTH` of the log_lstsq value
    (of 1 / the RMS of the centred similarity where that value is not > 0), from the best point
    of a grid by safeguarded Newton steps with the exact first and second derivatives; then beta
    = 0 (uniform over the keys) if that is at least as close. The log_lstsq beta may be < 0
    (attention anti-aligned with the kernel) or NaN (no logs to regress); "distance" gives beta >= 0.
    """
    similarity, keys = _head_invariant(similarity.expand_as(attn)), _head_invariant(keys)
    kept = keys & (attn >= min_weight)  # [B, L, H, r, n]
    sums = _LogFitSums(*_summed_over_prompts(_log_fit_sums, (attn, similarity, keys, kept)))
    discriminates = _discriminates(sums.centred_similarity_square, sums.similarity_square).expand_as(sums.cross)  # [L, H]
    beta = torch.where(discriminates, _log_lstsq_beta(sums), 0.0)
    if fit == "distance" and bool(discriminates.any()):
        beta = _distance_fit(attn, similarity, keys, beta, sums, discriminates)
    return torch.where(sums.key_count > 0, beta, torch.nan)


def _distance_fit(attn, similarity, keys, log_lstsq_beta, sums: _LogFitSums, discriminates: torch.Tensor) -> torch.Tensor:
    """`fit_inverse_scale`'s "distance" beta `[L, H]` (0 where the similarity does not
    discriminate), searched around the log_lstsq beta `[L, H]`. The Newton steps start from the
    grid's best point or, where the exact distance is smaller there, the search's centre: the
    grid's expanded form cannot rank points whose distance lies below its rounding (a sharp head
    that is exactly a kernel), and Newton steps crawl across a distance that falls doubly
    exponentially in log beta (~1 / (beta * similarity gap) per step)."""
    spread = sums.centred_similarity_square.div(sums.key_count).sqrt()
    centre = torch.where(log_lstsq_beta > 0, log_lstsq_beta.log(), -spread.log())  # [L, H]
    centre = torch.where(discriminates, centre, centre[discriminates].min())  # the rest: beta = 0 whatever the search finds
    low, high = centre - LOG_SCALE_HALF_WIDTH, centre + LOG_SCALE_HALF_WIDTH
    start = _grid_minimum(attn, similarity, keys, low, high)
    log_beta, loss = _newton_minimum(_distance_in_log_scale(attn, similarity, keys), start, low, high, alternative=centre)
    uniform_loss = _summed_over_prompts(_uniform_distance, (attn, keys))[0] / attn.shape[0]
    return torch.where(discriminates & (loss < uniform_loss), log_beta.exp(), 0.0)


LOG_SCALE_HALF_WIDTH = 7.0
"""The distance fit searches log beta within +-7 of the log_lstsq start (a factor e^7 ~ 1100)."""

GRID_CHAINS = 3
"""The distance fit's grid in log beta: the multiples of ln(2) / GRID_CHAINS in each head's range,
shared by the heads that see the same similarity and keys. exp(2 beta S) = exp(beta S)^2, so the
kernels of all points but the lowest GRID_CHAINS are squares of the kernel ln 2 below."""

GRID_SPACING = math.log(2.0) / GRID_CHAINS

NEWTON_XTOL = 1e-5
"""The distance fit stops once no head's Newton step in log beta exceeds this: with Newton's
quadratic convergence the step taken leaves log beta within ~1e-10 of the minimiser."""


def _head_invariant(value: torch.Tensor) -> torch.Tensor:
    """value `[B, L, H, ...]` -> the view `[B, 1, 1, ...]` if every layer and head holds the same,
    else value."""
    first = value[:, :1, :1]
    broadcast = all(value.stride(dim) == 0 or value.shape[dim] == 1 for dim in (1, 2))
    return first if broadcast or torch.equal(value, first.expand_as(value)) else value


class _LogFitSums(NamedTuple):
    """Sums over prompts and rows that both fits start from, each `[L, H]` (or `[1, 1]` where
    head-invariant). Over each row's keys: their number, |similarity|^2 and |row-centred
    similarity|^2. Over its kept keys (weight >= min_weight), both centred over them: row-centred
    log attn . similarity (`cross`), |similarity|^2 and |uncentred log attn|^2."""

    key_count: torch.Tensor
    similarity_square: torch.Tensor
    centred_similarity_square: torch.Tensor
    cross: torch.Tensor
    kept_similarity_square: torch.Tensor
    log_square: torch.Tensor


def _log_fit_sums(attn: torch.Tensor, similarity: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor) -> _LogFitSums:
    """`_LogFitSums` of attn `[b, L, H, r, n]`, similarity, keys and kept (the keys whose weight
    log_lstsq reads) broadcastable to it, pooled over prompts and rows. Centring the log attn as
    well as the similarity (which alone would do in exact arithmetic) removes the rounding residue
    that a row's mean log weight times the similarity's centred sum would leave."""
    weight = keys.to(attn.dtype)
    kept_weight = kept.to(attn.dtype)
    log_attn = torch.where(kept, attn.log(), 0.0)
    kept_similarity = _row_centred(similarity, kept_weight)
    pooled = (0, 3, 4)
    return _LogFitSums(
        key_count=weight.sum(pooled),
        similarity_square=(similarity * weight).square().sum(pooled),
        centred_similarity_square=_row_centred(similarity, weight).square().sum(pooled),
        cross=(_row_centred(log_attn, kept_weight) * kept_similarity).sum(pooled),
        kept_similarity_square=kept_similarity.square().sum(pooled),
        log_square=log_attn.square().sum(pooled),
    )


def _row_centred(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """values `[..., n]` minus their mean over each row's keys (weight 1, else 0), 0 off the keys."""
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    return (values - (values * weight).sum(-1, keepdim=True) / count) * weight


def _discriminates(centred_square: torch.Tensor, square: torch.Tensor) -> torch.Tensor:
    """Whether row-centred values (squared norm `centred_square`) keep more than `CENTRED_RESIDUE`
    of the values' norm (`square`): less is rounding residue, the values constant over each row."""
    return centred_square > CENTRED_RESIDUE**2 * square


def _log_lstsq_beta(sums: _LogFitSums) -> torch.Tensor:
    """The least-squares slope of row-centred log attn on row-centred similarity over the kept
    keys `[L, H]`: 0 where their product is rounding residue (at most `CENTRED_RESIDUE` of
    |log attn| |centred similarity|: attention uniform over the keys to rounding); NaN where the
    similarity is constant over each row's kept keys (no two keys of distinct similarity keep a
    weight, e.g. one-hot attention: nothing to regress)."""
    kept_similarity_square = sums.kept_similarity_square.expand_as(sums.cross)
    related = sums.cross.abs() > CENTRED_RESIDUE * (sums.log_square * kept_similarity_square).sqrt()
    beta = torch.where(related, sums.cross / kept_similarity_square, 0.0)
    return torch.where(_discriminates(kept_similarity_square, sums.similarity_square), beta, torch.nan)


def _uniform_distance(attn: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor]:
    """Squared distance of attn to the uniform rows over the keys, summed over prompts `[L, H]`."""
    weight = keys.to(attn.dtype)
    uniform = weight / weight.sum(-1, keepdim=True).clamp_min(1.0)
    return ((uniform - attn).square().sum((0, 3, 4)),)


def _grid_minimum(attn, similarity, keys, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Each head's best log beta on the grid within [low, high] `[L, H]`, moved to the vertex of
    the parabola through it and its neighbours (by at most one spacing) -> `[L, H]`."""
    points = GRID_SPACING * torch.arange(
        math.floor(float(low.min()) / GRID_SPACING),
        math.ceil(float(high.max()) / GRID_SPACING) + 1,
        dtype=attn.dtype,
        device=attn.device,
    )
    if similarity.shape[1:3] == (1, 1) and keys.shape[1:3] == (1, 1):
        losses = _grid_losses(attn.flatten(1, 2), similarity[:, 0, 0], keys[:, 0, 0], points)
    else:  # each head sees its own similarity or keys
        similarity, keys = similarity.expand_as(attn), keys.expand_as(attn)
        heads = [(layer, head) for layer in range(attn.shape[1]) for head in range(attn.shape[2])]
        losses = torch.cat([
            _grid_losses(attn[:, layer, head, None], similarity[:, layer, head], keys[:, layer, head], points) for layer, head in heads
        ])
    losses = losses.unflatten(0, attn.shape[1:3])
    inside = (points >= low[..., None]) & (points <= high[..., None])
    losses = losses.masked_fill(~inside, float("inf"))  # [L, H, K]
    best = losses.argmin(-1, keepdim=True)
    below, here, above = (losses.gather(-1, (best + step).clamp(0, points.numel() - 1))[..., 0] for step in (-1, 0, 1))
    grid_best = points[best[..., 0]]
    curvature = below - 2 * here + above  # inf or NaN where a neighbour lies outside [low, high]
    vertex = grid_best + 0.5 * GRID_SPACING * (below - above) / curvature
    parabola = torch.isfinite(curvature) & (curvature > 0)
    start = torch.where(parabola, vertex, grid_best).clamp(grid_best - GRID_SPACING, grid_best + GRID_SPACING)
    return start.clamp(low, high)


def _grid_losses(attn: torch.Tensor, similarity: torch.Tensor, keys: torch.Tensor, log_betas: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each head's attention to row-normalised exp(beta * similarity) at
    each grid point: attn `[B, G, r, n]` (G heads sharing similarity and keys `[B, r, n]`),
    log_betas `[K]` (spaced by `GRID_SPACING`) -> `[G, K]`. Expanded as |attn|^2 + |reference|^2
    - 2 attn . reference, the cross term of all heads and points one matrix product per chunk."""
    shifted = _max_shifted(similarity, keys)
    total = torch.linalg.vecdot(attn, attn).sum((0, 2))[:, None]  # [G, 1]
    for chunk in _prompt_chunks(shifted, shifted[0].numel() * log_betas.numel()):
        kernels = _grid_kernels(shifted[chunk], log_betas)
        reference = (kernels / kernels.sum(-1, keepdim=True).clamp_min(1.0)).flatten(1)  # [K, b * r * n]
        targets = attn[chunk].transpose(0, 1).flatten(1)  # [G, b * r * n]
        total = total + reference.square().sum(-1) - 2 * targets @ reference.mT
    return total / attn.shape[0]


def _grid_kernels(shifted: torch.Tensor, log_betas: torch.Tensor) -> torch.Tensor:
    """exp(beta * shifted) for each grid point: shifted `[...]` (row maxima 0), log_betas `[K]`
    spaced by ln(2) / GRID_CHAINS -> `[K, ...]`, each point past the first GRID_CHAINS the square
    of the one ln 2 below (relative error ~2^k eps after k squarings: ample to pick a bracket)."""
    kernels = torch.empty(log_betas.numel(), *shifted.shape, dtype=shifted.dtype, device=shifted.device)
    first = kernels[:GRID_CHAINS]
    torch.exp(log_betas[:GRID_CHAINS].exp().reshape(-1, *[1] * shifted.dim()) * shifted, out=first)
    for start in range(GRID_CHAINS, log_betas.numel(), GRID_CHAINS):
        below = kernels[start - GRID_CHAINS : start]
        kernels[start : start + GRID_CHAINS] = below[: log_betas.numel() - start].square()
    return kernels


def _distance_in_log_scale(attn: torch.Tensor, similarity: torch.Tensor, keys: torch.Tensor):
    """log beta `[L, H]` -> (mean squared distance, its first and second derivatives in log beta),
    each `[L, H]`."""
    shifted = _max_shifted(similarity, keys)
    finite = shifted.masked_fill(~keys, 0.0)

    def distance(log_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta = log_beta.exp()
        terms = _summed_over_prompts(lambda *chunk: _distance_terms(beta, *chunk), (attn, shifted, finite))
        loss, slope, curve = (term / attn.shape[0] for term in terms)
        return loss, beta * slope, beta * slope + beta.square() * curve  # d/du = beta d/dbeta

    return distance


def _distance_terms(beta: torch.Tensor, attn: torch.Tensor, shifted: torch.Tensor, finite: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Squared distance of attn `[b, L, H, r, n]` to the reference R = row-normalised
    exp(beta * S), and its first and second derivatives in beta `[L, H]`, summed over prompts
    and rows: with D = S - R.S (row-wise), dR/dbeta = R * D and d2R/dbeta2 = R * (D^2 - R.D^2).
    shifted: `_max_shifted(S, keys)`; finite: the same with 0 off the keys."""
    reference = _normalised_exp(beta[:, :, None, None] * shifted)
    deviation = finite - torch.linalg.vecdot(reference, finite).unsqueeze(-1)
    gap = reference - attn
    moved = reference * deviation
    spread = moved * deviation
    dot = torch.linalg.vecdot
    second = dot(moved, moved) + dot(gap, spread) - spread.sum(-1) * dot(gap, reference)  # sum of R'^2 + (R - attn) R''
    summed = (dot(gap, gap), 2 * dot(gap, moved), 2 * second)
    return tuple(term.sum((0, 3)) for term in summed)


def _newton_minimum(
    distance, start: torch.Tensor, low: torch.Tensor, high: torch.Tensor, alternative: torch.Tensor | None = None, max_steps: int = 200
):
    """Minimise distance (log beta `[L, H]` -> (value, first, second derivative)) per head within
    [low, high] from `start` (or, per head, from `alternative` where the distance is smaller
    there), down to the local minimum there: Newton steps of at most one grid
    spacing (downhill ones where the curvature is not positive), kept inside a bracket that each
    derivative's sign shrinks (a step leaving it goes to its end if that is still unevaluated,
    else to its midpoint), until every step is below `NEWTON_XTOL` -> (log beta, value at the
    last evaluated point), each `[L, H]`. The steps need no accurate grid: where the distance is
    below the rounding of the grid's expanded form (attention that is exactly a kernel), they
    walk to the minimum from wherever the grid pointed."""
    point = start
    value, slope, curve = distance(point)
    if alternative is not None:
        other = distance(alternative)
        closer = other[0] < value
        point = torch.where(closer, alternative, point)
        value, slope, curve = (torch.where(closer, new, old) for new, old in zip(other, (value, slope, curve)))
    low_fresh, high_fresh = torch.ones_like(start, dtype=torch.bool), torch.ones_like(start, dtype=torch.bool)
    for _ in range(max_steps):
        step = torch.where(curve > 0, -slope / curve, -slope.sign() * math.inf)  # no positive curvature: downhill
        step = step.nan_to_num(0.0).clamp(-GRID_SPACING, GRID_SPACING)  # NaN: slope 0, stay
        low, low_fresh = torch.where(slope <= 0, point, low), low_fresh & (slope > 0)
        high, high_fresh = torch.where(slope >= 0, point, high), high_fresh & (slope < 0)
        target = point + step
        middle = (low + high) / 2
        target = torch.where(target < low, torch.where(low_fresh, low, middle), target)
        target = torch.where(target > high, torch.where(high_fresh, high, middle), target)
        if bool(((target - point).abs() <= NEWTON_XTOL).all()):
            return target, value
        point = target
        value, slope, curve = distance(point)
    return point, value


def alignment_metrics(K_attn: Any, K_ref: Any, mask: Any = None) -> dict[str, torch.Tensor]:
    """Compare matrices `[..., r, c]` (batched over leading dimensions) -> dict of `[...]`
    float64 tensors:

    - operator_distance: ||K_attn - K_ref||_2 / ||K_ref||_2 (spectral norm);
    - cka: <H_r K_attn H_c, H_r K_ref H_c>_F / (||H_r K_attn H_c||_F ||H_r K_ref H_c||_F), H the
      centring matrices (for square Gram matrices, the usual kernel CKA); NaN where centring
      removes either matrix (0/0: one row or column, identical rows or columns, M_ij = a_i + b_j),
      i.e. leaves at most `CENTRED_RESIDUE` of its Frobenius norm, rounding residue;
    - spearman: Spearman rank correlation of all entries (ties get average ranks);
    - row_spearman: mean over rows of the per-row Spearman correlation (rows with fewer than two
      entries, or constant ones, are skipped; NaN if none is left).

    `mask` (bool `[..., r, c]`, optional) restricts the rank correlations to its entries; the two
    matrices should agree (e.g. both zero) off the mask, which the norms see.
    """
    attn = as_float64("K_attn", K_attn, min_dim=2).detach()
    ref = as_float64("K_ref", K_ref, min_dim=2).detach().to(attn.device)
    if attn.shape != ref.shape:
        raise ValueError(f"K_attn and K_ref must have the same shape, got {tuple(attn.shape)} and {tuple(ref.shape)}")
    if mask is None:
        mask = torch.ones_like(attn, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=attn.device)
        if mask.dtype != torch.bool or mask.shape != attn.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(attn.shape)}")
    return _compare(_ComparisonTerms.of(attn, mask), _ComparisonTerms.of(ref, mask))


@dataclass
class _ComparisonTerms:
    """What `alignment_metrics` needs of one side: the matrices `[..., r, c]`, their double-centred
    form and its Frobenius norm `[...]` (NaN where centring removed them, `_centred_norm`), and
    their ranks over the mask centred on their mean (0 off the mask), over all entries
    `[..., r * c]` and per row `[..., r, c]`."""

    matrices: torch.Tensor
    centred: torch.Tensor
    centred_norm: torch.Tensor
    ranks: torch.Tensor
    row_ranks: torch.Tensor

    @classmethod
    def of(cls, matrices: torch.Tensor, mask: torch.Tensor, row_order: torch.Tensor | None = None) -> "_ComparisonTerms":
        """row_order: a permutation likely to sort each row (int64, broadcastable to matrices)."""
        unit = matrices / _largest_entry(matrices)  # CKA is scale-free: keep its squares finite
        centred = _double_centre(unit)
        return cls(
            matrices=matrices,
            centred=centred,
            centred_norm=_centred_norm(unit, centred),
            ranks=_centred_ranks(matrices.flatten(-2), mask.flatten(-2)),
            row_ranks=_centred_ranks(matrices, mask, row_order),
        )


def _compare(attn: _ComparisonTerms, ref: _ComparisonTerms) -> dict[str, torch.Tensor]:
    """`alignment_metrics` from both sides' terms."""
    operator = _spectral_norm(attn.matrices - ref.matrices) / _spectral_norm(ref.matrices)
    cka = torch.linalg.vecdot(attn.centred.flatten(-2), ref.centred.flatten(-2)) / (attn.centred_norm * ref.centred_norm)
    return {
        "operator_distance": operator,
        "cka": cka,
        "spearman": _rank_correlation(attn.ranks, ref.ranks),
        "row_spearman": torch.nanmean(_rank_correlation(attn.row_ranks, ref.row_ranks), dim=-1),
    }


def _spectral_norm(matrices: torch.Tensor) -> torch.Tensor:
    """Largest singular value of matrices `[..., r, c]` -> `[...]`: the root of the largest
    eigenvalue of the Gram matrix on the smaller side (several times cheaper than an SVD), formed
    from the matrices divided by their largest |entry| so that it neither overflows nor
    underflows (unnormalised exp kernels reach 1e160)."""
    scale = _largest_entry(matrices)
    unit = matrices / scale
    gram = unit @ unit.mT if unit.shape[-2] <= unit.shape[-1] else unit.mT @ unit
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt() * scale[..., 0, 0]


def _largest_entry(matrices: torch.Tensor) -> torch.Tensor:
    """max |entry| of each matrix `[..., r, c]` -> `[..., 1, 1]` (1 for a zero matrix)."""
    largest = matrices.abs().amax((-2, -1), keepdim=True)
    return torch.where(largest > 0, largest, 1.0)


def _centred_norm(matrices: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the double-centred matrices `[..., r, c]` -> `[...]`, NaN where it is at
    most `CENTRED_RESIDUE` of the matrices' own norm (centring removed them; so CKA is NaN)."""
    norm = torch.linalg.matrix_norm(centred)
    return torch.where(norm > CENTRED_RESIDUE * torch.linalg.matrix_norm(matrices), norm, torch.nan)


def _double_centre(matrix: torch.Tensor) -> torch.Tensor:
    """H_r M H_c: subtract row and column means, add back the grand mean."""
    return (
        matrix
        - matrix.mean(-1, keepdim=True)
        - matrix.mean(-2, keepdim=True)
        + matrix.mean((-2, -1), keepdim=True)
    )


def _centred_ranks(values: torch.Tensor, mask: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks along the last axis among the `mask`ed entries (ties share their average rank, as in
    scipy.stats.rankdata), minus their mean; 0 off the mask. `[..., m]` -> `[..., m]`. hint: a
    permutation likely to sort the values (see `_sorted`)."""
    order, ordered = _sorted(values.masked_fill(~mask, math.inf), hint)  # entries off the mask sort last
    position = torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device).expand_as(ordered)
    count = mask.sum(-1, keepdim=True)
    tied = (ordered[..., 1:] == ordered[..., :-1]) & (position[..., 1:] <= count)
    sorted_ranks = _tie_averaged(position, tied) if bool(tied.any()) else position
    ranks = torch.empty_like(ordered).scatter_(-1, order, sorted_ranks)
    return torch.where(mask, ranks - (count + 1) / 2, 0.0)  # the mean of ranks 1..count is (count + 1) / 2


def _sorted(values: torch.Tensor, hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, values in that order): the permutation sorting values `[..., m]` (no NaN) along the
    last axis. Tried first: `hint` (int64, broadcastable to values) if given, else the order of one
    fast sort of packed keys (`_packed_key_order`); rows these leave unsorted are argsorted."""
    order = hint.expand_as(values) if hint is not None else _packed_key_order(values)
    ordered = values.gather(-1, order)
    unsorted = (ordered[..., 1:] < ordered[..., :-1]).any(-1)
    if bool(unsorted.any()):
        order = order.clone()
        order[unsorted] = torch.from_numpy(np.argsort(values[unsorted].cpu().numpy(), axis=-1)).to(values.device)
        ordered[unsorted] = values[unsorted].gather(-1, order[unsorted])
    return order, ordered


def _packed_key_order(values: torch.Tensor) -> torch.Tensor:
    """A permutation sorting float64 values `[..., m]` along the last axis up to values within
    2^k ulp of each other (k = bits of m - 1): one sort of int64 keys, each value's
    order-preserving bit pattern with its lowest k bits replaced by its position (NumPy sorts
    plain numbers several times faster than it argsorts)."""
    bits = values.detach().cpu().contiguous().numpy().view(np.int64)
    monotone = bits ^ ((bits >> 63) & np.int64(0x7FFF_FFFF_FFFF_FFFF))  # signed order = float order
    low = np.int64((1 << max(1, (values.shape[-1] - 1).bit_length())) - 1)
    keys = (monotone & ~low) | np.arange(values.shape[-1], dtype=np.int64)
    return torch.from_numpy(np.sort(keys, axis=-1) & low).to(values.device)


def _tie_averaged(position: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """Positions 1..m `[..., m]` of sorted values with each run of ties (tied `[..., m - 1]`: entry
    i equals entry i + 1) replaced by the run's mean position (`position` must hold 1..m; it sets
    the shape and dtype), computed as last - (size - 1) / 2: each entry's
    run index by a cumulative sum, run sizes by one scatter-add, run ends by a cumulative sum of
    the sizes (cheaper than scans of running maxima and minima, which torch pairs with
    indices)."""
    run = torch.cat([torch.zeros_like(tied[..., :1]), ~tied], -1).cumsum(-1)  # run index from 0 [..., m]
    size = torch.zeros_like(position).scatter_add_(-1, run, torch.ones_like(position))  # 0 past the last run
    return size.cumsum(-1).gather(-1, run) - (size.gather(-1, run) - 1) / 2


def _rank_correlation(ranks_a: torch.Tensor, ranks_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of centred ranks `[..., m]` -> `[...]` (NaN where fewer than two
    entries or a constant vector: a zero norm)."""
    denominator = (torch.linalg.vecdot(ranks_a, ranks_a) * torch.linalg.vecdot(ranks_b, ranks_b)).sqrt()
    correlation = torch.linalg.vecdot(ranks_a, ranks_b) / denominator
    return torch.where(denominator > 0, correlation, torch.nan)
