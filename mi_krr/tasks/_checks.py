"""Argument checks the task modules share (beyond `mi_krr._validation`)."""

from __future__ import annotations

import math
from typing import Any

from mi_krr._validation import check_positive


def check_non_negative(name: str, value: Any) -> float:
    """`value` as a float after checking it is finite and >= 0."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_finite(name: str, value: Any) -> float:
    """`value` as a finite float."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_condition_number(name: str, value: Any) -> float:
    """`value` as a float after checking it is a finite ratio >= 1."""
    number = check_positive(name, value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1 (largest / smallest eigenvalue), got {value!r}")
    return number
