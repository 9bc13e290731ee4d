"""What probing costs, side by side in one run on the shipped models (checkpoints/softmax_gp,
checkpoints/linear_lr; freshly initialised models of the same presets when a checkpoint is
missing, said in the output).

    .venv/bin/python benchmarks/bench_probes.py [--batch 256] [--repeats 5] [--full]

Time (median of `repeats`, the variants alternated so machine load hits them alike):
- baseline: a bare forward (`model.predict`) + the reference trajectories (kernel matrices and
  every default algorithm for `default_n_steps(L)` steps): the least any diagnosis must do;
- extraction: the one streaming pass diagnose reads the model through
  (`probes.streaming.stream_probes`: per-layer read-outs at the queries + every layer's
  attention query block, reduced inside the hooks of ONE forward), + the same trajectories;
  goal <= 1.3x baseline;
- diagnose (default): `diagnose(model, task, progress=False)` as a user calls it: the streaming
  pass, every default algorithm (cross-fitted global steps for GD / Richardson / heavy ball:
  grid + refinement, every candidate in closed form from one eigendecomposition per prompt),
  kernel alignment of every layer and head with the exp and Gaussian kernels, scores with 1000
  bootstrap resamples, the verdict; goal <= 1.3x baseline;
- diagnose (lean): the same with `kernels=(), step_sizes="optimal"` (registry step sizes, no
  kernel alignment);
- diagnose (+ sensitivities, `--full`): the default plus the opt-in label sensitivities.

`--scale` adds a freshly initialised model of softmax_gp's architecture at Garg et al.'s size (12
layers, width 256, 8 heads; 40 support points): diagnose's own work grows with layers, heads and
prompts but not with the width, so its ratio to the forward depends on the model's size.

Memory, two measures of the same three calls (same model and prompts): bare forward, the
extraction path (without trajectories, which are float64 solver work independent of the model),
and `run_with_cache` of every hook; goal for extraction <= 1.2x the bare forward.
- torch peak: the most bytes torch held allocated at once during the call, from the profiler's
  allocation records (`profile_memory=True`; every allocation and free, in order): exact and
  repeatable;
- RSS growth: peak resident-set growth over the resident set just before the call, each variant
  in a fresh subprocess (peak reset through /proc/self/clear_refs, read from VmHWM): what the OS
  sees, allocator caching and page reuse included, so it varies by +-15% between runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("softmax_gp", "linear_lr")
SCALED = {"softmax_gp_12x256": ("softmax_gp", {"d_model": 256, "n_layers": 12, "n_heads": 8}, 40)}
"""`--scale` models: (preset, model changes, support points), freshly initialised: softmax_gp's
architecture and task at the size of Garg et al.'s GPT-2 (12 layers, width 256, 8 heads) with 40
support points, to show how the ratios move when the forward costs what a research model's does."""


def load(name: str, batch: int, seed: int = 1):
    """(model, task, source) for a shipped preset or a `SCALED` model."""
    from mi_krr.tasks.samplers import sampler_from_config
    from mi_krr.train.checkpoint import load_model
    from mi_krr.train.runs import build_run, preset_config

    preset, changes, n_support = SCALED.get(name, (name, None, None))
    description = preset_config(preset)
    train = description["train"]
    if changes is not None:
        description["model"].update(changes)
        model, source = build_run(description).model, "FRESHLY INITIALISED (a scaled-up architecture: timing only)"
    else:
        folder = ROOT / "checkpoints" / name
        try:
            model, source = load_model(folder), f"checkpoint {folder.relative_to(ROOT)}"
        except (FileNotFoundError, OSError, ValueError) as error:
            torch.manual_seed(0)
            model = build_run(description).model
            source = f"FRESHLY INITIALISED (no usable checkpoint: {type(error).__name__})"
    model.eval()
    task = sampler_from_config(description["sampler"]).sample(batch, n_support or train["n_support"], train["n_query"], seed=seed)
    return model, task, source


def trajectories(task, lam: float, n_steps: int) -> None:
    """Kernel matrices and every default algorithm's trajectory (what any diagnosis needs)."""
    from mi_krr.kernels import kernel_matrix
    from mi_krr.solvers import ALGORITHMS
    from probes.diagnose import DEFAULT_ALGORITHMS, resolve_kernel

    kernel, params = resolve_kernel(task, "auto", None)
    x, xq, y = task.x_support.double(), task.x_query.double(), task.y_support.double()
    K, K_query = kernel_matrix(kernel, x, **params), kernel_matrix(kernel, xq, x, **params)
    for name in DEFAULT_ALGORITHMS:
        try:
            ALGORITHMS[name](K, y, lam, n_steps, K_query=K_query)
        except ValueError:  # the row-sum preconditioner on the linear kernel: left out, as diagnose does
            pass


