"""Batched CG trajectories (mi_krr.solvers.cg) against a SciPy per-prompt loop, side by side.

Both sides produce, for every prompt, every CG iterate alpha_0..alpha_T and the query
predictions K_query @ alpha_t at every step, in float64 on 2 CPU threads. The SciPy side is the
loop a careful user would write: per prompt, A = K + lam I as a dense ndarray,
scipy.sparse.linalg.cg from x0 = 0 with rtol = atol = 0 and maxiter = T (so exactly T steps),
a callback that copies each iterate, then one matmul for all steps' predictions. mi_krr's `cg`
runs with its default backend ("auto": the fused compiled schedule on the CPU) and, in a third
column, with backend="torch" (the batched torch schedule autograd runs through). Both are also
checked for accuracy against CG in extended precision (np.longdouble) on the first prompts.

Timings are medians over interleaved repeats. Run: .venv/bin/python benchmarks/bench_solvers.py
"""

from __future__ import annotations

import os
import sys

# thread counts must be fixed before numpy / torch load their BLAS and OpenMP runtimes
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = str(THREADS)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.sparse.linalg  # noqa: E402
import torch  # noqa: E402

from mi_krr.solvers import cg, cg_block_size  # noqa: E402

LAM = 0.1
DIM = 8
CONFIGS = [  # (batch, n_support, n_steps, speed-up goal)
    (256, 64, 30, 10.0),
    (64, 128, 30, 2.0),
]


