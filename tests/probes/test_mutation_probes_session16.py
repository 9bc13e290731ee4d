"""Mutation review of session 16's probe changes: the tests here each fail on a hand-planted
mutant that the other tests let through. References are independent of the code under test:
monotone alignments by enumerating every non-decreasing layer -> step map (`brute_force`),
bounds and scales by explicit loops and hand-written values, verdict sentences and figure
titles written out by hand, figures read back through matplotlib's artists (colour limits,
texts), never pixels."""

from __future__ import annotations

import dataclasses
import itertools
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import probes  # noqa: E402
from brute_force import monotone_path  # noqa: E402
from mi_krr.models import ICLTransformer, ICLTransformerConfig  # noqa: E402
from mi_krr.tasks.samplers import LinearRegressionSampler  # noqa: E402
from probes.compare import MODEL_OFFSET, SummaryRow, plot_overview  # noqa: E402
from probes.diagnosis import Diagnosis, TaskSetDiagnosis  # noqa: E402
from probes.identifiability import Verdict, identifiability_verdict  # noqa: E402
from probes.kernel_alignment import KernelAlignment  # noqa: E402
from probes.plots import GAP_GREY, diagnosis_figures, plot_alignment, plot_kernel_alignment, plot_sensitivities, plot_step_map  # noqa: E402
from probes.scoring import AlgorithmScore, monotone_alignment, score_algorithms  # noqa: E402
from probes.step_sizes import _bounded_candidates, path_scores  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --- scoring: the compiled monotone alignment ----------------------------------------------------------


@pytest.mark.parametrize("where", [(0, 2), (0, 3), (1, 1), (2, 3), (2, 0)])
def test_monotone_alignment_refuses_a_nan_anywhere_in_the_cost(where):
    """The docstring: 'A cost holding NaN is refused'. A single NaN off step 0 (where a running
    minimum would skip it) in the first row, in a middle row or in the last row: ValueError
    naming NaN."""
    cost = np.arange(12, dtype=float).reshape(3, 4) / 10.0
    cost[where] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        monotone_alignment(cost)


