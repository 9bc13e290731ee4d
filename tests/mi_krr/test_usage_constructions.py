"""Usage review of the constructed reference models (`mi_krr.construct`, its studies and
`mi-krr construct`) as a researcher calls them from a notebook: awkward-but-legal prompts (batch
of 1, one support point, one query, d = 1, task dimension below the model's, float32 tasks),
the kernels and options the constructions document, repeated calls, dtype moves and state-dict
round trips, each checked step by step against CG / row-sum Richardson / GD written here in
NumPy float64 (independent of `mi_krr.solvers`).

The review's findings (each fixed) are the tests after the NumPy references' checks: clear
one-line errors, refusals of silent misuse, and what `params` and the docstrings say."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import mi_krr.construct.richardson as richardson_module
from mi_krr.cli import main
from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.construct.studies import cg_rate_study, width_study
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from construct_references import numpy_cg_predictions

# ---------------------------------------------------------------- NumPy references (float64)


def numpy_rowsum_richardson(K, y, lam, K_query, step, n_steps):
    """alpha <- alpha + step D^-1 (y - (K + lam I) alpha), D = diag(K 1), from 0: (predictions
    `[T + 1, m]`, alphas `[T + 1, n]`)."""
    A, D = K + lam * np.eye(len(y)), K.sum(1)
    alpha = np.zeros_like(y)
    preds, alphas = [K_query @ alpha], [alpha]
    for _ in range(n_steps):
        alpha = alpha + step * (y - A @ alpha) / D
        preds.append(K_query @ alpha)
        alphas.append(alpha)
    return np.array(preds), np.array(alphas)


def numpy_gd(X, y, lam, X_query, lr, n_steps):
    """w <- w + lr (X^T y - (X^T X + lam I) w) from 0: predictions X_query w_t `[T + 1, m]`."""
    w = np.zeros(X.shape[1])
    preds = [X_query @ w]
    for _ in range(n_steps):
        w = w + lr * (X.T @ y - (X.T @ X + lam * np.eye(X.shape[1])) @ w)
        preds.append(X_query @ w)
    return np.array(preds)


def gaussian(a, b, bandwidth):
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth**2))


def arrays(task):
    return (task.x_support.double().numpy(), task.x_query.double().numpy(), task.y_support.double().numpy())


def assert_relative(got, expected, rtol):
    """max |got - expected| <= rtol * max |expected| (a whole trajectory at once)."""
    scale = max(float(np.abs(expected).max()), 1e-300)
    assert float(np.abs(got - expected).max()) <= rtol * scale, float(np.abs(got - expected).max()) / scale


SHAPES = [(1, 1, 1, 1), (1, 5, 1, 1), (2, 3, 2, 4), (3, 10, 4, 3)]  # (batch, n_support, n_query, d)


# ---------------------------------------------------------------- exactness on awkward prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, n, m, d", SHAPES)
def test_cg_construction_is_numpy_cg_step_by_step_on_small_prompts(batch, n, m, d, dtype):
    """Batch of 1, one support point, d = 1, float32 tasks (cast to the float64 model), and more
    steps (6) than support points: every step's query prediction is textbook NumPy CG's (past
    termination it stays at the KRR prediction)."""
    task = LinearRegressionSampler(d, noise_std=0.1).sample(batch, n, m, seed=1, dtype=dtype)
    states = cg_transformer(6, 0.1, dim=d).step_states(task)
    assert states.pred.dtype == torch.float64 and states.pred.shape == (batch, 7, m)
    x, xq, y = arrays(task)
    for b in range(batch):
        assert_relative(states.pred[b].numpy(), numpy_cg_predictions(x[b] @ x[b].T, y[b], 0.1, xq[b] @ x[b].T, 6), 1e-11)
    if n <= 6:  # CG has terminated: the KRR prediction, from a direct solve
        for b in range(batch):
            krr = xq[b] @ x[b].T @ np.linalg.solve(x[b] @ x[b].T + 0.1 * np.eye(n), y[b])
            assert_relative(states.pred[b, -1].numpy(), krr, 1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, n, m, d", SHAPES)
def test_richardson_construction_is_numpy_rowsum_richardson_on_small_prompts(batch, n, m, d, dtype):
    """The softmax construction's alpha and query predictions after every step equal NumPy row-sum
    Richardson on the Gaussian kernel (one support point: D = 1, a sink weight of exactly 1/2)."""
    task = GPRegressionSampler(d, bandwidth=0.5).sample(batch, n, m, seed=1, dtype=dtype)
    states = richardson_transformer(6, 0.1, bandwidth=0.5, step=0.7, dim=d).step_states(task)
    x, xq, y = arrays(task)
    for b in range(batch):
        preds, alphas = numpy_rowsum_richardson(gaussian(x[b], x[b], 0.5), y[b], 0.1, gaussian(xq[b], x[b], 0.5), 0.7, 6)
        assert_relative(states.pred[b].numpy(), preds, 1e-13)
        assert_relative(states.support["alpha"][b].numpy(), alphas, 1e-13)


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("batch, n, m, d", SHAPES)
def test_gd_construction_is_numpy_gd_on_small_prompts(batch, n, m, d, lam):
    """Plain least-squares GD (lam = 0, the default) and ridge GD: every layer's prediction is
    NumPy GD's; the support slot holds the documented residual y_j - x_j^T w_t."""
    task = LinearRegressionSampler(d, noise_std=0.1).sample(batch, n, m, seed=1, dtype=torch.float32)
    model = gd_transformer(6, lr=0.05, lam=lam, dim=d)
    states = model.step_states(task)
    x, xq, y = arrays(task)
    for b in range(batch):
        assert_relative(states.pred[b].numpy(), numpy_gd(x[b], y[b], lam, xq[b], 0.05, 6), 1e-13)
        w = np.zeros(d)  # s_j = y_j - x_j^T w_t on support tokens
        for t in range(3):
            assert_relative(states.support["s"][b, t].numpy(), y[b] - x[b] @ w, 1e-13)
            w = w + 0.05 * (x[b].T @ y[b] - (x[b].T @ x[b] + lam * np.eye(d)) @ w)


