"""Checks at the public boundary: every failure is one line naming the argument and the fix."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, TypeVar, overload

import numpy as np
import torch

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Array = torch.Tensor | np.ndarray


def as_float64(name: str, value: Any, min_dim: int = 0) -> torch.Tensor:
    """Return `value` as a finite float64 tensor (kept on its device, and in the autograd graph,
    if it already is a tensor).

    Raises ValueError naming `name` for non-numeric or complex input, NaN/inf entries, or fewer
    than `min_dim` dimensions.
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real, got {value.dtype}: pass {name}.real if the imaginary part is rounding")
        tensor = value.to(torch.float64)
    else:
        if np.iscomplexobj(value):
            raise ValueError(f"{name} must be real, got a complex array: pass its .real if the imaginary part is rounding")
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric array or tensor, got {type(value).__name__}") from exc
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(tensor.shape)}")
    if not _all_finite(tensor.detach()):
        raise ValueError(f"{name} contains NaN or inf: replace those entries with finite values before calling (every entry is read)")
    return tensor


SYMMETRY_RTOL = 1e-8
"""A float64 matrix counts as symmetric when K - K^T is within SYMMETRY_RTOL of K's scale (each
matrix at its own scale); see `symmetry_rtol` for lower-precision inputs."""


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def symmetry_rtol(value: Any) -> float:
    """The relative asymmetry a matrix given as `value` may carry and still count as symmetric:
    `SYMMETRY_RTOL`, or where that is larger, 64 machine epsilons of a float32 matrix (computed in
    float32, its two triangles may differ by many roundings: ~1e-7 each) and 4 of a half-precision
    one (float16, bfloat16: computed in float32 and rounded once, so its triangles differ by at
    most an ulp of each entry; 64 bfloat16 epsilons would be 50%, letting an attention pattern
    pass for a kernel)."""
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, torch.dtype):
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    else:
        eps = float(np.finfo(dtype).eps) if dtype is not None and np.issubdtype(dtype, np.floating) else 0.0
    return max(SYMMETRY_RTOL, (64 if eps <= FLOAT32_EPS else 4) * eps)


def check_positive(name: str, value: float) -> float:
    """Return `value` as a float after checking it is finite and > 0 (not a bool)."""
    number = _number_or_none(value)
    if number is None:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_count(name: str, value: int, minimum: int = 0) -> int:
    """Return `value` as a Python int after checking it is an integer >= `minimum` (a Python or
    NumPy integer, or a 0-d integer tensor; not a bool)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not (value.is_floating_point() or value.is_complex()) and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


SEED_LIMIT = 2**32
"""Seeds are in [0, SEED_LIMIT): torch's CPU generator keeps a seed's low 32 bits, so seeds that
differ by 2**32 would draw the same numbers."""


def check_seed(name: str, value: int) -> int:
    """Return `value` after checking it is an integer seed in [0, SEED_LIMIT) = [0, 2**32)."""
    value = check_count(name, value)
    if value >= SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**32) (torch's CPU generator keeps 32 bits of a seed, "
                         f"so larger seeds repeat smaller ones), got {value}")
    return value


def offset_seed(seed: int, offset: int) -> int:
    """The seed `offset` places after `seed`, wrapping within [0, SEED_LIMIT) (the seeds of the
    further prompt sets drawn from one user seed)."""
    return (seed + offset) % SEED_LIMIT


@overload
def check_device(name: str, value: None, available: bool = True) -> None: ...
@overload
def check_device(name: str, value: str | torch.device, available: bool = True) -> torch.device: ...
@overload
def check_device(name: str, value: Any, available: bool = True) -> torch.device | None: ...
def check_device(name: str, value: Any, available: bool = True) -> torch.device | None:
    """`value` (a device string or `torch.device`, None: the default) as a `torch.device`, after
    checking torch knows the name and that it holds values ('meta' does not); with `available`,
    also that this machine can place a tensor there (a CUDA device without CUDA, or past the
    last GPU, is refused here rather than by torch's assertion deep inside)."""
    if value is None:
        return None
    if not isinstance(value, torch.device):
        try:
            value = torch.device(value)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"{name} {value!r} cannot be used here (not a torch device name, such as 'cpu' or 'cuda'): pass e.g. 'cpu'") from error
    if value.type == "meta":
        raise ValueError(f"{name} {str(value)!r} cannot be used here (meta tensors hold no values to compute with): pass e.g. 'cpu'")
    if available:
        try:
            torch.empty(0, device=value)
        except (RuntimeError, AssertionError) as error:  # a backend torch lacks (AssertionError for CUDA), a missing ordinal
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{name} {str(value)!r} cannot be used here ({reason}): pass e.g. 'cpu'") from error
    return value


def as_tuple(name: str, value: Any, example: str) -> tuple:
    """`value` as a tuple: one string becomes a 1-tuple (not its letters); anything else must be
    a sequence (ValueError naming `name`, with `example`, e.g. for a lone number)."""
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError as error:
        raise ValueError(f"{name} must be a sequence, e.g. {example}, got {value!r}") from error


def store_count(instance: Any, name: str, minimum: int = 0, check: Callable[[str, Any], int] | None = None) -> int:
    """`check_count` (or `check`, e.g. `check_seed`) of the attribute `name` of a dataclass
    `instance` (frozen or not), stored back as a Python int: a NumPy integer would pass the check
    but break torch seeding and JSON configs."""
    value = check_count(name, getattr(instance, name), minimum) if check is None else check(name, getattr(instance, name))
    object.__setattr__(instance, name, value)
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return `value` after checking it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """`value` as a float after checking it is finite and >= 0 (not a bool)."""
    number = _number_or_none(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_finite(name: str, value: Any) -> float:
    """`value` as a finite float (not a bool)."""
    number = _number_or_none(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _number_or_none(value: Any) -> float | None:
    """`value` as a float; None for booleans (a typo for a number, though float() takes them) and
    anything float() rejects, so each caller raises its own error. Numeric strings are taken on
    purpose: PyYAML reads `lr: 1e-3` in a run config as the string '1e-3'."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_float_dtype(name: str, value: Any) -> torch.dtype:
    """`value` after checking it is a floating torch.dtype (torch.float64, not the string
    "float64", nor an integer dtype)."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"{name} must be a floating torch.dtype such as torch.float64, got {value!r}")
    return value


def check_condition_number(name: str, value: Any) -> float:
    """`value` as a float after checking it is a finite ratio >= 1."""
    number = check_positive(name, value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1 (largest / smallest eigenvalue), got {value!r}")
    return number


ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def dataclass_from_dict(cls: type[ConfigT], values: Any) -> ConfigT:
    """`cls(**values)` for a config dataclass, after checking `values` is a dict whose keys are
    `cls`'s fields and include every field without a default; each failure is one ValueError
    naming the keys and the allowed ones."""
    name = cls.__name__
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be built from a dict of its fields ({name}.from_dict({{...}})), got {type(values).__name__}")
    fields = dataclasses.fields(cls)
    allowed = sorted(f.name for f in fields if f.init)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}: allowed keys are {allowed}")
    missing = [f.name for f in fields if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{name} is missing required keys {missing}")
    return cls(**values)


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or inf.

    One summation pass decides the common case: NaN and inf propagate through a sum, so a finite
    sum means every entry is finite. Only a non-finite sum (a bad entry, or finite entries whose
    sum overflows) pays for the exact entrywise test.
    """
    if tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())
