"""What the CLI tests share: reading `mi-krr construct`'s table, and the NumPy CG and error
references it is checked against."""

from __future__ import annotations

import re

import numpy as np


def parse_construct_table(text: str) -> np.ndarray:
    """Rows (step, |model - solver|, model vs KRR, solver vs KRR) of `construct`'s table."""
    rows = [line.split() for line in text.splitlines() if re.fullmatch(r"\s*\d+(\s+\S+){3}\s*", line)]
    return np.array(rows, dtype=np.float64)


def numpy_cg_predictions(K, y, lam, K_query, n_steps):
    """Plain CG on (K + lam I) alpha = y from alpha = 0: predictions K_query alpha_t, t = 0..T."""
    A = K + lam * np.eye(len(y))
    alpha, r = np.zeros_like(y), y.copy()
    p = r.copy()
    preds = [K_query @ alpha]
    for _ in range(n_steps):
        Ap = A @ p
        step = (r @ r) / (p @ Ap)
        alpha = alpha + step * p
        r_new = r - step * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        preds.append(K_query @ alpha)
    return np.array(preds)


def relative_errors_to_krr(preds, exact):
    """Per step ||pred_t - KRR|| / ||KRR|| pooled over prompts and queries; preds [B, T+1, m]."""
    return np.sqrt(((preds - exact[:, None]) ** 2).sum(axis=(0, 2))) / np.sqrt((exact**2).sum())
