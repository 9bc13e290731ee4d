"""Training, evaluation and checkpoint bookkeeping checked against independent references:
closed-form schedules, NumPy ridge regression, a hand-written clipped AdamW, RNG draws observed
before a resume, file lists written out by hand, and Garg run defaults from their formulas."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import yaml

from mi_krr.checkpoints import load_checkpoint, task_sets
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import LinearRegressionSampler
from mi_krr.train import (
    CheckpointError,
    TrainConfig,
    bayes_optimal_predictions,
    evaluate,
    held_out_reference,
    make_optimizer,
    train,
    training_batch,
    training_step,
)


def _model(seed: int = 0, n_dims: int = 2, dtype: str = "float32") -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(n_dims=n_dims, d_model=8, n_layers=1, n_heads=2, dtype=dtype))


def _closed_form_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))) / 2


def _closed_form_ramp(step: int, start: int, end: int, ramp: int) -> int:
    return start + math.floor((end - start) * min(step, ramp) / ramp)


def _state_steps(run_dir) -> list[int]:
    return sorted(int(p.name[len("step_"):-len(".safetensors")]) for p in (run_dir / "state").glob("step_*.safetensors"))


# ------------------------------------------------------------------------------------------------
# Batches and optimisation


def test_training_batches_follow_the_closed_form_curriculum():
    """training_batch(step) has floor-ramped n_support (3 -> 9 over 6 steps) and exactly the ramped number of non-zero x coordinates (1 -> 4)."""
    sampler = LinearRegressionSampler(4, noise_std=0.1)
    cfg = TrainConfig(steps=10, warmup_steps=0, batch_size=4, n_support=9, n_query=2, n_support_start=3, active_dim_start=1, curriculum_steps=6)
    for step in range(9):
        task = training_batch(sampler, cfg, step)
        assert task.n_support == _closed_form_ramp(step, 3, 9, 6), step
        active = _closed_form_ramp(step, 1, 4, 6)
        x = torch.cat([task.x_support, task.x_query], dim=1)
        assert torch.all(x[..., active:] == 0) and torch.all(x[..., :active] != 0), step


DECAYED = {"read_in.weight", "read_out.weight", "blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.weight"} | {
    f"blocks.0.attn.W_{matrix}" for matrix in "QKVO"
}
"""The weight matrices of `_model()` (concat layout: no positional embedding): weight decay
applies to these only (not to biases, b_Q / b_K / b_V included although they are
[n_heads, d_head], nor to norms)."""


def test_weight_decay_applies_to_the_weight_matrices_and_embeddings_only():
    """make_optimizer's decayed group holds exactly the listed weights; every other parameter gets 0."""
    model = _model()
    groups = make_optimizer(model, TrainConfig(steps=2, warmup_steps=0, weight_decay=0.1)).param_groups
    decayed = {id(p) for group in groups if group["weight_decay"] == 0.1 for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names == DECAYED
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def _hand_written_adamw_run(model, sampler, cfg, steps: int) -> None:
    """Clip to global norm (coef = min(1, clip / (norm + 1e-6))), then AdamW (betas 0.9/0.999,
    eps 1e-8, decoupled decay on the DECAYED weights only) at the closed-form learning rate."""
    names, params = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad])
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        lr = _closed_form_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        loss = model.training_predictions(training_batch(sampler, cfg, step)).mse()
        grads = torch.autograd.grad(loss, params)
        if cfg.grad_clip is not None:
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            grads = [g * min(1.0, cfg.grad_clip / (norm + 1e-6)) for g in grads]
        t = step + 1
        with torch.no_grad():
            for i, (name, p, g) in enumerate(zip(names, params, grads)):
                if name in DECAYED:
                    p.mul_(1 - lr * cfg.weight_decay)
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


