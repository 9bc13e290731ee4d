"""TransformerLens models of in-context regression and the task/readout adapter probes use.

- `ICLTransformer(ICLTransformerConfig(...))`: our own hooked transformer (softmax, linear or
  ReLU attention; concat or interleaved layout).
- `BridgeICLModel(cfg)`: the same architecture on `TransformerBridge.boot_native` (softmax).
- `load_garg_checkpoint(path)`: Garg et al.'s GPT-2 checkpoints with TransformerLens hooks.
- `model_from_config(model.config_dict())`, `check_task_fits(model, task)`.

Every model implements `ICLModel` (see `mi_krr.models.adapter`). Model classes import
transformer-lens, so they load on first access (`import mi_krr.models` stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ICLModel": "mi_krr.models.adapter",
    "AttentionHooks": "mi_krr.models.adapter",
    "adapter_for": "mi_krr.models.adapter",
    "EncodedPrompt": "mi_krr.models.encoding",
    "encode": "mi_krr.models.encoding",
    "ICLTransformerConfig": "mi_krr.models.config",
    "allowed_attention": "mi_krr.models.masks",
    "TrainingPredictions": "mi_krr.models.prompting",
    "check_task_fits": "mi_krr.models.prompting",
    "ICLTransformer": "mi_krr.models.icl_transformer",
    "BridgeICLModel": "mi_krr.models.bridge",
    "GargConfig": "mi_krr.models.garg",
    "GargICLModel": "mi_krr.models.garg",
    "load_garg_checkpoint": "mi_krr.models.garg",
    "model_from_config": "mi_krr.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mi_krr.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
