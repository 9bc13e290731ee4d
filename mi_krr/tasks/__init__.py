"""In-context regression prompts (`ICLTask`), seeded samplers, distribution shifts, and SPD test
systems with an exact condition number."""

from mi_krr.tasks.optimal import bayes_optimal_ridge
from mi_krr.tasks.samplers import SAMPLERS, GPRegressionSampler, LinearRegressionSampler, Sampler, sampler_from_config
from mi_krr.tasks.shifts import DEFAULT_SHIFTS, SHIFT_KINDS, Shift, applicable_shifts, apply_shift, shift_applies, why_shift_does_not_apply
from mi_krr.tasks.spd import SPDSystem, geometric_spectrum, sample_spd_system
from mi_krr.tasks.task import ICLTask

__all__ = [
    "ICLTask",
    "LinearRegressionSampler",
    "GPRegressionSampler",
    "Sampler",
    "SAMPLERS",
    "sampler_from_config",
    "Shift",
    "SHIFT_KINDS",
    "DEFAULT_SHIFTS",
    "apply_shift",
    "shift_applies",
    "why_shift_does_not_apply",
    "applicable_shifts",
    "SPDSystem",
    "sample_spd_system",
    "geometric_spectrum",
    "bayes_optimal_ridge",
]
