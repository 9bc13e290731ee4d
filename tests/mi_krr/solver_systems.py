"""Test systems for tests/mi_krr/test_solvers_*.py: SPD kernels with a chosen spectrum, the
NumPy quantities the references need, and reference iterations (SciPy CG, a written-out heavy
ball). Plain NumPy / SciPy, independent of mi_krr."""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg


def spd_matrix(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """A random symmetric matrix `[n, n]` with eigenvalues spread log-uniformly in [low, high]
    (both endpoints included when n >= 2)."""
    eigenvalues = np.geomspace(low, high, n) if n > 1 else np.array([low])
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = basis @ np.diag(eigenvalues) @ basis.T
    return (matrix + matrix.T) / 2


def gaussian_kernel(rng: np.random.Generator, n: int, m: int = 0, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian kernel `[n, n]` on standard normal points and the query kernel `[m, n]`."""
    points = rng.standard_normal((n + m, d))
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    full = np.exp(-squared / (2 * d))
    return full[:n, :n], full[n:, :n]


def a_norm_errors(A: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """||alpha_t - A^-1 y||_A for iterates `[T+1, n]` -> `[T+1]`."""
    errors = alphas - np.linalg.solve(A, y)
    return np.sqrt(np.einsum("ti,ij,tj->t", errors, A, errors))


def scipy_cg_iterates(A: np.ndarray, y: np.ndarray, n_steps: int, M: np.ndarray | None = None) -> np.ndarray:
    """SciPy's (P)CG iterates from x0 = 0, exactly n_steps of them after the start: `[T+1, n]`."""
    iterates = [np.zeros_like(y)]
    scipy.sparse.linalg.cg(
        A, y, x0=np.zeros_like(y), rtol=0.0, atol=0.0, maxiter=n_steps, M=M, callback=lambda x: iterates.append(x.copy())
    )
    return np.stack(iterates)


def brute_force_heavy_ball(A: np.ndarray, y: np.ndarray, step: float, momentum: float, n_steps: int) -> np.ndarray:
    """alpha_{t+1} = alpha_t + step (y - A alpha_t) + momentum (alpha_t - alpha_{t-1}) from
    alpha_-1 = alpha_0 = 0, written out: `[T+1, n]`."""
    previous = alpha = np.zeros(len(A))
    iterates = [alpha]
    for _ in range(n_steps):
        previous, alpha = alpha, alpha + step * (y - A @ alpha) + momentum * (alpha - previous)
        iterates.append(alpha)
    return np.stack(iterates)
