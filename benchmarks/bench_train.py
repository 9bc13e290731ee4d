"""Cost of one training step relative to a plain forward pass, for the shipped models.

For each shipped run, on a batch of its own training prompts (batch size, final prompt length):
  forward:  model.predict(task) under torch.no_grad()
  step:     the trainer's full step (batch draw, forward, MSE, backward, clipping, AdamW update)
Both measured in the same process, interleaved, median of repeats; prints the ratio step/forward.

    .venv/bin/python benchmarks/bench_train.py [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mi_krr.train import TrainConfig, load_model
from mi_krr.train.loop import training_step, make_optimizer, training_batch
from mi_krr.train.runs import PRESETS, preset_config

REPO = Path(__file__).resolve().parents[1]


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench(name: str, repeats: int) -> dict[str, float]:
    description = preset_config(name)
    run_dir = REPO / "checkpoints" / name
    from mi_krr.tasks.samplers import sampler_from_config

    model = load_model(run_dir) if (run_dir / "model.safetensors").is_file() else _fresh_model(description)
    model.train()
    sampler = sampler_from_config(description["sampler"])
    cfg = TrainConfig.from_dict({**description["train"], "curriculum_steps": 0, "n_support_start": None})
    optimizer = make_optimizer(model, cfg)
    task = training_batch(sampler, cfg, step=0)

    def forward() -> None:
        with torch.no_grad():
            model.predict(task)

    def step() -> None:
        training_step(model, optimizer, sampler, cfg, cfg.steps - 1)

    for _ in range(3):  # warm-up
        forward()
        step()
    forward_times, step_times = [], []
    for _ in range(repeats):
        forward_times.append(_seconds(forward))
        step_times.append(_seconds(step))
    forward_s, step_s = statistics.median(forward_times), statistics.median(step_times)
    return {"forward_ms": 1e3 * forward_s, "step_ms": 1e3 * step_s, "ratio": step_s / forward_s}


def _fresh_model(description: dict) -> torch.nn.Module:
    from mi_krr.models import model_from_config

    return model_from_config(description["model"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}")
    print(f"{'run':<12} {'forward ms':>11} {'train step ms':>14} {'step/forward':>13}")
    for name in sorted(PRESETS):
        result = bench(name, args.repeats)
        print(f"{name:<12} {result['forward_ms']:>11.2f} {result['step_ms']:>14.2f} {result['ratio']:>13.2f}")


if __name__ == "__main__":
    main()
