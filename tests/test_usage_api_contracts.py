"""Usage review: do the public functions and result objects keep the contracts their docstrings
state (shapes, dtypes, devices, documented invariants, argument validation), at odd small sizes?

Each test is named as the claim it checks. A contract a docstring states but the code breaks is
an `xfail(strict=True)` test that passes once the code (or the docstring) is fixed.
Only public names are used.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

import probes
from mi_krr import kernels, solvers, tasks
from mi_krr.checkpoints import load_checkpoint, shipped_checkpoint, task_sets
from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.feature_maps import (
    LinearFeatures,
    PositiveRandomFeatures,
    ProjectedKernelFeatures,
    RandomProjection,
    random_orthogonal,
)
from mi_krr.models import (
    BridgeICLModel,
    ICLModel,
    ICLTransformer,
    ICLTransformerConfig,
    allowed_attention,
    model_from_config,
)
from mi_krr.train import (
    TrainConfig,
    evaluate,
    held_out_reference,
    load_model,
    read_run_config,
    save_model,
)

D = 3  # input dimension used throughout (odd on purpose)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# fixtures: tiny models of every kind, prompts at odd sizes


@pytest.fixture(scope="module")
def gp_sampler():
    return tasks.GPRegressionSampler(D)


@pytest.fixture(scope="module")
def task(gp_sampler):
    return gp_sampler.sample(3, 5, 2, seed=0)  # batch 3, n_support 5, n_query 2, float32


@pytest.fixture(scope="module")
def task1(gp_sampler):
    return gp_sampler.sample(1, 1, 1, seed=1)  # batch 1, n_support 1, n_query 1


@pytest.fixture(scope="module")
def icl_model():
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(n_dims=D, d_model=8, n_layers=2, n_heads=2))


@pytest.fixture(scope="module")
def models(icl_model):
    torch.manual_seed(1)
    return {
        "icl_concat": icl_model,
        "icl_interleaved": ICLTransformer(
            ICLTransformerConfig(n_dims=D, d_model=8, n_layers=3, n_heads=2, layout="interleaved", max_seq_len=32)
        ),
        "bridge": quiet(BridgeICLModel, ICLTransformerConfig(n_dims=D, d_model=8, n_layers=2, n_heads=2)),
        "cg_construction": cg_transformer(2, 0.1, dim=D),
        "richardson_construction": richardson_transformer(2, 0.1, 1.0, 0.5, dim=D),
        "gd_construction": gd_transformer(2, 0.1, lam=0.1, dim=D),
    }


# ---------------------------------------------------------------------------------------------
# mi_krr.kernels and mi_krr.feature_maps


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_maps_n_by_d_and_m_by_d_points_to_n_by_m_in_the_inputs_dtype(name, dtype):
    x, z = torch.randn(3, 5, D, dtype=dtype), torch.randn(3, 2, D, dtype=dtype)
    for got, shape in (
        (kernels.kernel_matrix(name, x, z), (3, 5, 2)),
        (kernels.kernel_matrix(name, x), (3, 5, 5)),
        (kernels.kernel_matrix(name, x[0], z[0]), (5, 2)),
        (kernels.kernel_matrix(name, x, z[0]), (3, 5, 2)),  # z without batch broadcasts
        (kernels.kernel_matrix(name, torch.randn(1, 1, 1, dtype=dtype)), (1, 1, 1)),
    ):
        assert got.shape == shape and got.dtype == dtype and got.device == x.device


def test_gaussian_kernel_diagonal_is_exactly_one_even_far_from_the_origin():
    x = 1e3 + 100 * torch.randn(2, 7, D)
    assert torch.equal(kernels.gaussian_kernel(x).diagonal(dim1=-2, dim2=-1), torch.ones(2, 7))


def test_kernel_argument_errors_are_one_line_value_errors_naming_the_argument():
    x = torch.randn(2, 4, D)
    for call, word in (
        (lambda: kernels.kernel_matrix("rbf", x), "kernel"),
        (lambda: kernels.kernel_matrix("gaussian", x, temperature=1.0), "temperature"),
        (lambda: kernels.gaussian_kernel(x, bandwidth=0), "bandwidth"),
        (lambda: kernels.linear_kernel(x, torch.randn(2, 4, D + 1)), "z"),
        (lambda: kernels.linear_kernel(torch.randn(D)), "x"),
        (lambda: kernels.effective_dimension(kernels.gaussian_kernel(x), 0.0), "lam"),
        (lambda: kernels.condition_number(torch.randn(2, 3, 4)), "K"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            call()
        assert "\n" not in str(error.value)


def test_effective_dimension_and_condition_number_are_float64_over_k_batch_and_lam_sweeps():
    K = kernels.gaussian_kernel(torch.randn(3, 5, D))  # float32 kernel
    d_eff = kernels.effective_dimension(K, 0.1)
    assert d_eff.shape == (3,) and d_eff.dtype == torch.float64
    assert ((d_eff > 0) & (d_eff <= 5)).all()  # between 0 and rank(K) <= n
    sweep = kernels.effective_dimension(K, torch.tensor([0.1, 1.0, 10.0])[:, None])
    assert sweep.shape == (3, 3) and (sweep[0] > sweep[1]).all()  # d_eff falls as lam grows
    assert kernels.effective_dimension(K[0], 0.1).shape == ()
    cond = kernels.condition_number(K, 0.1)
    eigenvalues = torch.linalg.eigvalsh(K.double() + 0.1 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(cond, eigenvalues[:, -1] / eigenvalues[:, 0])
    assert kernels.condition_number(torch.zeros(2, 2)).item() == float("inf")  # singular


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_feature_maps_keep_dtype_and_map_d_to_m_with_float64_cpu_weights(dtype):
    x = torch.randn(3, 5, D, dtype=dtype)
    for fmap, m in (
        (RandomProjection(D, 4), 4),
        (PositiveRandomFeatures(D, 7, kind="gaussian"), 7),
        (PositiveRandomFeatures(D, 1), 1),
        (LinearFeatures(D), D),
    ):
        assert fmap.in_dim == D and fmap.out_dim == m
        out = fmap(x)
        assert out.shape == (3, 5, m) and out.dtype == dtype
        assert fmap(x[0, 0]).shape == (m,)  # one point [d] -> [m]
        assert fmap.kernel(x, x[:, :2]).shape == (3, 5, 2)
        weights = getattr(fmap, "weights", None)
        if weights is not None:
            assert weights.shape == (D, m) and weights.dtype == torch.float64 and weights.device.type == "cpu"


def test_projected_kernel_features_top_projection_is_exact_and_zero_padded_beyond_n_points():
    points = torch.randn(2, 4, D, dtype=torch.float64)
    fmap = ProjectedKernelFeatures("gaussian", D, 6, projection="top", bandwidth=0.8)
    features = fmap.prompt_features(points)
    assert features.shape == (2, 4, 6) and features.dtype == torch.float64
    assert torch.equal(features[..., 4:], torch.zeros(2, 4, 2))  # columns beyond N are 0
    torch.testing.assert_close(fmap.gram(points), kernels.gaussian_kernel(points, bandwidth=0.8))
    assert ProjectedKernelFeatures("exp", D, 3).prompt_features(points.float()).dtype == torch.float32
    assert ProjectedKernelFeatures("exp", D, 3).sketch((2,), 4).shape == (2, 4, 3)


def test_random_orthogonal_is_a_float64_cpu_orthogonal_matrix():
    Q = random_orthogonal(5, torch.Generator().manual_seed(3))
    assert Q.shape == (5, 5) and Q.dtype == torch.float64 and Q.device.type == "cpu"
    torch.testing.assert_close(Q @ Q.T, torch.eye(5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# mi_krr.solvers


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(2)
    x, xq = torch.randn(3, 5, D), torch.randn(3, 2, D)
    return kernels.gaussian_kernel(x), torch.randn(3, 5), kernels.gaussian_kernel(xq, x)  # float32 on purpose


@pytest.mark.parametrize("name", list(solvers.ALGORITHMS))
@pytest.mark.parametrize("lead", [(), (3,), (1, 3)])
def test_every_registry_solver_returns_float64_trajectories_with_the_documented_shapes(name, lead, system):
    K, y, Kq = system
    K, y, Kq = K.reshape(*lead, 5, 5) if lead else K[0], y.reshape(*lead, 5) if lead else y[0], Kq.reshape(*lead, 2, 5) if lead else Kq[0]
    traj = solvers.solve(name, K, y, 0.1, 3, K_query=Kq)
    assert traj.alpha.shape == (*lead, 4, 5) and traj.alpha.dtype == torch.float64
    assert traj.residual_norm.shape == (*lead, 4) and traj.residual_norm.dtype == torch.float64
    assert traj.pred.shape == (*lead, 4, 2) and traj.pred.dtype == torch.float64
    assert traj.n_steps == 3 and isinstance(traj.lam, float) and traj.lam == 0.1
    assert traj.preconditioner in ("none", "jacobi", "rowsum")  # every registry solver records one
    assert torch.equal(traj.alpha[..., 0, :], torch.zeros_like(traj.alpha[..., 0, :]))  # alpha_0 = 0
    torch.testing.assert_close(traj.residual_norm[..., 0], y.double().norm(dim=-1))
    torch.testing.assert_close(traj.pred, traj.alpha @ Kq.double().mT)  # pred = K_query alpha_t
    if isinstance(traj.step, torch.Tensor):  # a per-prompt step is [...]
        assert traj.step.shape == lead
    assert solvers.solve(name, K, y, 0.1, 0).alpha.shape == (*lead, 1, 5)  # 0 steps: the start
    assert solvers.solve(name, K, y, 0.1, 2).pred is None  # no K_query, no pred


@pytest.mark.parametrize("name", list(solvers.ALGORITHMS))
def test_every_registry_solver_is_differentiable_in_y(name, system):
    K, y, Kq = system
    y = y.double().requires_grad_()
    solvers.solve(name, K.double(), y, 0.1, 3, K_query=Kq.double()).pred[..., -1, :].sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_cg_reaches_the_exact_krr_solution_after_n_steps(system):
    K, y, Kq = system
    alpha = solvers.krr(K, y, 0.1)
    assert alpha.shape == (3, 5) and alpha.dtype == torch.float64
    torch.testing.assert_close(solvers.cg(K, y, 0.1, 5).alpha[:, -1], alpha, rtol=1e-8, atol=1e-8)


def test_spectrum_default_parameters_are_the_documented_optima(system):
    K, y, _ = system
    A = K.double() + 0.1 * torch.eye(5, dtype=torch.float64)
    mu = torch.linalg.eigvalsh(A)
    low, high = mu[:, 0], mu[:, -1]
    torch.testing.assert_close(solvers.richardson(K, y, 0.1, 1).step, 2 / (low + high))
    bounds = solvers.chebyshev(K, y, 0.1, 1).params["eig_bounds"]
    torch.testing.assert_close(bounds[0], low), torch.testing.assert_close(bounds[1], high)
    hb = solvers.heavy_ball(K, y, 0.1, 1)
    kappa = high / low
    torch.testing.assert_close(hb.step, 4 / (high.sqrt() + low.sqrt()) ** 2)
    torch.testing.assert_close(hb.params["momentum"], ((kappa.sqrt() - 1) / (kappa.sqrt() + 1)) ** 2)
    newton = solvers.newton_schulz(K, y, 0.1, 1)
    torch.testing.assert_close(newton.alpha[:, 1], newton.params["scale"][:, None] * (A @ y.double()[..., None])[..., 0])
    rich = solvers.richardson(K, y, 0.1, 3)  # residual_norm is the true residual
    torch.testing.assert_close(rich.residual_norm, torch.linalg.vector_norm(y.double()[:, None] - rich.alpha @ A, dim=-1))


def test_feature_space_solvers_hold_weights_d_wide_in_alpha():
    X, y, Xq = torch.randn(3, 5, 2), torch.randn(3, 5), torch.randn(3, 4, 2)
    for traj in (solvers.feature_gd(X, y, 0.1, 3, X_query=Xq), solvers.feature_cg(X, y, 0.1, 3, X_query=Xq)):
        assert traj.alpha.shape == (3, 4, 2) and traj.pred.shape == (3, 4, 4) and traj.alpha.dtype == torch.float64
        torch.testing.assert_close(traj.pred, traj.alpha @ Xq.double().mT)


def test_solver_argument_errors_are_one_line_value_errors_naming_the_argument(system):
    K, y, Kq = system
    for call, word in (
        (lambda: solvers.solve("foo", K, y, 0.1, 2), "name"),
        (lambda: solvers.cg(K, y, 0.0, 2), "lam"),
        (lambda: solvers.cg(K, y, 0.1, -1), "n_steps"),
        (lambda: solvers.cg(K, y, 0.1, 2.0), "n_steps"),
        (lambda: solvers.cg(K, y[:, :4], 0.1, 2), "y"),
        (lambda: solvers.cg(K, y, 0.1, 2, K_query=Kq[:2]), "K_query"),
        (lambda: solvers.cg(torch.randn(3, 5, 5), y, 0.1, 2), "symmetric"),
        (lambda: solvers.cg(K, y, 0.1, 2, backend="gpu"), "backend"),
        (lambda: solvers.richardson(K, y, 0.1, 2, precond="foo"), "precond"),
        (lambda: solvers.richardson(K, y, 0.1, 2, step=torch.ones(4)), "step"),
        (lambda: solvers.heavy_ball(K, y, 0.1, 2, momentum=1.0), "momentum"),
        (lambda: solvers.chebyshev(K, y, 0.1, 2, eig_bounds=(2.0, 1.0)), "eig_bounds"),
        (lambda: solvers.cg_error_bound(0.5, 3), "kappa"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            call()
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# mi_krr.tasks


@pytest.mark.parametrize("sampler", [tasks.LinearRegressionSampler(D, noise_std=0.1), tasks.GPRegressionSampler(1)])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (3, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samplers_return_tasks_of_the_documented_shapes_dtype_and_info(sampler, sizes, dtype):
    B, n, m = sizes
    t = sampler.sample(B, n, m, seed=4, dtype=dtype)
    d = sampler.dim
    assert (t.x_support.shape, t.y_support.shape, t.x_query.shape, t.y_query.shape) == ((B, n, d), (B, n), (B, m, d), (B, m))
    assert {t.x_support.dtype, t.y_support.dtype, t.x_query.dtype, t.y_query.dtype} == {dtype}
    assert (t.batch_size, t.n_support, t.n_query, t.dim, t.dtype) == (B, n, m, d, dtype)
    assert t.info == {**sampler.to_config(), "seed": 4, "active_dim": None}
    assert sampler.sample(B, n, m).dtype == torch.float32  # the default dtype
    assert tasks.sampler_from_config(sampler.to_config()) == sampler


def test_linear_regression_labels_are_one_noise_free_linear_function_per_prompt():
    t = tasks.LinearRegressionSampler(D).sample(2, 4, D, seed=0, dtype=torch.float64)  # noise_std 0
    w = torch.linalg.solve(t.x_query, t.y_query)  # recovered exactly from n_query >= d query pairs
    torch.testing.assert_close(t.x_support @ w[..., None], t.y_support[..., None])


def test_active_dim_zeroes_trailing_coordinates_and_longer_prompts_scales_n_support(gp_sampler):
    t = tasks.LinearRegressionSampler(D, condition_number=5.0).sample(2, 3, 2, seed=0, active_dim=2)
    assert not t.x_support[..., 2:].any() and not t.x_query[..., 2:].any()
    assert tasks.apply_shift(gp_sampler, "longer_prompts_x2").sample(1, 5, 1, seed=0).n_support == 10


def test_select_keeps_the_batch_dimension_and_to_casts_every_tensor(task):
    assert task.select(1).batch_size == 1 and task.select(-1).x_support.shape == (1, 5, D)
    assert torch.equal(task.select(torch.tensor(2)).y_query, task.y_query[2:3])
    assert task.to(dtype=torch.float64).y_query.dtype == torch.float64


def test_spd_systems_have_the_documented_descending_spectrum_and_condition_number():
    system = tasks.sample_spd_system(3, 5, 50.0)
    assert system.matrix.shape == (3, 5, 5) and system.rhs.shape == (3, 5) and system.eigenvalues.shape == (5,)
    assert (system.eigenvalues.diff() < 0).all()
    torch.testing.assert_close(torch.linalg.eigvalsh(system.matrix).flip(-1), system.eigenvalues.expand(3, 5))
    assert tasks.sample_spd_system(1, 1, 1.0).matrix.shape == (1, 1, 1)
    assert tasks.sample_spd_system(1, 3, 2.0, dtype=torch.float32).matrix.dtype == torch.float32


def test_sampler_input_covariance_has_exactly_the_condition_number_and_default_gp_input_std():
    covariance = tasks.LinearRegressionSampler(D, condition_number=7.0).input_covariance()
    assert covariance.dtype == torch.float64 and covariance.shape == (D, D)
    assert torch.linalg.cond(covariance).item() == pytest.approx(7.0)
    assert tasks.GPRegressionSampler(4).input_std == pytest.approx(0.5)  # 1 / sqrt(d)
    f = tasks.GPRegressionSampler(1).sample_functions(torch.randn(2, 3, 4, 1), seed=0)
    assert f.shape == (2, 3, 4) and f.dtype == torch.float64


def test_bayes_optimal_ridge_reads_a_sampler_or_a_tasks_info(gp_sampler, task):
    assert tasks.bayes_optimal_ridge(gp_sampler) == pytest.approx(0.01)
    assert tasks.bayes_optimal_ridge(task.info) == pytest.approx(0.01)
    assert tasks.bayes_optimal_ridge(tasks.LinearRegressionSampler(D, noise_std=0.1)) == pytest.approx(0.01 * D)


def test_applicable_shifts_are_exactly_those_apply_shift_accepts(gp_sampler):
    for sampler in (gp_sampler, tasks.LinearRegressionSampler(D)):
        applicable = tasks.applicable_shifts(sampler)
        for label in tasks.DEFAULT_SHIFTS:
            assert (label in applicable) == tasks.shift_applies(sampler, label) == (tasks.why_shift_does_not_apply(sampler, label) is None)


def test_sampler_argument_errors_are_one_line_value_errors_naming_the_argument(gp_sampler):
    for call, word in (
        (lambda: gp_sampler.sample(0, 5, 2, seed=0), "batch_size"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=-1), "seed"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=2**32), "seed"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=0, dtype=torch.int64), "dtype"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=0, dtype="float64"), "dtype"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=0, device="foo"), "device"),
        (lambda: gp_sampler.sample(2, 5, 2, seed=0, device="meta"), "device"),
        (lambda: tasks.sample_spd_system(2, 3, 0.5), "kappa"),
        (lambda: tasks.apply_shift(gp_sampler, "foo"), "shift"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            call()
        assert "\n" not in str(error.value)


def test_sample_spd_system_refuses_a_non_floating_dtype():
    with pytest.raises(ValueError, match="dtype"):
        tasks.sample_spd_system(2, 3, 10.0, dtype=torch.int64)


@pytest.mark.parametrize("device", ["foo", "meta"])
def test_sample_spd_system_refuses_unknown_and_meta_devices_naming_device(device):
    with pytest.raises(ValueError, match="device"):
        tasks.sample_spd_system(2, 3, 10.0, device=device)


def test_geometric_spectrum_refuses_kappa_below_one():
    with pytest.raises(ValueError, match="kappa"):
        tasks.geometric_spectrum(3, 0.1)


def test_icltask_to_refuses_an_unknown_device_naming_device(task):
    with pytest.raises(ValueError, match="device"):
        task.to(device="foo")


# ---------------------------------------------------------------------------------------------
# mi_krr.models (ICLTransformer, BridgeICLModel, constructions: the ICLModel adapter)


@pytest.mark.parametrize("attention", ["softmax", "linear", "relu"])
@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_icl_transformer_keeps_the_adapter_contract_at_odd_sizes(attention, layout, task, task1):
    cfg = ICLTransformerConfig(n_dims=D, d_model=6, n_layers=3, n_heads=3, attention=attention, layout=layout, max_seq_len=16)
    model = ICLTransformer(cfg)
    assert isinstance(model, ICLModel) and probes.attach(model).model is model
    for t in (task, task1):
        B, n, m = t.batch_size, t.n_support, t.n_query
        prompt = model.encode(t)
        groups = 1 if layout == "concat" else m
        seq = n + m if layout == "concat" else 2 * n + 1
        assert prompt.tokens.shape == (B * groups, seq, cfg.d_token) and prompt.tokens.dtype == torch.float32
        assert prompt.groups == groups and len(prompt.query_positions) * groups == m
        for positions in (prompt.query_positions, prompt.support_positions, prompt.label_positions):
            assert positions.dtype == torch.long and positions.dim() == 1
        mask = model.allowed_attention(prompt)
        assert mask.dtype == torch.bool and mask.shape == (seq, seq)
        assert model.predict(t).shape == (B, m)
        assert model.predict(t.to(dtype=torch.float64)).dtype == torch.float32  # the model's dtype
        outputs, cache = model.run_with_cache(prompt.tokens)
        assert outputs.shape == (B * groups, seq)
        names = model.residual_hook_names()
        assert len(names) == cfg.n_layers + 1 and len(model.attention_hook_names()) == cfg.n_layers
        for name in names:
            assert cache[name].shape == (B * groups, seq, cfg.d_model)
        torch.testing.assert_close(model.readout(cache[names[-1]]), outputs)  # readout(last) = forward
        hooks = model.attention_hook_names()[0]
        assert cache[hooks.pattern].shape == (B * groups, cfg.n_heads, seq, seq)
        assert cache[hooks.q].shape == (B * groups, seq, cfg.n_heads, cfg.d_head)
        if attention == "softmax":
            torch.testing.assert_close(cache[hooks.pattern].sum(-1), torch.ones(B * groups, cfg.n_heads, seq))
        assert not cache[hooks.pattern].masked_select(~mask).any()  # the structural mask holds
    assert model_from_config(model.config_dict()).cfg == cfg


def test_concat_mask_lets_queries_see_support_and_themselves_only():
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed_attention("concat", 4, 2, causal=False), expected)
    assert torch.equal(allowed_attention("concat", 4, 2, causal=True), expected.tril())


def test_bridge_model_keeps_the_adapter_contract(models, task):
    model = models["bridge"]
    prompt = model.encode(task)
    outputs, cache = quiet(model.run_with_cache, prompt.tokens)
    names = model.residual_hook_names()
    assert len(names) == model.n_layers + 1 and all(cache[name].shape == (3, 7, 8) for name in names)
    assert [hooks.scores for hooks in model.attention_hook_names()] == [None, None]  # documented
    torch.testing.assert_close(model.readout(cache[names[-1]]), outputs)
    assert model.predict(task).shape == (3, 2) and model.allowed_attention(prompt).shape == (7, 7)
    assert model_from_config(model.config_dict()).cfg == model.cfg


@pytest.mark.parametrize("name", ["cg_construction", "richardson_construction", "gd_construction"])
def test_constructions_keep_the_adapter_contract_and_step_state_shapes(models, name, task):
    model = models[name]
    T, n, m = model.n_steps, task.n_support, task.n_query
    assert model.n_layers == T * model.layers_per_step and len(model.residual_hook_names()) == model.n_layers + 1
    prompt = model.encode(task)
    assert prompt.tokens.shape[-1] == model.dim + 4 and prompt.tokens.dtype == torch.float64
    assert model.allowed_attention(prompt) is None  # per-head type masks
    states = model.step_states(task)
    assert len(states.hook_names) == T + 1 == len(model.step_hook_names())
    assert all(v.shape == (3, T + 1, n) for v in states.support.values())
    assert all(v.shape == (3, T + 1, m) for v in states.query.values())
    assert all(v.shape == (3, T + 1) for v in states.aux.values())
    assert states.pred.shape == (3, T + 1, m)
    torch.testing.assert_close(states.pred[:, -1], model.predict(task))


def test_cg_construction_states_are_the_cg_solvers_iterates(models, task):
    t = task.to(dtype=torch.float64)
    states = models["cg_construction"].step_states(t)
    K, Kq = kernels.linear_kernel(t.x_support), kernels.linear_kernel(t.x_query, t.x_support)
    reference = solvers.cg(K, t.y_support, 0.1, 2, K_query=Kq)
    torch.testing.assert_close(states.support["alpha"], reference.alpha)
    torch.testing.assert_close(states.pred, reference.pred)


def test_model_argument_errors_are_one_line_value_errors_naming_the_argument(icl_model):
    for call, word in (
        (lambda: icl_model.predict(tasks.LinearRegressionSampler(2).sample(1, 2, 1, seed=0)), "dimension"),
        (lambda: icl_model.predict("x"), "task"),
        (lambda: icl_model(torch.randn(5, 4)), "tokens"),
        (lambda: icl_model(torch.randn(1, 5, 3), n_support=2), "d_token"),
        (lambda: icl_model(torch.randn(1, 5, 4), n_support=0), "n_support"),
        (lambda: ICLTransformer({"n_dims": 3}), "cfg"),
        (lambda: ICLTransformer(icl_model.cfg, device="foo"), "device"),
        (lambda: ICLTransformerConfig(n_dims=3, d_model=4, n_layers=1, n_heads=2, attention="foo"), "attention"),
        (lambda: cg_transformer(1, 0.1, device="foo"), "device"),
        (lambda: cg_transformer(0, 0.1), "n_steps"),
        (lambda: gd_transformer(1, -0.1), "lr"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            call()
        assert "\n" not in str(error.value)


def test_icl_transformer_forward_refuses_tokens_of_another_dtype_naming_tokens(icl_model):
    with pytest.raises(ValueError, match="tokens"):
        icl_model(torch.randn(1, 5, 4, dtype=torch.float64), n_support=2)


def test_icl_transformer_forward_refuses_a_fractional_n_support(icl_model):
    with pytest.raises(ValueError, match="n_support"):
        icl_model(torch.randn(1, 5, 4), n_support=2.5)


def test_constructions_refuse_a_dtype_string_naming_dtype():
    with pytest.raises(ValueError, match="dtype"):
        cg_transformer(1, 0.1, dtype="float64")


# ---------------------------------------------------------------------------------------------
# probes: per-layer instruments


@pytest.mark.parametrize("name", ["icl_concat", "icl_interleaved", "bridge", "cg_construction", "richardson_construction", "gd_construction"])
def test_layer_predictions_are_float64_batch_by_l_plus_1_by_n_query_ending_at_predict(models, name, task, task1):
    model = models[name]
    L = model.n_layers
    for t in (task, task1):
        lens = probes.layer_predictions(model, t)
        assert lens.shape == (t.batch_size, L + 1, t.n_query) and lens.dtype == torch.float64
        torch.testing.assert_close(lens[:, -1], model.predict(t).double(), rtol=1e-6, atol=1e-6)
    assert probes.layer_predictions(model, task, layers=[0, L]).shape == (3, 2, 2)
    assert probes.layer_predictions(model, task, layers=L).shape == (3, 1, 2)
    assert probes.attach(model).layer_predictions(task).shape == (3, L + 1, 2)


@pytest.mark.parametrize("name", ["icl_concat", "icl_interleaved", "cg_construction"])
def test_label_sensitivities_are_float64_and_match_finite_differences(models, name, task):
    model = models[name]
    L = model.n_layers
    sens = probes.label_sensitivities(model, task)
    assert sens.shape == (3, L + 1, 2, 5) and sens.dtype == torch.float64
    assert probes.label_sensitivities(model, task, layers=[L], prompts_per_pass=1).shape == (3, 1, 2, 5)
    if name == "icl_concat":  # a float64 copy against central differences
        model64 = ICLTransformer(ICLTransformerConfig(**{**model.cfg.to_dict(), "dtype": "float64"}))
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        t64 = task.to(dtype=torch.float64)
        sens = probes.label_sensitivities(model64, t64)
        eps = 1e-6
        shifted = [dataclasses.replace(t64, y_support=t64.y_support + s * eps * torch.eye(5, dtype=torch.float64)[1]) for s in (1, -1)]
        fd = (probes.layer_predictions(model64, shifted[0]) - probes.layer_predictions(model64, shifted[1])) / (2 * eps)
        torch.testing.assert_close(sens[..., 1], fd, rtol=1e-5, atol=1e-7)


def test_attention_kernels_blocks_and_masks_have_the_documented_shapes(models, task):
    for name, model in models.items():
        ak = probes.attention_kernels(model, task)
        L, H = model.n_layers, model.n_heads
        assert ak.support.shape == (3, L, H, 5, 5) and ak.query.shape == (3, L, H, 2, 5)
        assert (ak.n_layers, ak.n_heads, ak.source) == (L, H, "pattern")
        if model.allowed_attention(model.encode(task)) is None:
            assert ak.support_allowed is None and ak.query_allowed is None
        else:
            assert ak.support_allowed.shape == (5, 5) and ak.query_allowed.shape == (2, 5)
            assert ak.query_allowed.dtype == torch.bool
        only_query = probes.attention_kernels(model, task, blocks="query")
        assert only_query.support is None and only_query.query.shape == ak.query.shape
    softmax = probes.attention_kernels(models["icl_concat"], task)
    assert (softmax.query.sum(-1) <= 1 + 1e-6).all()  # a share of attention, not renormalised


def test_kernel_alignment_fields_have_the_documented_shapes_and_dtypes(models, task):
    model = models["icl_concat"]
    alignment = probes.kernel_alignment(model, task)
    assert alignment.block == "query" and set(alignment.scale) == {"exp", "gaussian"}
    for kernel in ("exp", "gaussian"):
        assert alignment.scale[kernel].shape == (2, 2) and alignment.scale[kernel].dtype == torch.float64
        for metric in ("operator_distance", "cka", "spearman", "row_spearman"):
            assert alignment.metrics[kernel][metric].shape == (2, 2)
            assert alignment.per_prompt[kernel][metric].shape == (3, 2, 2)
        heads, distances = alignment.best_heads(kernel)
        assert heads.dtype == np.int64 and heads.shape == (2,) and distances.dtype == np.float64
        assert alignment.uniform_best_heads(kernel).dtype == bool
    assert alignment.tau is alignment.scale["exp"] and alignment.bandwidth is alignment.scale["gaussian"]
    json.dumps(alignment.to_dict())  # plain data
    assert probes.kernel_alignment(model, task, kernels="exp", block="support").scale.keys() == {"exp"}


def test_fit_layer_probes_fields_and_predictions_have_the_documented_shapes(icl_model, gp_sampler, task):
    fitted = probes.fit_layer_probes(icl_model, gp_sampler.sample(8, 5, 2, seed=7))
    assert fitted.layers == [0, 1, 2] and fitted.targets == "y_query"
    for field in ("lam", "val_r2", "bias"):
        assert getattr(fitted.fit, field).shape == (3,) and getattr(fitted.fit, field).dtype == torch.float64
    assert fitted.fit.weight.shape == (3, 8)
    for predictions in (fitted.predict(icl_model, task), fitted.predict_control(icl_model, task)):
        assert predictions.shape == (3, 3, 2) and predictions.dtype == torch.float64
    assert fitted.fit.apply(torch.randn(3, 3, 2, 8, dtype=torch.float64)).shape == (3, 3, 2)


def test_solver_sensitivities_are_float64_and_the_linear_map_of_each_linear_solver(system):
    K, y, Kq = system
    for name in solvers.ALGORITHMS:
        sens = probes.solver_sensitivities(name, K, Kq, 0.1, 3, y=y)
        assert sens.shape == (3, 4, 2, 5) and sens.dtype == torch.float64
        if name in ("cg", "jacobi_cg"):
            continue
        pred = solvers.solve(name, K, y, 0.1, 3, K_query=Kq).pred
        torch.testing.assert_close(torch.einsum("btmn,bn->btm", sens, y.double()), pred)
    assert probes.solver_sensitivities("gd", K[0], Kq[0], 0.1, 3).shape == (4, 2, 5)
    custom = functools.partial(solvers.richardson, step=0.1)
    assert probes.solver_sensitivities(custom, K, Kq, 0.1, 3, y=y).shape == (3, 4, 2, 5)


def test_probe_argument_errors_are_one_line_value_errors_naming_the_argument(icl_model, task, gp_sampler):
    train = gp_sampler.sample(8, 5, 2, seed=9)
    for call, word in (
        (lambda: probes.layer_predictions(icl_model, task, layers=[3]), "layers"),
        (lambda: probes.layer_predictions(icl_model, task, method="foo"), "method"),
        (lambda: probes.layer_predictions(icl_model, task, method="ridge"), "train_task"),
        (lambda: probes.layer_predictions(icl_model, "x"), "task"),
        (lambda: probes.layer_predictions(icl_model, gp_sampler.sample(3, 5, 0, seed=0)), "n_query"),
        (lambda: probes.label_sensitivities(icl_model, task, chunk_size=0), "chunk_size"),
        (lambda: probes.attention_kernels(icl_model, task, source="foo"), "source"),
        (lambda: probes.kernel_alignment(icl_model, task, block="foo"), "block"),
        (lambda: probes.kernel_alignment(icl_model, task, kernels=("linear",)), "kernels"),
        (lambda: probes.fit_layer_probes(icl_model, train, targets=torch.randn(8, 3)), "targets"),
        (lambda: probes.fit_layer_probes(icl_model, train, seed=-1), "seed"),
        (lambda: probes.solver_sensitivities("cg", torch.eye(3), torch.ones(1, 3), 0.1, 2), "y"),
        (lambda: probes.attach(3), "encode"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            call()
        assert "\n" not in str(error.value)


def test_probed_model_attention_kernels_passes_blocks_through(icl_model, task):
    assert probes.attach(icl_model).attention_kernels(task, blocks=("query",)).support is None


def test_stream_probes_takes_one_block_name_as_attention_kernels_does(icl_model, task):
    assert probes.stream_probes(icl_model, icl_model.encode(task), blocks="query").query.shape == (3, 2, 2, 2, 5)


def test_stream_probes_refuses_an_out_of_range_layer_naming_layers(icl_model, task):
    with pytest.raises(ValueError, match="layers"):
        probes.stream_probes(icl_model, icl_model.encode(task), layers=[3])


def test_stream_probes_keeps_the_documented_reductions(icl_model, task):
    streamed = probes.stream_probes(icl_model, icl_model.encode(task), layers=[0, 2], blocks=("support", "query"))
    assert streamed.readouts.shape == (3, 2, 2)
    assert streamed.support.shape == (3, 2, 2, 5, 5) and streamed.query.shape == (3, 2, 2, 2, 5)
    assert streamed.support_allowed.shape == (5, 5) and streamed.query_allowed.shape == (2, 5)
    ak = probes.AttentionKernels.from_stream(streamed)
    assert torch.equal(ak.query, streamed.query) and ak.source == "pattern"


# ---------------------------------------------------------------------------------------------
# probes: scoring, verdict, metrics


def test_r2_and_mse_matrices_match_their_definitions_for_float32_and_torch_inputs():
    rng = np.random.default_rng(0)
    layer, step = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 6, 2))
    diff = layer[:, :, None] - step[:, None]
    mse = (diff**2).mean(axis=(0, 3))
    sst = ((step - step.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))
    r2 = 1 - (diff**2).sum(axis=(0, 3)) / sst
    np.testing.assert_allclose(probes.mse_matrix(layer, step), mse, rtol=1e-12)
    np.testing.assert_allclose(probes.r2_matrix(layer, step), r2, rtol=1e-12)
    got = probes.r2_matrix(torch.tensor(layer, dtype=torch.float32), torch.tensor(step, dtype=torch.float32))
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (4, 6)
    with pytest.raises(ValueError, match="trailing"):
        probes.r2_matrix(layer, step[..., :1])


def test_monotone_alignment_is_the_non_decreasing_minimum_with_earliest_ties():
    rng = np.random.default_rng(1)
    cost = rng.random((2, 3, 4))
    steps, total = probes.monotone_alignment(cost)
    assert steps.shape == (2, 3) and total.shape == (2,) and np.issubdtype(steps.dtype, np.integer)
    for b in range(2):
        best = min((sum(cost[b, l, p[l]] for l in range(3)), p) for p in itertools.combinations_with_replacement(range(4), 3))
        assert total[b] == pytest.approx(best[0]) and tuple(steps[b]) == best[1]
    assert tuple(probes.monotone_alignment(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))[0]) == (0, 0)


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(2)
    layer, steps = rng.normal(size=(3, 4, 2)), {"a": rng.normal(size=(3, 6, 2)), "b": rng.normal(size=(3, 6, 2))}
    return layer, steps, probes.score_algorithms(layer, steps, steps["a"][:, -1], bootstrap=20)


def test_algorithm_scores_have_the_documented_fields_and_shapes(scored):
    _, steps, scores = scored
    for name, score in scores.items():
        assert score.algorithm == name and score.n_prompts == 3 and score.level == 0.95
        assert list(score.layers) == [0, 1, 2, 3] and list(score.scored) == [1, 2, 3]  # layer 0 is not scored
        assert score.r2.shape == score.mse.shape == (4, 6)
        assert score.aligned_steps.shape == score.argmin_steps.shape == score.aligned_r2.shape == (4,)
        assert (np.diff(score.aligned_steps) >= 0).all()
        assert score.aligned_r2_ci.shape == (4, 2) and score.score_samples.shape == (20,)
        assert score.model_profile.shape == (4,) and score.algorithm_profile.shape == (6,)
        assert score.sensitivity_r2 is None and score.weighted_r2 is None  # None without those inputs
    verdict = probes.identifiability_verdict(scores, steps)
    assert verdict.algorithms == ["a", "b"] and verdict.agreement.shape == verdict.separable.shape == (2, 2)
    assert not verdict.separable.diagonal().any() and np.allclose(verdict.agreement.diagonal(), 1)
    assert verdict.identified is False  # 3 prompts, 20 resamples: too few for a verdict


def test_score_algorithms_refuses_krr_predictions_of_another_shape(scored):
    layer, steps, _ = scored
    with pytest.raises(ValueError, match="krr_pred"):
        probes.score_algorithms(layer, steps, steps["a"][:, -1, :1], bootstrap=0)


def test_alignment_metrics_are_float64_per_matrix_and_exact_on_identical_matrices():
    A = torch.rand(3, 4, 5)
    metrics = probes.alignment_metrics(A, A)
    assert set(metrics) == {"operator_distance", "cka", "spearman", "row_spearman"}
    for value in metrics.values():
        assert value.shape == (3,) and value.dtype == torch.float64
    torch.testing.assert_close(metrics["operator_distance"], torch.zeros(3, dtype=torch.float64))
    for name in ("cka", "spearman", "row_spearman"):
        torch.testing.assert_close(metrics[name], torch.ones(3, dtype=torch.float64))


def test_alignment_metrics_broadcasts_a_structural_mask_over_leading_dimensions():
    A, B = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    mask = torch.rand(4, 5) > 0.3
    got = probes.alignment_metrics(A, B, mask=mask)
    expected = probes.alignment_metrics(A, B, mask=mask.expand(3, 4, 5))
    torch.testing.assert_close(got["spearman"], expected["spearman"])


# ---------------------------------------------------------------------------------------------
# probes.diagnose and its results


@pytest.fixture(scope="module")
def diagnosis():
    sampler = tasks.GPRegressionSampler(2, bandwidth=0.7)
    torch.manual_seed(3)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2))
    task = sampler.sample(4, 5, 2, seed=3)
    return model, task, probes.diagnose(model, task, bootstrap=10, progress=False, n_steps=4, sensitivities=True)


def test_diagnosis_fields_hold_the_documented_shapes_and_the_krr_system_it_names(diagnosis):
    model, task, result = diagnosis
    r = result["tasks"]  # a lone ICLTask is the set named "tasks"
    assert (r.kernel, r.kernel_params, r.n_steps, r.n_support, r.layers) == ("gaussian", {"bandwidth": 0.7}, 4, 5, [0, 1, 2])
    assert r.lam == pytest.approx(tasks.bayes_optimal_ridge(task.info)) and (r.n_prompts, r.n_query) == (4, 2)
    assert r.layer_predictions.shape == (4, 3, 2) and r.krr_predictions.shape == (4, 2) and r.kappa.shape == (4,)
    assert set(r.step_predictions) == set(r.scores) == set(probes.DEFAULT_ALGORITHMS)
    assert all(v.shape == (4, 5, 2) and v.dtype == np.float64 for v in r.step_predictions.values())
    assert r.layer_sensitivities.shape == (4, 3, 2, 5)
    assert all(v.shape == (4, 5, 2, 5) for v in r.step_sensitivities.values())
    xs, xq, ys = (getattr(task, f).double() for f in ("x_support", "x_query", "y_support"))
    K, Kq = kernels.gaussian_kernel(xs, bandwidth=0.7), kernels.gaussian_kernel(xq, xs, bandwidth=0.7)
    np.testing.assert_allclose(r.kappa, kernels.condition_number(K, r.lam).numpy(), rtol=1e-10)
    np.testing.assert_allclose(r.krr_predictions, (Kq @ solvers.krr(K, ys, r.lam)[..., None])[..., 0].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.step_predictions["cg"], solvers.cg(K, ys, r.lam, 4, K_query=Kq).pred.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.layer_predictions, probes.layer_predictions(model, task).numpy())
    for fitted in r.fitted_steps.values():
        assert fitted.folds.shape == (4,) and fitted.step.shape == (2,) and fitted.fit_score.shape == (2,)
        assert (fitted.momentum is None) == (fitted.algorithm != "heavy_ball")


def test_diagnosis_tables_and_json_are_as_documented(diagnosis):
    _, _, result = diagnosis
    frame = result.to_dataframe()
    assert list(frame.columns) == ["task_set", "algorithm", "layer", "step", "r2", "mse", "sensitivity_r2", "aligned",
                                   "argmin", "score", "score_ci_low", "score_ci_high", "weighted_r2", "best"]
    assert len(frame) == len(probes.DEFAULT_ALGORITHMS) * 3 * 5  # one row per (set, algorithm, layer, step)
    json.loads(result.to_json(), parse_constant=lambda token: pytest.fail(f"non-strict JSON token {token}"))
    comparison = probes.compare({"m": result}).to_dataframe()
    assert list(comparison.columns) == ["model", "task_set", "best", "score", "ci_low", "ci_high", "identified", "withheld",
                                        "exp_distance", "exp_uniform", "gaussian_distance", "gaussian_uniform", "step_map"]


def test_diagnose_argument_errors_are_one_line_value_errors_naming_the_argument(diagnosis):
    model, task, _ = diagnosis
    for kwargs, word in (
        ({"algorithms": ["foo"]}, "algorithm"),
        ({"lam": 0}, "lam"),
        ({"n_steps": 0}, "n_steps"),
        ({"kernel": "foo"}, "kernel"),
        ({"kernel": "gaussian", "kernel_params": {"temperature": 1.0}}, "kernel_params"),
        ({"seed": 2**32}, "seed"),
        ({"layers": [2, 1]}, "layers"),
        ({"step_sizes": "foo"}, "step_sizes"),
    ):
        with pytest.raises(ValueError, match=word) as error:
            probes.diagnose(model, task, progress=False, bootstrap=0, kernels=(), **kwargs)
        assert "\n" not in str(error.value)


def test_diagnose_refuses_kernel_params_that_are_not_a_dict_naming_it(diagnosis):
    model, task, _ = diagnosis
    with pytest.raises(ValueError, match="kernel_params"):
        probes.diagnose(model, task, progress=False, bootstrap=0, kernels=(), kernel_params=tasks.GPRegressionSampler(2).kernel_params)


# ---------------------------------------------------------------------------------------------
# mi_krr.checkpoints and mi_krr.train


def test_shipped_checkpoint_loads_in_eval_mode_with_its_run_description():
    run = shipped_checkpoint("softmax_gp")
    model = load_model(run)
    assert isinstance(model, ICLTransformer) and not model.training and next(model.parameters()).dtype == torch.float32
    assert set(read_run_config(run)) == {"model", "sampler", "train"}
    loaded = load_checkpoint(run)
    assert (loaded.format, loaded.n_support, loaded.n_query, loaded.label_scale, loaded.lam) == ("mi-krr", 24, 8, 1.0, None)
    assert not loaded.model.training and isinstance(loaded.sampler, tasks.GPRegressionSampler)
    for call, word in ((lambda: shipped_checkpoint("foo"), "name"), (lambda: load_model(run, device="foo"), "device"),
                       (lambda: load_checkpoint(run, task="foo"), "task"), (lambda: load_checkpoint(run, n_query=0), "n_query")):
        with pytest.raises(ValueError, match=word):
            call()


def test_save_model_and_load_model_round_trip_a_float64_model(tmp_path):
    model = ICLTransformer(ICLTransformerConfig(n_dims=1, d_model=4, n_layers=1, n_heads=1, dtype="float64"))
    back = load_model(save_model(tmp_path / "m.safetensors", model))
    assert next(back.parameters()).dtype == torch.float64 and not back.training and back.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)


def test_task_sets_draw_every_applicable_shift_with_consecutive_seeds(gp_sampler):
    sets, notes = task_sets(gp_sampler, 2, 3, 1, seed=5)
    assert list(sets) == ["in_distribution", *tasks.applicable_shifts(gp_sampler)]
    assert [t.info["seed"] for t in sets.values()] == list(range(5, 5 + len(sets)))
    assert all(t.dtype == torch.float32 and t.batch_size == 2 for t in sets.values())
    assert len(notes) == len(tasks.DEFAULT_SHIFTS) - len(sets) + 1


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_task_sets_refuse_seeds_outside_0_to_2_pow_32(gp_sampler, seed):
    with pytest.raises(ValueError, match="seed"):
        task_sets(gp_sampler, 1, 2, 1, seed=seed)


def test_held_out_reference_and_evaluate_return_the_documented_types(icl_model, gp_sampler):
    cfg = TrainConfig(steps=2, batch_size=3, warmup_steps=1, n_support=5, n_query=2, eval_prompts=3)
    reference = held_out_reference(gp_sampler, cfg)
    assert reference.task.dtype == torch.float32 and reference.task.device.type == "cpu"
    assert reference.optimal_pred.shape == (3, 2) and reference.optimal_pred.dtype == torch.float64
    assert isinstance(reference.optimal_mse, float) and isinstance(reference.zero_mse, float)
    metrics = evaluate(icl_model, reference)
    assert set(metrics) == {"model_mse", "optimal_mse", "ratio", "zero_mse", "gap_to_optimal_mse"}
    assert metrics["ratio"] == pytest.approx(metrics["model_mse"] / metrics["optimal_mse"])


def test_garg_checkpoint_keeps_the_adapter_contract_and_loads_with_its_documented_task_family(tmp_path):
    yaml = pytest.importorskip("yaml")
    transformers = pytest.importorskip("transformers")
    from mi_krr.models import load_garg_checkpoint

    n_dims, n_positions, n_embd, n_layer, n_head = 3, 8, 16, 2, 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", "n_dims": n_dims, "n_positions": n_positions,
                                                                     "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head}}))
    torch.manual_seed(0)
    parts = {"_read_in": torch.nn.Linear(n_dims, n_embd), "_read_out": torch.nn.Linear(n_embd, 1),
             "_backbone": transformers.GPT2Model(transformers.GPT2Config(n_positions=2 * n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head))}
    state = {f"{prefix}.{k}": v for prefix, module in parts.items() for k, v in module.state_dict().items()}
    torch.save({"model_state_dict": state, "train_step": 5}, tmp_path / "state.pt")
    model = quiet(load_garg_checkpoint, tmp_path)
    t = tasks.LinearRegressionSampler(n_dims).sample(3, 5, 2, seed=0)
    prompt = model.encode(t)
    assert prompt.tokens.shape == (6, 11, n_dims) and model.max_seq_len == 2 * n_positions
    outputs, cache = quiet(model.run_with_cache, prompt.tokens)
    names = model.residual_hook_names()
    assert len(names) == n_layer + 1 and all(hooks.scores is not None for hooks in model.attention_hook_names())
    torch.testing.assert_close(model.readout(cache[names[-1]]), outputs)
    assert probes.layer_predictions(model, t).shape == (3, n_layer + 1, 2)
    assert model.prefix_predictions(t).shape == (3, 5) and not model.training
    loaded = quiet(load_checkpoint, tmp_path)
    assert (loaded.format, loaded.n_support, loaded.n_query) == ("garg", min(2 * n_dims, n_positions - 1), 8)
    assert loaded.label_scale == pytest.approx(n_dims**0.5) and loaded.lam == pytest.approx(1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_solvers_samplers_and_probes_stay_on_the_cuda_device(icl_model, gp_sampler):
    t = gp_sampler.sample(3, 5, 2, seed=0, device="cuda")
    assert t.device.type == "cuda"
    K = kernels.gaussian_kernel(t.x_support)
    assert K.device.type == "cuda"
    for name in solvers.ALGORITHMS:
        assert solvers.solve(name, K, t.y_support, 0.1, 2).alpha.device.type == "cuda"
    model = ICLTransformer(icl_model.cfg, device="cuda")
    assert probes.layer_predictions(model, t).device.type == "cuda"
