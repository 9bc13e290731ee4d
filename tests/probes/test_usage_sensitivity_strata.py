"""Usage review: label sensitivities (model and solver), how they enter the scores, kappa strata,
and fitted ridge probes, each against an independent reference (central finite differences,
NumPy closed forms of the linear-in-y iterations, np.linalg.cond, np.quantile, NumPy ridge), with
the awkward-but-legal inputs a researcher passes (one prompt, one query, one support point, a
float32 task on a float64 model, a layer subset in any order, more strata than prompts) and the
mistakes one makes (each a one-line ValueError naming the argument)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from mi_krr.construct import gd_transformer, richardson_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS
from mi_krr.tasks import ICLTask
from probes import fit_layer_probes, label_sensitivities, solver_sensitivities
from probes.scoring import score_algorithm, score_algorithms
from brute_force import lens_finite_differences
from prompts import copied_steps_case, random_task

LAM = 0.1


def small_model(attention: str = "softmax", n_layers: int = 2, dtype: str = "float64") -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=n_layers, n_heads=2, attention=attention, max_seq_len=32, dtype=dtype)
    return ICLTransformer(cfg).eval()


def step_layers(model) -> list[int]:
    """Residual indices of a construction's step hooks (embeddings, then one per solver step)."""
    names = model.residual_hook_names()
    return [names.index(name) for name in model.step_hook_names()]


def gaussian(a: np.ndarray, b: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))


def feature_gd_maps(X: np.ndarray, Xq: np.ndarray, lam: float, lr: float, steps: int) -> np.ndarray:
    """d pred_t / d y of w <- w + lr (X^T y - (X^T X + lam I) w), w_0 = 0: Xq W_t with
    W_{t+1} = W_t + lr (X^T - A W_t). Returns [T+1, m, n]."""
    A = X.T @ X + lam * np.eye(X.shape[1])
    W, out = np.zeros((X.shape[1], X.shape[0])), [np.zeros((Xq.shape[0], X.shape[0]))]
    for _ in range(steps):
        W = W + lr * (X.T - A @ W)
        out.append(Xq @ W)
    return np.stack(out)


