"""`probes.plots` figures of hand-built diagnoses, read back through matplotlib's artists (line data,
image arrays, colour limits and maps, tick labels, titles, cell texts) and checked against what the
stored arrays say, recomputed here in NumPy or written out by hand. Layers are non-contiguous and
alignments differ from the argmin and the row index, so a plot of the wrong array shows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from probes.diagnosis import Diagnosis, TaskSetDiagnosis  # noqa: E402
from probes.identifiability import Verdict  # noqa: E402
from probes.kernel_alignment import KernelAlignment  # noqa: E402
from probes.scoring import AlgorithmScore  # noqa: E402
from probes.plots import (  # noqa: E402
    _value_range,
    diagnosis_figures,
    plot_alignment,
    plot_error_profiles,
    plot_kernel_alignment,
    plot_sensitivities,
    plot_step_map,
)

LAYERS = np.array([0, 2, 4, 6])  # residual indices probed: row r is layer 2 r, so a row / layer mix-up shows


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def make_score(algorithm, r2, aligned, argmin, model_profile, algorithm_profile, score, weighted_r2=0.123456, layers=LAYERS):
    """An `AlgorithmScore` carrying what the figures read (every row but layer 0 scored); the rest are placeholders."""
    n_rows = len(aligned)
    return AlgorithmScore(
        algorithm=algorithm, layers=np.array(layers), scored=np.arange(1, n_rows), r2=np.asarray(r2, dtype=float),
        mse=np.zeros_like(np.asarray(r2, dtype=float)), aligned_steps=np.asarray(aligned), argmin_steps=np.asarray(argmin),
        aligned_r2=np.zeros(n_rows), aligned_r2_ci=np.zeros((n_rows, 2)), score=score, score_ci=(score - 0.1, score + 0.1),
        score_samples=np.zeros(3), model_profile=np.asarray(model_profile, dtype=float),
        algorithm_profile=np.asarray(algorithm_profile, dtype=float), profile_distance=0.0, profile_steps=np.asarray(aligned),
        profile_aligned_distance=0.0, weighted_r2=weighted_r2,
    )


def make_verdict(best):
    return Verdict(best=best, score=0.5, score_ci=(0.4, 0.6), runner_up=None, gap=0.0, gap_ci=(0.0, 0.0), equivalent=[],
                   identified=False, algorithms=[best], agreement=np.ones((1, 1)), separable=np.zeros((1, 1), dtype=bool),
                   min_score=0.9, min_gap=0.01, agreement_threshold=0.99, message="not identified")


def make_result(name, scores, best, layer_sensitivities=None, step_sensitivities=None, alignment=None):
    first = next(iter(scores.values()))
    return TaskSetDiagnosis(
        name=name, info={}, kernel="linear", kernel_params={}, lam=0.1, n_steps=first.algorithm_profile.size - 1, n_support=3,
        layers=list(first.layers), kappa=np.ones(2), layer_predictions=np.zeros((2, first.layers.size, 2)),
        krr_predictions=np.zeros((2, 2)), step_predictions={}, scores=scores, verdict=make_verdict(best),
        layer_sensitivities=layer_sensitivities, step_sensitivities=step_sensitivities, kernel_alignment=alignment,
    )


# two algorithms over 4 layers and 6 steps (T = 5); cg is the best one
CG_R2 = np.array([[0.2, -0.5, np.nan, 0.1, 0.0, 0.3],
                  [1.4, 0.75, 0.5, np.nan, -2.0, 0.25],
                  [0.9, 0.95, 1.0, 0.6, 0.4, 0.1],
                  [0.05, 0.15, 0.35, 0.55, 0.8, 1.2]])
CG = dict(r2=CG_R2, aligned=[0, 1, 3, 4], argmin=[0, 0, 2, 5], model_profile=[-0.5, -1.25, -2.0, -3.5],
          algorithm_profile=[0.25, -0.75, -1.5, -2.5, -3.0, -4.0], score=0.8768, weighted_r2=0.4321)
GD = dict(r2=np.full((4, 6), 0.5), aligned=[0, 2, 2, 5], argmin=[1, 2, 3, 5], model_profile=[-0.5, -1.25, -2.0, -3.5],
          algorithm_profile=[0.25, -3.0, -9.0, -15.0, -21.0, -27.0], score=0.5432, weighted_r2=0.1111)


def profile_result(name="gp shifted"):
    return make_result(name, {"gd": make_score("gd", **GD), "cg": make_score("cg", **CG)}, best="cg")


def test_error_profiles_draw_each_algorithm_by_step_and_the_layers_at_their_aligned_steps():
    """Every algorithm's line is its profile against step 0..T (the best one emphasised: width 1.8, opaque;
    others 1.0, alpha 0.7); the model's points sit at the best algorithm's alignment, labelled with their
    layer; the dashed line puts the k-th probed layer at step k; the y range is the model's and the best
    algorithm's range widened by 1 (gd converging far below leaves the frame)."""
    figure = plot_error_profiles(profile_result())
    ax = figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"gd", "cg", "model layers at cg steps", "model, one step per probed layer"}
    for name, spec, width, alpha in [("cg", CG, 1.8, 1.0), ("gd", GD, 1.0, 0.7)]:
        np.testing.assert_array_equal(lines[name].get_xdata(), [0, 1, 2, 3, 4, 5])
        np.testing.assert_array_equal(lines[name].get_ydata(), spec["algorithm_profile"])
        assert lines[name].get_linewidth() == width and lines[name].get_alpha() == alpha
    model = lines["model layers at cg steps"]
    np.testing.assert_array_equal(model.get_xdata(), [0, 1, 3, 4])
    np.testing.assert_array_equal(model.get_ydata(), [-0.5, -1.25, -2.0, -3.5])
    dashed = lines["model, one step per probed layer"]
    assert dashed.get_linestyle() == "--"
    np.testing.assert_array_equal(dashed.get_xdata(), [0, 1, 2, 3])  # layers 0, 2, 4, 6: the k-th probed one at step k
    np.testing.assert_array_equal(dashed.get_ydata(), [-0.5, -1.25, -2.0, -3.5])
    labels = [(text.get_text(), tuple(text.xy)) for text in ax.texts]
    assert labels == [("0", (0, -0.5)), ("2", (1, -1.25)), ("4", (3, -2.0)), ("6", (4, -3.5))]
    assert ax.get_title() == "gp shifted: error profiles"
    shown = np.array(CG["model_profile"] + CG["algorithm_profile"])
    np.testing.assert_allclose(ax.get_ylim(), (shown.min() - 1.0, shown.max() + 1.0))  # (-5, 1.25)


