"""Usage review: numerical edge cases a careful researcher hits across the solvers, kernels and
probes (extreme label scales, CG past convergence, half-precision and complex inputs, exp-kernel
overflow, strided / expanded / Fortran-ordered inputs, kernel gradients, label sensitivities at
y = 0, and the probes on a float32 model against the same model cast to float64).

References are independent of the library: SciPy's CG (`scipy.sparse.linalg.cg` with a callback),
`numpy.linalg.solve`, the GD matrix-polynomial closed form A^-1 (I - (I - eta A)^t) y from
`numpy.linalg.eigh`, closed-form kernel derivatives, the true residual y - (K + lam I) alpha_t
computed in NumPy, and central finite differences in float64. Tests marked xfail(strict=True)
asserted the correct behaviour of what was wrong when the review found it; all are fixed.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import probes
from mi_krr.kernels import effective_dimension, exp_kernel, gaussian_kernel
from mi_krr.solvers import cg, jacobi_cg, krr, richardson, solve

RNG = np.random.default_rng(20250101)


def gaussian_np(x: np.ndarray, z: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    """exp(-|x - z|^2 / (2 bandwidth^2)) by explicit differences."""
    return np.exp(-((x[..., :, None, :] - z[..., None, :, :]) ** 2).sum(-1) / (2 * bandwidth**2))


def scipy_cg_iterates(A: np.ndarray, b: np.ndarray, n_steps: int) -> np.ndarray:
    """Every iterate `[T+1, n]` of scipy.sparse.linalg.cg from x0 = 0 (tolerance 0)."""
    out = [np.zeros_like(b)]
    scipy.sparse.linalg.cg(A, b, x0=np.zeros_like(b), rtol=0.0, atol=0.0, maxiter=n_steps, callback=lambda x: out.append(x.copy()))
    return np.array(out)


# ----- solvers: findings ---------------------------------------------------------------------


@pytest.mark.parametrize("solver", [cg, jacobi_cg], ids=["cg", "jacobi_cg"])
@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_cg_residual_norm_is_the_true_residual_until_attainable_accuracy_as_documented(solver, backend):
    """n = 30 one-dimensional Gaussian-kernel points, lam = 1e-2 (cond ~ 2e3), T = 3n steps.
    `cg` documents residual_norm as the recursively updated residual: equal to the true residual
    ||y - (K + lam I) alpha_t|| (computed in NumPy from the returned alpha) while that is above
    float64's attainable accuracy, then falling below it while the true one stalls. Both halves
    are checked: within 1% at every step where the true residual exceeds 1e-10 ||y||, and far
    below it at the end."""
    rng = np.random.default_rng(3)
    n, lam = 30, 1e-2
    x = rng.standard_normal((n, 1))
    K, y = gaussian_np(x, x), rng.standard_normal(n)
    trajectory = solver(K, y, lam, 3 * n, backend=backend)
    true = np.linalg.norm(y - trajectory.alpha.numpy() @ (K + lam * np.eye(n)), axis=-1)
    reported = trajectory.residual_norm.numpy()
    above = true > 1e-10 * np.linalg.norm(y)
    assert above[:5].all() and not above[-1]
    np.testing.assert_allclose(reported[above], true[above], rtol=1e-2)
    assert reported[-1] < 1e-3 * true[-1]


@pytest.mark.parametrize("scale", [1e-160, 1e160])
@pytest.mark.parametrize("name", ["cg", "jacobi_cg"])
def test_cg_is_scale_equivariant_in_the_labels_at_extreme_scales(name, scale):
    """CG is linear-homogeneous in y: after n steps alpha(scale y) / scale must be
    numpy.linalg.solve's (K + lam I)^-1 y for finite labels of any float64 scale (or the input
    must be refused). Before `cg` rescaled such labels, 1e-160 gave alpha = 0 and 1e160 NaN."""
    n, lam = 6, 0.1
    x = RNG.standard_normal((n, 2))
    K, y = gaussian_np(x, x), RNG.standard_normal(n)
    exact = np.linalg.solve(K + lam * np.eye(n), y)
    alpha = solve(name, K, y * scale, lam, 3 * n).alpha[-1].numpy() / scale
    np.testing.assert_allclose(alpha, exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max())


@pytest.mark.parametrize("scale", [1e-160, 1e160])
@pytest.mark.parametrize("name", ["gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"])
def test_stationary_and_newton_solvers_are_scale_equivariant_in_the_labels(name, scale):
    """The same extreme label scales through the other registry solvers: after 60 steps
    alpha(scale y) / scale is the GD / Richardson / ... iterate at scale 1 that converges to
    numpy.linalg.solve's answer (chebyshev, heavy ball and newton to 1e-5; the optimal-step
    Richardson variants are still far from it, so they are checked against their own
    closed form, a NumPy loop at scale 1)."""
    n, lam, T = 6, 0.1, 60
    x = RNG.standard_normal((n, 2))
    K, y = gaussian_np(x, x), RNG.standard_normal(n)
    A = K + lam * np.eye(n)
    alpha = solve(name, K, y * scale, lam, T).alpha[-1].numpy() / scale
    if name in ("chebyshev", "heavy_ball", "newton"):
        exact = np.linalg.solve(A, y)
        np.testing.assert_allclose(alpha, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
        return
    P = {"gd": np.eye(n), "richardson_jacobi": np.diag(1 / np.diag(A)), "richardson_rowsum": np.diag(1 / K.sum(1))}[name]
    root = np.sqrt(P)
    mu = np.linalg.eigvalsh(root @ A @ root)
    step, reference = 2 / (mu[0] + mu[-1]), np.zeros(n)
    for _ in range(T):
        reference = reference + step * P @ (y - A @ reference)
    np.testing.assert_allclose(alpha, reference, rtol=0, atol=1e-10 * np.abs(reference).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_clearly_asymmetric_half_precision_matrix_is_refused_as_k(dtype):
    """A matrix 25% (bfloat16) / 3% (float16) asymmetric relative to its largest entry, e.g. a
    half-precision attention pattern passed as K, is no kernel matrix: it must be refused like the
    same matrix in float32 is (rounding of a half-precision kernel is ~1 ulp, 0.8% / 0.1%).
    (64 bfloat16 epsilons, the tolerance before, let it through the solvers and effective_dimension.)"""
    n = 6
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    K = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    asymmetric = (K + (0.1 if dtype == torch.bfloat16 else 0.01) * noise).to(dtype)
    assert float((asymmetric - asymmetric.mT).abs().max() / asymmetric.abs().max()) > 0.02
    with pytest.raises(ValueError, match="symmetric"):
        cg(asymmetric.float(), torch.ones(n), 1.0, 2)  # float32: refused
    with pytest.raises(ValueError, match="symmetric"):
        cg(asymmetric, torch.ones(n), 1.0, 2)
    with pytest.raises(ValueError, match="symmetric"):
        effective_dimension(asymmetric, 1.0)


@pytest.mark.parametrize("as_numpy", [False, True], ids=["tensor", "ndarray"])
def test_a_complex_kernel_matrix_is_refused_by_name(as_numpy):
    """A Hermitian complex matrix (2 I + a skew imaginary part) is not a real kernel matrix; krr
    solves its real part (alpha = 1/3 for y = 1, lam = 1) instead of raising a ValueError naming K."""
    K = torch.eye(3, dtype=torch.complex128) * 2 + 1j * torch.tensor([[0, 1, 0], [-1, 0, 0], [0, 0, 0.0]], dtype=torch.float64)
    y = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="K"):
        krr(K.numpy() if as_numpy else K, y.numpy() if as_numpy else y, 1.0)


def test_solvers_on_strided_transposed_expanded_and_fortran_inputs_follow_scipy_and_closed_forms():
    """K as a strided view of a larger tensor (every other row and column), as its transpose view,
    as a NumPy Fortran-ordered array, and one prompt expanded to a batch of 3 (stride 0): CG's
    iterates equal SciPy's CG, GD's the matrix-polynomial closed form A^-1 (I - (I - eta A)^t) y
    with eta = 2 / (mu_min + mu_max) from numpy.linalg.eigh, on every layout and both CG backends."""
    n, lam, T = 5, 0.3, 5
    x = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    K = gaussian_kernel(x)
    y = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    big = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    big[::2, ::2] = K
    layouts = {
        "strided": (big[::2, ::2], y),
        "transposed": (K.mT, y),
        "fortran": (np.asfortranarray(K.numpy()), y.numpy()),
        "expanded": (K.expand(3, n, n), y.expand(3, n)),
    }
    K_np, y_np = K.numpy(), y.numpy()
    A = K_np + lam * np.eye(n)
    cg_reference = scipy_cg_iterates(A, y_np, T)
    mu, U = np.linalg.eigh(A)
    eta = 2 / (mu[0] + mu[-1])
    gd_reference = np.array([U @ ((1 - (1 - eta * mu) ** t) / mu * (U.T @ y_np)) for t in range(T + 1)])
    for name, (K_in, y_in) in layouts.items():
        for backend in ("fused", "torch"):
            alpha = cg(K_in, y_in, lam, T, backend=backend).alpha.numpy().reshape(-1, T + 1, n)
            np.testing.assert_allclose(alpha, np.broadcast_to(cg_reference, alpha.shape), rtol=0, atol=1e-12, err_msg=f"{name} {backend}")
        alpha = richardson(K_in, y_in, lam, T).alpha.numpy().reshape(-1, T + 1, n)
        np.testing.assert_allclose(alpha, np.broadcast_to(gd_reference, alpha.shape), rtol=0, atol=1e-12, err_msg=name)


# ----- kernels -------------------------------------------------------------------------------


def test_exp_kernel_overflowing_float64_is_refused_naming_temperature():
    """|x|^2 / temperature ~ 1200 > log(float64 max) = 709: exp overflows to inf even in float64,
    which the docstring recommends against float32's overflow. The kernel must refuse it with a
    ValueError naming temperature (as GPRegressionSampler does), not return inf entries."""
    x = torch.full((1, 3, 3), 20.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature"):
        exp_kernel(x, temperature=1.0)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_kernel_gradients_match_closed_form_derivatives(offset):
    """d k(x_a, z_b) / d x_a by autograd (summed against a random upstream weight G) against the
    closed forms -(x_a - z_b) / bandwidth^2 k (Gaussian; also with every point shifted by 1e3,
    where the kernel centres the points) and z_b / temperature k (exp), in float64; the self
    Gaussian kernel's gradient gets both the row and the column contributions."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen) + offset
    z = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen) + offset
    G = torch.randn(2, 4, 5, dtype=torch.float64, generator=gen)
    bandwidth, temperature = 0.8, 2.0
    x_np, z_np, G_np = x.numpy(), z.numpy(), G.numpy()

    leaf = x.clone().requires_grad_(True)
    (gaussian_kernel(leaf, z, bandwidth=bandwidth) * G).sum().backward()
    k = gaussian_np(x_np, z_np, bandwidth)
    diff = x_np[:, :, None, :] - z_np[:, None, :, :]
    expected = -(G_np * k)[..., None] * diff / bandwidth**2
    np.testing.assert_allclose(leaf.grad.numpy(), expected.sum(2), rtol=1e-8, atol=1e-10)

    Gs = torch.randn(2, 4, 4, dtype=torch.float64, generator=gen)
    leaf = x.clone().requires_grad_(True)
    (gaussian_kernel(leaf, bandwidth=bandwidth) * Gs).sum().backward()
    ks = gaussian_np(x_np, x_np, bandwidth)
    diff = x_np[:, :, None, :] - x_np[:, None, :, :]
    weight = (Gs.numpy() + Gs.numpy().transpose(0, 2, 1)) * ks
    np.testing.assert_allclose(leaf.grad.numpy(), (-weight[..., None] * diff / bandwidth**2).sum(2), rtol=1e-8, atol=1e-10)

    if offset == 0.0:
        leaf = x.clone().requires_grad_(True)
        (exp_kernel(leaf, z, temperature=temperature) * G).sum().backward()
        ke = np.exp(x_np @ z_np.transpose(0, 2, 1) / temperature)
        expected = ((G_np * ke)[..., None] * z_np[:, None, :, :] / temperature).sum(2)
        np.testing.assert_allclose(leaf.grad.numpy(), expected, rtol=1e-10)