def gaussian_prompts(batch: int, n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K `[batch, n, n]`, y `[batch, n]`, K_query `[batch, m, n]` from a Gaussian kernel
    (bandwidth sqrt(d)) on standard normal inputs in d = 8 dimensions."""
    rng = np.random.default_rng(seed)
    support = rng.standard_normal((batch, n, DIM))
    query = rng.standard_normal((batch, m, DIM))
    y = rng.standard_normal((batch, n))

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        squared = (a**2).sum(-1)[:, :, None] + (b**2).sum(-1)[:, None, :] - 2 * a @ b.transpose(0, 2, 1)
        return np.exp(-np.maximum(squared, 0) / (2 * DIM))

    K = kernel(support, support)
    return (K + K.transpose(0, 2, 1)) / 2, y, kernel(query, support)


ACCURACY_PROMPTS = 16


def extended_precision_cg(K: np.ndarray, y: np.ndarray, lam: float, n_steps: int) -> np.ndarray:
    """CG iterates `[T+1, n]` of one prompt in np.longdouble (x87 80-bit on x86-64: 64-bit
    mantissa, ~3 more digits than float64), rounded to float64: the accuracy reference."""
    A = K.astype(np.longdouble) + np.longdouble(lam) * np.eye(len(y), dtype=np.longdouble)
    residual = y.astype(np.longdouble)
    direction, alpha, rho = residual.copy(), np.zeros_like(residual), residual @ residual
    iterates = [alpha]
    for _ in range(n_steps):
        image = A @ direction
        step = rho / (direction @ image)
        alpha, residual = alpha + step * direction, residual - step * image
        rho_next = residual @ residual
        direction, rho = residual + (rho_next / rho) * direction, rho_next
        iterates.append(alpha)
    return np.stack(iterates).astype(np.float64)


def accuracy(K: np.ndarray, y: np.ndarray, n_steps: int, backend: str) -> np.ndarray:
    """Median over the first ACCURACY_PROMPTS prompts of max_i |alpha_t,i - reference| /
    max_i |reference_t,i| per step `[T+1]`, against `extended_precision_cg`."""
    prompts = slice(0, ACCURACY_PROMPTS)
    ours = cg(torch.from_numpy(K[prompts]), torch.from_numpy(y[prompts]), LAM, n_steps, backend=backend).alpha.numpy()
    errors = []
    for alpha, kernel, labels in zip(ours, K[prompts], y[prompts]):
        reference = extended_precision_cg(kernel, labels, LAM, n_steps)
        errors.append(np.abs(alpha - reference).max(1) / np.maximum(np.abs(reference).max(1), 1e-300))
    return np.median(errors, axis=0)


def scipy_loop(K: np.ndarray, y: np.ndarray, K_query: np.ndarray | None, lam: float, n_steps: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per prompt: CG iterates `[T+1, n]` and predictions `[T+1, m]` (None without K_query)."""
    n = K.shape[-1]
    identity = np.eye(n)
    results = []
    for k, labels, k_query in zip(K, y, [None] * len(K) if K_query is None else K_query):
        iterates = [np.zeros(n)]
        scipy.sparse.linalg.cg(
            k + lam * identity,
            labels,
            x0=np.zeros(n),
            rtol=0.0,
            atol=0.0,
            maxiter=n_steps,
            callback=lambda x: iterates.append(x.copy()),
        )
        alpha = np.stack(iterates)
        results.append((alpha, None if k_query is None else alpha @ k_query.T))
    return results


def median_times(functions: dict[str, callable], repeats: int, clock: callable, order: str = "interleaved") -> dict[str, float]:
    """Median time (s) of each function by `clock`. "interleaved": the functions alternate within
    each repeat, so load changes hit all alike (and each call starts after the other side ran);
    "grouped": each function's repeats run back to back (steady state, as in a loop of calls)."""
    for function in functions.values():
        function()  # warm-up
    times = {name: [] for name in functions}
    schedule = (
        [name for _ in range(repeats) for name in functions]
        if order == "interleaved"
        else [name for name in functions for _ in range(repeats)]
    )
    for name in schedule:
        start = clock()
        functions[name]()
        times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing repeats (median reported)")
    parser.add_argument("--queries", type=int, default=None, help="queries per prompt m (default m = n; 0: iterates only, no predictions)")
    parser.add_argument("--block-size", type=int, default=None, help="block_size of the torch schedule (default: cg_block_size(n))")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP / torch threads (default 2)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter (default). cpu: process CPU time, robust to other jobs on a busy "
        "machine but only comparable with --threads 1",
    )
    parser.add_argument(
        "--order",
        choices=("interleaved", "grouped"),
        default="interleaved",
        help="interleaved (default): SciPy and torch calls alternate; grouped: each side's repeats back to back",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, scipy {scipy.__version__}")
    print(
        f"float64, lam = {LAM}, Gaussian kernel, d = {DIM}; {args.clock} clock, medians of {args.repeats} "
        f"{args.order} repeats; load average {os.getloadavg()[0]:.1f}\n"
    )
    header = (
        f"{'B':>4} {'n':>4} {'m':>4} {'T':>3} {'block':>5} | {'scipy loop':>11} {'mi_krr cg':>10} | {'speed-up':>8} {'goal':>5}  {'met':<4} | "
        f"{'torch sched.':>12} {'speed-up':>8} | rel. diff (pred, or alpha if m=0): steps 0-5, step T"
    )
    print(header)
    print("-" * len(header))
    accuracy_lines = []
    for batch, n, n_steps, goal in CONFIGS:
        m = n if args.queries is None else args.queries
        K, y, K_query = gaussian_prompts(batch, n, m)
        K_query = K_query if m else None  # --queries 0: iterates only, no predictions on either side
        K_t, y_t = torch.from_numpy(K), torch.from_numpy(y)
        K_query_t = None if K_query is None else torch.from_numpy(K_query)
        block = args.block_size or cg_block_size(n)
        reference = scipy_loop(K, y, K_query, LAM, n_steps)
        trajectory = cg(K_t, y_t, LAM, n_steps, K_query=K_query_t)
        compared = 1 if m else 0  # (alpha, pred): the predictions, or without queries the iterates
        ours = (trajectory.pred if m else trajectory.alpha).numpy()
        theirs = np.stack([result[compared] for result in reference])  # [B, T+1, m or n]
        # CG amplifies rounding differently in the two codes mid-way on these ill-conditioned
        # systems (kappa ~ 300); its first steps and its end point are well determined
        difference = np.abs(ours - theirs) / np.abs(theirs).max()
        early, last = difference[:, :6].max(), difference[:, -1].max()
        steps = sorted({1, n_steps // 3, n_steps})
        errors = {backend: accuracy(K, y, n_steps, backend) for backend in ("fused", "torch")}
        accuracy_lines.append(
            f"{batch:>4} {n:>4}: error relative to max|alpha_t| at steps {', '.join(map(str, steps))} (median of {ACCURACY_PROMPTS} prompts): "
            + "; ".join(f"{backend} " + ", ".join(f"{error[t]:.1e}" for t in steps) for backend, error in errors.items())
        )
        times = median_times(
            {
                "scipy": lambda: scipy_loop(K, y, K_query, LAM, n_steps),
                "cg": lambda: cg(K_t, y_t, LAM, n_steps, K_query=K_query_t),
                "torch": lambda: cg(K_t, y_t, LAM, n_steps, K_query=K_query_t, block_size=block, backend="torch"),
            },
            args.repeats,
            clock,
            args.order,
        )
        speed_up = times["scipy"] / times["cg"]
        print(
            f"{batch:>4} {n:>4} {m:>4} {n_steps:>3} {min(block, batch):>5} | {times['scipy'] * 1e3:>8.2f} ms "
            f"{times['cg'] * 1e3:>7.2f} ms | {speed_up:>7.1f}x {goal:>4.0f}x  {'yes' if speed_up >= goal else 'NO':<4} | "
            f"{times['torch'] * 1e3:>9.2f} ms {times['scipy'] / times['torch']:>7.1f}x | {early:.1e}, {last:.1e}"
        )

    print("\naccuracy of the iterates against a long-double CG (both schedules; the torch one is what autograd runs):")
    print("\n".join(accuracy_lines))


if __name__ == "__main__":
    main()
