"""Build and run 20-step constructions on B = 64 prompts with n = 64 support points (CPU, float64),
with the matching mi_krr.solvers call timed beside each for scale.

    .venv/bin/python benchmarks/bench_construct.py [--threads 2] [--repeats 3]

Prints, per construction: build time, forward time (plain forward, and a forward caching the
T + 1 step hooks, as `step_states` does), the solver's time (kernel matrices included), and the
forward / solver ratio. Times are the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.kernels import gaussian_kernel
from mi_krr.solvers import cg, feature_gd, richardson
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler

BATCH, N_SUPPORT, N_QUERY, DIM, STEPS = 64, 64, 16, 8, 20


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description="construction build / forward timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    linear = LinearRegressionSampler(DIM, noise_std=0.1).sample(BATCH, N_SUPPORT, N_QUERY, seed=0, dtype=torch.float64)
    gp = GPRegressionSampler(DIM, kernel="gaussian", bandwidth=1.0).sample(BATCH, N_SUPPORT, N_QUERY, seed=0, dtype=torch.float64)

    def cg_solver():
        K = linear.x_support @ linear.x_support.mT
        return cg(K, linear.y_support, 0.1, STEPS, K_query=linear.x_query @ linear.x_support.mT)

    def richardson_solver():
        K = gaussian_kernel(gp.x_support, bandwidth=1.0)
        K_query = gaussian_kernel(gp.x_query, gp.x_support, bandwidth=1.0)
        return richardson(K, gp.y_support, 0.1, STEPS, step=1.0, precond="rowsum", K_query=K_query)

    cases = {
        "cg (linear attn, 4 blocks/step)": (lambda: cg_transformer(STEPS, 0.1, dim=DIM), linear, cg_solver),
        "richardson (softmax, 3 blocks/step)": (lambda: richardson_transformer(STEPS, 0.1, 1.0, 1.0, dim=DIM), gp, richardson_solver),
        "gd (linear attn, 1 block/step)": (
            lambda: gd_transformer(STEPS, 0.01, lam=0.1, dim=DIM),
            linear,
            lambda: feature_gd(linear.x_support, linear.y_support, 0.1, STEPS, step=0.01, X_query=linear.x_query),
        ),
    }
    print(f"B={BATCH}, n={N_SUPPORT}, m={N_QUERY}, d={DIM}, T={STEPS}, float64, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'construction':38s} {'layers':>6s} {'build s':>8s} {'forward s':>9s} {'cached s':>8s} {'solver s':>8s} {'fwd/solver':>10s}")
    for name, (build, task, solver) in cases.items():
        build_s = best_time(build, args.repeats)
        model = build()
        tokens = model.encode(task).tokens
        with torch.no_grad():
            forward_s = best_time(lambda: model(tokens), args.repeats)
            cached_s = best_time(lambda: model.run_with_cache(tokens, names_filter=model.step_hook_names()), args.repeats)
        solver_s = best_time(solver, args.repeats)
        print(f"{name:38s} {model.n_layers:6d} {build_s:8.3f} {forward_s:9.3f} {cached_s:8.3f} {solver_s:8.4f} {forward_s / solver_s:10.1f}")


if __name__ == "__main__":
    main()
