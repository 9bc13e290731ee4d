"""The identifiability verdict on synthetic models built from independently computed solver
trajectories (NumPy CG and gradient descent on random kernel systems)."""

import dataclasses
import itertools

import numpy as np
import pytest

from probes.identifiability import MIN_VERDICT_PROMPTS, MIN_VERDICT_RESAMPLES, algorithm_agreement, identifiability_verdict
from probes.scoring import score_algorithms

BATCH, N, M, STEPS = 40, 12, 4, 8


def _systems(seed=0):
    """Random linear-kernel systems with uneven input norms: K [B, n, n], K_query [B, m, n], y [B, n]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, N + M, 5)) * rng.uniform(0.3, 2.0, size=(BATCH, N + M, 1))
    gram = x @ x.transpose(0, 2, 1)
    return gram[:, :N, :N], gram[:, N:, :N], rng.normal(size=(BATCH, N))


def _cg_preds(K, K_query, y, lam):
    """Textbook CG from alpha = 0, predictions per step [B, T+1, m]."""
    preds = np.zeros((BATCH, STEPS + 1, M))
    for b in range(BATCH):
        A = K[b] + lam * np.eye(N)
        alpha, r = np.zeros(N), y[b].copy()
        p = r.copy()
        for t in range(1, STEPS + 1):
            step = (r @ r) / (p @ A @ p)
            alpha = alpha + step * p
            r_new = r - step * A @ p
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
            preds[b, t] = K_query[b] @ alpha
    return preds


def _gd_preds(K, K_query, y, lam):
    """Richardson / gradient descent with step 1 / lambda_max, predictions per step [B, T+1, m]."""
    preds = np.zeros((BATCH, STEPS + 1, M))
    for b in range(BATCH):
        A = K[b] + lam * np.eye(N)
        step = 1.0 / np.linalg.eigvalsh(A)[-1]
        alpha = np.zeros(N)
        for t in range(1, STEPS + 1):
            alpha = alpha + step * (y[b] - A @ alpha)
            preds[b, t] = K_query[b] @ alpha
    return preds


@pytest.fixture(scope="module")
def trajectories():
    K, K_query, y = _systems()
    lam = 0.5
    krr = np.einsum("bmn,bn->bm", K_query, np.linalg.solve(K + lam * np.eye(N), y[..., None])[..., 0])
    return {"cg": _cg_preds(K, K_query, y, lam), "gd": _gd_preds(K, K_query, y, lam)}, krr


def _verdict(layers, preds, krr, **kwargs):
    scores = score_algorithms(layers, preds, krr, bootstrap=300, seed=0)
    return identifiability_verdict(scores, preds, **kwargs)


def test_model_that_runs_cg_is_identified_as_cg_over_gd(trajectories):
    preds, krr = trajectories
    rng = np.random.default_rng(1)
    layers = preds["cg"][:, [0, 1, 2, 3, 4]] + 1e-3 * rng.normal(size=(BATCH, 5, M))
    verdict = _verdict(layers, preds, krr)
    assert verdict.best == "cg" and verdict.runner_up == "gd"
    assert verdict.identified and verdict.score > 0.99
    assert verdict.gap_ci[0] > 0 and verdict.equivalent == []
    assert "identified as cg" in verdict.message


def test_model_matching_no_algorithm_is_not_identified(trajectories):
    preds, krr = trajectories
    layers = np.random.default_rng(2).normal(size=(BATCH, 5, M))
    verdict = _verdict(layers, preds, krr)
    assert not verdict.identified
    assert verdict.score < 0.9
    # layers unrelated to every trajectory sit closest to step 0 (prediction 0): that branch speaks
    assert "every scored layer aligns with step 0" in verdict.message


def test_model_only_partly_explained_by_the_best_algorithm_is_not_identified(trajectories):
    preds, krr = trajectories
    noise = preds["cg"].std() * np.random.default_rng(6).normal(size=(BATCH, 5, M))
    verdict = _verdict(preds["cg"][:, :5] + noise, preds, krr)
    assert verdict.best == "cg" and 0.0 < verdict.score < 0.9 and not verdict.identified
    assert "no algorithm explains the layers well enough (needs path R2 >= 0.9" in verdict.message


def test_model_equally_close_to_two_separable_algorithms_is_not_identified(trajectories):
    preds, krr = trajectories
    rng = np.random.default_rng(4)
    spread = preds["cg"].std()
    shifted = preds["cg"] + 0.2 * spread * rng.normal(size=preds["cg"].shape)
    shifted[:, 0] = 0.0
    pair = {"cg": preds["cg"], "cg_shifted": shifted}
    layers = 0.5 * (pair["cg"][:, :5] + pair["cg_shifted"][:, :5])
    verdict = _verdict(layers, pair, krr)
    assert verdict.separable.any(), "the two candidates must be separable for this test to mean anything"
    assert verdict.runner_up is not None and verdict.score > 0.9
    assert abs(verdict.gap) < 0.01
    assert not verdict.identified and "does not beat" in verdict.message


def test_identical_candidates_are_reported_inseparable_not_as_runner_up(trajectories):
    preds, krr = trajectories
    with_copy = {"cg": preds["cg"], "cg_again": preds["cg"].copy(), "gd": preds["gd"]}
    layers = preds["cg"][:, :5] + 1e-3 * np.random.default_rng(3).normal(size=(BATCH, 5, M))
    verdict = _verdict(layers, with_copy, krr)
    assert set(verdict.equivalent) | {verdict.best} == {"cg", "cg_again"}
    assert verdict.runner_up == "gd"
    assert verdict.identified
    assert "Inseparable" in verdict.message
    pair = [verdict.algorithms.index("cg"), verdict.algorithms.index("cg_again")]
    assert not verdict.separable[pair[0], pair[1]]
    assert verdict.agreement[pair[0], pair[1]] == pytest.approx(1.0)


def test_agreement_is_path_r2_under_the_best_monotone_alignment_found_by_brute_force(trajectories):
    preds, _ = trajectories
    small = {name: value[:, :5] for name, value in preds.items()}
    aligned = {"cg": np.array([1, 2, 3]), "gd": np.array([1, 3, 4])}
    names, agreement = algorithm_agreement(small, aligned)
    for i, j in itertools.permutations(range(2), 2):
        rows = small[names[i]][:, aligned[names[i]]]
        target = small[names[j]]

        def pooled(path):
            error = sum(np.sum((rows[:, r] - target[:, t]) ** 2) for r, t in enumerate(path))
            variance = sum(np.sum((target[:, t] - target[:, t].mean()) ** 2) for t in path)
            return error, variance

        best = min(itertools.combinations_with_replacement(range(5), 3), key=lambda path: pooled(path)[0])
        error, variance = pooled(best)
        expected = 1 - error / variance if variance > 0 else -np.inf  # a path of step-0 columns explains nothing
        assert agreement[i, j] == pytest.approx(expected, rel=1e-10)
    np.testing.assert_array_equal(np.diag(agreement), [1.0, 1.0])


def test_without_bootstrap_there_is_no_verdict(trajectories):
    preds, krr = trajectories
    scores = score_algorithms(preds["cg"][:, :4], preds, krr, bootstrap=0)
    verdict = identifiability_verdict(scores, preds)
    assert not verdict.identified and "bootstrap > 0" in verdict.message


def test_missing_trajectories_raise_a_clear_error(trajectories):
    preds, krr = trajectories
    scores = score_algorithms(preds["cg"][:, :4], preds, krr, bootstrap=10)
    with pytest.raises(ValueError, match="lacks the trajectories"):
        identifiability_verdict(scores, {"cg": preds["cg"]})


@pytest.mark.parametrize("prompts, resamples", [(MIN_VERDICT_PROMPTS - 1, 300), (BATCH, MIN_VERDICT_RESAMPLES - 1)])
def test_too_few_prompts_or_resamples_give_no_verdict_even_for_an_exact_match(trajectories, prompts, resamples):
    preds, krr = trajectories
    subset = {name: pred[:prompts] for name, pred in preds.items()}
    layers = subset["cg"][:, [0, 1, 2, 3, 4]]  # exactly CG: identified with enough prompts (test above)
    scores = score_algorithms(layers, subset, krr[:prompts], bootstrap=resamples, seed=0)
    verdict = identifiability_verdict(scores, subset)
    assert verdict.best == "cg" and verdict.score == pytest.approx(1.0)
    assert not verdict.identified
    assert f"{prompts} prompts and {resamples} resamples are too few" in verdict.message
    enough = score_algorithms(layers, subset, krr[:prompts], bootstrap=MIN_VERDICT_RESAMPLES, seed=0) if prompts == BATCH else None
    if enough is not None:  # the same prompts with the minimum number of resamples: identified
        assert identifiability_verdict(enough, subset).identified


def _exact_cg_scores(trajectories):
    """Scores of layers that are exactly CG's steps 0..4 (cg: path R2 1, gd: lower), 300 resamples."""
    preds, krr = trajectories
    return preds, score_algorithms(preds["cg"][:, :5], preds, krr, bootstrap=300, seed=0)


