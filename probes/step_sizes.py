"""One fixed step size per algorithm, fitted to the model: what a network with fixed weights can
implement.

The registry's step-size-parameterised solvers (GD, Jacobi / row-sum Richardson, heavy ball) take
the spectrum-optimal step of EACH prompt (e.g. 2 / (mu_min + mu_max)); a trained or constructed
network cannot know a prompt's spectrum, so it runs one learning rate for every prompt (von
Oswald et al.'s GD transformers; line-search GD picks that rate once). `fit_step` finds that
global step by maximising the algorithm's path R2 against the model's layers (`probes.scoring`):
a log-spaced grid around the prompts' typical optimal step, then a bounded Brent search (golden
section with parabolic steps) on log step inside the brackets of the best grid points. Heavy ball also
fits its momentum, on the grid 0.1, 0.3, ..., 0.9 (momentum 0 is GD, already a candidate).

Every candidate is evaluated in closed form (`SpectralSystem`), not by re-running the solver: with
P the diagonal preconditioner and S = P^1/2 (K + lam I) P^1/2 = U diag(mu) U^T (ONE symmetric
eigendecomposition per prompt), any iteration whose update is a polynomial in P A decouples into
scalar recurrences per eigenmode. From alpha_0 = 0 (and alpha_-1 = 0), alpha_t = P^1/2 U diag(s_t)
U^T P^1/2 y, where per mode s_{t+1} = s_t + w (1 - mu s_t) + beta (s_t - s_{t-1}), s_0 = s_-1 = 0
(beta = 0: Richardson, s_t = (1 - (1 - w mu)^t) / mu). So pred_t = K_query P^1/2 U diag(c) s_t with
c = U^T P^1/2 y: a [m, n] gain per prompt, times s_t for every candidate at once. The trajectories
`diagnose` reports for the fitted steps are then run by the real solvers.

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
from scipy import optimize

from mi_krr._validation import check_choice
from mi_krr.solvers import ALGORITHMS, heavy_ball, richardson
from mi_krr.solvers._spectrum import preconditioner_diagonal
from mi_krr.solvers._system import check_steps, krr_system
from probes.scoring import monotone_alignment, path_r2
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

GRID_CHUNK_VALUES = 2**20
"""float64 values per chunk of candidates evaluated at once (per-mode and per-query trajectories
`[B, chunk, T+1, n or m]`):
small enough to stay in cache (large temporaries cost more in page faults than in arithmetic)."""

_DIVERGED = 1e300


@dataclass(frozen=True)
class SpectralSystem:
    """The KRR systems of B prompts in the eigenbasis of S = P^1/2 (K + lam I) P^1/2, for
    evaluating fixed-step Richardson / heavy-ball trajectories in closed form (module docstring).

    Attributes:
        eigenvalues: mu, the eigenvalues of S (= those of P (K + lam I)) `[B, n]`.
        gain: K_query P^1/2 U diag(U^T P^1/2 y) `[B, m, n]`: pred_t = gain @ s_t.
    """

    eigenvalues: torch.Tensor
    gain: torch.Tensor

    def select(self, index: torch.Tensor) -> SpectralSystem:
        """The prompts `index` `[B']`."""
        return SpectralSystem(eigenvalues=self.eigenvalues[index], gain=self.gain[index])

    def predictions(self, step: Any, n_steps: int, momentum: Any = None) -> torch.Tensor:
        """Query predictions of alpha_{t+1} = alpha_t + w P (y - A alpha_t) + beta (alpha_t -
        alpha_{t-1}) from alpha_0 = alpha_-1 = 0 for G candidate (w, beta) pairs at once.

        Args:
            step: w per candidate `[G]` (or a number).
            n_steps: T >= 0.
            momentum: beta per candidate `[G]` (or a number), None for Richardson (beta = 0).

        Returns:
            pred `[B, G, T+1, m]` (float64); non-finite where a step diverges past float range.
        """
        n_steps = check_steps(n_steps)
        mu = self.eigenvalues[:, None, :]  # [B, 1, n]
        w = torch.as_tensor(step, dtype=torch.float64, device=mu.device).reshape(-1)[None, :, None]  # [1, G, 1]
        beta = None if momentum is None else torch.as_tensor(momentum, dtype=torch.float64, device=mu.device).reshape(-1)[None, :, None]
        rate = w * mu  # [B, G, n]
        if beta is None:  # Richardson in closed form: s_t = (1 - (1 - w mu)^t) / mu
            decay = (1.0 - rate)[:, :, None, :]  # [B, G, 1, n]
            powers = torch.cat([torch.ones_like(decay), decay.expand(-1, -1, n_steps, -1).cumprod(dim=2)], dim=2)  # (1 - w mu)^t
            modes = (1.0 - powers) / mu[:, :, None, :]  # [B, G, T+1, n]
            return torch.einsum("bgtn,bmn->bgtm", modes, self.gain)
        gain = self.gain.mT  # [B, n, m]
        previous = current = torch.zeros_like(rate)  # s_0 = s_-1 = 0
        preds = [torch.bmm(current, gain)]
        for _ in range(n_steps):
            update = torch.addcmul(w, rate, current, value=-1.0)  # w (1 - mu s_t)
            update = torch.addcmul(update, beta, current - previous)
            previous, current = current, current + update
            preds.append(torch.bmm(current, gain))
        return torch.stack(preds, dim=2)


def spectral_system(algorithm: str, K: Any, y: Any, lam: float, K_query: Any) -> SpectralSystem:
    """The `SpectralSystem` of `algorithm`'s preconditioner (heavy ball: none) on K `[B, n, n]`, y
    `[B, n]`, K_query `[B, m, n]`: one batched symmetric eigendecomposition."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    system = krr_system(K, y, lam, K_query)
    if system.K_query is None:
        raise ValueError("spectral_system needs K_query [..., m, n]: the fit compares query predictions")
    diagonal = preconditioner_diagonal(system, RICHARDSON_PRECONDITIONERS.get(algorithm, "none"))  # [B, 1, n] or None
    A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
    root = torch.ones_like(system.y) if diagonal is None else diagonal.sqrt()  # P^1/2 as rows [B, 1, n]
    eigenvalues, U = torch.linalg.eigh(root.mT * A * root)
    basis = root.mT * U  # P^1/2 U, [B, n, n]
    coefficients = torch.bmm(system.y, basis)  # (U^T P^1/2 y)^T, [B, 1, n]
    gain = torch.bmm(system.K_query, basis) * coefficients
    return SpectralSystem(eigenvalues=eigenvalues, gain=gain)


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
    return float(path_scores(layer_pred, torch.as_tensor(np.asarray(step_pred, dtype=np.float64))[:, None], scored)[0])


