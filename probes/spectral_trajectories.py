"""Fixed-step Richardson and heavy-ball trajectories of KRR systems in closed form, for fitting
their step sizes (`probes.step_sizes`) without re-running the solvers.

With P the diagonal preconditioner and S = P^1/2 (K + lam I) P^1/2 = U diag(mu) U^T (ONE symmetric
eigendecomposition per prompt), any iteration whose update is a polynomial in P A decouples into
scalar recurrences per eigenmode. From alpha_0 = 0 (and alpha_-1 = 0), alpha_t = P^1/2 U diag(s_t)
U^T P^1/2 y, where per mode s_{t+1} = s_t + w (1 - mu s_t) + beta (s_t - s_{t-1}), s_0 = s_-1 = 0
(beta = 0: Richardson, s_t = (1 - (1 - w mu)^t) / mu). So pred_t = K_query P^1/2 U diag(c) s_t with
c = U^T P^1/2 y: a [m, n] gain per prompt, times s_t for every candidate at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_choice
from mi_krr.solvers.spectrum import polyak_parameters, preconditioner_diagonal, richardson_optimal_step
from mi_krr.solvers.system import check_steps, krr_system
from probes.sensitivity import RICHARDSON_PRECONDITIONERS

FITTED_STEP_ALGORITHMS = (*RICHARDSON_PRECONDITIONERS, "heavy_ball")
"""Registry names whose step `diagnose(step_sizes="fitted")` fits (the others keep their
registry parameters)."""


@dataclass(frozen=True)
class SpectralSystem:
    """The KRR systems of B prompts in the eigenbasis of S = P^1/2 (K + lam I) P^1/2, for
    evaluating fixed-step Richardson / heavy-ball trajectories in closed form (module docstring).

    Attributes:
        eigenvalues: mu, the eigenvalues of S (= those of P (K + lam I)), ascending `[B, n]`.
        gain: K_query P^1/2 U diag(U^T P^1/2 y) `[B, m, n]`: pred_t = gain @ s_t.
    """

    __repr__ = compact_repr

    eigenvalues: torch.Tensor
    gain: torch.Tensor

    def select(self, index: torch.Tensor) -> SpectralSystem:
        """The prompts `index` `[B']`."""
        return SpectralSystem(eigenvalues=self.eigenvalues[index], gain=self.gain[index])

    @functools.cached_property
    def _arrays(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """CPU copies for the candidate loops: mu `[B, n]`; gain^T `[B, n, m]`; and
        [-(gain / mu)^T; pred_inf] `[B, n+1, m]` with pred_inf = (gain / mu) 1 (the limit
        t -> inf), so that the row [(1 - w mu)^t, 1] times it is Richardson's pred_t."""
        mu = self.eigenvalues.detach().cpu()
        gain = self.gain.detach().cpu().numpy()
        scaled = gain / mu.numpy()[:, None, :]
        limit_form = np.concatenate([-scaled, scaled.sum(-1, keepdims=True)], axis=2).transpose(0, 2, 1)
        return mu, np.ascontiguousarray(gain.transpose(0, 2, 1)), np.ascontiguousarray(limit_form)

    def predictions(self, step: Any, n_steps: int, momentum: Any = None) -> torch.Tensor:
        """Query predictions of alpha_{t+1} = alpha_t + w P (y - A alpha_t) + beta (alpha_t -
        alpha_{t-1}) from alpha_0 = alpha_-1 = 0 for G candidate (w, beta) pairs at once.

        Args:
            step: w per candidate `[G]`, per prompt and candidate `[B, G]`, or a number.
            n_steps: T >= 0.
            momentum: beta, shaped like `step` (or a number); None for Richardson (beta = 0).

        Returns:
            pred `[B, G, T+1, m]` (float64, on the system's device); non-finite where a step
            diverges past float range.
        """
        n_steps = check_steps(n_steps)
        mu, gain_t, limit_form = self._arrays
        w = _per_prompt(step, len(mu))
        if momentum is None:
            pred = _richardson_predictions(mu, limit_form, w, n_steps)
        else:
            pred = _heavy_ball_predictions(mu, gain_t, w, _per_prompt(momentum, len(mu)), n_steps)
        return torch.from_numpy(pred).to(self.eigenvalues.device)


def _per_prompt(value: Any, batch: int) -> torch.Tensor:
    """A candidate parameter (number, `[G]` or `[B, G]`) as `[B, G, 1]`."""
    value = torch.as_tensor(value, dtype=torch.float64, device="cpu")
    return (value.reshape(1, -1) if value.ndim < 2 else value).expand(batch, -1)[:, :, None]


def _richardson_predictions(mu: torch.Tensor, limit_form: np.ndarray, w: torch.Tensor, n_steps: int) -> np.ndarray:
    """Richardson in closed form, pred_t = gain s_t = pred_inf - (gain / mu) (1 - w mu)^t, with
    pred_0 = 0 exactly: mu `[B, n]`, limit_form = [-(gain / mu)^T; pred_inf] `[B, n+1, m]`, w
    `[B, G, 1]` -> `[B, G, T+1, m]`: ONE matmul of the rows [(1 - w mu)^t, 1] (t >= 1; t = 0: 0)."""
    batch, n = mu.shape
    decay = 1.0 - w * mu[:, None, :]  # [B, G, n]
    rows = torch.empty(batch, w.shape[1], n_steps + 1, n + 1, dtype=torch.float64)
    rows[:, :, 0] = 0.0
    rows[:, :, 1:, n] = 1.0
    torch.cumprod(decay[:, :, None, :].expand(-1, -1, n_steps, -1), dim=2, out=rows[:, :, 1:, :n])
    return np.matmul(rows.numpy().reshape(batch, -1, n + 1), limit_form).reshape(*rows.shape[:3], -1)


