"""Linear regression in feature space: (X^T X + lam I) w = X^T y, solved step by step.

With the linear kernel K = X X^T these are the primal counterparts of the kernel-space solvers:
gradient descent in feature space makes the same predictions as kernel-space Richardson with
the same step (w_t = X^T alpha_t). Feature-space CG does not match kernel-space CG before
convergence: it minimises the error in a different norm over the same Krylov space.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mi_krr._validation import as_float64
from mi_krr.solvers.cg import cg
from mi_krr.solvers.richardson import richardson
from mi_krr.solvers.trajectory import Trajectory


def feature_gd(X: Any, y: Any, lam: float, n_steps: int, step: Any = None, X_query: Any = None) -> Trajectory:
    """Gradient descent w <- w + step (X^T y - (X^T X + lam I) w) from w_0 = 0.

    Args:
        X: support features `[..., n, d]`.
        y: labels `[..., n]`.
        lam: ridge parameter > 0.
        n_steps: T >= 0.
        step: number or per-prompt `[...]`; default 2 / (mu_min + mu_max) of X^T X + lam I.
        X_query: query features `[..., m, d]`; gives `pred` = X_query w_t `[..., T+1, m]`.

    Returns:
        Trajectory with method "feature_gd" whose `alpha` field holds the WEIGHTS w
        `[..., T+1, d]` (not dual coefficients), residual_norm = ||X^T y - (X^T X + lam I) w_t||,
        step recorded.
    """
    gram, moment, X_query = _normal_equations(X, y, X_query)
    trajectory = richardson(gram, moment, lam, n_steps, step=step, precond="none", K_query=X_query)
    return dataclasses.replace(trajectory, method="feature_gd", params={"space": "feature"})


def feature_cg(X: Any, y: Any, lam: float, n_steps: int, X_query: Any = None) -> Trajectory:
    """CG on (X^T X + lam I) w = X^T y from w_0 = 0; arguments as `feature_gd`.

    Returns:
        Trajectory with method "feature_cg" whose `alpha` field holds the weights w
        `[..., T+1, d]`, pred = X_query w_t, residual_norm of the feature-space system.
    """
    gram, moment, X_query = _normal_equations(X, y, X_query)
    trajectory = cg(gram, moment, lam, n_steps, K_query=X_query)
    return dataclasses.replace(trajectory, method="feature_cg", params={"space": "feature"})


def _normal_equations(X: Any, y: Any, X_query: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate and return X^T X `[..., d, d]`, X^T y `[..., d]` and X_query `[..., m, d]`."""
    X = as_float64("X", X, min_dim=2)
    y = as_float64("y", y).to(X.device)
    if y.shape != X.shape[:-1]:
        raise ValueError(f"y must have shape [..., n] = {tuple(X.shape[:-1])} to match X [..., n, d], got {tuple(y.shape)}")
    if X_query is not None:
        X_query = as_float64("X_query", X_query, min_dim=2).to(X.device)
        if X_query.shape[-1] != X.shape[-1] or X_query.shape[:-2] != X.shape[:-2]:
            raise ValueError(
                f"X_query must have shape [..., m, d] = {(*X.shape[:-2], 'm', X.shape[-1])} to match X, got {tuple(X_query.shape)}"
            )
    gram = X.mT @ X
    gram = (gram + gram.mT) / 2  # exactly symmetric, as the solvers require
    moment = (X.mT @ y.unsqueeze(-1)).squeeze(-1)
    return gram, moment, X_query
