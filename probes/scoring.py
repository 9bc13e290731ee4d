"""Scores of a model's per-layer outputs against an algorithm's per-step outputs.

Everything here is a pure float64 function of arrays, so every statistic can be checked against
an independent computation. The shapes:

- layer values `[batch, n_layers', ...]`: one row per probed layer (predictions `[B, L', m]`, or
  label sensitivities `[B, L', m, n]`);
- step values `[batch, T+1, ...]`: an algorithm's iterates (step 0 is the start, alpha = 0).

Trailing dimensions are pooled: a "value" is one (query) or one (query, support point) entry.

Definitions (the only ones used anywhere in `probes`):

- MSE(l, t) = mean over prompts and values of (layer_l - step_t)^2.
- R2(l, t) = 1 - SSE(l, t) / SST(t): the fraction of the variance of the algorithm's step-t outputs
  explained by layer l's outputs taken as they are (no refitting). SST(t) is the sum of squares of
  step t's outputs around their mean pooled over prompts and values (queries are exchangeable
  within a prompt, so one pooled mean, not one per query index). R2 is NaN where SST(t) = 0
  (step 0 of every solver predicts 0 everywhere).
- Alignment: layer -> step maps minimising the summed MSE, either monotone (non-decreasing, by
  dynamic programming) or unconstrained (per-layer argmin).
- Path R2 (the score of an algorithm): 1 - sum_l SSE(l, a_l) / sum_l SST(a_l) over the scored
  layers at their aligned steps a_l: the fraction of the algorithm's trajectory variance, along
  the path the model is aligned to, that the model's layers reproduce. Layers aligned to step 0
  add their error and no variance, so a model whose layers all sit at step 0 scores -inf, not a
  vacuous 1 (NaN if their error is 0 too: layers predicting exactly step 0's outputs).
- Weighted R2 (after MetaRepICL's algorithm-identification summary): the mean of the per-kappa-
  stratum path R2, weighted by log10 of each stratum's median condition number (at least
  log10(1.1)), so ill-conditioned prompts, where algorithms differ most, count more.

Resampling never recomputes anything per prompt: `PairedSums` holds per-prompt sums from which
every statistic follows for any prompt weighting (all ones for the estimate, multinomial counts
for a bootstrap replicate, an indicator for a kappa stratum).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import einops
import numba
import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_count, check_seed
from mi_krr.solvers.system import SAFE_EXPONENT_RANGE

_MIN_STRATUM_WEIGHT = np.log10(1.1)


def _as_array(name: str, value, min_dim: int) -> np.ndarray:
    """`value` as a finite float64 NumPy array with at least `min_dim` dimensions."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions [batch, index, ...], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf: drop the diverged prompts or steps before scoring")
    return array


@dataclass
class PairedSums:
    """Per-prompt sufficient statistics of layer values against step values.

    Attributes:
        sse: squared error summed over values, per prompt `[batch, n_rows, T+1]`.
        step_sum: step values summed over values, per prompt `[batch, T+1]`, centred by the
            all-prompt mean of each step (shift-invariant; kept centred for accuracy).
        step_sq: squares of the centred step values summed over values `[batch, T+1]`.
        n_values: values per prompt (queries, or queries x support points).
    """

    sse: np.ndarray
    step_sum: np.ndarray
    step_sq: np.ndarray
    n_values: int

    @property
    def n_prompts(self) -> int:
        return self.sse.shape[0]


def paired_sums(layer_values, step_values) -> PairedSums:
    """Per-prompt sums comparing every row of `layer_values` `[B, L', ...]` with every step of
    `step_values` `[B, T+1, ...]` (trailing dimensions must match)."""
    layers = _as_array("layer_values", layer_values, 2)
    steps = _as_array("step_values", step_values, 2)
    if layers.shape[0] != steps.shape[0] or layers.shape[2:] != steps.shape[2:]:
        raise ValueError(
            f"layer_values {layers.shape} and step_values {steps.shape} must share the batch and trailing "
            "dimensions: score the same prompts and queries"
        )
    step_sum, step_sq = centred_step_sums(steps)
    return PairedSums(sse=pairwise_sse(layers, steps), step_sum=step_sum, step_sq=step_sq, n_values=step_sum_count(steps))


