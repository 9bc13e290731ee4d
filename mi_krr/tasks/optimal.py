"""The ridge under which KRR is the Bayes-optimal (posterior-mean) predictor of a sampler's prompts."""

from __future__ import annotations

from typing import Any

from mi_krr.tasks.samplers import SAMPLERS


def bayes_optimal_ridge(info_or_sampler: Any) -> float:
    """lam such that KRR with the sampler's kernel is the posterior mean of its prompts' labels.

    Args:
        info_or_sampler: a sampler, or its configuration dict (`sampler.to_config()`, or a task's
            `info`, which holds it).

    Returns:
        linear regression (w ~ N(0, I_d / d), linear kernel): noise_std^2 * d, since the posterior
        mean of w is (X^T X + noise_std^2 d I)^-1 X^T y; GP regression: noise_std^2. 0.0 for
        noise-free prompts (the limit: interpolation).

    Raises ValueError for a sampler without a known posterior, or a dict that names none or lacks
    noise_std.
    """
    config = info_or_sampler.to_config() if hasattr(info_or_sampler, "to_config") else info_or_sampler
    name = config.get("sampler") if isinstance(config, dict) else None
    if name not in SAMPLERS:
        raise ValueError(
            f"info_or_sampler must be a sampler or its config naming one of {tuple(SAMPLERS)} under 'sampler', got {name!r}"
        )
    if config.get("noise_std") is None:
        raise ValueError("info_or_sampler has no 'noise_std': pass the sampler or its full to_config() dict")
    noise_variance = float(config["noise_std"]) ** 2
    if name == "linear_regression":
        return noise_variance * int(config["dim"])
    return noise_variance