def test_monotone_alignment_refuses_a_nan_in_any_matrix_of_a_batch():
    """A batch of four finite cost matrices but one holding a NaN (in its last row): refused, as a
    lone matrix would be; without the NaN the batch aligns."""
    cost = np.random.default_rng(2).random((4, 3, 5))
    assert np.isfinite(monotone_alignment(cost)[1]).all()
    cost[2, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        monotone_alignment(cost)


def test_batched_monotone_alignment_with_ties_equals_brute_force_per_matrix():
    """Small-integer costs (many tied optima) batched [2, 3, L', T+1]: each matrix's steps are the
    brute-force earliest-from-the-last-row optimum over every non-decreasing map, and its total that
    map's summed cost (tests/brute_force.monotone_path)."""
    rng = np.random.default_rng(16)
    cost = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(float)
    steps, total = monotone_alignment(cost)
    assert steps.shape == (2, 3, 4) and total.shape == (2, 3)
    for index in itertools.product(range(2), range(3)):
        expected = monotone_path(cost[index])
        assert tuple(steps[index].tolist()) == expected, index
        assert total[index] == sum(cost[index][row, step] for row, step in enumerate(expected))


# --- step sizes: which trajectories stay bounded ---------------------------------------------------------


def test_bounded_candidates_equal_an_elementwise_loop_at_and_beyond_the_limit():
    """Per prompt and candidate: True iff every value v has -limit <= v <= limit (inclusive, NaN
    out), checked by an explicit loop over pred [B=3, G=4, T+1=2, m=2]. Values exactly at +-limit
    stay in; just beyond (either sign), +-inf and NaN are out; a fully bounded array is all True."""
    limit = 10.0
    pred = np.zeros((3, 4, 2, 2))
    pred[0, 0, 1, 1] = limit  # on the edge: in
    pred[0, 1, 0, 0] = -limit  # on the edge: in
    pred[1, 1, 1, 0] = -limit * (1 + 1e-12)  # beyond, negative
    pred[1, 2, 0, 1] = limit * (1 + 1e-12)  # beyond, positive
    pred[2, 0, 1, 1] = -np.inf
    pred[2, 3, 0, 0] = np.nan
    pred[0, 3, 1, 0] = 3.0
    expected = np.array([[all(-limit <= value <= limit for value in pred[b, g].ravel()) for g in range(4)] for b in range(3)])
    assert expected.tolist() == [[True, True, True, True], [True, False, False, True], [False, True, True, False]]
    np.testing.assert_array_equal(_bounded_candidates(pred, limit, pred.min(), pred.max()), expected)
    edge = np.zeros((3, 4, 2, 2))
    edge[1, 2, 0, 0], edge[2, 1, 1, 1] = limit, -limit
    np.testing.assert_array_equal(_bounded_candidates(edge, limit, edge.min(), edge.max()), np.ones((3, 4), dtype=bool))
    below = np.zeros((3, 4, 2, 2))
    below[1, 2, 0, 0] = -1e300  # only the minimum is out of range
    assert _bounded_candidates(below, limit, below.min(), below.max()).tolist() == [[True] * 4, [True, True, False, True], [True] * 4]


def test_path_scores_of_folds_are_unaffected_by_a_negative_divergence_on_the_other_fold():
    """Candidate 1 diverges to -1e300 (negative, finite) on one prompt of fold 1: fold 1 scores it
    -inf, fold 0 scores every candidate as if scored alone on its own prompts (brute-force path R2
    over every non-decreasing map, `brute_force.path_r2`), a finite number."""
    from brute_force import path_r2

    rng = np.random.default_rng(11)
    layers, steps = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 2, 4, 2)) + 0.5  # [B, L', m], [B, G, T+1, m]
    folds = np.array([0, 1, 0, 1, 1, 0])
    steps[3, 1, 2, 0] = -1e300
    scored = np.arange(1, 3)
    got = path_scores(layers, torch.as_tensor(steps), scored, folds=folds)
    members = folds == 0
    expected = path_r2(layers[members], steps[members].transpose(1, 0, 2, 3), scored)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(got[0], expected, rtol=1e-12)
    assert got[1, 1] == -np.inf
    np.testing.assert_allclose(got[1, 0], path_r2(layers[~members], steps[~members][:, :1].transpose(1, 0, 2, 3), scored), rtol=1e-12)


# --- identifiability: the verdict's sentence on an undefined gap -----------------------------------------

R = 50


def scored_pair(first: float, second: float):
    """Two separable candidates (independent random trajectories) 'a' and 'b' with path R2 and every
    resample set by hand to `first` and `second`; returns (scores, step predictions)."""
    rng = np.random.default_rng(0)
    preds = {name: np.concatenate([np.zeros((24, 1, 2)), rng.normal(size=(24, 4, 2))], axis=1) for name in ("a", "b")}
    layers = preds["a"][:, [0, 1, 2, 3]] + 0.01 * rng.normal(size=(24, 4, 2))
    scores = score_algorithms(layers, preds, preds["a"][:, -1], bootstrap=R, seed=0)
    for name, value in (("a", first), ("b", second)):
        scores[name] = dataclasses.replace(scores[name], score=value, score_ci=(value, value), score_samples=np.full(R, value))
    return scores, preds


@pytest.mark.parametrize("first, second, sentence", [
    (-math.inf, math.nan, "Runner-up: b, gap undefined (path R2 -inf for a, undefined for b)."),
    (math.nan, -math.inf, "Runner-up: b, gap undefined (path R2 undefined for a, -inf for b)."),
    (math.nan, math.nan, "Runner-up: b, gap undefined (path R2 undefined for a, undefined for b)."),
])
def test_verdict_names_each_score_when_one_of_them_is_minus_inf_and_the_other_undefined(first, second, sentence):
    """Both scores non-finite but not both -inf (one -inf, one NaN; or both NaN): the gap is NaN and
    the sentence (written by hand) names each score, '-inf' for -inf and 'undefined' for NaN;
    'both path R2 -inf' is kept for two -inf scores; no NaN interval is printed."""
    scores, preds = scored_pair(first, second)
    verdict = identifiability_verdict(scores, preds)
    assert (verdict.best, verdict.runner_up) == ("a", "b") and math.isnan(verdict.gap)
    assert sentence in verdict.message
    assert "both path R2 -inf" not in verdict.message and "nan" not in verdict.message


