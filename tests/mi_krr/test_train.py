"""Training: exact resume, bit-exact save/load, learning, the optimal-predictor reference, and
refusing unsafe or mismatched checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from scipy.spatial.distance import cdist

from mi_krr.checkpoints import checkpoint_format, load_checkpoint
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import (
    CheckpointError,
    RunFolderInUseError,
    TrainConfig,
    bayes_optimal_predictions,
    held_out_reference,
    latest_checkpoint,
    load_model,
    train,
)

torch.set_num_threads(1)


def _tiny_model(seed: int, attention: str = "softmax", layout: str = "concat", n_dims: int = 2, d_model: int = 16) -> ICLTransformer:
    torch.manual_seed(seed)
    config = ICLTransformerConfig(n_dims=n_dims, d_model=d_model, n_layers=2, n_heads=2, attention=attention, layout=layout, max_seq_len=64)
    return ICLTransformer(config)


def _tiny_config(out_dir, **overrides) -> TrainConfig:
    values = dict(
        steps=20, batch_size=8, lr=3e-3, warmup_steps=4, weight_decay=0.01, n_support=6, n_query=3,
        n_support_start=3, active_dim_start=1, curriculum_steps=10, eval_every=10, eval_prompts=16,
        checkpoint_every=5, out_dir=str(out_dir), seed=7,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("attention, layout", [("softmax", "concat"), ("linear", "interleaved")])
def test_resumed_run_ends_bit_identical_to_uninterrupted_run(tmp_path, attention, layout):
    sampler = GPRegressionSampler(2, noise_std=0.1, bandwidth=0.8)
    straight = _tiny_model(0, attention, layout)
    straight_result = train(straight, sampler, _tiny_config(tmp_path / "a"), progress=False)

    interrupted = _tiny_model(0, attention, layout)
    half = train(interrupted, sampler, _tiny_config(tmp_path / "b"), progress=False, until_step=10)
    assert half.model_path is None and latest_checkpoint(tmp_path / "b").name == "step_00000010.safetensors"
    # the resumed process starts from a differently initialised model: all state comes from disk
    resumed = _tiny_model(123, attention, layout)
    resumed_result = train(resumed, sampler, _tiny_config(tmp_path / "b"), resume=True, progress=False)

    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert [h["model_mse"] for h in resumed_result.history] == [h["model_mse"] for h in straight_result.history]
    assert [h["step"] for h in resumed_result.history] == [0, 10, 20]


def test_resume_refuses_changed_settings_and_existing_runs(tmp_path):
    sampler = LinearRegressionSampler(2, noise_std=0.2)
    train(_tiny_model(0), sampler, _tiny_config(tmp_path), progress=False, until_step=5)
    with pytest.raises(CheckpointError, match=r"different training settings \['lr'\]"):
        train(_tiny_model(0), sampler, _tiny_config(tmp_path, lr=1e-3), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="different sampler config"):
        train(_tiny_model(0), LinearRegressionSampler(2, noise_std=0.3), _tiny_config(tmp_path), resume=True, progress=False)
    with pytest.raises(RunFolderInUseError, match="already holds checkpoints: pass resume=True to continue it, or choose a new out_dir"):
        train(_tiny_model(0), sampler, _tiny_config(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="holds no state"):
        train(_tiny_model(0), sampler, _tiny_config(tmp_path / "empty"), resume=True, progress=False)


def test_load_model_round_trip_gives_bit_identical_predictions(tmp_path):
    sampler = GPRegressionSampler(2, noise_std=0.1, bandwidth=0.8)
    model = _tiny_model(0)
    result = train(model, sampler, _tiny_config(tmp_path, steps=6, warmup_steps=2, curriculum_steps=0, checkpoint_every=3), progress=False)
    task = sampler.sample(5, 6, 4, seed=11)
    model.eval()
    with torch.no_grad():
        expected = model.predict(task)
        for path in (tmp_path, result.model_path, result.checkpoint_path):
            assert torch.equal(load_model(path).predict(task), expected), path
        # a plain .pt state dict beside the run's config.json, read without unpickling objects
        torch.save(model.state_dict(), tmp_path / "weights.pt")
        assert torch.equal(load_model(tmp_path / "weights.pt").predict(task), expected)
        # ... or in the run's state/ folder, whose config.json is the run's (as checkpoint_format says)
        torch.save(model.state_dict(), tmp_path / "state" / "step_6.pt")
        assert checkpoint_format(tmp_path / "state" / "step_6.pt") == "mi-krr"
        assert torch.equal(load_checkpoint(tmp_path / "state" / "step_6.pt").model.predict(task), expected)


def test_loading_pickles_never_runs_code_or_builds_objects(tmp_path):
    marker = tmp_path / "side_effect"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = _tiny_model(0)
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config_dict()}))
    torch.save({"weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2), "note": "a string"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        load_model(tmp_path / "mixed.pt")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    small, wide = _tiny_model(0), _tiny_model(0, d_model=24)
    (tmp_path / "config.json").write_text(json.dumps({"model": small.config_dict()}))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="has shape .* but the model config needs"):
        load_model(tmp_path / "wide.pt")
    torch.save({name: value for name, value in small.state_dict().items() if "read_out" not in name}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="2 missing weights"):
        load_model(tmp_path / "part.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither"):
        load_model(tmp_path / "empty_run")


def _numpy_mse(model: ICLTransformer, sampler, n_support: int, seed: int) -> tuple[float, float]:
    task = sampler.sample(256, n_support, 4, seed=seed)
    model.eval()
    with torch.no_grad():
        pred = model.predict(task).numpy().astype(np.float64)
    target = task.y_query.numpy().astype(np.float64)
    return float(np.mean((pred - target) ** 2)), float(np.mean(target**2))


def test_training_lowers_held_out_error_below_start_and_zero_predictor(tmp_path):
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    model = _tiny_model(1, attention="softmax", d_model=32)
    before, zero = _numpy_mse(model, sampler, n_support=8, seed=2024)
    cfg = TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=20, n_support=8, n_query=4, eval_every=300, eval_prompts=64, out_dir=None, seed=3)
    train(model, sampler, cfg, progress=False)
    after, _ = _numpy_mse(model, sampler, n_support=8, seed=2024)
    assert after < 0.5 * before
    assert after < 0.5 * zero


def test_gp_optimal_predictor_matches_scipy_posterior_mean():
    sampler = GPRegressionSampler(3, noise_std=0.3, bandwidth=0.7)
    task = sampler.sample(4, 12, 5, seed=5)
    ours = bayes_optimal_predictions(sampler, task).numpy()
    for b in range(4):
        xs, ys, xq = (t[b].double().numpy() for t in (task.x_support, task.y_support, task.x_query))
        gram = np.exp(-cdist(xs, xs, "sqeuclidean") / (2 * 0.7**2))
        cross = np.exp(-cdist(xq, xs, "sqeuclidean") / (2 * 0.7**2))
        alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram + 0.09 * np.eye(12)), ys)
        np.testing.assert_allclose(ours[b], cross @ alpha, rtol=1e-10, atol=1e-12)


def test_linear_optimal_predictor_is_ridge_with_lam_noise_var_times_dim(tmp_path):
    sampler = LinearRegressionSampler(4, noise_std=0.5)
    cfg = TrainConfig(steps=1, warmup_steps=0, n_support=10, n_query=6, eval_prompts=8, eval_seed=9)
    reference = held_out_reference(sampler, cfg)
    task = reference.task
    errors = []
    for b in range(8):
        xs, ys, xq, yq = (t[b].double().numpy() for t in (task.x_support, task.y_support, task.x_query, task.y_query))
        weights = np.linalg.solve(xs.T @ xs + 0.25 * 4 * np.eye(4), xs.T @ ys)
        np.testing.assert_allclose(reference.optimal_pred[b].numpy(), xq @ weights, rtol=1e-9, atol=1e-12)
        errors.append((xq @ weights - yq) ** 2)
    assert reference.optimal_mse == pytest.approx(float(np.mean(errors)), rel=1e-12)
    assert reference.zero_mse == pytest.approx(float(np.mean(task.y_query.double().numpy() ** 2)), rel=1e-12)


def test_cli_trains_stops_and_resumes_a_run_from_a_yaml_config(tmp_path, capsys):
    from mi_krr.cli import main

    description = {
        "model": _tiny_model(0).config_dict(),
        "sampler": LinearRegressionSampler(2, noise_std=0.2).to_config(),
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 2, "n_support": 5, "n_query": 2, "eval_every": 4, "eval_prompts": 8, "checkpoint_every": 2},
    }
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(description))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--out", str(run_dir), "--until-step", "4", "--no-progress"]) == 0
    assert latest_checkpoint(run_dir).name == "step_00000004.safetensors"
    assert main(["train", "--resume", "--out", str(run_dir), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["model_mse"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["final"]["model_mse"] == summary["model_mse"]
    assert main(["train", "--resume", "--preset", "softmax_gp", "--out", str(run_dir)]) == 2
    assert "drop --preset" in capsys.readouterr().err
