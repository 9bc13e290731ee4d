"""One-line reprs for result dataclasses that hold tensors: what a notebook shows when a cell ends
with a task, a trajectory or a probe's result. Tensors and arrays appear as their shape and dtype
(`tensor[256, 24, 2] float32`), not their values; nested results as their class name.

    @dataclass
    class Trajectory:
        alpha: torch.Tensor
        __repr__ = compact_repr
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

MAX_ITEMS = 6
"""Entries of a dict / list shown before the rest is counted."""
MAX_TEXT = 60
"""Characters of any other value's repr shown before it is cut."""


def compact_repr(self: Any) -> str:
    """`ClassName(field=value, ...)` of a dataclass on one line, each value as `compact`."""
    values = ", ".join(f"{field.name}={compact(getattr(self, field.name))}" for field in dataclasses.fields(self) if field.repr)
    return f"{type(self).__name__}({values})"


def compact(value: Any) -> str:
    """A short one-line description of `value`: shape and dtype of a tensor or array (and a
    tensor's device when not the CPU), class name of a module or a dataclass, at most `MAX_ITEMS` entries of a dict / list / tuple, floats to 4 significant digits."""
    if isinstance(value, torch.Tensor):
        device = "" if value.device.type == "cpu" else f" {value.device}"
        return f"tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}{device}"
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)} {value.dtype}"
    if isinstance(value, torch.nn.Module) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return f"{type(value).__name__}(...)"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, dict):
        items = [f"{key!r}: {compact(item)}" for key, item in list(value.items())[:MAX_ITEMS]]
        return "{" + ", ".join(items + _more(len(value))) + "}"
    if isinstance(value, (list, tuple)):
        items = [compact(item) for item in value[:MAX_ITEMS]]
        text = ", ".join(items + _more(len(value)))
        return f"[{text}]" if isinstance(value, list) else f"({text}{',' if len(value) == 1 else ''})"
    text = repr(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _more(count: int) -> list[str]:
    """The "... (k more)" entry for a container of `count` items, if any are left out."""
    return [f"... ({count - MAX_ITEMS} more)"] if count > MAX_ITEMS else []
