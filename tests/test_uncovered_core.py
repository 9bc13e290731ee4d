"""Branches of mi_krr's core (kernels, feature maps, tasks, solvers, constructions) and of the
probes that the rest of the suite left unexecuted: bad arguments through the public API (each a
one-line ValueError naming the argument), the rarer normal paths checked against NumPy / closed
forms / hand-built values. The review that wrote it found two behaviours wrong, both fixed: NumPy
scalar input means were refused, and the singular-kernel error advised raising the bandwidth."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import probes
from mi_krr.construct import ResidualLayout, cg_transformer, gd_transformer, kernel_feature_map
from mi_krr.construct.studies import ReluWidthStudy, width_study
from mi_krr.feature_maps import LinearFeatures, PositiveRandomFeatures, ProjectedKernelFeatures
from mi_krr.kernels import condition_number, effective_dimension, exp_kernel, gaussian_kernel, linear_kernel
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import cg, chebyshev, krr
from mi_krr.solvers.trajectory import Trajectory
from mi_krr.tasks import (
    GPRegressionSampler,
    ICLTask,
    LinearRegressionSampler,
    Shift,
    bayes_optimal_ridge,
    sample_spd_system,
    sampler_from_config,
)
from probes.diagnose import diagnose
from probes.diagnosis import Diagnosis
from probes.scoring import mse_matrix
from probes.step_sizes import scalar_jacobi

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")

LAM = 0.1


def points(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def numpy_krr_predictions(x_support: np.ndarray, y: np.ndarray, x_query: np.ndarray, lam: float) -> np.ndarray:
    """Linear-kernel KRR predictions per prompt, by np.linalg.solve."""
    out = np.empty(x_query.shape[:2])
    for b in range(x_support.shape[0]):
        K = x_support[b] @ x_support[b].T
        alpha = np.linalg.solve(K + lam * np.eye(K.shape[0]), y[b])
        out[b] = x_query[b] @ x_support[b].T @ alpha
    return out


# ----- mi_krr._validation (through the public functions that call it) ---------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: effective_dimension(torch.eye(3, dtype=torch.float64), "big"), r"lam must be a numeric array or tensor, got str"),
        (lambda: krr(torch.eye(2, dtype=torch.float64), ["a", "b"], LAM), r"y must be a numeric array or tensor, got list"),
        (lambda: exp_kernel(points(3, 2), temperature="hot"), r"temperature must be a positive number, got 'hot'"),
        (lambda: gaussian_kernel(points(3, 2), bandwidth=None), r"bandwidth must be a positive number, got None"),
        (lambda: LinearRegressionSampler(2, noise_std=True), r"noise_std must be a finite number >= 0, got True"),
        (lambda: LinearRegressionSampler(2, noise_std="loud"), r"noise_std must be a finite number >= 0, got 'loud'"),
        (lambda: ICLTransformerConfig.from_dict([("n_dims", 2)]), r"ICLTransformerConfig must be built from a dict of its fields \(ICLTransformerConfig\.from_dict\(\{\.\.\.\}\)\), got list"),
    ],
)
def test_non_numeric_arguments_raise_one_line_errors_naming_them(call, match):
    """Strings, None, booleans and lists where a number or array is due: a one-line ValueError
    naming the argument and what it must be (the checks in mi_krr._validation)."""
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


# ----- mi_krr.kernels -----------------------------------------------------------------------------


def test_kernels_take_numpy_arrays_and_nested_lists_as_float64_tensors():
    """Non-tensor points are converted to float64 tensors: the linear kernel of a NumPy array and of
    nested lists equals NumPy's x @ z.T."""
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    got = linear_kernel(x, z)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), x @ z.T, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(linear_kernel(x.tolist()).numpy(), x @ x.T, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    "x,z,match",
    [
        ([[1.0, "a"]], None, r"x must be numeric points \[\.\.\., n, d\] .*got a list NumPy cannot read as one"),
        (torch.ones(3, 2, dtype=torch.int64), None, r"x must be a floating-point tensor, got torch.int64: call \.double\(\) first"),
        (torch.ones(3, dtype=torch.float64), None, r"x must have at least 2 dimensions"),
        (points(3, 2), points(2, 2).float(), r"z must have the dtype of x \(torch.float64\), got torch.float32: cast one of them"),
        (points(2, 3, 4), points(3, 5, 4), r"z's leading \(batch\) shape \(3,\) does not broadcast with x's \(2,\): give z the batch shape of x"),
    ],
)
def test_kernel_points_are_checked(x, z, match):
    """Non-numeric, integer, 1-d, dtype-mismatched and non-broadcasting points raise a ValueError
    naming x or z."""
    with pytest.raises(ValueError, match=match):
        linear_kernel(x, z)