def test_identification_needs_the_interval_lower_bound_not_the_estimate_above_min_score(trajectories):
    preds, scores = _exact_cg_scores(trajectories)
    below = {**scores, "cg": dataclasses.replace(scores["cg"], score=0.95, score_ci=(0.89, 0.97))}
    verdict = identifiability_verdict(below, preds, min_score=0.9)
    assert verdict.best == "cg" and verdict.score > 0.9 and not verdict.identified
    assert "no algorithm explains the layers well enough" in verdict.message
    above = {**scores, "cg": dataclasses.replace(scores["cg"], score=0.95, score_ci=(0.91, 0.97))}
    assert identifiability_verdict(above, preds, min_score=0.9).identified


@pytest.mark.parametrize("spread, identified", [(0.05, False), (0.002, True)])
def test_identification_needs_the_paired_gap_interval_above_zero_not_just_a_gap_of_min_gap(trajectories, spread, identified):
    preds, scores = _exact_cg_scores(trajectories)
    runner = scores["gd"].score_samples
    differences = 0.02 + spread * np.random.default_rng(5).standard_normal(runner.shape)
    top = dataclasses.replace(scores["cg"], score=scores["gd"].score + 0.02, score_ci=(0.95, 0.99), score_samples=runner + differences,
                              held_score=scores["gd"].score - 1.0, held_samples=runner - 1.0)  # the layers move: only the runner-up is in question
    verdict = identifiability_verdict({**scores, "cg": top}, preds, min_score=0.9, min_gap=0.01)
    expected_ci = np.quantile(differences, [0.025, 0.975], method="inverted_cdf")  # NumPy's percentile interval
    np.testing.assert_allclose(verdict.gap_ci, expected_ci, rtol=1e-12)
    assert verdict.gap == pytest.approx(0.02) and verdict.runner_up == "gd"
    assert (verdict.gap_ci[0] > 0) == identified and verdict.identified == identified
    assert identified or "does not beat gd beyond the interval" in verdict.message


