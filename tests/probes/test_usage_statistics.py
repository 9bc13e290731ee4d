"""Usage review: are the statistics right, as a careful researcher checks them before putting a
number in a paper? Every statistic `probes.diagnose` reports on a shipped model (per-layer R2 and
MSE, the monotone alignment, path R2, log-error profiles, kappa strata, bootstrap replicates and
percentile intervals, the summary text and the dataframe) recomputed from the stored layer and
step predictions with plain NumPy (pooled means, prompts resampled by index, alignments by
enumerating every non-decreasing map); the bootstrap interval's coverage by simulation with a known
truth; the verdict on positive controls with noise and on randomly initialised models.

The last section holds the review's findings, fixed: each test failed on the code before its fix."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

import probes
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.kernels import kernel_matrix
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS
from mi_krr.tasks import sampler_from_config
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import load_model, read_run_config
from probes.identifiability import algorithm_agreement, identifiability_verdict
from probes.scoring import score_algorithm, score_algorithms

# --------------------------------------------------------------------------------------------
# independent NumPy references


def monotone_maps(n_rows: int, n_steps: int) -> np.ndarray:
    """Every non-decreasing map of n_rows rows to steps 0..n_steps-1, `[P, n_rows]`."""
    return np.array(list(itertools.combinations_with_replacement(range(n_steps), n_rows)))


def pooled(layers: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSE `[L', T+1]` over prompts and queries, and SST `[T+1]` of each step about its mean over
    every prompt and query of `layers` `[B, L', m]`, `steps` `[B, T+1, m]`."""
    sse = ((layers[:, :, None] - steps[:, None]) ** 2).sum(axis=(0, 3))
    sst = ((steps - steps.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))
    return sse, sst


def brute_path(layers: np.ndarray, steps: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, float]:
    """The least-SSE non-decreasing map over every row (enumerated) and the path R2 of rows 1..
    (layer 0, the embedding, is not scored)."""
    sse, sst = pooled(layers, steps)
    path = maps[np.argmin(sse[np.arange(sse.shape[0]), maps].sum(1))]
    rows = np.arange(1, len(path))
    return path, 1.0 - sse[rows, path[rows]].sum() / sst[path[rows]].sum()


