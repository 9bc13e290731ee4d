"""Test systems for tests/mi_krr/test_solvers_*.py: SPD kernels with a chosen spectrum, and the
NumPy quantities the references need. Plain NumPy, independent of mi_krr."""

from __future__ import annotations

import numpy as np


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
