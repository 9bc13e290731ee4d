"""Mutation review of session 19's changes (349fc1d..00db03c in mi_krr/ and probes/).

Mutated: CG's label rescaling (`label_scale`, `_conjugate_gradient`), the complex refusal and
the half-precision symmetry tolerance (`mi_krr._validation`), exp_kernel's overflow refusal, the
scale-free spectral norm / CKA terms of `alignment_metrics`, `label_sensitivities`'
prompts_per_pass / progress, `solver_sensitivities`' column blocks, Newton sensitivities and the
all-zero-label refusal, `newton_schulz_inverses`, `attention_kernels(blocks=)` and diagnose's
progress postfix.

Counts: 53 mutants planted, 37 killed by the existing tests, 16 survived and are killed by the
tests below, 0 equivalent (the two meant as cost-only - the Gram matrix on the larger side, an
extra Newton-Schulz update - are killed by memory and flop counts). Survivors: CG's
residual_norm and pred not scaled back, the torch branch run on unscaled labels, the scale from
min |y|; float32 given 4 eps and half precision 1 eps of symmetry tolerance; exp_kernel refusing
only when every entry overflows, and its message's exponent and limit; label_sensitivities
dropping the last pass at prompts_per_pass=1 and inverting progress; the last one-column block
of solver_sensitivities dropped; prompts with any zero label refused; blocks="query" split into
characters; the first diagnose stage unnamed (killed by
tests/probes/test_usage_scale.py's progress-bar test, extended for it); one Newton-Schulz update too many.

Each test below kills at least one surviving mutant and asserts against a reference independent
of the library: SciPy's CG / preconditioned CG iterates at label scale 1 and the true residual
y - (K + lam I) alpha_t in NumPy; numpy.linalg.solve of the symmetrised matrix; log(float64 max)
and x . z in closed form; exact zero for ||A - A||_2; a NumPy forward of `ICLTransformer` from
its state dict (central finite differences of its read-out lens, and its layer-0 attention
pattern); the GD matrix polynomial in NumPy; central finite differences of CG in float64.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import probes
from icl_numpy_forward import numpy_lens_and_patterns
from mi_krr.kernels import exp_kernel, gaussian_kernel
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import cg, jacobi_cg, krr
from mi_krr.tasks import GPRegressionSampler

sensitivity_module = importlib.import_module("probes.sensitivity")


def gaussian_np(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.exp(-((x[:, None, :] - z[None, :, :]) ** 2).sum(-1) / 2)


def scipy_pcg_iterates(A: np.ndarray, b: np.ndarray, n_steps: int, M: np.ndarray | None = None) -> np.ndarray:
    """Every iterate `[T+1, n]` of scipy.sparse.linalg.cg from x0 = 0 (preconditioner M)."""
    out = [np.zeros_like(b)]
    scipy.sparse.linalg.cg(A, b, x0=np.zeros_like(b), rtol=0.0, atol=0.0, maxiter=n_steps, M=M, callback=lambda x: out.append(x.copy()))
    return np.array(out)


# ----- CG label rescaling (mutants: residual_norm / pred not scaled back, the torch branch
# run on the unscaled labels, the scale taken from min |y| instead of max |y|) ----------------


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("scale", [2.0**-530, 1e-160, 1e160])
@pytest.mark.parametrize("solver", [cg, jacobi_cg], ids=["cg", "jacobi_cg"])
def test_cg_at_extreme_label_scales_matches_scipy_in_alpha_pred_and_residual(solver, scale, backend):
    """Labels scale * y (one of them exactly 0) for T = 4 < n steps: alpha / scale and pred / scale
    are SciPy's (preconditioned) CG iterates at scale 1 and K_query times them, residual_norm /
    scale the true residual ||y - A alpha_t|| (still far above attainable accuracy at step 4)."""
    rng = np.random.default_rng(19)
    n, m, lam, T = 7, 3, 0.1, 4
    x, q = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    K, K_query, y = gaussian_np(x, x), gaussian_np(q, x), rng.standard_normal(n)
    y[2] = 0.0
    A = K + lam * np.eye(n)
    M = None if solver is cg else np.diag(1 / np.diag(A))
    reference = scipy_pcg_iterates(A, y, T, M)
    trajectory = solver(K, y * scale, lam, T, K_query=K_query, backend=backend)
    np.testing.assert_allclose(trajectory.alpha.numpy() / scale, reference, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(trajectory.pred.numpy() / scale, reference @ K_query.T, rtol=1e-9, atol=1e-12)
    true_residual = np.linalg.norm(y - reference @ A, axis=-1)
    np.testing.assert_allclose(trajectory.residual_norm.numpy() / scale, true_residual, rtol=1e-7)


# ----- symmetry tolerance (mutants: float32 given 4 eps, half precision given 1 eps) ----------


def _nudged(values: np.ndarray, dtype: torch.dtype, ulps: int) -> torch.Tensor:
    """values in `dtype` with entry [0, 1] moved `ulps` representable steps up."""
    K = torch.tensor(values).to(dtype)
    entry = K[0, 1].clone()
    for _ in range(ulps):
        entry = torch.nextafter(entry, torch.tensor(math.inf, dtype=dtype))
    K[0, 1] = entry
    return K


@pytest.mark.parametrize(
    "dtype, ulps", [(torch.float32, 64), (torch.bfloat16, 8), (torch.float16, 8)], ids=["float32", "bfloat16", "float16"]
)
def test_rounding_level_asymmetry_within_the_documented_epsilons_is_accepted(dtype, ulps):
    """symmetry_rtol documents 64 eps for float32 and 4 eps for half precision, compared as
    |(K - K^T) v| <= rtol |K v| for a probe v in [1, 2)^n. For K = [[1, 0.75], [0.75 + d, 1]]
    that ratio is d max(v) / max(v_0 + 0.75 v_1, 0.75 v_0 + v_1), within [d / 1.75, d / 1.375]
    for every such v: d = 32 eps (float32: 64 ulps of 0.75) gives 18-23 eps, d = 4 eps (half
    precision: 8 ulps) 2.3-2.9 eps, inside the tolerance and above 4 / 1 eps. krr must solve
    the symmetrised matrix (numpy.linalg.solve in float64)."""
    K = _nudged(np.array([[1.0, 0.75], [0.75, 1.0]]).T, dtype, ulps).mT.contiguous()
    eps = torch.finfo(dtype).eps
    Kd = K.double().numpy()
    assert Kd[1, 0] - Kd[0, 1] == pytest.approx((32 if dtype == torch.float32 else 4) * eps)
    y = np.array([1.0, -2.0])
    expected = np.linalg.solve((Kd + Kd.T) / 2 + 0.1 * np.eye(2), y)
    np.testing.assert_allclose(krr(K, torch.tensor(y), 0.1).numpy(), expected, rtol=1e-12)


# ----- exp_kernel overflow (mutants: refuse only when every entry overflows; message with the
# smallest exponent, or with float max instead of its log) ---------------------------------


def test_exp_kernel_refuses_a_single_overflowing_entry_and_names_the_largest_exponent():
    """Only x_0 . x_0 = 3 * 20^2 = 1200 exceeds log(float64 max) = 709.78 (closed forms); the
    other entries are exp(0) = 1. The error names that exponent and the limit."""
    x = torch.tensor([[20.0, 20.0, 20.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature") as error:
        exp_kernel(x, temperature=1.0)
    assert "reaches 1200," in str(error.value)
    assert f"= {math.log(np.finfo(np.float64).max):.4g}" in str(error.value)  # "= 709.8"


# ----- alignment_metrics (mutant: _largest_entry divides a zero matrix by 0) -----------------


def test_operator_distance_of_a_matrix_to_itself_is_exactly_zero():
    """||A - A||_2 / ||A||_2 = 0: the zero difference has spectral norm 0, not 0 / 0."""
    rng = np.random.default_rng(1)
    A = torch.tensor(rng.random((2, 4, 6)))
    metrics = probes.alignment_metrics(A, A)
    assert torch.equal(metrics["operator_distance"], torch.zeros(2, dtype=torch.float64))


# ----- label_sensitivities (mutants: the last prompt's pass dropped; progress bar inverted) ---


def tiny_model() -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=16, n_layers=2, n_heads=2, dtype="float64")).eval()


def test_label_sensitivities_one_prompt_per_pass_match_numpy_finite_differences():
    """prompts_per_pass=1 on 3 prompts: every prompt (the last one included) gets the central
    finite differences (h = 1e-6) of a NumPy forward's read-out lens at layers 1 and 2."""
    model = tiny_model()
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(3, 5, 2, seed=4, dtype=torch.float64)
    sens = probes.label_sensitivities(model, task, layers=[1, 2], prompts_per_pass=1).numpy()
    assert sens.shape == (3, 2, 2, 5)
    h = 1e-6
    for b in range(3):
        xs, ys, xq = (t[b].numpy() for t in (task.x_support, task.y_support, task.x_query))
        for i in range(5):
            e = np.zeros(5)
            e[i] = h
            fd = (numpy_lens_and_patterns(model, xs, ys + e, xq)[0] - numpy_lens_and_patterns(model, xs, ys - e, xq)[0]) / (2 * h)
            np.testing.assert_allclose(sens[b, :, :, i], fd[1:], rtol=0, atol=1e-7)


