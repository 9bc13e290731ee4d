"""Who may attend to whom, per token layout: the one home of the attention masks every model
class (our own transformer and the TransformerBridge model) applies."""

from __future__ import annotations

import numpy as np
import torch

from mi_krr.models.encoding import LAYOUTS


def allowed_attention(
    layout: str,
    seq_len: int,
    n_support: int | None = None,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean `[query_pos, key_pos]` matrix, True where the query token may attend to the key.

    interleaved: causal (position i sees positions j <= i); `n_support` is not needed.
    concat (n_support support tokens, then queries): a query sees every support token and
    itself, never another query, so each query's prediction depends only on the support set and
    its own token. Support token i sees every support token, or with `causal` only j <= i.
    """
    positions = torch.arange(seq_len, device=device)
    at_or_before = positions[None, :] <= positions[:, None]
    if layout == "interleaved":
        return at_or_before
    if layout != "concat":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(n_support, bool) or not isinstance(n_support, (int, np.integer)) or not 1 <= n_support <= seq_len:
        raise ValueError(
            f"the concat layout needs n_support in [1, seq_len={seq_len}], a whole number, to mask queries, got {n_support!r}: "
            "pass n_support=prompt.n_support (or call the model on model.encode(task).tokens)"
        )
    key_is_support = positions[None, :] < n_support
    query_is_support = positions[:, None] < n_support
    support_rows = key_is_support & (at_or_before if causal else True)
    query_rows = key_is_support | (positions[None, :] == positions[:, None])
    return torch.where(query_is_support, support_rows, query_rows)