def _heavy_ball_predictions(mu: torch.Tensor, gain_t: np.ndarray, w: torch.Tensor, beta: torch.Tensor, n_steps: int) -> np.ndarray:
    """The per-mode recurrence s_{t+1} = s_t + w (1 - mu s_t) + beta (s_t - s_{t-1}) =
    w + (1 + beta - w mu) s_t - beta s_{t-1} from s_0 = s_-1 = 0, pred_t = gain s_t: mu `[B, n]`,
    gain_t = gain^T `[B, n, m]`, w and beta `[B, G, 1]` -> `[B, G, T+1, m]`."""
    batch, n = mu.shape
    w, beta = torch.broadcast_tensors(w, beta)
    carry = (1.0 + beta) - w * mu[:, None, :]  # [B, G, n]
    modes = torch.empty(batch, w.shape[1], n_steps + 1, n, dtype=torch.float64)
    modes[:, :, 0] = 0.0
    modes[:, :, 1:2] = w[:, :, None]  # s_1 = w (nothing when T = 0)
    for t in range(1, n_steps):
        torch.addcmul(w, carry, modes[:, :, t], out=modes[:, :, t + 1])
        modes[:, :, t + 1].addcmul_(beta, modes[:, :, t - 1], value=-1.0)
    return np.matmul(modes.numpy().reshape(batch, -1, n), gain_t).reshape(*modes.shape[:3], -1)


def spectral_system(algorithm: str, K: Any, y: Any, lam: float, K_query: Any) -> SpectralSystem:
    """The `SpectralSystem` of `algorithm`'s preconditioner (heavy ball: none) on K `[B, n, n]`, y
    `[B, n]`, K_query `[B, m, n]`: one batched symmetric eigendecomposition."""
    system = krr_system(K, y, lam, K_query)
    if system.K_query is None:
        raise ValueError("spectral_system needs K_query [..., m, n]: the fit compares query predictions")
    diagonal = preconditioner_diagonal(system, fit_preconditioner(algorithm))  # [B, 1, n] or None
    A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
    root = torch.ones_like(system.y) if diagonal is None else diagonal.sqrt()  # P^1/2 as rows [B, 1, n]
    eigenvalues, U = torch.linalg.eigh(root.mT * A * root)
    basis = root.mT * U  # P^1/2 U, [B, n, n]
    coefficients = torch.bmm(system.y, basis)  # (U^T P^1/2 y)^T, [B, 1, n]
    gain = torch.bmm(system.K_query, basis) * coefficients
    return SpectralSystem(eigenvalues=eigenvalues, gain=gain)


def spectral_systems(
    algorithms: list[str], K: Any, y: Any, lam: float, K_query: Any
) -> tuple[dict[str, SpectralSystem], dict[str, ValueError]]:
    """`spectral_system` of each of `algorithms` (names in `FITTED_STEP_ALGORITHMS`), those with
    the same `fit_preconditioner` sharing ONE eigendecomposition (gd and heavy ball).

    Returns:
        (systems, unfit): name -> its `SpectralSystem`, and name -> the ValueError of an algorithm
        whose preconditioner does not apply to these prompts (e.g. row sums <= 0).
    """
    by_preconditioner: dict[str, SpectralSystem | ValueError] = {}
    for name in algorithms:
        preconditioner = fit_preconditioner(name)
        if preconditioner not in by_preconditioner:
            try:
                by_preconditioner[preconditioner] = spectral_system(name, K, y, lam, K_query)
            except ValueError as error:
                by_preconditioner[preconditioner] = error
    outcome = {name: by_preconditioner[fit_preconditioner(name)] for name in algorithms}
    systems = {name: value for name, value in outcome.items() if isinstance(value, SpectralSystem)}
    return systems, {name: value for name, value in outcome.items() if isinstance(value, ValueError)}


def fit_preconditioner(algorithm: str) -> str:
    """The preconditioner of `algorithm`'s `SpectralSystem` ("none" for gd and heavy ball, which
    therefore share one)."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    return RICHARDSON_PRECONDITIONERS.get(algorithm, "none")


def optimal_steps(algorithm: str, eigenvalues: torch.Tensor) -> torch.Tensor:
    """The registry's default step of `algorithm` for each prompt `[B]`, from the ascending
    spectrum mu `[B, n]` of its preconditioned system (`SpectralSystem.eigenvalues`):
    2 / (mu_min + mu_max) for Richardson (`mi_krr.solvers.richardson`), Polyak's
    4 / (sqrt(mu_max) + sqrt(mu_min))^2 for heavy ball (`mi_krr.solvers.heavy_ball`)."""
    check_choice("algorithm", algorithm, FITTED_STEP_ALGORITHMS)
    bounds = eigenvalues[:, 0], eigenvalues[:, -1]
    return polyak_parameters(*bounds)[0] if algorithm == "heavy_ball" else richardson_optimal_step(*bounds)
