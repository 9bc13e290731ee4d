"""Solvers by name, all with one signature: `(K, y, lam, n_steps, K_query=None) -> Trajectory`.

Probes loop over `ALGORITHMS` to ask which algorithm a model's layers follow.
"""

from __future__ import annotations

from typing import Any, Callable

from mi_krr.solvers.cg import cg, jacobi_cg
from mi_krr.solvers.chebyshev import chebyshev
from mi_krr.solvers.heavy_ball import heavy_ball
from mi_krr.solvers.newton import newton_schulz
from mi_krr.solvers.richardson import richardson
from mi_krr.solvers.trajectory import Trajectory

Solver = Callable[..., Trajectory]


def gradient_descent(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """GD on the KRR system (Richardson with P = I, optimal step); for the linear kernel its
    predictions equal feature-space GD's run with the same step (`mi_krr.solvers.feature`; the
    two default steps differ when n > d: the spectra of X X^T + lam I and X^T X + lam I differ)."""
    return richardson(K, y, lam, n_steps, precond="none", K_query=K_query)


def jacobi_richardson(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """Richardson preconditioned with diag(K + lam I)^-1, optimal step."""
    return richardson(K, y, lam, n_steps, precond="jacobi", K_query=K_query)


def rowsum_richardson(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """Richardson preconditioned with diag(K 1)^-1 (softmax's normalisation), optimal step."""
    return richardson(K, y, lam, n_steps, precond="rowsum", K_query=K_query)


def _chebyshev(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    return chebyshev(K, y, lam, n_steps, K_query=K_query)


def _heavy_ball(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    return heavy_ball(K, y, lam, n_steps, K_query=K_query)


def _cg(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    return cg(K, y, lam, n_steps, K_query=K_query)


def _jacobi_cg(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    return jacobi_cg(K, y, lam, n_steps, K_query=K_query)


ALGORITHMS: dict[str, Solver] = {
    "cg": _cg,
    "jacobi_cg": _jacobi_cg,
    "gd": gradient_descent,
    "richardson_jacobi": jacobi_richardson,
    "richardson_rowsum": rowsum_richardson,
    "chebyshev": _chebyshev,
    "heavy_ball": _heavy_ball,
    "newton": newton_schulz,
}
"""Name -> solver with the uniform signature `(K, y, lam, n_steps, K_query=None)`; every
parameter not in that signature takes its spectrum-optimal default."""


def solve(name: str, K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """Run the solver called `name` (a key of `ALGORITHMS`)."""
    if name not in ALGORITHMS:
        raise ValueError(f"name must be one of {', '.join(map(repr, ALGORITHMS))}, got {name!r}")
    return ALGORITHMS[name](K, y, lam, n_steps, K_query=K_query)
