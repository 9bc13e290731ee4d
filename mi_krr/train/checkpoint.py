"""Checkpoint files: atomic, pickle-free, complete enough to resume a run bit for bit.

A run folder holds

    config.json                      {"model": ..., "sampler": ..., "train": ...}
    state/step_00001000.safetensors  training state: weights, AdamW moments, RNG states, history
    model.safetensors                final weights (written when the run reaches `steps`)
    metrics.json                     {"final": ..., "history": [...]} of the finished run

Every file is one safetensors file whose JSON metadata carries the configs, step, metrics and
every non-tensor scalar; tensors carry weights, optimizer moments and binary RNG states. Nothing
is pickled. Each file is written to a temporary file in the same folder, flushed, fsynced and
moved into place with `os.replace`, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from mi_krr._repr import compact_repr
from mi_krr._validation import check_device

STATE_FORMAT = "mi-krr-training-state"
MODEL_FORMAT = "mi-krr-model"
FORMAT_VERSION = "1"
STATE_DIR = "state"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
_STATE_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model or run it is loaded into."""


# --------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically: temporary file in the same folder, flush, fsync,
    `os.replace`, fsync of the folder. On any failure the temporary file is removed and whatever
    was at `path` before is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; give the usual umask-based mode
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """`atomic_write_bytes` of `value` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Safetensors files with JSON metadata


def _write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors (copied to contiguous CPU memory) and JSON-encoded metadata atomically."""
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    encoded = {key: json.dumps(value) for key, value in metadata.items()}
    return atomic_write_bytes(path, safetensors.torch.save(plain, metadata=encoded))