@pytest.mark.parametrize(("grad_clip", "weight_decay"), [(1e-3, 0.0), (None, 0.5)])
def test_training_steps_equal_a_hand_written_clipped_adamw(grad_clip, weight_decay):
    """Three training_step calls leave the same weights as a hand-written clip + AdamW loop (decay on matrices only)."""
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    cfg = TrainConfig(steps=6, warmup_steps=2, lr=1e-2, min_lr=1e-4, batch_size=4, n_support=5, n_query=2,
                      grad_clip=grad_clip, weight_decay=weight_decay)
    model = _model(dtype="float64")
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, cfg)
    for step in range(3):
        training_step(model, optimizer, sampler, cfg, step)
    _hand_written_adamw_run(reference, sampler, cfg, steps=3)
    for (name, value), expected in zip(model.named_parameters(), reference.parameters()):
        # atol covers b_K, whose gradient is rounding noise (softmax ignores a per-query constant)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10, msg=name)


# ------------------------------------------------------------------------------------------------
# Evaluation


class _FixedLinearPredictor(torch.nn.Module):
    """A stand-in model predicting 0.3 * sum(x_query) (no training involved)."""

    def predict(self, task):
        return 0.3 * task.x_query.sum(-1)


def _numpy_ridge(task, lam: float) -> np.ndarray:
    preds = []
    for xs, ys, xq in zip(*(t.double().numpy() for t in (task.x_support, task.y_support, task.x_query))):
        preds.append(xq @ np.linalg.solve(xs.T @ xs + lam * np.eye(xs.shape[1]), xs.T @ ys))
    return np.stack(preds)


def test_evaluate_reports_mean_errors_ratio_and_gap_computed_with_numpy():
    """evaluate(): model_mse, ratio, zero_mse and gap_to_optimal_mse equal NumPy means over every query (ridge lam = sigma^2 d)."""
    sampler = LinearRegressionSampler(3, noise_std=0.3)
    cfg = TrainConfig(steps=1, warmup_steps=0, n_support=7, n_query=5, eval_prompts=6, eval_seed=4)
    reference = held_out_reference(sampler, cfg)
    metrics = evaluate(_FixedLinearPredictor(), reference)
    task = reference.task
    pred = _FixedLinearPredictor().predict(task).double().numpy()
    target = task.y_query.double().numpy()
    optimal = _numpy_ridge(task, 0.09 * 3)
    model_mse, optimal_mse = np.mean((pred - target) ** 2), np.mean((optimal - target) ** 2)
    assert metrics["model_mse"] == pytest.approx(model_mse, rel=1e-12)
    assert metrics["optimal_mse"] == pytest.approx(optimal_mse, rel=1e-9)
    assert metrics["ratio"] == pytest.approx(model_mse / optimal_mse, rel=1e-9)
    assert metrics["zero_mse"] == pytest.approx(np.mean(target**2), rel=1e-12)
    assert metrics["gap_to_optimal_mse"] == pytest.approx(np.mean((pred - optimal) ** 2), rel=1e-9)


