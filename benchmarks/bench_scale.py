"""What the probes cost beyond the shipped toy models: time and peak memory of one call each, on a
freshly initialised 12-layer, width-256, 8-head softmax model and on Gaussian KRR systems.

    .venv/bin/python benchmarks/bench_scale.py [--only NAME ...]

Every call runs in a fresh process; it reports wall time and peak resident-set growth over the
resident set just before the call (peak reset through /proc/self/clear_refs, read from VmHWM),
so allocator caching is included (+-15% between runs). The calls use only arguments that
session 18's code already had, so the same script run against an older checkout
(`git worktree add /tmp/old <commit>; PYTHONPATH=/tmp/old .venv/bin/python
benchmarks/bench_scale.py`) measures the code before a change side by side; calls that need a
newer argument say so and are skipped there.

- forward: a bare forward (`model.predict`) of 8 prompts, 128 support + 8 query points;
- lens: the read-out lens of every layer (`probes.layer_predictions`) on the same prompts;
- label_sensitivities, ..._per_prompt: `probes.label_sensitivities` of layers 1 and 12 on the
  same prompts in one pass, and one prompt per pass (`prompts_per_pass=1`);
- kernel_alignment: `probes.kernel_alignment(kernels=("gaussian",))` of the query block on 8
  prompts of 256 support points;
- solver_gd, solver_newton: `probes.solver_sensitivities` of GD and Newton-Schulz on 8 Gaussian
  systems of n = 128 (m = 16 queries, 24 steps);
- diagnose: default `probes.diagnose` on 32 prompts of 256 support points.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bench_probes import status_kb

ROOT = Path(__file__).resolve().parents[1]
CALLS = ("forward", "lens", "label_sensitivities", "label_sensitivities_per_prompt", "kernel_alignment", "solver_gd", "solver_newton", "diagnose")


def model_and_task(batch: int, n_support: int, n_query: int = 8):
    """A freshly initialised 12-layer, width-256, 8-head `ICLTransformer` (seed 0) and GP prompts."""
    from mi_krr.models import ICLTransformer, ICLTransformerConfig
    from mi_krr.tasks import GPRegressionSampler

    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=256, n_layers=12, n_heads=8)).eval()
    return model, GPRegressionSampler(dim=3, noise_std=0.2).sample(batch, n_support, n_query, seed=1)


def kernel_systems(batch: int = 8, n: int = 128, m: int = 16):
    from mi_krr.kernels import gaussian_kernel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, 2, dtype=torch.float64, generator=generator)
    queries = torch.randn(batch, m, 2, dtype=torch.float64, generator=generator)
    return gaussian_kernel(x), gaussian_kernel(queries, x)


def call(name: str) -> Callable[[], object] | str:
    """The zero-argument call `name` (its inputs built first), or why this checkout cannot run it."""
    import probes

    if name in ("forward", "lens", "label_sensitivities", "label_sensitivities_per_prompt"):
        model, task = model_and_task(8, 128)
        if name == "forward":
            return lambda: torch.no_grad()(model.predict)(task)
        if name == "lens":
            return lambda: probes.layer_predictions(model, task)
        if name == "label_sensitivities":
            return lambda: probes.label_sensitivities(model, task, layers=[1, 12])
        if "prompts_per_pass" not in inspect.signature(probes.label_sensitivities).parameters:
            return "label_sensitivities has no prompts_per_pass in this checkout"
        return lambda: probes.label_sensitivities(model, task, layers=[1, 12], prompts_per_pass=1)
    if name == "kernel_alignment":
        model, task = model_and_task(8, 256)
        return lambda: probes.kernel_alignment(model, task, kernels=("gaussian",))
    if name in ("solver_gd", "solver_newton"):
        K, K_query = kernel_systems()
        return lambda: probes.solver_sensitivities(name.removeprefix("solver_"), K, K_query, 0.1, 24)
    model, task = model_and_task(32, 256)
    return lambda: probes.diagnose(model, task, progress=False)


def measure(name: str) -> dict:
    """Child process: time and peak RSS growth of one call of `name`."""
    torch.set_num_threads(2)
    run = call(name)
    if isinstance(run, str):
        return {"skipped": run}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    start = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - start, "growth_mb": (status_kb("VmHWM") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CALLS, default=list(CALLS))
    parser.add_argument("--child", choices=CALLS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    import probes

    print(f"probes from {Path(probes.__file__).parent}; torch {torch.__version__}, 2 threads", flush=True)
    for name in args.only:
        out = subprocess.run([sys.executable, __file__, "--child", name], check=True, capture_output=True, text=True, cwd=ROOT).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if "skipped" in result:
            print(f"  {name:<32} skipped: {result['skipped']}", flush=True)
        else:
            print(f"  {name:<32} {result['seconds']:8.2f} s   peak RSS growth {result['growth_mb']:8.1f} MB", flush=True)


if __name__ == "__main__":
    main()
