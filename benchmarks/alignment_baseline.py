"""The kernel distance's baseline: the shipped softmax model against freshly initialised models of
its architecture, on the same prompts.

    .venv/bin/python benchmarks/alignment_baseline.py [--seeds 4] [--batch 128]

For checkpoints/softmax_gp and `seeds` random initialisations of its preset (train.seed 0, 1,
...), `probes.kernel_alignment` on `batch` in-distribution prompts (seed 1): per reference
kernel, the best head's relative operator distance per block (mean over blocks), how many blocks'
best heads are uniform (`u`: every head's fitted reference is mean pooling to within 5%), and the
best heads' row Spearman correlation with the kernel (does the head rank keys as the kernel
does?). A random head is nearly flat, so it is close to a nearly flat reference: its distance
alone looks kernel-like; the `u` mark and the row Spearman say it is not.
"""

from __future__ import annotations

import argparse

import numpy as np

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.tasks import sampler_from_config
from mi_krr.train import load_model, read_run_config
from mi_krr.train.runs import build_run, preset_config
from probes.kernel_alignment import kernel_alignment


def describe(label: str, model, task) -> None:
    alignment = kernel_alignment(model, task)
    parts = []
    for kernel in ("exp", "gaussian"):
        head, distance = alignment.best_heads(kernel)
        uniform = alignment.uniform_best_heads(kernel)
        spearman = alignment.metrics[kernel]["row_spearman"].double().numpy()[np.arange(len(head)), head]
        parts.append(f"{kernel} {np.nanmean(distance):.3f} ({int(uniform.sum())}/{len(head)} blocks u, row Spearman {np.nanmean(spearman):.2f})")
    print(f"  {label:28s} " + "; ".join(parts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    run = shipped_checkpoint("softmax_gp")
    config = read_run_config(run)
    sampler = sampler_from_config(config["sampler"])
    task = sampler.sample(args.batch, config["train"]["n_support"], config["train"]["n_query"], seed=1)
    print(f"== softmax_gp architecture, {args.batch} in-distribution prompts: best head per block, mean over blocks")
    describe("trained (checkpoints/softmax_gp)", load_model(run).eval(), task)
    for seed in range(args.seeds):
        description = preset_config("softmax_gp")
        description["train"]["seed"] = seed  # build_run initialises the model from train.seed
        describe(f"random init, seed {seed}", build_run(description).model.eval(), task)


if __name__ == "__main__":
    main()