def test_constructions_zero_pad_tasks_of_lower_dimension():
    """dim larger than the task's d (documented: zero-padded): the same NumPy trajectories as on
    the unpadded inputs, for all three constructions."""
    lin = LinearRegressionSampler(2, noise_std=0.1).sample(2, 6, 3, seed=4, dtype=torch.float64)
    gp = GPRegressionSampler(2, bandwidth=0.7).sample(2, 6, 3, seed=4, dtype=torch.float64)
    cg_pred = cg_transformer(5, 0.2, dim=5).step_states(lin).pred.numpy()
    gd_pred = gd_transformer(5, lr=0.05, lam=0.2, dim=5).step_states(lin).pred.numpy()
    rich_pred = richardson_transformer(5, 0.2, bandwidth=0.7, step=0.6, dim=4).step_states(gp).pred.numpy()
    x, xq, y = arrays(lin)
    gx, gxq, gy = arrays(gp)
    for b in range(2):
        assert_relative(cg_pred[b], numpy_cg_predictions(x[b] @ x[b].T, y[b], 0.2, xq[b] @ x[b].T, 5), 1e-12)
        assert_relative(gd_pred[b], numpy_gd(x[b], y[b], 0.2, xq[b], 0.05, 5), 1e-13)
        expected, _ = numpy_rowsum_richardson(gaussian(gx[b], gx[b], 0.7), gy[b], 0.2, gaussian(gxq[b], gx[b], 0.7), 0.6, 5)
        assert_relative(rich_pred[b], expected, 1e-13)