def test_label_sensitivities_show_a_bar_only_when_progress_is_asked(capsys):
    model = tiny_model()
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(2, 4, 1, seed=4, dtype=torch.float64)
    probes.label_sensitivities(model, task, layers=[1], prompts_per_pass=1)
    assert "label sensitivities" not in capsys.readouterr().err
    probes.label_sensitivities(model, task, layers=[1], prompts_per_pass=1, progress=True)
    assert "label sensitivities" in capsys.readouterr().err


# ----- solver_sensitivities (mutants: the last column block dropped; refusing any zero label) -


def test_linear_solver_sensitivities_one_column_per_block_match_the_numpy_gd_polynomial(monkeypatch):
    """With a budget of 1 byte every block holds one column: all n = 5 columns (the last one
    included) equal K_query (I - (I - eta A)^t) A^-1 e_i, eta = 2 / (mu_min + mu_max), in NumPy."""
    monkeypatch.setattr(sensitivity_module, "SENSITIVITY_COLUMN_BYTES", 1)
    rng = np.random.default_rng(5)
    n, m, lam, T = 5, 2, 0.1, 6
    x, q = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    K, K_query = gaussian_np(x, x), gaussian_np(q, x)
    sens = probes.solver_sensitivities("gd", torch.tensor(K), torch.tensor(K_query), lam, T).numpy()
    A = K + lam * np.eye(n)
    mu = np.linalg.eigvalsh(A)
    eta = 2 / (mu[0] + mu[-1])
    G = np.eye(n) - eta * A
    for t in range(T + 1):
        expected = K_query @ (np.eye(n) - np.linalg.matrix_power(G, t)) @ np.linalg.inv(A)
        np.testing.assert_allclose(sens[t], expected, rtol=0, atol=1e-12)


