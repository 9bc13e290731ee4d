"""Batched float64 KRR solvers that return every iterate.

Every iterative solver works on (K + lam I) alpha = y with K `[..., n, n]`, y `[..., n]`
(tensors or arrays, any leading dims), starts from alpha_0 = 0, and returns a `Trajectory`:
alpha `[..., T+1, n]`, residual_norm `[..., T+1]`, pred = K_query @ alpha_t `[..., T+1, m]`.
All of them stay differentiable w.r.t. K and y (label sensitivities by autograd).

- `krr`: the exact solution (Cholesky).
- `cg`, `jacobi_cg`: conjugate gradient, plain and Jacobi-preconditioned (`backend`: a compiled
  fused CPU loop where no gradients are needed, else batched torch ops); `cg_error_bound`.
- `richardson` (precond "none" = GD, "jacobi", "rowsum"), `chebyshev`, `heavy_ball`,
  `newton_schulz` (= `iterative_newton`).
- `feature_gd`, `feature_cg`: the same in feature space for X `[..., n, d]` (alpha holds w).
- `ALGORITHMS`, `solve`: solvers by name with one signature, for algorithm identification.
"""

from mi_krr.solvers.cg import CG_BACKENDS, CG_BLOCK_BYTES, cg, cg_block_size, cg_error_bound, jacobi_cg
from mi_krr.solvers.chebyshev import chebyshev
from mi_krr.solvers.direct import krr
from mi_krr.solvers.feature import feature_cg, feature_gd
from mi_krr.solvers.heavy_ball import heavy_ball
from mi_krr.solvers.newton import iterative_newton, newton_schulz
from mi_krr.solvers.registry import ALGORITHMS, solve
from mi_krr.solvers.richardson import richardson
from mi_krr.solvers.trajectory import Trajectory

__all__ = [
    "ALGORITHMS",
    "CG_BACKENDS",
    "CG_BLOCK_BYTES",
    "Trajectory",
    "cg",
    "cg_block_size",
    "cg_error_bound",
    "chebyshev",
    "feature_cg",
    "feature_gd",
    "heavy_ball",
    "iterative_newton",
    "jacobi_cg",
    "krr",
    "newton_schulz",
    "richardson",
    "solve",
]
