"""Train the shipped checkpoints (checkpoints/softmax_gp, checkpoints/linear_lr) from the presets
in mi_krr.train.runs, and print each model's held-out error against the Bayes-optimal predictor.

    .venv/bin/python scripts/train_shipped_models.py                  # both, one after the other
    .venv/bin/python scripts/train_shipped_models.py --only linear_lr --threads 1
    .venv/bin/python scripts/train_shipped_models.py --resume         # continue interrupted runs

Each run trains into checkpoints/<name>/ (training states under state/ make an interrupted run
resumable with --resume); when it finishes, state/ is removed so the shipped folder holds only
config.json, model.safetensors and metrics.json (with the wall time) and stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from mi_krr.train import train
from mi_krr.train.checkpoint import METRICS_FILE, STATE_DIR
from mi_krr.train.runs import PRESETS, build_run, preset_config

REPO = Path(__file__).resolve().parents[1]


def train_preset(name: str, out_root: Path, resume: bool, steps: int | None) -> dict:
    description = preset_config(name)
    run_dir = out_root / name
    description["train"]["out_dir"] = str(run_dir)
    if steps is not None:
        description["train"]["steps"] = steps
    run = build_run(description)
    started = time.perf_counter()
    result = train(run.model, run.sampler, run.cfg, resume=resume, progress=True)
    wall = time.perf_counter() - started
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text())
    metrics["process_wall_time_s"] = wall  # this process only; final.elapsed_s spans resumes
    metrics["threads"] = torch.get_num_threads()
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)
    final = result.final_metrics
    summary = {
        "run": name,
        "steps": final["step"],
        "model_mse": final["model_mse"],
        "optimal_mse": final["optimal_mse"],
        "ratio": final["ratio"],
        "zero_mse": final["zero_mse"],
        "train_time_s": round(final["elapsed_s"], 1),
    }
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PRESETS), action="append", help="train only this preset (repeatable)")
    parser.add_argument("--out-root", default="checkpoints", help="folder holding one run folder per preset, relative to the repository")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=None, help="override the presets' step count (for trials)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their newest checkpoint")
    args = parser.parse_args()
    os.chdir(REPO)  # run configs record repository-relative folders, not this machine's paths
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.only or sorted(PRESETS):
        train_preset(name, Path(args.out_root), args.resume, args.steps)


if __name__ == "__main__":
    main()
