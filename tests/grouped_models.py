"""An ICLTransformer whose prompts are split into several sequences (`EncodedPrompt.groups` > 1),
for the tests of how probes fold groups back into the task's queries."""

from __future__ import annotations

import torch

from mi_krr.models import ICLTransformer
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.tasks import ICLTask


class GroupedQueries(ICLTransformer):
    """Concat layout split into 2 sequences per prompt, each the support tokens followed by half of
    the queries: `groups` = 2 and 2 query positions per sequence, so the query-block fold must put
    group-major (group, q) rows back in the task's query order. A concat query sees only the support
    and itself, so every number equals the ungrouped model's."""

    GROUPS = 2

    def encode(self, task: ICLTask) -> EncodedPrompt:
        plain = super().encode(task)
        n, per_group = task.n_support, task.n_query // self.GROUPS
        support, queries = plain.tokens[:, :n], plain.tokens[:, n:]
        sequences = [torch.cat([support, queries[:, g * per_group : (g + 1) * per_group]], dim=1) for g in range(self.GROUPS)]
        self._grouped_n_support = n
        return EncodedPrompt(
            tokens=torch.stack(sequences, dim=1).flatten(0, 1),  # sequence b * groups + g
            query_positions=torch.arange(n, n + per_group),
            batch_size=task.batch_size,
            n_query=task.n_query,
            n_support=n,
            support_positions=torch.arange(n),
            label_positions=torch.arange(n),
        )

    def forward(self, tokens: torch.Tensor, n_support: int | None = None) -> torch.Tensor:
        return super().forward(tokens, n_support=self._grouped_n_support)
