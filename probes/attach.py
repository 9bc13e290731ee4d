"""`attach(model)`: check a model offers every hook the probes read, once, and bundle it with the
probes as methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mi_krr._repr import compact_repr
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.attention_kernels import AttentionKernels, attention_kernels
from probes.kernel_alignment import REFERENCE_KERNELS, KernelAlignment, kernel_alignment
from probes.layer_predictions import layer_predictions
from probes.sensitivity import label_sensitivities
from probes.streaming import probe_model


@dataclass
class ProbedModel:
    """A model checked by `adapter_for`, with the probes as methods (each delegates to the
    function of the same name in `probes`, with this model as first argument)."""

    __repr__ = compact_repr

    model: ICLModel

    def layer_predictions(self, task: ICLTask, method: str = "readout", **kwargs: Any) -> torch.Tensor:
        """`probes.layer_predictions(model, task, method, ...)` -> `[batch, L + 1, n_query]`."""
        return layer_predictions(self.model, task, method=method, **kwargs)

    def label_sensitivities(self, task: ICLTask, layers: Sequence[int] | None = None, **kwargs: Any) -> torch.Tensor:
        """`probes.label_sensitivities(model, task, layers)` -> `[batch, L + 1, n_query, n_support]`
        (`[batch, len(layers), ...]` with `layers`)."""
        return label_sensitivities(self.model, task, layers=layers, **kwargs)

    def attention_kernels(self, task: ICLTask, source: str = "pattern", **kwargs: Any) -> AttentionKernels:
        """`probes.attention_kernels(model, task, source, ...)` (e.g. `blocks=("query",)`)."""
        return attention_kernels(self.model, task, source=source, **kwargs)

    def kernel_alignment(
        self, task: ICLTask, kernels: Sequence[str] = REFERENCE_KERNELS, **kwargs: Any
    ) -> KernelAlignment:
        """`probes.kernel_alignment(model, task, kernels, ...)`."""
        return kernel_alignment(self.model, task, kernels=kernels, **kwargs)

    def diagnose(self, tasks: Any, **kwargs: Any) -> Any:
        """`probes.diagnose.diagnose(model, tasks, ...)`."""
        from probes.diagnose import diagnose

        return diagnose(self.model, tasks, **kwargs)


def attach(model: Any) -> ProbedModel:
    """Validate `model` (`mi_krr.models.adapter.adapter_for`: a missing method or hook raises a
    ValueError naming it) and return it bundled with the probes (an attached model is returned
    re-bundled, not wrapped twice)."""
    return ProbedModel(probe_model(model))
