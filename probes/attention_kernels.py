"""The similarity each attention head induces between tokens: its pattern (or pre-normalisation
scores) restricted to support keys, for support rows (the kernel matrix K a solver iterates with)
and for query rows (the vector k_* a prediction reads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.streaming import attention_blocks, encode_for_probe, probe_model

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
    """

    __repr__ = compact_repr

    support: torch.Tensor | None
    query: torch.Tensor | None
    source: str

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


def attention_kernels(model: ICLModel, task: ICLTask, source: str = "pattern") -> AttentionKernels:
    """Every layer's and head's attention between support keys and support / query tokens,
    reduced to those blocks inside the hooks (see `probes.streaming.attention_blocks`)."""
    model = probe_model(model)
    check_choice("source", source, SOURCES)
    support, query = attention_blocks(model, encode_for_probe(model, task), source)
    return AttentionKernels(support=support, query=query, source=source)
