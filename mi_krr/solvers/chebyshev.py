"""Chebyshev semi-iteration on (K + lam I) alpha = y."""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.solvers.spectrum import spectrum_bounds
from mi_krr.solvers.system import check_steps, krr_system, residual_norm
from mi_krr.solvers.trajectory import Trajectory

MIN_RELATIVE_WIDTH = 1e-12
"""Bounds closer than this (relative to their centre) are widened to it: with one eigenvalue
the iteration is then exact after one step instead of dividing by zero."""


def chebyshev(K: Any, y: Any, lam: float, n_steps: int, eig_bounds: Any = None, K_query: Any = None) -> Trajectory:
    """Chebyshev semi-iteration from alpha_0 = 0, every iterate kept.

    The error after t steps is T_t((c - A) / h) / T_t(c / h) applied to the initial error, with
    c = (low + high) / 2, h = (high - low) / 2 and T_t the Chebyshev polynomial: the smallest
    worst case over spectra inside [low, high].

    Args:
        K, y, lam, n_steps, K_query: as in `cg`.
        eig_bounds: (low, high) with 0 < low <= high bounding the spectrum of K + lam I, numbers
            or per-prompt `[...]`; default the extreme eigenvalues (batched eigvalsh).

    Returns:
        Trajectory (method "chebyshev"), params {"eig_bounds": (low, high)};
        residual_norm = ||y - (K + lam I) alpha_t||.
    """
    system = krr_system(K, y, lam, K_query)
    n_steps = check_steps(n_steps)
    if eig_bounds is None:
        low, high = (bound.reshape(-1, 1, 1) for bound in spectrum_bounds(system))
    else:
        try:
            low_given, high_given = eig_bounds
        except (TypeError, ValueError) as exc:
            raise ValueError(f"eig_bounds must be a pair (low, high), got {eig_bounds!r}") from exc
        low, high = system.per_prompt("eig_bounds", low_given), system.per_prompt("eig_bounds", high_given)
        if not (low.detach() <= high.detach()).all():
            raise ValueError(f"eig_bounds must satisfy 0 < low <= high, got {eig_bounds!r}")
    centre = (high + low) / 2
    half_width = torch.maximum((high - low) / 2, MIN_RELATIVE_WIDTH * centre)
    sigma = centre / half_width

    alpha = torch.zeros_like(system.y)
    residual = system.y
    direction = residual / centre
    rho = 1.0 / sigma
    iterates, residual_norms = [alpha], [residual_norm(residual)]
    for _ in range(n_steps):
        alpha = alpha + direction
        residual = system.y - system.apply(alpha)
        rho_next = 1.0 / (2.0 * sigma - rho)
        direction = torch.addcmul((rho_next * rho) * direction, 2.0 * rho_next / half_width, residual)
        rho = rho_next
        iterates.append(alpha)
        residual_norms.append(residual_norm(residual))
    return system.trajectory(
        torch.cat(iterates, dim=-2),
        torch.cat(residual_norms, dim=-1),
        "chebyshev",
        preconditioner="none",
        params={"eig_bounds": (system.recorded(None, low), system.recorded(None, high))},
    )
