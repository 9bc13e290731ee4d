"""`TrainConfig`: every setting of a training run, validated once, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mi_krr._validation import check_device, check_non_negative, check_positive, check_seed, dataclass_from_dict, store_count

# Settings that change nothing about the sequence of weights a run produces: a resumed run may
# change these; any other difference from the checkpointed run is refused.
OPERATIONAL_FIELDS = ("eval_every", "eval_prompts", "eval_seed", "checkpoint_every", "keep_checkpoints", "out_dir", "device")


@dataclass
class TrainConfig:
    """How to train an in-context regression model.

    Optimisation: AdamW (`lr`, `weight_decay` on weight matrices only), linear warm-up over
    `warmup_steps` then a cosine decay to `min_lr` at `steps`, gradients clipped to global norm
    `grad_clip` (None: no clipping).

    Curriculum (Garg et al. style): the prompt length rises from `n_support_start` to `n_support`
    and the number of active input coordinates from `active_dim_start` to the sampler's dimension,
    both linearly (in whole units) over the first `curriculum_steps` steps. None for a start value
    means no curriculum on that axis.

    Evaluation: every `eval_every` steps on `eval_prompts` held-out prompts drawn once from
    `eval_seed` at the final prompt length and full dimension, against the Bayes-optimal predictor.

    Checkpoints: every `checkpoint_every` steps into `out_dir` (None: write nothing), keeping the
    latest `keep_checkpoints` training-state files.

    Batches: the batch of step s is a deterministic function of (`seed`, s), so a resumed run sees
    exactly the batches an uninterrupted one would.
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    n_support: int = 32
    n_query: int = 8
    n_support_start: int | None = None
    active_dim_start: int | None = None
    curriculum_steps: int = 0
    eval_every: int = 500
    eval_prompts: int = 512
    eval_seed: int = 20_240_601
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 2
    out_dir: str | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        store_count(self, "steps", minimum=1)
        store_count(self, "batch_size", minimum=1)
        self.lr = check_positive("lr", self.lr)  # numbers stored as Python floats: NumPy scalars would break config.json
        self.min_lr = check_non_negative("min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be a number in [0, lr={self.lr}], got {self.min_lr!r}")
        self.weight_decay = check_non_negative("weight_decay", self.weight_decay)
        store_count(self, "warmup_steps")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be <= steps={self.steps}, got {self.warmup_steps}")
        if self.grad_clip is not None:
            self.grad_clip = check_positive("grad_clip", self.grad_clip)
        store_count(self, "n_support", minimum=1)
        store_count(self, "n_query", minimum=1)
        store_count(self, "curriculum_steps")
        if self.curriculum_steps > self.steps:
            raise ValueError(f"curriculum_steps must be <= steps={self.steps}, got {self.curriculum_steps}")
        if self.n_support_start is not None:
            store_count(self, "n_support_start", minimum=1)
            if self.curriculum_steps and self.n_support_start > self.n_support:  # without a curriculum the start is unused
                raise ValueError(f"n_support_start must be <= n_support={self.n_support}, got {self.n_support_start}")
        if self.active_dim_start is not None:
            store_count(self, "active_dim_start", minimum=1)
        store_count(self, "eval_every", minimum=1)
        store_count(self, "eval_prompts", minimum=1)
        store_count(self, "eval_seed", check=check_seed)
        store_count(self, "checkpoint_every", minimum=1)
        store_count(self, "keep_checkpoints", minimum=1)
        store_count(self, "seed", check=check_seed)
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            self.out_dir = str(self.out_dir)
        self.device = str(check_device("device", self.device, available=False))  # a run config may name a GPU this machine lacks

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys raise a ValueError naming them."""
        return dataclass_from_dict(cls, values)

    def trajectory_fields(self) -> dict[str, Any]:
        """The fields that determine the weights a run produces (all but `OPERATIONAL_FIELDS`)."""
        return {key: value for key, value in self.to_dict().items() if key not in OPERATIONAL_FIELDS}