def test_cg_gaussian_random_feature_head_is_cg_on_the_written_out_features():
    """kernel="gaussian" with a non-unit bandwidth: the head's phi is the documented positive
    random feature exp(W^T x / sigma - |x|^2 / sigma^2) / sqrt(m) (written out from its weights,
    so the bandwidth is the one passed), and the model runs exact CG on Phi Phi^T."""
    sigma, width = 0.7, 24
    task = GPRegressionSampler(2, bandwidth=sigma).sample(2, 8, 3, seed=2, dtype=torch.float64)
    model = cg_transformer(5, 0.1, kernel="gaussian", head_width=width, bandwidth=sigma, dim=2, seed=3)
    W = model.feature_map.weights.numpy()

    def phi(points):
        scaled = points / sigma
        return np.exp(scaled @ W - (scaled**2).sum(-1, keepdims=True)) / np.sqrt(width)

    pred = model.step_states(task).pred.numpy()
    x, xq, y = arrays(task)
    for b in range(2):
        assert_relative(pred[b], numpy_cg_predictions(phi(x[b]) @ phi(x[b]).T, y[b], 0.1, phi(xq[b]) @ phi(x[b]).T, 5), 1e-9)


def test_scratch_coordinates_are_zero_at_every_step_boundary():
    """The module docstrings: CG's scratch (Kr, bp, bKp, kr, bkq, rr_new, inv_rr, pAp, inv_pAp) and
    Richardson's (u, z_s, z_q, o) are 0 on every token at every step hook."""
    cases = [
        (cg_transformer(3, 0.1, dim=2), LinearRegressionSampler(2, noise_std=0.1).sample(2, 5, 2, seed=1),
         ("Kr", "bp", "bKp", "kr", "bkq", "rr_new", "inv_rr", "pAp", "inv_pAp")),
        (richardson_transformer(3, 0.1, 0.5, 0.7, dim=2), GPRegressionSampler(2).sample(2, 5, 2, seed=1), ("u", "z_s", "z_q", "o")),
    ]
    for model, task, scratch in cases:
        prompt = model.encode(task)
        _, cache = model.run_with_cache(prompt.tokens, names_filter=model.step_hook_names())
        for name in model.step_hook_names():
            for coordinate in scratch:
                assert float(cache[name][..., model.state_coordinates[coordinate]].abs().max()) == 0.0, (name, coordinate)


def test_richardson_states_hold_the_inverse_row_sums_on_support_and_query_tokens():
    """Documented states: dinv = 1 / D_i on support tokens and izq = 1 + D_* on queries
    (D the Gaussian kernel's row sums over the support points), at every step after the first."""
    task = GPRegressionSampler(2, bandwidth=0.5).sample(2, 5, 3, seed=1, dtype=torch.float64)
    states = richardson_transformer(2, 0.1, 0.5, 0.7, dim=2).step_states(task)
    x, xq, _ = arrays(task)
    for b in range(2):
        for t in (1, 2):
            np.testing.assert_allclose(states.support["dinv"][b, t].numpy(), 1 / gaussian(x[b], x[b], 0.5).sum(1), rtol=1e-13)
            np.testing.assert_allclose(states.query["izq"][b, t].numpy(), 1 + gaussian(xq[b], x[b], 0.5).sum(1), rtol=1e-13)


def test_repeated_calls_state_dict_round_trip_and_dtype_moves():
    """Calling a model twice gives identical predictions; a state dict loaded into a rebuilt model
    (every construction and arithmetic) reproduces them bit for bit; a model moved to float32
    answers in float32 within float32 rounding of NumPy CG."""
    lin = LinearRegressionSampler(3, noise_std=0.1).sample(2, 8, 3, seed=1, dtype=torch.float64)
    gp = GPRegressionSampler(3, bandwidth=0.5).sample(2, 8, 3, seed=1, dtype=torch.float64)
    builders = [
        (lambda: cg_transformer(3, 0.1, dim=3), lin),
        (lambda: cg_transformer(3, 0.1, dim=3, mlp="relu", mlp_width=64), lin),
        (lambda: richardson_transformer(3, 0.1, 0.5, 0.7, dim=3, mlp="relu"), gp),
        (lambda: gd_transformer(3, 0.05, 0.1, dim=3), lin),
    ]
    for build, task in builders:
        model = build()
        first = model.predict(task)
        assert torch.equal(first, model.predict(task))
        rebuilt = build()
        rebuilt.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        assert torch.equal(rebuilt.predict(task), first)
    model = cg_transformer(3, 0.1, dim=3).to(torch.float32)
    pred = model.predict(lin)
    assert pred.dtype == torch.float32
    x, xq, y = arrays(lin)
    for b in range(2):
        assert_relative(pred[b].double().numpy(), numpy_cg_predictions(x[b] @ x[b].T, y[b], 0.1, xq[b] @ x[b].T, 3)[-1], 1e-5)


