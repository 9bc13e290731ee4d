"""Iterative Newton (Newton–Schulz) for the inverse of K + lam I, as in Fu et al. (2024)."""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.solvers.spectrum import preconditioned_eigenvalues
from mi_krr.solvers.system import check_steps, krr_system
from mi_krr.solvers.trajectory import Trajectory


def newton_schulz(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """Newton–Schulz iteration M_{s+1} = 2 M_s - M_s A M_s on A = K + lam I from M_0 = c A,
    c = 2 / (mu_max^2 + mu_min^2) (per prompt, from batched eigvalsh).

    Then I - M_s A = (I - c A^2)^(2^s), whose spectral radius (kappa^2 - 1) / (kappa^2 + 1) < 1:
    quadratic convergence once it is small. Each step costs two batched n x n matrix products.

    Indexing: alpha[0] = 0 (the common start of every Trajectory) and alpha[t] = M_{t-1} y for
    t >= 1, so alpha[1] = c A y and T steps use M_0 .. M_{T-1}.

    Args: as in `cg`.

    Returns:
        Trajectory (method "newton", preconditioner "none"), params {"scale": c `[...]`};
        residual_norm = ||y - A alpha_t||.
    """
    system = krr_system(K, y, lam, K_query)
    n_steps = check_steps(n_steps)
    eigenvalues = preconditioned_eigenvalues(system)
    scale = (2.0 / (eigenvalues[:, 0] ** 2 + eigenvalues[:, -1] ** 2)).reshape(-1, 1, 1)
    A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
    inverse = scale * A  # M_0, symmetric like every M_s (a polynomial in A)
    iterates = [torch.zeros_like(system.y)]
    for step in range(n_steps):
        iterates.append(torch.bmm(system.y, inverse))
        if step + 1 < n_steps:
            inverse = torch.baddbmm(inverse, inverse, torch.bmm(A, inverse), beta=2.0, alpha=-1.0)
    alpha = torch.cat(iterates, dim=-2)
    return system.trajectory(
        alpha,
        system.residual_norms(alpha),
        "newton",
        preconditioner="none",
        params={"scale": system.recorded(None, scale)},
    )


iterative_newton = newton_schulz
"""Alias: the name Fu et al. (2024) use for this iteration."""
