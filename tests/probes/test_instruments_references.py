"""The probe instruments against independent references: activations read from a full
`run_with_cache`, ridge regressions and splits enumerated in NumPy, condition numbers and
alignments recomputed by brute force, and the figures / summary checked against them."""

from __future__ import annotations

import itertools
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from brute_force import monotone_path, pooled_sums  # noqa: E402
from mi_krr.construct import gd_transformer  # noqa: E402
from mi_krr.models import ICLTransformer, ICLTransformerConfig  # noqa: E402
from mi_krr.tasks import ICLTask  # noqa: E402
from mi_krr.tasks.samplers import LinearRegressionSampler  # noqa: E402
from probes import attach, attention_kernels, fit_layer_probes, label_sensitivities, layer_predictions  # noqa: E402
from probes.diagnose import diagnose  # noqa: E402
from prompts import random_task  # noqa: E402

D, N, M = 3, 5, 4
W = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def make_model(d_model: int = 12, n_layers: int = 2, n_heads: int = 2, **overrides) -> ICLTransformer:
    settings = dict(n_dims=D, d_model=d_model, n_layers=n_layers, n_heads=n_heads, layout="concat", max_seq_len=32, dtype="float64")
    settings.update(overrides)
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(**settings)).eval()


def noisy_linear_task(batch: int, seed: int, m: int = M, noise: float = 0.3) -> ICLTask:
    """y = x . w + noise, one fixed w for every prompt."""
    g = torch.Generator().manual_seed(seed)
    x_support = torch.randn(batch, N, D, generator=g, dtype=torch.float64)
    x_query = torch.randn(batch, m, D, generator=g, dtype=torch.float64)
    return ICLTask(
        x_support=x_support,
        y_support=x_support @ W + noise * torch.randn(batch, N, generator=g, dtype=torch.float64),
        x_query=x_query,
        y_query=x_query @ W + noise * torch.randn(batch, m, generator=g, dtype=torch.float64),
    )


def cached_query_features(model: ICLTransformer, task: ICLTask, layer: int) -> np.ndarray:
    """[batch, m, d_model]: residual index `layer` (0 = embeddings) at the concat query positions n..n+m-1."""
    _, cache = model.run_with_cache(model.encode(task).tokens)
    name = "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
    return cache[name][:, N : N + task.n_query].detach().numpy()