@needs_cuda
def test_kernel_points_on_two_devices_are_refused():
    """z on another device than x: a ValueError naming both devices."""
    with pytest.raises(ValueError, match=r"z must be on the device of x \(cpu\), got cuda"):
        linear_kernel(points(3, 2), points(2, 2).cuda())


def test_condition_number_refuses_a_negative_ridge():
    """condition_number(K, lam < 0) raises naming lam (cond(K + lam I) is defined for lam >= 0)."""
    with pytest.raises(ValueError, match=r"lam must be >= 0 \(a ridge\), got -"):
        condition_number(torch.eye(3, dtype=torch.float64), -0.5)


# ----- mi_krr.feature_maps ------------------------------------------------------------------------


def test_linear_features_give_the_linear_kernel_and_report_their_dims():
    """LinearFeatures(d).kernel(x, z) equals NumPy's x @ z.T; in_dim = out_dim = d; the positive
    random features report in_dim d and out_dim m as constructed."""
    x, z = points(5, 3, seed=1), points(4, 3, seed=2)
    features = LinearFeatures(3)
    np.testing.assert_allclose(features.kernel(x, z).numpy(), x.numpy() @ z.numpy().T, rtol=1e-14, atol=1e-14)
    assert (features.in_dim, features.out_dim) == (3, 3)
    prf = PositiveRandomFeatures(3, 7, kind="gaussian")
    assert (prf.in_dim, prf.out_dim) == (3, 7)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: PositiveRandomFeatures(2, 4, kind="gaussian", temperature=1.0), r"temperature applies to kind='exp' only: set bandwidth"),
        (lambda: ProjectedKernelFeatures("linear", 2, 3, temperature=1.0), r"temperature does not apply to kernel 'linear': leave it None"),
        (lambda: ProjectedKernelFeatures("linear", 2, 3).prompt_features(points(1, 4, 3)),
         r"points must have feature dimension in_dim=2, got 3"),
    ],
)
def test_feature_maps_refuse_parameters_of_another_kernel_and_wrong_widths(build, match):
    """A kernel parameter the kernel does not take, or points of the wrong dimension: a ValueError
    naming the argument and the fix."""
    with pytest.raises(ValueError, match=match):
        build()


# ----- mi_krr.tasks -------------------------------------------------------------------------------


