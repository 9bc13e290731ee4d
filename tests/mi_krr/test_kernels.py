"""mi_krr.kernels against brute-force NumPy loops and closed-form spectral limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mi_krr import kernels
from mi_krr.kernels import (
    KERNEL_NAMES,
    condition_number,
    effective_dimension,
    exp_kernel,
    gaussian_kernel,
    kernel_defaults,
    kernel_matrix,
    kernel_parameters,
    linear_kernel,
)

RNG = np.random.default_rng(12345)


def brute_force(name: str, x: np.ndarray, z: np.ndarray, param: float) -> np.ndarray:
    out = np.empty((x.shape[0], z.shape[0]))
    for i in range(x.shape[0]):
        for j in range(z.shape[0]):
            if name == "linear":
                out[i, j] = sum(a * b for a, b in zip(x[i], z[j]))
            elif name == "exp":
                out[i, j] = math.exp(sum(a * b for a, b in zip(x[i], z[j])) / param)
            else:
                out[i, j] = math.exp(-sum((a - b) ** 2 for a, b in zip(x[i], z[j])) / (2 * param**2))
    return out


CASES = [("linear", {}, 1.0), ("exp", {"temperature": 2.5}, 2.5), ("gaussian", {"bandwidth": 0.7}, 0.7)]


@pytest.mark.parametrize("name,params,param", CASES)
def test_kernels_match_brute_force_double_loops(name, params, param):
    x, z = RNG.normal(size=(6, 4)), RNG.normal(size=(5, 4))
    got = kernel_matrix(name, torch.tensor(x), torch.tensor(z), **params)
    np.testing.assert_allclose(got.numpy(), brute_force(name, x, z, param), rtol=1e-12, atol=1e-12)
    direct = {"linear": linear_kernel, "exp": exp_kernel, "gaussian": gaussian_kernel}[name]
    np.testing.assert_allclose(direct(torch.tensor(x), torch.tensor(z), **params).numpy(), got.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("name,params,param", CASES)
def test_batched_kernels_equal_per_prompt_kernels(name, params, param):
    x, z = RNG.normal(size=(2, 3, 7, 3)), RNG.normal(size=(2, 3, 4, 3))
    batched = kernel_matrix(name, torch.tensor(x), torch.tensor(z), **params).numpy()
    assert batched.shape == (2, 3, 7, 4)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(batched[a, b], brute_force(name, x[a, b], z[a, b], param), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,params,_", CASES)
def test_self_kernels_are_symmetric_psd_and_keep_dtype(name, params, _):
    x = torch.tensor(RNG.normal(size=(3, 9, 4)) * 0.5)
    K = kernel_matrix(name, x, **params)
    assert K.dtype == torch.float64 and K.shape == (3, 9, 9)
    np.testing.assert_array_equal(K.numpy(), np.swapaxes(K.numpy(), -1, -2))
    assert np.linalg.eigvalsh(K.numpy()).min() >= -1e-10
    assert kernel_matrix(name, x.float(), **params).dtype == torch.float32


def test_gaussian_kernel_is_exact_far_from_the_origin():
    # A common offset of 1e4 would wreck |x|^2 + |z|^2 - 2 x.z without centring.
    x = RNG.normal(size=(5, 3))
    shifted = torch.tensor(x + 1e4)
    np.testing.assert_allclose(gaussian_kernel(shifted).numpy(), brute_force("gaussian", x, x, 1.0), rtol=0, atol=1e-8)
    assert np.all(np.diag(gaussian_kernel(shifted).numpy()) == 1.0)


def test_feature_maps_are_reexported_from_kernels():
    from mi_krr import feature_maps

    for name in ("RandomProjection", "PositiveRandomFeatures", "LinearFeatures", "exact_feature_map", "approximate_kernel"):
        assert getattr(kernels, name) is getattr(feature_maps, name)


def effective_dimension_numpy(K: np.ndarray, lam: float) -> float:
    return float(np.trace(K @ np.linalg.inv(K + lam * np.eye(K.shape[0]))))


def test_effective_dimension_matches_trace_formula_batched():
    x = RNG.normal(size=(4, 12, 3)) / math.sqrt(3)
    K = np.stack([brute_force("gaussian", xb, xb, 1.0) for xb in x])
    got = effective_dimension(torch.tensor(K), 0.05)
    assert got.shape == (4,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), [effective_dimension_numpy(k, 0.05) for k in K], rtol=1e-10)
    sweep = effective_dimension(torch.tensor(K), torch.tensor([[0.01], [1.0]]))
    np.testing.assert_allclose(sweep.numpy()[1], [effective_dimension_numpy(k, 1.0) for k in K], rtol=1e-10)


def test_effective_dimension_limits_rank_and_trace_over_lambda():
    features = RNG.normal(size=(10, 3))
    K = features @ features.T  # rank 3
    # lam far above float64 rounding of the zero eigenvalues (~1e-14) and far below the others (~10)
    assert abs(float(effective_dimension(torch.tensor(K), 1e-7)) - 3.0) < 1e-4
    lam = 1e8
    np.testing.assert_allclose(float(effective_dimension(torch.tensor(K), lam)), np.trace(K) / lam, rtol=1e-6)


def test_condition_number_matches_numpy_cond():
    A = RNG.normal(size=(3, 8, 8))
    K = A @ np.swapaxes(A, -1, -2)
    for lam in (0.0, 0.3):
        expected = [np.linalg.cond(k + lam * np.eye(8)) for k in K]
        np.testing.assert_allclose(condition_number(torch.tensor(K), lam).numpy(), expected, rtol=1e-8)


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda x: exp_kernel(x, temperature=0.0), "temperature"),
        (lambda x: gaussian_kernel(x, bandwidth=-1.0), "bandwidth"),
        (lambda x: linear_kernel(x, torch.zeros(3, 5, dtype=torch.float64)), "z"),
        (lambda x: linear_kernel(torch.full((3, 4), float("nan"), dtype=torch.float64)), "x"),
        (lambda x: kernel_matrix("rbf", x), "kernel"),
        (lambda x: kernel_matrix("exp", x, bandwidth=1.0), "temperature"),
        (lambda x: effective_dimension(linear_kernel(x), 0.0), "lam"),
        (lambda x: effective_dimension(torch.ones(3, 4, dtype=torch.float64), 1.0), "K"),
        (lambda x: condition_number(torch.triu(torch.ones(3, 3, dtype=torch.float64))), "K"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors_naming_them(call, argument):
    x = torch.tensor(RNG.normal(size=(3, 4)))
    with pytest.raises(ValueError) as error:
        call(x)
    message = str(error.value)
    assert argument in message and "\n" not in message


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_defaults_are_the_values_a_kernel_uses_when_given_none(name):
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    defaults = kernel_defaults(name)
    assert set(defaults) == set(kernel_parameters(name))
    torch.testing.assert_close(kernel_matrix(name, x, **defaults), kernel_matrix(name, x), rtol=0, atol=0)
    if defaults:  # and a different value changes the kernel: the defaults are really used
        other = {key: 2.0 * value for key, value in defaults.items()}
        assert not torch.allclose(kernel_matrix(name, x, **other), kernel_matrix(name, x))
