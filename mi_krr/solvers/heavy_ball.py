"""Polyak's heavy-ball method on (K + lam I) alpha = y."""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.solvers.spectrum import polyak_parameters, spectrum_bounds
from mi_krr.solvers.system import check_steps, krr_system, residual_norm
from mi_krr.solvers.trajectory import Trajectory


def heavy_ball(
    K: Any, y: Any, lam: float, n_steps: int, step: Any = None, momentum: Any = None, K_query: Any = None
) -> Trajectory:
    """alpha_{t+1} = alpha_t + w (y - A alpha_t) + beta (alpha_t - alpha_{t-1}), A = K + lam I,
    from alpha_{-1} = alpha_0 = 0, every iterate kept.

    Args:
        K, y, lam, n_steps, K_query: as in `cg`.
        step: w (number or per-prompt `[...]`); default Polyak's optimal
            4 / (sqrt(mu_max) + sqrt(mu_min))^2 from the spectrum of A, per prompt.
        momentum: beta in [0, 1) (number or per-prompt); default the optimal
            ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2, kappa = mu_max / mu_min.

    Returns:
        Trajectory (method "heavy_ball"), step recorded, params {"momentum": ...};
        residual_norm = ||y - A alpha_t||.
    """
    system = krr_system(K, y, lam, K_query)
    n_steps = check_steps(n_steps)
    if step is None or momentum is None:
        optimal_step, optimal_momentum = (value.reshape(-1, 1, 1) for value in polyak_parameters(*spectrum_bounds(system)))
    if step is None:
        step_per_prompt = optimal_step
    else:
        step_per_prompt = system.per_prompt("step", step)
    if momentum is None:
        momentum_per_prompt = optimal_momentum
    else:
        momentum_per_prompt = system.per_prompt("momentum", momentum, positive=False)
        if not ((momentum_per_prompt.detach() >= 0) & (momentum_per_prompt.detach() < 1)).all():
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")

    previous = alpha = torch.zeros_like(system.y)
    residual = system.y
    iterates, residual_norms = [alpha], [residual_norm(residual)]
    for _ in range(n_steps):
        update = torch.addcmul(momentum_per_prompt * (alpha - previous), step_per_prompt, residual)
        previous, alpha = alpha, alpha + update
        residual = system.y - system.apply(alpha)
        iterates.append(alpha)
        residual_norms.append(residual_norm(residual))
    return system.trajectory(
        torch.cat(iterates, dim=-2),
        torch.cat(residual_norms, dim=-1),
        "heavy_ball",
        step=system.recorded(step, step_per_prompt),
        preconditioner="none",
        params={"momentum": system.recorded(momentum, momentum_per_prompt)},
    )