def test_step_map_shows_the_clipped_r2_of_the_best_algorithm_with_its_alignment_and_argmin():
    """Left: the best algorithm's R2 clipped into [0, 1] with NaN (undefined) cells masked, drawn grey (hand-written),
    origin lower, colour range [0, 1]; the white path is the alignment and the crosses the argmin, at
    rows 0..L'-1 labelled with the layer indices. Right: every algorithm's aligned step per layer,
    labelled with its path R2 to 3 decimals, one x tick per layer. R2 inside (0, 1) keeps the range [0, 1]."""
    figure = plot_step_map(profile_result())
    left, right = figure.axes[0], figure.axes[1]
    image = left.images[0]
    expected = np.array([[0.2, 0.0, np.nan, 0.1, 0.0, 0.3],
                         [1.0, 0.75, 0.5, np.nan, 0.0, 0.25],
                         [0.9, 0.95, 1.0, 0.6, 0.4, 0.1],
                         [0.05, 0.15, 0.35, 0.55, 0.8, 1.0]])
    drawn = image.get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(drawn), np.isnan(expected))
    np.testing.assert_array_equal(drawn.filled(np.nan), expected)
    assert matplotlib.colors.to_rgba(image.cmap.get_bad()) == matplotlib.colors.to_rgba("0.5")
    assert image.origin == "lower" and image.get_clim() == (0.0, 1.0)
    path, crosses = left.get_lines()
    np.testing.assert_array_equal(path.get_xdata(), [0, 1, 3, 4])
    np.testing.assert_array_equal(crosses.get_xdata(), [0, 0, 2, 5])
    for line in (path, crosses):
        np.testing.assert_array_equal(line.get_ydata(), [0, 1, 2, 3])
    assert list(left.get_yticks()) == [0, 1, 2, 3]
    assert [label.get_text() for label in left.get_yticklabels()] == ["0", "2", "4", "6"]
    assert left.get_xlabel() == "cg step" and "(cg, clipped to [0, 1]; grey: undefined)" in left.get_title()
    drawn = {line.get_label(): line for line in right.get_lines()}
    assert set(drawn) == {"gd (R2 0.543)", "cg (R2 0.877)"}
    for label, spec in [("gd (R2 0.543)", GD), ("cg (R2 0.877)", CG)]:
        np.testing.assert_array_equal(drawn[label].get_xdata(), [0, 2, 4, 6])
        np.testing.assert_array_equal(drawn[label].get_ydata(), spec["aligned"])
    assert list(right.get_xticks()) == [0, 2, 4, 6]
    inside = profile_result()
    inside.scores["cg"].r2 = np.linspace(0.2, 0.7, 24).reshape(4, 6)  # the colour range stays [0, 1], not the data's
    assert plot_step_map(inside).axes[0].images[0].get_clim() == (0.0, 1.0)


