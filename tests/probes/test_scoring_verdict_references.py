"""Scoring and verdict claims pinned against independent references: explicit loops over prompts
and resamples, brute-force monotone maps, sorted order statistics, and exact boundary values of
the verdict's thresholds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from brute_force import monotone_path, pooled_sums
from probes.identifiability import MIN_VERDICT_PROMPTS, MIN_VERDICT_RESAMPLES, algorithm_agreement, identifiability_verdict
from probes.scoring import bootstrap_weights, log_error_profile, score_algorithm, score_algorithms


def _trajectory(rng, batch, n_steps, m):
    """Random step predictions `[batch, n_steps, m]` with step 0 = 0 (alpha = 0) and growing spread."""
    steps = rng.normal(size=(batch, n_steps, m)) * np.arange(n_steps)[None, :, None]
    steps[:, 0] = 0.0
    return steps


def _order_statistic(values, q):
    """The ceil(q k)-th smallest of the k non-NaN values (the percentile interval's definition)."""
    kept = np.sort(np.asarray(values)[~np.isnan(values)])
    return kept[int(np.ceil(q * kept.size - 1e-9)) - 1]


def _loop_r2(layers, steps):
    """R2 [L', T+1] by loops: 1 - SSE / SST about the pooled mean of step t, NaN where SST = 0."""
    r2 = np.full((layers.shape[1], steps.shape[1]), np.nan)
    for l in range(layers.shape[1]):
        for t in range(steps.shape[1]):
            s = steps[:, t].ravel()
            sst = np.sum((s - s.mean()) ** 2)
            if sst > 0:
                r2[l, t] = 1.0 - np.sum((layers[:, l].ravel() - s) ** 2) / sst
    return r2


# ------------------------------------------------------------------------------------------------
# probes.scoring


def test_path_score_is_nan_for_zero_error_over_zero_variance_and_minus_inf_for_error_over_zero_variance():
    # every scored layer at the constant step 0: 0/0 is undefined (NaN), error/0 is -inf
    steps = _trajectory(np.random.default_rng(0), 10, 3, 2)
    exact_zero = score_algorithm("toy", np.zeros((10, 3, 2)), steps, steps[:, -1])
    near_zero = score_algorithm("toy", 1e-3 * np.ones((10, 3, 2)), steps, steps[:, -1])
    assert exact_zero.aligned_steps.tolist() == [0, 0, 0] and near_zero.aligned_steps.tolist() == [0, 0, 0]
    assert np.isnan(exact_zero.score)
    assert near_zero.score == -np.inf


def test_layer_intervals_use_the_level_asked_over_brute_force_resampled_alignments():
    rng = np.random.default_rng(1)
    steps = _trajectory(rng, 12, 4, 2)
    layers = steps[:, [0, 1, 3]] + 0.5 * rng.normal(size=(12, 3, 2))
    weights = bootstrap_weights(12, 40, seed=2)
    score = score_algorithm("toy", layers, steps, steps[:, -1], resamples=weights, level=0.8)
    per_resample = []  # each resample: prompts repeated by their counts, aligned on their own
    for w in weights:
        index = np.repeat(np.arange(12), w.astype(int))
        sse, sst, count = pooled_sums(layers[index], steps[index])
        path = monotone_path(sse / count)
        per_resample.append([1.0 - sse[row, t] / sst[t] if sst[t] > 0 else np.nan for row, t in enumerate(path)])
    per_resample = np.array(per_resample)
    for row in (1, 2):
        expected = (_order_statistic(per_resample[:, row], 0.1), _order_statistic(per_resample[:, row], 0.9))
        np.testing.assert_allclose(score.aligned_r2_ci[row], expected, rtol=1e-10)


def test_r2_and_mse_fields_are_over_all_prompts_when_kappa_strata_are_scored_too():
    # the strata are extra prompt weightings: the reported matrices must still pool every prompt
    rng = np.random.default_rng(3)
    steps = _trajectory(rng, 30, 4, 2)
    layers = steps[:, [0, 1, 3]] + 0.4 * rng.normal(size=(30, 3, 2))
    kappa = np.exp(rng.uniform(0, 5, size=30))
    score = score_algorithm("toy", layers, steps, steps[:, -1], kappa=kappa, n_kappa_bins=3)
    assert [s.n_prompts for s in score.strata] == [10, 10, 10]
    mse = np.array([[np.mean((layers[:, l] - steps[:, t]) ** 2) for t in range(4)] for l in range(3)])
    np.testing.assert_allclose(score.mse, mse, rtol=1e-12)
    expected_r2 = _loop_r2(layers, steps)
    assert np.isnan(score.r2[:, 0]).all()
    np.testing.assert_allclose(score.r2[:, 1:], expected_r2[:, 1:], rtol=1e-10)


def _constant_stratum_case(rng, batch, constant, integer):
    """Steps [batch, 3, 2] whose first half of prompts (the low-kappa stratum) hold `constant` at every
    step past 0, and noisy layers; `integer`: the other half's steps are small integers."""
    steps = rng.integers(-4, 5, size=(batch, 3, 2)).astype(float) if integer else _trajectory(rng, batch, 3, 2)
    steps[:, 0] = 0.0
    steps[: batch // 2, 1:] = constant  # no variance inside the low stratum
    layers = steps + 0.2 * rng.normal(size=steps.shape)
    kappa = np.r_[np.linspace(2.0, 3.0, batch // 2), np.linspace(50.0, 60.0, batch // 2)]
    return steps, layers, kappa


def _direct_stratum_score(layers, steps, members, path):
    error = sum(np.sum((layers[members, l] - steps[members, path[l]]) ** 2) for l in (1, 2))
    variance = sum(np.sum((steps[members, path[l]] - steps[members, path[l]].mean()) ** 2) for l in (1, 2))
    return 1.0 - error / variance


def test_weighted_r2_averages_only_the_strata_with_a_finite_score():
    # 16 prompts x 2 queries of small integers: every sum below is exact, so the constant stratum's
    # SST is exactly 0 and its score -inf; the weighted R2 is then the other stratum's score
    steps, layers, kappa = _constant_stratum_case(np.random.default_rng(4), 16, 1.0, integer=True)
    score = score_algorithm("toy", layers, steps, steps[:, -1], kappa=kappa, n_kappa_bins=2)
    assert score.aligned_steps.tolist() == [0, 1, 2] and [s.n_prompts for s in score.strata] == [8, 8]
    expected = _direct_stratum_score(layers, steps, slice(8, 16), score.aligned_steps)
    assert score.strata[0].score == -np.inf  # error over zero variance
    assert score.strata[1].score == pytest.approx(expected, rel=1e-10)
    assert score.weighted_r2 == pytest.approx(expected, rel=1e-10)


def test_a_stratum_with_constant_step_values_scores_minus_inf_and_stays_out_of_weighted_r2():
    steps, layers, kappa = _constant_stratum_case(np.random.default_rng(4), 20, 1.5, integer=False)
    score = score_algorithm("toy", layers, steps, steps[:, -1], kappa=kappa, n_kappa_bins=2)
    assert score.aligned_steps.tolist() == [0, 1, 2]
    expected = _direct_stratum_score(layers, steps, slice(10, 20), score.aligned_steps)
    assert score.strata[1].score == pytest.approx(expected, rel=1e-10)  # holds on the pristine code too
    assert score.strata[0].score == -np.inf  # SST 0 in that stratum: error over zero variance
    assert score.weighted_r2 == pytest.approx(expected, rel=1e-10)


def test_bootstrap_weights_with_zero_resamples_is_an_empty_matrix():
    weights = bootstrap_weights(5, 0, seed=0)
    assert weights.shape == (0, 5)


def test_log_error_profile_of_an_exact_match_is_floored_at_float64_rounding_of_the_reference():
    values = np.random.default_rng(5).normal(size=(4, 2, 3))
    reference = values[:, 1].copy()
    profile = log_error_profile(values, reference)
    assert profile[1] == pytest.approx(np.log10(np.finfo(np.float64).eps ** 2 * np.mean(reference**2)), rel=1e-12)
    assert profile[0] == pytest.approx(np.log10(np.mean((values[:, 0] - reference) ** 2)), rel=1e-12)


def test_sensitivity_aligned_r2_is_read_at_the_monotone_alignment_not_the_per_layer_argmin():
    rng = np.random.default_rng(6)
    steps = _trajectory(rng, 15, 4, 2)
    layers = steps[:, [0, 3, 1]] + 0.05 * rng.normal(size=(15, 3, 2))  # per-layer argmin [0, 3, 1]: not monotone
    step_sens = rng.normal(size=(15, 4, 2, 3))
    layer_sens = step_sens[:, [0, 3, 1]] + 0.3 * rng.normal(size=(15, 3, 2, 3))
    score = score_algorithm("toy", layers, steps, steps[:, -1], layer_sensitivity=layer_sens, step_sensitivity=step_sens)
    sse, _, count = pooled_sums(layers, steps)
    path = monotone_path(sse / count)
    assert list(path) != np.argmin(sse, axis=1).tolist()
    sens_r2 = _loop_r2(layer_sens.reshape(15, 3, 6), step_sens.reshape(15, 4, 6))
    np.testing.assert_allclose(score.sensitivity_aligned_r2[1:], sens_r2[[1, 2], list(path[1:])], rtol=1e-10)


def test_scores_come_back_in_the_order_given_when_step_counts_interleave():
    # algorithms are grouped by step shape internally; the result keeps the caller's order
    rng = np.random.default_rng(7)
    preds = {"a": _trajectory(rng, 8, 4, 2), "b": _trajectory(rng, 8, 6, 2), "c": _trajectory(rng, 8, 4, 2)}
    layers = preds["b"][:, [0, 2, 5]]
    scores = score_algorithms(layers, preds, layers[:, -1], bootstrap=0)
    assert list(scores) == ["a", "b", "c"]
    for name, steps in preds.items():
        assert scores[name].algorithm == name and scores[name].r2.shape == (3, steps.shape[1])
        np.testing.assert_allclose(scores[name].r2[:, 1:], _loop_r2(layers, steps)[:, 1:], rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# probes.identifiability


def test_agreement_row_is_nan_when_no_aligned_step_is_past_step_0_and_its_diagonal_too():
    rng = np.random.default_rng(8)
    preds = {"a": _trajectory(rng, 10, 4, 2), "b": _trajectory(rng, 10, 4, 2)}
    _, agreement = algorithm_agreement(preds, {"a": np.array([0, 0]), "b": np.array([1, 2])})
    assert np.isnan(agreement[0]).all()
    assert agreement[1, 1] == 1.0 and not np.isnan(agreement[1]).any()


def test_agreement_diagonal_is_1_even_for_an_algorithm_that_never_moves():
    rng = np.random.default_rng(9)
    preds = {"stalled": np.zeros((10, 4, 2)), "b": _trajectory(rng, 10, 4, 2)}
    _, agreement = algorithm_agreement(preds, {"stalled": np.array([1, 2]), "b": np.array([1, 3])})
    assert agreement[0, 0] == 1.0 and agreement[1, 1] == 1.0


@pytest.fixture(scope="module")
def exact_a():
    """Layers that are exactly algorithm a's steps 0..4 on MIN_VERDICT_PROMPTS prompts, scored against
    a and an unrelated b on MIN_VERDICT_RESAMPLES paired resamples."""
    rng = np.random.default_rng(10)
    preds = {"a": _trajectory(rng, MIN_VERDICT_PROMPTS, 5, 3), "b": _trajectory(rng, MIN_VERDICT_PROMPTS, 5, 3)}
    return preds, score_algorithms(preds["a"], preds, preds["a"][:, -1], bootstrap=MIN_VERDICT_RESAMPLES, seed=0)


def test_an_exact_match_on_exactly_the_minimum_prompts_and_resamples_is_identified(exact_a):
    preds, scores = exact_a
    verdict = identifiability_verdict(scores, preds)
    assert verdict.best == "a" and verdict.score == pytest.approx(1.0) and verdict.runner_up == "b"
    assert verdict.identified
    assert verdict.scores == {"a": scores["a"].score, "b": scores["b"].score}


def test_a_lower_bound_exactly_at_min_score_is_enough(exact_a):
    preds, scores = exact_a
    top = dataclasses.replace(scores["a"], score_ci=(0.75, 1.0))
    assert identifiability_verdict({**scores, "a": top}, preds, min_score=0.75).identified
    assert not identifiability_verdict({**scores, "a": top}, preds, min_score=0.7500001).identified


def _gap_case(scores, top_score, runner_score, differences):
    """Scores whose paired differences are exactly `differences` (runner-up samples all 0)."""
    runner = dataclasses.replace(scores["b"], score=runner_score, score_samples=np.zeros(len(differences)))
    top = dataclasses.replace(scores["a"], score=top_score, score_ci=(0.95, 1.0), score_samples=np.asarray(differences, dtype=float))
    return {"a": top, "b": runner}


def test_a_gap_of_exactly_min_gap_is_enough(exact_a):
    preds, scores = exact_a
    case = _gap_case(scores, 0.75, 0.5, np.ones(MIN_VERDICT_RESAMPLES))  # 0.75 - 0.5 = 0.25 exactly
    verdict = identifiability_verdict(case, preds, min_score=0.9, min_gap=0.25)
    assert verdict.gap == 0.25 and verdict.gap_ci == (1.0, 1.0) and verdict.identified
    assert not identifiability_verdict(case, preds, min_score=0.9, min_gap=0.2500001).identified


def test_a_gap_interval_with_lower_bound_exactly_0_does_not_exclude_0(exact_a):
    preds, scores = exact_a
    differences = np.r_[np.zeros(10), np.linspace(0.1, 1.0, MIN_VERDICT_RESAMPLES - 10)]  # 3rd smallest of 100 is 0
    verdict = identifiability_verdict(_gap_case(scores, 1.0, 0.5, differences), preds, min_score=0.9)
    assert verdict.gap_ci[0] == 0.0 and not verdict.identified
    assert "does not beat b beyond the interval" in verdict.message


def test_a_gap_above_zero_on_every_resample_but_below_min_gap_identifies_nothing(exact_a):
    preds, scores = exact_a
    case = _gap_case(scores, 0.955, 0.95, np.full(MIN_VERDICT_RESAMPLES, 0.005))
    verdict = identifiability_verdict(case, preds, min_score=0.9, min_gap=0.01)
    assert verdict.gap_ci[0] > 0 and verdict.gap < 0.01 and not verdict.identified


def test_gap_interval_is_the_order_statistics_of_the_paired_differences_at_the_level_asked(exact_a):
    preds, scores = exact_a
    differences = np.random.default_rng(11).normal(0.3, 0.1, size=MIN_VERDICT_RESAMPLES)
    verdict = identifiability_verdict(_gap_case(scores, 1.0, 0.7, differences), preds, level=0.8)
    assert verdict.gap_ci == (_order_statistic(differences, 0.1), _order_statistic(differences, 0.9))


def test_identical_copies_agree_exactly_1_so_a_threshold_of_1_still_makes_them_inseparable(exact_a):
    preds, _ = exact_a
    copies = {"b": preds["b"], "a": preds["a"], "a_copy": preds["a"].copy()}
    scores = score_algorithms(preds["a"], copies, preds["a"][:, -1], bootstrap=MIN_VERDICT_RESAMPLES, seed=0)
    verdict = identifiability_verdict(scores, copies, agreement_threshold=1.0)
    a, copy = verdict.algorithms.index("a"), verdict.algorithms.index("a_copy")
    assert verdict.agreement[a, copy] == 1.0 and verdict.equivalent == ["a_copy"]
    assert not verdict.separable[a, copy] and verdict.runner_up == "b" and verdict.identified
    # the message quotes the best's own agreement row (a vs a_copy: 1), not the first algorithm's
    assert "a_copy (agreement 1.0000)" in verdict.message


def test_a_candidate_with_nothing_to_compare_is_separable_from_all_but_itself(exact_a):
    preds, scores = exact_a
    at_zero = {**scores, "b": dataclasses.replace(scores["b"], aligned_steps=np.zeros_like(scores["b"].aligned_steps))}
    verdict = identifiability_verdict(at_zero, preds)
    b = verdict.algorithms.index("b")
    assert np.isnan(verdict.agreement[b]).all()
    assert verdict.separable.tolist() == [[False, True], [True, False]]


def test_a_finite_score_aligned_at_step_0_is_reported_as_not_good_enough_not_as_prediction_0(exact_a):
    # the step-0 message describes layers that sit at prediction 0 (score not finite); a finite
    # score below min_score, even at step 0 of some algorithm, is the "explains too little" case
    preds, scores = exact_a
    top = dataclasses.replace(scores["a"], score=0.5, score_ci=(0.4, 0.6), aligned_steps=np.zeros_like(scores["a"].aligned_steps))
    verdict = identifiability_verdict({**scores, "a": top}, preds)
    assert not verdict.identified
    assert "no algorithm explains the layers well enough" in verdict.message
    assert "every scored layer aligns with step 0" not in verdict.message
