"""The in-context regression prompt: support pairs and queries, batched."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import numbers
from typing import Any, Sequence

import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_device, check_float_dtype


@dataclass
class ICLTask:
    """A batch of in-context regression prompts.

    Attributes:
        x_support: support inputs `[batch, n_support, d]`.
        y_support: support labels `[batch, n_support]`.
        x_query: query inputs `[batch, n_query, d]`.
        y_query: query targets `[batch, n_query]` (noise-free function values where the sampler
            knows them, else the noisy labels).
        info: how the prompts were made (sampler name, kernel, bandwidth, noise, seed, ...);
            free-form, JSON-serialisable values only.
    """

    __repr__ = compact_repr

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("x_support", "y_support", "x_query", "y_query"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}: wrap it with torch.as_tensor")
            if not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}: call .float() or .double()")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or inf: clean those prompts before building the task")
        if self.x_support.dim() != 3:
            raise ValueError(f"x_support must be [batch, n_support, d], got shape {tuple(self.x_support.shape)}")
        batch, n_support, dim = self.x_support.shape
        if n_support < 1:
            raise ValueError("x_support must hold at least one support point per prompt")
        if self.x_query.dim() != 3 or self.x_query.shape[0] != batch or self.x_query.shape[2] != dim:
            raise ValueError(
                f"x_query must be [batch={batch}, n_query, d={dim}], got shape {tuple(self.x_query.shape)}"
            )
        if tuple(self.y_support.shape) != (batch, n_support):
            raise ValueError(f"y_support must be [batch={batch}, n_support={n_support}], got shape {tuple(self.y_support.shape)}")
        if tuple(self.y_query.shape) != tuple(self.x_query.shape[:2]):
            raise ValueError(
                f"y_query must be [batch={batch}, n_query={self.x_query.shape[1]}], got shape {tuple(self.y_query.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.x_support.shape[0]

    @property
    def n_support(self) -> int:
        return self.x_support.shape[1]

    @property
    def n_query(self) -> int:
        return self.x_query.shape[1]

    @property
    def dim(self) -> int:
        return self.x_support.shape[2]

    @property
    def device(self) -> torch.device:
        return self.x_support.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_support.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ICLTask":
        """This task on `device` with floating tensors cast to `dtype` (either may be None): a new
        `ICLTask` (its own `info` dict) whose tensors are, as with `torch.Tensor.to`, the same
        tensors where they already have that device and dtype (clone them before writing in place)."""
        if isinstance(device, torch.dtype):
            raise ValueError(f"device got the dtype {device}: pass it by name, task.to(dtype={device})")
        device = check_device("device", device)
        dtype = None if dtype is None else check_float_dtype("dtype", dtype)
        return replace(
            self,
            **{name: getattr(self, name).to(device=device, dtype=dtype) for name in self._tensor_fields()},
            info=dict(self.info),
        )

    def select(self, index: torch.Tensor | np.ndarray | slice | Sequence[int] | int) -> "ICLTask":
        """The prompts at `index` along the batch dimension (an int, or a 0-d integer tensor or
        array such as `errors.argmax()`, keeps the batch dimension: select(3) is select([3]),
        batch 1). As in torch indexing, a slice gives views of this task's tensors (writing into
        them writes into this task) and a sequence or tensor index gives copies."""
        key: object = index
        if isinstance(index, (torch.Tensor, np.ndarray)) and index.ndim == 0:
            key = index.item()  # a Python int (or a float / bool, refused below)
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            key = [int(key)]
        elif isinstance(key, (tuple, range, np.ndarray)):
            key = torch.as_tensor(list(key) if isinstance(key, range) else key)
        elif not isinstance(key, (slice, list, torch.Tensor)):
            raise ValueError(f"index must be an int, a slice, a sequence of ints or a tensor of prompt indices, got {type(key).__name__}")
        return replace(
            self,
            **{name: getattr(self, name)[key] for name in self._tensor_fields()},
            info=dict(self.info),
        )

    @staticmethod
    def _tensor_fields() -> tuple[str, ...]:
        return ("x_support", "y_support", "x_query", "y_query")


def check_task(name: str, value: Any) -> ICLTask:
    """`value` if it is an `ICLTask`, else one ValueError naming the argument `name`."""
    if not isinstance(value, ICLTask):
        raise ValueError(f"{name} must be an mi_krr.tasks.ICLTask, got {type(value).__name__}")
    return value
