"""`diagnose`'s orchestration and its result object's views (dataframe, JSON, summary, report)
checked against independent NumPy references: kernels, ridge, condition numbers, GD / CG
trajectories and their label derivatives, pooled R2 and brute-force path R2."""

import dataclasses
import functools
import json
import math
import re
import types

import numpy as np
import pytest
import torch

from brute_force import best_head_choices, monotone_path, path_r2, pooled_sums

from mi_krr.construct import cg_transformer, gd_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS, richardson
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from probes.diagnose import diagnose
from probes.diagnosis import Diagnosis, strict_json
from probes.report import _file_stems

TEMPERATURE, NOISE, SEED, N_STEPS = 2.0, 0.2, 3, 4
ROWS, SCORED = range(9), np.arange(1, 9)  # the CG transformer's residual indices; layer 0 is never scored


def small_model(seed=0):
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2))


@pytest.fixture(scope="module")
def exp_case():
    """The constructed CG transformer (exp kernel by random features, 4 layers per step: 9 rows) on
    exp-kernel GP prompts; the temperature and noise are the sampler's, read from task.info."""
    model = cg_transformer(n_steps=2, lam=NOISE**2, kernel="exp", dim=3, temperature=TEMPERATURE, head_width=128)
    task = GPRegressionSampler(dim=3, kernel="exp", temperature=TEMPERATURE, noise_std=NOISE).sample(8, 6, 3, seed=1)
    diagnosis = diagnose(model, task, algorithms=("gd", "cg", "heavy_ball"), n_steps=N_STEPS, kernels=(), sensitivities=True,
                         bootstrap=20, seed=SEED, n_kappa_bins=2, progress=False)
    return task, diagnosis


