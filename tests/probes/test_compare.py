"""`probes.compare`: several models' diagnoses side by side, each row checked against the
diagnoses' own statistics recomputed by hand (best = argmax of the scores, the exp-kernel
distance as a NumPy min over heads and mean over layers, the step map from the aligned steps)."""

import html
import math
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import probes
from brute_force import best_head_choices, uniform_best_head
from mi_krr.construct import cg_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks.samplers import GPRegressionSampler
from probes.compare import MODEL_OFFSET, UNIFORM_NOTE

TEMPERATURE, NOISE = 2.0, 0.2
SETS = ("label_noise_0.5", "zz_custom", "in_distribution", "input_scale_x2", "a_custom")
ORDERED = ("in_distribution", "input_scale_x2", "label_noise_0.5", "a_custom", "zz_custom")
"""`SETS` in the overview's order: in distribution, then `DEFAULT_SHIFTS` order, then by name."""


@pytest.fixture(scope="module")
def comparison():
    sampler = GPRegressionSampler(dim=3, kernel="exp", temperature=TEMPERATURE, noise_std=NOISE)
    tasks = {name: sampler.sample(24, 6, 3, seed=index) for index, name in enumerate(SETS)}
    torch.manual_seed(0)
    softmax = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2)).eval()
    cg = cg_transformer(n_steps=2, lam=NOISE**2, kernel="exp", dim=3, temperature=TEMPERATURE, head_width=128)
    common = dict(n_steps=4, bootstrap=100, progress=False, algorithms=("gd", "cg", "richardson_jacobi"))
    diagnoses = {"cg": probes.diagnose(cg, tasks, kernels=(), **common), "softmax": probes.diagnose(softmax, tasks, **common)}
    return diagnoses, probes.compare(diagnoses)


def expected_kernel_distance(result, kernel):
    if result.kernel_alignment is None:
        return math.nan
    per_layer = [distance for _, distance, _ in best_head_choices(result.kernel_alignment, kernel)]
    return float(np.mean(per_layer)) if per_layer else math.nan


def test_rows_are_each_models_best_algorithm_interval_verdict_step_map_and_kernel_distance(comparison):
    diagnoses, result = comparison
    assert [(row.model, row.task_set) for row in result.rows] == [(model, name) for model in diagnoses for name in SETS]
    for row in result.rows:
        task_set = diagnoses[row.model][row.task_set]
        best = max(task_set.scores.values(), key=lambda score: score.score)
        assert row.best == (best.algorithm if best.score > -math.inf else None)  # every path R2 -inf / NaN: none is best
        assert row.score == best.score and row.score_ci == tuple(best.score_ci)
        assert row.identified == task_set.verdict.identified
        assert row.step_map == " ".join(f"{layer}:{step}" for layer, step in zip(best.layers, best.aligned_steps) if layer > 0)
        for kernel, distance in (("exp", row.exp_distance), ("gaussian", row.gaussian_distance)):
            expected = expected_kernel_distance(task_set, kernel)
            assert (math.isnan(distance) and math.isnan(expected)) or distance == pytest.approx(expected, rel=1e-12)
    assert all(row.identified and row.best == "cg" for row in result.rows if row.model == "cg")  # the positive control
    assert all(math.isnan(row.exp_distance) and math.isnan(row.gaussian_distance) for row in result.rows if row.model == "cg")
    assert all(0 < row.exp_distance < math.inf and 0 < row.gaussian_distance < math.inf for row in result.rows if row.model == "softmax")
    assert any(row.exp_distance != row.gaussian_distance for row in result.rows)