def test_without_a_separable_runner_up_nothing_was_ruled_out_and_nothing_is_identified(trajectories):
    preds, krr = trajectories
    copies = {"cg": preds["cg"], "cg_again": preds["cg"].copy()}
    scores = score_algorithms(preds["cg"][:, :5], copies, krr, bootstrap=300, seed=0)
    verdict = identifiability_verdict(scores, copies)
    assert verdict.runner_up is None and np.isnan(verdict.gap) and verdict.equivalent == ["cg_again"]
    assert verdict.score_ci[0] > 0.999 and verdict.iteration_gap_ci[0] > 0.01  # good enough, and the layers move
    assert not verdict.identified and "no rival was ruled out" in verdict.message


def _pooled_sse_sst(a, b):
    """NumPy: squared error of a against b pooled over prompts and queries, and b's sum of squares
    around its pooled mean."""
    return ((a - b) ** 2).sum(), ((b - b.mean()) ** 2).sum()


def test_the_no_iteration_rival_is_the_last_layer_held_along_the_same_aligned_steps(trajectories):
    """Layers exactly at CG steps 0, 1, 1, 2, 2: path R2 1; the rival holds layer 4 (step 2) at
    layers 1..4 along steps 1, 1, 2, 2: 1 - 2 SSE(2 vs 1) / (2 SST(1) + 2 SST(2)) by NumPy."""
    preds, krr = trajectories
    path = [0, 1, 1, 2, 2]
    scores = score_algorithms(preds["cg"][:, path], preds, krr, bootstrap=300, seed=0)
    np.testing.assert_array_equal(scores["cg"].aligned_steps, path)
    step_1, step_2 = preds["cg"][:, 1], preds["cg"][:, 2]
    sse_21, sst_1 = _pooled_sse_sst(step_2, step_1)
    sst_2 = _pooled_sse_sst(step_2, step_2)[1]
    held = 1 - 2 * sse_21 / (2 * sst_1 + 2 * sst_2)
    assert scores["cg"].held_score == pytest.approx(held, abs=1e-12)
    verdict = identifiability_verdict(scores, preds)
    assert verdict.iteration_gap == pytest.approx(1 - held, abs=1e-12) and verdict.iteration_gap_ci[0] > 0.01
    assert verdict.identified, verdict.message


def test_layers_that_all_hold_one_state_score_their_rival_exactly_and_are_not_identified(trajectories):
    """Every scored layer is CG's step 3: path R2 1 at steps 3, 3, 3, 3, the rival's too (gap 0)."""
    preds, krr = trajectories
    scores = score_algorithms(preds["cg"][:, [0, 3, 3, 3, 3]], preds, krr, bootstrap=300, seed=0)
    verdict = identifiability_verdict(scores, preds)
    assert verdict.best == "cg" and verdict.score_ci[0] > 0.999 and verdict.gap_ci[0] > 0  # good enough, beats gd
    assert verdict.iteration_gap == 0 and verdict.iteration_gap_ci == (0.0, 0.0)
    assert not verdict.identified
    assert "the layers do not move along cg's trajectory: every scored layer aligns with step 3 of cg" in verdict.message


def test_layers_at_zero_align_with_step_0_and_say_so(trajectories):
    preds, krr = trajectories
    zeros = np.zeros((BATCH, 5, M))
    verdict = _verdict(zeros, preds, krr)
    assert not verdict.identified and not np.isfinite(verdict.score)  # error 0 over variance 0 at step 0
    assert "every scored layer aligns with step 0" in verdict.message


def test_an_undefined_score_never_ranks_first(trajectories):
    preds, scores = _exact_cg_scores(trajectories)
    undefined = {**scores, "cg": dataclasses.replace(scores["cg"], score=float("nan"))}
    verdict = identifiability_verdict(undefined, preds)
    assert verdict.best == "gd" and verdict.runner_up == "cg"
