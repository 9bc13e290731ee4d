"""The one place that turns an `ICLTask` into token sequences and per-position outputs back into
per-query predictions. Every model (trained, bridged, Garg-format or constructed) encodes through
an `EncodedPrompt`, so probes never special-case a model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch

from mi_krr._repr import compact_repr
from mi_krr.tasks import ICLTask

LAYOUTS = ("concat", "interleaved")


@dataclass
class EncodedPrompt:
    """Model input for a batch of prompts, and where its predictions are read.

    A layout may split one prompt into several sequences (`groups`, e.g. one sequence per query in
    the Garg layout); sequences are ordered prompt-major: sequence `b * groups + g`.

    Attributes:
        tokens: model input before any read-in `[batch * groups, seq, d_token]`.
        query_positions: positions read as predictions, the same in every sequence `[q]`, with
            `groups * q == n_query`.
        batch_size: number of prompts B.
        n_query: queries per prompt m.
        n_support: support points per prompt n.
        support_positions: positions of the support tokens carrying labels `[n]` (for masks and
            label-sensitivity probes).
        label_positions: positions whose token holds y_i, `[n]` (the same as support_positions in
            the concat layout; the y tokens in the interleaved one).
    """

    __repr__ = compact_repr

    tokens: torch.Tensor
    query_positions: torch.Tensor
    batch_size: int
    n_query: int
    n_support: int
    support_positions: torch.Tensor
    label_positions: torch.Tensor

    @property
    def groups(self) -> int:
        return self.tokens.shape[0] // self.batch_size

    def gather_queries(self, per_position: torch.Tensor) -> torch.Tensor:
        """Pick the query positions and fold groups back: `[batch * groups, seq, ...]` ->
        `[batch, n_query, ...]`."""
        picked = per_position[:, self.query_positions.to(per_position.device)]
        return einops.rearrange(picked, "(batch group) q ... -> batch (group q) ...", batch=self.batch_size)


def encode_concat(task: ICLTask) -> EncodedPrompt:
    """Token i = (x_i, y_i), query token j = (x_j*, 0) (von Oswald / MetaRepICL layout).

    Returns tokens `[batch, n + m, d + 1]`; queries at positions n..n+m-1.
    """
    support = torch.cat([task.x_support, task.y_support.unsqueeze(-1)], dim=-1)
    query = torch.cat([task.x_query, torch.zeros_like(task.y_query).unsqueeze(-1)], dim=-1)
    n, m = task.n_support, task.n_query
    device = task.device
    return EncodedPrompt(
        tokens=torch.cat([support, query], dim=1),
        query_positions=torch.arange(n, n + m, device=device),
        batch_size=task.batch_size,
        n_query=m,
        n_support=n,
        support_positions=torch.arange(n, device=device),
        label_positions=torch.arange(n, device=device),
    )


def interleave_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Garg et al.'s sequence x_1, y_1, x_2, y_2, ... with y_i padded to (y_i, 0, ..., 0).

    x `[batch, n, d]`, y `[batch, n]` -> `[batch, 2n, d]`.
    """
    y_tokens = torch.zeros_like(x)
    y_tokens[..., 0] = y
    return einops.rearrange(torch.stack([x, y_tokens], dim=2), "batch n two d -> batch (n two) d")


def encode_interleaved(task: ICLTask) -> EncodedPrompt:
    """Garg layout, one causal sequence per query: x_1, y_1, ..., x_n, y_n, x_*.

    Returns tokens `[batch * m, 2n + 1, d]`; the prediction is read at the last position.
    """
    n, m = task.n_support, task.n_query
    pairs = interleave_pairs(task.x_support, task.y_support)  # [batch, 2n, d]
    pairs = einops.repeat(pairs, "batch seq d -> (batch m) seq d", m=m)
    queries = einops.rearrange(task.x_query, "batch m d -> (batch m) 1 d")
    device = task.device
    return EncodedPrompt(
        tokens=torch.cat([pairs, queries], dim=1),
        query_positions=torch.tensor([2 * n], device=device),
        batch_size=task.batch_size,
        n_query=m,
        n_support=n,
        support_positions=torch.arange(0, 2 * n, 2, device=device),
        label_positions=torch.arange(1, 2 * n, 2, device=device),
    )


def encode(task: ICLTask, layout: str) -> EncodedPrompt:
    """Encode `task` in `layout` ("concat" or "interleaved")."""
    if layout == "concat":
        return encode_concat(task)
    if layout == "interleaved":
        return encode_interleaved(task)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
