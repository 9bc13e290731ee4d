"""Random prompts for tests that only need well-formed inputs (no task family)."""

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