def _task_fields(**overrides):
    fields = dict(
        x_support=points(2, 3, 2), y_support=points(2, 3), x_query=points(2, 1, 2), y_query=points(2, 1)
    )
    fields.update(overrides)
    return fields


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"y_support": np.zeros((2, 3))}, r"y_support must be a torch.Tensor, got ndarray: wrap it with torch.as_tensor"),
        ({"x_query": torch.zeros(2, 1, 2, dtype=torch.int64)}, r"x_query must be a floating-point tensor, got torch.int64"),
        ({"y_query": torch.tensor([[np.nan], [0.0]])}, r"y_query contains NaN or inf"),
        ({"x_support": points(2, 3), "y_support": points(2)}, r"x_support must be \[batch, n_support, d\], got shape \(2, 3\)"),
        ({"x_support": points(2, 0, 2), "y_support": points(2, 0)}, r"x_support must hold at least one support point"),
        ({"x_query": points(2, 1, 3)}, r"x_query must be \[batch=2, n_query, d=2\], got shape \(2, 1, 3\)"),
        ({"y_support": points(2, 4)}, r"y_support must be \[batch=2, n_support=3\], got shape \(2, 4\)"),
    ],
)
def test_icl_task_checks_its_tensors(overrides, match):
    """ICLTask's construction checks: non-tensors, integer dtypes, NaN, wrong ranks and mismatched
    shapes each raise a ValueError naming the field."""
    with pytest.raises(ValueError, match=match):
        ICLTask(**_task_fields(**overrides))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bayes_optimal_ridge({"sampler": "gp_regression"}), r"info_or_sampler has no 'noise_std'"),
        (lambda: sample_spd_system(2, 1, kappa=2.0), r"kappa must be 1 when n == 1"),
        (lambda: LinearRegressionSampler(1, condition_number=4.0), r"condition_number must be 1 when dim == 1"),
        (lambda: LinearRegressionSampler(2, input_mean="ab"), r"input_mean must be a float or a sequence of dim=2 floats, got 'ab'"),
        (lambda: LinearRegressionSampler(2, input_mean=None), r"input_mean must be a float or a sequence of dim=2 floats, got None"),
        (lambda: LinearRegressionSampler(2).sample(1, 2, 1, seed=0, dtype=torch.int32), r"dtype must be a floating torch.dtype"),
        (lambda: sampler_from_config([("sampler", "gp_regression")]), r"config must be a dict with a 'sampler' key"),
        (lambda: Shift.from_config({"kind": "input_scale"}), r"config must be \{'kind': \.\.\., 'params': \{\.\.\.\}\}"),
    ],
)
def test_task_constructors_refuse_bad_arguments(call, match):
    """Samplers, SPD systems, shifts and the Bayes ridge: each bad argument is a ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        call()


@needs_cuda
def test_samplers_refuse_a_cuda_generator():
    """Draws happen on the CPU: a CUDA generator is refused, naming its device."""
    with pytest.raises(ValueError, match=r"generator must be a CPU torch.Generator"):
        LinearRegressionSampler(2).sample(1, 2, 1, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("mean", [np.float32(0.5), np.int64(1)])
def test_numpy_scalar_input_means_are_taken_like_python_numbers(mean):
    """input_mean=np.float32(0.5) / np.int64(1) should act as the Python number: the mean vector
    is that value on every coordinate, stored as a JSON-serialisable float (noise_std and the other
    scalar fields take NumPy scalars; only input_mean's isinstance(int, float) test refuses them)."""
    sampler = LinearRegressionSampler(2, input_mean=mean)
    np.testing.assert_array_equal(sampler.input_mean_vector().numpy(), [float(mean)] * 2)
    json.dumps(sampler.to_config())


def test_gp_sampler_fails_for_a_singular_kernel_and_lowering_the_bandwidth_fixes_it():
    """With jitter=0 the Cholesky factor of a Gaussian kernel matrix fails once the bandwidth is
    large against the points' spread (K -> the all-ones matrix), and succeeds for the same points
    at a small bandwidth: the independent fact the error's advice should follow. Duplicate points
    make K exactly singular (all ones)."""
    x = points(1, 30, 2) / 2**0.5
    GPRegressionSampler(2, bandwidth=0.2, jitter=0.0).sample_functions(x, seed=0)
    with pytest.raises(ValueError, match=r"the gaussian kernel matrix is not numerically positive definite at jitter=0.0"):
        GPRegressionSampler(2, bandwidth=10.0, jitter=0.0).sample_functions(x, seed=0)
    with pytest.raises(ValueError, match=r"not numerically positive definite"):
        GPRegressionSampler(2, jitter=0.0).sample_functions(torch.zeros(1, 3, 2, dtype=torch.float64), seed=0)


@pytest.mark.parametrize("kernel,params", [("gaussian", {"bandwidth": 10.0}), ("exp", {"temperature": 100.0})])
def test_singular_gp_kernel_error_gives_advice_that_helps(kernel, params):
    """The failure above comes from a bandwidth (temperature) too LARGE for the points (the previous
    test: lowering it fixes the factorisation), so the message must advise lowering it (or raising
    jitter), not raising it."""
    x = points(1, 30, 2) / 2**0.5
    with pytest.raises(ValueError) as error:
        GPRegressionSampler(2, kernel=kernel, jitter=0.0, **params).sample_functions(x, seed=0)
    advice = re.search(r"\b(lower|reduce|decrease)\b[^.;]*\b(bandwidth|temperature)\b", str(error.value))
    assert advice, str(error.value)


# ----- mi_krr.solvers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: chebyshev(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), LAM, 2, eig_bounds=0.5),
         r"eig_bounds must be a pair \(low, high\), got 0.5"),
        (lambda: chebyshev(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), LAM, 2, eig_bounds=(0.1, 1.0, 2.0)),
         r"eig_bounds must be a pair \(low, high\)"),
        (lambda: cg(np.zeros((0, 0)), np.zeros(0), LAM, 2), r"K must hold at least one support point \(n >= 1\), got n = 0"),
    ],
)
def test_solvers_refuse_malformed_bounds_and_empty_systems(call, match):
    """Chebyshev's eig_bounds must be a (low, high) pair; a 0 x 0 system has nothing to solve."""
    with pytest.raises(ValueError, match=match):
        call()