def path_scores(layer_pred: np.ndarray, candidate_pred: torch.Tensor, scored: np.ndarray) -> np.ndarray:
    """`path_score` of G candidate trajectories at once: candidate_pred `[B, G, T+1, m]` -> `[G]`
    (-inf for a non-finite candidate or an undefined R2).

    The sums are `probes.scoring`'s (`paired_sums` + `weighted_sse_sst`: SSE over prompts and
    queries per (layer, step), SST of each step's values about their all-prompt mean), computed
    in torch as exact differences (no |a|^2 - 2 a.b + |b|^2 cancellation) because the fit scores
    thousands of candidates; the alignment and path R2 are `probes.scoring`'s own."""
    batch, n_candidates, n_times, n_query = candidate_pred.shape
    finite = torch.isfinite(candidate_pred).all(dim=3).all(dim=2).all(dim=0)  # [G]
    values = torch.where(finite[:, None, None], candidate_pred, 0.0).reshape(batch, n_candidates * n_times, n_query)
    layers = torch.as_tensor(layer_pred, dtype=torch.float64, device=values.device)
    sse = torch.cdist(layers, values, compute_mode="donot_use_mm_for_euclid_dist").square().sum(0)  # [L', G (T+1)]
    sst = (values - values.mean(dim=(0, 2), keepdim=True)).square().sum(dim=(0, 2))  # [G (T+1)]
    sse = einops.rearrange(sse.cpu().numpy(), "layer (g t) -> g layer t", g=n_candidates)
    sst = einops.rearrange(sst.cpu().numpy(), "(g t) -> g t", g=n_candidates)
    steps, _ = monotone_alignment(sse / (batch * n_query))
    score = path_r2(sse, sst, steps, scored)
    return np.where(finite.cpu().numpy() & ~np.isnan(score), score, -np.inf)


def fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray,
) -> tuple[float, float | None, float]:
    """The global (step, momentum or None, path R2) maximising `algorithm`'s path R2 against
    `layer_pred` `[B, L', m]` on these prompts (K `[B, n, n]`, y `[B, n]`, K_query `[B, m, n]`)."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    reference = float(ALGORITHMS[algorithm](K, y, lam, 0).step.median())  # typical spectrum-optimal step
    return _fit_spectral(algorithm, spectral_system(algorithm, K, y, lam, K_query), reference, n_steps, layer_pred, scored)


def _fit_spectral(
    algorithm: str, spectral: SpectralSystem, reference: float, n_steps: int, layer_pred: np.ndarray, scored: np.ndarray
) -> tuple[float, float | None, float]:
    """`fit_step` on prompts given by their `SpectralSystem`, grid steps relative to `reference`:
    the whole grid scored in batches, then bounded Brent on log step inside each of the
    `REFINED_BRACKETS` best cells' brackets (one closed-form candidate per evaluation)."""
    batch = spectral.eigenvalues.shape[0]
    chunk = max(1, GRID_CHUNK_VALUES // (batch * (n_steps + 1) * max(spectral.gain.shape[1:])))

    def scores(log_steps: np.ndarray, momenta: np.ndarray | None) -> np.ndarray:
        """Path R2 of every candidate (exp(log_steps[i]), momenta[i]), `chunk` candidates per batch."""
        out = []
        for start in range(0, len(log_steps), chunk):
            part = slice(start, start + chunk)
            pred = spectral.predictions(np.exp(log_steps[part]), n_steps, None if momenta is None else momenta[part])
            out.append(path_scores(layer_pred, pred, scored))
        return np.concatenate(out)

    log_grid = np.log(reference * STEP_GRID)  # [G]
    heavy = algorithm == "heavy_ball"
    momenta = MOMENTUM_GRID if heavy else np.zeros(1)
    table = scores(np.tile(log_grid, len(momenta)), momenta.repeat(len(log_grid)) if heavy else None).reshape(len(momenta), -1)
    cells = np.argsort(-table, axis=None, kind="stable")[:REFINED_BRACKETS]  # the best few (momentum, step) cells
    rows, best = np.unravel_index(cells, table.shape)
    fits = []
    for row, column in zip(rows, best):
        candidate_momentum = momenta[row:row + 1] if heavy else None

        def loss(log_step: float) -> float:
            score = scores(np.array([log_step]), candidate_momentum)[0]
            return -score if np.isfinite(score) else _DIVERGED

        low, high = log_grid[max(column - 1, 0)], log_grid[min(column + 1, len(log_grid) - 1)]
        result = optimize.minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": LOG_STEP_XTOL})
        fits += [(table[row, column], log_grid[column], momenta[row]), (-result.fun, result.x, momenta[row])]
    score, log_step, momentum = max(fits, key=lambda fit: fit[0])
    return float(np.exp(log_step)), float(momentum) if heavy else None, float(score)


def cross_fit_step(
    algorithm: str, K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, K_query: torch.Tensor,
    layer_pred: np.ndarray, scored: np.ndarray, seed: int,
) -> FittedStep:
    """`fit_step` on each half of the prompts (`cross_fit_folds(B, seed)`); see module docstring.
    One eigendecomposition per prompt serves both halves."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    folds = cross_fit_folds(K.shape[0], seed)
    spectral = spectral_system(algorithm, K, y, lam, K_query)
    optimal_steps = ALGORITHMS[algorithm](K, y, lam, 0).step  # spectrum-optimal step per prompt [B]
    fits = []
    for fold in (0, 1):
        members = torch.as_tensor(np.flatnonzero(folds == fold))
        reference = float(optimal_steps[members].median())
        fits.append(_fit_spectral(algorithm, spectral.select(members), reference, n_steps, layer_pred[members.numpy()], scored))
    step, momentum, score = zip(*fits)
    return FittedStep(
        algorithm=algorithm,
        folds=folds,
        step=np.array(step),
        momentum=None if momentum[0] is None else np.array(momentum),
        fit_score=np.array(score),
    )