# --- plots ----------------------------------------------------------------------------------------------


def make_verdict(best):
    return Verdict(best=best, score=0.5, score_ci=(0.4, 0.6), runner_up=None, gap=0.0, gap_ci=(0.0, 0.0), equivalent=[],
                   identified=False, algorithms=[best], agreement=np.ones((1, 1)), separable=np.zeros((1, 1), dtype=bool),
                   min_score=0.9, min_gap=0.01, agreement_threshold=0.99, message="not identified")


def make_score(aligned, n_steps, algorithm="cg", score=0.5):
    n_rows = len(aligned)
    r2 = np.full((n_rows, n_steps + 1), 0.5)
    return AlgorithmScore(
        algorithm=algorithm, layers=np.arange(n_rows), scored=np.arange(1, n_rows), r2=r2, mse=np.zeros_like(r2),
        aligned_steps=np.asarray(aligned), argmin_steps=np.asarray(aligned), aligned_r2=np.zeros(n_rows),
        aligned_r2_ci=np.zeros((n_rows, 2)), score=score, score_ci=(score - 0.1, score + 0.1), score_samples=np.zeros(3),
        model_profile=np.linspace(0, -1, n_rows), algorithm_profile=np.linspace(0, -2, n_steps + 1), profile_distance=0.0,
        profile_steps=np.asarray(aligned), profile_aligned_distance=0.0, weighted_r2=None,
    )


def make_result(name="tasks", score=None, layer_sensitivities=None, step_sensitivities=None, alignment=None, info=None,
                kernel="linear", kernel_params=None, lam=0.1):
    score = make_score([0, 1, 2], 3) if score is None else score
    n_rows, n_columns = score.r2.shape
    return TaskSetDiagnosis(
        name=name, info={} if info is None else info, kernel=kernel, kernel_params={} if kernel_params is None else kernel_params,
        lam=lam, n_steps=n_columns - 1, n_support=3, layers=list(score.layers), kappa=np.ones(2),
        layer_predictions=np.zeros((2, n_rows, 2)), krr_predictions=np.zeros((2, 2)), step_predictions={},
        scores={score.algorithm: score}, verdict=make_verdict(score.algorithm), layer_sensitivities=layer_sensitivities,
        step_sensitivities=step_sensitivities, kernel_alignment=alignment,
    )


def sensitivity_result():
    """2 prompts, rows 0..2 (scored 1, 2) aligned to steps 0, 1, 3 of 4 steps; 2 queries x 3 labels.
    Prompt 0's drawn values reach 2 (model) and 3 (algorithm, step 3); undrawn step 2 holds 40 and
    the unscored row 0 and step 0 hold 50."""
    layer_sens = np.zeros((2, 3, 2, 3))
    layer_sens[0, 0, 0, 0] = 50.0  # row 0 is not scored: not drawn
    layer_sens[0, 1, 1, 2] = -2.0
    layer_sens[0, 2, 0, 1] = 1.5
    step_sens = np.zeros((2, 5, 2, 3))
    step_sens[0, 0, 0, 0] = -50.0  # step 0: row 0's, not drawn
    step_sens[0, 2, 1, 1] = 40.0  # no drawn layer is aligned to step 2
    step_sens[0, 3, 1, 0] = -3.0
    step_sens[0, 1, 0, 2] = 0.5
    return make_result(score=make_score([0, 1, 3], 4), layer_sensitivities=layer_sens, step_sensitivities={"cg": step_sens})


def test_sensitivity_colour_range_is_the_largest_value_drawn_not_of_undrawn_steps():
    """The colour range is +-(largest |value| of the drawn matrices): layers 1, 2 and the algorithm
    at their aligned steps 1, 3, here 3 (hand-computed), not the 40 of step 2 or the 50 of row 0 /
    step 0, which no panel shows."""
    figure = plot_sensitivities(sensitivity_result())
    limits = {image.get_clim() for ax in figure.axes for image in ax.images}
    assert limits == {(-3.0, 3.0)}
    assert [ax.get_title() for ax in figure.axes[:4]] == ["layer 1", "layer 2", "cg step 1", "cg step 3"]


