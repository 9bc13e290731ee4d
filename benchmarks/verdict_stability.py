"""How much a shipped model's verdict depends on the draw of prompts: the default `diagnose` on
independent prompt draws of the same size, side by side.

    .venv/bin/python benchmarks/verdict_stability.py [--draws 8] [--batches 64 256]

For each shipped model (checkpoints/softmax_gp, checkpoints/linear_lr) and batch size, `draws`
independent draws (prompt seeds 100, 101, ...; bootstrap seed = draw index) of in-distribution
prompts, each diagnosed with the defaults a user gets (every candidate, fitted global steps,
1000 bootstrap resamples; kernel alignment left out: the verdict does not read it). Prints, per
draw, the best algorithm, its path R2 and interval, the verdict, and heavy ball's cross-fitted
(step, momentum) on each half; then how often each verdict came out and how far the draws'
intervals lie apart. Intervals of one model that do not overlap between draws of the same size
mean the interval leaves out part of the uncertainty (the fitted steps' own: they are fitted
once, not per resample).
"""

from __future__ import annotations

import argparse
import collections
import warnings

import probes
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.tasks import sampler_from_config
from mi_krr.train import load_model, read_run_config

MODELS = ("linear_lr", "softmax_gp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    for name in MODELS:
        run = shipped_checkpoint(name)
        model, sampler = load_model(run), sampler_from_config(read_run_config(run)["sampler"])
        train = read_run_config(run)["train"]
        for batch in args.batches:
            print(f"== {name}: {args.draws} draws of {batch} prompts ({train['n_support']} support, {train['n_query']} query points)", flush=True)
            verdicts, intervals = collections.Counter(), []
            for draw in range(args.draws):
                task = sampler.sample(batch, n_support=train["n_support"], n_query=train["n_query"], seed=100 + draw)
                result = probes.diagnose(model, task, kernels=(), seed=draw, progress=False)["tasks"]
                verdict, fit = result.verdict, result.fitted_steps.get("heavy_ball")
                low, high = verdict.score_ci
                intervals.append((low, high))
                outcome = f"identified as {verdict.best}" if verdict.identified else f"not identified (best {verdict.best})"
                verdicts[outcome] += 1
                halves = "" if fit is None else "; heavy ball halves: " + ", ".join(
                    f"({step:.3g}, {momentum:.3f})" for step, momentum in zip(fit.step, fit.momentum))
                print(f"  draw {draw}: {verdict.best:18s} {verdict.score:.4f} [{low:.4f}, {high:.4f}]  {outcome}{halves}", flush=True)
            apart = max(low for low, _ in intervals) - min(high for _, high in intervals)
            print(f"  verdicts: {dict(verdicts)}; highest lower bound - lowest upper bound: {apart:+.4f} "
                  f"({'some intervals do not overlap' if apart > 0 else 'all intervals overlap'})", flush=True)


if __name__ == "__main__":
    main()