def variants(model, task):
    """name -> zero-argument callable."""
    from probes.diagnose import ALIGNMENT_BLOCK, default_n_steps, diagnose, resolve_lam
    from probes.streaming import resolve_layers, stream_probes

    lam, n_steps = resolve_lam(task, None), default_n_steps(model.n_layers)

    def forward():
        with torch.no_grad():
            model.predict(task)

    def extraction_only():
        stream_probes(model, model.encode(task), layers=resolve_layers(model, None), blocks=(ALIGNMENT_BLOCK,))

    def cache():
        with torch.no_grad():
            model.run_with_cache(model.encode(task).tokens)

    return {
        "baseline": lambda: (forward(), trajectories(task, lam, n_steps)),
        "extraction": lambda: (extraction_only(), trajectories(task, lam, n_steps)),
        "diagnose": lambda: diagnose(model, task, bootstrap=1000, progress=False),
        "diagnose_lean": lambda: diagnose(model, task, kernels=(), bootstrap=1000, progress=False, step_sizes="optimal"),
        "diagnose_sensitivities": lambda: diagnose(model, task, sensitivities=True, bootstrap=1000, progress=False),
        "forward": forward,
        "extraction_only": extraction_only,
        "cache": cache,
    }


def time_variants(model, task, repeats: int, full: bool) -> dict[str, list[float]]:
    """Seconds of every repeat per variant (variants alternated within each repeat)."""
    timed = ("baseline", "extraction", "diagnose", "diagnose_lean") + (("diagnose_sensitivities",) if full else ())
    runs = {name: run for name, run in variants(model, task).items() if name in timed}
    for run in runs.values():
        run()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def torch_peak_mb(run) -> float:
    """The most MiB torch held allocated at once during `run()`: the profiler's per-op net
    allocations (allocations minus frees inside each op, and allocations / frees outside ops)
    summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((event for event in prof.events() if event.self_cpu_memory_usage), key=lambda event: event.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (e.g. VmRSS, VmHWM); also used by bench_scale.py."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(name: str, variant: str, batch: int) -> None:
    """Child process: print the peak RSS growth (MB) of one call of `variant`."""
    torch.set_num_threads(2)
    model, task, _ = load(name, batch)
    run = variants(model, task)[variant]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    run()
    print(json.dumps({"growth_mb": (status_kb("VmHWM") - before) / 1024}))


def memory_in_subprocess(name: str, variant: str, batch: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, variant, "--batch", str(batch)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["growth_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-batch", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="also time diagnose with the opt-in label sensitivities (slow)")
    parser.add_argument("--scale", action="store_true", help=f"also time the scaled-up, freshly initialised {', '.join(SCALED)} (slow)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"))
    args = parser.parse_args()
    if args.memory_child:
        measure_memory(*args.memory_child, args.batch)
        return
    torch.set_num_threads(2)
    for name in MODELS + (tuple(SCALED) if args.scale else ()):
        model, task, source = load(name, args.batch)
        print(f"== {name}: {source}; {model.n_layers} layers, batch {task.batch_size}, "
              f"{task.n_support} support + {task.n_query} query points", flush=True)
        seconds = time_variants(model, task, args.repeats, args.full)
        base = statistics.median(seconds["baseline"])
        for key, values in seconds.items():
            ratios = [value / reference for value, reference in zip(values, seconds["baseline"])]  # same repeat
            print(f"  time {key:<16} median {statistics.median(values) * 1e3:9.1f} ms   {statistics.median(values) / base:6.2f}x "
                  f"baseline (per-repeat ratios {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
        stages = next(iter(variants(model, task)["diagnose"]().task_sets.values())).seconds
        print("  default diagnose by stage (one more call): " + ", ".join(f"{stage} {value * 1e3:.0f} ms" for stage, value in stages.items()), flush=True)
        memory_model, memory_task, _ = load(name, args.memory_batch)
        calls = variants(memory_model, memory_task)
        peaks = {v: torch_peak_mb(calls[v]) for v in ("forward", "extraction_only", "cache")}
        print(f"  torch peak allocated (batch {args.memory_batch}): " + ", ".join(f"{v} {mb:.1f} MiB" for v, mb in peaks.items()))
        print(f"  memory ratio (torch peak) extraction / forward {peaks['extraction_only'] / peaks['forward']:.2f}x (goal <= 1.2x); "
              f"run_with_cache / forward {peaks['cache'] / peaks['forward']:.2f}x", flush=True)
        growth = {v: memory_in_subprocess(name, v, args.memory_batch) for v in ("forward", "extraction_only", "cache")}
        print(f"  peak RSS growth (batch {args.memory_batch}, fresh process each): "
              + ", ".join(f"{v} {mb:.1f} MB" for v, mb in growth.items()))
        print(f"  memory ratio (RSS) extraction / forward {growth['extraction_only'] / growth['forward']:.2f}x (goal <= 1.2x); "
              f"run_with_cache / forward {growth['cache'] / growth['forward']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
