"""The similarity each attention head induces between tokens: its pattern (or pre-normalisation
scores) restricted to support keys, for support rows (the kernel matrix K a solver iterates with)
and for query rows (the vector k_* a prediction reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import as_tuple, check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.streaming import ATTENTION_BLOCKS, StreamedProbes, encode_for_probe, probe_model, stream_probes

SOURCES = ("pattern", "scores")


@dataclass
class AttentionKernels:
    """Attention-induced similarity blocks, rows = attending token, columns = support keys (the
    x tokens of the support pairs in the interleaved layout).

    Attributes:
        support: support x support block `[batch, layer, head, n_support, n_support]` (None
            when a streaming pass read only the query block, as `diagnose` does).
        query: query x support block `[batch, layer, head, n_query, n_support]` (or None).
        source: "pattern" (weights applied; rows are not renormalised, so they sum to the share
            of attention that lands on support keys) or "scores" (pre-normalisation scores;
            blocked entries carry the model's mask value).
        support_allowed, query_allowed: the model's structural mask on each block, bool
            `[n_support, n_support]` and `[n_query, n_support]` (the same for every prompt, layer
            and head; True: the row's token may attend to the key), None where the block was not
            read or the model has no such mask (`ICLModel.allowed_attention`).
    """

    __repr__ = compact_repr

    support: torch.Tensor | None
    query: torch.Tensor | None
    source: str
    support_allowed: torch.Tensor | None = None
    query_allowed: torch.Tensor | None = None

    @classmethod
    def from_stream(cls, streamed: StreamedProbes, source: str = "pattern") -> AttentionKernels:
        """The blocks, and their structural masks, that a `stream_probes` pass read with `source`."""
        return cls(
            support=streamed.support,
            query=streamed.query,
            source=source,
            support_allowed=streamed.support_allowed,
            query_allowed=streamed.query_allowed,
        )

    @property
    def n_layers(self) -> int:
        return self._block.shape[1]

    @property
    def n_heads(self) -> int:
        return self._block.shape[2]

    @property
    def _block(self) -> torch.Tensor:
        """Whichever block was read (both share batch, layer and head dimensions)."""
        block = self.support if self.support is not None else self.query
        if block is None:
            raise ValueError("these AttentionKernels hold neither block: read them with attention_kernels(model, task)")
        return block


def attention_kernels(
    model: ICLModel, task: ICLTask, source: str = "pattern", blocks: Sequence[str] = ATTENTION_BLOCKS
) -> AttentionKernels:
    """Every layer's and head's attention between support keys and support / query tokens,
    reduced to those blocks inside the hooks, with the model's structural mask on each block (see
    `probes.streaming.stream_probes` for `source`).

    blocks: which of "support" and "query" to keep (the other is None). Kept for every layer at
    once, the support block `[batch, layer, head, n_support, n_support]` is the big one: at 12
    layers, 8 heads, n_support = 512 it holds 25 M floats per prompt; blocks=("query",) reads
    only `[batch, layer, head, n_query, n_support]`.
    """
    model = probe_model(model)
    check_choice("source", source, SOURCES)
    blocks = as_tuple("blocks", blocks, "('query',)")
    if not blocks:
        raise ValueError(f"blocks must name at least one of {ATTENTION_BLOCKS}")
    streamed = stream_probes(model, encode_for_probe(model, task), blocks=blocks, source=source)
    return AttentionKernels.from_stream(streamed, source)