def numpy_ridge(x: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """argmin mean (x w + b - t)^2 + lam |w|^2, intercept unpenalised (normal equations)."""
    x_mean, t_mean = x.mean(0), t.mean()
    xc = x - x_mean
    w = np.linalg.solve(xc.T @ xc / len(x) + lam * np.eye(x.shape[1]), xc.T @ (t - t_mean) / len(x))
    return w, t_mean - x_mean @ w


def mean_eigenvalue(x: np.ndarray) -> float:
    """Mean eigenvalue of the centred feature covariance of rows x."""
    xc = x - x.mean(0)
    return float(np.linalg.eigvalsh(xc.T @ xc / len(x)).mean())


def numpy_r2(pred: np.ndarray, target: np.ndarray) -> float:
    return float(1.0 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def split_choices(features: np.ndarray, target: np.ndarray, n_val: int, grid: np.ndarray) -> list[tuple[int, float]]:
    """For every choice of n_val validation prompts: (grid index of the best validation R^2, that R^2),
    the probe fitted on the other prompts with penalty grid * mean eigenvalue of its training features."""
    batch, d = features.shape[0], features.shape[-1]
    choices = []
    for val in itertools.combinations(range(batch), n_val):
        fit = [b for b in range(batch) if b not in val]
        x_fit, t_fit = features[fit].reshape(-1, d), target[fit].reshape(-1)
        x_val, t_val = features[list(val)].reshape(-1, d), target[list(val)].reshape(-1)
        scores = []
        for relative in grid:
            w, b = numpy_ridge(x_fit, t_fit, relative * mean_eigenvalue(x_fit))
            scores.append(numpy_r2(x_val @ w + b, t_val))
        choices.append((int(np.argmax(scores)), max(scores)))
    return choices


# --- streaming / attach / attention kernels -------------------------------------------------------


def test_negative_layer_index_is_rejected_not_wrapped_to_the_last_layer():
    """Residual indices live in [0, L]: -1 raises instead of silently reading index L."""
    model, task = make_model(), random_task(2, N, M, D)
    with pytest.raises(ValueError, match="layers entry"):
        layer_predictions(model, task, layers=[-1])
    with pytest.raises(ValueError, match="layers entry"):
        label_sensitivities(model, task, layers=[0, -1])


def test_concat_attention_blocks_equal_cached_pattern_and_keep_their_own_storage(retained_reductions):
    """Concat layout (consecutive rows and keys, where a slice is a view): the retained_reductions blocks equal
    run_with_cache's hook_pattern and own their storage, never a view of the [batch, head, seq, seq] pattern."""
    model, task = make_model(n_heads=3, d_head=4), random_task(2, N, M, D)
    kernels = attention_kernels(model, task)
    _, cache = model.run_with_cache(model.encode(task).tokens)
    assert len(retained_reductions) == 2
    for layer, blocks in enumerate(retained_reductions):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].detach()
        torch.testing.assert_close(blocks["support"], pattern[:, :, :N, :N], rtol=1e-12, atol=0)
        torch.testing.assert_close(blocks["query"], pattern[:, :, N : N + M, :N], rtol=1e-12, atol=0)
        for value in (blocks["support"], blocks["query"]):
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
    torch.testing.assert_close(kernels.query[:, 1], pattern[:, :, N : N + M, :N], rtol=1e-12, atol=0)


def test_attention_kernels_report_the_models_layer_and_head_counts():
    """AttentionKernels.n_layers / n_heads equal the model config's (L=2, H=3, so swapping axes shows)."""
    kernels = attention_kernels(make_model(n_layers=2, n_heads=3, d_head=4), random_task(2, N, M, D))
    assert (kernels.n_layers, kernels.n_heads) == (2, 3)


def test_attached_attention_kernels_honour_source_scores():
    """probed.attention_kernels(task, 'scores') equals run_with_cache's hook_attn_scores (not hook_pattern)."""
    model, task = make_model(n_heads=3, d_head=4), random_task(2, N, M, D)
    kernels = attach(model).attention_kernels(task, source="scores")
    _, cache = model.run_with_cache(model.encode(task).tokens)
    for layer in range(2):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"].detach()
        torch.testing.assert_close(kernels.support[:, layer], scores[:, :, :N, :N], rtol=1e-12, atol=0)
        torch.testing.assert_close(kernels.query[:, layer], scores[:, :, N : N + M, :N], rtol=1e-12, atol=0)
    assert kernels.source == "scores" and (kernels.query < 0).any()  # scores, not softmax weights


# --- fitted ridge probes ----------------------------------------------------------------------------


def test_attached_ridge_layer_predictions_equal_numpy_ridge_fitted_on_all_training_prompts():
    """probed.layer_predictions(method='ridge') with a one-value grid equals the NumPy normal-equation ridge
    on every training prompt's cached features at penalty grid * mean eigenvalue of those features."""
    model, train, test = make_model(), noisy_linear_task(12, seed=0), noisy_linear_task(3, seed=1)
    relative = 0.05
    pred = attach(model).layer_predictions(test, method="ridge", train_task=train, layers=[2], lam_grid=[relative])
    x = cached_query_features(model, train, 2).reshape(-1, 12)
    w, b = numpy_ridge(x, train.y_query.numpy().reshape(-1), relative * mean_eigenvalue(x))
    expected = cached_query_features(model, test, 2) @ w + b
    assert pred.shape == (3, 1, M)
    np.testing.assert_allclose(pred[:, 0].numpy(), expected, rtol=1e-8, atol=1e-10)


def test_chosen_penalty_and_val_r2_are_those_of_a_held_out_validation_split():
    """Per layer, (lam, val_r2) equal a NumPy grid search on some split of 2 of 6 prompts held out
    (lam = best grid value * mean eigenvalue of all training features; R^2 on the held-out prompts)."""
    model, train = make_model(), noisy_linear_task(6, seed=0)
    grid = np.logspace(-6, 2, 9)
    fitted = fit_layer_probes(model, train, layers=[0, 2], val_fraction=1 / 3, lam_grid=grid, seed=0)
    target = train.y_query.numpy()
    for index, layer in enumerate([0, 2]):
        features = cached_query_features(model, train, layer)
        scale = mean_eigenvalue(features.reshape(-1, features.shape[-1]))
        lam, val_r2 = float(fitted.lam[index]), float(fitted.val_r2[index])
        matches = [
            (best, score) for best, score in split_choices(features, target, 2, grid)
            if np.isclose(lam, grid[best] * scale, rtol=1e-9, atol=0) and np.isclose(val_r2, score, rtol=1e-8, atol=1e-10)
        ]
        assert matches, f"layer {layer}: (lam={lam}, val_r2={val_r2}) is no split's validation grid search"


def test_layer_predictions_ridge_forwards_val_fraction_and_seed():
    """val_fraction reaches the fit (1.5 raises), and seed picks the split: each seed's predictions are the
    NumPy refit at a penalty that is best on some 2-of-6 validation split, and not every seed picks the same one."""
    model, train, test = make_model(), noisy_linear_task(6, seed=0), noisy_linear_task(4, seed=1)
    grid = np.logspace(-6, 2, 9)
    with pytest.raises(ValueError, match="val_fraction"):
        layer_predictions(model, test, method="ridge", train_task=train, layers=[2], val_fraction=1.5)
    features, target = cached_query_features(model, train, 2), train.y_query.numpy()
    x_all = features.reshape(-1, features.shape[-1])
    refits = [numpy_ridge(x_all, target.reshape(-1), relative * mean_eigenvalue(x_all)) for relative in grid]
    test_features = cached_query_features(model, test, 2)
    possible = {best for best, _ in split_choices(features, target, 2, grid)}
    picked = []
    for seed in range(4):
        pred = layer_predictions(model, test, method="ridge", train_task=train, layers=[2], val_fraction=1 / 3, lam_grid=grid, seed=seed)
        hits = [k for k, (w, b) in enumerate(refits) if np.allclose(pred[:, 0].numpy(), test_features @ w + b, rtol=1e-8, atol=1e-10)]
        assert len(hits) == 1 and hits[0] in possible
        picked.append(hits[0])
    assert len(set(picked)) > 1


def test_shuffled_control_is_fitted_on_whole_prompts_of_targets_moved_to_other_prompts():
    """With more features than training rows and a tiny penalty both probes interpolate, so applying them to
    the cached training features recovers their targets: the real probe's are y_query, the control's are
    y_query's prompt rows (each intact) in a non-identity order."""
    model, train = make_model(d_model=16), noisy_linear_task(6, seed=0, m=2)
    fitted = fit_layer_probes(model, train, layers=[2], lam_grid=[1e-10], seed=0)
    features = cached_query_features(model, train, 2)
    target = train.y_query.numpy()
    real = features @ fitted.fit.weight[0].numpy() + float(fitted.fit.bias[0])
    np.testing.assert_allclose(real, target, rtol=0, atol=1e-5)
    control = features @ fitted.control.weight[0].numpy() + float(fitted.control.bias[0])
    source = [[b for b in range(6) if np.allclose(control[row], target[b], rtol=0, atol=1e-5)] for row in range(6)]
    assert all(len(found) == 1 for found in source), "a control row is not one prompt's targets in order"
    order = [found[0] for found in source]
    assert sorted(order) == list(range(6)) and order != list(range(6))


# --- summary and figures of a diagnosis -------------------------------------------------------------

LAM = 0.1


@pytest.fixture(scope="module")
def overshooting_gd():
    """A GD transformer whose learning rate is 3x the stable one, scored against per-prompt optimal gd and
    cg: alignments that differ from the layer index and from the per-layer argmin, finite R2 below 1."""
    task = LinearRegressionSampler(dim=3, condition_number=10.0, noise_std=0.1).sample(12, 8, 2, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = 3.0 / float(torch.linalg.eigvalsh(K)[:, -1].max() + LAM)
    model = gd_transformer(n_steps=4, lr=lr, lam=LAM, dim=3)
    diagnosis = diagnose(model, task, algorithms=("gd", "cg"), lam=LAM, n_steps=6, kernels=(), sensitivities=True, bootstrap=20,
                         progress=False, step_sizes="optimal")
    return task, diagnosis


def reference_alignment(result, algorithm: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(monotone alignment by enumeration of the MSE matrix, pooled SSE [L', T+1], SST [T+1]) from the stored predictions."""
    layers, steps = result.layer_predictions, result.step_predictions[algorithm]
    sse, sst, count = pooled_sums(layers, steps)
    return np.array(monotone_path(sse / count)), sse, sst


def test_summary_kappa_median_is_the_median_condition_number_of_k_plus_lam_i(overshooting_gd):
    """The header's kappa median / range equal NumPy's condition numbers of x x^T + lam I (linear kernel)."""
    task, diagnosis = overshooting_gd
    result = diagnosis["tasks"]
    assert result.kernel == "linear"
    x = task.x_support.double().numpy()
    eig = np.linalg.eigvalsh(x @ x.transpose(0, 2, 1) + LAM * np.eye(x.shape[1]))
    kappa = eig[:, -1] / eig[:, 0]
    printed = re.search(r"kappa median (\S+) \[(\S+), (\S+)\]", diagnosis.summary()).groups()
    np.testing.assert_allclose([float(v) for v in printed], [np.median(kappa), kappa.min(), kappa.max()], rtol=5e-3)
    assert abs(np.median(kappa) - kappa.mean()) > 0.01 * kappa.mean()  # median and mean are told apart


def test_summary_r2_line_is_the_pooled_r2_of_each_layer_at_its_monotone_step(overshooting_gd):
    """The summary's R2 row equals 1 - SSE/SST pooled over prompts and queries (brute force) at the
    enumerated monotone alignment of the best algorithm ('-' where the step has no variance)."""
    _, diagnosis = overshooting_gd
    result = diagnosis["tasks"]
    aligned, sse, sst = reference_alignment(result, result.verdict.best)
    rows = np.arange(len(aligned))
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(sst[aligned] > 0, 1.0 - sse[rows, aligned] / sst[aligned], np.nan)
    line = next(line for line in diagnosis.summary().splitlines() if line.startswith("  R2    "))
    printed = line.split()[1:]
    assert len(printed) == len(expected) and np.isfinite(expected).sum() >= 2
    for text, value in zip(printed, expected):
        if np.isfinite(value):
            assert float(text) == pytest.approx(value, abs=6e-5)
        else:
            assert text == "-"


def test_summary_columns_carry_the_weighted_and_sensitivity_scores(overshooting_gd):
    """Each algorithm row prints kappa-weighted R2, log-error distance and sensitivity R2 in their own columns
    (the stored values differ here, so a swap shows)."""
    _, diagnosis = overshooting_gd
    result = diagnosis["tasks"]
    header = next(line for line in diagnosis.summary().splitlines() if line.startswith("algorithm"))
    assert header.split()[-7:] == ["interval", "kappa-wtd", "R2", "log-err", "dist", "sens", "R2"]
    for line in diagnosis.summary().splitlines():
        fields = line.split()
        if fields and fields[0] in result.scores:
            score = result.scores[fields[0]]
            assert abs(score.weighted_r2 - score.sensitivity_score) > 1e-3
            np.testing.assert_allclose([float(v) for v in fields[-3:]],
                                       [score.weighted_r2, score.profile_distance, score.sensitivity_score], atol=6e-4)


def test_sensitivity_figure_shows_each_layer_above_its_aligned_step(overshooting_gd):
    """Column by column: the top image is the titled layer's stored d yhat / d y of prompt 0, the bottom one the
    best algorithm's at the step the enumerated monotone alignment gives that layer (titled so)."""
    _, diagnosis = overshooting_gd
    result = diagnosis["tasks"]
    best = result.verdict.best
    aligned, _, _ = reference_alignment(result, best)
    figure = diagnosis.plot()["sensitivities"]
    n_cols = len(figure.axes) // 2
    top, bottom = figure.axes[:n_cols], figure.axes[n_cols:]
    moved = 0
    for upper, lower in zip(top, bottom):
        layer = int(re.fullmatch(r"layer (\d+)", upper.get_title()).group(1))
        row = list(result.scores[best].layers).index(layer)
        step = int(re.fullmatch(rf"{best} step (\d+)", lower.get_title()).group(1))
        assert step == aligned[row]
        moved += step != row
        np.testing.assert_array_equal(np.asarray(upper.images[0].get_array()), result.layer_sensitivities[0][row])
        np.testing.assert_array_equal(np.asarray(lower.images[0].get_array()), result.step_sensitivities[best][0][step])
    assert moved > 0  # some layer sits at a step other than its own index
    plt.close("all")


def test_error_profile_and_step_map_draw_the_monotone_alignments(overshooting_gd):
    """Error profiles: the model's points sit at the best algorithm's enumerated monotone alignment with height
    log10 MSE(layer, KRR) from NumPy; step map, right panel: every algorithm's line is its own alignment."""
    _, diagnosis = overshooting_gd
    result = diagnosis["tasks"]
    figures = diagnosis.plot()
    best = result.verdict.best
    aligned, sse, _ = reference_alignment(result, best)
    assert not np.array_equal(aligned, np.argmin(sse, axis=1))  # alignment and argmin differ here
    model_line = next(line for line in figures["error_profiles"].axes[0].get_lines() if line.get_label().startswith("model layers at"))
    np.testing.assert_array_equal(model_line.get_xdata(), aligned)
    mse = ((result.layer_predictions - result.krr_predictions[:, None]) ** 2).mean(axis=(0, 2))
    np.testing.assert_allclose(model_line.get_ydata(), np.log10(mse), rtol=1e-10)
    right = figures["step_map"].axes[1]
    drawn = {line.get_label().split(" (")[0]: line for line in right.get_lines()}
    assert set(drawn) == set(result.scores)
    for name in result.scores:
        np.testing.assert_array_equal(drawn[name].get_ydata(), reference_alignment(result, name)[0])
    plt.close("all")
