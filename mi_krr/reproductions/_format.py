"""Key numbers as text (shared by every reproduction's `summary()`)."""

from __future__ import annotations

import math
from typing import Any


def format_value(value: Any) -> str:
    """Floats to 4 significant digits; everything else as str."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def key_numbers_text(numbers: dict[str, Any]) -> str:
    """One "name: value" line per key number."""
    return "\n".join(f"{name}: {format_value(value)}" for name, value in numbers.items())
