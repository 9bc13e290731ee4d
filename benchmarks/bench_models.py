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
def time_cache_overhead(model, task: ICLTask, repeats: int = 15) -> CacheOverhead:
    """Alternate plain forward and `run_with_cache` (all hooks) on the encoded task."""
    model.eval()
    prompt = model.encode(task)

    def plain() -> None:
        model(prompt.tokens, n_support=prompt.n_support)

    def cached() -> None:
        model.run_with_cache(prompt.tokens, n_support=prompt.n_support)

    for run in (plain, cached):  # warm-up
        run()
    timings: dict[str, list[float]] = {"plain": [], "cached": []}
    for _ in range(repeats):
        for name, run in (("plain", plain), ("cached", cached)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    return CacheOverhead(statistics.median(timings["plain"]), statistics.median(timings["cached"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--garg", nargs="*", default=[], help="Garg-format run folders to time as well")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=8, d_model=128, n_layers=4, n_heads=4, layout="concat", max_seq_len=128)
    models = [("ICLTransformer 4x128 softmax", ICLTransformer(cfg)), ("BridgeICLModel 4x128", BridgeICLModel(cfg))]
    models += [(f"Garg {path}", load_garg_checkpoint(path)) for path in args.garg]
    print(f"{'model':40s} {'forward ms':>11s} {'cache ms':>9s} {'cache/forward':>14s}")
    for name, model in models:
        n_support = 72 if model.layout == "concat" else 39
        result = time_cache_overhead(model, make_task(model.n_dims, n_support, 8), args.repeats)
        print(f"{name:40s} {1e3 * result.forward_s:11.1f} {1e3 * result.cache_s:9.1f} {result.ratio:14.2f}")


if __name__ == "__main__":
    main()
