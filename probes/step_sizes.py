"""One fixed step size per algorithm, fitted to the model: what a network with fixed weights can
implement.

The registry's step-size-parameterised solvers (GD, Jacobi / row-sum Richardson, heavy ball) take
the spectrum-optimal step of EACH prompt (e.g. 2 / (mu_min + mu_max)); a trained or constructed
network cannot know a prompt's spectrum, so it runs one learning rate for every prompt (von
Oswald et al.'s GD transformers; line-search GD picks that rate once). `fit_step` finds that
global step by maximising the algorithm's path R2 against the model's layers (`probes.scoring`):
a log-spaced grid around the prompts' typical optimal step, then a bounded Brent search (golden
section with parabolic steps) on log step inside the brackets of the best grid points. Heavy ball also
fits its momentum beta, on the grid `MOMENTUM_GRID`: 0 (GD: heavy ball contains it, so a GD network
is not read as momentum when GD itself is not among the candidates) and 11 values of 1 - beta
log-spaced from 0.9 to 0.03 (beta 0.1 .. 0.97).

The searches run side by side: `probes.bounded_brent` is SciPy's `minimize_scalar(method="bounded")`
step for step, vectorised over brackets, and each of its iterations scores the next candidate of
every bracket of both cross-fitting halves in ONE batch (the grids of both halves are one batch
too), each candidate's trajectory in closed form from one eigendecomposition per prompt
(`probes.spectral_trajectories`), not by re-running the solver: the same searches as one at a
time (scores equal to rounding, fitted steps to ~1e-10), in ~30 batches per algorithm instead of
~125 single evaluations. `cross_fit_steps` runs every algorithm's searches in the same lockstep,
their candidates' path R2 computed together (fitted steps bit-identical to fitting one algorithm
at a time; `benchmarks/bench_analysis.py` times both: 248-257 -> 209-217 ms on softmax_gp,
168-180 -> 138-156 ms on linear_lr, 444-453 -> 427-430 ms on a 12-layer, 8-head model, before
session 22 doubled heavy ball's momentum grid).
The typical optimal step comes from the same eigendecomposition (`optimal_steps`); the
trajectories `diagnose` reports for the fitted steps are then run by the real solvers.

Cross-fitting keeps the fitted parameter from inflating scores: the prompts are split in two
halves (seeded); each half's parameters are fitted on that half, and every prompt is then scored
with the parameters fitted on the OTHER half.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import einops
import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_choice
from mi_krr.solvers import heavy_ball, richardson
from mi_krr.solvers.spectrum import preconditioner_diagonal
from mi_krr.solvers.system import krr_system
from probes.bounded_brent import bounded_brent
from probes.scoring import (
    PairedSums, centred_step_sums, magnitude_scale, monotone_alignment, overflow_limit, pairwise_sse, path_r2, weighted_sse_sst,
)
from probes.sensitivity import RICHARDSON_PRECONDITIONERS
from probes.spectral_trajectories import (
    FITTED_STEP_ALGORITHMS, SpectralSystem, optimal_steps, spectral_system, spectral_systems,
)

STEP_SIZES = ("fitted", "optimal")

STEP_GRID = np.geomspace(1e-3, 2.0, 23)
"""Candidate steps relative to the median spectrum-optimal step of the fitted prompts (torch's
median: the lower middle value for an even count; the grid only needs a typical step) (ratio
~1.4 between neighbours; Brent then resolves the step inside the best points' brackets); above
~2x the optimal step Richardson diverges on typical prompts."""

MOMENTUM_GRID = np.concatenate([[0.0], 1.0 - np.geomspace(0.9, 0.03, 11)])
"""Heavy ball's momentum candidates: 0, then 1 - beta log-spaced (ratio ~1.4) from 0.9 to 0.03:
momentum acts through 1 / (1 - beta), the horizon its velocity averages over, so the grid is
even in log(1 - beta). Session 22 replaced 0, 0.1, 0.3, ..., 0.9, on which the fit jumped
between beta 0.7 and 0.9 from one half of the prompts to the other on the shipped models, and the
cross-fitted score with it (`benchmarks/verdict_stability.py`)."""
REFINED_BRACKETS = 3
"""Brent refines the step around the 3 best grid cells: near an exact match the path R2 peaks
sharply, and the peak may sit in the bracket of the second-best grid point."""
LOG_STEP_XTOL = 1e-6
"""Brent's tolerance on log(step): the fitted step is resolved to ~1e-6 relative."""

GRID_CHUNK_VALUES = 2**20
"""float64 values per chunk of candidates evaluated at once (per-mode and per-query trajectories
`[B, chunk, T+1, n or m]`):
small enough to stay in cache (large temporaries cost more in page faults than in arithmetic)."""

_DIVERGED = 1e300
"""The loss Brent sees for a diverging candidate (its path R2 is -inf)."""


@dataclass
class FittedStep:
    """The cross-fitted step (and momentum) of one algorithm.

    Attributes:
        algorithm: the registry name.
        folds: which half each prompt belongs to `[B]` (0 or 1).
        step: the step fitted on each half `[2]` (prompts of half f are scored with step[1 - f]).
        momentum: heavy ball's fitted momentum per half `[2]`, else None.
        fit_score: path R2 on the half each parameter was fitted on `[2]` (in-sample: never a score).
    """

    __repr__ = compact_repr

    algorithm: str
    folds: np.ndarray
    step: np.ndarray
    momentum: np.ndarray | None
    fit_score: np.ndarray

    def solver(self) -> Callable[..., Any]:
        """The cross-fitted solver for all B prompts: registry signature, each prompt run with the
        parameters fitted on the other half (per-prompt `[B]` tensors)."""
        other = 1 - self.folds
        step = torch.as_tensor(self.step[other], dtype=torch.float64)
        momentum = None if self.momentum is None else torch.as_tensor(self.momentum[other], dtype=torch.float64)
        return _solver(self.algorithm, step, momentum)

    def rescaled(self, algorithm: str, factor: float) -> FittedStep:
        """The same fit for `algorithm`, whose step w is this one's times `factor` (e.g. Jacobi
        Richardson with P = p I runs exactly GD's iterates at w = w_gd / p)."""
        return FittedStep(algorithm=algorithm, folds=self.folds, step=self.step * factor, momentum=self.momentum, fit_score=self.fit_score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "step": self.step.tolist(),
            "momentum": None if self.momentum is None else self.momentum.tolist(),
            "fit_score": self.fit_score.tolist(),
            "fold_sizes": np.bincount(self.folds, minlength=2).tolist(),
        }


def _solver(algorithm: str, step: Any, momentum: Any = None) -> Callable[..., Any]:
    """`algorithm` with an explicit step (and momentum), registry signature."""
    if algorithm == "heavy_ball":
        return functools.partial(heavy_ball, step=step, momentum=momentum)
    return functools.partial(richardson, step=step, precond=RICHARDSON_PRECONDITIONERS[algorithm])


def cross_fit_folds(n_prompts: int, seed: int) -> np.ndarray:
    """Seeded split of the prompts into two halves: fold index `[n_prompts]` (sizes differ by at
    most one). Needs n_prompts >= 2."""
    if n_prompts < 2:
        raise ValueError("step_sizes='fitted' cross-fits on two halves of the prompts and needs >= 2 prompts: pass more prompts or step_sizes='optimal'")
    folds = np.zeros(n_prompts, dtype=np.int64)
    folds[np.random.default_rng(seed).permutation(n_prompts)[n_prompts // 2 :]] = 1
    return folds


def path_score(layer_pred: np.ndarray, step_pred: np.ndarray, scored: np.ndarray) -> float:
    """Path R2 of `step_pred` `[B, T+1, m]` against `layer_pred` `[B, L', m]` over rows `scored`,
    at the monotone alignment (as `probes.scoring.score_algorithm` computes its score); -inf for
    a diverging trajectory (non-finite, or beyond `probes.scoring.overflow_limit`)."""
    return float(path_scores(layer_pred, torch.as_tensor(np.asarray(step_pred, dtype=np.float64))[:, None], scored)[0])


def path_scores(layer_pred: np.ndarray, candidate_pred: torch.Tensor, scored: np.ndarray, folds: np.ndarray | None = None) -> np.ndarray:
    """`path_score` of G candidate trajectories at once: candidate_pred `[B, G, T+1, m]` -> `[G]`
    (-inf for a diverging candidate, one with values beyond `overflow_limit`, or an undefined
    R2). With `folds` (a fold index per prompt `[B]`, every fold 0..F-1 non-empty): each fold's
    score on its own prompts `[F, G]`, as if the folds were scored one at a time (a prompt's
    trajectory may differ between folds).

    The sums are `probes.scoring`'s (`pairwise_sse`, `centred_step_sums`, `weighted_sse_sst` with
    one 0/1 weight row per fold: exact differences, no cancellation), as are the alignment and
    path R2."""
    batch, n_candidates, _, n_query = candidate_pred.shape
    fold = np.zeros(batch, dtype=np.int64) if folds is None else np.asarray(folds, dtype=np.int64)
    indicator = (fold[None, :] == np.arange(fold.max() + 1)[:, None]).astype(np.float64)  # [F, B]
    pred = candidate_pred.detach().cpu().numpy()
    limit = overflow_limit(pred.size + np.size(layer_pred))  # beyond it (NaN and inf included), the sums would overflow
    low, high = (float(pred.min()), float(pred.max())) if pred.size else (0.0, 0.0)  # one pass each, shared below
    bounded = _bounded_candidates(pred, limit, low, high)  # [B, G]: False for a diverging step
    every_bounded = bool(bounded.all())
    values = (pred if every_bounded else np.where(bounded[:, :, None, None], pred, 0.0)).reshape(batch, -1, n_query)
    layers = np.asarray(layer_pred, dtype=np.float64)
    largest = max(-low, high) if every_bounded else float(np.abs(values).max(initial=0.0))
    scale = magnitude_scale(max(largest, float(np.abs(layers).max(initial=0.0))))  # the path R2 is scale-free; tiny squares underflow
    if scale != 1:
        layers, values = layers / scale, values / scale
    sums = PairedSums(pairwise_sse(layers, values), *centred_step_sums(values), n_query)
    sse, sst, count = weighted_sse_sst(sums, indicator)  # [F, L', G (T+1)], [F, G (T+1)], [F]
    diverged = indicator @ ~bounded > 0  # [F, G]
    sse = einops.rearrange(sse, "fold layer (g t) -> (fold g) layer t", g=n_candidates)
    sst = einops.rearrange(sst, "fold (g t) -> (fold g) t", g=n_candidates)
    steps, _ = monotone_alignment(sse / count.repeat(n_candidates)[:, None, None])
    score = path_r2(sse, sst, steps, scored).reshape(len(indicator), n_candidates)
    score = np.where(~diverged & ~np.isnan(score), score, -np.inf)
    return score[0] if folds is None else score


def _bounded_candidates(pred: np.ndarray, limit: float, low: float, high: float) -> np.ndarray:
    """Whether each prompt's trajectory of each candidate, pred `[B, G, T+1, m]` (smallest and
    largest value `low`, `high`), stays within +-limit (False for NaN) -> bool `[B, G]`; the common
    case, every value within, from the extremes alone (no temporary as large as pred)."""
    if pred.size and -limit <= low and high <= limit:  # NaN fails both comparisons
        return np.ones(pred.shape[:2], dtype=bool)
    return (np.abs(pred) <= limit).reshape(*pred.shape[:2], -1).all(axis=2)


def fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray,
) -> tuple[float, float | None, float]:
    """The global (step, momentum or None, path R2) maximising `algorithm`'s path R2 against
    `layer_pred` `[B, L', m]` on these prompts (K `[B, n, n]`, y `[B, n]`, K_query `[B, m, n]`)."""
    spectral = spectral_system(algorithm, K, y, lam, K_query)
    return _fit_folds({algorithm: spectral}, np.zeros(K.shape[0], dtype=np.int64), n_steps, layer_pred, scored)[algorithm][0]


def _fit_folds(
    systems: dict[str, SpectralSystem], folds: np.ndarray, n_steps: int, layer_pred: np.ndarray, scored: np.ndarray
) -> dict[str, list[tuple[float, float | None, float]]]:
    """`fit_step` of every algorithm of `systems` (name -> its `SpectralSystem`) on the prompts of
    each fold `folds` `[B]` separately, all side by side: the grids (steps relative to each fold's
    median optimal step, plus the `first_step_seeds`) in one batch, then bounded Brent on log step
    inside each algorithm's and fold's `REFINED_BRACKETS` best cells' brackets, every search in
    lockstep (`bounded_brent`), so that each iteration scores the next point of every search in
    one batch. Returns, per algorithm, (step, momentum or None, path R2) per fold."""
    names = list(systems)
    n_folds = int(folds.max()) + 1
    members = [torch.as_tensor(np.flatnonzero(folds == fold)) for fold in range(n_folds)]
    log_grids, momenta = [], []  # per algorithm: [F, G] log steps (sorted), momentum grid (NaN: none)
    for name, spectral in systems.items():
        optimal = optimal_steps(name, spectral.eigenvalues).cpu()
        references = np.array([float(optimal[fold_members].median()) for fold_members in members])
        grid = np.log(references[:, None] * STEP_GRID)
        seeds = first_step_seeds(spectral, members, layer_pred)  # [F, L']
        seeds = np.where(seeds > 0, seeds, references[:, None] * STEP_GRID[0])  # no positive fit: the grid's first step
        log_grids.append(np.sort(np.concatenate([grid, np.log(seeds)], axis=1), axis=1))
        momenta.append(MOMENTUM_GRID if name == "heavy_ball" else np.full(1, np.nan))
    score = _candidate_scores(list(systems.values()), folds, n_steps, layer_pred, scored)

    cells = [np.indices((n_folds, len(momenta[a]), log_grids[a].shape[1])).reshape(3, -1) for a in range(len(names))]  # (fold, row, column)
    system = np.concatenate([np.full(cell.shape[1], a) for a, cell in enumerate(cells)])
    values = score(
        system,
        np.concatenate([fold for fold, _, _ in cells]),
        np.concatenate([log_grids[a][fold, column] for a, (fold, _, column) in enumerate(cells)]),
        np.concatenate([momenta[a][row] for a, (_, row, _) in enumerate(cells)]),
    )
    tables = np.split(values, np.cumsum([cell.shape[1] for cell in cells])[:-1])
    tables = [table.reshape(n_folds, len(momenta[a]), -1) for a, table in enumerate(tables)]  # [F, rows, G] per algorithm
    brackets = []  # (algorithm, fold, momentum row, step column) of each algorithm's and fold's best few cells
    for a, table in enumerate(tables):
        best = np.argsort(-table.reshape(n_folds, -1), axis=1, kind="stable")[:, :REFINED_BRACKETS]
        row, column = np.unravel_index(best, table.shape[1:])
        brackets += [(a, f, r, c) for f in range(n_folds) for r, c in zip(row[f], column[f])]
    algorithm, fold, row, column = (np.array(index) for index in zip(*brackets))
    momentum = np.array([momenta[a][r] for a, r in zip(algorithm, row)])

    def loss(bracket: np.ndarray, log_step: np.ndarray) -> np.ndarray:
        values = score(algorithm[bracket], fold[bracket], log_step, momentum[bracket])
        return np.where(np.isfinite(values), -values, _DIVERGED)

    low = np.array([log_grids[a][f, max(c - 1, 0)] for a, f, c in zip(algorithm, fold, column)])
    high = np.array([log_grids[a][f, min(c + 1, log_grids[a].shape[1] - 1)] for a, f, c in zip(algorithm, fold, column)])
    log_step, value = bounded_brent(loss, low, high, LOG_STEP_XTOL)
    fits: dict[str, list[tuple[float, float | None, float]]] = {}
    for a, name in enumerate(names):
        fits[name] = []
        for f in range(n_folds):
            candidates = []
            for i in np.flatnonzero((algorithm == a) & (fold == f)):
                candidates += [(tables[a][f, row[i], column[i]], log_grids[a][f, column[i]], momentum[i]), (-value[i], log_step[i], momentum[i])]
            best, best_log_step, best_momentum = max(candidates, key=lambda fit: fit[0])
            fits[name].append((float(np.exp(best_log_step)), None if np.isnan(best_momentum) else float(best_momentum), float(best)))
    return fits


def first_step_seeds(spectral: SpectralSystem, members: list[torch.Tensor], layer_pred: np.ndarray) -> np.ndarray:
    """Per fold (prompt indices `members`, one `[B_f]` tensor per fold) and layer of `layer_pred`
    `[B, L', m]`, the step w whose FIRST step best matches that layer, by least squares over the
    fold's prompts and queries -> `[F, L']` (<= 0 or NaN where none fits). Step 1 of Richardson
    and of heavy ball is pred_1 = w g with g = gain 1 (s_1 = w in every mode), so
    w_l = <layer_l, g> / <g, g>. A network that runs the algorithm with its step takes exactly
    that step at its first step boundary: a grid point there finds a peak of path R2 that can be
    far narrower than the grid's spacing (the step is nearly unidentifiable between w and w / 2
    run twice as long, so path R2 is nearly flat away from the exact step)."""
    first = spectral.gain.sum(-1).detach().cpu().numpy()  # g [B, m]
    seeds = []
    for fold_members in members:
        g, layers = first[fold_members.numpy()], np.asarray(layer_pred, dtype=np.float64)[fold_members.numpy()]
        norm = float(np.vdot(g, g))
        seeds.append(np.einsum("blm,bm->l", layers, g) / norm if norm > 0 else np.full(layers.shape[1], np.nan))
    return np.array(seeds)


def _candidate_scores(
    systems: list[SpectralSystem], folds: np.ndarray, n_steps: int, layer_pred: np.ndarray, scored: np.ndarray
) -> Callable[..., np.ndarray]:
    """score(system `[N]`, fold `[N]`, log_step `[N]`, momentum `[N]`) -> path R2 `[N]` of each
    candidate (w, beta) of `systems[system]` (beta NaN: Richardson) on the prompts of its fold.
    Candidates are scored side by side, on the prompts of the folds that have candidates only:
    per system, batch column c holds the c-th candidate of every such fold (`path_scores(...,
    folds)`); systems with candidates in the same folds are scored together, `chunk` columns per
    batch (a system searching fewer folds gets its own batches: no trajectories of prompts
    nobody scores)."""

    @functools.lru_cache(maxsize=None)
    def prompts_of(active: tuple[int, ...]) -> tuple[list[SpectralSystem], np.ndarray, np.ndarray, int]:
        """The systems, fold index (renumbered 0..len(active)-1), layers and chunk size of the
        prompts of the folds `active`."""
        members = np.flatnonzero(np.isin(folds, active))
        chunk = max(1, GRID_CHUNK_VALUES // (len(members) * (n_steps + 1) * max(systems[0].gain.shape[1:])))
        index = torch.as_tensor(members)
        selected = {}  # one selection per distinct system (gd and heavy ball share theirs)
        for spectral in systems:
            if id(spectral) not in selected:
                selected[id(spectral)] = spectral.select(index)
        return [selected[id(spectral)] for spectral in systems], np.searchsorted(active, folds[members]), layer_pred[members], chunk

    def score(system: np.ndarray, fold: np.ndarray, log_step: np.ndarray, momentum: np.ndarray) -> np.ndarray:
        values = np.empty(len(fold))
        folds_of = {s: tuple(np.unique(fold[system == s]).tolist()) for s in np.unique(system)}
        for active in set(folds_of.values()):  # systems searching the same folds share batches
            ours = np.flatnonzero(np.isin(system, [s for s, searched in folds_of.items() if searched == active]))
            values[ours] = score_on_shared_folds(system[ours], fold[ours], log_step[ours], momentum[ours])
        return values

    def score_on_shared_folds(system: np.ndarray, fold: np.ndarray, log_step: np.ndarray, momentum: np.ndarray) -> np.ndarray:
        """`score` of candidates whose systems each have candidates in every fold present."""
        active, position = np.unique(fold, return_inverse=True)
        selected, member_folds, layers, chunk = prompts_of(tuple(active.tolist()))
        column = _rank_within(system * len(active) + position)  # rank within (system, fold)
        values = np.empty(len(fold))
        pending: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []  # (candidates, their batch columns, predictions)

        def flush() -> None:
            """Score the pending predictions in one batch."""
            table = path_scores(layers, torch.cat([pred for _, _, pred in pending], dim=1), scored, folds=member_folds)
            for candidates, columns, _ in pending:
                values[candidates] = table[position[candidates], columns]
            pending.clear()

        for s in np.unique(system):
            ours = np.flatnonzero(system == s)
            steps = _columns(position[ours], column[ours], np.exp(log_step[ours]))  # [F_active, C_s]
            betas = None if np.isnan(momentum[ours]).all() else _columns(position[ours], column[ours], momentum[ours])
            for start in range(0, steps.shape[1], chunk):
                part = slice(start, start + chunk)
                width = sum(pred.shape[1] for _, _, pred in pending)
                if pending and width + steps[:, part].shape[1] > chunk:
                    flush()
                    width = 0
                pred = selected[s].predictions(steps[member_folds, part], n_steps, None if betas is None else betas[member_folds, part])
                here = ours[(column[ours] >= start) & (column[ours] < start + chunk)]
                pending.append((here, width + column[here] - start, pred))
        flush()
        return values

    return score


def _rank_within(group: np.ndarray) -> np.ndarray:
    """Each entry's rank among the entries of its group `[N]` (0, 1, ... in order of appearance)."""
    order = np.argsort(group, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(group)) - np.searchsorted(group[order], group[order])
    return rank


def _columns(group: np.ndarray, rank: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Values `[N]` laid out as `[groups, max rank + 1]` (a group's r-th value in column r);
    unused cells repeat the first value (scored and ignored)."""
    out = np.full((group.max() + 1, rank.max() + 1), value[0])
    out[group, rank] = value
    return out


def cross_fit_steps(
    systems: dict[str, SpectralSystem], n_steps: int, layer_pred: np.ndarray, scored: np.ndarray, seed: int
) -> dict[str, FittedStep]:
    """`cross_fit_step` of several algorithms at once (name -> its `spectral_system`; algorithms
    with the same `fit_preconditioner` may share one): the same folds, and every algorithm's and
    half's searches in lockstep, each iteration one batch for all of them."""
    for name in systems:
        check_choice("algorithm", name, FITTED_STEP_ALGORITHMS)
    if not systems:
        return {}
    folds = cross_fit_folds(len(next(iter(systems.values())).eigenvalues), seed)
    fits = _fit_folds(systems, folds, n_steps, layer_pred, scored)
    fitted = {}
    for name, per_fold in fits.items():
        step, momentum, score = zip(*per_fold)
        fitted[name] = FittedStep(
            algorithm=name,
            folds=folds,
            step=np.array(step),
            momentum=None if momentum[0] is None else np.array(momentum),
            fit_score=np.array(score),
        )
    return fitted


def fit_global_steps(
    algorithms: list[str], K: torch.Tensor, y: torch.Tensor, lam: float, K_query: torch.Tensor, n_steps: int,
    layer_pred: np.ndarray, scored: np.ndarray, seed: int,
) -> tuple[dict[str, FittedStep], dict[str, ValueError]]:
    """The cross-fitted global steps of `algorithms` (names in `FITTED_STEP_ALGORITHMS`) on K
    `[B, n, n]`, y `[B, n]`, K_query `[B, m, n]` against `layer_pred` `[B, L', m]` (rows `scored`):
    every search in one lockstep (`cross_fit_steps`) on shared eigensystems (`spectral_systems`).

    When the Jacobi preconditioner is one scalar p for every prompt (diag K constant, as for the
    Gaussian kernel), Jacobi Richardson with step w IS gradient descent with step w p, step for
    step: with gd among `algorithms`, its fit is gd's rescaled (`FittedStep.rescaled`), not a
    second search.

    Returns:
        (fitted, unfit): name -> `FittedStep`, and name -> the ValueError of an algorithm whose
        preconditioner does not apply to these prompts (e.g. row sums <= 0).
    """
    jacobi = scalar_jacobi(K, y, lam) if {"gd", "richardson_jacobi"} <= set(algorithms) else None
    searched = [name for name in algorithms if not (name == "richardson_jacobi" and jacobi is not None)]
    systems, unfit = spectral_systems(searched, K, y, lam, K_query)
    fitted = cross_fit_steps(systems, n_steps, layer_pred, scored, seed)
    if jacobi is not None:
        fitted["richardson_jacobi"] = fitted["gd"].rescaled("richardson_jacobi", 1.0 / jacobi)
        fitted = {name: fitted[name] for name in algorithms if name in fitted}  # in the order asked
    return fitted, unfit


def scalar_jacobi(K: Any, y: Any, lam: float) -> float | None:
    """p when the Jacobi preconditioner diag(K + lam I)^-1 (`preconditioner_diagonal`) is p I for
    every prompt of K `[B, n, n]` (labels y `[B, n]`), else None (also where it does not apply)."""
    try:
        diagonal = preconditioner_diagonal(krr_system(K, y, lam), "jacobi")
    except ValueError:
        return None
    assert diagonal is not None  # only precond "none" has no diagonal
    values = diagonal.flatten()
    return float(values[0]) if values.numel() and bool((values == values[0]).all()) else None


def cross_fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray, seed: int, spectral: SpectralSystem | None = None,
) -> FittedStep:
    """`fit_step` on each half of the prompts (`cross_fit_folds(B, seed)`); see module docstring.
    One eigendecomposition per prompt serves both halves, whose searches run side by side.
    `spectral`: `spectral_system(algorithm, K, y, lam, K_query)` if already computed (algorithms
    with the same `fit_preconditioner` share it)."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    spectral = spectral_system(algorithm, K, y, lam, K_query) if spectral is None else spectral
    return cross_fit_steps({algorithm: spectral}, n_steps, layer_pred, scored, seed)[algorithm]
