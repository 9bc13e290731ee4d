"""cg-rate: the constructed CG transformer converges at the conjugate-gradient rate.

On prompts whose K + lam I has condition number exactly kappa (`conditioned_linear_task`), the
CG transformer's A-norm error ||alpha_t - alpha*||_A / ||alpha*||_A after t steps (4 t blocks) is
compared with `mi_krr.solvers.cg` and with the classical bound 2 ((sqrt(kappa) - 1) /
(sqrt(kappa) + 1))^t (`mi_krr.solvers.cg_error_bound`). Runs
`mi_krr.construct.studies.cg_rate_study` and adds the headline numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mi_krr.reproductions._format import key_numbers_text

QUICK: dict[str, Any] = {"kappas": (10.0, 100.0), "n_support": 24, "n_steps": 12, "batch_size": 4}
BOUND_FLOOR = 1e-8  # below this the bound is compared with float64 round-off, not with CG


@dataclass
class CGRateResult:
    """`study` (`CGRateStudy`: per-step errors of model, solver and bound per kappa) and, per
    kappa (as str):

    Attributes:
        within_bound: the model's median A-norm error ratio is <= the bound at every step where
            the bound is >= BOUND_FLOOR.
        max_ratio_to_bound: max over those steps of model error / bound.
        model_solver_gap: max over steps of |model ratio - solver ratio|.
        steps_to_tolerance: first step where the model's ratio is < `tolerance` (None: never).
        bound_steps_to_tolerance: first step where the bound is < `tolerance`.
        tolerance: the tolerance (1e-6).
    """

    study: Any
    within_bound: dict[str, bool]
    max_ratio_to_bound: dict[str, float]
    model_solver_gap: dict[str, float]
    steps_to_tolerance: dict[str, int | None]
    bound_steps_to_tolerance: dict[str, int | None]
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study.to_dict(),
            "within_bound": self.within_bound,
            "max_ratio_to_bound": self.max_ratio_to_bound,
            "model_solver_gap": self.model_solver_gap,
            "steps_to_tolerance": self.steps_to_tolerance,
            "bound_steps_to_tolerance": self.bound_steps_to_tolerance,
            "tolerance": self.tolerance,
        }

    def plot(self):
        return self.study.plot()

    def key_numbers(self) -> dict[str, Any]:
        numbers: dict[str, Any] = {}
        for key in self.within_bound:
            numbers[f"kappa={float(key):g}: within bound"] = self.within_bound[key]
            numbers[f"kappa={float(key):g}: max error / bound"] = self.max_ratio_to_bound[key]
            numbers[f"kappa={float(key):g}: steps to {self.tolerance:g} (model / bound)"] = (
                f"{self.steps_to_tolerance[key]} / {self.bound_steps_to_tolerance[key]}"
            )
            numbers[f"kappa={float(key):g}: max |model - solver|"] = self.model_solver_gap[key]
        return numbers

    def summary(self) -> str:
        return key_numbers_text(self.key_numbers())


def cg_rate(
    kappas: tuple[float, ...] = (10.0, 100.0, 1000.0),
    n_support: int = 64,
    n_steps: int = 40,
    lam: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    tolerance: float = 1e-6,
    device: str = "cpu",
) -> CGRateResult:
    """Run the CG-rate study (module docstring) on `device` and summarise it."""
    from mi_krr._validation import check_positive
    from mi_krr.construct.studies import cg_rate_study

    tolerance = check_positive("tolerance", tolerance)
    study = cg_rate_study(kappas=kappas, n_support=n_support, n_steps=n_steps, lam=lam, batch_size=batch_size, seed=seed,
                          device=device)
    within, worst, gap, reached, bound_reached = {}, {}, {}, {}, {}
    for kappa in study.kappas:
        key = str(kappa)
        model = np.asarray(study.a_norm_ratio[key])
        bound = np.asarray(study.bound[key])
        solver = np.asarray(study.solver_a_norm_ratio[key])
        informative = bound >= BOUND_FLOOR
        within[key] = bool(np.all(model[informative] <= bound[informative] * (1 + 1e-9)))
        worst[key] = float(np.max(model[informative] / bound[informative]))
        gap[key] = float(np.max(np.abs(model - solver)))
        reached[key] = _first_below(model, tolerance)
        bound_reached[key] = _first_below(bound, tolerance)
    return CGRateResult(study, within, worst, gap, reached, bound_reached, tolerance)


def _first_below(values: np.ndarray, tolerance: float) -> int | None:
    below = np.flatnonzero(values < tolerance)
    return int(below[0]) if below.size else None

