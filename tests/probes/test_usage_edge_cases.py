"""Usage review: edge cases and numerical robustness across the public API, as a researcher hits
them in a notebook (one support point, one query, batch of 1, duplicate support points, tiny or
huge ridge, n_steps much larger than n, constant or zero labels, NaN written into a task, a
reference kernel that cannot tell the keys apart), checked against independent references:
NumPy solves and closed forms, a NumPy Newton-Schulz loop, finite differences, and the
definitions in the docstrings.

Tests marked xfail(strict=True) state the correct behaviour of a bug this review found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probes
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS, newton_schulz
from mi_krr.tasks import ICLTask
from probes.compare import SummaryRow, table_cells
from probes.identifiability import identifiability_verdict
from probes.scoring import log_error_profile, overflow_limit, score_algorithms
from probes.step_sizes import path_score, path_scores
from prompts import random_task


def tiny_model() -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")
    return ICLTransformer(cfg).eval()


def numpy_gaussian(x: np.ndarray, z: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    sq = ((x[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * bandwidth**2))


# ---------------------------------------------------------------- solvers at the boundaries


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registry_solver_is_exact_after_one_step_on_one_support_point(name):
    """n = 1: K + lam I is the scalar k + lam, so every registry solver with its spectrum-optimal
    parameters reaches alpha = y / (k + lam) in one step and stays there; the query predictions
    must equal the closed form k_q y / (k + lam) at every step t >= 1."""
    rng = np.random.default_rng(3)
    x, xq = rng.normal(size=(1, 2)), rng.normal(size=(3, 2))
    K, Kq, y, lam = numpy_gaussian(x, x), numpy_gaussian(xq, x), np.array([0.7]), 0.1
    expected = Kq[:, 0] * 0.7 / (K[0, 0] + lam)
    trajectory = ALGORITHMS[name](K, y, lam, 4, K_query=Kq)
    pred = trajectory.pred.numpy()
    assert pred.shape == (5, 3)
    np.testing.assert_allclose(pred[0], 0.0, atol=0)
    np.testing.assert_allclose(pred[1:], np.broadcast_to(expected, (4, 3)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registry_solver_matches_numpy_solve_at_a_huge_ridge(name):
    """lam = 1e12 on a Gaussian kernel with two duplicated support points: every solver must
    still converge (kappa ~ 1) to NumPy's solve of (K + lam I) alpha = y, ~ y / lam."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2))
    x[3] = x[4] = x[0]
    xq = rng.normal(size=(3, 2))
    K, Kq, y, lam = numpy_gaussian(x, x), numpy_gaussian(xq, x), rng.normal(size=6), 1e12
    expected = Kq @ np.linalg.solve(K + lam * np.eye(6), y)
    pred = ALGORITHMS[name](K, y, lam, 40, K_query=Kq).pred[-1].numpy()
    np.testing.assert_allclose(pred, expected, rtol=1e-8)


