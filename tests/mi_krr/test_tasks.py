"""Task samplers, SPD systems and distribution shifts, checked against NumPy references and
Monte-Carlo error bars."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mi_krr.tasks import (
    DEFAULT_SHIFTS,
    GPRegressionSampler,
    ICLTask,
    LinearRegressionSampler,
    Shift,
    applicable_shifts,
    apply_shift,
    sample_spd_system,
    sampler_from_config,
)


def gaussian_gram(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.array([[math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)) for b in x] for a in x])


def exp_gram(x: np.ndarray, tau: float) -> np.ndarray:
    return np.array([[math.exp(float(a @ b) / tau) for b in x] for a in x])


def assert_covariance_within_mc_error(samples: np.ndarray, expected: np.ndarray, n_se: float = 5.0) -> None:
    """Empirical covariance of zero-mean `samples [N, p]` vs `expected [p, p]`: entry (i, j) of the
    mean of products has standard error sqrt((C_ij^2 + C_ii C_jj) / N) for Gaussian samples."""
    n = samples.shape[0]
    empirical = samples.T @ samples / n
    standard_error = np.sqrt((expected**2 + np.outer(np.diag(expected), np.diag(expected))) / n)
    assert np.all(np.abs(empirical - expected) < n_se * standard_error), np.abs(empirical - expected) / standard_error


SAMPLERS = [
    LinearRegressionSampler(4, noise_std=0.1),
    GPRegressionSampler(4, kernel="gaussian"),
    GPRegressionSampler(4, kernel="exp", condition_number=5.0),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name + "_" + getattr(s, "kernel", ""))
def test_samples_have_documented_shapes_dtype_and_info(sampler):
    task = sampler.sample(3, 7, 5, seed=0)
    assert isinstance(task, ICLTask)
    assert task.x_support.shape == (3, 7, 4) and task.y_support.shape == (3, 7)
    assert task.x_query.shape == (3, 5, 4) and task.y_query.shape == (3, 5)
    assert task.dtype == torch.float32
    assert sampler.sample(1, 2, 1, seed=0, dtype=torch.float64).dtype == torch.float64
    assert task.info["sampler"] == sampler.name and task.info["seed"] == 0
    assert task.info["noise_std"] == sampler.noise_std
    json.dumps(task.info)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name + "_" + getattr(s, "kernel", ""))
def test_same_seed_is_bit_identical_and_different_seeds_differ(sampler):
    a, b, c = (sampler.sample(2, 6, 3, seed=s) for s in (5, 5, 6))
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    from_generator = sampler.sample(2, 6, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(from_generator.y_support, a.y_support) and from_generator.info["seed"] is None
    unseeded = sampler.sample(2, 6, 3)
    replay = sampler.sample(2, 6, 3, seed=unseeded.info["seed"])
    assert torch.equal(unseeded.x_support, replay.x_support)


def test_active_dim_zeroes_the_trailing_coordinates():
    task = LinearRegressionSampler(6, input_mean=0.5).sample(4, 10, 3, seed=1, active_dim=2)
    assert torch.all(task.x_support[..., 2:] == 0) and torch.all(task.x_query[..., 2:] == 0)
    assert torch.all(task.x_support[..., :2] != 0)


def test_linear_labels_are_x_dot_w_with_w_of_variance_one_over_d():
    d = 5
    task = LinearRegressionSampler(d).sample(400, 8, 12, seed=2, dtype=torch.float64)
    x_q, y_q = task.x_query.numpy(), task.y_query.numpy()
    weights = np.stack([np.linalg.lstsq(x_q[b], y_q[b], rcond=None)[0] for b in range(400)])
    np.testing.assert_allclose(np.einsum("bnd,bd->bn", task.x_support.numpy(), weights), task.y_support.numpy(), atol=1e-10)
    # w ~ N(0, I/d): 2000 squared coordinates with mean 1/d and std sqrt(2)/d
    squares = weights.ravel() ** 2
    assert abs(squares.mean() - 1 / d) < 5 * squares.std(ddof=1) / math.sqrt(squares.size)


def test_label_noise_std_is_recovered_from_the_support_residuals():
    d, noise_std = 3, 0.3
    task = LinearRegressionSampler(d, noise_std=noise_std).sample(500, 10, 6, seed=3, dtype=torch.float64)
    x_q, y_q = task.x_query.numpy(), task.y_query.numpy()
    weights = np.stack([np.linalg.lstsq(x_q[b], y_q[b], rcond=None)[0] for b in range(500)])
    noise = task.y_support.numpy() - np.einsum("bnd,bd->bn", task.x_support.numpy(), weights)
    # the std of 5000 Gaussian draws has standard error sigma / sqrt(2 N)
    assert abs(noise.std() - noise_std) < 5 * noise_std / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 5 * noise_std / math.sqrt(noise.size)


@pytest.mark.parametrize(
    "sampler,gram",
    [
        (GPRegressionSampler(2, kernel="gaussian", bandwidth=0.8), lambda x: gaussian_gram(x, 0.8)),
        (GPRegressionSampler(2, kernel="exp", temperature=1.5), lambda x: exp_gram(x, 1.5)),
    ],
)
def test_gp_functions_at_fixed_inputs_have_the_kernel_covariance(sampler, gram):
    x = np.array([[0.0, 0.0], [0.5, -0.3], [1.0, 0.2], [-0.7, 0.7], [0.1, 0.1]])
    draws = sampler.sample_functions(torch.tensor(x).expand(20_000, 5, 2), seed=0).numpy()
    assert_covariance_within_mc_error(draws, gram(x))


def test_gp_noise_adds_its_variance_to_support_labels_only():
    # one support and one query point per prompt, so prompts are independent; k(x, x) = 1
    noise_std = 0.5
    task = GPRegressionSampler(3, noise_std=noise_std).sample(20_000, 1, 1, seed=4, dtype=torch.float64)
    y_s, y_q = task.y_support.numpy().ravel(), task.y_query.numpy().ravel()
    n = y_s.size
    assert abs(y_q.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(y_s.var() - (1.0 + noise_std**2)) < 5 * (1.0 + noise_std**2) * math.sqrt(2 / n)


def test_gp_inputs_default_to_unit_norm_on_average():
    d = 16
    task = GPRegressionSampler(d).sample(200, 20, 0, seed=5, dtype=torch.float64)
    squared_norms = (task.x_support**2).sum(-1).numpy().ravel()
    assert abs(squared_norms.mean() - 1.0) < 5 * math.sqrt(2 / d) / math.sqrt(squared_norms.size)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 300.0])
def test_condition_number_sets_a_geometric_input_spectrum(kappa):
    d = 4
    sampler = LinearRegressionSampler(d, condition_number=kappa, rotation_seed=9)
    covariance = sampler.input_covariance().numpy()
    expected_spectrum = kappa ** (-np.arange(d) / (d - 1))
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(covariance))[::-1], expected_spectrum, rtol=1e-10)
    np.testing.assert_allclose(np.linalg.cond(covariance), kappa, rtol=1e-10)
    x = sampler.sample(1, 100_000, 0, seed=6, dtype=torch.float64).x_support[0].numpy()
    assert_covariance_within_mc_error(x, covariance)


@pytest.mark.parametrize("kappa", [1.0, 7.5, 1e4])
def test_spd_system_has_exactly_the_requested_condition_number(kappa):
    system = sample_spd_system(5, 12, kappa, seed=3)
    K = system.matrix.numpy()
    assert K.shape == (5, 12, 12) and system.rhs.shape == (5, 12) and K.dtype == np.float64
    np.testing.assert_array_equal(K, np.swapaxes(K, -1, -2))
    np.testing.assert_allclose([np.linalg.cond(k) for k in K], kappa, rtol=1e-8)
    assert np.linalg.eigvalsh(K).min() > 0
    assert kappa == 1.0 or not np.allclose(K[0], K[1])  # kappa = 1 is K = I for every basis
    assert torch.equal(sample_spd_system(5, 12, kappa, seed=3).matrix, system.matrix)


def test_input_scale_shift_multiplies_inputs_and_norms():
    base = LinearRegressionSampler(3, input_mean=0.2, condition_number=4.0)
    shifted = apply_shift(base, DEFAULT_SHIFTS["input_scale_x2"])
    a, b = base.sample(2, 9, 4, seed=8, dtype=torch.float64), shifted.sample(2, 9, 4, seed=8, dtype=torch.float64)
    np.testing.assert_allclose(b.x_support.numpy(), 2 * a.x_support.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.y_query.numpy(), 2 * a.y_query.numpy(), rtol=1e-12, atol=1e-14)


def test_mean_shift_moves_the_input_mean_by_offset_input_stds():
    base = GPRegressionSampler(4)
    shifted = apply_shift(base, Shift("mean_shift", {"offset": 1.5}))
    a, b = base.sample(3, 5, 2, seed=9, dtype=torch.float64), shifted.sample(3, 5, 2, seed=9, dtype=torch.float64)
    np.testing.assert_allclose((b.x_support - a.x_support).numpy(), 1.5 * 0.5, rtol=1e-12)
    x = shifted.sample(10_000, 5, 0, seed=1, dtype=torch.float64).x_support.reshape(-1, 4).numpy()
    assert np.all(np.abs(x.mean(0) - 0.75) < 5 * 0.5 / math.sqrt(50_000))


def test_covariance_rotation_keeps_the_spectrum_and_rotates_the_basis():
    base = LinearRegressionSampler(4, condition_number=20.0)
    shifted = apply_shift(base, DEFAULT_SHIFTS["covariance_rotation"])
    before, after = base.input_covariance().numpy(), shifted.input_covariance().numpy()
    np.testing.assert_allclose(np.linalg.eigvalsh(after), np.linalg.eigvalsh(before), rtol=1e-10)
    top_before, top_after = np.linalg.eigh(before)[1][:, -1], np.linalg.eigh(after)[1][:, -1]
    assert abs(top_before @ top_after) < 0.99
    x = shifted.sample(1, 100_000, 0, seed=2, dtype=torch.float64).x_support[0].numpy()
    assert_covariance_within_mc_error(x, after)


def test_longer_prompts_shift_scales_the_number_of_support_pairs():
    shifted = apply_shift(GPRegressionSampler(2), DEFAULT_SHIFTS["longer_prompts_x2"])
    task = shifted.sample(2, 10, 3, seed=0)
    assert task.n_support == 20 and task.n_query == 3


@pytest.mark.parametrize(
    "base,gram",
    [
        (GPRegressionSampler(2, kernel="gaussian", bandwidth=1.0), lambda x: gaussian_gram(x, 0.5)),
        (GPRegressionSampler(2, kernel="exp", temperature=1.0), lambda x: exp_gram(x, 0.25)),
    ],
)
def test_bandwidth_shift_changes_the_gp_covariance(base, gram):
    shifted = apply_shift(base, DEFAULT_SHIFTS["bandwidth_x0.5"])
    x = np.array([[0.0, 0.0], [0.4, -0.3], [0.9, 0.2], [-0.5, 0.5]])
    draws = shifted.sample_functions(torch.tensor(x).expand(20_000, 4, 2), seed=1).numpy()
    assert_covariance_within_mc_error(draws, gram(x))


def test_bandwidth_shift_is_refused_for_linear_regression():
    sampler = LinearRegressionSampler(3)
    assert "bandwidth_x2" not in applicable_shifts(sampler) and "input_scale_x2" in applicable_shifts(sampler)
    with pytest.raises(ValueError, match="bandwidth.*GP"):
        apply_shift(sampler, DEFAULT_SHIFTS["bandwidth_x2"])
    with pytest.raises(ValueError, match="anisotropic"):
        apply_shift(sampler, DEFAULT_SHIFTS["covariance_rotation"])


@pytest.mark.parametrize("sampler", [LinearRegressionSampler(3, condition_number=3.0), GPRegressionSampler(3, kernel="exp")])
def test_shifted_samplers_round_trip_through_json_configs(sampler):
    assert sampler_from_config(json.loads(json.dumps(sampler.to_config()))) == sampler
    for label, shift in applicable_shifts(sampler).items():
        shifted = apply_shift(sampler, shift)
        rebuilt = sampler_from_config(json.loads(json.dumps(shifted.to_config())))
        assert rebuilt == shifted and rebuilt != sampler, label
        assert torch.equal(rebuilt.sample(2, 4, 2, seed=1).y_support, shifted.sample(2, 4, 2, seed=1).y_support)
        assert Shift.from_config(json.loads(json.dumps(shift.to_config()))) == shift


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: LinearRegressionSampler(0), "dim"),
        (lambda: LinearRegressionSampler(3, noise_std=-0.1), "noise_std"),
        (lambda: LinearRegressionSampler(3, condition_number=0.5), "condition_number"),
        (lambda: LinearRegressionSampler(3, input_mean=(1.0, 2.0)), "input_mean"),
        (lambda: GPRegressionSampler(3, kernel="rbf"), "kernel"),
        (lambda: GPRegressionSampler(3, bandwidth=0.0), "bandwidth"),
        (lambda: LinearRegressionSampler(3).sample(2, 4, 1, seed=0, active_dim=4), "active_dim"),
        (lambda: LinearRegressionSampler(3).sample(0, 4, 1, seed=0), "batch_size"),
        (lambda: LinearRegressionSampler(3).sample(2, 4, 1, seed=-1), "seed"),
        (lambda: LinearRegressionSampler(3).sample(2, 4, 1, seed=0, generator=torch.Generator()), "generator"),
        (lambda: sampler_from_config({"sampler": "polynomial", "dim": 3}), "sampler"),
        (lambda: sampler_from_config({"sampler": "linear_regression", "dim": 3, "width": 2}), "width"),
        (lambda: Shift("rotate", {"angle": 1.0}), "kind"),
        (lambda: Shift("input_scale", {"scale": 2.0}), "factor"),
        (lambda: Shift("input_scale", {"factor": -2.0}), "factor"),
        (lambda: sample_spd_system(2, 5, 0.5), "kappa"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors_naming_them(call, argument):
    with pytest.raises(ValueError) as error:
        call()
    assert argument in str(error.value) and "\n" not in str(error.value)