@pytest.mark.parametrize("prompt", [2, -1, True, False, 1.0, np.float64(0.0), "0"])
def test_sensitivity_figure_refuses_any_prompt_that_is_not_an_index_in_range(prompt):
    """With 2 prompts the valid indices are 0 and 1 (ints, NumPy ints): 2 (one past the end), -1, a
    bool (True would silently mean prompt 1), a float and a string are refused with a ValueError
    naming the range [0, 2)."""
    with pytest.raises(ValueError, match=r"prompt must be a prompt index in \[0, 2\)"):
        plot_sensitivities(sensitivity_result(), prompt=prompt)
    assert plot_sensitivities(sensitivity_result(), prompt=np.int64(1)) is not None


def test_sensitivity_title_starts_with_the_title_passed():
    """`title` replaces the task set's name at the start of the suptitle (hand-written text)."""
    figure = plot_sensitivities(sensitivity_result(), prompt=1, title="gd_net, tasks")
    assert figure.texts[0].get_text() == "gd_net, tasks: d yhat / d y (prompt 1; columns = support labels)"
    assert plot_sensitivities(sensitivity_result()).texts[0].get_text().startswith("tasks: d yhat / d y (prompt 0;")


def test_step_map_draws_r2_in_viridis_with_grey_gaps():
    """The step map's colour map is viridis (matplotlib's own, compared at five points) with
    undefined cells in GAP_GREY, mid grey "0.5"."""
    cmap = plot_step_map(make_result()).axes[0].images[0].cmap
    viridis = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose([cmap(value) for value in np.linspace(0, 1, 5)], [viridis(value) for value in np.linspace(0, 1, 5)])
    assert GAP_GREY == "0.5" and matplotlib.colors.to_rgba(cmap.get_bad()) == (0.5, 0.5, 0.5, 1.0)


def alignment(exp_distance, gaussian_distance):
    """A [1, 2] kernel alignment with the given operator distances (other metrics 0.5)."""
    def metrics(distance):
        return {"operator_distance": torch.tensor(distance, dtype=torch.float64),
                "row_spearman": torch.full((1, 2), 0.5, dtype=torch.float64), "cka": torch.full((1, 2), 0.5, dtype=torch.float64),
                "spearman": torch.zeros((1, 2), dtype=torch.float64)}

    return KernelAlignment(block="support", scale={"exp": torch.ones(1, 2, dtype=torch.float64), "gaussian": torch.ones(1, 2, dtype=torch.float64)},
                           metrics={"exp": metrics(exp_distance), "gaussian": metrics(gaussian_distance)}, per_prompt={})


def test_operator_distance_range_is_shared_when_the_second_kernel_holds_the_maximum():
    """The shared operator-distance range is [0, max over both kernels' data and 1]: 2.4 here, a
    Gaussian-kernel value, for the exp row too (the exp row alone reaches 1.3); the other metrics keep
    their fixed ranges [-1, 1] (row Spearman) and [0, 1] (CKA)."""
    figure = plot_alignment(alignment([[0.2, 1.3]], [[2.4, np.nan]]))
    limits = {ax.get_title(): ax.images[0].get_clim() for ax in figure.axes if ax.images}
    assert limits == {"exp (τ 1): rel. op. distance": (0.0, 2.4), "exp: row Spearman": (-1.0, 1.0), "exp: CKA": (0.0, 1.0),
                      "gaussian (σ 1): rel. op. distance": (0.0, 2.4), "gaussian: row Spearman": (-1.0, 1.0), "gaussian: CKA": (0.0, 1.0)}


