"""The project's reproductions, one module each, callable from notebooks and from
`mi-krr reproduce NAME`:

- `cg_rate` (cg-rate): the constructed CG stack converges at the CG rate.
- `width` (width): error to oracle KRR against head width m, next to d_eff(lam).
- `softmax_ood` (softmax-ood): attention-kernel distance to the exp kernel in and out of
  distribution, per layer, on checkpoints/softmax_gp.
- `richardson_profile` (richardson-profile): the softmax GP model's layer-wise error profile
  scored against preconditioned Richardson, CG, GD and the rest (Yan et al.'s comparison).

The modules import only NumPy at import time (the heavy imports happen inside the functions).
Each function returns a result dataclass with `.to_dict()` (JSON-able), `.plot()` (a matplotlib
Figure), `.key_numbers()` (the headline numbers) and `.summary()` (them as text); each takes
`seed=` and `device=` (default "cpu": where every tensor and model of the run lives). Each
module's `QUICK` holds the keyword arguments of a small, fast configuration: `reproduction(name)`
gives (function, QUICK); the package's attributes `cg_rate`, ... are the functions, so read a
module's constants with `from mi_krr.reproductions.cg_rate import QUICK`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from mi_krr.reproductions.cg_rate import CGRateResult, cg_rate
from mi_krr.reproductions.richardson_profile import RichardsonProfileResult, richardson_profile
from mi_krr.reproductions.softmax_ood import SoftmaxOODResult, softmax_ood
from mi_krr.reproductions.width import WidthResult, width

__all__ = ["CGRateResult", "REPRODUCTIONS", "RichardsonProfileResult", "SoftmaxOODResult", "WidthResult", "cg_rate",
           "reproduction", "richardson_profile", "softmax_ood", "width"]

# command-line name -> (module, function)
REPRODUCTIONS: dict[str, tuple[str, str]] = {
    "cg-rate": ("mi_krr.reproductions.cg_rate", "cg_rate"),
    "width": ("mi_krr.reproductions.width", "width"),
    "softmax-ood": ("mi_krr.reproductions.softmax_ood", "softmax_ood"),
    "richardson-profile": ("mi_krr.reproductions.richardson_profile", "richardson_profile"),
}


def reproduction(name: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function of reproduction `name` (a key of `REPRODUCTIONS`) and its quick keywords."""
    if name not in REPRODUCTIONS:
        raise ValueError(f"reproduction must be one of {', '.join(REPRODUCTIONS)}, got {name!r}")
    module_name, function_name = REPRODUCTIONS[name]
    module = importlib.import_module(module_name)
    return getattr(module, function_name), dict(module.QUICK)
