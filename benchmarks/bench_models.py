"""How much a full activation cache costs: `run_with_cache` (every hook) relative to a plain
forward, measured side by side (alternating, median of repeats) on 2 threads.

    .venv/bin/python benchmarks/bench_models.py [--garg RUN_FOLDER ...] [--repeats 15]

Built-in models: a 4-layer d_model=128 ICLTransformer and the same architecture as a
BridgeICLModel (concat layout, batch 64, 72 support + 8 query tokens). Any model implementing
`ICLModel` can be timed with `time_cache_overhead`; `--garg` adds Garg-format checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, load_garg_checkpoint
from mi_krr.tasks import ICLTask


@dataclass
class CacheOverhead:
    """Median seconds of one forward and one full-cache run, and their ratio."""

    forward_s: float
    cache_s: float

    @property
    def ratio(self) -> float:
        return self.cache_s / self.forward_s


def make_task(n_dims: int, n_support: int, n_query: int, batch: int = 64, seed: int = 0) -> ICLTask:
    g = torch.Generator().manual_seed(seed)
    return ICLTask(torch.randn(batch, n_support, n_dims, generator=g), torch.randn(batch, n_support, generator=g),
                   torch.randn(batch, n_query, n_dims, generator=g), torch.randn(batch, n_query, generator=g))


@torch.no_grad()
def time_cache_overhead(models: dict[str, object], tasks: dict[str, ICLTask], repeats: int = 15) -> dict[str, CacheOverhead]:
    """Time a plain forward and `run_with_cache` (all hooks) of every model, round-robin over
    models and modes within each repeat, so a change in machine load hits all of them alike."""
    runs = []
    for name, model in models.items():
        model.eval()
        prompt = model.encode(tasks[name])
        runs.append((name, "plain", lambda m=model, p=prompt: m(p.tokens, n_support=p.n_support)))
        runs.append((name, "cached", lambda m=model, p=prompt: m.run_with_cache(p.tokens, n_support=p.n_support)))
    timings: dict[tuple[str, str], list[float]] = {(name, mode): [] for name, mode, _ in runs}
    for _, _, run in runs:  # warm-up
        run()
    for _ in range(repeats):
        for name, mode, run in runs:
            start = time.perf_counter()
            run()
            timings[name, mode].append(time.perf_counter() - start)
    return {
        name: CacheOverhead(statistics.median(timings[name, "plain"]), statistics.median(timings[name, "cached"]))
        for name in models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--garg", nargs="*", default=[], help="Garg-format run folders to time as well")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=8, d_model=128, n_layers=4, n_heads=4, layout="concat", max_seq_len=128)
    models = {"ICLTransformer 4x128 softmax": ICLTransformer(cfg), "BridgeICLModel 4x128": BridgeICLModel(cfg)}
    models.update({f"Garg {path}": load_garg_checkpoint(path) for path in args.garg})
    tasks = {name: make_task(model.n_dims, 72 if model.layout == "concat" else 39, 8) for name, model in models.items()}
    results = time_cache_overhead(models, tasks, args.repeats)
    baseline = results["ICLTransformer 4x128 softmax"].forward_s
    print(f"{'model':40s} {'forward ms':>11s} {'cache ms':>9s} {'cache/forward':>14s} {'forward/ICLTransformer':>22s}")
    for name, result in results.items():
        print(f"{name:40s} {1e3 * result.forward_s:11.1f} {1e3 * result.cache_s:9.1f} {result.ratio:14.2f} {result.forward_s / baseline:22.2f}")


if __name__ == "__main__":
    main()