def test_dataframe_and_table_carry_every_row(comparison):
    diagnoses, result = comparison
    frame = result.to_dataframe()
    assert list(frame.columns) == ["model", "task_set", "best", "score", "ci_low", "ci_high", "identified", "withheld", "exp_distance",
                                   "exp_uniform", "gaussian_distance", "gaussian_uniform", "step_map"]
    assert len(frame) == len(result.rows) == 2 * len(SETS)
    for record, row in zip(frame.to_dict("records"), result.rows):
        best = record["best"] if isinstance(record["best"], str) else None  # pandas shows a None best as NaN
        assert (record["model"], record["task_set"], best, record["identified"], record["step_map"]) == (
            row.model, row.task_set, row.best, row.identified, row.step_map)
        assert (record["score"], record["ci_low"], record["ci_high"]) == (row.score, *row.score_ci)
        np.testing.assert_array_equal([record["exp_distance"], record["gaussian_distance"]], [row.exp_distance, row.gaussian_distance])
    lines = result.summary().splitlines()
    assert lines[0].split()[:3] == ["model", "task", "set"] and set(lines[1]) <= {"-", " "}
    marked = [[uniform_best_head(diagnoses[row.model][row.task_set].kernel_alignment, kernel) for kernel in ("exp", "gaussian")]
              for row in result.rows]
    assert any(map(any, marked))  # random heads: some best head is fitted as uniform attention
    assert lines[-1] == UNIFORM_NOTE
    for line, row, marks in zip(lines[2:-1], result.rows, marked, strict=True):
        fields = line.split()
        assert fields[:3] == [row.model, row.task_set, row.best if row.score > -math.inf else "-"]  # -inf: no best
        assert float(fields[3]) == pytest.approx(row.score, abs=5e-5)
        assert fields[6] == ("yes" if row.identified else "no")
        for field, distance, mark in zip(fields[7:9], (row.exp_distance, row.gaussian_distance), marks):
            assert field == ("-" if math.isnan(distance) else f"{distance:.3f}" + "u" * mark)
        assert " ".join(fields[9:]) == row.step_map
    assert repr(result).splitlines()[0] == "Comparison(2 models, 10 rows)"


class _TableCells(HTMLParser):
    """The text of every <th> / <td> of an HTML table, row by row (the standard library's parser)."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def html_cells(text):
    parser = _TableCells()
    parser.feed(text)
    return parser.rows


def expected_cells(task_set):
    """One task set's row, written from its own scores and verdict by hand."""
    best = max(task_set.scores.values(), key=lambda score: score.score)
    distances = []
    for kernel in ("exp", "gaussian"):  # marked "u" where some layer's best head is fitted as uniform attention
        distance = expected_kernel_distance(task_set, kernel)
        distances.append("-" if math.isnan(distance) else f"{distance:.3f}" + "u" * uniform_best_head(task_set.kernel_alignment, kernel))
    steps = " ".join(f"{layer}:{step}" for layer, step in zip(best.layers, best.aligned_steps) if layer > 0)
    return [task_set.name, best.algorithm if best.score > -math.inf else "-", f"{best.score:.4f} [{best.score_ci[0]:.3f}, {best.score_ci[1]:.3f}]",
            "yes" if task_set.verdict.identified else "no", *distances, steps]


def test_notebooks_show_comparison_and_diagnosis_as_html_tables_of_the_same_cells(comparison):
    """`_repr_html_` (what Jupyter renders): the header, then one row per model and task set, each
    cell as written by hand from the diagnosis, then the footnote on uniform best heads (these
    random heads have some); a markup character in a name is escaped."""
    diagnoses, result = comparison
    rows = html_cells(result._repr_html_())
    assert rows[0] == ["model", "task set", "best algorithm", "path R2 [95% CI]", "identified", "exp-kernel dist",
                       "gauss-kernel dist", "best-step map (layer:step)"]
    assert rows[1:] == [[model, *expected_cells(diagnoses[model][name])] for model in diagnoses for name in SETS]
    one_model = html_cells(diagnoses["softmax"]._repr_html_())
    assert one_model[0] == rows[0][1:] and one_model[1:] == [expected_cells(diagnoses["softmax"][name]) for name in SETS]
    assert result._repr_html_().endswith(f"</table><p>{html.escape(UNIFORM_NOTE)}</p>")
    assert "<td>a&lt;b</td>" in probes.compare({"a<b": diagnoses["cg"]})._repr_html_()


def test_diagnosis_repr_names_each_task_sets_best_algorithm_score_and_verdict(comparison):
    diagnoses, _ = comparison
    parts = repr(diagnoses["cg"]).removeprefix("Diagnosis(").removesuffix(")").split("; ")
    for part, name in zip(parts, SETS, strict=True):
        task_set = diagnoses["cg"][name]
        best = max(task_set.scores.values(), key=lambda score: score.score)
        verdict = "identified" if task_set.verdict.identified else "not identified"
        assert part == f"{name}: best {best.algorithm} (path R2 {best.score:.3f}), {verdict}"


