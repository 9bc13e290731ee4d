"""Usage review of the figures, read as a researcher reads them: `Diagnosis.plot()` /
`probes.plots`, `probes.compare(...).plot()` and the reproduction figures. Figures are read back
through matplotlib's artists (line data, image arrays, colour limits, patches, texts), never
pixels, and compared with NumPy recomputations from the diagnosis' stored predictions or with
hand-written values. The tests after "findings" are the review's findings, each now fixed:
unreadable or misleading colour ranges, undefined values drawn as real ones, hidden models and
intervals, unclear errors."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

import probes  # noqa: E402
from mi_krr.construct import gd_transformer  # noqa: E402
from mi_krr.reproductions.richardson_profile import LensResult, RichardsonProfileResult  # noqa: E402
from mi_krr.tasks.samplers import LinearRegressionSampler  # noqa: E402
from probes.compare import SummaryRow, plot_overview  # noqa: E402
from probes.diagnosis import TaskSetDiagnosis  # noqa: E402
from probes.identifiability import Verdict  # noqa: E402
from probes.kernel_alignment import KernelAlignment  # noqa: E402
from probes.plots import plot_alignment, plot_error_profiles, plot_sensitivities, plot_step_map  # noqa: E402
from probes.scoring import AlgorithmScore  # noqa: E402

LAM = 0.1


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def gd_diagnosis():
    """A real diagnosis of the GD construction (4 steps, exact) on 12 linear-regression prompts:
    three candidates, no bootstrap, no kernel alignment (linear attention), fitted global steps."""
    task = LinearRegressionSampler(dim=3, condition_number=10.0, noise_std=0.1).sample(12, 10, 3, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + LAM))
    model = gd_transformer(n_steps=4, lr=lr, lam=LAM, dim=3)
    return probes.diagnose(model, task, algorithms=("cg", "gd", "heavy_ball"), lam=LAM, n_steps=6, kernels=(), bootstrap=0,
                           progress=False)


def numpy_r2(layers: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """R2 of each layer's predictions `[B, L', m]` as predictions of each step's `[B, T+1, m]`,
    pooled over prompts and queries, centred by each step's mean (NaN where a step has no variance)."""
    lf = layers.transpose(1, 0, 2).reshape(layers.shape[1], -1)
    sf = steps.transpose(1, 0, 2).reshape(steps.shape[1], -1)
    sst = ((sf - sf.mean(1, keepdims=True)) ** 2).sum(1)
    sse = ((lf[:, None, :] - sf[None]) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 1e-12 * (sf**2).sum(1), 1.0 - sse / sst, np.nan)


# ---------------------------------------------------------------- verified behaviour (passing)


def test_error_profiles_of_a_real_diagnosis_equal_numpy_log_mse_to_krr(gd_diagnosis):
    """Every algorithm's line is log10 of its step predictions' MSE to the stored KRR predictions
    (NumPy, pooled over prompts and queries), and the model's points are the layers' log10 MSE at
    the best algorithm's aligned steps (read from `to_dataframe()`'s aligned rows)."""
    result = gd_diagnosis["tasks"]
    krr = result.krr_predictions
    lines = {line.get_label(): line for line in plot_error_profiles(result).axes[0].get_lines()}
    for name, steps in result.step_predictions.items():
        expected = np.log10(((steps - krr[:, None]) ** 2).mean(axis=(0, 2)))
        finite = expected > -25  # the floor (eps^2 x mean square) only matters at exact convergence
        np.testing.assert_allclose(lines[name].get_ydata()[finite], expected[finite], rtol=1e-10, atol=1e-10)
    best = result.verdict.best
    frame = gd_diagnosis.to_dataframe()
    aligned = frame[(frame.algorithm == best) & frame.aligned].sort_values("layer").step.to_numpy()
    model = lines[f"model layers at {best} steps"]
    np.testing.assert_array_equal(model.get_xdata(), aligned)
    np.testing.assert_allclose(model.get_ydata(), np.log10(((result.layer_predictions - krr[:, None]) ** 2).mean(axis=(0, 2))),
                               rtol=1e-10)


def test_step_map_of_a_real_diagnosis_draws_numpy_r2_and_the_dataframes_alignment(gd_diagnosis):
    """The step map's image equals R2 recomputed in NumPy from the stored layer and step
    predictions, clipped to [0, 1], wherever R2 is defined; the white path and the right panel's
    best line are the dataframe's aligned steps; the GD construction aligns layer l with gd step l."""
    result = gd_diagnosis["tasks"]
    best = result.verdict.best
    assert best == "gd"
    figure = plot_step_map(result)
    drawn = np.asarray(figure.axes[0].images[0].get_array())
    r2 = numpy_r2(result.layer_predictions, result.step_predictions[best])
    defined = np.isfinite(r2)
    np.testing.assert_allclose(drawn[defined], np.clip(r2, 0, 1)[defined], atol=1e-9)
    frame = gd_diagnosis.to_dataframe()
    aligned = frame[(frame.algorithm == best) & frame.aligned].sort_values("layer").step.to_numpy()
    np.testing.assert_array_equal(aligned, [0, 1, 2, 3, 4])
    path = [line for line in figure.axes[0].get_lines() if line.get_label() == "monotone alignment"][0]
    np.testing.assert_array_equal(path.get_xdata(), aligned)
    right = {line.get_label().split(" (")[0]: line for line in figure.axes[1].get_lines()}
    np.testing.assert_array_equal(right["gd"].get_ydata(), aligned)


def test_plot_returns_figures_a_notebook_user_can_modify_and_save(gd_diagnosis, tmp_path):
    """`Diagnosis.plot()` returns matplotlib Figures by name; a user can retitle an axis and save."""
    figures = gd_diagnosis.plot()
    assert set(figures) == {"error_profiles", "step_map"}  # no alignment (linear attention), no sensitivities
    for name, figure in figures.items():
        assert isinstance(figure, matplotlib.figure.Figure)
        figure.axes[0].set_title("mine")
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def lens(scores, ci, best, aligned, model_profile, algorithm_profiles):
    return LensResult(scores=scores, score_ci=ci, profile_distance={name: 0.0 for name in scores}, aligned_steps=aligned,
                      model_profile=model_profile, algorithm_profiles=algorithm_profiles, best=best, identified=False,
                      runner_up=None, gap=None, gap_ci=None, equivalent=[], message="")


PROFILES = {"richardson_rowsum": [0.0, -0.5, -1.0, -1.5], "richardson_jacobi": [0.0, -0.4, -0.8, -1.2],
            "gd": [0.0, -0.3, -0.6, -0.9], "cg": [0.0, -1.0, -2.0, -3.0], "heavy_ball": [0.0, -0.7, -1.1, -1.3]}


def profile_result():
    """A hand-built richardson-profile result whose readout lens is best matched by heavy ball."""
    scores = {"heavy_ball": 0.86, "richardson_rowsum": 0.84, "gd": 0.81, "richardson_jacobi": 0.80, "cg": 0.70}
    ci = {name: (value - 0.05, value + 0.03) for name, value in scores.items()}
    aligned = {name: [1, 2, 3] for name in scores}
    readout = lens(scores, ci, "heavy_ball", aligned, [-0.3, -0.7, -1.2], PROFILES)
    return RichardsonProfileResult(checkpoint="checkpoints/softmax_gp", lenses={"readout": readout}, layers=[1, 2, 3], n_steps=3,
                                   lam=0.04, kernel="gaussian", batch_size=16, train_batch_size=64, step_sizes="fitted")


def test_richardson_profile_bars_are_the_scores_in_ranking_order_with_their_interval():
    """The bar panel draws each algorithm's path R2 in ranking order, and each error bar spans the
    stored 95% interval (hand-written values)."""
    figure = profile_result().plot()
    bars = figure.axes[0]
    assert [label.get_text() for label in bars.get_xticklabels()] == ["heavy_ball", "richardson_rowsum", "gd", "richardson_jacobi", "cg"]
    np.testing.assert_allclose([patch.get_height() for patch in bars.patches], [0.86, 0.84, 0.81, 0.80, 0.70])
    errorbar = [c for c in bars.containers if isinstance(c, matplotlib.container.ErrorbarContainer)][0]
    segments = errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([(seg[0][1], seg[1][1]) for seg in segments],
                               [(v - 0.05, v + 0.03) for v in [0.86, 0.84, 0.81, 0.80, 0.70]], atol=1e-12)


def test_richardson_profile_legends_cover_no_bar_and_no_curve():
    """The bar legend sits in the band above path R2 = 1 (R2 cannot exceed 1), and the y ticks stop
    at 1; the profile legend lies right of its axes. Checked on the drawn extents (display
    coordinates) against the bars' tops and the axes' box."""
    figure = profile_result().plot()
    figure.canvas.draw()
    bars, profiles = figure.axes[:2]
    legend_box = bars.get_legend().get_window_extent()
    tallest = max(patch.get_window_extent().y1 for patch in bars.patches)
    error_top = max(line.get_window_extent().y1 for line in bars.collections)
    assert legend_box.y0 > max(tallest, error_top)
    assert max(bars.get_yticks()) == 1.0
    assert profiles.get_legend().get_window_extent().x0 > profiles.get_window_extent().x1


def test_layers_aligned_to_one_step_share_one_label_at_the_runs_last_point():
    """A random model's layers all sit at step 0, and 13 labels stacked on one point were
    unreadable: runs of layers at one step get one label "first-last" (hand-written runs)."""
    import matplotlib.pyplot as plt

    from probes.plots import annotate_layers

    figure, ax = plt.subplots()
    annotate_layers(ax, [0, 1, 2, 3, 4, 5], [0, 0, 2, 2, 2, 5], [0.0, -0.1, -0.2, -0.3, -0.4, -0.5])
    assert [(text.get_text(), tuple(text.xy)) for text in ax.texts] == [("0-1", (0, -0.1)), ("2-4", (2, -0.4)), ("5", (5, -0.5))]
    plt.close(figure)


# ---------------------------------------------------------------- findings (fixed)


def make_verdict(best):
    return Verdict(best=best, score=0.5, score_ci=(0.4, 0.6), runner_up=None, gap=0.0, gap_ci=(0.0, 0.0), equivalent=[],
                   identified=False, algorithms=[best], agreement=np.ones((1, 1)), separable=np.zeros((1, 1), dtype=bool),
                   min_score=0.9, min_gap=0.01, agreement_threshold=0.99, message="not identified")


def make_score(r2, aligned, n_steps):
    r2 = np.asarray(r2, dtype=float)
    n_rows = r2.shape[0]
    return AlgorithmScore(
        algorithm="cg", layers=np.arange(n_rows), scored=np.arange(1, n_rows), r2=r2, mse=np.zeros_like(r2),
        aligned_steps=np.asarray(aligned), argmin_steps=np.asarray(aligned), aligned_r2=np.zeros(n_rows),
        aligned_r2_ci=np.zeros((n_rows, 2)), score=0.5, score_ci=(0.4, 0.6), score_samples=np.zeros(3),
        model_profile=np.linspace(0, -1, n_rows), algorithm_profile=np.linspace(0, -2, n_steps + 1), profile_distance=0.0,
        profile_steps=np.asarray(aligned), profile_aligned_distance=0.0, weighted_r2=None,
    )


def make_result(score, layer_sensitivities=None, step_sensitivities=None, alignment=None):
    n_rows, n_columns = score.r2.shape
    return TaskSetDiagnosis(
        name="tasks", info={}, kernel="linear", kernel_params={}, lam=0.1, n_steps=n_columns - 1, n_support=3,
        layers=list(score.layers), kappa=np.ones(2), layer_predictions=np.zeros((2, n_rows, 2)), krr_predictions=np.zeros((2, 2)),
        step_predictions={}, scores={"cg": score}, verdict=make_verdict("cg"), layer_sensitivities=layer_sensitivities,
        step_sensitivities=step_sensitivities, kernel_alignment=alignment,
    )


def sensitivity_result():
    """Two prompts, 3 layers (0, 1, 2), 3 steps, 2 queries x 3 support labels; the algorithm's
    sensitivities reach 5, the model's only 1."""
    score = make_score(np.full((3, 3), 0.5), [0, 1, 2], 2)
    layer_sens = np.zeros((2, 3, 2, 3))
    layer_sens[:, 1:, 0, 0] = 1.0
    step_sens = np.zeros((2, 3, 2, 3))
    step_sens[:, 1:, 0, 0] = 5.0
    return make_result(score, layer_sensitivities=layer_sens, step_sensitivities={"cg": step_sens})


def test_sensitivity_figure_refuses_a_prompt_out_of_range_naming_it():
    """A prompt index past the batch is refused with a ValueError naming `prompt` and the range."""
    with pytest.raises(ValueError, match="prompt"):
        plot_sensitivities(sensitivity_result(), prompt=5)


def test_sensitivity_figure_refuses_zero_columns_naming_max_columns():
    """max_columns=0 is refused with a ValueError naming `max_columns`."""
    with pytest.raises(ValueError, match="max_columns"):
        plot_sensitivities(sensitivity_result(), max_columns=0)


def test_sensitivity_colour_range_covers_the_algorithm_rows_too():
    """Model and algorithm rows share one colour range, so it must reach the largest |d yhat / d y|
    of either (5 here, the algorithm's), not only the model's (1)."""
    figure = plot_sensitivities(sensitivity_result())
    limits = {image.get_clim() for ax in figure.axes for image in ax.images}
    assert limits == {(-5.0, 5.0)}


def test_sensitivity_figure_has_a_colour_bar():
    """A heatmap of d yhat / d y needs a colour bar to read values from (the other heatmaps have one)."""
    figure = plot_sensitivities(sensitivity_result())
    n_heatmaps = sum(bool(ax.images) for ax in figure.axes)
    assert len(figure.axes) > n_heatmaps  # a colour-bar axes besides the heatmaps


def test_step_map_draws_undefined_r2_as_a_gap_not_as_zero():
    """R2 is NaN where a step has no variance (step 0): the image must mask it (a gap / 'bad'
    colour), not draw it as R2 = 0."""
    r2 = np.array([[np.nan, 0.2, 0.3], [np.nan, 0.9, 0.5], [np.nan, 0.4, 0.95]])
    figure = plot_step_map(make_result(make_score(r2, [0, 1, 2], 2)))
    drawn = figure.axes[0].images[0].get_array()
    assert np.ma.getmaskarray(drawn)[:, 0].all() or np.isnan(np.asarray(drawn, dtype=float)[:, 0]).all()


def alignment_result(exp_distance, gaussian_distance, spearman=None):
    shape = np.shape(exp_distance)
    spearman = np.zeros(shape) if spearman is None else spearman

    def metrics(distance):
        return {"operator_distance": torch.tensor(distance, dtype=torch.float64),
                "row_spearman": torch.tensor(spearman, dtype=torch.float64),
                "cka": torch.tensor(np.zeros(shape), dtype=torch.float64)}

    alignment = KernelAlignment.__new__(KernelAlignment)
    alignment.metrics = {"exp": metrics(exp_distance), "gaussian": metrics(gaussian_distance)}
    alignment.scale = {"exp": torch.ones(shape, dtype=torch.float64), "gaussian": torch.ones(shape, dtype=torch.float64)}
    alignment.block = "query"
    return alignment


def test_alignment_operator_distance_panels_share_one_colour_range():
    """The exp and Gaussian rows are read against each other ("which kernel is closer"), so their
    operator-distance panels must share a colour range: here [0, 2], the larger data maximum."""
    figure = plot_alignment(alignment_result([[0.5, 2.0]], [[0.3, 1.2]]))
    limits = [ax.images[0].get_clim() for ax in figure.axes if ax.images and "rel. op. distance" in ax.get_title()]
    assert limits == [(0.0, 2.0), (0.0, 2.0)]


def test_alignment_nan_cells_are_not_drawn_in_the_closest_colour():
    """An undefined metric (NaN: a uniform head's row Spearman, a non-kernel block) must not look
    like the best value: the colour map's 'bad' colour must be opaque and far from both ends."""
    figure = plot_alignment(alignment_result([[0.5, np.nan]], [[0.3, np.nan]], spearman=[[0.5, np.nan]]))
    for ax in figure.axes:
        if not ax.images:
            continue
        cmap = ax.images[0].cmap
        bad = np.array(to_rgba(cmap.get_bad()))
        assert bad[3] > 0.5, ax.get_title()
        for end in (cmap(0.0), cmap(1.0)):
            assert np.abs(bad[:3] - np.array(end[:3])).max() > 0.25, ax.get_title()


def row(model, score, identified=False, best="cg", exp=math.nan, exp_uniform=False, ci=None):
    return SummaryRow(model=model, task_set="in_distribution", best=best, score=score,
                      score_ci=ci if ci is not None else (score - 0.1, score + 0.05), step_map="1:1", identified=identified,
                      exp_distance=exp, gaussian_distance=math.nan, exp_uniform=exp_uniform)


def test_overview_draws_no_point_where_no_algorithm_is_best():
    """A row whose best is None (every candidate's path R2 -inf) has no score to draw: a gap, not a
    marker at SCORE_FLOOR indistinguishable from a finite score of -6."""
    figure = plot_overview([row("random", -6.0, best="richardson_rowsum"), row("none", -math.inf, best=None)])
    points = [line for line in figure.axes[0].get_lines() if line.get_color() == "C1"]
    assert all(not np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in points)


def test_overview_marks_kernel_distances_to_uniform_attention():
    """The tables mark a distance whose best head is uniform attention with 'u' (a distance to
    mean pooling, not a kernel); the figure must mark it too (a text or legend entry saying so)."""
    figure = plot_overview([row("random", 0.5, exp=0.14, exp_uniform=True), row("trained", 0.8, exp=0.6)])
    right = figure.axes[1]
    texts = [text.get_text() for text in right.texts]
    if right.get_legend() is not None:
        texts += [text.get_text() for text in right.get_legend().get_texts()]
    assert any("uniform" in text or text.strip() == "u" or text.endswith("u") for text in texts)


def test_overview_draws_each_path_r2_with_its_interval():
    """The left panel's point for a model must carry its 95% interval (an error bar whose ends are
    score_ci), so shifts and models can be compared beyond noise."""
    figure = plot_overview([row("a", 0.8, ci=(0.7, 0.85))])
    segments = [seg for collection in figure.axes[0].collections for seg in collection.get_segments()]
    assert any(np.allclose(sorted(point[1] for point in seg), [0.7, 0.85]) for seg in segments)


def test_overview_keeps_models_with_equal_scores_visible():
    """The demo's two constructions both score 1.0 in distribution; their markers must not coincide
    (a per-model offset), or the first model disappears from the figure."""
    figure = plot_overview([row("cg_construction", 1.0, identified=True), row("richardson_construction", 1.0, identified=True)])
    spots = {}
    for line in figure.axes[0].get_lines():
        if line.get_marker() == "o":
            spots.setdefault(line.get_color(), set()).update(zip(line.get_xdata(), line.get_ydata()))
    assert len(spots) == 2 and not set.intersection(*spots.values())


def test_plot_titles_name_the_model_when_given(gd_diagnosis):
    """Figures of several models in one notebook must be told apart: `plot(model="gd_net")` starts
    every title with "gd_net, tasks"; without it the titles start with the task set."""
    named = gd_diagnosis.plot(model="gd_net")
    assert named["error_profiles"].axes[0].get_title() == "gd_net, tasks: error profiles"
    assert named["step_map"].axes[1].get_title() == "gd_net, tasks: best-matching step per layer"
    assert gd_diagnosis.plot()["error_profiles"].axes[0].get_title() == "tasks: error profiles"
    with pytest.raises(ValueError, match="model must be"):
        gd_diagnosis.plot(model=3)


def test_richardson_profile_draws_the_curve_the_model_is_aligned_to():
    """The error-profile panel puts the readout lens's layers at heavy ball's aligned steps; heavy
    ball's own profile must be drawn, or the points have no curve to be read against."""
    figure = profile_result().plot()
    labels = [line.get_label() for line in figure.axes[1].get_lines()]
    assert "heavy_ball" in labels


def test_overview_draws_an_interval_that_excludes_its_point_estimate():
    """A percentile interval need not contain the estimate (here 0.8 with interval [0.82, 0.9]):
    the overview draws it (the bar reaches the interval's far end from the point) rather than
    raising matplotlib's 'yerr must not contain negative values'."""
    figure = plot_overview([row("a", 0.8, ci=(0.82, 0.9))])
    segments = [seg for collection in figure.axes[0].collections for seg in collection.get_segments()]
    assert any(np.allclose(sorted(point[1] for point in seg), [0.8, 0.9]) for seg in segments)
