"""Compiled query predictions of fixed-step Richardson and heavy ball in a prompt's eigenbasis, for
many candidate steps at once (the inner loop of `probes.step_sizes`' fits).

With mu the eigenvalues of the preconditioned system and `gain` `[m, n]` its per-mode query gains
(`probes.step_sizes.SpectralSystem`), each candidate (w, beta) gives per mode the scalar recurrence
s_{t+1} = w + (1 + beta - w mu) s_t - beta s_{t-1}, s_0 = s_-1 = 0, and pred_t = gain s_t.
Richardson (beta = 0) is closed form: pred_t = pred_inf - (gain / mu) (1 - w mu)^t.

One loop per prompt and candidate keeps the n mode values in registers and accumulates the m
query predictions step by step (no `[B, G, T+1, n]` temporaries, which made the torch version
memory-bound); prompts are split over threads (`mi_krr.parallel_prompts`). Sums run over the
modes in index order, so each value is the same for any thread count. Diverging candidates
overflow to inf / NaN as the recurrence does.
"""

from __future__ import annotations

import numba
import numpy as np

from mi_krr.parallel_prompts import run_over_prompts


def richardson_mode_predictions(mu: np.ndarray, limit_form: np.ndarray, step: np.ndarray, n_steps: int) -> np.ndarray:
    """Richardson's query predictions for G candidate steps per prompt.

    Args:
        mu: eigenvalues `[B, n]`.
        limit_form: [-(gain / mu)^T; pred_inf] `[B, n+1, m]` (pred_inf = (gain / mu) 1).
        step: w per prompt and candidate `[B, G]`.
        n_steps: T >= 0.

    Returns:
        pred `[B, G, T+1, m]` with pred_0 = 0 and pred_t = pred_inf - sum_i (gain_i / mu_i) (1 - w mu_i)^t.
    """
    arrays = _float64(mu, limit_form, step)
    pred = np.empty((len(mu), step.shape[1], n_steps + 1, limit_form.shape[2]))
    run_over_prompts(_richardson_prompts, _richardson_parallel, len(mu), *arrays, n_steps, pred)
    return pred


def heavy_ball_mode_predictions(mu: np.ndarray, gain_t: np.ndarray, step: np.ndarray, momentum: np.ndarray, n_steps: int) -> np.ndarray:
    """Heavy ball's query predictions for G candidate (step, momentum) pairs per prompt.

    Args:
        mu: eigenvalues `[B, n]`.
        gain_t: gain^T `[B, n, m]`.
        step, momentum: w and beta per prompt and candidate `[B, G]` each.
        n_steps: T >= 0.

    Returns:
        pred `[B, G, T+1, m]`: pred_t = gain s_t with s_{t+1} = w + (1 + beta - w mu) s_t - beta s_{t-1}.
    """
    arrays = _float64(mu, gain_t, step, momentum)
    pred = np.empty((len(mu), step.shape[1], n_steps + 1, gain_t.shape[2]))
    run_over_prompts(_heavy_ball_prompts, _heavy_ball_parallel, len(mu), *arrays, n_steps, pred)
    return pred


def _float64(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(array, dtype=np.float64) for array in arrays)


@numba.njit(nogil=True, parallel=True, cache=True)
def _richardson_parallel(mu, limit_form, step, n_steps, pred, chunks):  # pragma: no cover (compiled)
    """`_richardson_prompts` on `chunks` contiguous ranges of the prompts, one per thread."""
    batch = mu.shape[0]
    for chunk in numba.prange(chunks):
        _richardson_prompts(mu, limit_form, step, n_steps, pred, chunk * batch // chunks, (chunk + 1) * batch // chunks)


@numba.njit(nogil=True, cache=True)
def _richardson_prompts(mu, limit_form, step, n_steps, pred, start, stop):  # pragma: no cover (compiled)
    """`richardson_mode_predictions` of prompts start..stop-1 into pred."""
    n, m = mu.shape[1], limit_form.shape[2]
    decay = np.empty(n)
    power = np.empty(n)
    total = np.empty(m)
    for b in range(start, stop):
        for g in range(step.shape[1]):
            for i in range(n):
                decay[i] = 1.0 - step[b, g] * mu[b, i]
                power[i] = 1.0
            for q in range(m):
                pred[b, g, 0, q] = 0.0
            for t in range(1, n_steps + 1):
                for q in range(m):
                    total[q] = limit_form[b, n, q]
                for i in range(n):
                    power[i] *= decay[i]
                    for q in range(m):
                        total[q] += power[i] * limit_form[b, i, q]
                for q in range(m):
                    pred[b, g, t, q] = total[q]


@numba.njit(nogil=True, parallel=True, cache=True)
def _heavy_ball_parallel(mu, gain_t, step, momentum, n_steps, pred, chunks):  # pragma: no cover (compiled)
    """`_heavy_ball_prompts` on `chunks` contiguous ranges of the prompts, one per thread."""
    batch = mu.shape[0]
    for chunk in numba.prange(chunks):
        _heavy_ball_prompts(mu, gain_t, step, momentum, n_steps, pred, chunk * batch // chunks, (chunk + 1) * batch // chunks)


@numba.njit(nogil=True, cache=True)
def _heavy_ball_prompts(mu, gain_t, step, momentum, n_steps, pred, start, stop):  # pragma: no cover (compiled)
    """`heavy_ball_mode_predictions` of prompts start..stop-1 into pred."""
    n, m = mu.shape[1], gain_t.shape[2]
    carry = np.empty(n)
    previous = np.empty(n)
    current = np.empty(n)
    total = np.empty(m)
    for b in range(start, stop):
        for g in range(step.shape[1]):
            w, beta = step[b, g], momentum[b, g]
            for i in range(n):
                carry[i] = (1.0 + beta) - w * mu[b, i]
                previous[i] = 0.0
                current[i] = 0.0
            for q in range(m):
                pred[b, g, 0, q] = 0.0
            for t in range(1, n_steps + 1):
                for q in range(m):
                    total[q] = 0.0
                for i in range(n):
                    following = (w + carry[i] * current[i]) - beta * previous[i]
                    previous[i] = current[i]
                    current[i] = following
                    for q in range(m):
                        total[q] += following * gain_t[b, i, q]
                for q in range(m):
                    pred[b, g, t, q] = total[q]