def numpy_system(task, b):
    x, xq, y = (t[b].double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    K, Kq = np.exp(x @ x.T / TEMPERATURE), np.exp(xq @ x.T / TEMPERATURE)
    return K, Kq, y


def numpy_cg_preds(K, Kq, y, lam, n_steps):
    A = K + lam * np.eye(len(y))
    alpha, r = np.zeros_like(y), y.copy()
    p, preds = r.copy(), [Kq @ alpha]
    for _ in range(n_steps):
        Ap = A @ p
        a = (r @ r) / (p @ Ap)
        alpha, r_new = alpha + a * p, r - a * Ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
        preds.append(Kq @ alpha)
    return np.stack(preds)


def numpy_gd_preds(K, Kq, y, lam, step, n_steps):
    A, alpha, preds = K + lam * np.eye(len(y)), np.zeros_like(y), [np.zeros(Kq.shape[0])]
    for _ in range(n_steps):
        alpha = alpha + step * (y - A @ alpha)
        preds.append(Kq @ alpha)
    return np.stack(preds)


def summary_lines(result):
    return Diagnosis(task_sets={result.name: result}, settings={}).summary().splitlines()


def test_krr_system_takes_the_exp_temperature_and_noise_variance_from_the_sampler_and_json_carries_them(exp_case):
    task, diagnosis = exp_case
    result = diagnosis["tasks"]
    assert result.kernel == "exp" and result.kernel_params == {"temperature": TEMPERATURE}
    assert result.lam == pytest.approx(NOISE**2, rel=1e-12)
    for b in range(task.batch_size):
        K, Kq, y = numpy_system(task, b)
        expected = Kq @ np.linalg.solve(K + NOISE**2 * np.eye(6), y)
        np.testing.assert_allclose(result.krr_predictions[b], expected, rtol=1e-8, atol=1e-10)
    stored = json.loads(diagnosis.to_json())["task_sets"]["tasks"]
    assert stored["lam"] == pytest.approx(NOISE**2, rel=1e-12) and stored["kernel_params"] == {"temperature": TEMPERATURE}
    assert stored["n_prompts"] == 8 and stored["kernel"] == "exp"
    assert (stored["n_support"], stored["n_query"]) == (task.n_support, task.n_query) == (6, 3)


def test_json_writes_numpy_scalars_in_task_info_and_settings_as_plain_numbers(exp_case):
    _, diagnosis = exp_case
    result = dataclasses.replace(diagnosis["tasks"], info={"n": np.int64(3), "flag": np.bool_(True), "x": np.float32(0.5)})
    data = json.loads(Diagnosis(task_sets={"tasks": result}, settings={"seed": np.int64(2)}).to_json())
    assert data["task_sets"]["tasks"]["info"] == {"n": 3, "flag": True, "x": 0.5} and data["settings"] == {"seed": 2}


def test_summary_header_counts_prompts_queries_support_and_quotes_kappa_median_and_range(exp_case):
    task, diagnosis = exp_case
    header = summary_lines(diagnosis["tasks"])[0]
    assert header.startswith("== tasks: 8 prompts, 3 queries, 6 support points; KRR exp(temperature=2), lam=0.04, 4 solver steps;")
    kappa = [np.linalg.cond(numpy_system(task, b)[0] + NOISE**2 * np.eye(6)) for b in range(8)]
    median, low, high = map(float, re.search(r"kappa median (\S+) \[(\S+), (\S+)\]", header).groups())
    np.testing.assert_allclose([median, low, high], [np.median(kappa), np.min(kappa), np.max(kappa)], rtol=5e-3)
    without_sensitivities = dataclasses.replace(diagnosis["tasks"], layer_sensitivities=None, step_sensitivities=None)
    assert summary_lines(without_sensitivities)[0].startswith("== tasks: 8 prompts, 3 queries, 6 support points;")


def test_dataframe_score_is_brute_force_path_r2_and_sensitivity_r2_is_pooled_r2_of_the_stored_sensitivities(exp_case):
    _, diagnosis = exp_case
    result, frame = diagnosis["tasks"], diagnosis.to_dataframe()
    for algorithm, steps in result.step_predictions.items():
        rows = frame[frame.algorithm == algorithm]
        expected = path_r2(result.layer_predictions, steps[None], SCORED)[0]  # layer 0 aligned, not scored
        np.testing.assert_allclose(rows.score.to_numpy(), expected, rtol=1e-9)
        sse, sst, _ = pooled_sums(result.layer_sensitivities, result.step_sensitivities[algorithm])
        for layer, step in [(4, 1), (6, 3), (8, 2)]:
            row = rows[(rows.layer == layer) & (rows.step == step)]
            assert row.sensitivity_r2.item() == pytest.approx(1 - sse[layer, step] / sst[step], rel=1e-9)


def test_fitted_gd_step_sensitivities_are_the_closed_form_linear_map_at_the_other_halfs_step(exp_case):
    # d pred_t / d y = Kq sum_{s<t} (I - w A)^s w, w the step fitted on the half the prompt is not in
    task, diagnosis = exp_case
    result = diagnosis["tasks"]
    fit = result.fitted_steps["gd"]
    for b in range(task.batch_size):
        K, Kq, _ = numpy_system(task, b)
        w = fit.step[1 - fit.folds[b]]
        M = np.eye(6) - w * (K + NOISE**2 * np.eye(6))
        expected = [Kq @ sum(np.linalg.matrix_power(M, s) * w for s in range(t)) if t else np.zeros((3, 6)) for t in range(N_STEPS + 1)]
        np.testing.assert_allclose(result.step_sensitivities["gd"][b], np.stack(expected), rtol=1e-9, atol=1e-12)


def test_cg_step_sensitivities_are_finite_differences_of_numpy_cg_at_the_prompt_labels(exp_case):
    task, diagnosis = exp_case
    result, h = diagnosis["tasks"], 1e-5  # CG's divisions amplify rounding below h ~ 1e-6
    for b in range(3):
        K, Kq, y = numpy_system(task, b)
        columns = []
        for i in range(6):
            e = np.eye(6)[i] * h
            columns.append((numpy_cg_preds(K, Kq, y + e, NOISE**2, N_STEPS) - numpy_cg_preds(K, Kq, y - e, NOISE**2, N_STEPS)) / (2 * h))
        expected = np.stack(columns, axis=-1)
        np.testing.assert_allclose(result.step_sensitivities["cg"][b], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_cross_fit_halves_follow_the_seed_and_each_halfs_fit_score_is_its_brute_force_path_r2(exp_case):
    task, diagnosis = exp_case
    result = diagnosis["tasks"]
    expected_folds = np.zeros(8, dtype=int)
    expected_folds[np.random.default_rng(SEED).permutation(8)[4:]] = 1  # the documented seeded split
    for fit in result.fitted_steps.values():
        np.testing.assert_array_equal(fit.folds, expected_folds)
    fit = result.fitted_steps["gd"]
    for fold in (0, 1):
        members = np.flatnonzero(fit.folds == fold)
        steps = np.stack([numpy_gd_preds(*numpy_system(task, b), NOISE**2, fit.step[fold], N_STEPS) for b in members])
        expected = path_r2(result.layer_predictions[members], steps[None], SCORED)[0]
        assert fit.fit_score[fold] == pytest.approx(expected, rel=1e-9)


def test_layer_0_never_enters_a_halfs_fit_score_where_the_embedding_read_out_is_not_zero():
    task = GPRegressionSampler(dim=3).sample(8, 6, 3, seed=1)  # Gaussian kernel, bandwidth 1, lam = 0.1^2
    result = diagnose(small_model(), task, algorithms=("gd",), n_steps=N_STEPS, kernels=(), bootstrap=0, progress=False)["tasks"]
    assert np.abs(result.layer_predictions[:, 0]).min() > 0
    fit = result.fitted_steps["gd"]
    for fold in (0, 1):
        members = np.flatnonzero(fit.folds == fold)
        steps = []
        for b in members:
            x, xq, y = (t[b].double().numpy() for t in (task.x_support, task.x_query, task.y_support))
            K, Kq = (np.exp(-((u[:, None] - x[None]) ** 2).sum(-1) / 2) for u in (x, xq))
            steps.append(numpy_gd_preds(K, Kq, y, 0.01, fit.step[fold], N_STEPS))
        expected = path_r2(result.layer_predictions[members], np.array(steps)[None], np.arange(1, 3))[0]
        assert fit.fit_score[fold] == pytest.approx(expected, rel=1e-9)


def test_json_strata_hold_the_brute_force_path_r2_of_each_kappa_bins_prompts(exp_case):
    task, diagnosis = exp_case
    result = diagnosis["tasks"]
    stored = json.loads(diagnosis.to_json())["task_sets"]["tasks"]["scores"]
    kappa = np.array([np.linalg.cond(numpy_system(task, b)[0] + NOISE**2 * np.eye(6)) for b in range(8)])
    for algorithm, steps in result.step_predictions.items():
        strata = stored[algorithm]["strata"]
        assert len(strata) == 2 and sum(s["n_prompts"] for s in strata) == 8
        cost = np.array([[np.sum((result.layer_predictions[:, l] - steps[:, t]) ** 2) for t in range(N_STEPS + 1)] for l in ROWS])
        alignment = np.array(monotone_path(cost))  # the all-prompt alignment, brute force
        for stratum in strata:
            members = np.flatnonzero((kappa >= stratum["kappa_low"] * (1 - 1e-9)) & (kappa <= stratum["kappa_high"] * (1 + 1e-9)))
            assert len(members) == stratum["n_prompts"]
            layers, own = result.layer_predictions[members], steps[members]
            sse = sum(np.sum((layers[:, l] - own[:, alignment[l]]) ** 2) for l in SCORED)
            sst = sum(np.sum((own[:, alignment[l]] - own[:, alignment[l]].mean()) ** 2) for l in SCORED)
            assert stratum["score"] == pytest.approx(1 - sse / sst, rel=1e-9)


def test_summary_rows_print_aligned_r2_profile_distance_and_sensitivity_score_of_the_references(exp_case):
    _, diagnosis = exp_case
    result = diagnosis["tasks"]
    lines = summary_lines(result)
    model_profile = np.log10(((result.layer_predictions - result.krr_predictions[:, None]) ** 2).mean(axis=(0, 2)))
    for algorithm, steps in result.step_predictions.items():
        row = next(line.split() for line in lines if line.split()[:1] == [algorithm])
        cost = np.array([[np.sum((result.layer_predictions[:, l] - steps[:, t]) ** 2) for t in range(N_STEPS + 1)] for l in ROWS])
        alignment = list(monotone_path(cost))
        step_profile = np.log10(((steps - result.krr_predictions[:, None]) ** 2).mean(axis=(0, 2)))
        distance = np.sqrt(np.mean((model_profile - step_profile[alignment])[SCORED] ** 2))  # the scored rows, as the path R2
        sse, sst, _ = pooled_sums(result.layer_sensitivities, result.step_sensitivities[algorithm])
        sensitivity_score = 1 - sum(sse[l, alignment[l]] for l in SCORED) / sum(sst[alignment[l]] for l in SCORED)
        score = result.scores[algorithm]
        assert float(row[4]) == pytest.approx(score.weighted_r2, abs=5e-5) and score.weighted_r2 != pytest.approx(score.score, abs=1e-3)
        assert float(row[5]) == pytest.approx(distance, abs=5e-4)
        assert float(row[6]) == pytest.approx(sensitivity_score, abs=5e-5)
    best = result.step_predictions[result.verdict.best]
    cost = np.array([[np.sum((result.layer_predictions[:, l] - best[:, t]) ** 2) for t in range(N_STEPS + 1)] for l in ROWS])
    alignment = monotone_path(cost)
    sse, sst, _ = pooled_sums(result.layer_predictions, best)
    r2_line = next(line for line in lines if line.startswith("  R2    "))
    printed = [float(value) if value != "-" else np.nan for value in r2_line.split()[1:]]
    expected = [1 - sse[l, t] / sst[t] if sst[t] > 0 else np.nan for l, t in enumerate(alignment)]
    np.testing.assert_allclose(printed, expected, atol=5e-5, equal_nan=True)


def test_summary_prints_each_halfs_fitted_step_and_momentum_in_fold_order(exp_case):
    _, diagnosis = exp_case
    result = diagnosis["tasks"]
    lines = summary_lines(result)
    fit = result.fitted_steps["heavy_ball"]
    assert abs(fit.step[0] - fit.step[1]) > 1e-3 * fit.step[0] and abs(fit.momentum[0] - fit.momentum[1]) > 1e-2  # halves differ
    line = next(line for line in lines if line.startswith("heavy_ball: one global step"))
    step_0, step_1, momentum_0, momentum_1 = map(float, re.search(r"layers, (\S+) / (\S+), momentum (\S+) / (\S+) ", line).groups())
    np.testing.assert_allclose([step_0, step_1], fit.step, rtol=1e-5)
    np.testing.assert_allclose([momentum_0, momentum_1], fit.momentum, rtol=5e-3)


def test_ridge_probes_on_linear_regression_skip_sensitivities_and_the_summary_lists_every_note():
    model = small_model()
    sampler = LinearRegressionSampler(dim=3, noise_std=0.5)
    task, train = sampler.sample(8, 6, 2, seed=0), sampler.sample(16, 6, 2, seed=1)
    result = diagnose(model, task, algorithms=("richardson_rowsum", "cg"), method="ridge", train_task=train, n_steps=3, kernels=(),
                      sensitivities=True, bootstrap=0, progress=False)["tasks"]
    assert result.kernel == "linear" and result.lam == pytest.approx(0.5**2 * 3, rel=1e-12)
    assert result.layer_sensitivities is None and result.step_sensitivities is None
    assert list(result.scores) == ["cg"]
    assert [note.split()[:2] for note in result.notes] == [["richardson_rowsum", "left"], ["label", "sensitivities"]]
    printed = [line[len("note: "):] for line in summary_lines(result) if line.startswith("note: ")]
    assert printed == result.notes


@pytest.fixture(scope="module")
def gd_case():
    """The GD transformer at one learning rate stable on every prompt, and its prompts."""
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.1).sample(24, 12, 4, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + 0.1))
    return gd_transformer(n_steps=3, lr=lr, lam=0.1, dim=4), task, lr