# --- kernel alignment -------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
ALIGN = {  # [block, head] = [3, 2]: not square, so a transpose shows
    "exp": {"operator_distance": [[0.1, 1.7], [0.4, 0.9], [0.0, 1.2]],
            "row_spearman": [[-1.0, 0.5], [NAN, 0.25], [1.0, -0.3]],
            "cka": [[0.0, 1.0], [0.2, 0.8], [0.6, 0.45]],
            "spearman": [[0.0] * 2] * 3},
    "gaussian": {"operator_distance": [[0.1, 0.6], [0.3, 0.0], [0.8, 0.5]],
                 "row_spearman": [[0.9, -0.9], [0.1, 0.0], [0.35, 0.65]],
                 "cka": [[0.3, 0.95], [0.05, 0.5], [0.7, 0.15]],
                 "spearman": [[0.0] * 2] * 3},
}
SCALE = {"exp": [[0.5, 2.0], [INF, 1.25], [NAN, 3.0]], "gaussian": [[0.7, 0.7], [0.7, 0.7 * (1 + 1e-12)], [0.7, 0.7]]}
PANELS = [("operator_distance", "rel. op. distance", "magma_r"), ("row_spearman", "row Spearman", "magma"), ("cka", "CKA", "magma")]


def make_alignment(metrics=ALIGN, scale=SCALE, block="support"):
    tensor = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
    return KernelAlignment(block=block, scale={kernel: tensor(value) for kernel, value in scale.items()},
                           metrics={kernel: {name: tensor(value) for name, value in per.items()} for kernel, per in metrics.items()},
                           per_prompt={})