def pairwise_sse(layers: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Squared error summed over values per prompt, `[B, L', ...]` x `[B, T+1, ...]` -> `[B, L', T+1]`:
    exact differences (no |a|^2 - 2 a.b + |b|^2 cancellation) in one batched kernel."""
    batch = layers.shape[0]
    rows = torch.from_numpy(np.ascontiguousarray(layers.reshape(batch, layers.shape[1], -1)))
    columns = torch.from_numpy(np.ascontiguousarray(steps.reshape(batch, steps.shape[1], -1)))
    return torch.cdist(rows, columns, compute_mode="donot_use_mm_for_euclid_dist").square().numpy()


def centred_step_sums(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt sums of `steps` `[B, T+1, ...]` over values, centred by each step's all-prompt
    mean, and of their squares: (`[B, T+1]`, `[B, T+1]`) (see `PairedSums`)."""
    flat = torch.from_numpy(np.ascontiguousarray(steps.reshape(steps.shape[0], steps.shape[1], -1)))
    centred = flat - flat.mean(dim=(0, 2), keepdim=True)  # torch: NumPy reduces short last axes slowly
    return centred.sum(-1).numpy(), centred.square_().sum(-1).numpy()


def step_sum_count(steps: np.ndarray) -> int:
    """Values per prompt and step of `steps` `[B, T+1, ...]`."""
    return int(np.prod(steps.shape[2:], dtype=np.int64))


def common_scale(*arrays: np.ndarray) -> float:
    """The power of two to divide all of `arrays` by, alike, before their squares and squared
    differences are summed: 1 while their largest |value| lies within
    2^+-`mi_krr.solvers.system.SAFE_EXPONENT_RANGE`, else the power of two nearest it (the rule of
    the solvers' `power_of_two_scale`, over all values at once). Ratios of such sums (R2, the
    alignment) are unchanged by it, and a power of two divides exactly."""
    return magnitude_scale(max((float(max(np.max(a), -np.min(a))) for a in arrays if a.size), default=0.0))


def magnitude_scale(largest: float) -> float:
    """`common_scale` of values whose largest |value| is `largest` (for a caller that already has
    their extremes)."""
    _, exponent = np.frexp(largest)  # exponent 0 for 0, inf and NaN
    return float(np.ldexp(1.0, exponent)) if abs(int(exponent)) > SAFE_EXPONENT_RANGE else 1.0


def log10_mean_square(values: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """log10 of the mean of values^2 over `axis`, accurate where the squares would underflow or
    overflow: each mean is taken of the values divided by the power of two nearest their largest
    |value| and shifted back in log10. -inf where every value is 0."""
    _, exponent = np.frexp(np.max(np.abs(values), axis=axis, keepdims=True))
    scale = np.ldexp(1.0, exponent)
    with np.errstate(divide="ignore"):
        return np.log10(np.mean((values / scale) ** 2, axis=axis)) + 2 * np.log10(np.squeeze(scale, axis=axis))


def overflow_limit(n_values: int) -> float:
    """The largest magnitude that `n_values` numbers (every prompt's, step's and value's of one
    scoring) may have for their squared differences and centred squares to sum below float64's
    maximum: sqrt(max) / (2 n_values), so that n_values squares of differences up to twice it sum
    to at most max / n_values. Larger values are a diverging trajectory, not a prediction."""
    return float(np.sqrt(np.finfo(np.float64).max) / (2 * max(n_values, 1)))


def _weights(sums: PairedSums, weights) -> np.ndarray:
    """Prompt weights as `[R, B]` (ones when None)."""
    if weights is None:
        return np.ones((1, sums.n_prompts))
    weights = np.asarray(weights, dtype=np.float64)
    return weights[None] if weights.ndim == 1 else weights


SST_ROUNDING = 1e-12
"""SST under prompt weights is squares - total^2 / count of values centred by the ALL-prompt mean,
so for a weighting whose values are one constant (a kappa stratum, a resample) the two terms
cancel to rounding noise (a few eps x squares), not 0: SST below this fraction of the squares is
taken as 0 (no variance: R2 NaN, a path's error over it -inf), never as a tiny variance."""


def weighted_sse_sst(sums: PairedSums, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSE `[R, L', T+1]`, SST `[R, T+1]` (0 below `SST_ROUNDING`) and the number of values `[R]`
    under prompt weights `[B]` or `[R, B]` (None: every prompt once, R = 1)."""
    w = _weights(sums, weights)
    sse = _matmul(w, sums.sse.reshape(sums.n_prompts, -1)).reshape(len(w), *sums.sse.shape[1:])
    total, squares = _matmul(w, sums.step_sum), _matmul(w, sums.step_sq)
    count = w.sum(1) * sums.n_values
    with np.errstate(invalid="ignore", divide="ignore"):
        sst = squares - total**2 / count[:, None]
    return sse, np.where(sst > SST_ROUNDING * squares, sst, 0.0), count


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for float64 arrays, by torch: the rest of `probes` runs on torch's thread pool, and
    alternating it with NumPy's own BLAS threads makes each pool wait for the other's spinning
    workers on a small machine."""
    return torch.from_numpy(np.ascontiguousarray(a)).mm(torch.from_numpy(np.ascontiguousarray(b))).numpy()


def r2_and_mse(sums: PairedSums, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """R2 and MSE matrices `[R, L', T+1]` under prompt weights (see module docstring)."""
    sse, sst, count = weighted_sse_sst(sums, weights)
    return _r2(sse, sst), sse / count[:, None, None]


def _r2(sse: np.ndarray, sst: np.ndarray) -> np.ndarray:
    """1 - SSE/SST `[R, L', T+1]` from SSE `[R, L', T+1]` and SST `[R, T+1]`, NaN where SST = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sst[:, None, :] > 0, 1.0 - sse / sst[:, None, :], np.nan)


def r2_matrix(layer_values, step_values) -> np.ndarray:
    """R2 of layer l's values as predictions of step t's values, `[L', T+1]` (NaN where step t has
    no variance)."""
    return r2_and_mse(paired_sums(layer_values, step_values))[0][0]


def mse_matrix(layer_values, step_values) -> np.ndarray:
    """Mean squared difference between layer l's and step t's values, `[L', T+1]`."""
    return r2_and_mse(paired_sums(layer_values, step_values))[1][0]


def monotone_alignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing layer -> step map minimising the summed cost.

    cost `[..., L', T+1]` -> (steps `[..., L']` int, total cost `[...]`). Dynamic programming:
    best[l, t] = cost[l, t] + min over t' <= t of best[l-1, t'], then backtracking; ties go to the
    earliest step. O(L' T) per matrix, batched over leading dimensions (`_aligned_paths`, one
    compiled loop). A cost holding NaN is refused.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim < 2 or cost.shape[-1] < 1 or cost.shape[-2] < 1:
        raise ValueError(f"cost must be [..., n_layers, n_steps] with both sizes >= 1, got shape {cost.shape}")
    matrices = np.ascontiguousarray(cost.reshape(-1, *cost.shape[-2:]))
    steps = np.empty(matrices.shape[:2], dtype=np.int64)
    total = np.empty(matrices.shape[0])
    if _aligned_paths(matrices, steps, total):
        raise ValueError("cost contains NaN (e.g. 1 - R2 at step 0, where R2 is undefined): align on the MSE, or replace NaN by inf")
    return steps.reshape(cost.shape[:-1]), total.reshape(cost.shape[:-2])


@numba.njit(nogil=True, cache=True)
def _aligned_paths(cost: np.ndarray, steps: np.ndarray, total: np.ndarray) -> bool:
    """`monotone_alignment` of each matrix of cost `[N, L', T+1]` into steps `[N, L']` and total
    `[N]`: per matrix one forward pass that keeps, per row and step t, the earliest step <= t of
    the previous row's least cumulative cost (ties: the earliest, as argmin), then backtracking
    through them. The same additions in the same order as the NumPy recursion, so the same
    totals bit for bit. Returns whether a cumulative cost was NaN (NumPy's running minimum
    would carry it to the last row: the cost is refused)."""
    n_rows, n_steps = cost.shape[1], cost.shape[2]
    best = np.empty(n_steps)
    earliest = np.empty((n_rows, n_steps), dtype=np.int64)  # row l: argmin of best[l - 1, :t + 1]
    has_nan = False
    for i in range(cost.shape[0]):
        for t in range(n_steps):
            best[t] = cost[i, 0, t]
            has_nan |= np.isnan(best[t])
        for row in range(1, n_rows):
            running, at = best[0], 0
            for t in range(n_steps):
                if best[t] < running:
                    running, at = best[t], t
                earliest[row, t] = at
                best[t] = cost[i, row, t] + running
                has_nan |= np.isnan(best[t])
        at = 0
        for t in range(1, n_steps):
            if best[t] < best[at]:
                at = t
        total[i] = best[at]
        steps[i, n_rows - 1] = at
        for row in range(n_rows - 1, 0, -1):
            at = earliest[row, at]
            steps[i, row - 1] = at
    return has_nan


def path_r2(sse: np.ndarray, sst: np.ndarray, steps: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Path R2 `[R]` of rows `rows` (default all) at steps `steps` `[R, L']`, from SSE
    `[R, L', T+1]` and SST `[R, T+1]` (see module docstring)."""
    rows = np.arange(sse.shape[-2]) if rows is None else np.asarray(rows)
    picked = steps[:, rows]
    error = np.take_along_axis(sse[:, rows, :], picked[..., None], axis=-1)[..., 0].sum(-1)
    return _path_ratio(error, np.take_along_axis(sst, picked, axis=-1).sum(-1))


def held_path_r2(sse: np.ndarray, sst: np.ndarray, steps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The path R2 `[R]` the last of rows `rows`, held at every one of them, reaches at the same
    steps `steps` `[R, L']` (SSE `[R, L', T+1]`, SST `[R, T+1]`): the score of a model that does
    not iterate, whose every layer holds its final state. Layers that move along the trajectory
    beat it; layers that all hold one state score exactly it."""
    rows = np.asarray(rows)
    picked = steps[:, rows]
    error = np.take_along_axis(sse[:, rows[-1], :], picked, axis=-1).sum(-1)
    return _path_ratio(error, np.take_along_axis(sst, picked, axis=-1).sum(-1))


def _path_ratio(error: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """1 - error / variance, -inf for error without variance, NaN for neither."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(variance > 0, 1.0 - error / variance, np.where(error > 0, -np.inf, np.nan))


def aligned_r2(sse: np.ndarray, sst: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per-row R2 `[R, L']` at steps `[R, L']` (NaN where the step has no variance)."""
    error = np.take_along_axis(sse, steps[..., None], axis=-1)[..., 0]
    variance = np.take_along_axis(sst, steps, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(variance > 0, 1.0 - error / variance, np.nan)


PROFILE_FLOOR = np.finfo(np.float64).eps ** 2
"""`log_error_profile` floors each MSE at this fraction of the reference's mean square: an error
below float64's rounding of the reference is noise, so a trajectory that reaches the KRR
prediction exactly and one that reaches it up to rounding get the same profile."""


def log_error_profile(values, reference) -> np.ndarray:
    """log10 of the MSE of each row against a reference: values `[B, K, m]`, reference `[B, m]`
    -> `[K]` (the per-layer or per-step error to the exact KRR prediction; floored at
    `PROFILE_FLOOR` times the reference's mean square, or at 1e-300 for an all-zero reference).
    Accurate at any scale (`log10_mean_square`): scaling values and reference by c shifts the
    profile by 2 log10 |c|."""
    values = _as_array("values", values, 3)
    reference = _as_array("reference", reference, 2)
    log_mse = log10_mean_square(values - reference[:, None], axis=(0, 2))
    log_reference = log10_mean_square(reference)
    floor = np.log10(PROFILE_FLOOR) + log_reference if np.isfinite(log_reference) else -300.0
    return np.maximum(log_mse, floor)


def profile_distance(model_profile, algorithm_profile, steps, rows=None) -> float:
    """Root-mean-square gap between the model's per-layer log-error profile `[L']` and the
    algorithm's per-step one `[T+1]` read at the aligned steps `[L']` (log10 units), over the
    row indices `rows` (default all; scores pass their scored rows, as for the path R2)."""
    model_profile = np.asarray(model_profile, dtype=np.float64)
    gap = model_profile - np.asarray(algorithm_profile, dtype=np.float64)[np.asarray(steps)]
    return float(np.sqrt(np.mean((gap if rows is None else gap[rows]) ** 2)))


def bootstrap_weights(n_prompts: int, n_resamples: int, seed: int) -> np.ndarray:
    """Multinomial prompt counts `[n_resamples, n_prompts]`: each row one resample of the prompts
    with replacement (seeded; the same seed gives the same rows, which pairs algorithms)."""
    check_count("n_prompts", n_prompts, 1)
    check_count("n_resamples", n_resamples, 0)
    draws = np.random.default_rng(seed).integers(0, n_prompts, size=(n_resamples, n_prompts))
    flat = (draws + n_prompts * np.arange(n_resamples)[:, None]).ravel()  # (resample, prompt) cells
    return np.bincount(flat, minlength=n_resamples * n_prompts).reshape(n_resamples, n_prompts).astype(np.float64)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `samples` `[R]` at `level`: the order statistics at
    ceil(q R) for q = (1 - level)/2 and (1 + level)/2 (no interpolation, so -inf replicates count
    as the lowest values); NaN replicates are dropped, (nan, nan) when none is left."""
    low, high = percentile_intervals(np.asarray(samples, dtype=np.float64).reshape(-1), level)
    return (float(low), float(high))


def percentile_intervals(samples, level: float = 0.95) -> np.ndarray:
    """`percentile_interval` of every column of `samples` `[R, ...]` -> `[..., 2]` (low, high)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be a confidence level in (0, 1), e.g. 0.95, got {level!r}")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] == 0:
        return np.full((*samples.shape[1:], 2), np.nan)
    tail = round((1.0 - level) / 2.0, 12)  # level's decimal tail: 0.95 -> 0.025, not 0.025000000000000022 (a rank higher at R = 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives (nan, nan)
        bounds = np.nanquantile(samples, [tail, 1.0 - tail], axis=0, method="inverted_cdf")
    return np.moveaxis(bounds, 0, -1)


def kappa_strata(kappa, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantile bins of per-prompt condition numbers: kappa `[B]` -> (bin index `[B]` in
    0..n_bins-1, edges `[n_bins + 1]` = the 0, 1/n_bins, ..., 1 quantiles). Bin i holds
    edges[i] <= kappa < edges[i+1] (the last bin includes its upper edge)."""
    kappa = _as_array("kappa", kappa, 1)
    if kappa.ndim != 1 or kappa.size == 0:
        raise ValueError(f"kappa must hold one condition number per prompt [B], B >= 1, got shape {kappa.shape}")
    check_count("n_bins", n_bins, 1)
    edges = np.quantile(kappa, np.linspace(0.0, 1.0, n_bins + 1))
    index = np.clip(np.searchsorted(edges, kappa, side="right") - 1, 0, n_bins - 1)
    return index, edges


@dataclass
class KappaStratum:
    """The score of one algorithm on the prompts of one condition-number bin.

    Attributes:
        kappa_low, kappa_high: the bin's edges (condition numbers of K + lam I).
        median_kappa: the bin's median condition number.
        n_prompts: prompts in the bin.
        score: path R2 on those prompts at the all-prompt alignment.
        aligned_r2: per-layer R2 at the aligned steps `[L']`.
    """

    __repr__ = compact_repr

    kappa_low: float
    kappa_high: float
    median_kappa: float
    n_prompts: int
    score: float
    aligned_r2: np.ndarray


@dataclass
class AlgorithmScore:
    """How well a model's layers reproduce one algorithm's trajectory.

    Attributes:
        algorithm: the algorithm's name.
        layers: the probed layer indices (rows) `[L']`.
        scored: row indices entering the score (all rows but layer 0, the embedding).
        r2, mse: layer x step matrices `[L', T+1]`.
        aligned_steps: monotone layer -> step alignment minimising summed MSE `[L']`.
        argmin_steps: per-layer argmin of MSE (no monotonicity) `[L']`.
        aligned_r2: per-layer R2 at the aligned steps `[L']`, with bootstrap intervals
            `aligned_r2_ci` `[L', 2]`.
        score: path R2 over the scored rows (see module docstring), interval `score_ci`, and the
            bootstrap replicates `score_samples` `[R]` (same resamples for every algorithm).
        model_profile: the model's per-layer log10 MSE to the exact KRR prediction `[L']`;
            `algorithm_profile` the algorithm's per-step one `[T+1]`.
        profile_distance: RMS gap between the profiles at the aligned steps, over the scored
            rows; `profile_steps`, `profile_aligned_distance`: the monotone alignment of the
            profiles themselves (Yan et al.'s comparison) and the gap under it (scored rows).
        sensitivity_r2: R2 matrix of label sensitivities `[L', T+1]` or None;
            `sensitivity_aligned_r2` `[L']` and `sensitivity_score` (path R2) at the prediction
            alignment.
        strata: per-kappa-bin scores; `weighted_r2` their log10-kappa-weighted mean.
        n_prompts: prompts the score was made on (None for a score built by hand); the verdict
            counts them.
        level: the confidence level of `score_ci` and `aligned_r2_ci`.
        held_score: the path R2 of the no-iteration rival (`held_path_r2`): the model's last
            scored layer held at every scored layer, at the same aligned steps; `held_samples`
            `[R]` its replicates on the same resamples (NaN and empty for a score built by hand).
        resamples_digest: fingerprint of the bootstrap prompt weights (None without resamples or
            for a score built by hand): the verdict pairs only scores made on the same resamples.
    """

    __repr__ = compact_repr

    algorithm: str
    layers: np.ndarray
    scored: np.ndarray
    r2: np.ndarray
    mse: np.ndarray
    aligned_steps: np.ndarray
    argmin_steps: np.ndarray
    aligned_r2: np.ndarray
    aligned_r2_ci: np.ndarray
    score: float
    score_ci: tuple[float, float]
    score_samples: np.ndarray
    model_profile: np.ndarray
    algorithm_profile: np.ndarray
    profile_distance: float
    profile_steps: np.ndarray
    profile_aligned_distance: float
    sensitivity_r2: np.ndarray | None = None
    sensitivity_aligned_r2: np.ndarray | None = None
    sensitivity_score: float | None = None
    strata: list[KappaStratum] = field(default_factory=list)
    weighted_r2: float | None = None
    n_prompts: int | None = None
    level: float = 0.95
    resamples_digest: str | None = None
    held_score: float = float("nan")
    held_samples: np.ndarray = field(default_factory=lambda: np.zeros(0))


def score_algorithm(
    algorithm: str,
    layer_pred,
    step_pred,
    krr_pred,
    *,
    layers=None,
    resamples: np.ndarray | None = None,
    layer_sensitivity=None,
    step_sensitivity=None,
    kappa=None,
    n_kappa_bins: int = 3,
    level: float = 0.95,
) -> AlgorithmScore:
    """Score one algorithm against a model's layers.

    Args:
        algorithm: name recorded in the result.
        layer_pred: the model's per-layer query predictions `[B, L', m]`.
        step_pred: the algorithm's per-step predictions `[B, T+1, m]`.
        krr_pred: the exact KRR predictions `[B, m]` (for the error profiles).
        layers: layer index of each row `[L']` (default 0..L'-1); layer 0 is not scored.
        resamples: bootstrap prompt weights `[R, B]` (`bootstrap_weights`; share them across
            algorithms to pair their scores), or None for no intervals.
        layer_sensitivity, step_sensitivity: label sensitivities `[B, L', m, n]` and
            `[B, T+1, m, n]`, or None.
        kappa: per-prompt condition numbers `[B]` for stratification, or None.
        n_kappa_bins: number of quantile bins of kappa.
        level: confidence level of the intervals.
    """
    return _score_side_by_side(
        layer_pred,
        {algorithm: step_pred},
        krr_pred,
        layers=layers,
        resamples=resamples,
        layer_sensitivity=layer_sensitivity,
        step_sensitivities=None if step_sensitivity is None else {algorithm: _one_array("step_sensitivity", step_sensitivity)},
        kappa=kappa,
        n_kappa_bins=n_kappa_bins,
        level=level,
    )[algorithm]


def _one_array(name: str, value):
    """`value`, refused when it is a dict (the other scoring function's argument)."""
    if isinstance(value, Mapping):
        raise ValueError(f"{name} must be one array (score_algorithms takes a dict name -> array), got a {type(value).__name__}")
    return value


def score_algorithms(
    layer_pred,
    step_preds: dict,
    krr_pred,
    *,
    layers=None,
    bootstrap: int = 1000,
    seed: int = 0,
    layer_sensitivity=None,
    step_sensitivities: dict | None = None,
    kappa=None,
    n_kappa_bins: int = 3,
    level: float = 0.95,
) -> dict[str, AlgorithmScore]:
    """`score_algorithm` for every algorithm in `step_preds` (name -> `[B, T+1, m]`), all on the
    same `bootstrap` prompt resamples (seeded by `seed`) so their scores are paired.

    Algorithms with the same number of steps are scored side by side: one product of every prompt
    weighting (all prompts, each kappa stratum, each resample) with every algorithm's per-prompt
    sums, and one batch of monotone alignments."""
    if not isinstance(step_preds, Mapping):
        raise ValueError(f"step_preds must map each algorithm's name to its step predictions [B, T+1, m], got {type(step_preds).__name__}")
    if not step_preds:
        raise ValueError("step_preds must hold at least one algorithm's step predictions")
    check_count("bootstrap", bootstrap, 0)
    check_seed("seed", seed)
    batch = np.shape(layer_pred)[0]
    return _score_side_by_side(
        layer_pred,
        step_preds,
        krr_pred,
        layers=layers,
        resamples=bootstrap_weights(batch, bootstrap, seed) if bootstrap else None,
        layer_sensitivity=layer_sensitivity,
        step_sensitivities=step_sensitivities,
        kappa=kappa,
        n_kappa_bins=n_kappa_bins,
        level=level,
    )


def _score_side_by_side(
    layer_pred, step_preds: dict, krr_pred, *, layers, resamples, layer_sensitivity, step_sensitivities, kappa, n_kappa_bins, level
) -> dict[str, AlgorithmScore]:
    """The scores of `step_preds` (name -> `[B, T+1, m]`), one group of algorithms with equal
    step shapes at a time (see `score_algorithms`)."""
    layer_values = _as_array("layer_values", layer_pred, 2)
    n_prompts, n_rows = layer_values.shape[:2]
    layers = np.arange(n_rows) if layers is None else _layer_indices(layers)
    if layers.shape != (n_rows,):
        raise ValueError(f"layers must list one layer index per row of layer_pred ({n_rows}), got {layers.tolist()}")
    if np.any(np.diff(layers) < 0):
        raise ValueError(
            f"layers must be in depth order (the alignment maps deeper rows to later steps), got {layers.tolist()}: "
            "sort the layers and the rows of layer_pred together"
        )
    check_count("n_kappa_bins", n_kappa_bins, 1)
    if step_sensitivities is not None and not isinstance(step_sensitivities, Mapping):
        raise ValueError(
            "step_sensitivities must map algorithm names to sensitivities [B, T+1, m, n] (score_algorithm takes one "
            f"array as step_sensitivity), got {type(step_sensitivities).__name__}"
        )
    if (layer_sensitivity is None) != (not step_sensitivities):
        raise ValueError(
            "layer_sensitivity and step_sensitivities go together: pass both (the model's [B, L', m, n] and at least "
            "one algorithm's [B, T+1, m, n]) or neither"
        )
    unknown = sorted(set(step_sensitivities or {}) - set(step_preds))
    if unknown:
        raise ValueError(f"step_sensitivities names {unknown}, which step_preds lacks: use the algorithm names of step_preds {list(step_preds)}")
    scored = np.flatnonzero(layers > 0)
    if scored.size == 0:
        raise ValueError("layers must include at least one layer after the embedding (index >= 1) to score")
    krr = _as_array("krr_pred", krr_pred, 2)
    step_values = {name: _as_array("step_values", pred, 2) for name, pred in step_preds.items()}
    for name, values in {"krr_pred": krr, **{f"step_preds[{name!r}]": values for name, values in step_values.items()}}.items():
        if values.shape[0] != n_prompts:
            raise ValueError(f"{name} covers {values.shape[0]} prompts but layer_pred {n_prompts}: pass both for the same prompts")
    if krr.shape != (n_prompts, *layer_values.shape[2:]):
        raise ValueError(
            f"krr_pred must hold one value per prompt and query like each layer of layer_pred, shape "
            f"{(n_prompts, *layer_values.shape[2:])}, got {krr.shape}"
        )
    if layer_sensitivity is not None:
        assert step_sensitivities is not None  # they go together (checked above)
        layer_sensitivity, step_sensitivities = _checked_sensitivities(layer_sensitivity, step_sensitivities, layer_values, step_values)
    limit = overflow_limit(layer_values.size + sum(values.size for values in step_values.values()))
    for name, values in step_values.items():
        if values.size and np.abs(values).max() > limit:
            raise ValueError(
                f"step_preds[{name!r}] holds values beyond +-{limit:.3g}, whose squares overflow float64 (a diverging "
                "trajectory): leave it out, or check its step sizes"
            )
    scale = common_scale(layer_values, krr, *step_values.values())  # R2 and the alignment are scale-free
    unit_layers = layer_values / scale if scale != 1 else layer_values
    weighting = _PromptWeighting.build(n_prompts, resamples, kappa, n_kappa_bins)
    boot = weighting.rows[weighting.resamples]
    digest = hashlib.blake2b(np.ascontiguousarray(boot).tobytes(), digest_size=8).hexdigest() if boot.size else None
    model_profile = log_error_profile(layer_values, krr)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, values in step_values.items():
        groups.setdefault(values.shape, []).append(name)
    results = {}
    for names in groups.values():
        stacked = np.stack([step_values[name] for name in names], axis=1)  # [B, A, T+1, ...]
        if scale != 1:
            stacked /= scale
        every_step = stacked.reshape(n_prompts, -1, *stacked.shape[3:])
        sse, sst, count = weighted_sse_sst(paired_sums(unit_layers, every_step), weighting.rows)  # in units of scale^2
        sse = np.ascontiguousarray(einops.rearrange(sse, "w layer (a t) -> a w layer t", a=len(names)))
        sst = np.ascontiguousarray(einops.rearrange(sst, "w (a t) -> a w t", a=len(names)))
        steps, _ = monotone_alignment(sse / count[:, None, None])  # [A, W, L']
        score = _fold_leading(path_r2, sse, sst, steps, scored)  # [A, W]
        held = _fold_leading(held_path_r2, sse, sst, steps, scored)  # [A, W]: the no-iteration rival
        per_layer = _fold_leading(aligned_r2, sse, sst, steps)  # [A, W, L']
        at_estimate = np.repeat(steps[:, :1], len(weighting.strata), axis=1)  # strata: at the all-prompt alignment
        strata_sse, strata_sst = sse[:, weighting.strata], sst[:, weighting.strata]
        strata_score = _fold_leading(path_r2, strata_sse, strata_sst, at_estimate, scored)  # [A, S]
        strata_layer = _fold_leading(aligned_r2, strata_sse, strata_sst, at_estimate)  # [A, S, L']
        samples = score[:, weighting.resamples]  # [A, R]
        layer_ci = percentile_intervals(per_layer[:, weighting.resamples].swapaxes(0, 1), level)  # [A, L', 2]
        score_ci = percentile_intervals(samples.T, level)  # [A, 2]
        for a, name in enumerate(names):
            algorithm_profile = log_error_profile(step_values[name], krr)
            profile_steps, _ = monotone_alignment((model_profile[:, None] - algorithm_profile[None, :]) ** 2)
            result = AlgorithmScore(
                algorithm=name,
                layers=layers,
                scored=scored,
                r2=_r2(sse[a, :1], sst[a, :1])[0],
                mse=sse[a, 0] / count[0] * scale**2,
                aligned_steps=steps[a, 0],
                argmin_steps=np.argmin(sse[a, 0], axis=-1),
                aligned_r2=per_layer[a, 0],
                aligned_r2_ci=layer_ci[a],
                score=float(score[a, 0]),
                score_ci=(float(score_ci[a, 0]), float(score_ci[a, 1])),
                score_samples=samples[a],
                model_profile=model_profile,
                algorithm_profile=algorithm_profile,
                profile_distance=profile_distance(model_profile, algorithm_profile, steps[a, 0], scored),
                profile_steps=profile_steps,
                profile_aligned_distance=profile_distance(model_profile, algorithm_profile, profile_steps, scored),
                n_prompts=n_prompts,
                level=level,
                resamples_digest=digest,
                held_score=float(held[a, 0]),
                held_samples=held[a, weighting.resamples],
            )
            step_sensitivity = (step_sensitivities or {}).get(name)
            if layer_sensitivity is not None and step_sensitivity is not None:
                _add_sensitivity_scores(result, paired_sums(layer_sensitivity, step_sensitivity), scored)
            if weighting.bins:
                result.strata = [
                    KappaStratum(**stratum, score=float(strata_score[a, i]), aligned_r2=strata_layer[a, i])
                    for i, stratum in enumerate(weighting.bins)
                ]
                finite = [(s.score, max(np.log10(s.median_kappa), _MIN_STRATUM_WEIGHT)) for s in result.strata if np.isfinite(s.score)]
                if finite:
                    values, stratum_weights = np.array(finite).T
                    result.weighted_r2 = float(np.sum(values * stratum_weights) / np.sum(stratum_weights))
            results[name] = result
    return {name: results[name] for name in step_preds}


def _fold_leading(statistic, sse: np.ndarray, sst: np.ndarray, steps: np.ndarray, *rows) -> np.ndarray:
    """`statistic` (`path_r2` or `aligned_r2`, written for one leading axis) over two leading axes:
    sse `[A, W, L', T+1]`, sst `[A, W, T+1]`, steps `[A, W, L']` -> `[A, W, ...]`."""
    lead = sse.shape[:2]
    value = statistic(sse.reshape(-1, *sse.shape[2:]), sst.reshape(-1, sst.shape[-1]), steps.reshape(-1, steps.shape[-1]), *rows)
    return value.reshape(*lead, *value.shape[1:])


def _checked_sensitivities(layer_sensitivity, step_sensitivities: Mapping, layer_values: np.ndarray, step_values: dict) -> tuple[np.ndarray, dict]:
    """The sensitivities as arrays, checked against the predictions they go with: layer
    `[B, L', m, n]` for layer_values `[B, L', m]`, each algorithm's `[B, T+1, m, n]` for its
    step values `[B, T+1, m]`, one n throughout."""
    layer = _as_array("layer_sensitivity", layer_sensitivity, 3)
    if layer.shape[:-1] != layer_values.shape:
        raise ValueError(
            f"layer_sensitivity {layer.shape} must be [B, L', m, n] for the rows of layer_pred {layer_values.shape}: "
            "take both for the same prompts, layers and queries"
        )
    steps = {}
    for name, sensitivity in step_sensitivities.items():
        steps[name] = _as_array(f"step_sensitivities[{name!r}]", sensitivity, 3)
        if steps[name].shape[:-1] != step_values[name].shape or steps[name].shape[-1] != layer.shape[-1]:
            raise ValueError(
                f"step_sensitivities[{name!r}] {steps[name].shape} must be [B, T+1, m, n] for step_preds[{name!r}] "
                f"{step_values[name].shape} with layer_sensitivity's n={layer.shape[-1]}: take both from the same run (n_steps)"
            )
    return layer, steps


def _add_sensitivity_scores(result: AlgorithmScore, sums: PairedSums, scored: np.ndarray) -> None:
    """R2 of label sensitivities at the prediction alignment, into `result`."""
    sse, sst, _ = weighted_sse_sst(sums)
    result.sensitivity_r2 = _r2(sse, sst)[0]
    result.sensitivity_aligned_r2 = aligned_r2(sse, sst, result.aligned_steps[None])[0]
    result.sensitivity_score = float(path_r2(sse, sst, result.aligned_steps[None], scored)[0])


def _layer_indices(layers) -> np.ndarray:
    """`layers` as int64 indices `[L']`, refusing values that are not whole numbers."""
    values = np.asarray(layers)
    if values.dtype.kind not in "iu" and not (values.dtype.kind == "f" and np.all(values == np.round(values))):
        raise ValueError(f"layers must be whole layer indices (0 = embeddings, l = after block l), got {values.tolist()}")
    return values.astype(np.int64)


def _resample_weights(resamples, n_prompts: int) -> np.ndarray:
    """Bootstrap prompt weights as `[R, B]` float64, checked: B = n_prompts, finite and >= 0."""
    weights = np.asarray(resamples, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n_prompts:
        raise ValueError(f"resamples must be prompt weights [R, {n_prompts}] (bootstrap_weights(n_prompts, R, seed)), got shape {weights.shape}")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("resamples must hold finite weights >= 0 (counts of each prompt in a resample)")
    return weights


@dataclass(frozen=True)
class _PromptWeighting:
    """Every prompt weighting a score needs, as the rows of one `[W, B]` matrix: row 0 all ones
    (the estimate), then one 0/1 row per non-empty kappa stratum, then the bootstrap resamples.

    Attributes:
        rows: the weights `[W, B]`.
        strata, resamples: the row indices of the strata and of the resamples.
        bins: per stratum, the `KappaStratum` fields that do not depend on the algorithm.
    """

    rows: np.ndarray
    strata: np.ndarray
    resamples: np.ndarray
    bins: list[dict]

    @classmethod
    def build(cls, n_prompts: int, resamples: np.ndarray | None, kappa, n_bins: int) -> _PromptWeighting:
        indicators, bins = [], []
        if kappa is not None:
            kappa = _as_array("kappa", kappa, 1)
            if kappa.shape != (n_prompts,):
                raise ValueError(f"kappa must hold one condition number per prompt ({n_prompts}), got shape {kappa.shape}")
            index, edges = kappa_strata(kappa, n_bins)
            for bin_id in range(n_bins):
                members = index == bin_id
                if members.any():
                    indicators.append(members.astype(np.float64))
                    bins.append({
                        "kappa_low": float(edges[bin_id]),
                        "kappa_high": float(edges[bin_id + 1]),
                        "median_kappa": float(np.median(kappa[members])),
                        "n_prompts": int(members.sum()),
                    })
        boot = np.empty((0, n_prompts)) if resamples is None else _resample_weights(resamples, n_prompts)
        rows = np.concatenate([np.ones((1, n_prompts)), np.array(indicators).reshape(-1, n_prompts), boot])
        first_resample = 1 + len(indicators)
        return cls(rows=rows, strata=np.arange(1, first_resample), resamples=np.arange(first_resample, len(rows)), bins=bins)
