"""Seeds derived from (run seed, stream, step): every batch is a pure function of them, so a
resumed run draws exactly the prompts an uninterrupted one would, without replaying."""

from __future__ import annotations

import numpy as np
import torch

TRAIN_STREAM = 0
EVAL_STREAM = 1


def derived_seed(seed: int, stream: int, step: int) -> int:
    """A seed in [0, 2**32) that depends only on (seed, stream, step) (NumPy's SeedSequence hash).

    torch's CPU generator keeps a seed's low 32 bits: these are the low 32 bits of the 63-bit
    seed (state[0] << 31) ^ state[1] that runs were trained with, so their batches are unchanged."""
    state = np.random.SeedSequence([seed, stream, step]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) & 1) << 31) ^ int(state[1])


def derived_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator seeded with `derived_seed(seed, stream, step)`."""
    return torch.Generator(device="cpu").manual_seed(derived_seed(seed, stream, step))
