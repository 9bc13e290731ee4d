"""One fixed step size per algorithm, fitted to the model: what a network with fixed weights can
implement.

The registry's step-size-parameterised solvers (GD, Jacobi / row-sum Richardson, heavy ball) take
the spectrum-optimal step of EACH prompt (e.g. 2 / (mu_min + mu_max)); a trained or constructed
network cannot know a prompt's spectrum, so it runs one learning rate for every prompt (von
Oswald et al.'s GD transformers; line-search GD picks that rate once). `fit_steps` finds that
global step by maximising the algorithm's path R2 against the model's layers (`probes.scoring`):
a log-spaced grid around the prompts' typical optimal step, then a bounded Brent search (golden
section with parabolic steps) on log step inside the brackets of the best grid points. Heavy ball also
fits its momentum, on the grid 0.1, 0.3, ..., 0.9 (momentum 0 is GD, already a candidate).

Cross-fitting keeps the fitted parameter from inflating scores: the prompts are split in two
halves (seeded); each half's parameters are fitted on that half, and every prompt is then scored
with the parameters fitted on the OTHER half.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from scipy import optimize

from mi_krr._validation import check_choice
from mi_krr.solvers import ALGORITHMS, heavy_ball, richardson
from probes.scoring import monotone_alignment, paired_sums, path_r2, weighted_sse_sst
from probes.sensitivity import RICHARDSON_PRECONDITIONERS

STEP_SIZES = ("fitted", "optimal")
FITTED_STEP_ALGORITHMS = (*RICHARDSON_PRECONDITIONERS, "heavy_ball")
"""Registry names whose step `diagnose(step_sizes="fitted")` fits (the others keep their
registry parameters)."""

STEP_GRID = np.geomspace(1e-3, 2.0, 23)
"""Candidate steps relative to the median spectrum-optimal step of the fitted prompts (ratio
~1.4 between neighbours; Brent then resolves the step inside the best points' brackets); above
~2x the optimal step Richardson diverges on typical prompts."""

MOMENTUM_GRID = np.linspace(0.1, 0.9, 5)
REFINED_BRACKETS = 3
"""Brent refines the step around the 3 best grid cells: near an exact match the path R2 peaks
sharply, and the peak may sit in the bracket of the second-best grid point."""
LOG_STEP_XTOL = 1e-6
"""Brent's tolerance on log(step): the fitted step is resolved to ~1e-6 relative."""

GRID_CHUNK_VALUES = 2**22
"""Kernel entries (float64) copied at once when a chunk of grid steps runs as one batch."""

_DIVERGED = 1e300


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
    non-finite trajectories (a diverging step)."""
    if not np.isfinite(step_pred).all():
        return -np.inf
    sse, sst, count = weighted_sse_sst(paired_sums(layer_pred, step_pred))
    steps, _ = monotone_alignment(sse / count[:, None, None])
    return float(path_r2(sse, sst, steps, scored)[0])


def fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray,
) -> tuple[float, float | None, float]:
    """The global (step, momentum or None, path R2) maximising `algorithm`'s path R2 against
    `layer_pred` `[B, L', m]` on these prompts (K `[B, n, n]`, y `[B, n]`, K_query `[B, m, n]`)."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    reference = float(ALGORITHMS[algorithm](K, y, lam, 0).step.median())  # typical spectrum-optimal step
    grid = torch.as_tensor(reference * STEP_GRID, dtype=torch.float64)  # [G]
    batch = K.shape[0]

    chunk = max(1, GRID_CHUNK_VALUES // K.numel())

    def grid_scores(momentum: float | None) -> np.ndarray:
        """Path R2 of every grid step, `chunk` steps per solver call (the grid as a leading batch
        dimension)."""
        scores = []
        for steps in grid.split(chunk):
            g = len(steps)
            solve = _solver(algorithm, steps[:, None].expand(g, batch), momentum)
            pred = solve(K.expand(g, *K.shape), y.expand(g, *y.shape), lam, n_steps, K_query=K_query.expand(g, *K_query.shape)).pred
            scores += [path_score(layer_pred, one, scored) for one in pred.detach().cpu().numpy()]
        return np.array(scores)

    momenta = list(MOMENTUM_GRID) if algorithm == "heavy_ball" else [None]
    table = np.nan_to_num(np.stack([grid_scores(momentum) for momentum in momenta]), nan=-np.inf)  # [momenta, G]
    log_grid = np.log(grid.numpy())
    fits = []
    for cell in np.argsort(-table, axis=None, kind="stable")[:REFINED_BRACKETS]:  # the best few (momentum, step) cells
        row, best = np.unravel_index(cell, table.shape)
        momentum = momenta[row]

        def loss(log_step: float) -> float:
            pred = _solver(algorithm, float(np.exp(log_step)), momentum)(K, y, lam, n_steps, K_query=K_query).pred
            score = path_score(layer_pred, pred.detach().cpu().numpy(), scored)
            return -score if np.isfinite(score) else _DIVERGED

        low, high = log_grid[max(best - 1, 0)], log_grid[min(best + 1, len(grid) - 1)]
        result = optimize.minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": LOG_STEP_XTOL})
        fits += [(table[row, best], log_grid[best], momentum), (-result.fun, result.x, momentum)]
    score, log_step, momentum = max(fits, key=lambda fit: fit[0])
    return float(np.exp(log_step)), None if momentum is None else float(momentum), float(score)


def cross_fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray, seed: int,
) -> FittedStep:
    """`fit_step` on each half of the prompts (`cross_fit_folds(B, seed)`); see module docstring."""
    folds = cross_fit_folds(K.shape[0], seed)
    fits = []
    for fold in (0, 1):
        members = torch.as_tensor(np.flatnonzero(folds == fold))
        fits.append(fit_step(algorithm, K[members], y[members], lam, n_steps, K_query[members], layer_pred[members.numpy()], scored))
    step, momentum, score = zip(*fits)
    return FittedStep(
        algorithm=algorithm,
        folds=folds,
        step=np.array(step),
        momentum=None if momentum[0] is None else np.array(momentum),
        fit_score=np.array(score),
    )