def numpy_ridge(x: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin mean (x w + b - t)^2 + lam |w|^2, intercept unpenalised."""
    xc, tc = x - x.mean(0), t - t.mean()
    w = np.linalg.solve(xc.T @ xc / len(x) + lam * np.eye(x.shape[1]), xc.T @ tc / len(x))
    return w, t.mean() - x.mean(0) @ w


def query_features(model: ICLTransformer, task, layer: int) -> np.ndarray:
    """[B, m, d_model] residual stream at the concat layout's query positions, from run_with_cache."""
    _, cache = model.run_with_cache(model.encode(task).tokens)
    name = "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
    return cache[name][:, task.n_support : task.n_support + task.n_query].detach().numpy()


# ---------------------------------------------------------------- model sensitivities


@pytest.mark.parametrize("sizes", [(1, 1, 1), (1, 3, 1), (2, 4, 3)])
def test_linear_attention_sensitivities_equal_central_differences_down_to_one_prompt_query_and_label(sizes):
    """Linear-attention ICLTransformer (float64), batch x n_support x n_query down to 1 x 1 x 1:
    [B, L+1, m, n] equal central finite differences of the read-out lens in each label."""
    batch, n, m = sizes
    model, task = small_model("linear"), random_task(batch, n, m, 2, seed=1)
    sensitivities = label_sensitivities(model, task)
    assert sensitivities.shape == (batch, 3, m, n) and sensitivities.dtype == torch.float64
    expected = lens_finite_differences(model, task)
    torch.testing.assert_close(sensitivities, expected, rtol=1e-6, atol=1e-8)
    assert expected[:, 1:].abs().max() > 1e-2  # not vacuous


def test_a_float32_task_on_a_float64_model_and_unsorted_repeated_layers_follow_finite_differences():
    """A float32 task on a float64 model is differentiated in float64 (equal to central differences
    of the float64 cast); layers=(2, 0, 2) gives those rows in that order."""
    model, task = small_model(n_layers=2), random_task(2, 4, 2, 2, seed=1).to(dtype=torch.float32)
    expected = lens_finite_differences(model, task.to(dtype=torch.float64))  # [B, 3, m, n]
    torch.testing.assert_close(label_sensitivities(model, task), expected, rtol=1e-6, atol=1e-8)
    picked = label_sensitivities(model, task, layers=(2, 0, 2))
    torch.testing.assert_close(picked, expected[:, [2, 0, 2]], rtol=1e-6, atol=1e-8)


def test_gd_and_richardson_constructions_have_the_numpy_closed_form_sensitivities_at_their_step_hooks():
    """gd_transformer (lr 0.05, lam 0.1) and richardson_transformer (row-sum D^-1, w = 0.3, sigma 1):
    the model's d yhat / d y at each step hook equals the NumPy closed form of the iteration's
    step map (feature-space GD: Xq W_t; Richardson: Kq M_t, M_{t+1} = M_t + w D^-1 (I - A M_t))."""
    task, steps = random_task(2, 5, 2, 2, seed=3), 3
    gd = gd_transformer(steps, 0.05, lam=LAM, dim=2)
    got = label_sensitivities(gd, task, layers=step_layers(gd)).numpy()
    rich = richardson_transformer(steps, LAM, 1.0, 0.3, dim=2)
    got_rich = label_sensitivities(rich, task, layers=step_layers(rich)).numpy()
    for b in range(2):
        X, Xq = task.x_support[b].numpy(), task.x_query[b].numpy()
        np.testing.assert_allclose(got[b], feature_gd_maps(X, Xq, LAM, 0.05, steps), rtol=1e-10, atol=1e-13)
        K, Kq = gaussian(X, X), gaussian(Xq, X)
        A, Dinv, M, expected = K + LAM * np.eye(5), np.diag(1 / K.sum(1)), np.zeros((5, 5)), [np.zeros((2, 5))]
        for _ in range(steps):
            M = M + 0.3 * Dinv @ (np.eye(5) - A @ M)
            expected.append(Kq @ M)
        np.testing.assert_allclose(got_rich[b], np.stack(expected), rtol=1e-10, atol=1e-13)
    assert np.abs(got[:, -1]).max() > 1e-2 and np.abs(got_rich[:, -1]).max() > 1e-2


def test_label_sensitivities_of_something_that_is_not_a_task_is_a_one_line_value_error():
    """layer_predictions(model, tensor) says "task must be an mi_krr.tasks.ICLTask"; the
    sensitivities of the same mistake should say so too."""
    model, task = small_model(), random_task(1, 3, 1, 2)
    with pytest.raises(ValueError, match="task must be"):
        label_sensitivities(model, task.x_support)


# ---------------------------------------------------------------- solver sensitivities


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_one_support_point_every_solver_reaches_the_krr_map_in_one_step(algorithm):
    """n = 1: every registry solver at its spectrum-optimal parameters solves the 1 x 1 system in
    one step, so d pred_t / d y = 0 at t = 0 and k_q / (k + lam) for t >= 1 (closed form)."""
    K = torch.tensor([[[2.0]], [[0.7]]], dtype=torch.float64)
    K_query = torch.tensor([[[0.5], [1.5]], [[0.2], [-0.4]]], dtype=torch.float64)
    y = torch.tensor([[1.3], [-0.2]], dtype=torch.float64)
    got = solver_sensitivities(algorithm, K, K_query, LAM, 3, y=y).numpy()
    assert got.shape == (2, 4, 2, 1)
    expected = K_query.numpy() / (K.numpy() + LAM)  # [B, m, 1]
    np.testing.assert_allclose(got[:, 0], 0.0, atol=0)
    for t in (1, 2, 3):
        np.testing.assert_allclose(got[:, t], expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- sensitivities in diagnose


def test_diagnose_sensitivities_of_the_gd_construction_equal_closed_forms_and_score_1():
    """diagnose(sensitivities=True) on gd_transformer (lr 0.05) with layers (0, 2, 3): the layer
    sensitivities equal the NumPy feature-GD step maps at steps 0, 2, 3; fitted GD's step
    sensitivities equal the NumPy Richardson step map at each prompt's cross-fitted step; the
    sensitivity R2 matrix equals a pooled NumPy R2, and the sensitivity path R2 is 1."""
    lr, steps = 0.05, 3
    model, task = gd_transformer(steps, lr, lam=LAM, dim=2), random_task(6, 4, 2, 2, seed=3)
    layers = [step_layers(model)[t] for t in (0, 2, 3)]
    result = probes.diagnose(model, task, algorithms=("gd",), kernels=(), kernel="linear", lam=LAM, n_steps=4,
                             layers=layers, sensitivities=True, bootstrap=0, progress=False)["tasks"]
    fit = result.fitted_steps["gd"]
    step = fit.step[1 - fit.folds]  # each prompt scored with the other half's step
    np.testing.assert_allclose(step, lr, rtol=1e-6)
    for b in range(6):
        X, Xq = task.x_support[b].numpy(), task.x_query[b].numpy()
        np.testing.assert_allclose(result.layer_sensitivities[b], feature_gd_maps(X, Xq, LAM, lr, steps)[[0, 2, 3]], rtol=1e-10, atol=1e-13)
        A = X @ X.T + LAM * np.eye(4)
        M, expected = np.zeros((4, 4)), [np.zeros((2, 4))]
        for _ in range(4):
            M = M + step[b] * (np.eye(4) - A @ M)
            expected.append(Xq @ X.T @ M)
        np.testing.assert_allclose(result.step_sensitivities["gd"][b], np.stack(expected), rtol=1e-10, atol=1e-13)
    score = result.scores["gd"]
    layer_values, step_values = result.layer_sensitivities, result.step_sensitivities["gd"]
    for row in range(3):
        for t in range(5):
            sst = ((step_values[:, t] - step_values[:, t].mean()) ** 2).sum()
            if sst > 0:
                assert score.sensitivity_r2[row, t] == pytest.approx(1 - ((layer_values[:, row] - step_values[:, t]) ** 2).sum() / sst, rel=1e-9)
    assert score.aligned_steps.tolist() == [0, 2, 3]
    assert score.sensitivity_score == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- kappa strata


def test_diagnose_kappa_is_numpy_cond_and_strata_are_numpy_quantile_bins_even_with_more_bins_than_prompts():
    """kappa per prompt = np.linalg.cond(K + lam I) of the NumPy Gaussian kernel; with 2 bins the
    strata are np.quantile bins; with 5 bins on 3 prompts every prompt is its own stratum, with the
    bins' np.quantile edges and its own kappa as median."""
    model, task = small_model(), random_task(3, 5, 2, 2, seed=1)
    settings = dict(algorithms=("gd",), kernels=(), kernel="gaussian", lam=LAM, n_steps=4, bootstrap=0, progress=False, step_sizes="optimal")
    kappa = np.array([np.linalg.cond(gaussian(x, x) + LAM * np.eye(5)) for x in task.x_support.numpy()])
    for n_bins in (2, 5):
        result = probes.diagnose(model, task, n_kappa_bins=n_bins, **settings)["tasks"]
        np.testing.assert_allclose(result.kappa, kappa, rtol=1e-10)
        edges = np.quantile(kappa, np.linspace(0, 1, n_bins + 1))
        members = [np.flatnonzero((kappa >= lo) & ((kappa < hi) | ((i == n_bins - 1) & (kappa <= hi)))) for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
        expected = [(lo, hi, len(m), np.median(kappa[m])) for lo, hi, m in zip(edges, edges[1:], members) if len(m)]
        got = [(s.kappa_low, s.kappa_high, s.n_prompts, s.median_kappa) for s in result.scores["gd"].strata]
        assert [g[2] for g in got] == [e[2] for e in expected] and sum(g[2] for g in got) == 3
        np.testing.assert_allclose(np.array(got, dtype=float), np.array(expected, dtype=float), rtol=1e-12)
    assert len(got) == 3


def test_a_bad_n_kappa_bins_in_score_algorithms_is_named_as_passed():
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(4, 3, 2))
    with pytest.raises(ValueError, match="n_kappa_bins"):
        score_algorithms(steps[:, :2], {"a": steps}, steps[:, -1], bootstrap=0, kappa=[1.0, 2.0, 3.0, 4.0], n_kappa_bins=0)


# ---------------------------------------------------------------- sensitivities in score_algorithms


def test_scored_sensitivities_are_read_at_the_prediction_alignment_and_pool_queries_and_labels():
    """Layers copying steps 1, 3, 4: alignment [1, 3, 4], sensitivity path R2 1; against a
    perturbed copy the sensitivity path R2 is the NumPy pooled 1 - SSE / SST along that path."""
    step, sens, layer, layer_sens, krr = copied_steps_case()
    exact = score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens, step_sensitivities={"a": sens})["a"]
    assert exact.aligned_steps.tolist() == [1, 3, 4] and exact.sensitivity_score == pytest.approx(1.0, abs=1e-12)
    noisy = layer_sens + 0.3 * np.random.default_rng(1).normal(size=layer_sens.shape)
    score = score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=noisy, step_sensitivities={"a": sens})["a"]
    picked = sens[:, [1, 3, 4]]
    sst = sum(((picked[:, k] - picked[:, k].mean()) ** 2).sum() for k in range(3))
    assert score.sensitivity_score == pytest.approx(1 - ((noisy - picked) ** 2).sum() / sst, rel=1e-10)