def test_verdict_records_the_thresholds_passed_and_accepts_a_min_score_of_exactly_1(gd_case):
    model, task, _ = gd_case
    result = diagnose(model, task, algorithms=("gd", "cg"), lam=0.1, n_steps=6, kernels=(), bootstrap=100, min_score=1.0, min_gap=0.25,
                      agreement_threshold=0.5, progress=False)["tasks"]
    verdict = result.verdict
    assert (verdict.min_score, verdict.min_gap, verdict.agreement_threshold) == (1.0, 0.25, 0.5)


def test_repr_names_the_identified_algorithm_and_says_not_identified_without_resamples(gd_case):
    # the documented rule: no verdict from fewer than 100 bootstrap resamples
    model, task, _ = gd_case
    common = dict(algorithms=("gd", "cg"), lam=0.1, n_steps=6, kernels=(), progress=False)
    assert repr(diagnose(model, task, bootstrap=100, **common)) == "Diagnosis(tasks: best gd (path R2 1.000), identified)"
    assert repr(diagnose(model, task, bootstrap=0, **common)) == "Diagnosis(tasks: best gd (path R2 1.000), not identified)"


def test_a_trajectory_without_variance_scores_minus_infinity_and_ranks_last_in_the_summary(gd_case):
    # a candidate predicting 0 at every step: SST = 0 and SSE > 0 at every step, so its path R2 is -inf
    def zeros(K, y, lam, n_steps, K_query=None):
        return types.SimpleNamespace(pred=torch.zeros(*K_query.shape[:-2], n_steps + 1, K_query.shape[-2], dtype=torch.float64))

    model, task, _ = gd_case
    result = diagnose(model, task, algorithms={"zeros": zeros, "gd": ALGORITHMS["gd"]}, lam=0.1, n_steps=3, kernels=(), bootstrap=0,
                      progress=False)["tasks"]
    assert result.scores["zeros"].score == -np.inf and np.isfinite(result.scores["gd"].score)
    names = [line.split()[0] for line in summary_lines(result) if line.split()[:1] in (["zeros"], ["gd"])]
    assert names == ["gd", "zeros"]