def test_newton_schulz_stays_finite_on_an_ill_conditioned_but_valid_system():
    """Duplicate support points (singular K) and lam = 1e-8: K + lam I is positive definite with
    kappa ~ 1e9. The unguarded scale c = 2 / (mu_max^2 + mu_min^2) put I - c A^2 at -1 to
    rounding, and the overshoot doubled every step (inf/NaN after ~60 steps); the trajectory must
    stay finite and reach NumPy's solve."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2))
    x[3] = x[0]
    K, y, lam = numpy_gaussian(x, x), rng.normal(size=8), 1e-8
    expected = np.linalg.solve(K + lam * np.eye(8), y)
    alpha = newton_schulz(K, y, lam, 80).alpha.numpy()
    assert np.isfinite(alpha).all()
    np.testing.assert_allclose(alpha[-1], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


# ---------------------------------------------------------------- diagnose and its scores


def test_diagnose_with_many_more_steps_than_support_points_fits_a_finite_step():
    """n_steps = 400 on prompts of 5 support points (a researcher asking for long trajectories):
    a diverging candidate step's predictions stay finite but their squares overflow, and the
    cross-fit's 0 x inf gives NaN, so `monotone_alignment` raises an error about a cost the user
    never passed. diagnose must return, with a finite positive fitted gd step per half."""
    task = random_task(6, 5, 2, 2, seed=1)
    diagnosis = probes.diagnose(
        tiny_model(), task, kernel="gaussian", lam=0.1, n_steps=400, algorithms=("gd",), kernels=(), bootstrap=0, progress=False
    )
    step = np.asarray(diagnosis["tasks"].fitted_steps["gd"].step)
    assert np.isfinite(step).all() and (step > 0).all()


def test_path_scores_treat_an_overflowing_candidate_as_diverged():
    """Two candidates scored on two folds: a sane one, and one whose predictions are finite but
    ~1e200 (a diverging step after many iterations). The overflowing one must score -inf, as the
    docstring says of a diverging step, and the sane one its own `path_score` on each fold."""
    rng = np.random.default_rng(0)
    layer_pred = rng.normal(size=(4, 3, 2))
    sane = np.cumsum(rng.normal(size=(4, 6, 2)), axis=1)
    sane[:, 0] = 0.0
    huge = sane * 1e200
    folds = np.array([0, 1, 0, 1])
    scored = np.array([1, 2])
    scores = path_scores(layer_pred, torch.as_tensor(np.stack([sane, huge], axis=1)), scored, folds=folds)
    assert np.isneginf(scores[:, 1]).all()
    for fold in (0, 1):
        rows = folds == fold
        assert scores[fold, 0] == pytest.approx(path_score(layer_pred[rows], sane[rows], scored), rel=1e-12)


def test_overflow_limit_is_where_the_scoring_sums_stop_overflowing():
    """sqrt(float64 max) / (2 n), from NumPy's finfo: n squared differences of two values of that
    size sum to float64's max / n (finite), while the square of the total of n values 4x that size
    (what SST's total^2 term would hold) overflows."""
    for n in (1, 7, 10_000):
        limit = overflow_limit(n)
        assert limit == pytest.approx(np.sqrt(np.finfo(np.float64).max) / (2 * n), rel=1e-15)
        differences = np.full(n, 2 * limit)
        with np.errstate(over="ignore"):
            assert np.isfinite(np.sum(differences**2))
            assert not np.isfinite(np.square(np.float64(4 * limit * n)))


def test_score_algorithms_refuses_a_finite_trajectory_whose_squares_overflow():
    """A step trajectory of ~1e200 (finite: a diverging iteration caught before inf) must be
    refused in one line naming it, not scored as NaN."""
    rng = np.random.default_rng(1)
    layers, krr = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 2))
    sane = np.concatenate([np.zeros((6, 1, 2)), np.repeat(krr[:, None], 4, axis=1)], axis=1)
    with pytest.raises(ValueError, match=r"step_preds\['huge'\] holds values beyond .*diverging"):
        score_algorithms(layers, {"sane": sane, "huge": sane * 1e200}, krr, bootstrap=0)


def test_diagnose_leaves_out_a_solver_whose_finite_predictions_overflow_the_scores():
    """A custom solver returning finite predictions of ~1e200 is left out with a note that names
    it and says it diverges; the registry's CG beside it is scored."""

    def exploding(K, y, lam, n_steps, K_query=None):
        trajectory = ALGORITHMS["cg"](K, y, lam, n_steps, K_query=K_query)
        trajectory.pred = trajectory.pred * 1e200
        return trajectory

    diagnosis = probes.diagnose(
        tiny_model(), random_task(8, 5, 2, 2, seed=2), kernel="gaussian", lam=0.1, n_steps=3,
        algorithms={"exploding": exploding, "cg": ALGORITHMS["cg"]}, kernels=(), bootstrap=0, progress=False,
    )["tasks"]
    assert list(diagnosis.scores) == ["cg"]
    assert any("exploding" in note and "diverges" in note for note in diagnosis.notes)


def test_log_error_profile_floor_is_float64_rounding_of_the_reference():
    """An exact match floors at log10(eps^2 x mean(reference^2)) (NumPy's eps); an error above the
    floor is the plain log10 MSE; an all-zero reference floors at 1e-300."""
    rng = np.random.default_rng(4)
    reference = 3.0 * rng.normal(size=(5, 2))
    values = np.stack([reference, reference + 0.01], axis=1)  # [5, 2, 2]: exact, off by 0.01
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(log_error_profile(values, reference), [np.log10(eps**2 * np.mean(reference**2)), -4.0], rtol=1e-12)
    assert log_error_profile(np.zeros((3, 1, 2)), np.zeros((3, 2))).tolist() == [-300.0]