def test_layer_sensitivities_for_other_layers_than_the_predictions_are_a_one_line_value_error():
    """label_sensitivities(model, task) (all L + 1 layers) scored against layer_predictions(...,
    layers=[1, 2, 3]): one line naming layer_sensitivity, not a NumPy broadcasting error."""
    step, sens, layer, _, krr = copied_steps_case()
    every_layer = sens[:, [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="layer_sensitivity"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=every_layer, step_sensitivities={"a": sens})


def test_step_sensitivities_of_another_trajectory_length_are_refused():
    """Sensitivities from a run with fewer steps (n_steps=2 vs 4) or more steps than the
    predictions are a mismatch: each should raise a ValueError naming step_sensitivities."""
    step, sens, layer, layer_sens, krr = copied_steps_case()
    for other in (sens[:, :3], np.concatenate([sens, sens[:, -1:]], axis=1)):
        with pytest.raises(ValueError, match="step_sensitivities"):
            score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens, step_sensitivities={"a": other})


def test_step_sensitivities_as_a_bare_array_is_a_one_line_value_error():
    """score_algorithm takes step_sensitivity (an array), score_algorithms step_sensitivities (a
    dict): passing the array to the latter should be named, with the fix."""
    step, sens, layer, layer_sens, krr = copied_steps_case()
    with pytest.raises(ValueError, match="step_sensitivities"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens, step_sensitivities=sens)


