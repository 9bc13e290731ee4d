"""More task-sampler, shift, SPD-system and ICLTask checks against NumPy references, closed forms
and Monte-Carlo error bars (written from mutation-testing survivors)."""

from __future__ import annotations

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
    apply_shift,
    bayes_optimal_ridge,
    sample_spd_system,
    shift_applies,
)


def _lstsq_weights(task: ICLTask) -> np.ndarray:
    """Per-prompt w recovered from the noise-free query pairs (n_query >= d)."""
    x_q, y_q = task.x_query.numpy(), task.y_query.numpy()
    return np.stack([np.linalg.lstsq(x_q[b], y_q[b], rcond=None)[0] for b in range(task.batch_size)])


def test_input_scale_shift_scales_a_per_coordinate_mean():
    """input_scale x2 with a tuple input_mean: same-seed draws equal 2x the unshifted draws (NumPy)."""
    base = LinearRegressionSampler(3, input_mean=(0.2, -0.4, 1.0), condition_number=4.0)
    shifted = apply_shift(base, DEFAULT_SHIFTS["input_scale_x2"])
    a = base.sample(2, 9, 4, seed=8, dtype=torch.float64)
    b = shifted.sample(2, 9, 4, seed=8, dtype=torch.float64)
    np.testing.assert_allclose(b.x_support.numpy(), 2 * a.x_support.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.x_query.numpy(), 2 * a.x_query.numpy(), rtol=1e-12, atol=1e-14)


def test_mean_shift_moves_a_per_coordinate_mean_by_offset_input_stds():
    """mean_shift offset 1.5 on a tuple mean, input_std 1/sqrt(4) = 0.5: x moves by 0.75 per coordinate."""
    base = GPRegressionSampler(4, input_mean=(0.1, -0.2, 0.3, 0.0))
    shifted = apply_shift(base, Shift("mean_shift", {"offset": 1.5}))
    a = base.sample(3, 5, 2, seed=9, dtype=torch.float64)
    b = shifted.sample(3, 5, 2, seed=9, dtype=torch.float64)
    np.testing.assert_allclose((b.x_support - a.x_support).numpy(), 0.75, rtol=1e-12)
    np.testing.assert_allclose((b.x_query - a.x_query).numpy(), 0.75, rtol=1e-12)


def test_label_noise_shift_sets_the_support_residual_std():
    """label_noise 0.5 on a noise-free sampler: support residuals around x.w have std 0.5 (MC error bar)."""
    shifted = apply_shift(LinearRegressionSampler(3), DEFAULT_SHIFTS["label_noise_0.5"])
    task = shifted.sample(500, 10, 6, seed=3, dtype=torch.float64)
    noise = task.y_support.numpy() - np.einsum("bnd,bd->bn", task.x_support.numpy(), _lstsq_weights(task))
    # the std of N Gaussian draws has standard error sigma / sqrt(2 N)
    assert abs(noise.std() - 0.5) < 5 * 0.5 / math.sqrt(2 * noise.size)


def test_anisotropy_shift_gives_the_requested_condition_number():
    """anisotropy kappa=10: Cov(x) has NumPy condition number 10, and so (within MC error) do the samples."""
    shifted = apply_shift(LinearRegressionSampler(4), DEFAULT_SHIFTS["anisotropy_kappa10"])
    covariance = shifted.input_covariance().numpy()
    np.testing.assert_allclose(np.linalg.cond(covariance), 10.0, rtol=1e-10)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(covariance))[::-1], 10.0 ** (-np.arange(4) / 3), rtol=1e-10)
    n = 100_000
    x = shifted.sample(1, n, 0, seed=4, dtype=torch.float64).x_support[0].numpy()
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T))
    # each eigenvalue estimate has relative standard error ~ sqrt(2 / n); the ratio about twice that
    assert abs(eigenvalues[-1] / eigenvalues[0] / 10.0 - 1) < 5 * 2 * math.sqrt(2 / n)


def test_covariance_rotation_to_the_samplers_own_seed_is_refused():
    """A covariance_rotation to the sampler's own rotation_seed is no shift: not applicable, ValueError."""
    sampler = LinearRegressionSampler(3, condition_number=5.0, rotation_seed=7)
    same = Shift("covariance_rotation", {"rotation_seed": 7})
    assert not shift_applies(sampler, same)
    with pytest.raises(ValueError, match="rotation_seed"):
        apply_shift(sampler, same)
    assert shift_applies(sampler, Shift("covariance_rotation", {"rotation_seed": 8}))


