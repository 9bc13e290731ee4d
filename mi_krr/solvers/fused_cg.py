"""Compiled CPU schedule of (preconditioned) CG: all T steps of one prompt in one loop, while
its kernel K `[n, n]` sits in the core's L1/L2 cache.

The batched torch schedule of `mi_krr.solvers.cg` streams every kernel of the batch from memory
(L3 at best) once per step and pays about a dozen small torch ops per step; SciPy's loop over
prompts keeps one K in cache but pays Python per step. This loop (numba, float64, no fast-math:
every sum in index order) keeps K in cache AND has no per-step overhead. It runs the same
recurrence as the torch schedule, operation for operation (row-vector mat-vec p K + lam p, step
lengths rho / max(p^T A p, TINY)), so both agree to rounding, and each prompt's result is the
same whichever thread runs it. Prompts are split into `torch.get_num_threads()` contiguous
ranges run by numba's parallel threads (its OpenMP layer, which measured faster than Python
threads next to torch's own busy OpenMP pool). Each prompt's predictions K_query alpha_t are
computed right after its iterates, in the same launch (no torch op after it, whose thread pool
would then compete with numba's).

It records no gradients: `cg` uses it only where none are needed (`backend="auto"`).
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch

from mi_krr.solvers.system import TINY, check_positive_definite

_TINY = float(TINY)


def fused_pcg(
    K: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    n_steps: int,
    inverse_diagonal: torch.Tensor | None = None,
    K_query: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PCG from alpha_0 = 0 on CPU float64 systems, every iterate kept.

    Args:
        K: kernels `[B, n, n]` (symmetric).
        y: labels `[B, 1, n]` (or `[B, n]`).
        lam: ridge parameter.
        n_steps: T >= 0.
        inverse_diagonal: P's diagonal `[B, 1, n]` (or `[B, n]`), or None (P = I).
        K_query: query-support kernels `[B, m, n]`, or None.

    Returns:
        iterates `[B, T+1, n]`; squared residual norms ||r_t||^2 `[B, T+1]` (CG's recursively
        updated residual); predictions K_query alpha_t `[B, T+1, m]` (None without K_query).
        ValueError where a curvature p^T (K + lam I) p < 0 shows K + lam I is not positive definite.
    """
    batch, n = K.shape[0], K.shape[-1]
    diagonal = None if inverse_diagonal is None else _array(inverse_diagonal).reshape(batch, n)
    queries = None if K_query is None else _array(K_query)
    arrays = (_array(K), _array(y).reshape(batch, n), diagonal, queries)
    alpha = np.empty((batch, n_steps + 1, n))
    squared_norms = np.empty((batch, n_steps + 1))
    pred = None if queries is None else np.empty((batch, n_steps + 1, queries.shape[1]))
    indefinite = np.zeros(batch, dtype=np.bool_)
    chunks = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, batch)  # type: ignore[attr-defined]  # numba.config sets it at import time
    if chunks <= 1 or _FORKED[0]:
        _pcg_prompts(*arrays, float(lam), n_steps, alpha, squared_norms, pred, indefinite, 0, batch)
    else:
        with _LAUNCH:
            previous = numba.get_num_threads()
            numba.set_num_threads(chunks)
            try:
                _pcg_parallel(*arrays, float(lam), n_steps, alpha, squared_norms, pred, indefinite, chunks)
            finally:
                numba.set_num_threads(previous)
    check_positive_definite(bool(indefinite.any()))
    return torch.from_numpy(alpha), torch.from_numpy(squared_norms), None if pred is None else torch.from_numpy(pred)


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous float64 NumPy view (or copy) of a CPU tensor."""
    return np.ascontiguousarray(tensor.detach().numpy(), dtype=np.float64)


_LAUNCH = threading.Lock()
"""One parallel launch at a time (numba's fallback threading layer, workqueue, is not thread-safe)."""

_FORKED = [False]
"""Whether this process is a fork: GNU OpenMP (numba's usual threading layer) aborts a forked child
that launches a parallel region its parent used, so children run the serial loop."""
os.register_at_fork(after_in_child=lambda: _FORKED.__setitem__(0, True))


@numba.njit(nogil=True, parallel=True, cache=True)
def _pcg_parallel(K, y, diagonal, K_query, lam, n_steps, alpha, squared_norms, pred, indefinite, chunks):  # pragma: no cover (compiled)
    """`_pcg_prompts` on `chunks` contiguous ranges of the prompts, one per thread."""
    batch = K.shape[0]
    for chunk in numba.prange(chunks):
        start, stop = chunk * batch // chunks, (chunk + 1) * batch // chunks
        _pcg_prompts(K, y, diagonal, K_query, lam, n_steps, alpha, squared_norms, pred, indefinite, start, stop)


@numba.njit(nogil=True, cache=True)
def _pcg_prompts(K, y, diagonal, K_query, lam, n_steps, alpha, squared_norms, pred, indefinite, start, stop):  # pragma: no cover (compiled)
    """PCG on prompts start..stop-1: K `[B, n, n]`, y `[B, n]`, diagonal `[B, n]` or None,
    K_query `[B, m, n]` or None; writes alpha `[B, T+1, n]`, squared_norms `[B, T+1]`, (with
    K_query) pred `[B, T+1, m]`, and indefinite `[B]` (True where a curvature p^T A p < 0 showed
    that A = K + lam I is not positive definite). One prompt's vectors live in work arrays of length n; K[b] is read
    T times while it stays in cache, then its iterates meet K_query[b]."""
    n = K.shape[1]
    residual = np.empty(n)
    preconditioned = np.empty(n)
    direction = np.empty(n)
    image = np.empty(n)
    iterate = np.empty(n)
    transposed = np.empty((n, 0 if K_query is None else K_query.shape[1]))  # K_query[b]^T
    for b in range(start, stop):
        for i in range(n):
            residual[i] = y[b, i]
            preconditioned[i] = residual[i] if diagonal is None else residual[i] * diagonal[b, i]
            direction[i] = preconditioned[i]
            iterate[i] = 0.0
            alpha[b, 0, i] = 0.0
        rho = 0.0  # r^T P r
        norm = 0.0  # r^T r, needed only when P != I (else it is rho)
        for i in range(n):
            rho += residual[i] * preconditioned[i]
            if diagonal is not None:
                norm += residual[i] * residual[i]
        squared_norms[b, 0] = rho if diagonal is None else norm
        for t in range(n_steps):
            _row_times_matrix(direction, K[b], image)  # image = p K + lam p = (K + lam I) p, K symmetric
            for j in range(n):
                image[j] += lam * direction[j]
            curvature = 0.0
            for i in range(n):
                curvature += direction[i] * image[i]
            if curvature < 0.0:
                indefinite[b] = True
            step = rho / max(curvature, _TINY)
            rho_next = 0.0
            norm = 0.0
            for i in range(n):
                iterate[i] += step * direction[i]
                alpha[b, t + 1, i] = iterate[i]
                residual[i] -= step * image[i]
                preconditioned[i] = residual[i] if diagonal is None else residual[i] * diagonal[b, i]
                rho_next += residual[i] * preconditioned[i]
                if diagonal is not None:
                    norm += residual[i] * residual[i]
            scale = rho_next / max(rho, _TINY)
            for i in range(n):
                direction[i] = preconditioned[i] + scale * direction[i]
            rho = rho_next
            squared_norms[b, t + 1] = rho if diagonal is None else norm
        if K_query is not None:  # pred_t = alpha_t K_query^T, row by row
            transposed[:, :] = K_query[b].T
            for t in range(n_steps + 1):
                _row_times_matrix(alpha[b, t], transposed, pred[b, t])


@numba.njit(nogil=True, cache=True)
def _row_times_matrix(row, matrix, out):  # pragma: no cover (compiled)
    """out = row @ matrix for row `[n]`, matrix `[n, k]`, out `[k]`: each out[j] summed over rows
    in order, four rows per pass over out (fewer loads and stores; same sums)."""
    n = matrix.shape[0]
    out[:] = 0.0
    blocked = n - n % 4
    for i in range(0, blocked, 4):
        w0, w1, w2, w3 = row[i], row[i + 1], row[i + 2], row[i + 3]
        for j in range(matrix.shape[1]):
            out[j] = out[j] + w0 * matrix[i, j] + w1 * matrix[i + 1, j] + w2 * matrix[i + 2, j] + w3 * matrix[i + 3, j]
    for i in range(blocked, n):
        weight = row[i]
        for j in range(matrix.shape[1]):
            out[j] += weight * matrix[i, j]