def test_diagnosis_figures_title_every_figure_with_the_model_and_task_set():
    """`diagnosis_figures(..., model="net")` and `Diagnosis.plot(model="net")`: the kernel-alignment and
    sensitivity figures' suptitles start "net, a" too (hand-written), as do the error-profile and step
    map titles; `plot_kernel_alignment(result, title)` starts its suptitle with that title."""
    small = alignment([[0.5, 0.7]], [[0.3, 0.9]])
    result = dataclasses.replace(sensitivity_result(), name="a", kernel_alignment=small)
    diagnosis = Diagnosis(task_sets={"a": result}, settings={})
    for figures in (diagnosis_figures(diagnosis, model="net"), diagnosis.plot(model="net")):
        assert figures["kernel_alignment"].texts[0].get_text() == (
            "net, a: attention pattern (support rows) vs reference kernels, brighter = closer, grey = undefined")
        assert figures["sensitivities"].texts[0].get_text() == "net, a: d yhat / d y (prompt 0; columns = support labels)"
        assert figures["error_profiles"].axes[0].get_title() == "net, a: error profiles"
        assert figures["step_map"].axes[1].get_title() == "net, a: best-matching step per layer"
    assert plot_kernel_alignment(result, "mine").texts[0].get_text().startswith("mine: attention pattern (support rows)")
    assert plot_kernel_alignment(result).texts[0].get_text().startswith("a: attention pattern (support rows)")


# --- diagnose: the ridge probes' seed ------------------------------------------------------------------