def order_statistic_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The ceil(q R)-th order statistics for q = (1 -/+ level) / 2 (rounded to the decimals of level)."""
    ordered, r = np.sort(samples), len(samples)
    tail = round((1 - level) / 2, 12)
    return ordered[math.ceil(tail * r - 1e-9) - 1], ordered[math.ceil((1 - tail) * r - 1e-9) - 1]


@pytest.fixture(scope="module")
def shipped_diagnosis():
    """softmax_gp on 24 GP prompts, 3 queries, 6 solver steps, 30 resamples (fitted steps for gd)."""
    torch.manual_seed(0)
    run = shipped_checkpoint("softmax_gp")
    model, sampler = load_model(run), sampler_from_config(read_run_config(run)["sampler"])
    task = sampler.sample(24, n_support=10, n_query=3, seed=4)
    diagnosis = probes.diagnose(model, task, algorithms=("cg", "gd"), kernels=(), n_steps=6, bootstrap=30, seed=3, progress=False)
    return diagnosis


# --------------------------------------------------------------------------------------------
# verified behaviour


def test_every_reported_number_of_a_shipped_model_diagnosis_equals_a_numpy_recomputation(shipped_diagnosis):
    """R2 / MSE matrices (pooled mean per step), argmin and monotone alignment (enumerated), path
    R2, profiles, kappa strata (np.quantile bins, each prompt in exactly one) and their log10-kappa
    weighted mean, bootstrap replicates (prompts resampled by index, seed 3: the documented
    default_rng draws) and the percentile interval, all from the stored predictions."""
    result = shipped_diagnosis["tasks"]
    layers, krr = result.layer_predictions, result.krr_predictions
    n_prompts, n_rows, n_query = layers.shape
    draws = np.random.default_rng(3).integers(0, n_prompts, size=(30, n_prompts))
    edges = np.quantile(result.kappa, np.linspace(0, 1, 4))
    members = [(result.kappa >= edges[i]) & ((result.kappa < edges[i + 1]) | (i == 2)) for i in range(3)]
    assert (np.sum(members, axis=0) == 1).all()
    for name, score in result.scores.items():
        steps = result.step_predictions[name]
        maps = monotone_maps(n_rows, steps.shape[1])
        sse, sst = pooled(layers, steps)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(sst > 0, 1 - sse / sst, np.nan)
        np.testing.assert_allclose(score.r2, r2, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(score.mse, sse / (n_prompts * n_query), rtol=1e-12)
        np.testing.assert_array_equal(score.argmin_steps, np.argmin(sse, axis=1))
        path, path_r2 = brute_path(layers, steps, maps)
        np.testing.assert_array_equal(score.aligned_steps, path)
        assert score.score == pytest.approx(path_r2, rel=1e-12)
        np.testing.assert_allclose(score.model_profile, np.log10(((layers - krr[:, None]) ** 2).mean(axis=(0, 2))), rtol=1e-12)
        np.testing.assert_allclose(score.algorithm_profile, np.log10(((steps - krr[:, None]) ** 2).mean(axis=(0, 2))), rtol=1e-12)
        strata = []
        for stratum, member in zip(score.strata, members):
            assert stratum.n_prompts == member.sum() and stratum.median_kappa == pytest.approx(np.median(result.kappa[member]))
            s_sse, s_sst = pooled(layers[member], steps[member])
            expected = 1 - s_sse[np.arange(1, n_rows), path[1:]].sum() / s_sst[path[1:]].sum()
            assert stratum.score == pytest.approx(expected, rel=1e-10)
            strata.append((expected, max(np.log10(np.median(result.kappa[member])), np.log10(1.1))))
        values, weights = np.array(strata).T
        assert score.weighted_r2 == pytest.approx(np.sum(values * weights) / np.sum(weights), rel=1e-10)
        replicates = np.array([brute_path(layers[d], steps[d], maps)[1] for d in draws])
        np.testing.assert_allclose(score.score_samples, replicates, rtol=1e-10)
        np.testing.assert_allclose(score.score_ci, order_statistic_interval(replicates, 0.95), rtol=1e-10)
        assert score.score_ci[0] <= score.score <= score.score_ci[1]


def test_summary_text_and_dataframe_print_the_stored_numbers(shipped_diagnosis):
    """Each algorithm line of summary(): path R2, interval, kappa-weighted R2, log-error distance at
    the printed decimals; to_dataframe's r2 / mse / aligned cells equal the stored arrays, and its
    interval columns the order statistics of the stored replicates."""
    result = shipped_diagnosis["tasks"]
    text = shipped_diagnosis.summary()
    frame = shipped_diagnosis.to_dataframe()
    for name, score in result.scores.items():
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        numbers = [float(value) for value in re.findall(r"-?\d+\.\d+", line)]
        expected = [round(score.score, 4), round(score.score_ci[0], 4), round(score.score_ci[1], 4), round(score.weighted_r2, 4),
                    round(score.profile_distance, 3)]
        np.testing.assert_allclose(numbers, expected, atol=1e-12)
        rows = frame[frame.algorithm == name]
        np.testing.assert_allclose(rows.pivot(index="layer", columns="step", values="r2").to_numpy(), score.r2, equal_nan=True)
        np.testing.assert_allclose(rows.pivot(index="layer", columns="step", values="mse").to_numpy(), score.mse)
        assert rows[rows.aligned].sort_values("layer").step.tolist() == score.aligned_steps.tolist()
        low, high = order_statistic_interval(score.score_samples, 0.95)  # the interval columns: NumPy order statistics
        assert set(rows.score_ci_low) == {low} and set(rows.score_ci_high) == {high}
        assert set(rows.weighted_r2) == {score.weighted_r2}


def test_bootstrap_interval_covers_a_known_path_r2_about_95_percent_with_prompt_level_noise():
    """Layers = a known trajectory at a known map + noise shared by a prompt's queries + per-query
    noise: the population path R2 is 1 - 4 (s_p^2 + s_q^2) / sum_l (1 - 0.6^a_l)^2. Resampling
    prompts (not queries) keeps the 95% interval's coverage near 95% over 150 simulated studies of
    40 prompts, and every interval holds its own estimate."""
    rng = np.random.default_rng(1)
    aligned, sigma = np.array([0, 1, 2, 4, 6]), 0.3
    scale = 1 - 0.6 ** np.arange(7)
    truth = 1 - 4 * 2 * sigma**2 / np.sum(scale[aligned[1:]] ** 2)
    hits, holds = 0, 0
    for study in range(150):
        z = rng.normal(size=(40, 4))
        steps = scale[None, :, None] * z[:, None]
        layers = steps[:, aligned] + sigma * rng.normal(size=(40, 5, 1)) + sigma * rng.normal(size=(40, 5, 4))
        score = score_algorithms(layers, {"a": steps}, z, bootstrap=200, seed=study)["a"]
        hits += score.score_ci[0] <= truth <= score.score_ci[1]
        holds += score.score_ci[0] <= score.score <= score.score_ci[1]
    assert 0.88 <= hits / 150 <= 0.99
    assert holds == 150


def _solver_system(seed: int):
    task = LinearRegressionSampler(dim=4, noise_std=0.3, condition_number=20.0).sample(30, n_support=12, n_query=4, seed=seed)
    x, xq = task.x_support.double(), task.x_query.double()
    K, K_query = kernel_matrix("linear", x), kernel_matrix("linear", xq, x)
    y = task.y_support.double()
    names = ("cg", "jacobi_cg", "gd", "richardson_jacobi", "chebyshev", "heavy_ball", "newton")
    steps = {name: ALGORITHMS[name](K, y, 0.1, 10, K_query=K_query).pred.numpy() for name in names}
    return steps, steps["cg"][:, -1]


@pytest.mark.parametrize("truth", ["cg", "gd", "chebyshev"])
def test_a_noisy_positive_control_is_identified_at_low_noise_and_never_as_another_algorithm(truth):
    """Layers = the true algorithm's steps 0, 1, 2, 4, 6, 8 + Gaussian noise (a fraction of the
    steps' spread) against seven candidates: identified as the truth (or an inseparable one) at 5%
    noise, not identified at 40%, and at no noise level identified as a separable rival."""
    steps, krr = _solver_system(5)
    exact = steps[truth][:, [0, 1, 2, 4, 6, 8]]
    spread = steps[truth][:, 1:].std()
    for noise, seed in itertools.product((0.05, 0.2, 0.4), (0, 1)):
        layers = exact + noise * spread * np.random.default_rng(seed).normal(size=exact.shape)
        verdict = identifiability_verdict(score_algorithms(layers, steps, krr, bootstrap=200, seed=seed), steps)
        matches = verdict.best == truth or truth in verdict.equivalent
        assert not verdict.identified or matches, (noise, seed, verdict.message)
        if noise == 0.05:
            assert verdict.identified and matches
        if noise == 0.4:
            assert not verdict.identified


def test_agreement_of_solver_trajectories_equals_enumerated_path_r2():
    """agreement[i, j]: path R2 of algorithm i's trajectory at its informative aligned steps
    against algorithm j's steps (SST about j's pooled mean) under the best enumerated monotone map."""
    steps, _ = _solver_system(6)
    names = ["cg", "gd", "chebyshev"]
    aligned = {"cg": np.array([0, 1, 2, 3]), "gd": np.array([0, 2, 5, 9]), "chebyshev": np.array([1, 1, 4, 10])}
    got_names, agreement = algorithm_agreement({name: steps[name] for name in names}, aligned)
    assert got_names == names
    for i, a in enumerate(names):
        rows = aligned[a][aligned[a] > 0]
        for j, b in enumerate(names):
            sse, sst = pooled(steps[a][:, rows], steps[b])
            maps = monotone_maps(len(rows), steps[b].shape[1])
            best = maps[np.argmin(sse[np.arange(len(rows)), maps].sum(1))]
            expected = 1.0 if i == j else 1 - sse[np.arange(len(rows)), best].sum() / sst[best].sum()
            assert agreement[i, j] == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_randomly_initialised_models_are_never_identified_over_several_seeds(attention):
    """Five initialisations per architecture, 24 GP prompts, 200 resamples (enough for a verdict):
    the false-positive rate of the verdict is 0 and no lower bound reaches min_score."""
    task = GPRegressionSampler(dim=3).sample(24, 10, 3, seed=2)
    for seed in range(5):
        torch.manual_seed(seed)
        model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2, attention=attention))
        verdict = probes.diagnose(model, task, kernels=(), bootstrap=200, n_steps=8, seed=seed, progress=False)["tasks"].verdict
        assert not verdict.identified and verdict.score_ci[0] < 0.9 and "too few" not in verdict.message


# --------------------------------------------------------------------------------------------
# findings (fixed)


def _toy_trajectories(noise: float, n_prompts: int = 30, seed: int = 0):
    """Two separable toy algorithms (geometric convergence at rates 0.3 and 0.8) and layers that
    follow the fast one at steps 0..3 plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_prompts, 3))
    steps = {rate: (1 - r ** np.arange(7))[None, :, None] * z[:, None] for rate, r in (("fast", 0.3), ("slow", 0.8))}
    layers = steps["fast"][:, [0, 1, 2, 3]] + noise * rng.normal(size=(n_prompts, 4, 3))
    return layers, steps, z


