"""The reproductions' headline numbers against independent references: the CG-rate summary against
NumPy CG and the closed-form CG bound, the width study against NumPy CG on the random-projection
head's own features, softmax-ood's per-layer statistics against `probes.kernel_alignment` on
prompts drawn here, and the richardson-profile ridge lens against probes fitted here on separate
prompts."""

from __future__ import annotations

import re
import types

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch

from construct_references import numpy_cg_a_norm_ratios, random_projection_width_errors
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.construct.studies import conditioned_linear_task
from mi_krr.reproductions import cg_rate, richardson_profile, softmax_ood, width
from mi_krr.tasks import DEFAULT_SHIFTS, LinearRegressionSampler, apply_shift, sampler_from_config, shift_applies
from mi_krr.train import load_model, read_run_config
from probes.kernel_alignment import kernel_alignment
from probes.layer_predictions import layer_predictions


def first_below(values, tolerance):
    below = np.flatnonzero(np.asarray(values) < tolerance)
    return int(below[0]) if below.size else None


# ---- cg-rate ------------------------------------------------------------------------------------


def test_cg_rate_steps_to_tolerance_are_numpy_cgs_and_the_bounds_first_steps_below_it():
    """steps_to_tolerance is where NumPy CG's median A-norm error first drops below tol, the bound's where 2 q^t does."""
    kappas, n, steps, lam, batch, seed, tol = (10.0, 100.0), 16, 12, 1e-4, 3, 2, 1e-2
    result = cg_rate(kappas=kappas, n_support=n, n_steps=steps, lam=lam, batch_size=batch, seed=seed, tolerance=tol)
    t = np.arange(steps + 1)
    for kappa in kappas:
        key = str(kappa)
        root = np.sqrt(kappa)
        bound = 2 * ((root - 1) / (root + 1)) ** t
        task = conditioned_linear_task(batch, n, kappa, lam, n_query=16, seed=seed)
        x, y = task.x_support.numpy(), task.y_support.numpy()
        model = np.median([numpy_cg_a_norm_ratios(x[b] @ x[b].T, y[b], lam, steps) for b in range(batch)], axis=0)
        assert result.steps_to_tolerance[key] == first_below(model, tol)
        assert result.bound_steps_to_tolerance[key] == first_below(bound, tol)
    # the setting is informative: CG beats its worst-case bound on at least one kappa
    assert any(result.steps_to_tolerance[str(k)] != result.bound_steps_to_tolerance[str(k)] for k in kappas)


def test_cg_rate_summary_flags_a_model_that_leaves_the_bound_and_reports_the_worst_model_solver_gap(monkeypatch):
    """On a study whose model crosses the bound at one step: within_bound False, gap = max over steps."""
    steps = np.arange(9)
    root = np.sqrt(10.0)
    bound = 2 * ((root - 1) / (root + 1)) ** steps
    solver = 0.5 * bound
    model = solver.copy()
    model[3] = 1.5 * bound[3]  # one step above the bound, far from the solver there
    model[-1] = solver[-1] + 1e-3 * bound[3]  # a smaller gap at the last step
    study = types.SimpleNamespace(kappas=[10.0], a_norm_ratio={"10.0": model.tolist()}, bound={"10.0": bound.tolist()},
                                  solver_a_norm_ratio={"10.0": solver.tolist()})
    import mi_krr.construct.studies as studies

    monkeypatch.setattr(studies, "cg_rate_study", lambda **kwargs: study)
    tol = float(bound[5])
    result = cg_rate(kappas=(10.0,), n_steps=8, tolerance=tol)
    assert result.within_bound["10.0"] is False
    assert result.max_ratio_to_bound["10.0"] == pytest.approx(np.max(model / bound), rel=1e-12)
    assert result.model_solver_gap["10.0"] == pytest.approx(np.max(np.abs(model - solver)), rel=1e-12)
    assert result.steps_to_tolerance["10.0"] == first_below(model, tol)
    assert result.bound_steps_to_tolerance["10.0"] == first_below(bound, tol)


