"""Scoring statistics checked against direct NumPy formulas and brute force."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats

from brute_force import monotone_path, pooled_sums
from probes.scoring import (
    bootstrap_weights,
    kappa_strata,
    log_error_profile,
    monotone_alignment,
    mse_matrix,
    percentile_interval,
    percentile_intervals,
    profile_distance,
    r2_matrix,
    score_algorithm,
    score_algorithms,
)


def _loop_r2_mse(layers, steps):
    """R2 and MSE by explicit loops over layer/step pairs (pooled mean per step)."""
    r2 = np.full((layers.shape[1], steps.shape[1]), np.nan)
    mse = np.zeros_like(r2)
    for l in range(layers.shape[1]):
        for t in range(steps.shape[1]):
            a, s = layers[:, l].ravel(), steps[:, t].ravel()
            mse[l, t] = np.mean((a - s) ** 2)
            sst = np.sum((s - s.mean()) ** 2)
            if sst > 0:
                r2[l, t] = 1 - np.sum((a - s) ** 2) / sst
    return r2, mse


def test_r2_and_mse_matrices_match_loop_formulas_with_nan_for_constant_steps():
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(7, 5, 3))
    steps[:, 0] = 0.0  # step 0 of a solver: no variance
    layers = steps[:, [0, 2, 4, 4]] + 0.3 * rng.normal(size=(7, 4, 3))
    expected_r2, expected_mse = _loop_r2_mse(layers, steps)
    np.testing.assert_allclose(mse_matrix(layers, steps), expected_mse, rtol=1e-12)
    got = r2_matrix(layers, steps)
    assert np.isnan(got[:, 0]).all()
    np.testing.assert_allclose(got[:, 1:], expected_r2[:, 1:], rtol=1e-10)


def test_r2_pools_trailing_dimensions_of_sensitivities():
    rng = np.random.default_rng(1)
    steps = rng.normal(size=(4, 3, 2, 5))
    layers = rng.normal(size=(4, 2, 2, 5))
    expected_r2, _ = _loop_r2_mse(layers.reshape(4, 2, 10), steps.reshape(4, 3, 10))
    np.testing.assert_allclose(r2_matrix(layers, steps), expected_r2, rtol=1e-10)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 3), (6, 6)])
def test_monotone_alignment_matches_brute_force_over_all_monotone_paths(shape):
    rng = np.random.default_rng(sum(shape))
    cost = rng.random(shape)
    n_rows, n_steps = shape
    best = min(
        itertools.combinations_with_replacement(range(n_steps), n_rows),
        key=lambda path: sum(cost[row, step] for row, step in enumerate(path)),
    )
    steps, total = monotone_alignment(cost)
    assert np.all(np.diff(steps) >= 0)
    np.testing.assert_allclose(total, sum(cost[row, step] for row, step in enumerate(best)))
    np.testing.assert_array_equal(steps, best)


def test_monotone_alignment_batches_over_leading_dimensions():
    cost = np.random.default_rng(3).random((4, 5, 6))
    steps, total = monotone_alignment(cost)
    for index in range(4):
        single_steps, single_total = monotone_alignment(cost[index])
        np.testing.assert_array_equal(steps[index], single_steps)
        assert total[index] == single_total


def test_monotone_alignment_can_differ_from_per_layer_argmin():
    cost = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # per-row argmin [1, 0, 2] is not monotone
    steps, total = monotone_alignment(cost)
    # optimal monotone paths (cost 1): (0, 0, 2), (1, 1, 2), (1, 2, 2); ties go to the earliest step
    assert steps.tolist() == [0, 0, 2] and total == 1.0


def test_monotone_alignment_breaks_ties_toward_earlier_steps_from_the_last_layer_back():
    rng = np.random.default_rng(21)
    for _ in range(200):
        cost = rng.integers(0, 3, size=(3, 4)).astype(float)  # small integers: many tied optima
        expected = monotone_path(cost)  # earliest last step, then earliest before it, ...
        steps, total = monotone_alignment(cost)
        assert tuple(steps.tolist()) == expected and total == sum(cost[row, step] for row, step in enumerate(expected))


def test_path_score_is_pooled_r2_along_the_alignment():
    rng = np.random.default_rng(4)
    steps = rng.normal(size=(50, 6, 4)) * np.arange(6)[None, :, None]  # step 0 constant zero
    layers = steps[:, [0, 1, 3, 5]] + 0.1 * rng.normal(size=(50, 4, 4))
    krr = steps[:, -1]
    score = score_algorithm("toy", layers, steps, krr)
    np.testing.assert_array_equal(score.aligned_steps, [0, 1, 3, 5])
    path = score.aligned_steps
    error = sum(np.sum((layers[:, l] - steps[:, path[l]]) ** 2) for l in (1, 2, 3))
    variance = sum(np.sum((steps[:, path[l]] - steps[:, path[l]].mean()) ** 2) for l in (1, 2, 3))
    assert score.score == pytest.approx(1 - error / variance, rel=1e-10)
    assert np.isnan(score.aligned_r2[0])
    np.testing.assert_array_equal(score.scored, [1, 2, 3])


def test_path_score_is_minus_infinity_when_every_layer_sits_at_the_constant_start():
    rng = np.random.default_rng(5)
    steps = np.concatenate([np.zeros((20, 1, 3)), 10.0 + rng.normal(size=(20, 3, 3))], axis=1)
    layers = 0.01 * rng.normal(size=(20, 3, 3))
    score = score_algorithm("toy", layers, steps, steps[:, -1])
    assert score.aligned_steps.tolist() == [0, 0, 0]
    assert score.score == -np.inf


def test_log_error_profile_and_profile_distance_match_direct_formulas():
    rng = np.random.default_rng(6)
    values, reference = rng.normal(size=(8, 3, 4)), rng.normal(size=(8, 4))
    expected = [np.log10(np.mean((values[:, k] - reference) ** 2)) for k in range(3)]
    np.testing.assert_allclose(log_error_profile(values, reference), expected, rtol=1e-12)
    distance = profile_distance([0.0, -1.0, -2.0], [0.5, 0.0, -1.5, -3.0], [0, 2, 3])
    assert distance == pytest.approx(np.sqrt((0.25 + 0.25 + 1.0) / 3))


def test_bootstrap_weights_are_seeded_resamples_of_all_prompts():
    weights = bootstrap_weights(12, 40, seed=3)
    assert weights.shape == (40, 12)
    np.testing.assert_array_equal(weights.sum(1), np.full(40, 12))
    np.testing.assert_array_equal(weights, bootstrap_weights(12, 40, seed=3))
    assert not np.array_equal(weights, bootstrap_weights(12, 40, seed=4))


def test_bootstrap_counts_follow_the_multinomial_of_resampling_with_replacement():
    # each prompt's count over resamples is Binomial(B, 1/B); two prompts' counts covary by -1/B
    weights = bootstrap_weights(5, 40000, seed=0)
    frequencies = np.bincount(weights[:, 0].astype(int), minlength=6) / len(weights)
    np.testing.assert_allclose(frequencies, scipy.stats.binom.pmf(np.arange(6), 5, 0.2), atol=0.01)
    assert np.cov(weights[:, 0], weights[:, 1])[0, 1] == pytest.approx(-0.2, abs=0.02)


def test_bootstrap_interval_covers_the_population_r2_about_95_percent_of_the_time():
    # step values s ~ N(0, 1), layer = s + e with e ~ N(0, 0.5^2): population R2 = 1 - 0.25.
    rng = np.random.default_rng(7)
    covered, trials = 0, 150
    for trial in range(trials):
        signal = rng.normal(size=(80, 1, 1))
        steps = np.concatenate([np.zeros_like(signal), signal], axis=1)
        layers = np.concatenate([np.zeros_like(signal), signal + 0.5 * rng.normal(size=signal.shape)], axis=1)
        score = score_algorithm("toy", layers, steps, signal[:, 0], resamples=bootstrap_weights(80, 300, seed=trial))
        low, high = score.score_ci
        covered += low <= 0.75 <= high
    assert 0.88 <= covered / trials <= 0.995


def test_percentile_interval_is_the_order_statistics_and_ignores_nan():
    samples = np.r_[np.random.default_rng(8).normal(size=1000), np.nan]
    ordered = np.sort(samples[:-1])
    assert percentile_interval(samples, 0.9) == (ordered[49], ordered[949])  # ceil(0.05 * 1000) = 50th
    assert percentile_interval(np.r_[np.full(9, -np.inf), np.arange(91.0)], 0.8)[0] == 0.0  # 10th of 100
    assert np.isnan(percentile_interval([np.nan])[0])


def test_percentile_intervals_take_each_columns_order_statistics_without_its_nans():
    rng = np.random.default_rng(13)
    samples = rng.normal(size=(200, 3, 2))
    samples[rng.random(samples.shape) < 0.1] = np.nan
    samples[:, 2, 1] = np.nan  # a column with nothing left
    samples[:7, 0, 0] = -np.inf
    bounds = percentile_intervals(samples, 0.9)
    assert bounds.shape == (3, 2, 2)
    for i, j in itertools.product(range(3), range(2)):
        kept = np.sort(samples[:, i, j][~np.isnan(samples[:, i, j])])
        if kept.size == 0:
            assert np.isnan(bounds[i, j]).all()
            continue
        rank = lambda q: int(np.ceil(q * kept.size - 1e-9)) - 1  # noqa: E731  the ceil(q k)-th smallest
        assert tuple(bounds[i, j]) == (kept[rank(0.05)], kept[rank(0.95)])


def test_side_by_side_scores_of_algorithms_with_different_step_counts_match_brute_force_resamples():
    # every bootstrap replicate recomputed from the resampled prompts themselves: repeated prompts,
    # pooled sums, the best monotone path by enumeration, path R2 over the scored rows
    rng = np.random.default_rng(14)
    n_prompts, n_query = 12, 3
    long = rng.normal(size=(n_prompts, 6, n_query))
    long[:, 0] = 0.0
    trajectories = {"short": long[:, [0, 1, 3, 5]] + 0.2 * rng.normal(size=(n_prompts, 4, n_query)), "long": long}
    trajectories["short"][:, 0] = 0.0
    layers = long[:, [0, 3, 5]] + 0.3 * rng.normal(size=(n_prompts, 3, n_query))
    scores = score_algorithms(layers, trajectories, layers[:, -1], bootstrap=6, seed=3)
    counts = bootstrap_weights(n_prompts, 6, seed=3).astype(int)
    for name, steps in trajectories.items():
        for replicate, count in enumerate(counts):
            layer_rows, step_rows = np.repeat(layers, count, axis=0), np.repeat(steps, count, axis=0)
            mse = ((layer_rows[:, :, None] - step_rows[:, None]) ** 2).mean(axis=(0, 3))  # [L', T+1]
            path = min(
                itertools.combinations_with_replacement(range(steps.shape[1]), 3),
                key=lambda path: sum(mse[row, step] for row, step in enumerate(path)),
            )
            error = sum(((layer_rows[:, row] - step_rows[:, step]) ** 2).sum() for row, step in enumerate(path) if row > 0)
            variance = sum(((step_rows[:, step] - step_rows[:, step].mean()) ** 2).sum() for step in path[1:])
            assert path[1] > 0 and scores[name].score_samples[replicate] == pytest.approx(1 - error / variance, rel=1e-10)
    assert list(scores) == ["short", "long"]
    assert scores["short"].r2.shape == (3, 4) and scores["long"].r2.shape == (3, 6)


def test_kappa_strata_follow_numpy_quantiles():
    kappa = np.random.default_rng(9).lognormal(mean=3.0, sigma=1.0, size=301)
    index, edges = kappa_strata(kappa, 4)
    np.testing.assert_allclose(edges, np.percentile(kappa, [0, 25, 50, 75, 100]))
    for bin_id in range(4):
        members = kappa[index == bin_id]
        last = bin_id == 3  # half-open bins, the last one closed
        assert np.all(members >= edges[bin_id]) and np.all(members <= edges[bin_id + 1] if last else members < edges[bin_id + 1])
        assert abs(members.size - 301 / 4) <= 2


def test_a_condition_number_on_an_inner_edge_opens_the_next_bin():
    kappa = np.arange(1.0, 10.0)  # 2 bins: edges 1, 5, 9
    index, edges = kappa_strata(kappa, 2)
    np.testing.assert_array_equal(edges, [1.0, 5.0, 9.0])
    np.testing.assert_array_equal(index, [0, 0, 0, 0, 1, 1, 1, 1, 1])


def test_tied_condition_numbers_leave_empty_bins_out_and_weights_are_floored_at_log10_of_1_1():
    rng = np.random.default_rng(15)
    steps = rng.normal(size=(40, 3, 2))
    steps[:, 0] = 0
    layers = steps + 0.3 * rng.normal(size=steps.shape)
    tied = score_algorithm("toy", layers, steps, steps[:, -1], kappa=np.full(40, 3.0), n_kappa_bins=3)
    assert [(s.n_prompts, s.kappa_low, s.kappa_high) for s in tied.strata] == [(40, 3.0, 3.0)]  # two empty bins dropped
    assert tied.strata[0].score == pytest.approx(tied.score, rel=1e-12)
    near_one = np.linspace(1.0, 1.05, 40)  # log10 of every median < log10(1.1): equal (floored) weights
    floored = score_algorithm("toy", layers, steps, steps[:, -1], kappa=near_one, n_kappa_bins=2)
    scores = [s.score for s in floored.strata]
    assert scores[0] != pytest.approx(scores[1], rel=1e-3)
    assert floored.weighted_r2 == pytest.approx(np.mean(scores), rel=1e-12)


def test_strata_are_scored_at_the_all_prompt_alignment_not_their_own():
    rng = np.random.default_rng(16)
    steps = rng.normal(size=(60, 3, 2))
    steps[:, 0] = 0
    kappa = np.exp(rng.uniform(0, 6, size=60))
    high = kappa > np.median(kappa)
    steps[~high] *= 3.0  # the well-conditioned half dominates the all-prompt sums
    layers = steps.copy()
    layers[high, 1] = steps[high, 2]  # on its own the ill-conditioned half would align layer 1 with step 2
    score = score_algorithm("toy", layers, steps, steps[:, -1], kappa=kappa, n_kappa_bins=2)
    np.testing.assert_array_equal(score.aligned_steps, [0, 1, 2])
    error = np.sum((layers[high, 1] - steps[high, 1]) ** 2)  # layer 2 matches step 2 exactly
    variance = sum(np.sum((steps[high, t] - steps[high, t].mean()) ** 2) for t in (1, 2))
    assert score.strata[1].score == pytest.approx(1 - error / variance, rel=1e-10)
    assert score.strata[1].score < 1.0 - 1e-3


def test_strata_scores_and_weighted_r2_match_direct_computation():
    rng = np.random.default_rng(10)
    steps = rng.normal(size=(60, 3, 2))
    steps[:, 0] = 0
    kappa = np.exp(rng.uniform(0, 6, size=60))
    noise = (0.05 + 0.5 * (kappa > np.median(kappa)))[:, None, None]  # ill-conditioned prompts fit worse
    layers = steps[:, [0, 1, 2]] + noise * rng.normal(size=(60, 3, 2))
    score = score_algorithm("toy", layers, steps, steps[:, -1], kappa=kappa, n_kappa_bins=2)
    assert [s.n_prompts for s in score.strata] == [30, 30]
    expected, weights = [], []
    for stratum, members in zip(score.strata, (kappa <= np.median(kappa), kappa > np.median(kappa))):
        error = sum(np.sum((layers[members, l] - steps[members, l]) ** 2) for l in (1, 2))
        variance = sum(np.sum((steps[members, l] - steps[members, l].mean()) ** 2) for l in (1, 2))
        assert stratum.score == pytest.approx(1 - error / variance, rel=1e-10)
        assert stratum.median_kappa == pytest.approx(np.median(kappa[members]))
        expected.append(1 - error / variance)
        weights.append(max(np.log10(np.median(kappa[members])), np.log10(1.1)))
    assert score.strata[0].score > score.strata[1].score
    assert score.weighted_r2 == pytest.approx(np.average(expected, weights=weights), rel=1e-10)


def test_score_algorithms_pairs_bootstrap_resamples_across_algorithms():
    rng = np.random.default_rng(11)
    steps_a = rng.normal(size=(30, 4, 3))
    steps_b = steps_a + 0.2 * rng.normal(size=steps_a.shape)
    layers = steps_a + 0.05 * rng.normal(size=steps_a.shape)
    scores = score_algorithms(layers, {"a": steps_a, "b": steps_b}, steps_a[:, -1], bootstrap=200, seed=1)
    gaps = scores["a"].score_samples - scores["b"].score_samples
    assert scores["a"].score > scores["b"].score
    assert np.all(gaps > 0)  # paired: a beats b on every resample, not only on average


def test_paired_resamples_shrink_the_variance_of_score_differences():
    # two equally good algorithms: on shared resamples their scores move together, so the gap's
    # spread is far below that of scores drawn on independent resamples (var a + var b)
    rng = np.random.default_rng(13)
    truth = rng.normal(size=(40, 4, 3)) * rng.uniform(0.5, 2.0, size=(40, 1, 1))
    layers = truth + 0.3 * rng.normal(size=truth.shape)
    steps = {name: truth + 0.3 * rng.normal(size=truth.shape) for name in ("a", "b")}
    paired = score_algorithms(layers, steps, truth[:, -1], bootstrap=400, seed=1)
    alone_b = score_algorithms(layers, {"b": steps["b"]}, truth[:, -1], bootstrap=400, seed=2)["b"]
    paired_spread = np.var(paired["a"].score_samples - paired["b"].score_samples)
    unpaired_spread = np.var(paired["a"].score_samples - alone_b.score_samples)
    assert paired_spread < 0.5 * unpaired_spread


def test_score_interval_is_the_percentile_interval_of_the_resampled_scores_at_the_level_asked():
    rng = np.random.default_rng(14)
    steps = rng.normal(size=(30, 4, 3))
    layers = steps + 0.3 * rng.normal(size=steps.shape)
    for level, bootstrap in ((0.95, 300), (0.95, 1000), (0.8, 300)):
        score = score_algorithms(layers, {"a": steps}, steps[:, -1], bootstrap=bootstrap, seed=0, level=level)["a"]
        samples = np.sort(score.score_samples)
        tail = (1 - Fraction(str(level))) / 2  # exact: ceil(q R) is the 25th of 1000 at 0.95, not the 26th
        low, high = (samples[math.ceil(q * len(samples)) - 1] for q in (tail, 1 - tail))
        assert score.score_ci == (low, high)


def test_sensitivity_scores_use_the_prediction_alignment():
    rng = np.random.default_rng(12)
    steps = rng.normal(size=(10, 4, 2))
    layers = steps[:, [0, 2, 3]]
    step_sens = rng.normal(size=(10, 4, 2, 5))
    layer_sens = step_sens[:, [0, 2, 3]] + 0.1 * rng.normal(size=(10, 3, 2, 5))
    score = score_algorithm(
        "toy", layers, steps, steps[:, -1], layer_sensitivity=layer_sens, step_sensitivity=step_sens
    )
    expected_r2, _ = _loop_r2_mse(layer_sens.reshape(10, 3, 10), step_sens.reshape(10, 4, 10))
    np.testing.assert_allclose(score.sensitivity_r2, expected_r2, rtol=1e-10)
    np.testing.assert_allclose(score.sensitivity_aligned_r2, expected_r2[[0, 1, 2], [0, 2, 3]], rtol=1e-10)


def test_bad_inputs_raise_one_line_value_errors():
    with pytest.raises(ValueError, match="share the batch"):
        r2_matrix(np.zeros((3, 2, 4)), np.zeros((3, 2, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        r2_matrix(np.full((3, 2, 4), np.nan), np.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match="after the embedding"):
        score_algorithm("toy", np.zeros((3, 1, 2)), np.ones((3, 2, 2)), np.ones((3, 2)), layers=[0])
    with pytest.raises(ValueError, match="at least one algorithm"):
        score_algorithms(np.zeros((3, 2, 2)), {}, np.zeros((3, 2)))


def test_every_algorithm_score_field_against_a_numpy_recomputation():
    rng = np.random.default_rng(17)
    steps = rng.normal(size=(20, 5, 2)) * np.linspace(0.0, 1.0, 5)[None, :, None]  # step 0 is 0
    layers = steps[:, [0, 1, 3, 4]] + 0.3 * rng.normal(size=(20, 4, 2))
    krr = steps[:, -1] + 0.01 * rng.normal(size=(20, 2))
    step_sens, noise = rng.normal(size=(20, 5, 2, 3)), rng.normal(size=(20, 4, 2, 3))
    layer_sens = step_sens[:, [0, 1, 3, 4]] + 0.5 * noise
    layer_sens[:, 0] = 100.0 * noise[:, 0]  # layer 0 is never scored: a huge error there must not count
    weights = bootstrap_weights(20, 60, seed=5)
    score = score_algorithm("toy", layers, steps, krr, resamples=weights, layer_sensitivity=layer_sens, step_sensitivity=step_sens)

    sse, sst, count = pooled_sums(layers, steps)
    aligned = monotone_path(sse / count)
    np.testing.assert_array_equal(score.aligned_steps, aligned)
    np.testing.assert_array_equal(score.argmin_steps, np.argmin(sse, axis=1))
    model_profile = np.log10([np.mean((layers[:, l] - krr) ** 2) for l in range(4)])
    algorithm_profile = np.log10([np.mean((steps[:, t] - krr) ** 2) for t in range(5)])
    np.testing.assert_allclose(score.model_profile, model_profile, rtol=1e-12)
    np.testing.assert_allclose(score.algorithm_profile, algorithm_profile, rtol=1e-12)
    gaps = model_profile[:, None] - algorithm_profile[None, :]
    assert score.profile_distance == pytest.approx(np.sqrt(np.mean(gaps[range(1, 4), aligned[1:]] ** 2)), rel=1e-12)  # scored rows
    profile_path = monotone_path(gaps**2)
    np.testing.assert_array_equal(score.profile_steps, profile_path)
    assert score.profile_aligned_distance == pytest.approx(np.sqrt(np.mean(gaps[range(1, 4), profile_path[1:]] ** 2)), rel=1e-12)

    sens_sse, sens_sst, _ = pooled_sums(layer_sens.reshape(20, 4, -1), step_sens.reshape(20, 5, -1))
    scored = [(row, aligned[row]) for row in (1, 2, 3)]
    expected = 1 - sum(sens_sse[row, t] for row, t in scored) / sum(sens_sst[t] for _, t in scored)
    assert score.sensitivity_score == pytest.approx(expected, rel=1e-10)

    per_resample = []  # each resample: prompts repeated by their counts, aligned on their own, per-layer R2
    for w in weights:
        index = np.repeat(np.arange(20), w.astype(int))
        r_sse, r_sst, r_count = pooled_sums(layers[index], steps[index])
        path = monotone_path(r_sse / r_count)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_resample.append([1 - r_sse[row, t] / r_sst[t] if r_sst[t] > 0 else np.nan for row, t in enumerate(path)])
    per_resample = np.array(per_resample)
    for row in range(1, 4):
        np.testing.assert_allclose(score.aligned_r2_ci[row], percentile_interval(per_resample[:, row]), rtol=1e-9)