def test_score_algorithm_given_a_dict_of_step_sensitivities_names_the_one_array_it_takes():
    step, sens, layer, layer_sens, krr = copied_steps_case()
    with pytest.raises(ValueError, match="step_sensitivity must be one array"):
        score_algorithm("a", layer, step, krr, layers=[1, 2, 3], layer_sensitivity=layer_sens, step_sensitivity={"a": sens})


def test_passing_only_one_side_of_the_sensitivities_is_not_silently_ignored():
    step, sens, layer, layer_sens, krr = copied_steps_case()
    with pytest.raises(ValueError, match="sensitivit"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, step_sensitivities={"a": sens})
    with pytest.raises(ValueError, match="sensitivit"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens)


def test_rows_given_deepest_first_are_refused():
    """Layers 1, 2, 3 copying steps 1, 3, 4 score 1; the same rows given as layers [3, 2, 1] are
    refused as diagnose refuses them, not realigned in the order given."""
    step, _, layer, _, krr = copied_steps_case()
    assert score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0)["a"].score == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"layers must be in depth order.*\[3, 2, 1\]"):
        score_algorithms(layer[:, ::-1], {"a": step}, krr, layers=[3, 2, 1], bootstrap=0)


# ---------------------------------------------------------------- fitted ridge probes