@needs_cuda
def test_fused_cg_refuses_a_cuda_system():
    """backend='fused' is a CPU loop: a CUDA system is refused, naming the device and the fix."""
    system = sample_spd_system(1, 3, 2.0, device="cuda")
    with pytest.raises(ValueError, match=r"backend='fused' runs on the CPU, not cuda.*pass backend='torch'"):
        cg(system.matrix, system.rhs, LAM, 2, backend="fused")


# ----- mi_krr.construct ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cg_transformer(2, LAM, dim=3, feature_map=LinearFeatures(2)), r"feature_map must have in_dim == dim \(3\), got 2"),
        (lambda: width_study(widths=()), r"widths, kernels and heads must each name at least one value"),
        (lambda: ResidualLayout([("x", 3), ("y", 1)]).index("x"), r"'x' is a block of 3 coordinates: use span\('x'\)"),
        (lambda: gd_transformer(1, 0.1, dim=2)(torch.zeros(1, 3, 5, dtype=torch.float64)),
         r"tokens must be \[batch, seq, d_token=6\], got shape \(1, 3, 5\): build them with model.encode\(task\)"),
        (lambda: gd_transformer(1, 0.1, dim=2).encode({"x_support": None}), r"task must be an mi_krr.tasks.ICLTask, got dict"),
    ],
)
def test_constructions_refuse_bad_arguments(call, match):
    """Hand-built transformers and their layout: each misuse is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()


def test_cg_transformer_gaussian_head_is_positive_random_features_estimating_the_gaussian_kernel():
    """kernel="gaussian" with a head width: the head is m positive random features of that
    bandwidth, whose inner products estimate the brute-force Gaussian kernel (m = 65536: within
    0.03 on points of norm <= 0.6, where these features' variance is small)."""
    model = cg_transformer(1, LAM, kernel="gaussian", head_width=8, bandwidth=0.7, dim=2)
    head = model.feature_map
    assert isinstance(head, PositiveRandomFeatures) and (head.kind, head.bandwidth, head.in_dim, head.out_dim) == ("gaussian", 0.7, 2, 8)
    x = 0.3 * points(6, 2, seed=3)
    wide = kernel_feature_map("gaussian", 2, 65536, 1.0, 0.7, 0)
    a = x.numpy()
    brute = np.array([[np.exp(-np.sum((p - q) ** 2) / (2 * 0.7**2)) for q in a] for p in a])
    np.testing.assert_allclose(wide.kernel(x).numpy(), brute, rtol=0, atol=0.03)


def test_residual_layout_spans_follow_the_documented_gd_layout():
    """gd_transformer's layout (module docstring: 0 is_support, 1 is_query, 2 is_aux, x [dim], y, s,
    and g when lam > 0) read back through spans(), and a hand-built layout's spans."""
    layout = gd_transformer(1, 0.1, lam=0.1, dim=3).layout
    assert layout.spans() == {
        "is_support": (0, 1), "is_query": (1, 2), "is_aux": (2, 3), "x": (3, 6), "y": (6, 7), "s": (7, 8), "g": (8, 9)
    }
    assert ResidualLayout([("a", 2)]).spans() == {"is_support": (0, 1), "is_query": (1, 2), "is_aux": (2, 3), "a": (3, 5)}


def test_state_tokens_name_the_documented_token_of_each_state_and_are_a_copy():
    """gd_transformer's states s and y live on support tokens (module docstring); the property
    returns a copy, so editing it leaves the model unchanged."""
    model = gd_transformer(1, 0.1, dim=2)
    tokens = model.state_tokens
    assert tokens == {"s": "support", "y": "support"}
    tokens["s"] = "query"
    assert model.state_tokens == {"s": "support", "y": "support"}


def test_width_study_measures_random_features_at_the_main_ridge_only():
    """With extra ridges, the random-features head is measured at lam only (asking for it at
    another ridge names the curves measured), the top-eigen head at every ridge. At width m >= N
    the top-eigen head is K itself and n CG steps on n points are exact, so its error to oracle
    KRR is ~0; d_eff matches tr K (K + lam I)^-1 from NumPy on the same prompts."""
    n_support, n_query, dim, batch = 4, 2, 2, 2
    study = width_study(
        widths=(n_support + n_query,), kernels=("linear",), dim=dim, n_support=n_support, n_query=n_query, lam=0.5,
        n_steps=n_support, batch_size=batch, seed=0, heads=("random_features", "top_eigen"), lams=(2.0,), n_seeds=1,
    )
    assert study.lams == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"no curve for kernel='linear', head='random_features', lam=2: measured .*'top_eigen', 2\)"):
        study.curve("linear", "random_features", lam=2.0)
    assert study.curve("linear", "random_features").lam == 0.5
    task = LinearRegressionSampler(dim, condition_number=100.0).sample(batch, n_support, n_query, seed=0, dtype=torch.float64)
    for ridge in (0.5, 2.0):
        curve = study.curve("linear", "top_eigen", lam=ridge)
        assert curve.error[0] < 1e-8 and curve.feature_krr_error[0] < 1e-8
        x = task.x_support.numpy()
        d_eff = np.mean([np.trace(k @ np.linalg.inv(k + ridge * np.eye(n_support))) for k in x @ x.transpose(0, 2, 1)])
        assert curve.d_eff == pytest.approx(d_eff, rel=1e-10)