def test_alignment_panels_show_each_kernel_and_metric_with_its_colour_range_and_cell_values():
    """One row per kernel (in the alignment's order), columns operator distance / row Spearman / CKA: the
    image is the [block, head] matrix (origin lower), colour ranges [0, max(1, data max)], [-1, 1],
    [0, 1], maps magma_r / magma / magma; every finite cell carries its value to 2 decimals at
    (head, block), black on bright cells and white on dark ones; ticks at every block and head; the
    first title gives the fitted scale's finite range and how many are infinite."""
    figure = plot_alignment(make_alignment(), title="mine")
    panels = [ax for ax in figure.axes if ax.get_images()]  # not the colour bars
    assert len(panels) == 6
    assert figure.texts[0].get_text() == "mine: attention pattern (support rows) vs reference kernels, brighter = closer, grey = undefined"
    expected_titles = ["exp (τ 0.5-3; ∞ in 1): rel. op. distance", "exp: row Spearman", "exp: CKA",
                       "gaussian (σ 0.7): rel. op. distance", "gaussian: row Spearman", "gaussian: CKA"]
    assert [ax.get_title() for ax in panels] == expected_titles
    limits = {("exp", "operator_distance"): (0.0, 1.7), ("gaussian", "operator_distance"): (0.0, 1.7)}  # one range for both kernels
    for index, ax in enumerate(panels):
        kernel = ("exp", "gaussian")[index // 3]
        metric, _, cmap = PANELS[index % 3]
        values = np.array(ALIGN[kernel][metric])
        image = ax.images[0]
        np.testing.assert_array_equal(np.asarray(image.get_array()), values)
        assert image.origin == "lower" and image.cmap.name == cmap
        vmin, vmax = limits.get((kernel, metric), (-1.0, 1.0) if metric == "row_spearman" else (0.0, 1.0))
        np.testing.assert_allclose(image.get_clim(), (vmin, vmax))
        assert list(ax.get_xticks()) == [0, 1] and list(ax.get_yticks()) == [0, 1, 2]
        assert ax.get_xlabel() == "head" and ax.get_ylabel() == "block"
        colours = matplotlib.colormaps[cmap]
        expected = {}
        for block in range(3):
            for head in range(2):
                value = values[block, head]
                if np.isfinite(value):
                    bright = np.mean(colours(Normalize(vmin, vmax)(value))[:3]) > 0.5
                    expected[(head, block)] = (f"{value:.2f}", "black" if bright else "white")
                else:
                    expected[(head, block)] = ("n/a", "white")
        drawn = {tuple(text.get_position()): (text.get_text(), text.get_color()) for text in ax.texts}
        assert drawn == expected
    spearman = panels[1]  # magma: -1 is near black (white text), +1 near white (black text); the NaN cell reads n/a
    colours = {text.get_text(): text.get_color() for text in spearman.texts}
    assert colours["-1.00"] == "white" and colours["1.00"] == "black" and "nan" not in colours
    distance = panels[0]  # magma_r: distance 0 is bright (black text), the largest distance dark (white text)
    colours = {text.get_text(): text.get_color() for text in distance.texts}
    assert colours["0.00"] == "black" and colours["1.70"] == "white"


def test_alignment_cells_are_annotated_up_to_64_cells_only():
    """A heatmap of 8 x 8 = 64 cells prints all 64 values; one of 5 x 13 = 65 cells prints none."""
    rng = np.random.default_rng(0)
    for shape, n_texts in [((8, 8), 64), ((5, 13), 0)]:
        metrics = {"exp": {name: rng.random(shape).tolist() for name in ("operator_distance", "row_spearman", "cka", "spearman")}}
        figure = plot_alignment(make_alignment(metrics, {"exp": np.ones(shape).tolist()}))
        panels = [ax for ax in figure.axes if ax.get_images()]
        assert [len(ax.texts) for ax in panels] == [n_texts] * 3
        assert list(panels[0].get_xticks()) == list(range(shape[1])) and list(panels[0].get_yticks()) == list(range(shape[0]))


def test_plot_kernel_alignment_titles_by_task_set_and_is_none_without_an_alignment():
    """A diagnosed task set's alignment figure starts its title with the task set's name (the block from
    the alignment); no alignment, no figure."""
    result = profile_result("shifted")
    assert plot_kernel_alignment(result) is None
    result.kernel_alignment = make_alignment(block="query")
    title = plot_kernel_alignment(result).texts[0].get_text()
    assert title == "shifted: attention pattern (query rows) vs reference kernels, brighter = closer, grey = undefined"


@pytest.mark.parametrize("values, text", [
    ([0.5, 3.0, INF, NAN], "0.5-3; ∞ in 1"),
    ([0.123456, 98765.4], "0.123-9.88e+04"),  # 3 significant digits
    ([1.05, 1.0, 1.02], "1-1.05"),  # 5% apart: a range, low first
    ([0.7, 0.7 * (1 + 1e-12), 0.7], "0.7"),  # equal up to rounding: one value
    ([NAN, NAN], "none finite"),
    ([INF, NAN, INF], "none finite; ∞ in 2"),  # NaN is not counted as infinite
])
def test_value_range_writes_the_finite_range_and_counts_the_infinite_entries(values, text):
    """Hand-written strings: low-high of the finite entries (3 significant digits), one number when they
    agree, "none finite" when none are, then "; ∞ in k" for k infinite entries (NaN not counted)."""
    assert _value_range(np.array(values)) == text


# --- sensitivities ----------------------------------------------------------------------------------

def sensitivity_result():
    """7 rows (layers 0, 2, ..., 12), scored rows 1..6, aligned steps differing from the row, 2 prompts;
    prompt 1's largest |d yhat / d y| is -9 in row 4, a row the figure leaves out."""
    rng = np.random.default_rng(3)
    layer_sens = rng.uniform(-1.0, 1.0, size=(2, 7, 2, 3))
    layer_sens[1, 2, 0, 1] = -2.5  # the largest |value| among the drawn rows of prompt 1
    layer_sens[1, 4, 1, 2] = -9.0
    layer_sens[0] *= 100.0  # prompt 0 is on another scale
    step_sens = {"cg": rng.normal(size=(2, 9, 2, 3)), "gd": rng.normal(size=(2, 9, 2, 3))}
    aligned = [0, 2, 3, 3, 5, 6, 8]
    layers = np.arange(0, 14, 2)
    score = make_score("cg", np.zeros((7, 9)), aligned, aligned, np.zeros(7), np.zeros(9), 0.9, layers=layers)
    other = make_score("gd", np.zeros((7, 9)), [0] * 7, [0] * 7, np.zeros(7), np.zeros(9), 0.1, layers=layers)
    return make_result("shifted", {"gd": other, "cg": score}, best="cg", layer_sensitivities=layer_sens, step_sensitivities=step_sens)


def test_sensitivity_figure_draws_evenly_spaced_scored_layers_above_their_aligned_steps():
    """Default 5 columns out of the 6 scored rows 1..6: positions round(linspace(0, 5, 5)) = 0, 1, 2, 4, 5, i.e.
    rows 1, 2, 3, 5, 6. Top: that row's d yhat / d y of the chosen prompt, titled with its layer; bottom:
    the best algorithm's at the row's aligned step. One symmetric colour range for all: the largest
    |value| among the drawn matrices of that prompt, model's and algorithm's (not the undrawn row's 9),
    map RdBu_r, with one colour bar."""
    result = sensitivity_result()
    figure = plot_sensitivities(result, prompt=1)
    top, bottom = figure.axes[:5], figure.axes[5:10]
    assert len(figure.axes) == 11 and figure.axes[10].get_ylabel() == "d yhat / d y"  # 10 panels and the colour bar
    rows, aligned = [1, 2, 3, 5, 6], [2, 3, 3, 6, 8]
    drawn_max = max(2.5, np.abs(result.step_sensitivities["cg"][1, aligned]).max())  # 2.5: the model's largest drawn |value|
    assert [ax.get_title() for ax in top] == [f"layer {2 * row}" for row in rows]
    assert [ax.get_title() for ax in bottom] == [f"cg step {step}" for step in aligned]
    for upper, lower, row, step in zip(top, bottom, rows, aligned):
        np.testing.assert_array_equal(np.asarray(upper.images[0].get_array()), result.layer_sensitivities[1, row])
        np.testing.assert_array_equal(np.asarray(lower.images[0].get_array()), result.step_sensitivities["cg"][1, step])
        for image in (upper.images[0], lower.images[0]):
            assert image.get_clim() == (-drawn_max, drawn_max) and image.cmap.name == "RdBu_r"
    assert "(prompt 1;" in figure.texts[0].get_text() and figure.texts[0].get_text().startswith("shifted: ")
    three = plot_sensitivities(result, prompt=0, max_columns=3)  # round(linspace(0, 5, 3)) = 0, 2, 5 (2.5 rounds to even)
    assert [ax.get_title() for ax in three.axes[:3]] == ["layer 2", "layer 6", "layer 12"]
    scale = max(np.abs(result.layer_sensitivities[0, [1, 3, 6]]).max(), np.abs(result.step_sensitivities["cg"][0, [2, 3, 8]]).max())
    assert three.axes[0].images[0].get_clim() == (-scale, scale)


def test_sensitivity_figure_without_algorithm_sensitivities_and_with_all_zero_ones():
    """No step sensitivities: the bottom row keeps its titles but draws nothing; all-zero layer
    sensitivities fall back to the colour range [-1, 1]; no layer sensitivities: no figure."""
    result = sensitivity_result()
    result.step_sensitivities = None
    result.layer_sensitivities = np.zeros_like(result.layer_sensitivities)
    figure = plot_sensitivities(result)
    bottom = figure.axes[5:]
    assert all(not ax.images for ax in bottom) and bottom[0].get_title() == "cg step 2"
    assert figure.axes[0].images[0].get_clim() == (-1.0, 1.0)
    result.layer_sensitivities = None
    assert plot_sensitivities(result) is None


# --- every figure of a diagnosis --------------------------------------------------------------------

def test_diagnosis_figures_keys_prefix_only_with_several_task_sets_and_skip_missing_figures():
    """One task set drawn: bare figure names; several: "<task set>/<figure>"; a figure the task set lacks
    (no alignment, no sensitivities) has no key; an unknown task set raises."""
    small = {name: [[0.5]] for name in ("operator_distance", "row_spearman", "cka", "spearman")}  # small figures: fast
    with_all = profile_result("a")
    with_all.kernel_alignment = make_alignment({"exp": small}, {"exp": [[1.0]]})
    with_all.layer_sensitivities, with_all.step_sensitivities = np.ones((1, 4, 1, 2)), {"cg": np.ones((1, 6, 1, 2))}
    lean = profile_result("b")
    diagnosis = Diagnosis(task_sets={"a": with_all, "b": lean}, settings={})
    assert set(diagnosis_figures(diagnosis)) == {"a/error_profiles", "a/step_map", "a/kernel_alignment", "a/sensitivities",
                                                 "b/error_profiles", "b/step_map"}
    one = diagnosis_figures(diagnosis, "b")
    assert set(one) == {"error_profiles", "step_map"}
    assert one["error_profiles"].axes[0].get_title() == "b: error profiles"
    single = Diagnosis(task_sets={"b": lean}, settings={})
    assert set(diagnosis_figures(single)) == {"error_profiles", "step_map"}
    with pytest.raises(ValueError, match="task_set must be one of"):
        diagnosis_figures(diagnosis, "c")
