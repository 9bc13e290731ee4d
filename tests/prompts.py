"""Random prompts for tests that only need well-formed inputs (no task family)."""

import numpy as np
import torch

from mi_krr.tasks import ICLTask


def random_task(batch: int, n: int, m: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> ICLTask:
    """Standard-normal x_support `[batch, n, d]`, y_support `[batch, n]`, x_query `[batch, m, d]`,
    y_query `[batch, m]`, drawn in that order from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return ICLTask(
        x_support=torch.randn(batch, n, d, generator=g, dtype=dtype),
        y_support=torch.randn(batch, n, generator=g, dtype=dtype),
        x_query=torch.randn(batch, m, d, generator=g, dtype=dtype),
        y_query=torch.randn(batch, m, generator=g, dtype=dtype),
    )


def copied_steps_case():
    """Scoring inputs whose answer is known: step values `[B=6, T+1=5, m=2]` (step 0 = 0) and
    sensitivities `[6, 5, 2, n=3]`, then layer rows copying steps 1, 3, 4 (values and
    sensitivities; so the alignment is [1, 3, 4] and every path R2 is exactly 1), then the
    last step as the KRR prediction `[6, 2]`."""
    rng = np.random.default_rng(0)
    step = rng.normal(size=(6, 5, 2))
    step[:, 0] = 0
    sens = rng.normal(size=(6, 5, 2, 3))
    sens[:, 0] = 0
    return step, sens, step[:, [1, 3, 4]], sens[:, [1, 3, 4]], step[:, -1]