def test_relu_width_study_to_dict_is_its_fields_as_plain_data():
    """ReluWidthStudy.to_dict() equals the hand-written dict of its fields and survives JSON."""
    study = ReluWidthStudy(widths=[8, 16], error={"cg": [0.1, 0.025], "richardson": [0.2, 0.05]}, n_steps=3, n_support=5)
    expected = {"widths": [8, 16], "error": {"cg": [0.1, 0.025], "richardson": [0.2, 0.05]}, "n_steps": 3, "n_support": 5}
    assert study.to_dict() == expected
    assert json.loads(json.dumps(study.to_dict())) == expected


# ----- probes -------------------------------------------------------------------------------------


def tiny_model(d_model: int = 8) -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=d_model, n_layers=2, n_heads=2, dtype="float64")).eval()


def test_mse_matrix_takes_tensors_and_matches_numpy():
    """Torch tensors are accepted (detached to NumPy): mse_matrix equals the brute-force mean over
    prompts and queries of (layer l - step t)^2."""
    layers = points(3, 2, 4, seed=1).requires_grad_()
    steps = points(3, 5, 4, seed=2)
    got = mse_matrix(layers, steps)
    a, b = layers.detach().numpy(), steps.numpy()
    expected = np.array([[np.mean((a[:, l] - b[:, t]) ** 2) for t in range(5)] for l in range(2)])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_scores_and_verdicts_refuse_missing_inputs():
    """A 1-d layer_values array, and a verdict asked of no scores at all: ValueErrors naming the
    argument."""
    with pytest.raises(ValueError, match=r"layer_values must have at least 2 dimensions \[batch, index, \.\.\.\], got shape \(3,\)"):
        mse_matrix(np.zeros(3), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"scores must hold at least one algorithm's AlgorithmScore"):
        probes.identifiability_verdict({}, {})


