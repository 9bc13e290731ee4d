"""Step-indexed schedules: learning rate (warm-up + cosine) and curriculum values.

Both are pure functions of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

from mi_krr.train.config import TrainConfig


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warm-up lr * (step + 1) / warmup_steps for step < warmup_steps, then a cosine from
    `lr` (at step = warmup_steps) to `min_lr` (at step = total_steps):
    min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def curriculum_value(step: int, start: int, end: int, ramp_steps: int) -> int:
    """Integer ramp from `start` (step 0) to `end` (from step `ramp_steps` on):
    start + floor((end - start) * min(step, ramp_steps) / ramp_steps)."""
    if ramp_steps == 0 or step >= ramp_steps:
        return end
    return start + ((end - start) * step) // ramp_steps


def step_learning_rate(step: int, cfg: TrainConfig) -> float:
    """`learning_rate` with the settings of `cfg`."""
    return learning_rate(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)


def step_prompt_length(step: int, cfg: TrainConfig) -> int:
    """Support points per training prompt at `step`."""
    start = cfg.n_support if cfg.n_support_start is None else cfg.n_support_start
    return curriculum_value(step, start, cfg.n_support, cfg.curriculum_steps)


def step_active_dim(step: int, cfg: TrainConfig, dim: int) -> int:
    """Active input coordinates at `step` for a sampler of dimension `dim`."""
    start = dim if cfg.active_dim_start is None else cfg.active_dim_start
    return curriculum_value(step, start, dim, cfg.curriculum_steps)