def noisy_linear_task(batch: int, seed: int, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x_support = torch.randn(batch, 5, 2, generator=g, dtype=torch.float64)
    x_query = torch.randn(batch, m, 2, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(batch, m, generator=g, dtype=torch.float64)
    return ICLTask(x_support=x_support, y_support=x_support @ w, x_query=x_query, y_query=x_query @ w + noise)


@pytest.mark.parametrize("batch, val_fraction, seed", [(20, 0.25, 0), (7, 0.5, 3)])
def test_ridge_penalty_is_the_numpy_validation_argmin_on_a_prompt_split_and_layers_keep_their_order(batch, val_fraction, seed):
    """Split by prompt (the seeded permutation the docstring's `seed` names; round(B * val_fraction)
    validation prompts), penalties relative to the mean eigenvalue of the centred covariance, the
    validation argmin refitted on all prompts: lam, weight, bias and val_r2 equal a NumPy ridge path
    computed here; layers=(2, 0) keep that row order."""
    model, task, grid = small_model(), noisy_linear_task(batch, seed), np.logspace(-4, 1, 11)
    fitted = fit_layer_probes(model, task, layers=(2, 0), lam_grid=grid, val_fraction=val_fraction, seed=seed)
    assert fitted.layers == [2, 0]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = min(max(1, round(batch * val_fraction)), batch - 1)
    val, train = order[:n_val], order[n_val:]
    target = task.y_query.numpy()

    def mean_eigenvalue(x):
        return ((x - x.mean(0)) ** 2).sum() / x.size

    for row, layer in enumerate((2, 0)):
        x = query_features(model, task, layer)
        x_train, t_train = x[train].reshape(-1, 8), target[train].reshape(-1)
        x_val, t_val = x[val].reshape(-1, 8), target[val].reshape(-1)
        errors = []
        for relative in grid:
            w, b = numpy_ridge(x_train, t_train, relative * mean_eigenvalue(x_train))
            errors.append(((x_val @ w + b - t_val) ** 2).sum())
        best = int(np.argmin(errors))
        w_val, b_val = numpy_ridge(x_train, t_train, grid[best] * mean_eigenvalue(x_train))
        r2 = 1 - ((x_val @ w_val + b_val - t_val) ** 2).sum() / ((t_val - t_val.mean()) ** 2).sum()
        lam = grid[best] * mean_eigenvalue(x.reshape(-1, 8))
        w, b = numpy_ridge(x.reshape(-1, 8), target.reshape(-1), lam)
        assert float(fitted.lam[row]) == pytest.approx(lam, rel=1e-10)
        np.testing.assert_allclose(fitted.weight[row].numpy(), w, rtol=1e-7, atol=1e-9)
        assert float(fitted.fit.bias[row]) == pytest.approx(b, rel=1e-7, abs=1e-9)
        assert float(fitted.val_r2[row]) == pytest.approx(r2, rel=1e-8, abs=1e-10)


def test_probes_applied_to_a_shallower_model_name_the_missing_layer():
    """Probes fitted on layer 2 of a 2-block model, applied to a 1-block model of the same width
    (e.g. another checkpoint): one line saying layer 2 is out of range."""
    fitted = fit_layer_probes(small_model(n_layers=2), noisy_linear_task(8, 0), layers=[2])
    with pytest.raises(ValueError, match="out of range"):
        fitted.predict(small_model(n_layers=1), noisy_linear_task(4, 1))


def test_a_float32_copy_of_the_training_prompts_is_still_refused_on_a_float32_model():
    """A float32 model sees float32 inputs either way: probes fitted on a float64 task and applied
    to the same prompts cast to float32 predict on their own training prompts, which must raise."""
    model, task = small_model(dtype="float32"), noisy_linear_task(8, 0)
    fitted = fit_layer_probes(model, task)
    with pytest.raises(ValueError, match="shares"):
        fitted.predict(model, task.to(dtype=torch.float32))