def _read_safetensors(path: str | Path, expected_format: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file written by `_write_safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run folder or a .safetensors file written by mi_krr.train")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = {key: json.loads(value) for key, value in raw_metadata.items()}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt: {exc}); use an earlier checkpoint") from exc
    found = metadata.get("format")
    if expected_format is not None and found != expected_format:
        raise CheckpointError(f"{path} holds format {found!r}, expected {expected_format!r}: pass a file written by mi_krr.train")
    return tensors, metadata


# --------------------------------------------------------------------------------------------
# Random number generator states


@dataclass
class RNGState:
    """Every random stream a training step may touch.

    Attributes:
        torch_cpu: `torch.get_rng_state()` (uint8 tensor).
        python: `random.getstate()` as JSON (version, 625 ints, gauss_next).
        numpy_keys: MT19937 key of `np.random.get_state()` `[624]` (int64).
        numpy_rest: its position, has_gauss, cached_gaussian.
        cuda: per-device CUDA generator states (empty without CUDA).

    Samplers hold no generator of their own: each training batch is drawn from a generator
    seeded by (seed, step) (`mi_krr.train.seeding`), so no sampler state needs saving.
    """

    __repr__ = compact_repr

    torch_cpu: torch.Tensor
    python: list[Any]
    numpy_keys: torch.Tensor
    numpy_rest: list[Any]
    cuda: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> "RNGState":
        """Snapshot the global torch/python/numpy/CUDA generators."""
        version, internal, gauss_next = random.getstate()
        numpy_state = np.random.get_state(legacy=True)
        if not isinstance(numpy_state, tuple):  # a dict only after np.random.set_bit_generator
            raise ValueError(f"numpy's global generator must be MT19937 to be saved, got {numpy_state['bit_generator']}")
        _, keys, pos, has_gauss, cached = numpy_state
        return cls(
            torch_cpu=torch.get_rng_state(),
            python=[version, list(internal), gauss_next],
            numpy_keys=torch.from_numpy(keys.astype(np.int64)),
            numpy_rest=[int(pos), int(has_gauss), float(cached)],
            cuda=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        )

    def restore(self) -> None:
        """Set the global generators back to this snapshot."""
        torch.set_rng_state(self.torch_cpu)
        version, internal, gauss_next = self.python
        random.setstate((version, tuple(internal), gauss_next))
        pos, has_gauss, cached = self.numpy_rest
        np.random.set_state(("MT19937", self.numpy_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda[: torch.cuda.device_count()])

    def to_flat(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (prefixed `rng/`) and JSON metadata for a safetensors file."""
        tensors = {"rng/torch_cpu": self.torch_cpu, "rng/numpy_keys": self.numpy_keys}
        tensors.update({f"rng/cuda/{i}": state for i, state in enumerate(self.cuda)})
        meta = {"python": self.python, "numpy_rest": self.numpy_rest, "n_cuda": len(self.cuda)}
        return tensors, meta

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "RNGState":
        return cls(
            torch_cpu=tensors["rng/torch_cpu"],
            python=meta["python"],
            numpy_keys=tensors["rng/numpy_keys"],
            numpy_rest=meta["numpy_rest"],
            cuda=[tensors[f"rng/cuda/{i}"] for i in range(meta["n_cuda"])],
        )


# --------------------------------------------------------------------------------------------
# Optimizer state without pickle


def optimizer_state_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (`optimizer/{param}/{key}`) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            elif isinstance(value, (int, float, str, type(None))):
                scalars[f"{index}/{key}"] = value
            else:
                raise ValueError(
                    f"optimizer state entry {key!r} of parameter {index} is a {type(value).__name__}: training states hold "
                    "tensors and numbers per parameter (AdamW, Adam, SGD); save other optimizers with torch.save"
                )
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_state_to_flat` (tuples such as `betas` restored from JSON lists)."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        {key: (tuple(value) if isinstance(value, list) and key != "params" else value) for key, value in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------
# Training-state checkpoints


@dataclass
class TrainingState:
    """Everything needed to continue a run after `step` optimizer steps.

    Attributes:
        step: optimizer steps taken.
        run_config: {"model": model config, "sampler": sampler config, "train": TrainConfig dict}.
        model_state: the model's state dict.
        optimizer_state: the optimizer's state dict (torch format).
        rng: random generator states at the end of `step`.
        history: evaluation records so far (one dict per evaluation).
        pending_losses: the batch losses of the steps since the last evaluation record, which
            the next record's train_loss averages (empty in states written before they were kept).
    """

    __repr__ = compact_repr

    step: int
    run_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: RNGState
    history: list[dict[str, Any]]
    pending_losses: list[float] = field(default_factory=list)


def state_path(run_dir: str | Path, step: int) -> Path:
    """Where the training state after `step` steps lives in `run_dir`."""
    return Path(run_dir) / STATE_DIR / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Training-state files of `run_dir`, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _STATE_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest training-state file of `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_training_state(path: str | Path, state: TrainingState) -> Path:
    """Write `state` atomically to `path` (one safetensors file)."""
    tensors = {f"model/{name}": value for name, value in state.model_state.items()}
    optim_tensors, optim_meta = optimizer_state_to_flat(state.optimizer_state)
    rng_tensors, rng_meta = state.rng.to_flat()
    metadata = {
        "format": STATE_FORMAT,
        "version": FORMAT_VERSION,
        "step": state.step,
        "run_config": state.run_config,
        "optimizer": optim_meta,
        "rng": rng_meta,
        "history": state.history,
        "pending_losses": [float(loss) for loss in state.pending_losses],
    }
    return _write_safetensors(path, {**tensors, **optim_tensors, **rng_tensors}, metadata)


def load_training_state(path: str | Path) -> TrainingState:
    """Read a file written by `save_training_state`; raises CheckpointError if it is not one."""
    tensors, metadata = _read_safetensors(path, STATE_FORMAT)
    try:
        return TrainingState(
            step=int(metadata["step"]),
            run_config=metadata["run_config"],
            model_state={name[len("model/"):]: value for name, value in tensors.items() if name.startswith("model/")},
            optimizer_state=optimizer_state_from_flat(tensors, metadata["optimizer"]),
            rng=RNGState.from_flat(tensors, metadata["rng"]),
            history=metadata["history"],
            pending_losses=[float(loss) for loss in metadata.get("pending_losses", [])],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing training-state entry {exc}: it was not written by mi_krr.train.save_training_state") from exc


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` training-state files of `run_dir`."""
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink()


# --------------------------------------------------------------------------------------------
# Model files


def save_model(path: str | Path, model: torch.nn.Module, run_config: dict[str, Any] | None = None) -> Path:
    """Write `model`'s weights (plain state-dict names) and its `config_dict()` atomically to the
    safetensors file `path` (not a folder; not named .pt, which `load_model` reads as a torch
    state dict) for an `ICLTransformer` or `BridgeICLModel` (not a subclass: `load_model` rebuilds
    the class the description names); `run_config` must be JSON-able."""
    from mi_krr.models.registry import _model_classes

    path = Path(path)
    if path.is_dir() or path.suffix == ".pt":
        example = path / MODEL_FILE if path.is_dir() else path.with_suffix(".safetensors")
        raise ValueError(f"path must name a safetensors file to write (load_model reads .pt files as torch state dicts), got {str(path)!r}: pass e.g. {str(example)!r}")
    config_dict = getattr(model, "config_dict", None)
    if not callable(config_dict) or _model_classes().get(type(model).__name__) is not type(model):
        raise ValueError(
            f"model must be an ICLTransformer or BridgeICLModel (load_model rebuilds one of those from its config_dict()), "
            f"got {type(model).__name__}: save its state_dict() with torch.save or safetensors instead"
        )
    metadata = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "model_config": config_dict()}
    if run_config is not None:
        try:
            json.dumps(run_config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"run_config must be JSON-able (numbers, strings, lists, dicts), got {error}: convert tensors with .tolist()") from None
        metadata["run_config"] = run_config
    return _write_safetensors(path, model.state_dict(), metadata)


def load_model(path: str | Path, device: str | torch.device | None = "cpu") -> torch.nn.Module:
    """Rebuild a trained model from a run folder or a checkpoint file, in eval mode.

    `path` may be a run folder (its `model.safetensors`, else its newest training state), a
    `model.safetensors` / `state/step_*.safetensors` file, or a `.pt` state dict beside a
    `config.json`. `.pt` files are read with `torch.load(weights_only=True)` and must hold only
    tensors: no code from a checkpoint is ever run.

    Raises FileNotFoundError for a missing path, CheckpointError for an unreadable file or
    weights that do not fit the stored model config.
    """
    from mi_krr.models import model_from_config  # models sit downstream of nothing here; imported lazily

    device = check_device("device", device)
    file = _resolve_model_file(Path(path))
    if file.suffix == ".pt":
        model_config, weights = _read_pt_state_dict(file)
    else:
        tensors, metadata = _read_safetensors(file, None)
        if metadata.get("format") == MODEL_FORMAT:
            model_config, weights = metadata["model_config"], tensors
        elif metadata.get("format") == STATE_FORMAT:
            model_config = metadata["run_config"]["model"]
            weights = {name[len("model/"):]: value for name, value in tensors.items() if name.startswith("model/")}
        else:
            raise CheckpointError(f"{file} has format {metadata.get('format')!r}: pass a file written by mi_krr.train")
    with torch.random.fork_rng(devices=[]):  # the random init the weights replace leaves the global generator alone
        model = model_from_config(model_config)
    load_weights(model, weights, source=file)
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """`model.load_state_dict(weights, strict=True)` with a one-line CheckpointError on mismatched
    names, shapes or dtypes (never a silent cast)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model config: {len(missing)} missing weights (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); load it with the config it was saved with"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: weight {name!r} has shape {tuple(value.shape)} but the model config needs "
                f"{tuple(expected[name].shape)}; load it with the config it was saved with"
            )
        if value.dtype != expected[name].dtype:  # load_state_dict would cast silently
            raise CheckpointError(
                f"{source}: weight {name!r} is {value.dtype} but the model config builds {expected[name].dtype}; "
                "set the config's dtype to the weights' (older mi-krr saved the dtype a model was built in, not the one it held)"
            )
    model.load_state_dict(weights, strict=True)


def _resolve_model_file(path: Path) -> Path:
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds neither {MODEL_FILE} nor {STATE_DIR}/step_*.safetensors: pass a run folder written by mi_krr.train")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run folder or a .safetensors file written by mi_krr.train")
    return path


def run_folder(file: Path) -> Path:
    """The folder whose config describes the weights file `file`: its own folder, or the run
    folder above it for a file in a run's `state/` folder."""
    folder = file.parent
    return folder.parent if folder.name == STATE_DIR else folder


def _read_pt_state_dict(file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A tensors-only state dict from a pickle file, read without running any pickled code."""
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} holds objects other than tensors (refused by torch.load(weights_only=True)): convert it to safetensors") from exc
    if isinstance(loaded, dict) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise CheckpointError(f"{file} must hold a dict of tensors (a state dict), got {type(loaded).__name__} with non-tensor entries")
    config_file = run_folder(file) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{file} needs a {CONFIG_FILE} beside it (or above its {STATE_DIR}/ folder) with the model config ({{'model': ...}})")
    try:
        model_config = json.loads(config_file.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file} must be JSON with a 'model' entry (as written by mi_krr.train)") from exc
    return model_config, loaded