def test_scalar_jacobi_is_none_where_the_jacobi_preconditioner_is_undefined():
    """A symmetric K with a diagonal entry <= -lam has no Jacobi preconditioner: scalar_jacobi says
    None (no scalar p), while a constant positive diagonal gives p = 1 / (K_ii + lam)."""
    y = torch.ones(1, 2, dtype=torch.float64)
    assert scalar_jacobi(torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))[None], y, LAM) is None
    assert scalar_jacobi(2.0 * torch.eye(2, dtype=torch.float64)[None], y, LAM) == pytest.approx(1.0 / (2.0 + LAM))


def test_layer_probes_refuse_a_model_of_another_width():
    """Probes fitted on a d_model=8 model cannot read a d_model=16 model's residuals: the error
    names both widths."""
    train = LinearRegressionSampler(2).sample(8, 5, 3, seed=0, dtype=torch.float64)
    fresh = LinearRegressionSampler(2).sample(2, 5, 3, seed=1, dtype=torch.float64)
    fitted = probes.fit_layer_probes(tiny_model(8), train)
    with pytest.raises(ValueError, match=r"model residual width 16 does not match the probes' d_model=8"):
        fitted.predict(tiny_model(16), fresh)


def test_diagnose_names_a_task_set_that_is_not_a_task():
    """diagnose(model, {name: not-a-task}) raises naming the entry."""
    with pytest.raises(ValueError, match=r"tasks\['shifted'\] must be an mi_krr.tasks.ICLTask, got str"):
        diagnose(tiny_model(), {"shifted": "prompts.pt"}, lam=LAM, kernels=(), progress=False)


class UnreadableSignatureKRR:
    """Exact KRR at every step t >= 1 (alpha_0 = 0), differentiable in y, with a signature inspect
    cannot read (as for some compiled callables): diagnose must accept it as a custom solver."""

    __signature__ = "unreadable"  # inspect.signature raises TypeError

    def __call__(self, K, y, lam, n_steps, K_query=None):
        eye = torch.eye(K.shape[-1], dtype=K.dtype)
        alpha = torch.linalg.solve(K + lam * eye, y.unsqueeze(-1)).squeeze(-1)
        alphas = torch.stack([torch.zeros_like(alpha)] + [alpha] * n_steps, dim=-2)
        residual = torch.linalg.vector_norm(y.unsqueeze(-2) - alphas @ (K + lam * eye), dim=-1)
        return Trajectory(alpha=alphas, residual_norm=residual, pred=alphas @ K_query.mT, method="exact", lam=lam)


def test_diagnose_differentiates_a_custom_solver_with_an_unreadable_signature():
    """A custom callable solver (signature unreadable: taken on trust) gets its label sensitivities
    by autograd: step 0 is 0, every later step K_query (K + lam I)^-1 from NumPy."""
    task = LinearRegressionSampler(2, noise_std=0.1).sample(3, 4, 2, seed=0, dtype=torch.float64)
    result = diagnose(gd_transformer(1, 0.05, dim=2), task, algorithms={"exact": UnreadableSignatureKRR()}, lam=LAM, n_steps=2,
                      kernels=(), sensitivities=True, bootstrap=0, progress=False)["tasks"]
    sens = result.step_sensitivities["exact"]
    assert sens.shape == (3, 3, 2, 4)
    np.testing.assert_array_equal(sens[:, 0], 0.0)
    x, xq = task.x_support.numpy(), task.x_query.numpy()
    for b in range(3):
        expected = xq[b] @ x[b].T @ np.linalg.inv(x[b] @ x[b].T + LAM * np.eye(4))
        for t in (1, 2):
            np.testing.assert_allclose(sens[b, t], expected, rtol=1e-10, atol=1e-12)


