"""The ridge under which KRR is the Bayes-optimal (posterior-mean) predictor of a sampler's prompts."""

from __future__ import annotations

from typing import Any

from mi_krr._validation import check_count, check_non_negative
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler

_KNOWN_POSTERIORS: tuple[str, ...] = (LinearRegressionSampler.name, GPRegressionSampler.name)


def bayes_optimal_ridge(info_or_sampler: Any) -> float:
    """lam such that KRR with the sampler's kernel is the posterior mean of its prompts' labels.

    Args:
        info_or_sampler: a sampler, or its configuration dict (`sampler.to_config()`, or a task's
            `info`, which holds it).

    Returns:
        linear regression (w ~ N(0, I_d / d), linear kernel): noise_std^2 * d, since the posterior
        mean of w is (X^T X + noise_std^2 d I)^-1 X^T y; GP regression: noise_std^2. 0.0 for
        noise-free prompts (the limit: interpolation).

    Raises ValueError for a sampler without a known posterior (any but linear_regression and
    gp_regression, registered in `SAMPLERS` or not), or a dict that names none or lacks or
    misstates noise_std (or dim, for linear regression).
    """
    config = info_or_sampler.to_config() if hasattr(info_or_sampler, "to_config") else info_or_sampler
    name = config.get("sampler") if isinstance(config, dict) else None
    if name not in _KNOWN_POSTERIORS:
        raise ValueError(
            f"info_or_sampler must be a sampler with a known posterior, or its config naming one of {_KNOWN_POSTERIORS} "
            f"under 'sampler', got {name!r}"
        )
    noise_variance = check_non_negative("info_or_sampler['noise_std']", _config_value(config, "noise_std")) ** 2
    if name == LinearRegressionSampler.name:
        return noise_variance * check_count("info_or_sampler['dim']", _config_value(config, "dim"), minimum=1)
    return noise_variance


def _config_value(config: dict[str, Any], key: str) -> Any:
    """`config[key]`, or a ValueError saying how to get a config that holds it."""
    if config.get(key) is None:
        raise ValueError(f"info_or_sampler has no {key!r}: pass the sampler or its full to_config() dict")
    return config[key]
