"""Finite-width feature maps: unbiased for their kernels within Monte-Carlo error, seeded, exact
where an exact finite map exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mi_krr.feature_maps import (
    LinearFeatures,
    PositiveRandomFeatures,
    RandomProjection,
    approximate_kernel,
    exact_feature_map,
)

RNG = np.random.default_rng(2024)
D = 3
# Points with |x| ~ 0.6-0.8, the regime the samplers produce.
POINTS = RNG.normal(size=(4, D)) * 0.4


def exp_reference(x: np.ndarray, z: np.ndarray, tau: float) -> float:
    return math.exp(float(np.dot(x, z)) / tau)


def gaussian_reference(x: np.ndarray, z: np.ndarray, sigma: float) -> float:
    return math.exp(-float(np.sum((x - z) ** 2)) / (2 * sigma**2))


def assert_within_standard_errors(samples: np.ndarray, expected: float, n_se: float = 4.0) -> None:
    """The sample mean is within `n_se` standard errors of `expected`, and the test has power
    (the standard error is under 2% of the expected value)."""
    mean = samples.mean()
    standard_error = samples.std(ddof=1) / math.sqrt(samples.size)
    assert standard_error < 0.02 * abs(expected), (standard_error, expected)
    assert abs(mean - expected) < n_se * standard_error, (mean, expected, standard_error)


@pytest.mark.parametrize(
    "kind,params,reference",
    [
        ("exp", {"temperature": 1.0}, lambda x, z: exp_reference(x, z, 1.0)),
        ("exp", {"temperature": 0.5}, lambda x, z: exp_reference(x, z, 0.5)),
        ("gaussian", {"bandwidth": 0.8}, lambda x, z: gaussian_reference(x, z, 0.8)),
    ],
)
def test_positive_random_features_are_unbiased_per_feature(kind, params, reference):
    m = 200_000
    features = PositiveRandomFeatures(D, m, kind=kind, seed=7, **params)
    phi = features(torch.tensor(POINTS)).numpy()  # [4, m]
    for i, j in [(0, 1), (2, 3), (1, 1)]:
        per_feature = m * phi[i] * phi[j]  # i.i.d. unbiased terms; phi(x).phi(z) is their mean
        assert_within_standard_errors(per_feature, reference(POINTS[i], POINTS[j]))


@pytest.mark.parametrize("kind,params", [("exp", {"temperature": 1.0}), ("gaussian", {"bandwidth": 1.0})])
def test_orthogonal_random_features_are_unbiased_across_seeds(kind, params):
    x = torch.tensor(POINTS)
    estimates = np.stack(
        [PositiveRandomFeatures(D, 12, kind=kind, seed=s, orthogonal=True, **params).kernel(x).numpy() for s in range(600)]
    )
    reference = exp_reference if kind == "exp" else gaussian_reference
    param = params.get("temperature", params.get("bandwidth"))
    for i, j in [(0, 1), (2, 3)]:
        assert_within_standard_errors(estimates[:, i, j], reference(POINTS[i], POINTS[j], param))


def test_orthogonal_features_come_in_exactly_orthogonal_blocks():
    weights = RandomProjection(4, 10, seed=3, orthogonal=True).weights.numpy()
    for start in (0, 4, 8):
        block = weights[:, start : start + 4]
        gram = block.T @ block
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-12)


def test_positive_features_match_the_closed_form_map():
    features = PositiveRandomFeatures(D, 5, kind="gaussian", bandwidth=0.7, seed=1)
    W = features.weights.numpy()
    x = POINTS[0]
    u = x / 0.7
    expected = np.array([math.exp(float(u @ W[:, k]) - float(u @ u)) for k in range(5)]) / math.sqrt(5)
    np.testing.assert_allclose(features(torch.tensor(x)).numpy(), expected, rtol=1e-13)
    assert np.all(features(torch.tensor(POINTS)).numpy() > 0)


def test_random_projection_is_unbiased_for_the_linear_kernel():
    m = 100_000
    phi = RandomProjection(D, m, seed=11)(torch.tensor(POINTS)).numpy()
    for i, j in [(0, 1), (2, 2)]:
        per_feature = m * phi[i] * phi[j]
        assert_within_standard_errors(per_feature, float(np.dot(POINTS[i], POINTS[j])))


def test_projected_kernel_is_a_rank_m_matrix_close_to_the_linear_kernel_for_large_m():
    x = torch.tensor(RNG.normal(size=(2, 20, 6)))
    projected = RandomProjection(6, 2, seed=0).kernel(x)
    assert projected.shape == (2, 20, 20)
    assert np.linalg.matrix_rank(projected[0].numpy()) == 2
    wide = RandomProjection(6, 50_000, seed=0).kernel(x).numpy()
    exact = np.einsum("bnd,bkd->bnk", x.numpy(), x.numpy())
    assert np.abs(wide - exact).max() < 0.1 * np.abs(exact).max()


def test_feature_maps_are_seeded_and_keep_dtype():
    x = torch.tensor(POINTS, dtype=torch.float32)
    a, b = PositiveRandomFeatures(D, 8, seed=5), PositiveRandomFeatures(D, 8, seed=5)
    assert torch.equal(a(x), b(x)) and a(x).dtype == torch.float32
    assert not torch.equal(a(x), PositiveRandomFeatures(D, 8, seed=6)(x))
    assert torch.equal(RandomProjection(D, 4, seed=2).weights, RandomProjection(D, 4, seed=2).weights)
    assert RandomProjection(D, 4)(x).shape == (4, 4)


def test_linear_kernel_has_the_identity_as_exact_feature_map():
    feature_map = exact_feature_map("linear", 4)
    assert isinstance(feature_map, LinearFeatures) and feature_map.out_dim == 4
    x, z = RNG.normal(size=(3, 5, 4)), RNG.normal(size=(3, 2, 4))
    np.testing.assert_allclose(
        approximate_kernel(torch.tensor(x), torch.tensor(z), feature_map).numpy(), np.einsum("bnd,bkd->bnk", x, z), rtol=1e-14
    )
    with pytest.raises(ValueError, match="PositiveRandomFeatures"):
        exact_feature_map("gaussian", 4)


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: RandomProjection(0, 4), "d"),
        (lambda: RandomProjection(3, 0), "m"),
        (lambda: PositiveRandomFeatures(3, 4, kind="relu"), "kind"),
        (lambda: PositiveRandomFeatures(3, 4, kind="exp", bandwidth=1.0), "bandwidth"),
        (lambda: PositiveRandomFeatures(3, 4, kind="exp", temperature=-1.0), "temperature"),
        (lambda: PositiveRandomFeatures(3, 4)(torch.zeros(2, 5, dtype=torch.float64)), "in_dim"),
        (lambda: exact_feature_map("cosine", 3), "kernel"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors_naming_them(build, argument):
    with pytest.raises(ValueError) as error:
        build()
    assert argument in str(error.value) and "\n" not in str(error.value)
