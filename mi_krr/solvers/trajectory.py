"""The result every solver returns: the whole iterate sequence, not only the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mi_krr._repr import compact_repr


@dataclass
class Trajectory:
    """Per-step states of an iterative solver for (K + lam I) alpha = y (or its feature-space
    counterpart), batched over leading dimensions `...`.

    Attributes:
        alpha: dual coefficients per step `[..., T+1, n]`; step 0 is the start (alpha = 0).
        residual_norm: ||y - (K + lam I) alpha_t||_2 per step `[..., T+1]`; for CG and
            Jacobi-CG the recursively updated residual, equal to it until it reaches float64's
            attainable accuracy, below which it keeps falling (see `mi_krr.solvers.cg`).
        pred: query predictions K_query @ alpha_t per step `[..., T+1, m]`, or None when no
            K_query was given.
        method: solver name, e.g. "cg", "richardson".
        lam: the ridge parameter.
        step: the step size used (a float, a per-prompt tensor `[...]`, or None for methods
            without one, e.g. CG).
        preconditioner: "none", "jacobi" or "rowsum" (every registry solver records one; None:
            not recorded).
        params: any further parameters (momentum, eigenvalue bounds, ...).
    """

    __repr__ = compact_repr

    alpha: torch.Tensor
    residual_norm: torch.Tensor
    pred: torch.Tensor | None
    method: str
    lam: float
    step: float | torch.Tensor | None = None
    preconditioner: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        """T: the number of iterations taken (alpha has T + 1 entries)."""
        return self.alpha.shape[-2] - 1
