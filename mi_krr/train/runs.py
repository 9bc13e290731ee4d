"""Run descriptions: {"model": ..., "sampler": ..., "train": ...} dicts (a run folder's
config.json), the shipped presets, and building a run's model, sampler and TrainConfig from one."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mi_krr._repr import compact_repr
from mi_krr.train.config import TrainConfig

# The two shipped runs (checkpoints/softmax_gp, checkpoints/linear_lr); see checkpoints/README.md
# for the errors they reach. `scripts/train_shipped_models.py` trains them.
PRESETS: dict[str, dict[str, Any]] = {
    "softmax_gp": {
        "model": {
            "model_type": "ICLTransformer",
            "n_dims": 2,
            "d_model": 64,
            "n_layers": 4,
            "n_heads": 4,
            "attention": "softmax",
            "mlp": True,
            "norm": "layernorm",
            "layout": "concat",
        },
        "sampler": {"sampler": "gp_regression", "dim": 2, "kernel": "gaussian", "bandwidth": 0.5, "noise_std": 0.2},
        "train": {
            "steps": 2500,
            "batch_size": 64,
            "lr": 1e-3,
            "min_lr": 1e-5,
            "warmup_steps": 200,
            "grad_clip": 1.0,
            "n_support": 24,
            "n_query": 8,
            "n_support_start": 8,
            "curriculum_steps": 500,
            "eval_every": 250,
            "eval_prompts": 1024,
            "checkpoint_every": 250,
            "seed": 0,
        },
    },
    "linear_lr": {
        "model": {
            "model_type": "ICLTransformer",
            "n_dims": 4,
            "d_model": 64,
            "n_layers": 4,
            "n_heads": 4,
            "attention": "linear",
            "mlp": True,
            "norm": "layernorm",
            "layout": "concat",
        },
        "sampler": {"sampler": "linear_regression", "dim": 4, "noise_std": 0.4},
        "train": {
            "steps": 2500,
            "batch_size": 64,
            "lr": 1e-3,
            "min_lr": 1e-5,
            "warmup_steps": 200,
            "grad_clip": 1.0,
            "n_support": 16,
            "n_query": 8,
            "n_support_start": 6,
            "active_dim_start": 2,
            "curriculum_steps": 500,
            "eval_every": 250,
            "eval_prompts": 1024,
            "checkpoint_every": 250,
            "seed": 0,
        },
    },
}


@dataclass
class Run:
    """A run ready for `train(run.model, run.sampler, run.cfg)`."""

    __repr__ = compact_repr

    model: torch.nn.Module
    sampler: Any
    cfg: TrainConfig


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the run description of preset `name` (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return copy.deepcopy(PRESETS[name])


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run description from a JSON or YAML file (a run folder's config.json works), or from
    the config.json of a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}: pass a .json/.yaml file with model, sampler and train sections")
    text = path.read_text()
    import yaml

    try:
        values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        reason = " ".join(str(error).split())  # the parser's message, on one line
        raise ValueError(f"run config {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {reason}") from error
    return _checked_description(values, str(path))


def build_run(description: dict[str, Any]) -> Run:
    """Model (initialised from `train.seed`, without touching the global RNG), sampler and
    TrainConfig of a run description."""
    from mi_krr.models import model_from_config
    from mi_krr.tasks.samplers import sampler_from_config

    description = _checked_description(description, "run config")
    cfg = TrainConfig.from_dict(description["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_from_config(description["model"])
    return Run(model=model, sampler=sampler_from_config(description["sampler"]), cfg=cfg)


def _checked_description(values: Any, source: str) -> dict[str, Any]:
    if not isinstance(values, dict) or not {"model", "sampler", "train"} <= set(values):
        raise ValueError(f"{source} must be a mapping with 'model', 'sampler' and 'train' sections")
    return values
