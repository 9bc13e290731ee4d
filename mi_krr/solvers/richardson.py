"""Preconditioned Richardson iteration alpha <- alpha + w P (y - (K + lam I) alpha).

With P = I this is gradient descent on the KRR system; with the row-sum preconditioner
P = diag(K 1)^-1 it is the update a softmax transformer can run on a Gaussian kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.solvers.spectrum import preconditioner_diagonal, richardson_optimal_step, spectrum_bounds
from mi_krr.solvers.system import check_steps, krr_system, residual_norm
from mi_krr.solvers.trajectory import Trajectory


def richardson(
    K: Any,
    y: Any,
    lam: float,
    n_steps: int,
    step: Any = None,
    precond: str = "none",
    K_query: Any = None,
) -> Trajectory:
    """Preconditioned Richardson from alpha_0 = 0, every iterate kept.

    Args:
        K: kernel matrices `[..., n, n]` (symmetric PSD).
        y: labels `[..., n]`.
        lam: ridge parameter > 0.
        n_steps: T >= 0.
        step: w, a number or per-prompt values broadcastable to `[...]`; default the optimal
            2 / (mu_min + mu_max) of P (K + lam I), per prompt.
        precond: "none" (P = I), "jacobi" (P = diag(K + lam I)^-1) or "rowsum"
            (P = diag(K 1)^-1; every row sum of K must be > 0).
        K_query: query-support kernel `[..., m, n]`; gives `pred` `[..., T+1, m]`.

    Returns:
        Trajectory (method "richardson") with step (float, or tensor `[...]`) and
        preconditioner recorded; residual_norm = ||y - (K + lam I) alpha_t||.
    """
    system = krr_system(K, y, lam, K_query)
    n_steps = check_steps(n_steps)
    diagonal = preconditioner_diagonal(system, precond)
    if step is None:
        step_per_prompt = richardson_optimal_step(*spectrum_bounds(system, diagonal)).reshape(-1, 1, 1)
    else:
        step_per_prompt = system.per_prompt("step", step)
    scaled = step_per_prompt if diagonal is None else step_per_prompt * diagonal  # w P, [batch, 1|n]

    alpha = torch.zeros_like(system.y)
    residual = system.y
    iterates, residual_norms = [alpha], [residual_norm(residual)]
    for _ in range(n_steps):
        alpha = torch.addcmul(alpha, scaled, residual)
        residual = system.y - system.apply(alpha)
        iterates.append(alpha)
        residual_norms.append(residual_norm(residual))
    return system.trajectory(
        torch.cat(iterates, dim=-2),
        torch.cat(residual_norms, dim=-1),
        "richardson",
        step=system.recorded(step, step_per_prompt),
        preconditioner=precond,
    )
