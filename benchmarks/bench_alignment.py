"""The monotone layer -> step alignment (`probes.scoring.monotone_alignment`, one compiled loop)
against the NumPy recursion it replaced, side by side, on the shapes diagnose aligns:

- the bootstrap's scores: for each of 8 candidates, 1000 resampled cost matrices [1000, L', T+1];
- the fitted-step search: many small calls, [G, L', T+1] with G = 16 candidates per call.

Costs are random (positive, as squared errors are), L' = 4 layers, T + 1 = 21 steps (the shipped
models' default). Both sides are checked equal bit for bit (steps and totals) before timing;
medians over interleaved repeats. Run: .venv/bin/python benchmarks/bench_alignment.py
"""

from __future__ import annotations

import argparse

import numpy as np

from probes.scoring import monotone_alignment
from timing import median_ms


def numpy_recursion(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy alignment `monotone_alignment` used before (session 15): cost `[..., L', T+1]`
    -> (steps `[..., L']`, totals `[...]`); running minima over the batch in one contiguous inner
    loop, then backtracking with earliest-step ties."""
    n_rows, n_steps = cost.shape[-2:]
    best = np.moveaxis(cost.reshape(-1, n_rows, n_steps), 0, -1).copy()
    for row in range(1, n_rows):
        best[row] += np.minimum.accumulate(best[row - 1], axis=0)
    steps = np.empty((n_rows, best.shape[-1]), dtype=np.int64)
    steps[-1] = np.argmin(best[-1], axis=0)
    total = np.take_along_axis(best[-1], steps[-1][None], axis=0)[0]
    later = np.arange(n_steps)[:, None]
    for row in range(n_rows - 2, -1, -1):
        steps[row] = np.argmin(np.where(later <= steps[row + 1], best[row], np.inf), axis=0)
    return steps.T.reshape(cost.shape[:-1]), total.reshape(cost.shape[:-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {
        "bootstrap scores (8 x [1000, 4, 21])": [rng.exponential(size=(1000, 4, 21)) for _ in range(8)],
        "fitted-step search (200 x [16, 4, 21])": [rng.exponential(size=(16, 4, 21)) for _ in range(200)],
    }
    # ties: costs rounded to a coarse grid, so equal cumulative costs occur and tie-breaking is checked too
    cases = {name: [np.round(cost, 1) for cost in costs] for name, costs in cases.items()}
    for name, costs in cases.items():
        for cost in costs:
            (steps_new, total_new), (steps_old, total_old) = monotone_alignment(cost), numpy_recursion(cost)
            assert np.array_equal(steps_new, steps_old) and np.array_equal(total_new, total_old), name
        times = median_ms({"numpy": lambda: [numpy_recursion(c) for c in costs],
                           "compiled": lambda: [monotone_alignment(c) for c in costs]}, args.repeats)
        print(f"{name}: NumPy recursion {times['numpy']:.2f} ms, compiled {times['compiled']:.2f} ms, "
              f"ratio {times['compiled'] / times['numpy']:.3f}x (steps and totals bitwise equal)", flush=True)


if __name__ == "__main__":
    main()
