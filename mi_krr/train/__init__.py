"""Training in-context regression transformers, with atomic checkpoints and exact resume.

    from mi_krr.train import TrainConfig, train, load_model
    result = train(model, sampler, TrainConfig(steps=5000, out_dir="runs/gp"))
    model = load_model("runs/gp")
"""

from mi_krr.train.checkpoint import (
    CheckpointError,
    TrainingState,
    atomic_write_bytes,
    latest_checkpoint,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from mi_krr.train.config import TrainConfig
from mi_krr.train.evaluation import EvalReference, bayes_optimal_predictions, evaluate, held_out_reference, optimal_ridge
from mi_krr.train.loop import (
    NothingToResumeError,
    RunFolderInUseError,
    StopBeforeCheckpointError,
    TrainingDivergedError,
    TrainResult,
    make_optimizer,
    train,
    training_batch,
    training_step,
)
from mi_krr.train.runs import PRESETS, Run, build_run, preset_config, read_run_config
from mi_krr.train.schedule import curriculum_value, learning_rate

__all__ = [
    "CheckpointError",
    "PRESETS",
    "Run",
    "RunFolderInUseError",
    "NothingToResumeError",
    "StopBeforeCheckpointError",
    "TrainingDivergedError",
    "EvalReference",
    "TrainConfig",
    "TrainResult",
    "TrainingState",
    "atomic_write_bytes",
    "bayes_optimal_predictions",
    "build_run",
    "curriculum_value",
    "evaluate",
    "held_out_reference",
    "latest_checkpoint",
    "learning_rate",
    "load_model",
    "load_training_state",
    "make_optimizer",
    "optimal_ridge",
    "preset_config",
    "read_run_config",
    "save_model",
    "save_training_state",
    "train",
    "training_batch",
    "training_step",
]