def test_documented_d_model_of_cg_and_gd():
    """cg: d_model = 20 + dim + 2 m (m = dim for exact linear features, else head_width);
    gd: 5 + dim, one more with lam > 0 (module docstrings)."""
    for dim in (1, 3):
        assert cg_transformer(1, 0.1, dim=dim).d_model == 20 + dim + 2 * dim
        assert cg_transformer(1, 0.1, kernel="exp", head_width=7, dim=dim).d_model == 20 + dim + 14
        assert gd_transformer(1, 0.1, dim=dim).d_model == 5 + dim
        assert gd_transformer(1, 0.1, lam=0.1, dim=dim).d_model == 6 + dim


# ---------------------------------------------------------------- the review's findings


def test_relu_cg_at_its_defaults_refuses_a_reciprocal_input_above_recip_range_and_runs_once_it_is_widened():
    """cg_transformer(mlp="relu") at the default width 256 and recip_range (1e-6, 1e4), on
    LinearRegressionSampler(16) prompts of 128 points: p^T (K + lam I) p ~ 2.5e4 lies above the
    reciprocal's range, where the interpolant would saturate at 1e-4 (a step 2.5x too long, and CG
    diverging to NaN): refused naming recip_range. With the range widened to 1e6 (and 512 units
    for the extra decades) the model follows NumPy CG to 1% of the trajectory's peak."""
    task = LinearRegressionSampler(16, noise_std=0.1).sample(1, 128, 3, seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"beyond recip_range's high end 1e\+04.*rebuild the model with recip_range=\(1e-06, >= "):
        cg_transformer(8, 0.1, dim=16, mlp="relu").step_states(task)
    pred = cg_transformer(8, 0.1, dim=16, mlp="relu", mlp_width=512, recip_range=(1e-6, 1e6)).step_states(task).pred.numpy()
    x, xq, y = arrays(task)
    assert_relative(pred[0], numpy_cg_predictions(x[0] @ x[0].T, y[0], 0.1, xq[0] @ x[0].T, 8), 1e-2)


def test_relu_cg_with_a_small_mlp_width_is_refused_naming_mlp_width():
    """mlp_width=8 on a 16-point, d = 4 prompt: the reciprocal interpolant overshoots 1/s by up to
    7x (`ReluArithmetic.reciprocal_overshoot`), beta and the step length blow up until a
    reciprocal's input leaves recip_range (it would reach NaN): refused, naming mlp_width."""
    task = LinearRegressionSampler(4, noise_std=0.1).sample(1, 16, 2, seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"with a larger mlp_width \(now 8"):
        cg_transformer(8, 0.1, dim=4, mlp="relu", mlp_width=8).step_states(task)


def test_relu_richardson_with_a_tiny_width_names_mlp_width():
    """richardson_transformer(mlp="relu", mlp_width=2) with the default bound and range: the 2-unit
    reciprocal overshoots ~500x, so the derived bound is ~1.7e4 and the range check fails; the
    message says "widen recip_range or lower mlp_bound" (widening makes the overshoot, and the
    bound, larger still; the user set neither) instead of naming mlp_width."""
    with pytest.raises(ValueError, match="mlp_width"):
        richardson_transformer(2, 0.1, 0.5, 0.7, dim=2, mlp="relu", mlp_width=2)


@pytest.mark.parametrize("feature_map", [lambda x: x, torch.nn.Linear(2, 4), "exp"])
def test_cg_transformer_refuses_a_feature_map_without_the_interface_naming_it(feature_map):
    """A plain function, an nn.Module or a kernel name passed as feature_map should give a
    ValueError naming feature_map and what it needs, not AttributeError: 'function' object has
    no attribute 'in_dim'."""
    with pytest.raises(ValueError, match="feature_map"):
        cg_transformer(1, 0.1, dim=2, feature_map=feature_map)


