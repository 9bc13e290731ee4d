"""Rebuild a model from the JSON-able description its `config_dict()` wrote (checkpoints)."""

from __future__ import annotations

from typing import Any

import torch

from mi_krr.models.config import ICLTransformerConfig


def _model_classes() -> dict[str, type]:
    from mi_krr.models.bridge import BridgeICLModel
    from mi_krr.models.icl_transformer import ICLTransformer

    return {"ICLTransformer": ICLTransformer, "BridgeICLModel": BridgeICLModel}


def model_from_config(description: dict[str, Any], device: torch.device | str | None = None):
    """A freshly initialised model of the architecture `description` names:
    `{"model_type": "ICLTransformer" | "BridgeICLModel", **ICLTransformerConfig.to_dict()}`.
    Load weights with `model.load_state_dict(...)` afterwards."""
    if not isinstance(description, dict) or "model_type" not in description:
        raise ValueError("model description must be a dict with a 'model_type' key, as written by model.config_dict()")
    classes = _model_classes()
    fields = dict(description)
    model_type = fields.pop("model_type")
    if model_type not in classes:
        raise ValueError(f"model_type must be one of {sorted(classes)}, got {model_type!r}")
    return classes[model_type](ICLTransformerConfig.from_dict(fields), device=device)
