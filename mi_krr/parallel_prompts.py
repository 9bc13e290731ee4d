"""Launching compiled (numba) loops over prompts on several threads, safely.

A compiled loop `serial(*arrays, start, stop)` handles prompts start..stop-1; its parallel twin
`parallel(*arrays, chunks)` splits the batch into `chunks` contiguous ranges with `numba.prange`.
`run_over_prompts` picks the chunk count (torch's thread count, so numba and torch use the same
cores) and takes care of two properties of numba's threading layers:

- GNU OpenMP (numba's usual layer) aborts a forked child that launches a parallel region its
  parent used: forked processes run the serial loop;
- numba's fallback layer (workqueue) is not thread-safe: parallel launches hold a lock.

Each prompt's result must not depend on which thread runs it (the loops write disjoint prompts),
so results are the same for any thread count.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numba
import torch

_LAUNCH = threading.Lock()
"""One parallel launch at a time (numba's fallback threading layer, workqueue, is not thread-safe)."""

_FORKED = [False]
"""Whether this process is a fork: GNU OpenMP aborts a forked child that launches a parallel
region its parent used, so children run the serial loop."""
os.register_at_fork(after_in_child=lambda: _FORKED.__setitem__(0, True))


def run_over_prompts(serial: Callable[..., None], parallel: Callable[..., None], batch: int, *arrays: Any) -> None:
    """`parallel(*arrays, chunks)` on min(torch threads, numba threads, batch) chunks of the
    `batch` prompts, or `serial(*arrays, 0, batch)` with one chunk or in a forked process."""
    chunks = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, batch)
    if chunks <= 1 or _FORKED[0]:
        serial(*arrays, 0, batch)
        return
    with _LAUNCH:
        previous = numba.get_num_threads()
        numba.set_num_threads(chunks)
        try:
            parallel(*arrays, chunks)
        finally:
            numba.set_num_threads(previous)
