"""Fitting the scale of a reference kernel to attention: the beta for which the row-normalised
exp(beta * S) of a log-similarity S (`log_similarity`: x . x' for the exp kernel, -|x - x'|^2 / 2
for the Gaussian) is closest to a head's attention rows, one value per layer and head pooled over
prompts (`fit_inverse_scale`): least squares on row-centred logs ("log_lstsq"), or the squared
Frobenius distance minimised in log beta from a grid by safeguarded Newton steps ("distance").

Work over prompts runs in chunks of about `CHUNK_VALUES` numbers (`prompt_chunks`,
`summed_over_prompts`), which `probes.kernel_alignment` shares.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from mi_krr._validation import check_choice
from probes.alignment_metrics import CENTRED_RESIDUE

REFERENCE_KERNELS = ("exp", "gaussian")
"""The reference kernels a head is compared with: exp(x . x' / tau) and exp(-|x - x'|^2 / (2 sigma^2))."""


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


def prompt_chunks(attn: torch.Tensor, values_per_prompt: int | None = None) -> list[slice]:
    """Slices of the prompts (dim 0 of attn `[B, ...]`) holding about `CHUNK_VALUES` numbers each
    (`values_per_prompt` numbers per prompt, by default those of attn)."""
    if values_per_prompt is None:
        values_per_prompt = attn[0].numel()
    step = max(1, CHUNK_VALUES // max(values_per_prompt, 1))
    return [slice(start, start + step) for start in range(0, attn.shape[0], step)]


def summed_over_prompts(
    terms: Callable[..., tuple[torch.Tensor, ...]], tensors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """`terms(*chunk)` summed over chunks of the prompts of `tensors` (each `[B, ...]`; the first
    sets the chunk length)."""
    first, *rest = prompt_chunks(tensors[0])
    totals = terms(*(tensor[first] for tensor in tensors))
    for chunk in rest:
        totals = tuple(total + value for total, value in zip(totals, terms(*(tensor[chunk] for tensor in tensors))))
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
    similarity, keys = head_invariant(similarity.expand_as(attn)), head_invariant(keys)
    kept = keys & (attn >= min_weight)  # [B, L, H, r, n]
    sums = _LogFitSums(*summed_over_prompts(_log_fit_sums, (attn, similarity, keys, kept)))
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
    uniform_loss = summed_over_prompts(_uniform_distance, (attn, keys))[0] / attn.shape[0]
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


def head_invariant(value: torch.Tensor) -> torch.Tensor:
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
    for chunk in prompt_chunks(shifted, shifted[0].numel() * log_betas.numel()):
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
        terms = summed_over_prompts(lambda *chunk: _distance_terms(beta, *chunk), (attn, shifted, finite))
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
