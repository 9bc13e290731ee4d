"""What diagnose's two analysis stages cost, each A/B in one process on the shipped models
(`bench_probes.load`; `--scale` adds its freshly initialised 12-layer, width-256, 8-head model):

- kernel alignment (`probes.kernel_alignment`, query block, exp and Gaussian kernels) with
  `probes.kernel_scale_fit.CHUNK_VALUES` = 2^16 .. 2^19 numbers per chunk of prompts (the shipped value is 2^18);
- the cross-fitted step sizes of diagnose's four fitted algorithms, one algorithm at a time
  (`cross_fit_step` each) against all together (`cross_fit_steps`, the lockstep diagnose runs),
  with the fitted steps of both checked equal, and as diagnose fits them (`fit_global_steps`: the
  same lockstep, where the Jacobi preconditioner is one scalar richardson_jacobi taking gd's fit
  rescaled; steps checked equal to 1e-5); and how much arithmetic the fit does: the (prompt,
  candidate) trajectories it scores and the multiply-adds of their closed-form predictions.

Variants alternate within each repeat; medians. Run: .venv/bin/python benchmarks/bench_analysis.py
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch

from bench_probes import MODELS, SCALED, load
from timing import median_ms


def kernel_alignment_chunks(model, task, repeats: int) -> dict[str, float]:
    from probes.attention_kernels import AttentionKernels
    from probes.diagnose import ALIGNMENT_BLOCK
    from probes.kernel_alignment import kernel_alignment
    from probes.streaming import stream_probes

    module = importlib.import_module("probes.kernel_scale_fit")  # its chunks serve the fit and the metrics
    shipped = module.CHUNK_VALUES
    streamed = stream_probes(model, model.encode(task), layers=[], blocks=(ALIGNMENT_BLOCK,))
    attention = AttentionKernels.from_stream(streamed)

    def with_chunk(values: int):
        def run():
            module.CHUNK_VALUES = values
            kernel_alignment(model, task, block=ALIGNMENT_BLOCK, attention=attention)

        return run

    try:
        return median_ms({f"2^{power}": with_chunk(2**power) for power in (16, 17, 18, 19)}, repeats)
    finally:
        module.CHUNK_VALUES = shipped


def step_fits(model, task, repeats: int) -> dict[str, float]:
    from mi_krr.kernels import kernel_matrix
    from probes.diagnose import DEFAULT_ALGORITHMS, default_n_steps, resolve_kernel, resolve_lam
    from probes.spectral_trajectories import FITTED_STEP_ALGORITHMS, spectral_systems
    from probes.step_sizes import cross_fit_step, cross_fit_steps, fit_global_steps
    from probes.streaming import resolve_layers, stream_probes

    kernel, params = resolve_kernel(task, "auto", None)
    x, xq, y = task.x_support.double(), task.x_query.double(), task.y_support.double()
    K, K_query = kernel_matrix(kernel, x, **params), kernel_matrix(kernel, xq, x, **params)
    lam, n_steps = resolve_lam(task, None), default_n_steps(model.n_layers)
    layers = resolve_layers(model, None)
    layer_pred = stream_probes(model, model.encode(task), layers=layers).readouts.double().numpy()
    scored = np.flatnonzero(np.asarray(layers) > 0)
    names = [name for name in DEFAULT_ALGORITHMS if name in FITTED_STEP_ALGORITHMS]
    # as diagnose does: algorithms whose preconditioner does not apply (row sums on the linear kernel) are left out
    systems, _ = spectral_systems(names, K, y, lam, K_query)

    def one_at_a_time():
        return {name: cross_fit_step(name, K, y, lam, n_steps, K_query, layer_pred, scored, 0, spectral) for name, spectral in systems.items()}

    def together():
        return cross_fit_steps(systems, n_steps, layer_pred, scored, 0)

    def as_diagnose():
        return fit_global_steps(names, K, y, lam, K_query, n_steps, layer_pred, scored, 0)[0]

    alone, joint, diagnosed = one_at_a_time(), together(), as_diagnose()
    for name in systems:
        if not np.array_equal(alone[name].step, joint[name].step):
            raise AssertionError(f"{name}: steps fitted together {joint[name].step} differ from alone {alone[name].step}")
        if not np.allclose(diagnosed[name].step, alone[name].step, rtol=1e-5, atol=0):  # the Jacobi shortcut: to the search's tolerance
            raise AssertionError(f"{name}: steps fitted as diagnose does {diagnosed[name].step} differ from alone {alone[name].step}")
    times = median_ms({"one at a time": one_at_a_time, "together": together, "as diagnose": as_diagnose}, repeats)
    times["prompt-candidates"] = count_scored_candidates(together)
    times["prompt-candidates as diagnose"] = count_scored_candidates(as_diagnose)
    n_query, n_support = K_query.shape[1:]
    times["multiply-adds"] = times["prompt-candidates"] * n_steps * n_query * n_support  # pred_t = gain s_t, t = 1..T
    return times


def count_scored_candidates(fit) -> int:
    """(prompt, candidate) trajectories one call of `fit` scores (through `probes.step_sizes.path_scores`)."""
    module = importlib.import_module("probes.step_sizes")
    scored, original = [0], module.path_scores

    def counting(layer_pred, candidate_pred, *args, **kwargs):
        scored[0] += candidate_pred.shape[0] * candidate_pred.shape[1]
        return original(layer_pred, candidate_pred, *args, **kwargs)

    module.path_scores = counting
    try:
        fit()
    finally:
        module.path_scores = original
    return scored[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", action="store_true", help=f"also the freshly initialised {', '.join(SCALED)} (slow)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in MODELS + (tuple(SCALED) if args.scale else ()):
        model, task, source = load(name, args.batch)
        print(f"== {name}: {source}; batch {task.batch_size}", flush=True)
        if name != "linear_lr":  # linear attention has no softmax pattern to align
            chunks = kernel_alignment_chunks(model, task, args.repeats)
            print("  kernel alignment by CHUNK_VALUES: " + ", ".join(f"{key} {ms:.0f} ms" for key, ms in chunks.items()), flush=True)
        fits = step_fits(model, task, args.repeats)
        print(f"  step fits (same steps): one at a time {fits['one at a time']:.0f} ms, together {fits['together']:.0f} ms "
              f"({1 - fits['together'] / fits['one at a time']:.0%} less); as diagnose fits them (together, a scalar Jacobi "
              f"preconditioner taking gd's fit; its eigendecompositions included) {fits['as diagnose']:.0f} ms, {fits['prompt-candidates as diagnose']} "
              "(prompt, candidate) trajectories", flush=True)
        rate = 2 * fits["multiply-adds"] / (fits["together"] * 1e-3) / 1e9
        print(f"  the fit together scores {fits['prompt-candidates']} (prompt, candidate) trajectories in closed form: "
              f"{fits['multiply-adds'] / 1e9:.2f} G multiply-adds for the predictions alone, {rate:.1f} GFLOP/s over the whole fit", flush=True)


if __name__ == "__main__":
    main()
