"""Timing shared by the A/B benchmarks: medians of interleaved repeats."""

from __future__ import annotations

import statistics
import time


def median_ms(functions: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each zero-argument function, after one warm-up call each, the
    functions alternated within each repeat (so load on the machine hits every variant alike)."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}