def test_profile_distance_is_over_the_scored_layers_like_the_path_r2():
    """Layer 0 is 'never scored', and the path R2 and its interval do not change when the row of
    layer 0 is left out; the log-error profile distance must not either: the RMS gap over rows
    1.. only (NumPy). On softmax_gp this moved cg's distance from 1.29 to 1.16."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20, 3))
    steps = (1 - 0.5 ** np.arange(6))[None, :, None] * z[:, None]
    layers = steps[:, [0, 1, 3, 5]] + 0.1 * rng.normal(size=(20, 4, 3))
    layers[:, 0] = 0.5 * rng.normal(size=(20, 3))  # an embedding read-out: unrelated to the labels
    full = score_algorithm("a", layers, steps, z, layers=[0, 1, 2, 3])
    blocks = score_algorithm("a", layers[:, 1:], steps, z, layers=[1, 2, 3])
    assert full.score == pytest.approx(blocks.score)
    gaps = full.model_profile[1:] - full.algorithm_profile[full.aligned_steps[1:]]
    assert full.profile_distance == pytest.approx(np.sqrt(np.mean(gaps**2)), rel=1e-12)
    assert full.profile_distance == pytest.approx(blocks.profile_distance, rel=1e-12)


def test_verdict_level_applies_to_the_score_bound_too():
    """At level=0.999 the verdict must require the 99.9% lower bound (order statistic of the stored
    replicates) >= min_score; here the 95% bound is above 0.9 and the 99.9% one below it."""
    layers, steps, z = _toy_trajectories(0.22)
    scores = score_algorithms(layers, steps, z, bootstrap=1000, seed=0)
    strict = order_statistic_interval(scores["fast"].score_samples, 0.999)
    assert scores["fast"].score_ci[0] >= 0.9 > strict[0], "the case must straddle min_score for this test to mean anything"
    verdict = identifiability_verdict(scores, steps, level=0.999)
    assert not verdict.identified
    assert verdict.score_ci == pytest.approx(strict)


def test_verdict_on_scores_of_fewer_prompts_than_the_step_predictions_is_refused_or_withheld():
    """Scores made on 5 prompts (below MIN_VERDICT_PROMPTS = 20) with step predictions of all 30:
    a one-line ValueError about the prompts, or at least no verdict."""
    layers, steps, z = _toy_trajectories(0.01)
    scores = score_algorithms(layers[:5], {name: value[:5] for name, value in steps.items()}, z[:5], bootstrap=200)
    try:
        verdict = identifiability_verdict(scores, steps)
    except ValueError as error:
        assert "prompt" in str(error)
    else:
        assert not verdict.identified


def test_verdict_given_step_predictions_of_another_length_names_the_argument():
    layers, steps, z = _toy_trajectories(0.01)
    scores = score_algorithms(layers, steps, z, bootstrap=200)
    with pytest.raises(ValueError, match="step_preds"):
        identifiability_verdict(scores, {name: value[:, :3] for name, value in steps.items()})


@pytest.mark.parametrize("case", ["missing name", "step beyond T", "other batch"])
def test_algorithm_agreement_mistakes_are_one_line_value_errors(case):
    _, steps, _ = _toy_trajectories(0.0)
    aligned = {"fast": [1, 2], "slow": [1, 3]}
    if case == "missing name":
        del aligned["slow"]
    elif case == "step beyond T":
        aligned["fast"] = [1, 9]
    else:
        steps = {"fast": steps["fast"], "slow": steps["slow"][:10]}
    with pytest.raises(ValueError, match="aligned_steps|step_preds"):
        algorithm_agreement(steps, aligned)


@pytest.mark.parametrize("option", [{"min_score": 90.0}, {"agreement_threshold": 99.0}, {"min_gap": -1.0}, {"min_score": float("nan")}])
def test_verdict_thresholds_are_checked_as_in_diagnose(option):
    layers, steps, z = _toy_trajectories(0.01)
    scores = score_algorithms(layers, steps, z, bootstrap=200)
    with pytest.raises(ValueError, match=next(iter(option))):
        identifiability_verdict(scores, steps, **option)


def test_verdict_refuses_scores_bootstrapped_on_different_resamples_of_the_same_size():
    """A paired bootstrap needs the same resampled prompts for every algorithm: two scores of
    200 resamples drawn with seeds 0 and 1 are refused (same seed: a verdict is drawn)."""
    layers, steps, z = _toy_trajectories(0.01)
    fast = score_algorithms(layers, {"fast": steps["fast"]}, z, bootstrap=200, seed=0)
    for seed, refused in ((1, True), (0, False)):
        slow = score_algorithms(layers, {"slow": steps["slow"]}, z, bootstrap=200, seed=seed)
        if refused:
            with pytest.raises(ValueError, match="share their bootstrap resamples"):
                identifiability_verdict({**fast, **slow}, steps)
        else:
            assert identifiability_verdict({**fast, **slow}, steps).best == "fast"