def test_a_custom_solver_under_a_registry_name_runs_as_given_and_is_not_fitted(gd_case):
    model, task, _ = gd_case
    result = diagnose(model, task, algorithms={"gd": functools.partial(richardson, step=0.05)}, lam=0.1, n_steps=3, kernels=(),
                      bootstrap=0, progress=False)["tasks"]
    assert result.fitted_steps == {}
    for b in range(3):
        x, xq, y = (t[b].double().numpy() for t in (task.x_support, task.x_query, task.y_support))
        expected = numpy_gd_preds(x @ x.T, xq @ x.T, y, 0.1, 0.05, 3)
        np.testing.assert_allclose(result.step_predictions["gd"][b], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 0.0}, r"lam must be .*> 0"),
        ({"lam": -0.1}, r"lam must be .*> 0"),  # positive, not merely >= 0
        ({"bootstrap": -1}, "bootstrap must be an integer >= 0"),
        ({"agreement_threshold": 1.5}, "agreement_threshold must be <= 1"),
        ({"kernel_params": {"bandwidth": -1.0}}, r"kernel_params\['bandwidth'\]"),
    ],
)
def test_out_of_range_settings_raise_value_errors_naming_the_setting(kwargs, message):
    task = GPRegressionSampler(dim=3).sample(2, 4, 1, seed=0)
    with pytest.raises(ValueError, match=message):
        diagnose(small_model(), task, algorithms="cg", kernels=(), progress=False, **kwargs)


