"""`TableModel`: an `ICLModel` whose layers read out given values, for calibrating the verdict
and the instruments on models whose every layer is known exactly."""

from __future__ import annotations

import numpy as np
import torch
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mi_krr.models.encoding import EncodedPrompt


class TableModel(HookedRootModule):
    """An ICLModel without attention whose residual stream at layer l holds, at each query token,
    the value `values(task)[b, l, j]` (`[B, L + 1, m]`); the read-out is that coordinate. `values`
    returns an array, or a torch function of `task.y_support` (then the probes can differentiate
    it: label sensitivities)."""

    def __init__(self, values, n_layers: int):
        super().__init__()
        self.values, self.n_layers, self.n_heads = values, n_layers, 1
        self.resid = torch.nn.ModuleList([HookPoint() for _ in range(n_layers + 1)])
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)
        self.setup()

    def encode(self, task) -> EncodedPrompt:
        task = task.to(dtype=torch.float64)
        n, m = task.n_support, task.n_query
        values = self.values(task)
        values = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values), dtype=torch.float64)
        assert values.shape == (task.batch_size, self.n_layers + 1, m)
        tokens = torch.cat([torch.zeros(task.batch_size, n, self.n_layers + 1, dtype=torch.float64), values.transpose(1, 2)], 1)
        return EncodedPrompt(tokens=tokens, query_positions=torch.arange(n, n + m), batch_size=task.batch_size, n_query=m,
                             n_support=n, support_positions=torch.arange(n), label_positions=torch.arange(n))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer, hook in enumerate(self.resid):
            x = hook(tokens[..., layer:layer + 1].clone())
        return self.readout(x)

    def residual_hook_names(self) -> list[str]:
        return [f"resid.{layer}" for layer in range(self.n_layers + 1)]

    def attention_hook_names(self) -> list:
        return []

    def allowed_attention(self, prompt):
        return None

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return resid[..., 0]

    def predict(self, task) -> torch.Tensor:
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens))