def numpy_krr_solver(K, y, lam, n_steps, K_query=None):
    """Exact KRR from NumPy at every step t >= 1, returning its predictions as a NumPy array."""
    K, y, K_query = K.numpy(), y.numpy(), K_query.numpy()
    alpha = np.linalg.solve(K + lam * np.eye(K.shape[-1]), y[..., None])[..., 0]
    alphas = np.stack([np.zeros_like(alpha)] + [alpha] * n_steps, axis=-2)
    return Trajectory(alpha=torch.from_numpy(alphas), residual_norm=torch.zeros(alphas.shape[:-1]), pred=alphas @ K_query.swapaxes(-1, -2),
                      method="numpy_krr", lam=lam)


def parameter_free(model):
    """`model` with every parameter turned into a buffer of the same value (fixed weights)."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                del module._parameters[name]
                module.register_buffer(name, parameter.data)
    return model


@pytest.fixture(scope="module")
def parameter_free_diagnosis():
    """attach(parameter-free GD transformer).diagnose on float64 prompts whose info holds a tensor,
    with a NumPy-backed custom solver."""
    model = parameter_free(gd_transformer(2, 0.05, dim=2))
    assert not list(model.parameters())
    task = LinearRegressionSampler(2, noise_std=0.1).sample(4, 5, 3, seed=0, dtype=torch.float64)
    task.info = dict(task.info, true_weights=torch.tensor([[1.0, 2.0]]))
    diagnosis = probes.attach(model).diagnose(task, algorithms={"numpy_krr": numpy_krr_solver}, lam=LAM, n_steps=2, kernels=(),
                                              bootstrap=0, progress=False)
    return task, diagnosis


def test_parameter_free_model_is_diagnosed_in_its_buffers_dtype(parameter_free_diagnosis):
    """A model whose fixed weights are float64 buffers (no parameters) is fed float64 prompts: the
    reference KRR predictions equal NumPy's KRR on the prompts as given, not on float32-rounded ones."""
    task, diagnosis = parameter_free_diagnosis
    assert isinstance(diagnosis, Diagnosis)
    got = diagnosis["tasks"].krr_predictions
    unrounded = numpy_krr_predictions(task.x_support.numpy(), task.y_support.numpy(), task.x_query.numpy(), LAM)
    np.testing.assert_allclose(got, unrounded, rtol=1e-10, atol=1e-12)
    rounded = [t.float().double().numpy() for t in (task.x_support, task.y_support, task.x_query)]
    assert np.abs(got - numpy_krr_predictions(*rounded, LAM)).max() > 1e-10


def test_custom_solver_may_return_numpy_predictions(parameter_free_diagnosis):
    """A solver returning its predictions as a NumPy array is scored like a tensor one: the step
    predictions are 0 at step 0 and NumPy's KRR after."""
    task, diagnosis = parameter_free_diagnosis
    steps = diagnosis["tasks"].step_predictions["numpy_krr"]
    assert steps.shape == (4, 3, 3) and steps.dtype == np.float64
    np.testing.assert_array_equal(steps[:, 0], 0.0)
    given = [t.numpy() for t in (task.x_support, task.y_support, task.x_query)]
    for t in (1, 2):
        np.testing.assert_allclose(steps[:, t], numpy_krr_predictions(*given, LAM), rtol=1e-10, atol=1e-12)


def test_diagnosis_to_dict_writes_tensors_in_task_info_as_lists(parameter_free_diagnosis):
    """A tensor in task.info comes out of to_dict() as nested lists (and the dict is JSON)."""
    _, diagnosis = parameter_free_diagnosis
    data = diagnosis.to_dict()
    assert data["task_sets"]["tasks"]["info"]["true_weights"] == [[1.0, 2.0]]
    json.dumps(data)