def test_profile_distance_does_not_depend_on_exact_zero_versus_rounding_error():
    """Two algorithms whose trajectories agree to 1e-16 relative (one reaches the KRR predictions
    exactly, the other up to rounding; what n = 1 or zero labels give) must get nearly the same
    log-error distance to a model whose layers miss KRR by ~0.1. Today `log_error_profile` floors
    the MSE at 1e-300, so the exact one gets ~300 log10 units and the rounded one ~30."""
    rng = np.random.default_rng(0)
    krr = rng.normal(size=(8, 2))
    exact = np.concatenate([np.zeros((8, 1, 2)), np.repeat(krr[:, None], 5, axis=1)], axis=1)
    rounded = exact * (1 + 1e-16 * rng.choice([-1.0, 1.0], size=exact.shape))
    layers = krr[:, None] + 0.1 * rng.normal(size=(8, 3, 2))
    scores = score_algorithms(layers, {"exact": exact, "rounded": rounded}, krr, bootstrap=0)
    assert abs(scores["exact"].profile_distance - scores["rounded"].profile_distance) < 1.0


def test_diagnose_refuses_labels_that_make_every_trajectory_zero():
    """y_support = 0 on every prompt: every solver predicts exactly 0 at every step, so every R2
    is undefined (no variance), any step size fits, and the verdict's reason ('the layers'
    predictions are closer to 0 than to any solver iterate') is wrong. diagnose must refuse the
    task set in one line naming the labels."""
    task = random_task(6, 5, 2, 2, seed=2)
    zero = ICLTask(task.x_support, torch.zeros_like(task.y_support), task.x_query, task.y_query, {})
    with pytest.raises(ValueError, match="(?i)label|y_support"):
        probes.diagnose(tiny_model(), zero, kernel="gaussian", lam=0.1, kernels=(), bootstrap=0, progress=False)


def test_diagnose_refuses_a_kernel_so_narrow_that_no_query_sees_a_support_point():
    """A Gaussian bandwidth of 1e-3 on inputs ~1 apart: exp(-|x - x'|^2 / 2e-6) underflows to 0
    for every query-support pair (NumPy gives exactly 0), so KRR and every solver predict 0;
    diagnose must say so in one line naming the kernel."""
    task = random_task(6, 5, 2, 2, seed=3)
    gap = ((task.x_query.double()[:, :, None] - task.x_support.double()[:, None]) ** 2).sum(-1).numpy()
    assert not np.exp(-gap / 2e-6).any()  # the premise, by NumPy
    with pytest.raises(ValueError, match="KRR predicts 0 for every query.*wider kernel"):
        probes.diagnose(tiny_model(), task, kernel="gaussian", kernel_params={"bandwidth": 1e-3}, lam=0.1, kernels=(), bootstrap=0, progress=False)


def test_diagnose_on_one_prompt_needs_optimal_steps_and_then_scores_it():
    """Batch of 1: the fitted steps need two halves, so the default is refused in one line naming
    step_sizes; with step_sizes='optimal' the diagnosis runs, and its KRR predictions equal a
    NumPy solve on the prompt's Gaussian kernel."""
    model, task = tiny_model(), random_task(1, 4, 1, 2, seed=5)
    with pytest.raises(ValueError, match="step_sizes='optimal'"):
        probes.diagnose(model, task, kernel="gaussian", lam=0.1, kernels=(), bootstrap=0, progress=False)
    result = probes.diagnose(model, task, kernel="gaussian", lam=0.1, kernels=(), bootstrap=0, progress=False, step_sizes="optimal")["tasks"]
    x, xq, y = (v[0].numpy() for v in (task.x_support, task.x_query, task.y_support))
    expected = numpy_gaussian(xq, x) @ np.linalg.solve(numpy_gaussian(x, x) + 0.1 * np.eye(4), y)
    np.testing.assert_allclose(result.krr_predictions[0], expected, rtol=1e-12)
    assert result.layer_predictions.shape == (1, 3, 1)


# ---------------------------------------------------------------- instruments


def test_cka_is_nan_for_single_row_blocks():
    """One query (or one prompt of one query row) gives a [1, n] block; double centring removes it
    entirely, so CKA is 0/0, undefined. `alignment_metrics` used to return rounding residue
    (about 1 draw in 10 here: 0, 1 or -1), which kernel_alignment then averaged as if real."""
    generator = torch.Generator().manual_seed(0)
    attn = torch.softmax(3 * torch.randn(200, 1, 7, generator=generator, dtype=torch.float64), -1)
    ref = torch.softmax(torch.randn(200, 1, 7, generator=generator, dtype=torch.float64), -1)
    assert torch.isnan(probes.alignment_metrics(attn, ref)["cka"]).all()