# ---- width --------------------------------------------------------------------------------------


def test_width_errors_floor_gap_and_tolerance_width_match_numpy_cg_on_the_random_projection_features():
    """Unconverged CG (2 steps) on x W / sqrt(m): model error, feature-KRR error, their max gap, the tolerance width."""
    widths, dim, n, m, lam, steps, batch, seed = (2, 6), 4, 10, 4, 0.1, 2, 3, 5
    task = LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    model_error, krr_error = random_projection_width_errors(x, xq, y, lam, widths, steps, seed)
    tolerance = float(model_error.max()) * 1.01  # every width qualifies: the smallest must be reported
    result = width(widths=widths, kernels=("linear",), dim=dim, n_support=n, n_query=m, lam=lam, n_steps=steps, batch_size=batch,
                   seed=seed, tolerance=tolerance, heads=("random_features",), n_seeds=1)
    np.testing.assert_allclose(result.study.model_error["linear"], model_error, rtol=1e-8)
    np.testing.assert_allclose(result.study.feature_krr_error["linear"], krr_error, rtol=1e-8)
    expected_gap = np.max(np.abs(model_error - krr_error))
    assert expected_gap > 1e-3  # two CG steps have not converged: the gap is informative
    assert result.floor_gap["linear"] == pytest.approx(expected_gap, rel=1e-6)
    assert result.width_for_tolerance["linear"] == widths[0]


# ---- softmax-ood --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softmax_checkpoint():
    return shipped_checkpoint("softmax_gp")


def alignment_reference(model, task):
    """Per layer from `kernel_alignment`: the exp kernel's best-head distance, mean over heads, best
    head's Spearman and tau; the Gaussian kernel's best-head distance and sigma (its own best head)."""
    alignment = kernel_alignment(model, task, kernels=("exp", "gaussian"))
    distance = alignment.metrics["exp"]["operator_distance"].double().numpy()
    spearman = alignment.metrics["exp"]["row_spearman"].double().numpy()
    tau = alignment.scale["exp"].double().numpy()
    gaussian = alignment.metrics["gaussian"]["operator_distance"].double().numpy()
    sigma = alignment.scale["gaussian"].double().numpy()
    head, gaussian_head = np.nanargmin(distance, axis=1), np.nanargmin(gaussian, axis=1)
    rows = np.arange(distance.shape[0])
    return (distance[rows, head], np.nanmean(distance, axis=1), spearman[rows, head], tau[rows, head],
            gaussian[rows, gaussian_head], sigma[rows, gaussian_head])


def shifted_seed(sampler, name, seed):
    """The seed the documented scheme gives shift `name`: seed + its 1-based position among applicable shifts."""
    applicable = [key for key, shift in DEFAULT_SHIFTS.items() if shift_applies(sampler, shift)]
    return seed + 1 + applicable.index(name)