def test_strict_json_replaces_every_non_finite_float_by_null_and_keeps_the_rest():
    data = {"a": [math.inf, -math.inf, math.nan, 1.5, 2], "b": ({"c": -math.inf},), "d": "inf"}
    assert strict_json(data) == {"a": [None, None, None, 1.5, 2], "b": [{"c": None}], "d": "inf"}
    json.dumps(strict_json(data), allow_nan=False)


def test_report_keeps_hyphens_in_file_names_and_writes_the_settings(tmp_path):
    assert _file_stems(["in-dist", "in_dist", "in dist"]) == {"in-dist": "in-dist", "in_dist": "in_dist", "in dist": "in_dist_2"}
    task = GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0)
    diagnosis = diagnose(small_model(), {"in-dist": task}, algorithms="cg", n_steps=2, kernels=(), bootstrap=0, seed=7, progress=False)
    index = diagnosis.save(tmp_path)
    assert (tmp_path / "in-dist_step_map.png").exists()
    settings = next(line for line in index.read_text().splitlines() if line.startswith("Settings: "))
    assert "n_steps=2" in settings and "seed=7" in settings and "method=readout" in settings


def test_task_set_names_that_collide_as_strings_are_refused_not_dropped():
    task = GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0)
    with pytest.raises(ValueError, match="distinct as strings"):
        diagnose(ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1)), {1: task, "1": task}, progress=False)