# ----- probes --------------------------------------------------------------------------------


def test_cg_sensitivity_at_zero_labels_is_refused_since_central_differences_there_are_not_a_derivative():
    """CG's prediction is odd and 1-homogeneous in y, so the central difference
    (pred(h e_i) - pred(-h e_i)) / 2h at y = 0 is pred_t(e_i), nonzero from step 1 on (checked),
    while no linear map matches every direction: CG has no derivative there, and autograd through
    the TINY clamps used to return exactly 0. A prompt with all-zero labels is refused naming y
    (the other prompts' sensitivities are still wanted: dropping the prompt is the fix)."""
    n, m, lam, T = 5, 2, 0.1, 3
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(n, 2, dtype=torch.float64, generator=gen), torch.randn(m, 2, dtype=torch.float64, generator=gen)
    K, K_query = gaussian_kernel(x), gaussian_kernel(q, x)
    h, fd = 1e-6, torch.zeros(T + 1, m, n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = h
        fd[..., i] = (cg(K, e, lam, T, K_query=K_query).pred - cg(K, -e, lam, T, K_query=K_query).pred) / (2 * h)
    assert fd[1:].abs().min() > 1e-3
    labels = torch.randn(3, n, dtype=torch.float64, generator=gen)
    labels[1] = 0.0
    with pytest.raises(ValueError, match=r"y is all zero in 1 prompt\(s\) \(flat indices \[1\]\)"):
        probes.solver_sensitivities("cg", K.expand(3, n, n), K_query.expand(3, m, n), lam, T, y=labels)


@pytest.fixture(scope="module")
def softmax_gp_in_both_precisions():
    from mi_krr.checkpoints import shipped_checkpoint
    from mi_krr.tasks import sampler_from_config
    from mi_krr.train import load_model, read_run_config

    run = shipped_checkpoint("softmax_gp")
    model = load_model(run)
    task = sampler_from_config(read_run_config(run)["sampler"]).sample(4, n_support=8, n_query=2, seed=7)
    return model, copy.deepcopy(model).double(), task


def test_probes_on_a_float32_model_agree_with_the_model_cast_to_float64(softmax_gp_in_both_precisions):
    """The shipped softmax_gp model (float32) and its float64 copy on the same float32 prompts: the
    read-out lens, the label sensitivities and every kernel-alignment metric and fitted scale agree
    to float32 accuracy (1e-4 of their size); the float64 model's sensitivities equal central
    finite differences of its own float64 lens (h = 1e-5) to 1e-7."""
    model32, model64, task = softmax_gp_in_both_precisions
    lens32, lens64 = probes.layer_predictions(model32, task), probes.layer_predictions(model64, task)
    assert lens32.dtype == lens64.dtype == torch.float64
    np.testing.assert_allclose(lens32.numpy(), lens64.numpy(), rtol=0, atol=1e-4 * float(lens64.abs().max()))

    sens32, sens64 = probes.label_sensitivities(model32, task), probes.label_sensitivities(model64, task)
    np.testing.assert_allclose(sens32.numpy(), sens64.numpy(), rtol=0, atol=1e-4 * float(sens64.abs().max()))

    task64 = task.to(dtype=torch.float64)
    h, fd = 1e-5, torch.zeros_like(sens64)
    for i in range(task.n_support):
        up, down = task64.y_support.clone(), task64.y_support.clone()
        up[:, i] += h
        down[:, i] -= h
        plus = probes.layer_predictions(model64, dataclasses.replace(task64, y_support=up))
        minus = probes.layer_predictions(model64, dataclasses.replace(task64, y_support=down))
        fd[..., i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(sens64.numpy(), fd.numpy(), rtol=0, atol=1e-7)

    align32, align64 = probes.kernel_alignment(model32, task), probes.kernel_alignment(model64, task)
    for kernel in ("exp", "gaussian"):
        np.testing.assert_allclose(align32.scale[kernel].numpy(), align64.scale[kernel].numpy(), rtol=1e-4)
        for metric, values in align64.per_prompt[kernel].items():
            np.testing.assert_allclose(align32.per_prompt[kernel][metric].numpy(), values.numpy(), rtol=0, atol=1e-4, err_msg=f"{kernel} {metric}")


def test_alignment_metrics_are_scale_invariant_for_large_unnormalised_kernels():
    """Every metric of `probes.alignment_metrics` is invariant to scaling both matrices by one
    constant; an unnormalised exp kernel reaches entries ~1e160 at x.z / temperature ~ 370, far
    inside float64. At scale 1e160 the operator distance must equal numpy.linalg.norm(., 2)'s
    ratio and CKA the NumPy double-centred formula, as at scale 1 (before the fix: _LinAlgError from eigh
    on the overflowed Gram matrix)."""
    rng = np.random.default_rng(0)
    A, B = rng.random((5, 5)), rng.random((5, 5))
    H = np.eye(5) - 1 / 5
    Ac, Bc = H @ A @ H, H @ B @ H
    expected_cka = (Ac * Bc).sum() / (np.linalg.norm(Ac) * np.linalg.norm(Bc))
    expected_distance = np.linalg.norm(A - B, 2) / np.linalg.norm(B, 2)
    for scale in (1.0, 1e160):
        metrics = probes.alignment_metrics(torch.tensor(A * scale), torch.tensor(B * scale))
        assert metrics["operator_distance"].item() == pytest.approx(expected_distance, rel=1e-10)
        assert metrics["cka"].item() == pytest.approx(expected_cka, rel=1e-10)
