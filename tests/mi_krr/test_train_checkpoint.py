"""Checkpoint files: atomic writes survive crashes, round trips are bit-exact (model files in the
dtype their weights hold), nothing is unpickled."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from optimizer_steps import assert_same_next_step
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import LinearRegressionSampler
from mi_krr.train.checkpoint import (
    CheckpointError,
    RNGState,
    TrainingState,
    atomic_write_bytes,
    latest_checkpoint,
    load_model,
    load_training_state,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_model,
    save_training_state,
    state_path,
)


def _stepped_adamw() -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
    return net, optimizer


def _training_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> TrainingState:
    return TrainingState(
        step=step,
        run_config={"model": {"width": 5}, "sampler": {"sampler": "x"}, "train": {"steps": 9}},
        model_state=net.state_dict(),
        optimizer_state=optimizer.state_dict(),
        rng=RNGState.capture(),
        history=[{"step": step, "model_mse": 0.25}],
    )


class _CrashingFile:
    """A file object that writes the first half of what it is given, then dies."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise KeyboardInterrupt("simulated kill mid-write")


def test_atomic_write_leaves_previous_file_intact_when_killed_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old contents")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _CrashingFile(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new contents that never fully land")
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # temporary file removed


def test_training_state_killed_mid_write_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    net, optimizer = _stepped_adamw()
    first = save_training_state(state_path(tmp_path, 10), _training_state(net, optimizer, 10))
    expected = {name: value.clone() for name, value in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _CrashingFile(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        save_training_state(state_path(tmp_path, 20), _training_state(net, optimizer, 20))
    monkeypatch.undo()
    # a hard kill (no cleanup at all) leaves a half-written temporary file: it must be ignored too
    (first.parent / ".step_00000030.safetensors.abc.tmp").write_bytes(b"\x00" * 17)
    assert latest_checkpoint(tmp_path) == first
    loaded = load_training_state(first)
    assert loaded.step == 10
    for name, value in expected.items():
        assert torch.equal(loaded.model_state[name], value)


def test_training_state_round_trip_is_bit_exact(tmp_path):
    net, optimizer = _stepped_adamw()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    state = _training_state(net, optimizer, 7)
    path = save_training_state(tmp_path / "s.safetensors", state)
    # the file is plain safetensors: readable by any safetensors client, metadata is JSON
    plain = safetensors.torch.load_file(path)
    assert torch.equal(plain["model/0.weight"], net[0].weight)
    loaded = load_training_state(path)
    assert loaded.step == 7 and loaded.history == state.history and loaded.run_config == state.run_config
    for name, value in net.state_dict().items():
        assert torch.equal(loaded.model_state[name], value)

    expected_after = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded.rng.restore()
    assert (random.random(), np.random.standard_normal()) == expected_after[:2]
    assert torch.equal(torch.rand(3), expected_after[2])


def test_optimizer_state_round_trip_continues_identically():
    net, optimizer = _stepped_adamw()
    tensors, meta = optimizer_state_to_flat(optimizer.state_dict())
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))  # what a checkpoint file holds
    restored_meta = json.loads(json.dumps(meta))
    clone = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    clone.load_state_dict(net.state_dict())
    clone_optimizer = torch.optim.AdamW(clone.parameters(), lr=1.0)
    clone_optimizer.load_state_dict(optimizer_state_from_flat(tensors, restored_meta))
    assert clone_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert_same_next_step((net, optimizer), (clone, clone_optimizer), torch.randn(8, 3))


def test_optimizer_state_holding_lists_of_tensors_is_refused_naming_the_entry():
    """L-BFGS keeps lists of tensors per parameter, which the flat format cannot hold: a ValueError
    naming the entry and the alternative (it used to surface as a JSON TypeError)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.LBFGS(net.parameters())
    batch = torch.randn(8, 3)

    def loss():
        optimizer.zero_grad()
        value = net(batch).square().mean()
        value.backward()
        return value

    optimizer.step(loss)
    with pytest.raises(ValueError, match=r"optimizer state entry '\w+' of parameter 0 is a (list|deque): .*torch\.save"):
        optimizer_state_to_flat(optimizer.state_dict())


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path):
    net, optimizer = _stepped_adamw()
    path = save_training_state(tmp_path / "s.safetensors", _training_state(net, optimizer, 1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_training_state(path)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_training_state(tmp_path / "absent.safetensors")


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="format"):
        load_training_state(path)


def test_non_json_header_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "garbage.safetensors"
    header = b"{not json"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_training_state(path)


# --------------------------------------------------------------------------------------------
# Model files keep the dtype the weights hold


MODEL_CLASSES = [ICLTransformer, BridgeICLModel]


def _model(model_class: type, dtype: str, seed: int = 0):
    """A small model built in `dtype` whose trainable weights are moved off their initial values."""
    torch.manual_seed(seed)
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype=dtype)
    model = model_class(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("built, held_name", [("float32", "float64"), ("float64", "float64"), ("float64", "float32"), ("float32", "float32")])
def test_model_file_round_trip_keeps_the_weights_dtype_and_values_bit_exactly(tmp_path, model_class, built, held_name):
    """Built in one dtype and held in another (`.to(held)`): the reloaded model holds the
    original weights bit for bit, in `held`, and predicts bit-identically."""
    held = getattr(torch, held_name)
    model = _model(model_class, built).to(held)
    if held == torch.float64:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(1e-10 * torch.randn_like(parameter))  # below float32 resolution
        assert any(not torch.equal(p, p.float().double()) for p in model.parameters())  # a float32 trip would show
    save_model(tmp_path / "model.safetensors", model)
    reloaded = load_model(tmp_path / "model.safetensors")
    original, restored = model.state_dict(), reloaded.state_dict()
    assert list(restored) == list(original)
    for name, value in original.items():
        assert restored[name].dtype == held and torch.equal(restored[name], value), name
    task = LinearRegressionSampler(2).sample(3, 5, 4, seed=1)
    with torch.no_grad():
        expected = model.predict(task)
        assert expected.dtype == held
        assert torch.equal(reloaded.predict(task), expected)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_config_dict_reads_the_weights_dtype_and_leaves_a_shared_config_alone(model_class):
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=2, max_seq_len=16)
    moved, sibling = model_class(cfg).to(torch.float64), model_class(cfg)
    assert moved.config_dict()["dtype"] == "float64"
    assert sibling.config_dict()["dtype"] == "float32" and cfg.dtype == "float32"


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_saving_a_model_of_mixed_dtypes_is_refused_in_one_line(tmp_path, model_class):
    model = _model(model_class, "float32")
    model.read_in.to(torch.float64)
    with pytest.raises(ValueError, match=r"^model weights mix dtypes \['torch.float32', 'torch.float64'\], .*model.to\(torch.float64\)") as error:
        save_model(tmp_path / "model.safetensors", model)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_saving_a_model_in_a_dtype_no_config_records_is_refused(tmp_path, model_class):
    model = _model(model_class, "float32").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^model weights are torch.bfloat16, which a config cannot record: .*model.to\(torch.float32\)"):
        save_model(tmp_path / "model.safetensors", model)


def test_weights_whose_dtype_the_stored_config_contradicts_are_refused_not_cast(tmp_path):
    """A `.pt` state dict of float64 weights beside a config that says float32 (what save_model
    wrote for a model moved with `.to(torch.float64)` before it read the weights' dtype)."""
    model = _model(ICLTransformer, "float32")
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config_dict()}))
    torch.save(model.to(torch.float64).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"weight 'read_in.weight' is torch.float64 but the model config builds torch.float32; set the config's dtype"):
        load_model(tmp_path / "weights.pt")
