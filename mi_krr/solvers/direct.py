"""The exact KRR solution, the fixed point every iterative solver approaches."""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.solvers.system import krr_system


def krr(K: Any, y: Any, lam: float) -> torch.Tensor:
    """alpha = (K + lam I)^-1 y by Cholesky, batched and differentiable.

    Args:
        K: kernel matrices `[..., n, n]` (symmetric PSD).
        y: labels `[..., n]`.
        lam: ridge parameter > 0.

    Returns:
        alpha `[..., n]` (float64, on K's device). Predictions are `K_query @ alpha`.
    """
    system = krr_system(K, y, lam)
    A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
    factor, info = torch.linalg.cholesky_ex(A)
    if (info != 0).any():
        raise ValueError("K + lam I is not positive definite: K must be a PSD kernel matrix (or raise lam)")
    alpha = torch.cholesky_solve(system.y.mT, factor).mT
    return system.unflatten(alpha.squeeze(-2))