@pytest.mark.parametrize("build", [lambda d: cg_transformer(1, 0.1, dim=2, device=d),
                                   lambda d: richardson_transformer(1, 0.1, 1.0, 0.5, dim=2, device=d),
                                   lambda d: gd_transformer(1, 0.1, dim=2, device=d)])
def test_constructions_refuse_an_unknown_device_naming_it(build):
    """The studies answer device="gpu" with "device 'gpu' cannot be used here (not a torch device
    name, ...)"; the constructions pass it to nn.Module.to, which raises "Expected one of cpu, cuda,
    ipu, xpu, ... device type at start of device string: gpu"."""
    with pytest.raises(ValueError, match="device"):
        build("gpu")


def test_width_study_takes_one_kernel_and_one_head_as_a_string():
    """kernels="linear", heads="top_eigen" (one of each, as `mi_krr.reproductions.width` accepts
    through as_tuple): the same study as with 1-tuples; today "kernels must be one of 'linear',
    'exp', got 'l'"."""
    kwargs = dict(widths=(2,), dim=2, n_support=4, n_query=2, n_steps=2, batch_size=2)
    study = width_study(kernels="linear", heads="top_eigen", **kwargs)
    reference = width_study(kernels=("linear",), heads=("top_eigen",), **kwargs)
    assert study.kernels == ["linear"] and study.curves[0].error == reference.curves[0].error


def test_cg_rate_study_with_a_lone_kappa_is_refused_naming_kappas():
    with pytest.raises(ValueError, match="kappas"):
        cg_rate_study(kappas=10.0, n_support=4, n_steps=1, batch_size=1)


def test_width_study_without_queries_is_refused():
    """With no query points the relative errors are 0 / 0 clamped to 0: every curve reads as an
    exact head. It should be a ValueError naming n_query."""
    with pytest.raises(ValueError, match="n_query"):
        width_study(widths=(4,), kernels=("linear",), dim=2, n_support=6, n_query=0, n_steps=2, batch_size=2)


@pytest.mark.parametrize("recip_range", [1e-4, (1e-6,)])
def test_relu_recip_range_of_the_wrong_shape_is_refused_naming_it(recip_range):
    with pytest.raises(ValueError, match="recip_range"):
        cg_transformer(1, 0.1, dim=2, mlp="relu", recip_range=recip_range)


def test_richardson_docstring_states_its_d_model():
    """3 flags + x [dim] + y, sqnorm + alpha, u, z_s, dinv + pred, z_q, izq, o = 13 + dim."""
    stated = int(re.search(r"d_model = (\d+) \+ dim", richardson_module.__doc__).group(1))
    for dim in (1, 3):
        assert richardson_transformer(1, 0.1, 1.0, 0.5, dim=dim).d_model == stated + dim


def test_construct_cli_names_the_head_width_option_it_needs(capsys):
    assert main(["construct", "cg", "--kernel", "gaussian", "--dim", "2", "--n-support", "3", "--batch", "1", "--steps", "1"]) == 2
    assert "--head-width" in capsys.readouterr().err


def test_construct_cli_tiny_relu_width_names_the_mlp_width_option(capsys):
    assert main(["construct", "richardson", "--steps", "1", "--mlp", "relu", "--mlp-width", "2", "--dim", "2", "--n-support", "3",
                 "--batch", "1"]) == 2
    assert "--mlp-width" in capsys.readouterr().err


