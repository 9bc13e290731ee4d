"""Checkpoints and the prompts to diagnose them on.

`shipped_checkpoint(name)` finds a shipped run (checkpoints/softmax_gp, checkpoints/linear_lr).
`load_checkpoint(path)` recognises an mi-krr run (a folder with config.json, or its
model.safetensors / state/step_*.safetensors / .pt beside a config.json) and a run of Garg et
al.'s code (a folder with config.yaml, or a .pt in one), and returns the model with the task
family it was trained on. `task_sets(...)` draws in-distribution prompts and every applicable
shift of `mi_krr.tasks.DEFAULT_SHIFTS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mi_krr._repr import compact_repr

if TYPE_CHECKING:
    import torch

SUPPORTED = (
    "an mi-krr run folder (config.json + model.safetensors or state/step_*.safetensors) or one of its files, "
    "or a Garg et al. run folder (config.yaml + state.pt or model_<step>.pt) or one of its .pt files"
)
NOISELESS_LAM = 1e-2  # the ridge compared with a model trained on noiseless labels (Garg's tasks)
TASK_FAMILIES = ("linear_regression", "gp_regression")


@dataclass
class LoadedCheckpoint:
    """A model and the prompts it was trained on.

    Attributes:
        model: the `ICLModel`, in eval mode.
        sampler: the training prompt distribution (`mi_krr.tasks` sampler).
        n_support, n_query: the prompt sizes to diagnose at.
        format: "mi-krr" or "garg".
        path: where it was loaded from.
        label_scale: prompts' labels are multiplied by this (Garg's weights are N(0, I_d), ours
            N(0, I_d / d): sqrt(d) matches the label scale the model was trained on).
        lam: the KRR ridge to compare with (None: the sampler's Bayes-optimal ridge,
            `probes.diagnose.resolve_lam`).
        notes: how the task family was chosen.
    """

    __repr__ = compact_repr

    model: Any
    sampler: Any
    n_support: int
    n_query: int
    format: str
    path: str
    label_scale: float = 1.0
    lam: float | None = None
    notes: list[str] = field(default_factory=list)


def shipped_checkpoint(name: str, folder: str | Path | None = None) -> Path:
    """The shipped run `name` ("softmax_gp", "linear_lr"): in `folder`, else in ./checkpoints
    (returned relative), else in the checkpoints/ folder of the nearest parent of the working
    directory that has it (a notebook opened in examples/ finds the repository's), else beside
    the package (an editable install). ValueError for a name that is not a shipped run;
    FileNotFoundError naming the fix when a shipped run is absent."""
    if folder is not None:
        candidates = [Path(folder)]
    else:
        parents = [parent / "checkpoints" for parent in Path.cwd().parents]
        candidates = [Path("checkpoints"), *parents, Path(__file__).resolve().parents[1] / "checkpoints"]
    for candidate in candidates:
        if (candidate / name).is_dir():
            return candidate / name
    from mi_krr.train.runs import PRESETS

    if name not in PRESETS:
        raise ValueError(f"name must be a shipped run, one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    missing = candidates[0] / name
    raise FileNotFoundError(
        f"shipped checkpoint {missing} not found: run inside the repository (its checkpoints/ is looked for in the working "
        f"directory and every parent), pass the folder holding it (--checkpoints / checkpoint=), or train it with "
        f"`mi-krr train --preset {name} --out {missing}`"
    )


def checkpoint_format(path: str | Path) -> str:
    """"mi-krr" or "garg" for a supported checkpoint at `path`; FileNotFoundError when nothing is
    there, ValueError (naming what is supported) otherwise."""
    from mi_krr.train.checkpoint import run_folder

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass {SUPPORTED}")
    folder = path if path.is_dir() else run_folder(path)
    if path.is_file() and path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"{path} is not a supported checkpoint file (.safetensors or .pt): pass {SUPPORTED}")
    if path.is_file() and path.suffix == ".safetensors":
        return "mi-krr"
    if (folder / "config.json").is_file():
        return "mi-krr"
    if (folder / "config.yaml").is_file():
        return "garg"
    raise ValueError(f"{path} is not a supported checkpoint (no config.json or config.yaml beside it): pass {SUPPORTED}")


def load_checkpoint(
    path: str | Path,
    device: str = "cpu",
    task: str | None = None,
    n_support: int | None = None,
    n_query: int | None = None,
    lam: float | None = None,
) -> LoadedCheckpoint:
    """Load the checkpoint at `path` (see `checkpoint_format`) with its task family.

    mi-krr runs: the run's sampler config and its training n_support / n_query. Garg runs: linear
    regression at the model's n_dims (x ~ N(0, I), w ~ N(0, I), noiseless), n_support =
    min(2 d, n_positions - 1), n_query = 8, and lam = `NOISELESS_LAM` unless given.
    `task` ("linear_regression" or "gp_regression") replaces the family by that sampler's defaults
    at the model's dimension; n_support, n_query, lam override the sizes and the ridge.
    """
    from mi_krr._validation import check_choice, check_count, check_device, check_positive
    from mi_krr.tasks import SAMPLERS

    target = check_device("device", device)
    if task is not None:
        check_choice("task", task, TASK_FAMILIES)
    if lam is not None:
        lam = check_positive("lam", lam)
    kind = checkpoint_format(path)
    loaded = _load_mi_krr(Path(path), target) if kind == "mi-krr" else _load_garg(Path(path), target)
    if task is not None and task != loaded.sampler.name:
        loaded.sampler = SAMPLERS[task](loaded.model.n_dims)
        loaded.label_scale = 1.0
        loaded.notes.append(f"task family replaced by {task} with its default settings (--task)")
    if n_support is not None:
        loaded.n_support = check_count("n_support", n_support, minimum=1)
    if n_query is not None:
        loaded.n_query = check_count("n_query", n_query, minimum=1)
    if lam is not None:
        loaded.lam = lam
    elif loaded.sampler.noise_std == 0 and loaded.lam is None:
        loaded.lam = NOISELESS_LAM
        loaded.notes.append(f"noiseless labels: KRR ridge lam = {NOISELESS_LAM:g} (pass --lam to change it)")
    return loaded


def _load_mi_krr(path: Path, device: torch.device | None) -> LoadedCheckpoint:
    from mi_krr.tasks import sampler_from_config
    from mi_krr.train import load_model, read_run_config
    from mi_krr.train.checkpoint import run_folder

    model = load_model(path, device=device)
    folder = path if path.is_dir() else run_folder(path)
    description = read_run_config(folder)
    train = description["train"]
    return LoadedCheckpoint(
        model=model,
        sampler=sampler_from_config(description["sampler"]),
        n_support=int(train["n_support"]),
        n_query=int(train.get("n_query") or 8),
        format="mi-krr",
        path=str(path),
    )


def _load_garg(path: Path, device: torch.device | None) -> LoadedCheckpoint:
    from mi_krr.models import load_garg_checkpoint
    from mi_krr.tasks import LinearRegressionSampler

    model = load_garg_checkpoint(path, device=device)
    config = model.garg_config
    return LoadedCheckpoint(
        model=model,
        sampler=LinearRegressionSampler(config.n_dims, input_std=1.0),
        n_support=min(2 * config.n_dims, config.n_positions - 1),
        n_query=8,
        format="garg",
        path=str(path),
        label_scale=math.sqrt(config.n_dims),
        notes=[f"Garg run: noiseless linear regression at d={config.n_dims} (w ~ N(0, I_d)), labels scaled by sqrt(d)"],
    )


def scaled_labels(task: Any, factor: float) -> Any:
    """`task` with y_support and y_query multiplied by `factor` (recorded in info["label_scale"];
    factor 1 returns `task` itself); KRR predictions scale with the labels, so every comparison
    is unchanged in kind."""
    if factor == 1.0:
        return task
    return replace(task, y_support=task.y_support * factor, y_query=task.y_query * factor,
                   info={**task.info, "label_scale": factor})


def task_sets(
    sampler: Any,
    batch_size: int,
    n_support: int,
    n_query: int,
    seed: int,
    shifts: bool = True,
    label_scale: float = 1.0,
    model: Any = None,
) -> tuple[dict[str, Any], list[str]]:
    """In-distribution prompts ("in_distribution", drawn with `seed`) and, with `shifts`, one set
    per shift of `DEFAULT_SHIFTS` that applies to `sampler` (seeds seed + 1, seed + 2, ..., modulo 2**32).

    With `model`, shifted sets whose prompts the model cannot take (too long for its positions)
    are left out, and in-distribution prompts it cannot take are a ValueError saying why.
    Returns (name -> ICLTask, notes on what was left out and why).
    """
    import torch

    from mi_krr._validation import check_positive, check_seed, offset_seed
    from mi_krr.models import check_task_fits
    from mi_krr.tasks import DEFAULT_SHIFTS, apply_shift, why_shift_does_not_apply

    seed = check_seed("seed", seed)
    label_scale = check_positive("label_scale", label_scale)
    samplers = {"in_distribution": sampler}
    notes = []
    if shifts:
        for name, shift in DEFAULT_SHIFTS.items():
            reason = why_shift_does_not_apply(sampler, shift)
            if reason is None:
                samplers[name] = apply_shift(sampler, shift)
            else:
                notes.append(f"shift {name} left out: {reason}")
    sets = {}
    for index, (name, shifted) in enumerate(samplers.items()):
        task = scaled_labels(shifted.sample(batch_size, n_support, n_query, seed=offset_seed(seed, index), dtype=torch.float32), label_scale)
        if model is not None and hasattr(model, "max_seq_len"):
            try:
                check_task_fits(model, task)
            except ValueError as error:
                if name == "in_distribution":  # nothing to diagnose: say why, up front
                    raise ValueError(f"the in-distribution prompts do not fit the model: {error}") from error
                notes.append(f"{name} left out: {error}")
                continue
        sets[name] = task
    return sets, notes
