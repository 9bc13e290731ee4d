"""`mi-krr train`: train a preset or a run config, with checkpoints and exact resume.

    mi-krr train --preset softmax_gp --out runs/gp
    mi-krr train --resume --out runs/gp                 # continue an interrupted run
    mi-krr train --config my_run.yaml --steps 2000 --out runs/mine
    mi-krr train --preset linear_lr --steps 20 --warmup-steps 2 --curriculum-steps 0 --out runs/short

`--out`, `--seed` and `--device` are the command line's common options (mi_krr.cli adds them);
--out defaults to the config's train.out_dir, else runs/train. With --resume the run's own
config.json is used (from --config RUN, else --out, else runs/train) and only --device may change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_OUT = "runs/train"
"""The run folder when neither --out nor the config's train.out_dir names one."""

# TrainConfig fields a flag may override, with their types.
_OVERRIDES: dict[str, type] = {
    "steps": int,
    "warmup_steps": int,
    "curriculum_steps": int,
    "batch_size": int,
    "lr": float,
    "n_support": int,
    "eval_every": int,
    "checkpoint_every": int,
}


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `train` subcommand on `subparsers` (from `parser.add_subparsers()`); its
    handler is `run_train`, stored as the parser's `handler` default."""
    parser = subparsers.add_parser(
        "train",
        help="train an in-context regression transformer (checkpoints, exact resume)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a shipped run: softmax_gp or linear_lr")
    source.add_argument("--config", help="JSON/YAML file (or run folder) with model, sampler and train sections")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--until-step", type=int, default=None, help="stop after this many steps (resumable)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for name, kind in _OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override train.{name}")
    parser.set_defaults(handler=run_train)
    return parser


def run_description(args: argparse.Namespace) -> dict[str, Any]:
    """The run description `args` select, with flag overrides applied.

    Fresh run: --preset or --config, then the override flags, --seed, --device and --out.
    --resume: the config of --config (a run folder, or a config file), else of the run in --out,
    else in runs/train; the run continues in --out, else in the --config run folder, else in the
    config's train.out_dir, else in runs/train. Only --device is applied.
    """
    from mi_krr.train.runs import preset_config, read_run_config

    out, seed, device = getattr(args, "out", None), getattr(args, "seed", None), getattr(args, "device", None)
    if args.resume:
        if args.preset:
            raise ValueError("--resume continues the run in --out with its own config.json: drop --preset")
        overridden = [name for name in (*_OVERRIDES, "seed") if getattr(args, name, None) is not None]
        if overridden:
            raise ValueError(f"--resume keeps the run's own settings: drop --{overridden[0].replace('_', '-')}")
        source = Path(args.config or out or DEFAULT_OUT)
        description = read_run_config(source)
        if out is not None or source.is_dir():  # else: the config file's own train.out_dir
            description["train"]["out_dir"] = out if out is not None else str(source)
    else:
        if not (args.preset or args.config):
            raise ValueError("say what to train: pass --preset softmax_gp|linear_lr or --config FILE")
        description = preset_config(args.preset) if args.preset else read_run_config(args.config)
        train = description["train"]
        for name in _OVERRIDES:
            value = getattr(args, name)
            if value is not None:
                train[name] = value
        _check_phases_fit(train)
        if seed is not None:
            train["seed"] = seed
        if out is not None:
            train["out_dir"] = out
    if device is not None:
        description["train"]["device"] = device
    if description["train"].get("out_dir") is None:
        description["train"]["out_dir"] = DEFAULT_OUT
    return description


def _check_phases_fit(train: dict[str, Any]) -> None:
    """ValueError naming the flag to pass where the warm-up or the curriculum of the `train`
    section (after the flags) is longer than its `steps`, as a shortening --steps leaves it."""
    from mi_krr.train.config import TrainConfig

    steps = train.get("steps", TrainConfig.steps)
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"train.steps must be >= 1, got {steps}: pass --steps N with N >= 1")
    for phase in ("warmup_steps", "curriculum_steps"):
        length = train.get(phase, getattr(TrainConfig, phase))
        if isinstance(length, int) and isinstance(steps, int) and length > steps:  # other types: TrainConfig names them
            raise ValueError(f"train.{phase}={length} is longer than the run's {steps} steps: pass --{phase.replace('_', '-')} N with "
                             f"N <= {steps} (--until-step stops a run early without shortening its schedule)")


def run_train(args: argparse.Namespace) -> int:
    """Train the run `args` describe; print the final metrics as one JSON line. Returns 0."""
    from mi_krr.train.loop import NothingToResumeError, RunFolderInUseError, StopBeforeCheckpointError, TrainingDivergedError, train
    from mi_krr.train.runs import build_run

    run = build_run(run_description(args))
    try:
        result = train(run.model, run.sampler, run.cfg, resume=args.resume, progress=not args.no_progress, until_step=args.until_step)
    except RunFolderInUseError as error:  # this and the rest: worded for the command line's flags
        raise RunFolderInUseError(error.out_dir, resume_option="--resume", out_option="--out", finished=error.finished) from error
    except NothingToResumeError as error:
        raise ValueError(
            f"--resume, but {error.out_dir} holds no training states (state/step_*.safetensors; a finished or copied run keeps "
            "none): train without --resume, into a new --out folder"
        ) from error
    except StopBeforeCheckpointError as error:
        raise ValueError(
            f"--until-step {error.until_step} is before the run's saved step {error.checkpoint_step}: pass a later --until-step, or none"
        ) from error
    except TrainingDivergedError as error:
        clipped = f"; gradients are already clipped at {run.cfg.grad_clip:g}" if run.cfg.grad_clip is not None else ""
        raise ValueError(f"training loss became {error.value} at step {error.step}: lower --lr (now {run.cfg.lr:g}){clipped}") from error
    summary = {key: result.final_metrics[key] for key in ("step", "model_mse", "optimal_mse", "ratio", "zero_mse")}
    summary["run_dir"] = run.cfg.out_dir
    print(json.dumps(summary))
    return 0