def test_diagnose_fits_ridge_probes_with_its_seed():
    """`seed` also seeds the ridge probes' validation split (method="ridge"): the diagnosis's layer
    predictions at seed 1 are those `probes.layer_predictions` gives at seed 1 (the public entry
    point, called directly), which here differ from seed 0's (the split picks another penalty)."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2))
    sampler = LinearRegressionSampler(dim=3, noise_std=0.5)
    task, train = sampler.sample(8, 6, 2, seed=0), sampler.sample(16, 6, 2, seed=1)
    result = probes.diagnose(model, task, algorithms=("cg",), method="ridge", train_task=train, n_steps=3, kernels=(), bootstrap=0,
                             progress=False, seed=1)["tasks"]
    seeded = probes.layer_predictions(model, task, method="ridge", train_task=train, seed=1).numpy()
    default = probes.layer_predictions(model, task, method="ridge", train_task=train, seed=0).numpy()
    assert np.abs(seeded - default).max() > 0.1
    np.testing.assert_allclose(result.layer_predictions, seeded, rtol=1e-12, atol=1e-12)


# --- compare: protocol notes ------------------------------------------------------------------------------

SETTINGS = {"algorithms": {"cg": "registry"}, "method": "readout", "step_sizes": "optimal"}


def hand_diagnosis(settings=None, **task_sets) -> Diagnosis:
    return Diagnosis(task_sets={name: dataclasses.replace(result, name=name) for name, result in task_sets.items()},
                     settings={**SETTINGS, **(settings or {})})


def test_notes_name_a_layer_prediction_method_that_differs_grouping_the_models():
    """Three models alike but for the layer-prediction method (readout, ridge, readout): exactly one
    note, written out by hand, grouping the models by method; the settings notes come in the order
    candidates, method, step sizes."""
    same = make_result()
    notes = probes.compare({"a": hand_diagnosis(tasks=same), "b": hand_diagnosis({"method": "ridge"}, tasks=same),
                            "c": hand_diagnosis(tasks=same)}).notes
    assert notes == ["the models were diagnosed with different layer-prediction method: a, c: readout; b: ridge."]
    every = probes.compare({"a": hand_diagnosis(tasks=same),
                            "b": hand_diagnosis({"algorithms": {"gd": "registry"}, "method": "ridge", "step_sizes": "fitted"}, tasks=same)})
    assert [note.split(":")[0] for note in every.notes] == [
        "the models were diagnosed with different candidate algorithms (each row's best is chosen among its own model's)",
        "the models were diagnosed with different layer-prediction method",
        "the models were diagnosed with different step sizes"]
    assert every.notes[2] == "the models were diagnosed with different step sizes: a: optimal; b: fitted."
    assert every.summary().splitlines()[-3:] == [f"Note: {note}" for note in every.notes]


def test_krr_system_notes_only_for_a_task_set_sampled_alike_and_name_kernel_parameters_and_lam():
    """Task set 'shifted': one sampler configuration (same info) for both models but exp temperatures
    2 and 3: one note naming each model's kernel, parameters and lam (hand-written). Task set 'other':
    different samplers (info) and lams: no note (different prompts, not a different system). 'solo',
    diagnosed for one model only: no note. 'late', diagnosed for the second and third models only (not
    the first), at lams 0.1 and 0.2: a note too."""
    info = {"sampler": "GPRegressionSampler", "temperature": 2.0}
    a = hand_diagnosis(
        shifted=make_result(info=info, kernel="exp", kernel_params={"temperature": 2.0}, lam=0.04),
        other=make_result(info={"noise_std": 0.1}, lam=0.01), solo=make_result(lam=0.3))
    b = hand_diagnosis(
        shifted=make_result(info=dict(info), kernel="exp", kernel_params={"temperature": 3.0}, lam=0.04),
        other=make_result(info={"noise_std": 0.2}, lam=0.04), late=make_result(lam=0.1))
    c = hand_diagnosis(late=make_result(lam=0.2))
    notes = probes.compare({"a": a, "b": b, "c": c}).notes
    assert notes == ["task set 'shifted' (one sampler) was solved as different KRR systems: "
                     "a: exp {'temperature': 2.0} lam=0.04; b: exp {'temperature': 3.0} lam=0.04.",
                     "task set 'late' (one sampler) was solved as different KRR systems: b: linear {} lam=0.1; c: linear {} lam=0.2."]


# --- compare: the overview figure -------------------------------------------------------------------------


def summary_row(model, task_set, best, score, ci, exp=math.nan, gaussian=math.nan, exp_uniform=False, gaussian_uniform=False):
    return SummaryRow(
        model=model, task_set=task_set, best=best, score=score, score_ci=ci, step_map="1:1", identified=False,
        exp_distance=exp, gaussian_distance=gaussian, exp_uniform=exp_uniform, gaussian_uniform=gaussian_uniform)


def test_overview_intervals_markers_and_uniform_marks_sit_at_each_models_offset_position():
    """Two models, task sets in_distribution (x 0) and input_scale_x2 (x 1), model a drawn at x - 0.03
    and b at x + 0.03 (MODEL_OFFSET 0.06 apart). Hand-derived artists:
    error bars (vertical segments) a: score -0.8 with interval (-1.5, 0.2) is drawn at the floor -0.5,
    its bar from -0.5 (the interval's low end clipped to the floor) to 0.2; score exactly -0.5 with
    interval (-0.6, -0.2): bar -0.5 to -0.2; b: 0.3 with (0.1, 0.5); b's in_distribution row has no
    best (score -inf): no point and no bar although its clipped interval is finite.
    markers: a triangle only below the floor (-0.8), a circle at exactly -0.5 and at 0.3.
    "u" marks (colour C0): beside a's exp distance 0.4 (best head uniform), not beside its undefined
    exp distance (uniform flag but NaN), and beside a's Gaussian distance 0.7 by the Gaussian flag
    (not the exp one: the 0.6 of an exp-uniform row gets none)."""
    assert MODEL_OFFSET == 0.06
    rows = [
        summary_row("a", "in_distribution", "cg", -0.8, (-1.5, 0.2), exp=0.4, gaussian=0.6, exp_uniform=True),
        summary_row("a", "input_scale_x2", "cg", -0.5, (-0.6, -0.2), exp=math.nan, gaussian=0.7, exp_uniform=True, gaussian_uniform=True),
        summary_row("b", "in_distribution", None, -math.inf, (-math.inf, -math.inf)),
        summary_row("b", "input_scale_x2", "gd", 0.3, (0.1, 0.5)),
    ]
    left, right = plot_overview(rows).axes[:2]
    segments = sorted(tuple(np.round(np.ravel(segment), 12)) for collection in left.collections for segment in collection.get_segments())
    assert segments == sorted([(-0.03, -0.5, -0.03, 0.2), (0.97, -0.5, 0.97, -0.2), (1.03, 0.1, 1.03, 0.5)])
    markers = sorted((line.get_marker(), round(float(line.get_xdata()[0]), 12), float(line.get_ydata()[0]), line.get_color())
                     for line in left.lines if line.get_marker() in ("o", "v"))
    assert markers == [("o", 0.97, -0.5, "C0"), ("o", 1.03, 0.3, "C1"), ("v", -0.03, -0.5, "C0")]
    marks = sorted((text.get_text(), round(float(text.xy[0]), 12), float(text.xy[1]), text.get_color()) for text in right.texts)
    assert marks == [("u", -0.03, 0.4, "C0"), ("u", 0.97, 0.7, "C0")]
