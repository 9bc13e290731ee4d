"""`train`: AdamW with warm-up + cosine, gradient clipping, curriculum, periodic evaluation
against the Bayes-optimal predictor, atomic checkpoints and exact resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from mi_krr._repr import compact_repr
from mi_krr._validation import check_device
from mi_krr.tasks import ICLTask
from mi_krr.train.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    CheckpointError,
    RNGState,
    TrainingState,
    atomic_write_json,
    latest_checkpoint,
    load_training_state,
    load_weights,
    prune_checkpoints,
    save_model,
    save_training_state,
    state_path,
)
from mi_krr.train.config import TrainConfig
from mi_krr.train.evaluation import EvalReference, evaluate, held_out_reference
from mi_krr.train.schedule import step_active_dim, step_learning_rate, step_prompt_length
from mi_krr.train.seeding import TRAIN_STREAM, derived_generator

if TYPE_CHECKING:
    from mi_krr.models.prompting import TrainingPredictions


class RunFolderInUseError(ValueError):
    """`out_dir` already holds checkpoints (or a finished run's model) and resuming was not asked
    for. The message names the fix in the caller's terms: `resume_option` and `out_option` (by
    default the Python API's)."""

    def __init__(self, out_dir: Path, resume_option: str = "resume=True", out_option: str = "out_dir", finished: bool = False) -> None:
        self.out_dir, self.finished = out_dir, finished
        if finished:
            message = f"{out_option} {out_dir} already holds a finished run ({MODEL_FILE}): choose a new {out_option}"
        else:
            message = f"{out_option} {out_dir} already holds checkpoints: pass {resume_option} to continue it, or choose a new {out_option}"
        super().__init__(message)


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or inf at optimizer step `step` (0-based)."""

    def __init__(self, step: int, value: float, grad_clip: float | None) -> None:
        self.step, self.value = step, value
        fix = "lower lr or set grad_clip" if grad_clip is None else f"lower lr (gradients are already clipped at grad_clip={grad_clip:g})"
        super().__init__(f"training loss became {value} at step {step}: {fix}")


class NothingToResumeError(FileNotFoundError):
    """resume=True, but `out_dir` holds no training states."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        super().__init__(f"resume=True but {out_dir} holds no state/step_*.safetensors: start with resume=False")


class StopBeforeCheckpointError(ValueError):
    """A resumed run's `until_step` lies before the step its checkpoint reached."""

    def __init__(self, until_step: int, checkpoint_step: int) -> None:
        self.until_step, self.checkpoint_step = until_step, checkpoint_step
        super().__init__(f"until_step={until_step} is before the checkpoint's step {checkpoint_step}: pass a later until_step or None")


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        final_metrics: the last evaluation record (see `evaluate`), with `step`.
        history: every evaluation record, oldest first (step 0 is the untrained model).
        checkpoint_path: the newest training-state file written, or None without `out_dir`.
        model_path: `model.safetensors` of the finished run, or None (no `out_dir`, or the run
            stopped at `until_step` before `steps`).
        steps_done: optimizer steps taken in total (including those before a resume).
    """

    __repr__ = compact_repr

    final_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: Path | None = None
    model_path: Path | None = None
    steps_done: int = 0


def training_batch(sampler: Any, cfg: TrainConfig, step: int) -> ICLTask:
    """The prompts of optimizer step `step`: a deterministic function of (cfg.seed, step), drawn
    on the CPU (identical on every device) at the curriculum's prompt length and dimension."""
    generator = derived_generator(cfg.seed, TRAIN_STREAM, step)
    active_dim = step_active_dim(step, cfg, sampler.dim)
    extra = {} if active_dim == sampler.dim else {"active_dim": active_dim}
    task = sampler.sample(cfg.batch_size, step_prompt_length(step, cfg), cfg.n_query, generator=generator, **extra)
    return task.to(device=cfg.device)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings (ndim >= 2) only: biases (named
    `bias` or `b_*`, including TransformerLens's per-head b_Q / b_K / b_V `[n_heads, d_head]`)
    and norms are exempt."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 and not _is_bias(name) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _is_bias(parameter_name: str) -> bool:
    leaf = parameter_name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.startswith("b_")


def run_config(model: Any, sampler: Any, cfg: TrainConfig) -> dict[str, Any]:
    """The JSON description of a run: model, sampler and training configs."""
    return {"model": model.config_dict(), "sampler": sampler.to_config(), "train": cfg.to_dict()}


def train(
    model: torch.nn.Module,
    sampler: Any,
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    until_step: int | None = None,
) -> TrainResult:
    """Train `model` in place on prompts from `sampler` and return the run's metrics.

    Args:
        model: an mi-krr ICL model (`config_dict()`, `training_predictions(task)`, `predict(task)`).
        sampler: a task sampler (`dim`, `sample(...)`, `to_config()`).
        cfg: the run's settings.
        resume: continue from the newest checkpoint in `cfg.out_dir` (weights, optimizer, RNG
            states, history); the run then ends exactly as an uninterrupted one would. Without it,
            an `out_dir` that already holds checkpoints is refused (`RunFolderInUseError`).
        progress: show a tqdm bar.
        until_step: stop after this many total steps (a checkpoint is written there), as if the
            run were interrupted; `train(..., resume=True)` continues it. None: run to cfg.steps.

    Loss: `model.training_predictions(task).mse()` (queries in the concat layout; every prefix of
    the support sequence in the interleaved layout, as in Garg et al.).
    """
    stop = _check_inputs(model, sampler, cfg, until_step)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    config = run_config(model, sampler, cfg)
    model.to(cfg.device)
    optimizer = make_optimizer(model, cfg)

    start = 0
    history: list[dict[str, Any]] = []
    losses: list[float] = []  # the batch losses since the last evaluation record
    checkpoint_path = None
    if resume:
        checkpoint_path, start, history, losses = _resume(model, optimizer, config, cfg, out_dir)
        if stop < start:
            raise StopBeforeCheckpointError(stop, start)
    elif out_dir is not None and latest_checkpoint(out_dir) is not None:
        raise RunFolderInUseError(out_dir)
    elif out_dir is not None and (out_dir / MODEL_FILE).exists():  # e.g. a shipped run, which keeps no training states
        raise RunFolderInUseError(out_dir, finished=True)
    if out_dir is not None:
        atomic_write_json(out_dir / CONFIG_FILE, config)

    reference = held_out_reference(sampler, cfg)
    if start == 0:
        history.append(_evaluation_record(model, reference, cfg, step=0, train_loss=None, elapsed=0.0))

    model.train()
    began = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    bar = tqdm(total=stop, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    for step in range(start, stop):
        loss = training_step(model, optimizer, sampler, cfg, step)
        losses.append(loss)
        done = step + 1
        bar.update(1)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record = _evaluation_record(model, reference, cfg, done, float(np.mean(losses)), time.perf_counter() - began)
            history.append(record)
            losses = []
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", ratio=f"{record['ratio']:.3f}")
        if out_dir is not None and (done % cfg.checkpoint_every == 0 or done == stop):
            checkpoint_path = _write_state(out_dir, model, optimizer, config, done, history, losses, cfg.keep_checkpoints)
    bar.close()

    final = history[-1] if history[-1]["step"] == stop else _evaluation_record(
        model, reference, cfg, stop, float(np.mean(losses)) if losses else None, time.perf_counter() - began
    )
    model_path = None
    if out_dir is not None and stop == cfg.steps:
        model_path = save_model(out_dir / MODEL_FILE, model, config)
        atomic_write_json(out_dir / METRICS_FILE, {"final": final, "history": history})
    return TrainResult(final_metrics=final, history=history, checkpoint_path=checkpoint_path, model_path=model_path, steps_done=stop)


def _check_inputs(model: Any, sampler: Any, cfg: TrainConfig, until_step: int | None) -> int:
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a mi_krr.train.TrainConfig, got {type(cfg).__name__}")
    for method in ("config_dict", "training_predictions", "predict"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"model has no {method}(): train an mi_krr model (ICLTransformer or BridgeICLModel)")
    for method in ("sample", "to_config"):
        if not callable(getattr(sampler, method, None)):
            raise ValueError(f"sampler has no {method}(): pass an mi_krr.tasks sampler")
    check_device("cfg.device", cfg.device)  # the config takes any device name; training needs one this machine has
    if cfg.active_dim_start is not None and cfg.active_dim_start > sampler.dim:
        raise ValueError(f"active_dim_start must be <= the sampler's dim={sampler.dim}, got {cfg.active_dim_start}")
    if until_step is None:
        return cfg.steps
    whole = isinstance(until_step, (int, np.integer)) and not isinstance(until_step, bool)  # Python or NumPy integers
    if not whole or not 1 <= until_step <= cfg.steps:
        raise ValueError(f"until_step must be an integer in [1, steps={cfg.steps}] or None, got {until_step!r}")
    return int(until_step)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Any, cfg: TrainConfig, step: int) -> float:
    """Optimizer step `step` (0-based): scheduled lr, the step's batch, MSE, backward, clipping,
    AdamW update. Returns the batch loss."""
    lr = step_learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    task = training_batch(sampler, cfg, step)
    training_predictions = cast("Callable[[ICLTask], TrainingPredictions]", model.training_predictions)  # torch's stub: Tensor | Module
    loss = training_predictions(task).mse()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    value = float(loss.detach())
    if not np.isfinite(value):
        raise TrainingDivergedError(step, value, cfg.grad_clip)
    return value


def _evaluation_record(
    model: torch.nn.Module, reference: EvalReference, cfg: TrainConfig, step: int, train_loss: float | None, elapsed: float
) -> dict[str, Any]:
    metrics = evaluate(model, reference)
    return {
        "step": step,
        "train_loss": train_loss,
        "lr": step_learning_rate(max(step - 1, 0), cfg),
        "n_support": step_prompt_length(max(step - 1, 0), cfg),
        "elapsed_s": elapsed,
        **metrics,
    }


def _write_state(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    step: int,
    history: list[dict[str, Any]],
    pending_losses: list[float],
    keep: int,
) -> Path:
    state = TrainingState(
        step=step,
        run_config=config,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        rng=RNGState.capture(),
        history=history,
        pending_losses=list(pending_losses),
    )
    path = save_training_state(state_path(out_dir, step), state)
    prune_checkpoints(out_dir, keep)
    return path


def _resume(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    cfg: TrainConfig,
    out_dir: Path | None,
) -> tuple[Path, int, list[dict[str, Any]], list[float]]:
    if out_dir is None:
        raise ValueError("resume=True needs cfg.out_dir: set it to the folder of the run to continue")
    path = latest_checkpoint(out_dir)
    if path is None:
        raise NothingToResumeError(out_dir)
    state = load_training_state(path)
    _check_same_run(state.run_config, config, path)
    if state.step > cfg.steps:
        raise CheckpointError(f"{path} is at step {state.step}, beyond cfg.steps={cfg.steps}")
    load_weights(model, state.model_state, source=path)
    model.to(cfg.device)
    try:
        optimizer.load_state_dict(state.optimizer_state)
    except ValueError as error:  # torch: parameter groups of other sizes
        raise CheckpointError(
            f"{path}: its optimizer state does not fit this optimizer's parameter groups ({error}); "
            "resume with the mi-krr version that wrote it, or start afresh with resume=False"
        ) from error
    state.rng.restore()
    return path, state.step, state.history, state.pending_losses


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose model, sampler or trajectory-defining settings differ."""
    for part in ("model", "sampler"):
        if saved.get(part) != current[part]:
            diff = sorted(key for key in set(saved.get(part, {})) | set(current[part]) if saved.get(part, {}).get(key) != current[part].get(key))
            raise CheckpointError(f"{path} was saved with a different {part} config (differs in {diff}): resume with the run's own config")
    saved_train = TrainConfig.from_dict(saved["train"]).trajectory_fields()
    current_train = TrainConfig.from_dict(current["train"]).trajectory_fields()
    diff = sorted(key for key in saved_train if saved_train[key] != current_train[key])
    if diff:
        raise CheckpointError(f"{path} was saved with different training settings {diff}: resume with the run's own settings")