def test_cg_params_do_not_contradict_an_explicit_feature_map():
    """`ConstructedTransformer.params` is documented as the construction's parameters (kernel, head
    width, ...); with feature_map=PositiveRandomFeatures(kind="gaussian", bandwidth=0.3, seed=5)
    it reported the unused defaults kernel='linear', bandwidth=1.0, seed=0; now the map's class.
    Built from a kernel, params holds the parameter that kernel reads, the seed of its random
    features, and in relu mode mlp_width and recip_range."""
    from mi_krr.feature_maps import PositiveRandomFeatures

    model = cg_transformer(1, 0.1, dim=2, feature_map=PositiveRandomFeatures(2, 8, kind="gaussian", bandwidth=0.3, seed=5))
    assert model.params == {"lam": 0.1, "feature_map": "PositiveRandomFeatures", "head_width": 8, "mlp": "exact"}
    relu = cg_transformer(1, 0.1, dim=2, kernel="gaussian", head_width=8, bandwidth=0.3, seed=5, mlp="relu", mlp_width=16)
    assert relu.params == {"lam": 0.1, "kernel": "gaussian", "bandwidth": 0.3, "seed": 5, "head_width": 8, "mlp_width": 16,
                           "recip_range": (1e-6, 1e4), "mlp": "relu"}


def test_cg_transformer_refuses_a_kernel_parameter_its_kernel_does_not_read():
    """kernel="gaussian" reads bandwidth only; temperature=0.2 is ignored without a word and stored
    in model.params as if used (`mi-krr construct` refuses the same combination; so does
    PositiveRandomFeatures: "temperature applies to kind='exp' only")."""
    with pytest.raises(ValueError, match="temperature"):
        cg_transformer(1, 0.1, dim=2, kernel="gaussian", head_width=8, temperature=0.2)


def test_cg_with_a_prompt_feature_map_survives_torch_save():
    """A CG construction on a top-eigen ProjectedKernelFeatures head (m = 8 >= N = 7, so the head
    is the exact exp kernel) pickles whole (torch.save; it used to fail on a local closure) and the
    reloaded model predicts NumPy CG on the exp kernel exp(x x'^T) built here."""
    import io

    from mi_krr.feature_maps import ProjectedKernelFeatures

    feature_map = ProjectedKernelFeatures("exp", 2, 8, projection="top", temperature=1.0)
    model = cg_transformer(3, 0.5, kernel="exp", dim=2, feature_map=feature_map)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    task = LinearRegressionSampler(2).sample(2, 5, 2, seed=3, dtype=torch.float64)
    points = np.concatenate([task.x_support.numpy(), task.x_query.numpy()], axis=1)
    K_all = np.exp(np.einsum("bnd,bmd->bnm", points, points))
    expected = [numpy_cg_predictions(K[:5, :5], y, 0.5, K[5:, :5], 3)[-1] for K, y in zip(K_all, task.y_support.numpy())]
    with torch.no_grad():
        got = reloaded.predict(task).numpy()
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-6, atol=1e-8)


def test_a_saved_richardson_construction_reloads_and_runs_numpy_richardson(tmp_path):
    """`mi-krr construct richardson --save` then `load_construction(out)`: the reloaded model (its
    default step depends on the command's prompts, rebuilt from construction.json) runs row-sum
    Richardson with the recorded step and bandwidth on new prompts (NumPy reference); a missing
    folder names what to pass."""
    from mi_krr.commands.construct import load_construction

    out = tmp_path / "richardson"
    assert main(["construct", "richardson", "--steps", "3", "--dim", "2", "--n-support", "6", "--batch", "2", "--save",
                 "--out", str(out)]) == 0
    recipe = json.loads((out / "construction.json").read_text())
    step, bandwidth, lam = recipe["params"]["step"], recipe["params"]["bandwidth"], recipe["lam"]
    model = load_construction(out)
    task = GPRegressionSampler(2, kernel="gaussian", bandwidth=bandwidth, noise_std=0.1).sample(2, 6, 2, seed=7, dtype=torch.float64)
    x, xq, y = arrays(task)
    with torch.no_grad():
        got = model.step_states(task).pred.numpy()
    for b in range(2):
        expected, _ = numpy_rowsum_richardson(gaussian(x[b], x[b], bandwidth), y[b], lam, gaussian(xq[b], x[b], bandwidth), step, 3)
        np.testing.assert_allclose(got[b], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="construction.json does not exist: pass the --out folder"):
        load_construction(tmp_path / "nowhere")
