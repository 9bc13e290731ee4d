"""Write and read the JSON-able description a model's `config_dict()` gives (checkpoints):
`describe_model` writes it from the model as it is now, `model_from_config` rebuilds from it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mi_krr.models.config import DTYPES, ICLTransformerConfig

if TYPE_CHECKING:
    from mi_krr.models.bridge import BridgeICLModel
    from mi_krr.models.icl_transformer import ICLTransformer


def _model_classes() -> dict[str, type]:
    from mi_krr.models.bridge import BridgeICLModel
    from mi_krr.models.icl_transformer import ICLTransformer

    return {"ICLTransformer": ICLTransformer, "BridgeICLModel": BridgeICLModel}


def weights_dtype(model: nn.Module) -> str:
    """Name in `DTYPES` ("float32" / "float64") of the one dtype of `model`'s floating-point
    weights: the tensors `model.state_dict()` holds, so after `model.to(torch.float64)` it is
    "float64" whatever `model.cfg.dtype` says.

    Raises ValueError for weights of mixed dtypes or of a dtype a config cannot record."""
    dtypes = {tensor.dtype for tensor in model.state_dict().values() if tensor.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(
            f"model weights mix dtypes {sorted(map(str, dtypes))}, which one config dtype cannot describe: "
            "move the whole model with model.to(torch.float64) (or torch.float32) first"
        )
    (dtype,) = dtypes
    names = {torch_dtype: name for name, torch_dtype in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"model weights are {dtype}, which a config cannot record: move the model with model.to(torch.float32) (or torch.float64) first")
    return names[dtype]


def describe_model(model: ICLTransformer | BridgeICLModel) -> dict[str, Any]:
    """`{"model_type": class name, **model.cfg.to_dict()}` with `dtype` read from the weights
    (`weights_dtype`), so the description always fits the state dict saved beside it."""
    return {"model_type": type(model).__name__, **model.cfg.to_dict(), "dtype": weights_dtype(model)}


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
