"""Training and checkpoints used from Python as a researcher does in a notebook: tiny runs with
until_step / resume, evaluation of loaded models (mi-krr and Garg-format), the optimal predictor,
the shipped runs rebuilt from their config, and reproductions called with small settings.

Numbers are checked against independent references (NumPy ridge / kernel solves, NumPy MSEs of
`model.predict`, per-step losses replayed with `training_step`, the README's table). The bugs
found while using the API are fixed; their tests state the correct behaviour."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.models import ICLTransformer, ICLTransformerConfig, load_garg_checkpoint
from mi_krr.reproductions import cg_rate, softmax_ood, width
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import (
    RunFolderInUseError,
    TrainConfig,
    build_run,
    evaluate,
    held_out_reference,
    load_model,
    make_optimizer,
    optimal_ridge,
    read_run_config,
    train,
    training_batch,
    training_step,
)

torch.set_num_threads(1)
D = 2


def _model(seed: int = 0, n_dims: int = D, **overrides) -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(n_dims=n_dims, d_model=8, n_layers=1, n_heads=2, **overrides))


def _cfg(out_dir=None, **overrides) -> TrainConfig:
    values = dict(steps=4, warmup_steps=0, batch_size=2, n_support=3, n_query=1, eval_every=4, eval_prompts=2,
                  checkpoint_every=4, out_dir=None if out_dir is None else str(out_dir))
    values.update(overrides)
    return TrainConfig(**values)


def _numpy_ridge_predictions(x_support, y_support, x_query, kernel, lam) -> np.ndarray:
    """sum_j k(x*, x_j) alpha_j with alpha = (K + lam I)^-1 y, one np.linalg.solve per prompt."""
    return np.stack([
        kernel(xq, xs) @ np.linalg.solve(kernel(xs, xs) + lam * np.eye(len(xs)), ys)
        for xs, ys, xq in zip(x_support, y_support, x_query)
    ])


def _as_numpy(task):
    return [t.detach().double().numpy() for t in (task.x_support, task.y_support, task.x_query, task.y_query)]


# ------------------------------------------------------------------------------------------------
# Optimal predictor and evaluation against NumPy


def test_optimal_predictor_of_a_shifted_anisotropic_linear_task_is_numpy_ridge_with_lam_sigma2_d():
    """Linear regression with condition_number 4 and input_mean 0.3 (d=3, noise 0.5): optimal_ridge is
    ("linear", {}, 0.25 * 3) and the reference's optimal predictions equal a NumPy ridge solve; batch 1, one query."""
    sampler = LinearRegressionSampler(3, noise_std=0.5, condition_number=4.0, input_mean=0.3)
    assert optimal_ridge(sampler) == ("linear", {}, pytest.approx(0.75))
    reference = held_out_reference(sampler, _cfg(n_support=4, n_query=1, eval_prompts=1))
    xs, ys, xq, yq = _as_numpy(reference.task)
    expected = _numpy_ridge_predictions(xs, ys, xq, lambda a, b: a @ b.T, 0.75)
    np.testing.assert_allclose(reference.optimal_pred.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert reference.optimal_mse == pytest.approx(float(np.mean((expected - yq) ** 2)), rel=1e-10)
    assert reference.zero_mse == pytest.approx(float(np.mean(yq**2)), rel=1e-12)


def test_optimal_predictor_of_an_exp_kernel_gp_is_numpy_krr_with_exp_of_x_dot_z_over_temperature():
    """GP regression with kernel="exp", temperature 2, noise 0.2: optimal_ridge names the exp kernel with its
    temperature and lam = 0.04, and the predictions equal NumPy KRR with k(x, z) = exp(x.z / 2)."""
    sampler = GPRegressionSampler(2, noise_std=0.2, kernel="exp", temperature=2.0)
    kernel, params, lam = optimal_ridge(sampler)
    assert (kernel, params) == ("exp", {"temperature": 2.0}) and lam == pytest.approx(0.04)
    reference = held_out_reference(sampler, _cfg(n_support=5, n_query=2, eval_prompts=3))
    xs, ys, xq, _ = _as_numpy(reference.task)
    expected = _numpy_ridge_predictions(xs, ys, xq, lambda a, b: np.exp(a @ b.T / 2.0), 0.04)
    np.testing.assert_allclose(reference.optimal_pred.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_evaluate_a_float64_model_in_training_mode_is_the_numpy_mse_of_its_eval_mode_predictions():
    """A float64 model left in train mode: evaluate's model_mse / gap are NumPy means of (predict - y)^2 and
    (predict - optimal)^2 in eval mode, and the model is handed back still in train mode."""
    model = _model(3, dtype="float64").train()
    reference = held_out_reference(GPRegressionSampler(2, noise_std=0.3), _cfg(n_support=4, n_query=2, eval_prompts=3))
    metrics = evaluate(model, reference)
    assert model.training
    model.eval()
    with torch.no_grad():
        pred = model.predict(reference.task).double().numpy()
    target = reference.task.y_query.double().numpy()
    assert metrics["model_mse"] == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-12)
    assert metrics["gap_to_optimal_mse"] == pytest.approx(float(np.mean((pred - reference.optimal_pred.numpy()) ** 2)), rel=1e-12)
    assert metrics["ratio"] == pytest.approx(metrics["model_mse"] / reference.optimal_mse, rel=1e-12)


def _garg_weights(n_dims: int, n_positions: int, n_embd: int, n_layer: int, n_head: int) -> dict[str, torch.Tensor]:
    """Garg's TransformerModel state dict (read-in, HF GPT-2 backbone, read-out)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    conf = GPT2Config(n_positions=2 * n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=1, use_cache=False)
    state = {f"_backbone.{name}": value for name, value in GPT2Model(conf).state_dict().items()}
    state.update({f"_read_in.{name}": value for name, value in torch.nn.Linear(n_dims, n_embd).state_dict().items()})
    state.update({f"_read_out.{name}": value for name, value in torch.nn.Linear(n_embd, 1).state_dict().items()})
    return state


def test_evaluate_scores_a_garg_format_run_picked_by_a_numpy_step_with_the_numpy_mse_of_its_predictions(tmp_path):
    """A Garg folder (config.yaml, model_500.pt, model_1000.pt) loaded with step=np.int64(500): the file of step
    500 is read, and evaluate against held-out linear prompts gives the NumPy MSE of model.predict."""
    section = {"family": "gpt2", "n_dims": 3, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": section, "training": {"task": "linear_regression"}}))
    weights = _garg_weights(3, 8, 8, 1, 2)
    torch.save(weights, tmp_path / "model_500.pt")
    torch.save({name: value + 1.0 for name, value in weights.items()}, tmp_path / "model_1000.pt")
    model = load_garg_checkpoint(tmp_path, step=np.int64(500))
    assert model.source == {"file": str(tmp_path / "model_500.pt"), "train_step": 500}
    reference = held_out_reference(LinearRegressionSampler(3, input_std=1.0), _cfg(n_support=5, n_query=2, eval_prompts=3))
    with torch.no_grad():
        pred = model.predict(reference.task).double().numpy()
    expected = float(np.mean((pred - reference.task.y_query.double().numpy()) ** 2))
    assert evaluate(model, reference)["model_mse"] == pytest.approx(expected, rel=1e-12)


def test_the_shipped_linear_run_rebuilt_from_its_config_reproduces_the_readme_table():
    """build_run(read_run_config(shipped_checkpoint("linear_lr"))) + load_model + evaluate on the run's own
    held-out prompts gives the checkpoints/README.md row: model 0.0622, optimal 0.0525, ratio 1.184, predict-0 0.990."""
    folder = shipped_checkpoint("linear_lr")
    run = build_run(read_run_config(folder))
    metrics = evaluate(load_model(folder), held_out_reference(run.sampler, run.cfg))
    assert metrics["model_mse"] == pytest.approx(0.0622, abs=5e-5)
    assert metrics["optimal_mse"] == pytest.approx(0.0525, abs=5e-5)
    assert metrics["ratio"] == pytest.approx(1.184, abs=5e-4)
    assert metrics["zero_mse"] == pytest.approx(0.990, abs=5e-4)


def test_build_run_initialises_from_the_train_seed_and_leaves_the_global_rng_alone():
    """Two build_run calls of one description give identical weights whatever the global seed, and the
    global torch stream after build_run is the one a plain manual_seed(1) gives."""
    description = {"model": _model().config_dict(), "sampler": LinearRegressionSampler(2).to_config(), "train": _cfg().to_dict()}
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    first = build_run(description)
    assert torch.equal(torch.rand(3), expected_draw)
    torch.manual_seed(99)
    second = build_run(description)
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name


# ------------------------------------------------------------------------------------------------
# Resume and run folders


def test_a_run_stopped_between_evaluations_and_resumed_reports_the_uninterrupted_train_loss(tmp_path):
    """until_step=1 then resume (eval_every=4): the step-4 record's train_loss must be the mean of the four
    per-step losses, replayed here with training_step, as in the uninterrupted run (train's docstring: the
    resumed run "ends exactly as an uninterrupted one would"). It is the mean of steps 2-4 only."""
    sampler = LinearRegressionSampler(2, noise_std=0.2)
    replay = _model()
    optimizer = make_optimizer(replay, _cfg())
    losses = [training_step(replay, optimizer, sampler, _cfg(), step) for step in range(4)]
    straight = train(_model(), sampler, _cfg(tmp_path / "a"), progress=False)
    assert straight.final_metrics["train_loss"] == pytest.approx(np.mean(losses), rel=1e-12)
    train(_model(), sampler, _cfg(tmp_path / "b"), progress=False, until_step=1)
    resumed = train(_model(5), sampler, _cfg(tmp_path / "b"), progress=False, resume=True)
    assert resumed.final_metrics["train_loss"] == pytest.approx(np.mean(losses), rel=1e-12)


def test_training_into_a_finished_run_folder_without_training_states_is_refused(tmp_path):
    """Rebuilding the shipped run from its config.json keeps out_dir = the shipped folder; training that (a
    tweak of steps) must be refused like a folder with checkpoints, not replace its model.safetensors."""
    folder = tmp_path / "linear_lr"
    shutil.copytree(shipped_checkpoint("linear_lr"), folder)
    before = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    run = build_run(read_run_config(folder))
    cfg = TrainConfig(**{**run.cfg.to_dict(), "out_dir": str(folder), "steps": 1, "warmup_steps": 0, "curriculum_steps": 0,
                         "batch_size": 1, "eval_prompts": 1})
    try:
        with pytest.raises(RunFolderInUseError):
            train(run.model, run.sampler, cfg, progress=False)
    finally:
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == before


def test_numpy_float32_settings_are_stored_as_python_floats_and_a_run_folder_is_written(tmp_path):
    """lr / weight_decay from a NumPy float32 sweep: TrainConfig stores plain floats (JSON-able) and a run
    writes its config.json; today lr stays np.float32 (json TypeError in train) and weight_decay is refused."""
    cfg = _cfg(tmp_path, lr=np.float32(1e-3), min_lr=0.0, weight_decay=np.float32(0.01))
    json.dumps(cfg.to_dict())
    result = train(_model(), LinearRegressionSampler(2, noise_std=0.1), cfg, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == pytest.approx(1e-3)
    assert result.model_path is not None


def test_until_step_accepts_a_numpy_integer_like_steps_does(tmp_path):
    """until_step=np.int64(2) (e.g. from np.arange) stops after 2 steps, as until_step=2 does."""
    result = train(_model(), LinearRegressionSampler(2, noise_std=0.1), _cfg(tmp_path), progress=False, until_step=np.int64(2))
    assert result.steps_done == 2 and result.model_path is None


def test_training_batch_at_the_curriculum_start_has_the_start_length_and_active_dimension():
    """n_support_start=4 -> 16 and active_dim_start=1 -> 3 over 6 steps: step 0 draws 4 support points with only
    x[..., 0] non-zero; step 3 draws 4 + floor(12 * 3 / 6) = 10 points with 1 + floor(2 * 3 / 6) = 2 active coordinates."""
    sampler = LinearRegressionSampler(3, noise_std=0.1)
    cfg = TrainConfig(steps=10, warmup_steps=0, batch_size=2, n_support=16, n_query=1, n_support_start=4, active_dim_start=1, curriculum_steps=6)
    for step, length, active in [(0, 4, 1), (3, 10, 2), (6, 16, 3)]:
        task = training_batch(sampler, cfg, step)
        assert task.n_support == length
        x = torch.cat([task.x_support, task.x_query], dim=1)
        assert int((x.abs().amax(dim=(0, 1)) > 0).sum()) == active


# ------------------------------------------------------------------------------------------------
# Reproductions from Python


def test_cg_rate_with_a_single_kappa_number_names_the_argument():
    """kappas=10.0 (one number instead of a tuple) must be a one-line ValueError naming kappas."""
    with pytest.raises(ValueError, match="kappas"):
        cg_rate(kappas=10.0, n_support=8, n_steps=2, batch_size=1)


@pytest.mark.parametrize("tolerance", [math.nan, -1.0])
def test_cg_rate_refuses_a_tolerance_that_no_error_can_go_below(tolerance):
    """An error ratio is never below a negative or NaN tolerance: cg_rate must raise a ValueError naming tolerance."""
    with pytest.raises(ValueError, match="tolerance"):
        cg_rate(kappas=(10.0,), n_support=8, n_steps=2, batch_size=1, tolerance=tolerance)


def test_softmax_ood_with_an_unknown_shift_name_names_the_known_shifts():
    """shifts=("input_scale_2x",) (a typo of input_scale_x2) must raise a ValueError listing the shift names,
    not return a result with the in-distribution set only."""
    with pytest.raises(ValueError, match="input_scale_x2"):
        softmax_ood(batch_size=1, shifts=("input_scale_2x",))


def test_width_with_one_kernel_name_as_a_string_runs_that_kernel():
    """kernels="linear" (one name where a tuple is expected) runs the linear kernel alone (it used to
    be read letter by letter: "kernels must be one of 'linear', 'exp', got 'l'")."""
    result = width(widths=(4,), kernels="linear", dim=4, n_support=8, n_steps=2, batch_size=2, heads="random_features")
    assert list(result.study.kernels) == ["linear"]


def test_a_device_name_torch_does_not_know_is_refused_when_the_config_is_made():
    """TrainConfig(device="gpu") is refused at once by name (it used to be accepted and fail at the first
    tensor move); a torch.device is stored as its name, which config.json can hold."""
    with pytest.raises(ValueError, match="device 'gpu' cannot be used here \\(not a torch device name"):
        TrainConfig(steps=2, warmup_steps=0, device="gpu")
    assert TrainConfig(steps=2, warmup_steps=0, device=torch.device("cpu")).device == "cpu"
