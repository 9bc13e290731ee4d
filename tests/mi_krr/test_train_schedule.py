"""Learning-rate schedule, curriculum and TrainConfig validation."""

from __future__ import annotations

import math

import pytest
import torch

from mi_krr.train import TrainConfig, curriculum_value, learning_rate
from mi_krr.train.schedule import step_active_dim, step_prompt_length


def test_warmup_is_linear_and_reaches_peak_lr():
    values = [learning_rate(s, lr=2e-3, min_lr=1e-5, warmup_steps=4, total_steps=20) for s in range(4)]
    assert values == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3], rel=1e-15)


def test_cosine_hits_peak_midpoint_and_floor():
    kwargs = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert learning_rate(10, **kwargs) == pytest.approx(1e-3, rel=1e-15)
    assert learning_rate(60, **kwargs) == pytest.approx(5.5e-4, rel=1e-14)  # halfway: (lr + min_lr) / 2
    assert learning_rate(35, **kwargs) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-14)
    assert learning_rate(110, **kwargs) == pytest.approx(1e-4, rel=1e-14)
    assert learning_rate(500, **kwargs) == pytest.approx(1e-4, rel=1e-14)  # stays at the floor


def test_cosine_phase_matches_torch_cosine_annealing():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=2e-4)
    torch_values = []
    for _ in range(50):
        torch_values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [learning_rate(7 + t, lr=3e-3, min_lr=2e-4, warmup_steps=7, total_steps=57) for t in range(50)]
    assert ours == pytest.approx(torch_values, rel=1e-9)


def test_curriculum_ramps_in_whole_units_then_holds():
    assert [curriculum_value(s, 4, 8, 8) for s in range(11)] == [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8]
    assert curriculum_value(0, 4, 8, 0) == 8  # no ramp: the end value from the start


def test_config_curriculum_applies_to_prompt_length_and_dimension():
    cfg = TrainConfig(steps=100, warmup_steps=0, n_support=20, n_support_start=10, active_dim_start=2, curriculum_steps=40)
    assert [step_prompt_length(s, cfg) for s in (0, 20, 39, 40, 99)] == [10, 15, 19, 20, 20]
    assert [step_active_dim(s, cfg, dim=6) for s in (0, 20, 40)] == [2, 4, 6]
    plain = TrainConfig(steps=100, warmup_steps=0, n_support=20)
    assert step_prompt_length(0, plain) == 20 and step_active_dim(0, plain, dim=6) == 6


def test_config_round_trips_through_dict():
    cfg = TrainConfig(steps=30, warmup_steps=3, grad_clip=None, out_dir="runs/x", n_support_start=4, curriculum_steps=10)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(lr=-1.0), "lr must be a finite number > 0"),
        (dict(min_lr=1.0, lr=1e-3), r"min_lr must be a number in \[0, lr"),
        (dict(min_lr=-1e-5), "min_lr must be a finite number >= 0"),
        (dict(min_lr=True), "min_lr must be a finite number >= 0"),
        (dict(steps=10, warmup_steps=11), "warmup_steps must be <= steps"),
        (dict(grad_clip=0.0), "grad_clip must be a finite number > 0"),
        (dict(steps=10, warmup_steps=0, curriculum_steps=5, n_support=8, n_support_start=9), "n_support_start must be <= n_support"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
        (dict(steps=10, warmup_steps=0, curriculum_steps=20), "curriculum_steps must be <= steps"),
    ],
)
def test_bad_config_values_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_yaml_run_config_numbers_in_exponent_notation_build_as_floats(tmp_path):
    """PyYAML reads `lr: 1e-3` (no decimal point) as the string '1e-3'; every number of a run
    config written that way must still build, as the floats written (min_lr used to be refused)."""
    from mi_krr.train import build_run, read_run_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {model_type: ICLTransformer, n_dims: 2, d_model: 16, n_layers: 1, n_heads: 2}\n"
                    "sampler: {sampler: gp_regression, dim: 2, bandwidth: 5e-1, noise_std: 2e-1, input_mean: 1e-1}\n"
                    "train: {steps: 4, warmup_steps: 1, curriculum_steps: 0, batch_size: 2, lr: 1e-3, min_lr: 1e-5, weight_decay: 1e-2, grad_clip: 1e0}\n")
    run = build_run(read_run_config(path))
    assert (run.cfg.lr, run.cfg.min_lr, run.cfg.weight_decay, run.cfg.grad_clip) == (1e-3, 1e-5, 1e-2, 1.0)
    assert all(type(value) is float for value in (run.cfg.lr, run.cfg.min_lr, run.cfg.weight_decay, run.cfg.grad_clip))
    assert (run.sampler.bandwidth, run.sampler.noise_std, run.sampler.input_mean) == (0.5, 0.2, 0.1)