def test_cg_sensitivity_at_labels_with_one_zero_entry_matches_central_differences():
    """Only all-zero label vectors are refused: y with one zero entry is a regular point, where
    the autograd sensitivity equals central differences of CG's predictions (float64, h = 1e-6)."""
    gen = torch.Generator().manual_seed(3)
    n, m, lam, T = 5, 2, 0.1, 3
    x, q = torch.randn(n, 2, dtype=torch.float64, generator=gen), torch.randn(m, 2, dtype=torch.float64, generator=gen)
    K, K_query = gaussian_kernel(x), gaussian_kernel(q, x)
    y = torch.randn(n, dtype=torch.float64, generator=gen)
    y[1] = 0.0
    sens = probes.solver_sensitivities("cg", K, K_query, lam, T, y=y)
    h = 1e-6
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = h
        fd = (cg(K, y + e, lam, T, K_query=K_query).pred - cg(K, y - e, lam, T, K_query=K_query).pred) / (2 * h)
        np.testing.assert_allclose(sens[..., i].numpy(), fd.numpy(), rtol=0, atol=1e-6)


# ----- attention_kernels (mutant: blocks="query" split into characters) ----------------------


def test_attention_kernels_accept_one_block_named_by_a_string():
    """blocks="query" keeps the query block alone; it equals the layer-0 softmax pattern of a
    NumPy forward (query rows, support keys)."""
    model = tiny_model()
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(2, 5, 3, seed=6, dtype=torch.float64)
    kernels = probes.attention_kernels(model, task, blocks="query")
    assert kernels.support is None and kernels.query.shape == (2, 2, 2, 3, 5)
    for b in range(2):
        _, patterns = numpy_lens_and_patterns(model, *(t[b].numpy() for t in (task.x_support, task.y_support, task.x_query)))
        np.testing.assert_allclose(kernels.query[b, 0].numpy(), patterns[0][:, 5:, :5], rtol=0, atol=1e-13)


# ----- newton_schulz_inverses (mutant: one more matrix update after the last M_{T-1}) ---------


def test_newton_sensitivities_do_exactly_t_minus_1_matrix_updates():
    """M_0 .. M_{T-1} need T - 1 updates M <- 2M - M A M (two n x n products: 4 n^3 flops) and T
    products K_query M (2 m n^2): closed form B ((T - 1) 4 n^3 + T 2 m n^2), counted by
    torch's FlopCounterMode; an extra update would add B 4 n^3 (lower-order terms allowed: B n^3)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    B, n, m, T = 2, 16, 3, 5
    x, q = torch.randn(B, n, 2, generator=gen, dtype=torch.float64), torch.randn(B, m, 2, generator=gen, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        probes.solver_sensitivities("newton", gaussian_kernel(x), gaussian_kernel(q, x), 0.1, T)
    closed_form = B * ((T - 1) * 4 * n**3 + T * 2 * m * n**2)
    assert closed_form <= counter.get_total_flops() <= closed_form + B * n**3
