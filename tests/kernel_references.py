"""NumPy references for the attention-kernel fits: the row softmax over visible keys and the
distance the scale fit minimises."""

from __future__ import annotations

import numpy as np


def numpy_row_softmax(logits: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Softmax of each row over its visible keys (0 elsewhere, and on rows without keys)."""
    masked = np.where(keys, logits, -np.inf)
    top = masked.max(-1, keepdims=True)
    weights = np.exp(masked - np.where(np.isfinite(top), top, 0.0))
    return weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)


def numpy_mean_distance(log_beta: float, attn: np.ndarray, similarity: np.ndarray, keys: np.ndarray) -> float:
    """Mean over prompts of |row-normalised exp(beta S) - attn|_F^2 for one head: attn, keys `[B, r, n]`."""
    return float(((numpy_row_softmax(np.exp(log_beta) * similarity, keys) - attn) ** 2).sum((-2, -1)).mean())