def test_spd_system_seed_changes_the_draw_and_rhs_is_standard_normal():
    """Different seeds give different K and y; y has mean 0 and variance 1 within MC error bars."""
    a, b = sample_spd_system(2, 6, 10.0, seed=1), sample_spd_system(2, 6, 10.0, seed=2)
    assert not torch.allclose(a.matrix, b.matrix) and not torch.allclose(a.rhs, b.rhs)
    y = sample_spd_system(4000, 2, 3.0, seed=5).rhs.numpy().ravel()
    assert abs(y.mean()) < 5 / math.sqrt(y.size)
    assert abs(y.var() - 1.0) < 5 * math.sqrt(2 / y.size)


def test_spd_system_eigenvalues_are_descending_and_match_numpy():
    """SPDSystem.eigenvalues equals the closed form kappa^(-i/(n-1)) and NumPy's descending eigvalsh(K)."""
    kappa, n = 50.0, 7
    system = sample_spd_system(3, n, kappa, seed=2)
    closed_form = kappa ** (-np.arange(n) / (n - 1))
    np.testing.assert_allclose(system.eigenvalues.numpy(), closed_form, rtol=1e-12)
    for K in system.matrix.numpy():
        np.testing.assert_allclose(np.linalg.eigvalsh(K)[::-1], system.eigenvalues.numpy(), rtol=1e-10)


def test_select_indexes_every_field_along_the_batch():
    """select(list / tensor / slice) equals NumPy indexing of every field; a slice writes through."""
    task = LinearRegressionSampler(3).sample(5, 4, 2, seed=0, dtype=torch.float64)
    fields = ("x_support", "y_support", "x_query", "y_query")
    for index in ([3, 0, 3], torch.tensor([4, 1]), slice(1, 4)):
        numpy_index = index.numpy() if isinstance(index, torch.Tensor) else index
        chosen = task.select(index)
        for name in fields:
            np.testing.assert_array_equal(getattr(chosen, name).numpy(), getattr(task, name).numpy()[numpy_index], err_msg=name)
        assert chosen.info == task.info and chosen.info is not task.info
    view = task.select(slice(1, 4))
    view.y_query[0, 0] = 123.0
    assert task.y_query[1, 0] == 123.0


def test_icl_task_rejects_y_query_of_the_wrong_shape():
    """y_query must be [batch, n_query]: a [batch, n_support] or transposed one raises naming it."""
    x_s, y_s, x_q = torch.zeros(2, 3, 1), torch.zeros(2, 3), torch.zeros(2, 4, 1)
    for bad in (torch.zeros(2, 3), torch.zeros(4, 2)):
        with pytest.raises(ValueError, match="y_query"):
            ICLTask(x_s, y_s, x_q, bad)


def test_bayes_optimal_ridge_krr_equals_the_numpy_posterior_mean():
    """Linear: KRR with lam = bayes_optimal_ridge equals the NumPy Gaussian posterior mean of w ~ N(0, I/d);
    GP: the ridge is noise_std^2 (posterior mean K_* (K + s^2 I)^-1 y)."""
    d, noise_std = 4, 0.5
    sampler = LinearRegressionSampler(d, noise_std=noise_std)
    task = sampler.sample(3, 6, 5, seed=11, dtype=torch.float64)
    lam = bayes_optimal_ridge(sampler)
    assert bayes_optimal_ridge(sampler.to_config()) == lam
    for b in range(3):
        X, y, Xq = task.x_support[b].numpy(), task.y_support[b].numpy(), task.x_query[b].numpy()
        # posterior precision X^T X / s^2 + d I (prior covariance I / d), mean = cov X^T y / s^2
        posterior_mean = np.linalg.solve(X.T @ X / noise_std**2 + d * np.eye(d), X.T @ y / noise_std**2)
        krr = Xq @ X.T @ np.linalg.solve(X @ X.T + lam * np.eye(6), y)
        np.testing.assert_allclose(krr, Xq @ posterior_mean, rtol=1e-10, atol=1e-12)
    assert bayes_optimal_ridge(GPRegressionSampler(3, noise_std=0.3)) == pytest.approx(0.09, rel=1e-12)