def test_overview_plots_clipped_scores_in_task_set_order_and_both_distances_only_where_attention_is_a_kernel(comparison):
    _, result = comparison
    figure = result.plot()
    left, right = figure.axes
    assert [label.get_text() for label in left.get_xticklabels()] == list(ORDERED)
    for model_index, model in enumerate(("cg", "softmax")):
        by_set = {row.task_set: row for row in result.rows if row.model == model}
        line = next(line for line in left.lines if line.get_label() == model)
        np.testing.assert_allclose(line.get_xdata(), np.arange(len(ORDERED)) + (model_index - 0.5) * MODEL_OFFSET)  # side by side
        expected = [max(by_set[name].score, -0.5) if by_set[name].best is not None else np.nan for name in ORDERED]  # no best: a gap
        np.testing.assert_array_equal(line.get_ydata(), expected)
        markers = [marker for marker in left.lines if marker.get_color() == f"C{model_index}" and marker.get_marker() in ("o", "v")]
        drawn = [name for name in ORDERED if by_set[name].best is not None]
        assert [marker.get_marker() == "v" for marker in markers] == [by_set[name].score < -0.5 for name in drawn]  # below the floor
        assert [marker.get_markerfacecolor() != "white" for marker in markers] == [by_set[name].identified for name in drawn]
    assert [line.get_label() for line in right.lines] == ["softmax (exp)", "softmax (Gaussian)"]
    for line, kernel in zip(right.lines, ("exp_distance", "gaussian_distance")):
        by_set = {row.task_set: getattr(row, kernel) for row in result.rows if row.model == "softmax"}
        np.testing.assert_array_equal(line.get_ydata(), [by_set[name] for name in ORDERED])
    assert figure._suptitle.get_text() == "Overview: cg, softmax"  # default title: the models, in order
    assert result.plot(title="two architectures")._suptitle.get_text() == "two architectures"


@pytest.mark.parametrize(
    "diagnoses, message",
    [
        ({}, "non-empty dict"),
        ([("a", None)], "non-empty dict"),
        ({1: None}, "keys must be model names"),
        ({"a": "not a diagnosis"}, r"diagnoses\['a'\] must be the Diagnosis"),
    ],
)
def test_bad_input_is_refused_with_the_fix(diagnoses, message):
    with pytest.raises(ValueError, match=message):
        probes.compare(diagnoses)


def test_notes_name_candidate_lists_and_krr_systems_that_differ_between_models(comparison):
    """The fixture's models share candidates, method, step sizes and prompts (no note). A copy
    of the softmax diagnosis with one candidate fewer and one task set solved at lam 0.5 must get
    one note naming both candidate lists and one naming the set and both lams; the summary and
    the notebook table print them."""
    import dataclasses

    diagnoses, result = comparison
    assert result.notes == []
    softmax = diagnoses["softmax"]
    settings = {**softmax.settings, "algorithms": {"gd": "registry", "cg": "registry"}}
    changed = dataclasses.replace(softmax["input_scale_x2"], lam=0.5)
    altered = dataclasses.replace(softmax, settings=settings, task_sets={**softmax.task_sets, "input_scale_x2": changed})
    notes = probes.compare({"cg": diagnoses["cg"], "softmax": altered}).notes
    assert len(notes) == 2
    assert "candidate algorithms" in notes[0] and notes[0].endswith(": shared: gd, cg; cg also: richardson_jacobi.")
    assert "'input_scale_x2'" in notes[1] and f"lam={NOISE**2:g}" in notes[1] and "lam=0.5" in notes[1]
    shown = probes.compare({"cg": diagnoses["cg"], "softmax": altered})
    assert all(f"Note: {note}" in shown.summary() for note in notes)
    assert all(html.escape(note) in shown._repr_html_() for note in notes)


def test_notes_group_models_by_setting_and_name_each_models_own_candidates(comparison):
    """Three models: step sizes "fitted" for two and "optimal" for one are grouped by value; with
    candidate lists {gd, cg}, {cg, newton (a custom solver)} and {gd}, none is shared by all three,
    and each model's own candidates are listed, the custom one with how it is recorded."""
    import dataclasses

    diagnoses, _ = comparison
    softmax = diagnoses["softmax"]

    def variant(algorithms, step_sizes):
        return dataclasses.replace(softmax, settings={**softmax.settings, "algorithms": algorithms, "step_sizes": step_sizes})

    notes = probes.compare({
        "a": variant({"gd": "registry", "cg": "registry"}, "fitted"),
        "b": variant({"cg": "registry", "newton": "my_solver(step=2)"}, "optimal"),
        "c": variant({"gd": "registry"}, "fitted"),
    }).notes
    assert notes[0].endswith(": shared: none; a also: gd, cg; b also: cg, newton (my_solver(step=2)); c also: gd.")
    assert notes[1] == "the models were diagnosed with different step sizes: a, c: fitted; b: optimal."