def test_softmax_ood_per_layer_statistics_and_overall_ratio_match_kernel_alignment_on_prompts_drawn_here(softmax_checkpoint):
    """Best-head distance, mean over heads, best head's Spearman / tau, mean-over-layers and its shift ratio (seed 3)."""
    batch, seed, shift = 6, 3, "bandwidth_x2"
    result = softmax_ood(softmax_checkpoint, batch_size=batch, shifts=(shift,), seed=seed)
    config = read_run_config(softmax_checkpoint)
    sampler = sampler_from_config(config["sampler"])
    n, m = config["train"]["n_support"], config["train"]["n_query"]
    model = load_model(softmax_checkpoint)
    tasks = {"in_distribution": sampler.sample(batch, n, m, seed=seed, dtype=torch.float32),
             shift: apply_shift(sampler, DEFAULT_SHIFTS[shift]).sample(batch, n, m, seed=shifted_seed(sampler, shift, seed), dtype=torch.float32)}
    overall = {}
    for name, task in tasks.items():
        best, mean, spearman, tau, gaussian, sigma = alignment_reference(model, task)
        np.testing.assert_allclose(result.best_distance[name], best, rtol=1e-9)
        np.testing.assert_allclose(result.mean_distance[name], mean, rtol=1e-9)
        np.testing.assert_allclose(result.best_row_spearman[name], spearman, rtol=1e-9)
        np.testing.assert_allclose(result.best_tau[name], tau, rtol=1e-9)
        np.testing.assert_allclose(result.best_gaussian_distance[name], gaussian, rtol=1e-9)
        np.testing.assert_allclose(result.best_bandwidth[name], sigma, rtol=1e-9)
        overall[name] = float(np.mean(best))
        assert result.overall(name) == pytest.approx(overall[name], rel=1e-12)
        assert result.overall(name, "gaussian") == pytest.approx(float(np.mean(gaussian)), rel=1e-12)
    assert np.any(np.abs(np.array(result.mean_distance["in_distribution"]) - np.array(result.best_distance["in_distribution"])) > 1e-6)
    numbers = result.key_numbers()
    ratio = overall[shift] / overall["in_distribution"]
    assert numbers[f"{shift}: distance (ratio to in-distribution)"] == f"{overall[shift]:.4f} ({ratio:.3f}x)"
    assert numbers["gaussian-kernel distance (best head, mean over layers)"] == ", ".join(
        f"{name} {result.overall(name, 'gaussian'):.3f}" for name in tasks)


# ---- richardson-profile -------------------------------------------------------------------------


def test_richardson_profile_ridge_lens_is_probes_fitted_on_separate_prompts_and_ranked_by_descending_score(softmax_checkpoint):
    """The ridge lens's per-layer log10 MSE to NumPy KRR equals probes fitted here on seed + 10000 prompts; rankings descend."""
    batch, train_batch, seed = 8, 32, 4
    result = richardson_profile(softmax_checkpoint, batch_size=batch, train_batch_size=train_batch, bootstrap=20, n_steps=8, seed=seed)
    config = read_run_config(softmax_checkpoint)
    sampler = sampler_from_config(config["sampler"])
    n, m = config["train"]["n_support"], config["train"]["n_query"]
    task = sampler.sample(batch, n, m, seed=seed, dtype=torch.float32)
    train = sampler.sample(train_batch, n, m, seed=seed + 10_000, dtype=torch.float32)
    model = load_model(softmax_checkpoint)
    xs, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    bandwidth, lam = sampler.bandwidth, sampler.noise_std**2
    krr = []
    for b in range(batch):
        K = np.exp(-((xs[b][:, None] - xs[b][None]) ** 2).sum(-1) / (2 * bandwidth**2))
        K_query = np.exp(-((xq[b][:, None] - xs[b][None]) ** 2).sum(-1) / (2 * bandwidth**2))
        krr.append(K_query @ np.linalg.solve(K + lam * np.eye(n), y[b]))
    krr = np.array(krr)
    layers = list(range(1, model.n_layers + 1))
    for lens, kwargs in (("readout", {}), ("ridge", {"train_task": train, "seed": seed})):  # the seed splits the probes' data too
        preds = layer_predictions(model, task, method=lens, layers=layers, **kwargs).numpy()  # [B, L, m]
        expected = np.log10(np.mean((preds - krr[:, None]) ** 2, axis=(0, 2)))
        np.testing.assert_allclose(result.lenses[lens].model_profile, expected, atol=1e-5)
    assert not np.allclose(result.lenses["ridge"].model_profile, result.lenses["readout"].model_profile, atol=1e-3)
    for lens, lens_result in result.lenses.items():
        names = list(lens_result.scores)
        scores = np.array([lens_result.scores[name] for name in names])
        expected_order = [names[i] for i in np.argsort(-scores, kind="stable")]
        top = result.key_numbers()[f"{lens}: path R2, top 4"]
        assert re.findall(r"(?:^|\], )(\S+) ", top) == expected_order[:4]