def test_noiseless_optimal_predictor_is_least_squares_interpolation():
    """Noise-free linear prompts with n > d: the optimal predictions equal NumPy least squares, hence y_query, to 1e-6."""
    sampler = LinearRegressionSampler(3, noise_std=0.0)
    task = sampler.sample(5, 8, 4, seed=2, dtype=torch.float64)
    ours = bayes_optimal_predictions(sampler, task).numpy()
    for b in range(5):
        xs, ys, xq = (t[b].numpy() for t in (task.x_support, task.y_support, task.x_query))
        weights = np.linalg.lstsq(xs, ys, rcond=None)[0]
        np.testing.assert_allclose(ours[b], xq @ weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, task.y_query.numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Runs: records, checkpoint files, resume


def _run_cfg(out_dir, **overrides) -> TrainConfig:
    values = dict(steps=7, warmup_steps=2, lr=5e-3, min_lr=1e-4, batch_size=4, n_support=5, n_query=2, n_support_start=2,
                  curriculum_steps=4, eval_every=2, eval_prompts=4, checkpoint_every=2, keep_checkpoints=2,
                  out_dir=None if out_dir is None else str(out_dir), seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_history_records_the_lr_and_prompt_length_of_the_last_step_taken():
    """Record at step s > 0 carries the closed-form lr and n_support of optimizer step s - 1 (step 0: of step 0)."""
    cfg = _run_cfg(None)
    result = train(_model(), LinearRegressionSampler(2, noise_std=0.1), cfg, progress=False)
    assert [record["step"] for record in result.history] == [0, 2, 4, 6, 7]
    for record in result.history:
        last = max(record["step"] - 1, 0)
        assert record["lr"] == pytest.approx(_closed_form_lr(last, 5e-3, 1e-4, 2, 7), rel=1e-12)
        assert record["n_support"] == _closed_form_ramp(last, 2, 5, 4)


def test_checkpoints_are_written_every_k_steps_and_at_the_stop_step_keeping_the_newest(tmp_path):
    """checkpoint_every=2, keep=2: stopping at 5 leaves states {4, 5}; resuming to 7 leaves {6, 7}."""
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    train(_model(), sampler, _run_cfg(tmp_path), progress=False, until_step=5)
    assert _state_steps(tmp_path) == [4, 5]
    train(_model(), sampler, _run_cfg(tmp_path), resume=True, progress=False)
    assert _state_steps(tmp_path) == [6, 7]


def test_resume_restores_the_global_rng_states_observed_when_the_checkpoint_was_written(tmp_path):
    """After resume, torch/NumPy/Python global draws equal the draws made right after the interrupted run returned."""
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    train(_model(), sampler, _run_cfg(tmp_path), progress=False, until_step=4)
    expected = (torch.rand(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    train(_model(), sampler, _run_cfg(tmp_path), resume=True, progress=False, until_step=4)  # restores, takes no step
    assert torch.equal(torch.rand(4), expected[0])
    np.testing.assert_array_equal(np.random.standard_normal(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


# ------------------------------------------------------------------------------------------------
# mi_krr.checkpoints


def test_garg_run_defaults_follow_their_formulas(tmp_path):
    """load_checkpoint on a Garg run (d=3, n_positions=4): label_scale = sqrt(3), n_support = min(2d, n_positions - 1) = 3, lam = 1e-2, and that prompt fits."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    conf = GPT2Config(n_positions=8, n_embd=8, n_layer=1, n_head=2, vocab_size=3)
    state = {f"_backbone.{k}": v for k, v in GPT2Model(conf).state_dict().items()}
    state.update({f"_read_in.{k}": v for k, v in torch.nn.Linear(3, 8).state_dict().items()})
    state.update({f"_read_out.{k}": v for k, v in torch.nn.Linear(8, 1).state_dict().items()})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", "n_dims": 3, "n_positions": 4, "n_embd": 8, "n_layer": 1, "n_head": 2}}))
    torch.save(state, tmp_path / "model_10.pt")
    loaded = load_checkpoint(tmp_path)
    assert loaded.format == "garg" and loaded.label_scale == math.sqrt(3) and loaded.lam == 1e-2
    assert loaded.n_support == 3 and 2 * loaded.n_support + 1 <= 2 * 4
    task = loaded.sampler.sample(2, loaded.n_support, 2, seed=0)
    assert loaded.model.predict(task).shape == (2, 2)


def test_task_sets_draw_set_k_from_seed_plus_k():
    """With shifts, set k is drawn from seed + k: input_scale_x2 (k=1) has x = 2 g and input_scale_x0.5 (k=2) has x = g/2, g ~ randn from that seed."""
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    sets, _ = task_sets(sampler, batch_size=3, n_support=4, n_query=2, seed=20)
    names = list(sets)
    assert names[:3] == ["in_distribution", "input_scale_x2", "input_scale_x0.5"]
    for k, factor in enumerate([1.0, 2.0, 0.5]):
        gaussian = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(20 + k), dtype=torch.float64)
        torch.testing.assert_close(sets[names[k]].x_support, (factor * gaussian[:, :4]).float(), rtol=0, atol=0)
        torch.testing.assert_close(sets[names[k]].x_query, (factor * gaussian[:, 4:]).float(), rtol=0, atol=0)


def test_resume_into_other_parameter_groups_is_a_checkpoint_error(tmp_path):
    """An optimizer state whose groups do not fit (here one parameter frozen since) raises CheckpointError, not torch's ValueError."""
    sampler = LinearRegressionSampler(2, noise_std=0.1)
    train(_model(), sampler, _run_cfg(tmp_path), progress=False, until_step=2)
    model = _model()
    model.read_out.bias.requires_grad_(False)
    with pytest.raises(CheckpointError, match="parameter groups"):
        train(model, sampler, _run_cfg(tmp_path), resume=True, progress=False)