def test_ridge_probe_r2_on_constant_targets_is_undefined():
    """targets = a constant (e.g. a solver's step-0 predictions, all 0): the target has no variance,
    so R2 = 1 - SSE / SST is undefined; today `_r2` clamps SST at 1e-300 and reports a perfect
    probe (and a perfect shuffled control). It must be NaN, or the targets refused."""
    model, task = tiny_model(), random_task(12, 4, 2, 2, seed=6)
    try:
        fitted = probes.fit_layer_probes(model, task, targets=torch.zeros(12, 2, dtype=torch.float64))
    except ValueError as error:
        assert "target" in str(error)
        return
    assert torch.isnan(fitted.fit.val_r2).all() and torch.isnan(fitted.control.val_r2).all()


def test_alignment_scale_is_inf_when_the_reference_cannot_tell_the_keys_apart():
    """Every support point of a prompt identical: the row-normalised Gaussian / exp reference over
    the support keys is uniform for every scale, which the docstring says is reported as inf.
    Some heads used to get an end of the search range instead (here an exp temperature of ~1e-15;
    on the shipped softmax_gp, bandwidths of 2^-15 and temperatures of 2^-30)."""
    task = random_task(2, 5, 2, 2, seed=5)
    x = task.x_support.clone()
    x[:] = x[:, :1]
    same = ICLTask(x, task.y_support, task.x_query, task.y_query, {})
    alignment = probes.kernel_alignment(tiny_model(), same, block="support")
    for kernel in ("exp", "gaussian"):
        assert torch.isinf(alignment.scale[kernel]).all(), alignment.scale[kernel]


def test_label_sensitivities_on_one_prompt_one_point_one_query_match_finite_differences():
    """Batch 1, n = 1, m = 1, float64 model fed a float32 task: the autograd sensitivities of
    every layer equal central finite differences of `layer_predictions` in float64."""
    model, task = tiny_model(), random_task(1, 1, 1, 2, seed=9, dtype=torch.float32)
    sens = probes.label_sensitivities(model, task)
    assert sens.shape == (1, 3, 1, 1) and sens.dtype == torch.float64
    task64, eps = task.to(dtype=torch.float64), 1e-6
    shifted = [ICLTask(task64.x_support, task64.y_support + s, task64.x_query, task64.y_query, {}) for s in (eps, -eps)]
    fd = (probes.layer_predictions(model, shifted[0]) - probes.layer_predictions(model, shifted[1])) / (2 * eps)
    np.testing.assert_allclose(sens[0, :, 0, 0].numpy(), fd[0, :, 0].numpy(), rtol=1e-6, atol=1e-9)


def test_nan_written_into_a_task_after_construction_is_refused_by_the_probes():
    """ICLTask checks finiteness when built; a NaN written into its tensors afterwards must still be
    refused by the probes in one line naming the field, never propagated into predictions."""
    task = random_task(2, 4, 2, 2, seed=4)
    task.y_support[0, 1] = float("nan")
    with pytest.raises(ValueError, match="y_support contains NaN or inf"):
        probes.layer_predictions(tiny_model(), task)
    with pytest.raises(ValueError, match="y_support contains NaN or inf"):
        probes.diagnose(tiny_model(), task, kernel="gaussian", lam=0.1, kernels=(), bootstrap=0, progress=False, step_sizes="optimal")


def test_a_diagnosis_where_every_candidate_scores_minus_inf_names_no_best_algorithm():
    """Layers that predict ~1e-3 noise align with step 0 (alpha = 0) for every solver, whose
    variance is 0 there (path R2 -inf, the documented rule): the verdict must not present the
    first-listed algorithm as the best (`best_algorithm` None), and the overview table's best
    cell is "-"."""
    rng = np.random.default_rng(5)
    krr = rng.normal(size=(24, 3))
    steps = {name: np.concatenate([np.zeros((24, 1, 3)), np.repeat(krr[:, None] * scale, 4, axis=1)], axis=1)
             for name, scale in (("cg", 1.0), ("gd", 0.5))}
    scores = score_algorithms(1e-3 * rng.normal(size=(24, 3, 3)), steps, krr, bootstrap=100)
    assert all(score.score == -np.inf for score in scores.values())
    verdict = identifiability_verdict(scores, steps)
    assert verdict.message.startswith("Best: none: every candidate's path R2 is -inf or undefined (cg is listed first).")
    assert verdict.best == "cg" and verdict.best_algorithm is None
    row = SummaryRow("m", "t", verdict.best_algorithm, -math.inf, (-math.inf, -math.inf), "", False, math.nan, math.nan)
    assert table_cells(row)[2] == "-"
