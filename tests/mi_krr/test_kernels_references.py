"""Kernel and feature-map facts the other kernel tests leave open, each against an independent
reference: numpy.linalg.cond on indefinite matrices, brute-force kernel loops, NumPy
eigendecompositions (Eckart-Young, K^(1/2)) and the moments of the chi-squared law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mi_krr.feature_maps import PositiveRandomFeatures, ProjectedKernelFeatures, RandomProjection
from mi_krr.kernels import condition_number, effective_dimension, gaussian_kernel

RNG = np.random.default_rng(4242)


def gaussian_loop(x: np.ndarray, z: np.ndarray, bandwidth: float) -> np.ndarray:
    """exp(-|x_i - z_j|^2 / (2 bandwidth^2)) by a double loop: `[n, m]`."""
    return np.array([[math.exp(-float(np.sum((a - b) ** 2)) / (2 * bandwidth**2)) for b in z] for a in x])


def exp_loop(x: np.ndarray, z: np.ndarray, temperature: float) -> np.ndarray:
    """exp(x_i . z_j / temperature) by a double loop: `[n, m]`."""
    return np.array([[math.exp(float(a @ b) / temperature) for b in z] for a in x])


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_condition_number_of_indefinite_symmetric_matrices_matches_numpy_cond(lam):
    """cond(K + lam I) = max|mu + lam| / min|mu + lam| equals numpy.linalg.cond (2-norm) for indefinite K."""
    basis = np.linalg.qr(RNG.standard_normal((2, 5, 5)))[0]
    eigenvalues = np.array([[-3.0, -1.0, 0.5, 2.0, 4.0], [-6.0, -2.5, -1.5, 1.0, 3.0]])
    K = np.einsum("bij,bj,bkj->bik", basis, eigenvalues, basis)
    K = (K + np.swapaxes(K, -1, -2)) / 2
    expected = [np.linalg.cond(k + lam * np.eye(5)) for k in K]  # lam=0: [4 / 0.5, 6 / 1] = [8, 6]
    np.testing.assert_allclose(condition_number(torch.tensor(K), lam).numpy(), expected, rtol=1e-10)


def test_positive_random_features_target_kernels_match_brute_force_loops():
    """target_kernel is exp(x.z / tau) for kind='exp' and the Gaussian kernel of the bandwidth for kind='gaussian'."""
    x, z = RNG.standard_normal((4, 3)), RNG.standard_normal((5, 3))
    gaussian = PositiveRandomFeatures(3, 8, kind="gaussian", bandwidth=0.7).target_kernel(torch.tensor(x), torch.tensor(z))
    np.testing.assert_allclose(gaussian.numpy(), gaussian_loop(x, z, 0.7), rtol=1e-12)
    exp = PositiveRandomFeatures(3, 8, kind="exp", temperature=2.5).target_kernel(torch.tensor(x), torch.tensor(z))
    np.testing.assert_allclose(exp.numpy(), exp_loop(x, z, 2.5), rtol=1e-12)


@pytest.mark.parametrize("m", [1, 3, 10])
def test_projected_top_features_give_the_best_rank_m_approximation(m):
    """projection='top' gram equals K's best rank-m approximation from numpy eigh (exactly K for m >= N)."""
    points = RNG.standard_normal((2, 7, 3))
    features = ProjectedKernelFeatures("gaussian", 3, m, projection="top", bandwidth=1.3)
    gram = features.gram(torch.tensor(points)).numpy()
    assert features.prompt_features(torch.tensor(points)).shape == (2, 7, m)
    for b in range(2):
        K = gaussian_loop(points[b], points[b], 1.3)
        mu, U = np.linalg.eigh(K)
        top = np.argsort(mu)[::-1][: min(m, 7)]
        expected = (U[:, top] * mu[top]) @ U[:, top].T
        np.testing.assert_allclose(gram[b], expected, rtol=0, atol=1e-10)
        if m >= 7:
            np.testing.assert_allclose(gram[b], K, rtol=0, atol=1e-10)


def test_projected_gaussian_sketch_features_are_the_kernel_root_times_the_sketch():
    """projection='gaussian' features equal K^(1/2) R / sqrt(m), K^(1/2) from numpy eigh, R the documented sketch."""
    points = RNG.standard_normal((2, 6, 3))
    features = ProjectedKernelFeatures("exp", 3, 4, projection="gaussian", temperature=2.0, seed=5)
    got = features.prompt_features(torch.tensor(points)).numpy()
    sketch = features.sketch((2,), 6).numpy()
    assert sketch.shape == (2, 6, 4)
    for b in range(2):
        mu, U = np.linalg.eigh(exp_loop(points[b], points[b], 2.0))
        root = (U * np.sqrt(np.clip(mu, 0, None))) @ U.T
        np.testing.assert_allclose(got[b], root @ sketch[b] / math.sqrt(4), rtol=0, atol=1e-10)


def test_orthogonal_feature_lengths_follow_the_chi_law():
    """Orthogonal random features keep each column N(0, I_d): |w|^2 has the chi^2_d mean d and variance 2 d."""
    d, m = 4, 4000
    squared = (RandomProjection(d, m, seed=0, orthogonal=True).weights.numpy() ** 2).sum(0)
    # chi^2_4: mean 4, variance 8, fourth central moment 12 d (d + 4) = 384
    mean_se, variance_se = math.sqrt(8 / m), math.sqrt((384 - 8**2) / m)
    assert abs(squared.mean() - d) < 5 * mean_se
    assert abs(squared.var(ddof=1) - 2 * d) < 5 * variance_se


def test_gaussian_self_kernel_diagonal_is_exactly_one_for_spread_points():
    """With z=None, k(x, x) = exp(0) = 1 exactly, and the rest matches a brute-force loop."""
    x = RNG.standard_normal((40, 7)) * 3.0
    K = gaussian_kernel(torch.tensor(x), bandwidth=0.3).numpy()
    np.testing.assert_array_equal(np.diag(K), 1.0)
    np.testing.assert_allclose(K, gaussian_loop(x, x, 0.3), rtol=1e-10, atol=1e-300)


def test_condition_number_and_effective_dimension_judge_symmetry_per_matrix():
    """An asymmetric matrix beside a 1e9-scale symmetric one is refused, not silently symmetrised."""
    K = torch.tensor(np.stack([1e9 * np.eye(2), [[1.0, 0.5], [0.0, 1.0]]]))
    for call in (lambda: condition_number(K), lambda: effective_dimension(K, 0.1)):
        with pytest.raises(ValueError, match="symmetric"):
            call()


def test_condition_number_of_a_singular_matrix_is_inf():
    """cond(K + lam I) is inf where an eigenvalue of K + lam I is 0 (numpy.linalg.cond agrees)."""
    singular = np.stack([np.zeros((2, 2)), np.diag([2.0, 0.0]), np.diag([1.0, -0.5])])
    np.testing.assert_array_equal(condition_number(torch.tensor(singular[:2])).numpy(), [np.inf, np.inf])
    np.testing.assert_array_equal(condition_number(torch.tensor(singular[2:]), 0.5).numpy(), [np.inf])
    assert np.isinf(np.linalg.cond(np.diag([2.0, 0.0])))