def test_resolve_lam_refuses_a_non_positive_ridge_by_name():
    from probes.diagnose import resolve_lam

    task = GPRegressionSampler(dim=3).sample(2, 5, 2, seed=0)
    assert resolve_lam(task, 0.25) == 0.25
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            resolve_lam(task, bad)


def test_kernel_params_left_out_are_the_kernels_defaults_and_are_recorded():
    from probes.diagnose import resolve_kernel

    task = GPRegressionSampler(dim=3, bandwidth=0.5).sample(3, 6, 2, seed=0)
    assert resolve_kernel(task, "gaussian", {}) == ("gaussian", {"bandwidth": 1.0})  # gaussian_kernel's default, not the sampler's
    assert resolve_kernel(task, "gaussian", None) == ("gaussian", {"bandwidth": 0.5})
    result = diagnose(ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1)), task, algorithms="cg",
                      kernel="exp", kernel_params={}, lam=0.1, kernels=(), bootstrap=0, progress=False)["tasks"]
    assert result.kernel_params == {"temperature": 1.0}
    x, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    expected = np.exp(xq[0] @ x[0].T) @ np.linalg.solve(np.exp(x[0] @ x[0].T) + 0.1 * np.eye(6), y[0])
    np.testing.assert_allclose(result.krr_predictions[0], expected, rtol=1e-9)


def test_summary_lists_each_kernels_best_head_distance_per_block():
    """The kernel-alignment lines: per reference kernel, each block's best head distance at 3
    decimals (`best_head_choices`: the min over finite heads that rank keys, or over all where
    none does; '-' for a block without one, 'u' after a uniform head's), the blocks numbered as in
    the figure; then those heads' row Spearman at 2 decimals."""
    task = GPRegressionSampler(dim=3, kernel="exp", temperature=TEMPERATURE, noise_std=NOISE).sample(8, 6, 3, seed=2)
    result = diagnose(small_model(), task, algorithms=("gd",), n_steps=N_STEPS, bootstrap=0, progress=False)["tasks"]
    distance = {kernel: metrics["operator_distance"].double().numpy() for kernel, metrics in result.kernel_alignment.metrics.items()}
    distance["gaussian"][1] = [np.nan, np.inf]  # block 1: no head with a distance
    alignment = dataclasses.replace(result.kernel_alignment, metrics={
        kernel: {**metrics, "operator_distance": torch.from_numpy(distance[kernel])} for kernel, metrics in result.kernel_alignment.metrics.items()})
    lines = summary_lines(dataclasses.replace(result, kernel_alignment=alignment))
    start = next(i for i, line in enumerate(lines) if line.startswith("kernel alignment (query rows vs support keys;"))
    assert lines[start + 1].split() == ["block", "0", "1"]
    for line, kernel in zip(lines[start + 2 : start + 4], ("exp", "gaussian"), strict=True):
        choices = iter(best_head_choices(alignment, kernel))
        expected = [(lambda choice: f"{choice[1]:.3f}" + "u" * choice[2])(next(choices)) if np.isfinite(row).any() else "-"
                    for row in distance[kernel]]
        assert line.split() == [kernel, *expected]
    assert lines[start + 3].split()[2] == "-"
    spearman_at = start + 4 + any(line.startswith("  u: ") for line in lines[start + 4 : start + 5])
    assert lines[spearman_at].startswith("  row Spearman of those heads with the kernel")
    for line, kernel in zip(lines[spearman_at + 1 : spearman_at + 3], ("exp", "gaussian"), strict=True):
        rows = iter(best_head_choices(alignment, kernel))
        spearman = alignment.metrics[kernel]["row_spearman"].double().numpy()
        expected = [(lambda choice: f"{spearman[block, choice[0]]:.2f}")(next(rows)) if np.isfinite(row).any() else "-"
                    for block, row in enumerate(distance[kernel])]
        assert line.split() == [kernel, *[value if value != "nan" else "-" for value in expected]]
    assert lines[spearman_at + 3].startswith("Best: ")
    assert not any(line.startswith("kernel alignment") for line in summary_lines(dataclasses.replace(result, kernel_alignment=None)))
