"""Mutation review of session 22's changes (29ffd55..e0bdc52 in mi_krr/ and probes/): the
power-of-two rescaled `mi_krr.solvers.system.residual_norm` and its uses (Richardson, heavy ball,
Chebyshev, KRRSystem.residual_norms); probes/scoring.py's `common_scale`, `log10_mean_square`,
`log_error_profile`'s floor, the rescaling in `_score_side_by_side` (mse times scale**2),
`held_path_r2` / `_path_ratio`, AlgorithmScore.held_score / held_samples; step_sizes.path_scores'
rescaling; probes/identifiability.py's new verdict conditions (the no-iteration rival:
iteration_gap, iteration_gap_ci, moves; no separable runner-up rules nothing out) and messages.

Counts: 32 mutants planted one at a time in a copy of the repository, 21 killed by the existing
tests, 11 survived and are killed by the tests below, 0 equivalent. Survivors: residual_norm's
scale taken from the largest signed entry (no abs); common_scale from max(a) only (not -min(a));
_score_side_by_side's scale from the layers only; held_path_r2 holding rows[0], or the last layer
overall instead of the last of `rows`; log10_mean_square's scale from max(values) (no abs); the
verdict's min_gap dropped from the no-iteration condition, `>=` made `>`, its interval's `> 0`
made `>= 0`; the "not moving" and "no rival ruled out" message branches swapped; the message
quoting the best's path R2 as the rival's. (The existing rival test, layers at steps 0, 1, 1, 2, 2,
cannot tell rows[0] from rows[-1]: SSE(step 1 vs 2) = SSE(step 2 vs 1).)

References are independent of the code under test: math.hypot (overflow-safe) for the norm; a
brute-force loop for held_path_r2; NumPy pooled SSE/SST for the held score and for zero layers;
the same scoring at scale 1 (R2 and alignment are scale-free; the values are <= 0, or the layers
all 0, so the scale must come from magnitudes of every array); a closed form log10 mean(v^2) =
log10 mean((v/c)^2) + 2 log10 c; NumPy's inverted-CDF quantile for the paired interval; and the
documented rule ("paired interval of the gap above 0, gap >= min_gap"; condition b before c) and
the message text. No real bug found.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mi_krr.solvers.system import residual_norm
from probes.identifiability import identifiability_verdict
from probes.scoring import held_path_r2, log10_mean_square, score_algorithms
from probes.step_sizes import path_score

# ---------------------------------------------------------------- residual_norm


def test_residual_norm_scales_by_the_largest_magnitude_not_the_largest_signed_entry():
    """Vectors whose largest |entry| is negative and far from their largest signed entry: the norm
    is Python's overflow-safe math.hypot of the entries."""
    rows = [[-1e170, 3e-5, 2.0], [-1e-170, 2e-200, -3e-171], [-4.0, -3.0, 0.0]]
    got = residual_norm(torch.tensor(rows, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, [math.hypot(*row) for row in rows], rtol=1e-14)


# ---------------------------------------------------------------- held_path_r2


def test_held_path_r2_holds_the_last_of_the_given_rows_by_brute_force():
    """The rival's error at every row r of `rows` is SSE(last of rows, step of r); the variance
    SST(step of r); brute force over replicates, rows that do not end at the last layer."""
    rng = np.random.default_rng(0)
    R, L, T = 3, 5, 6
    sse, sst = rng.uniform(0.1, 2.0, (R, L, T)), rng.uniform(1.0, 3.0, (R, T))
    steps = np.sort(rng.integers(0, T, (R, L)), axis=1)
    for rows in ([1, 2], [0, 2, 3], [1, 2, 3, 4], [4]):
        expected = [1 - sum(sse[w, rows[-1], steps[w, r]] for r in rows) / sum(sst[w, steps[w, r]] for r in rows) for w in range(R)]
        np.testing.assert_allclose(held_path_r2(sse, sst, steps, np.array(rows)), expected, rtol=1e-13)


def _pooled(a, b):
    return ((a - b) ** 2).sum(), ((b - b.mean()) ** 2).sum()


def test_the_held_score_holds_the_last_layer_not_the_first_scored_one():
    """Layers exactly at steps 0..4 of a trajectory: the rival holds layer 4 (step 4) along steps
    1..4, 1 - sum_t SSE(step 4 vs t) / sum_t SST(t) by NumPy (holding layer 1 instead gives
    another number: the SSEs are not symmetric across the four steps)."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal((30, 3))
    steps = {"a": np.stack([(1 - 0.6**t) * target + 0.01 * t**2 * rng.standard_normal((30, 3)) for t in range(7)], 1)}
    scores = score_algorithms(steps["a"][:, :5], steps, target, bootstrap=20, seed=0)
    np.testing.assert_array_equal(scores["a"].aligned_steps, [0, 1, 2, 3, 4])
    error = sum(_pooled(steps["a"][:, 4], steps["a"][:, t])[0] for t in range(1, 5))
    variance = sum(_pooled(steps["a"][:, t], steps["a"][:, t])[1] for t in range(1, 5))
    assert scores["a"].held_score == pytest.approx(1 - error / variance, abs=1e-12)
    first = sum(_pooled(steps["a"][:, 1], steps["a"][:, t])[0] for t in range(1, 5))
    assert abs(first - error) > 1e-3 * error  # the test tells the two apart


# ---------------------------------------------------------------- common_scale at the call sites


def _negative_problem(batch=24, m=3, n_steps=5, seed=3):
    """Trajectories and layers whose every value is <= 0 (step 0 is exactly 0)."""
    rng = np.random.default_rng(seed)
    target = -rng.uniform(0.5, 2.0, (batch, m))
    steps = np.stack([(1 - 0.5**t) * target for t in range(n_steps + 1)], 1)
    layers = steps[:, :5] * rng.uniform(1.0, 1.1, (batch, 5, m))
    return layers, {"a": steps, "b": steps**2 * np.sign(steps)}, target


@pytest.mark.parametrize("scale", [1e-170, 1e-250])
def test_scores_of_non_positive_predictions_ignore_a_tiny_common_scale(scale):
    """All values <= 0: the scale must come from their magnitudes. Path R2, held score and
    alignment unchanged, the MSE times scale^2 (NumPy reference: the unscaled run)."""
    layers, steps, krr = _negative_problem()
    base = score_algorithms(layers, steps, krr, bootstrap=20, seed=0)
    moved = score_algorithms(scale * layers, {k: scale * v for k, v in steps.items()}, scale * krr, bootstrap=20, seed=0)
    for name in steps:
        assert np.isfinite(base[name].score)
        assert moved[name].score == pytest.approx(base[name].score, abs=1e-12)
        assert moved[name].held_score == pytest.approx(base[name].held_score, abs=1e-12)
        np.testing.assert_array_equal(moved[name].aligned_steps, base[name].aligned_steps)
    layers_score = path_score(scale * layers, scale * steps["a"], np.arange(1, 5))
    assert layers_score == pytest.approx(path_score(layers, steps["a"], np.arange(1, 5)), abs=1e-12)


def test_zero_layers_against_tiny_steps_score_by_the_steps_scale():
    """Layers all 0 (their largest |value| says nothing of the scale), steps ~1e-170 with a
    non-zero step 0: every layer aligns with the smallest step; path R2 1 - sum S^2 / SST of that
    step by NumPy, as at scale 1."""
    rng = np.random.default_rng(4)
    target = rng.standard_normal((20, 3))
    steps = np.stack([(1 - 0.5 ** (t + 1)) * target for t in range(5)], 1)
    zeros = np.zeros((20, 4, 3))
    sse, sst = _pooled(np.zeros_like(target), steps[:, 0])
    expected = 1 - sse / sst
    for scale in (1.0, 1e-170):
        scores = score_algorithms(zeros, {"a": scale * steps}, scale * target, bootstrap=20, seed=0)
        np.testing.assert_array_equal(scores["a"].aligned_steps, 0)
        assert scores["a"].score == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- the verdict's no-iteration condition


def _two_candidates(held_state: int | None = None):
    """Two separable trajectories a (geometric) and b (its squares, signed), 30 prompts, 120
    resamples; layers a's steps 0..4, or a's step `held_state` at every scored layer."""
    rng = np.random.default_rng(5)
    target = rng.standard_normal((30, 3))
    a = np.stack([(1 - 0.5**t) * target for t in range(7)], 1)
    preds = {"a": a, "b": a**2 * np.sign(a)}
    layers = a[:, :5] if held_state is None else a[:, [0] + [held_state] * 4]
    return preds, target, score_algorithms(layers, preds, target, bootstrap=120, seed=0)


def _set(score, value, held, noise):
    """A score of `value` whose replicates spread by `noise`, and a rival `held` paired with them
    (every replicate's gap is value - held up to rounding)."""
    samples = value + noise
    return dataclasses.replace(score, score=value, score_ci=(value - 0.05, value + 0.05), score_samples=samples,
                               held_score=held, held_samples=samples - (value - held))


@pytest.mark.parametrize("held, moves", [(0.5, True), (0.55, False), (0.74, False)])
def test_the_layers_move_only_with_an_iteration_gap_of_at_least_min_gap(held, moves):
    """score 0.75, runner-up b at 0.25 (beaten), min_gap 0.25: the no-iteration gap 0.75 - held
    must be >= 0.25 (exactly 0.25 counts, as documented: "gap >= min_gap"), its interval above 0
    in every case here; otherwise the message gives the rival's path R2 and the gap."""
    preds, _, scores = _two_candidates()
    noise = 0.001 * np.random.default_rng(6).standard_normal(scores["a"].score_samples.shape)
    edited = {"a": _set(scores["a"], 0.75, held, noise), "b": _set(scores["b"], 0.25, -1.0, noise)}
    verdict = identifiability_verdict(edited, preds, min_score=0.5, min_gap=0.25)
    assert verdict.runner_up == "b" and verdict.gap_ci[0] > 0.25
    assert verdict.iteration_gap == 0.75 - held and verdict.iteration_gap_ci[0] > 0
    assert verdict.identified == moves, verdict.message
    if not moves:
        assert "the layers do not move along a's trajectory" in verdict.message
        assert f"(path R2 {held:.4f}; gap {0.75 - held:+.4f}" in verdict.message


def test_held_layers_with_only_inseparable_candidates_say_the_layers_do_not_move():
    """Layers all at a's step 3, the only other candidate a copy of a: both conditions fail; the
    message gives the first failed one in the documented order (b. the layers must move)."""
    preds, target, _ = _two_candidates()
    copies = {"a": preds["a"], "a_again": preds["a"].copy()}
    scores = score_algorithms(preds["a"][:, [0, 3, 3, 3, 3]], copies, target, bootstrap=120, seed=0)
    verdict = identifiability_verdict(scores, copies)
    assert verdict.runner_up is None and verdict.iteration_gap == 0 and not verdict.identified
    assert "the layers do not move along a's trajectory: every scored layer aligns with step 3 of a" in verdict.message
    assert "no rival was ruled out" not in verdict.message


def test_an_iteration_gap_interval_reaching_0_does_not_show_iteration():
    """Estimate 0.25 >= min_gap, but a tenth of the paired replicates show no gap: the interval's
    lower bound is 0 (NumPy's inverted-CDF 2.5% quantile of the differences), not above it."""
    preds, _, scores = _two_candidates()
    noise = 0.001 * np.random.default_rng(7).standard_normal(scores["a"].score_samples.shape)
    top = _set(scores["a"], 0.75, 0.5, noise)
    differences = np.where(np.arange(noise.size) % 10 == 0, 0.0, 0.3)
    top = dataclasses.replace(top, held_samples=top.score_samples - differences)
    verdict = identifiability_verdict({"a": top, "b": _set(scores["b"], 0.25, -1.0, noise)}, preds, min_score=0.5, min_gap=0.25)
    expected = np.quantile(top.score_samples - top.held_samples, [0.025, 0.975], method="inverted_cdf")
    np.testing.assert_allclose(verdict.iteration_gap_ci, expected, rtol=1e-12)
    assert verdict.iteration_gap_ci[0] == 0 and verdict.iteration_gap == 0.25 and verdict.gap_ci[0] > 0.25
    assert not verdict.identified and "the layers do not move along a's trajectory" in verdict.message


# ---------------------------------------------------------------- log10_mean_square


@pytest.mark.parametrize("values", [[-1e-170, -2e-170, 0.0], [-1e170, 1e-10, 3e169], [-3e-200, -1e-200, -2e-200]])
def test_log10_mean_square_scales_by_the_largest_magnitude(values):
    """log10 mean(v^2) by closed form: the values are c * u for a power of ten c, so log10 of
    mean(u^2) + 2 log10 c (no square of a tiny or huge value taken)."""
    v = np.array(values)
    c = 10.0 ** np.floor(np.log10(np.max(np.abs(v))))
    expected = np.log10(np.mean((v / c) ** 2)) + 2 * np.log10(c)
    assert float(log10_mean_square(v)) == pytest.approx(expected, abs=1e-12)
    rows = np.stack([v, 2 * v])  # per-row along axis 1: log10(4) apart
    np.testing.assert_allclose(log10_mean_square(rows, axis=1), [expected, expected + np.log10(4)], atol=1e-12)
