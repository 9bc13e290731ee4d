"""The report writers and their tables and figures against independent references: `probes.compare`'s
kernel distance, text table and overview figure on hand-built inputs, `probes.report`'s file
stems, summary and report folder, the overview report that `mi-krr demo` / `mi-krr diagnose`
write (index.md, report.json, figures, per-model npz), all checked against the diagnoses' stored
arrays recomputed with NumPy (argmax of the scores, min over heads and mean over layers, median
and range of kappa), and softmax-ood's key numbers and figure on a hand-built result."""

import dataclasses
import json
import math
import re
import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

import probes
from brute_force import uniform_best_head
from mi_krr.commands.overview import ModelEntry, write_overview_report
from mi_krr.construct import cg_transformer, gd_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.reproductions.softmax_ood import SoftmaxOODResult
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from probes.compare import MODEL_OFFSET, UNIFORM_NOTE, SummaryRow, format_table, kernel_distance, plot_overview
from probes.kernel_alignment import KernelAlignment
from probes.report import _file_stems, task_set_summary

TEMPERATURE, NOISE, BATCH, N_SUPPORT, N_QUERY = 2.0, 0.2, 6, 5, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOTES = {("cg construction", "input_scale_x2"): ["b: second note", "a: first note"],
         ("cg construction", "in_distribution"): ["a: first note"],
         ("softmax", "in_distribution"): ["c: third note"], ("softmax", "scale x2"): []}
"""Notes set by hand on each (model, task set): a report lists their sorted union per model."""
DESCRIPTIONS = {"cg construction": "the CG construction.", "softmax": "a random softmax model."}


def reject_constant(name):
    raise AssertionError(f"non-strict JSON constant {name}")


@pytest.fixture(scope="module")
def diagnoses():
    """Two tiny models on exp-kernel GP prompts: the CG construction (no kernel alignment) with its
    in-distribution set second, and a random softmax transformer (exp and Gaussian alignment) with
    a task-set name that is not a file name."""
    sampler = GPRegressionSampler(dim=3, kernel="exp", temperature=TEMPERATURE, noise_std=NOISE)
    common = dict(n_steps=3, bootstrap=20, progress=False, algorithms=("gd", "cg"))

    def draw(seed):
        return sampler.sample(BATCH, N_SUPPORT, N_QUERY, seed=seed)

    cg = cg_transformer(n_steps=2, lam=NOISE**2, kernel="exp", dim=3, temperature=TEMPERATURE, head_width=64)
    torch.manual_seed(0)
    softmax = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2)).eval()
    result = {
        "cg construction": probes.diagnose(cg, {"input_scale_x2": draw(1), "in_distribution": draw(2)}, kernels=(), **common),
        "softmax": probes.diagnose(softmax, {"in_distribution": draw(3), "scale x2": draw(4)}, **common),
    }
    for (model, name), notes in NOTES.items():
        result[model].task_sets[name].notes = list(notes)
    return result


def numpy_kernel_distance(result, kernel):
    """Min over the finite heads of each layer, mean over the layers that have one (NaN without that kernel)."""
    if result.kernel_alignment is None or kernel not in result.kernel_alignment.metrics:
        return math.nan
    distance = result.kernel_alignment.metrics[kernel]["operator_distance"].double().numpy()
    per_layer = [min(value for value in row if np.isfinite(value)) for row in distance if np.isfinite(row).any()]
    return float(np.mean(per_layer)) if per_layer else math.nan


def expected_row(model, name, result):
    """A table row from the stored scores: best = argmax of the path R2s."""
    names = list(result.scores)
    best = result.scores[names[int(np.argmax([result.scores[key].score for key in names]))]]
    return {
        "model": model, "task_set": name, "best": best.algorithm if best.score > -math.inf else None,  # -inf / NaN: none is best
        "score": best.score, "score_ci": [*best.score_ci],
        "step_map": " ".join(f"{layer}:{step}" for layer, step in zip(best.layers, best.aligned_steps) if layer > 0),
        "identified": bool(result.verdict.identified),
        "exp_distance": numpy_kernel_distance(result, "exp"), "gaussian_distance": numpy_kernel_distance(result, "gaussian"),
    }


def assert_arrays_of(arrays, diagnosis):
    """The npz holds the stored layer / KRR / step predictions and kappa of every task set under
    their documented keys; every other entry is the lossless archive's (its manifest and its
    numbered arrays: `probes.diagnosis_archive`)."""
    expected = {}
    for name, result in diagnosis.task_sets.items():
        expected.update({f"{name}/layer_predictions": result.layer_predictions, f"{name}/krr_predictions": result.krr_predictions,
                         f"{name}/kappa": result.kappa})
        expected.update({f"{name}/steps/{algorithm}": pred for algorithm, pred in result.step_predictions.items()})
    archive_entries = {key for key in arrays.files if key == "mi_krr_manifest" or re.fullmatch(r"_archive/\d+", key)}
    assert "mi_krr_manifest" in archive_entries
    assert set(arrays.files) - archive_entries == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)


# ---- probes.compare -----------------------------------------------------------------------------


def test_kernel_distance_takes_each_layers_best_finite_head_skips_layers_without_one_and_is_nan_without_the_kernel():
    """Hand-built [layer, head] distances with NaN / inf heads: (0.1 + 0.2 + 0.4) / 3; a kernel not fitted, no finite
    head, or no alignment: NaN."""
    nan, inf = math.nan, math.inf
    distance = torch.tensor([[0.3, nan, 0.1], [nan, inf, nan], [0.5, 0.2, inf], [0.4, 0.45, 0.6]], dtype=torch.float64)
    def alignment(operator_distance):
        return KernelAlignment(block="query", scale={}, metrics={"exp": {"operator_distance": operator_distance}}, per_prompt={})

    result = types.SimpleNamespace(kernel_alignment=alignment(distance))
    heads, best = result.kernel_alignment.best_heads("exp")
    np.testing.assert_array_equal(heads, [2, -1, 1, 0])
    np.testing.assert_array_equal(best, [0.1, nan, 0.2, 0.4])
    with pytest.raises(ValueError, match="kernel must be one this alignment measured"):
        result.kernel_alignment.best_heads("gaussian")
    assert kernel_distance(result) == pytest.approx((0.1 + 0.2 + 0.4) / 3, rel=1e-15)
    assert kernel_distance(result, "exp") == kernel_distance(result)
    assert math.isnan(kernel_distance(result, "gaussian"))  # only the exp kernel was fitted
    hopeless = types.SimpleNamespace(kernel_alignment=alignment(torch.tensor([[nan, inf]], dtype=torch.float64)))
    assert math.isnan(kernel_distance(hopeless))
    assert math.isnan(kernel_distance(types.SimpleNamespace(kernel_alignment=None)))


def test_table_pads_each_column_to_its_widest_cell_two_spaces_apart_left_aligned():
    """Hand-built rows against the table written out by hand: widths from the longest cell, '-' for NaN distances."""
    rows = [
        SummaryRow("a-very-long-model-name", "in_distribution", "cg", 0.98761, (0.9, 0.99), "1:1 2:2", True, math.nan, math.nan),
        SummaryRow("m", "x", "richardson_jacobi", -1.25, (-2.0, -0.5), "4:3", False, 0.1234, 1.5),
    ]
    assert format_table(rows).splitlines() == [
        "model                   task set         best algorithm     path R2 [95% CI]          identified  exp-kernel dist  gauss-kernel dist"
        "  best-step map (layer:step)",
        "----------------------  ---------------  -----------------  ------------------------  ----------  ---------------  -----------------"
        "  --------------------------",
        "a-very-long-model-name  in_distribution  cg                 0.9876 [0.900, 0.990]     yes         -                -                "
        "  1:1 2:2",
        "m                       x                richardson_jacobi  -1.2500 [-2.000, -0.500]  no          0.123            1.500            "
        "  4:3",
    ]


def test_overview_keeps_model_order_for_colours_draws_exp_solid_and_gaussian_dashed_even_with_a_missing_distance():
    """Hand-built rows, models not in alphabetical order: colours C0, C1 by first appearance, each model's points shifted by
    -/+ MODEL_OFFSET / 2 from the task sets' positions, scores clipped at -0.5 (a triangle marker below the floor), distance
    lines (exp 'o-', Gaussian 's--') for a model with one NaN set, none for a model without any distance."""
    nan = math.nan
    rows = [
        SummaryRow("zeta", "zz_custom", "cg", -3.0, (-4.0, -2.0), "", False, 0.4, 0.7),
        SummaryRow("zeta", "in_distribution", "cg", 0.9, (0.8, 0.95), "", True, nan, nan),
        SummaryRow("zeta", "bandwidth_x2", "gd", 0.2, (0.1, 0.3), "", False, 0.3, 0.5),
        SummaryRow("alpha", "in_distribution", "gd", 0.5, (0.4, 0.6), "", True, nan, nan),
        SummaryRow("alpha", "zz_custom", "gd", -0.25, (-0.3, -0.2), "", False, nan, nan),
    ]
    figure = plot_overview(rows)
    left, right = figure.axes
    assert [label.get_text() for label in left.get_xticklabels()] == ["in_distribution", "bandwidth_x2", "zz_custom"]
    assert "-0.5" in left.get_ylabel()
    zeta, alpha = (next(line for line in left.lines if line.get_label() == model) for model in ("zeta", "alpha"))
    assert (zeta.get_color(), alpha.get_color()) == ("C0", "C1")
    np.testing.assert_allclose(zeta.get_xdata(), np.array([0, 1, 2]) - MODEL_OFFSET / 2)
    np.testing.assert_array_equal(zeta.get_ydata(), [0.9, 0.2, -0.5])
    np.testing.assert_allclose(alpha.get_xdata(), np.array([0, 1, 2]) + MODEL_OFFSET / 2)
    np.testing.assert_array_equal(alpha.get_ydata(), [0.5, np.nan, -0.25])  # NaN: a gap where alpha has no bandwidth_x2
    markers = [line for line in left.lines if line.get_marker() in ("o", "v") and line.get_color() == "C0"]
    assert [line.get_markerfacecolor() == "white" for line in markers] == [False, True, True]
    assert [line.get_marker() for line in markers] == ["o", "o", "v"]  # zz_custom's -3.0 is below the floor
    assert [line.get_label() for line in right.lines] == ["zeta (exp)", "zeta (Gaussian)"]
    exp, gaussian = right.lines
    assert (exp.get_color(), exp.get_linestyle(), exp.get_marker()) == ("C0", "-", "o")
    assert (gaussian.get_color(), gaussian.get_linestyle(), gaussian.get_marker()) == ("C0", "--", "s")
    np.testing.assert_array_equal(exp.get_ydata(), [nan, 0.3, 0.4])
    np.testing.assert_array_equal(gaussian.get_ydata(), [nan, 0.5, 0.7])
    plt.close(figure)


# ---- probes.report ------------------------------------------------------------------------------


def test_file_stems_number_every_further_collision_until_the_stem_is_free():
    """Four names that sanitise to the same stem, one of them already spelling the first numbered stem."""
    names = ["a b", "a_b", "a.b", "a_b_2", "x-1"]
    assert _file_stems(names) == {"a b": "a_b", "a_b": "a_b_2", "a.b": "a_b_3", "a_b_2": "a_b_2_2", "x-1": "x-1"}


def test_summary_prints_the_prompt_counts_kappa_statistics_every_r2_and_every_note(diagnoses):
    """Header counts of the prompts drawn here, kappa median / min / max by NumPy, the best algorithm's aligned R2
    ('-' where undefined) and each note on its own line."""
    result = diagnoses["cg construction"]["input_scale_x2"]
    lines = task_set_summary(result).splitlines()
    kappa = result.kappa
    assert lines[0].startswith(f"== input_scale_x2: {BATCH} prompts, {N_QUERY} queries, {N_SUPPORT} support points; ")
    median, low, high = map(float, re.search(r"kappa median (\S+) \[(\S+), (\S+)\]$", lines[0]).groups())
    np.testing.assert_allclose([median, low, high], [np.median(kappa), kappa.min(), kappa.max()], rtol=1e-2)
    best = result.scores[result.verdict.best]
    printed = next(line for line in lines if line.startswith("  R2    "))[8:].split()
    assert len(printed) == len(best.aligned_r2)
    for text, value in zip(printed, best.aligned_r2):
        assert (text == "-") if not np.isfinite(value) else float(text) == pytest.approx(value, abs=5e-5)
    assert lines[-2:] == ["note: b: second note", "note: a: first note"]


def test_summary_prints_each_interval_by_hand_and_a_dash_without_bootstrap(diagnoses):
    """Each algorithm's row carries its stored CI to 4 decimals; with bootstrap=0 (no interval:
    both ends NaN) the cell is '-', never '[nan, nan]'."""
    result = diagnoses["softmax"]["in_distribution"]
    rows = {line.split()[0]: line for line in task_set_summary(result).splitlines()[2 : 2 + len(result.scores)]}
    for name, score in result.scores.items():
        low, high = score.score_ci
        assert f"[{low:.4f}, {high:.4f}]" in rows[name]
    bare = dataclasses.replace(result, scores={name: dataclasses.replace(score, score_ci=(math.nan, math.nan))
                                               for name, score in result.scores.items()})
    table = task_set_summary(bare).splitlines()[2 : 2 + len(result.scores)]
    assert all(line.split()[2] == "-" and "nan" not in line for line in table)


def test_verdict_calls_the_gap_of_two_minus_inf_scores_undefined_not_nan(diagnoses):
    """The random softmax model's layers all align with step 0 under both candidates, so both path
    R2 are -inf (checked here) and their difference is undefined: said in words, not '+nan'."""
    verdict = diagnoses["softmax"]["in_distribution"].verdict
    assert np.isneginf(list(verdict.scores.values())).all()
    assert f"Runner-up: {verdict.runner_up}, gap undefined (both path R2 -inf)" in verdict.message
    assert "nan" not in verdict.message


def test_saved_report_has_a_section_per_task_set_with_its_figures_every_array_and_the_statistics(diagnoses, tmp_path):
    """`Diagnosis.save`: index.md headings in task-set order, figure links to PNG files named by the sanitised stem,
    arrays.npz = the stored arrays of every task set, diagnosis.json = the stored kappa and the argmax best."""
    diagnosis = diagnoses["softmax"]
    index = diagnosis.save(tmp_path)
    lines = index.read_text().splitlines()
    assert lines[0] == "# mi-krr diagnosis"
    settings = next(line for line in lines if line.startswith("Settings: "))
    assert "n_steps=3" in settings and "bootstrap=20" in settings
    assert [line for line in lines if line.startswith("#")] == ["# mi-krr diagnosis", "## in_distribution", "## scale x2"]
    for name, stem in (("in_distribution", "in_distribution"), ("scale x2", "scale_x2")):
        start = lines.index(f"## {name}")
        assert lines[start + 2] == "```" and lines[start + 3].startswith(f"== {name}: {BATCH} prompts, ")
        links = [re.fullmatch(r"!\[(.*): (\w+)\]\((.*)\)", line).groups() for line in lines if line.startswith(f"![{name}: ")]
        assert [figure for _, figure, _ in links] == ["error_profiles", "step_map", "kernel_alignment"]
        for _, figure, file_name in links:
            assert file_name == f"{stem}_{figure}.png"
            assert (tmp_path / file_name).read_bytes().startswith(PNG_SIGNATURE)
    with np.load(tmp_path / "arrays.npz") as arrays:
        assert_arrays_of(arrays, diagnosis)
    document = json.loads((tmp_path / "diagnosis.json").read_text(), parse_constant=reject_constant)
    assert list(document["task_sets"]) == ["in_distribution", "scale x2"]
    for name, result in diagnosis.task_sets.items():
        np.testing.assert_array_equal(document["task_sets"][name]["kappa"], result.kappa)
        ranked_first = max(result.scores, key=lambda key: result.scores[key].score)  # the verdict lists it even when none is best
        assert document["task_sets"][name]["verdict"]["best"] == ranked_first
    plt.close("all")


# ---- the overview report (mi-krr demo / diagnose) -----------------------------------------------


@pytest.fixture(scope="module")
def overview(diagnoses, tmp_path_factory):
    folder = tmp_path_factory.mktemp("overview")
    entries = [ModelEntry("cg construction", DESCRIPTIONS["cg construction"], diagnoses["cg construction"], extra={"steps": 2}),
               ModelEntry("softmax", DESCRIPTIONS["softmax"], diagnoses["softmax"])]
    index = write_overview_report(entries, folder, title="a tiny overview", settings={"batch": BATCH, "seed": 3})
    plt.close("all")
    return folder, index.read_text().splitlines()


def test_overview_json_has_the_title_settings_argmax_table_rows_and_each_models_own_diagnosis(diagnoses, overview):
    """report.json (strict): table rows recomputed from the stored scores and NumPy kernel distances (NaN as null), each model's
    description, its own kappa, and `extra` only where given."""
    folder, _ = overview
    document = json.loads((folder / "report.json").read_text(), parse_constant=reject_constant)
    assert document["title"] == "a tiny overview" and document["settings"] == {"batch": BATCH, "seed": 3}
    expected = [expected_row(model, name, result) for model, diagnosis in diagnoses.items() for name, result in diagnosis.task_sets.items()]
    assert len(document["table"]) == len(expected) == 4
    for row, reference in zip(document["table"], expected):
        for key in ("model", "task_set", "best", "step_map", "identified"):
            assert row[key] == reference[key], key
        written = [row["score"], *row["score_ci"], row["exp_distance"], row["gaussian_distance"]]
        numbers = [reference["score"], *reference["score_ci"], reference["exp_distance"], reference["gaussian_distance"]]
        for value, number in zip(written, numbers, strict=True):  # NaN and -inf as null
            assert value is None if not math.isfinite(number) else value == pytest.approx(number, rel=1e-12)
    assert list(document["models"]) == ["cg construction", "softmax"]
    for model, diagnosis in diagnoses.items():
        entry = document["models"][model]
        assert entry["description"] == DESCRIPTIONS[model]
        assert list(entry["diagnosis"]["task_sets"]) == list(diagnosis.task_sets)
        for name, result in diagnosis.task_sets.items():
            np.testing.assert_array_equal(entry["diagnosis"]["task_sets"][name]["kappa"], result.kappa)
    assert document["models"]["cg construction"]["extra"] == {"steps": 2} and "extra" not in document["models"]["softmax"]


def test_overview_index_lists_every_row_then_per_model_description_in_distribution_verdict_figures_and_notes(diagnoses, overview):
    """index.md: title, one table row per (model, task set), settings as key=value, and per model its description, the
    in-distribution set's verdict and figures (in_distribution is not the first set of the CG model), the sorted union of
    its notes; figure files and `<sanitised model>.npz` with the stored arrays."""
    folder, lines = overview
    assert lines[0] == "# a tiny overview" and lines[2] == "```"
    end = lines.index("```", 3)
    marked = any(uniform_best_head(result.kernel_alignment, kernel) for diagnosis in diagnoses.values()
                 for result in diagnosis.task_sets.values() for kernel in ("exp", "gaussian"))
    assert (lines[end - 1] == UNIFORM_NOTE) == marked  # the footnote on uniform best heads, where there are some
    table = [re.split(r"\s{2,}", line.strip()) for line in lines[5 : end - marked]]
    assert [cells[:2] for cells in table] == [[model, name] for model, diagnosis in diagnoses.items() for name in diagnosis.task_sets]
    assert "Settings: batch=6, seed=3" in lines
    assert (folder / "overview.png").read_bytes().startswith(PNG_SIGNATURE) and "![overview](overview.png)" in lines
    figures = {"cg construction": ["error_profiles", "step_map"], "softmax": ["error_profiles", "step_map", "kernel_alignment"]}
    notes = {"cg construction": ["- note: a: first note", "- note: b: second note"], "softmax": ["- note: c: third note"]}
    for model, stem in (("cg construction", "cg_construction"), ("softmax", "softmax")):
        start = lines.index(f"## {model}")
        section = lines[start: lines.index("## softmax") if model == "cg construction" else len(lines)]
        verdict = diagnoses[model]["in_distribution"].verdict.message.splitlines()
        assert section[1:5] == ["", DESCRIPTIONS[model], "", "```"]
        assert section[5: 5 + len(verdict) + 1] == [*verdict, "```"]
        links = [line for line in section if line.startswith("![")]
        assert links == [f"![{model}: {figure} (in_distribution)]({stem}_{figure}.png)" for figure in figures[model]]
        for figure in figures[model]:
            assert (folder / f"{stem}_{figure}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert [line for line in section if line.startswith("- note: ")] == notes[model]
        with np.load(folder / f"{stem}.npz") as arrays:
            assert_arrays_of(arrays, diagnoses[model])


def test_overview_index_reports_label_sensitivity_scores_and_their_figure_where_computed(tmp_path):
    """The GD construction (one fixed lr, stable on every prompt) diagnosed with sensitivities: its
    label sensitivities are exactly GD's at the fitted lr (both linear in y with the same matrix), so
    the index's sensitivity line gives gd 1.000, and the sensitivities figure is written and linked."""
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.1).sample(24, 12, 4, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + 0.1))
    diagnosis = probes.diagnose(gd_transformer(n_steps=3, lr=lr, lam=0.1, dim=4), {"in_distribution": task}, lam=0.1, n_steps=6,
                                kernels=(), sensitivities=True, bootstrap=0, algorithms=("gd", "cg"), progress=False)
    index = write_overview_report([ModelEntry("gd", "the GD construction", diagnosis)], tmp_path, title="t", settings={})
    plt.close("all")
    lines = index.read_text().splitlines()
    line = next(line for line in lines if line.startswith("Label sensitivities"))
    assert re.search(r"along the prediction alignment: gd 1\.000, cg -?\d\.\d{3}$", line), line
    assert "![gd: sensitivities (in_distribution)](gd_sensitivities.png)" in lines
    assert (tmp_path / "gd_sensitivities.png").read_bytes().startswith(PNG_SIGNATURE)


# ---- softmax-ood --------------------------------------------------------------------------------


@pytest.fixture
def ood_result():
    """Three layers, three task sets, hand-picked distances (mean != median over layers, exp != Gaussian)."""
    return SoftmaxOODResult(
        checkpoint="/somewhere/softmax_gp", task_sets=["in_distribution", "input_scale_x2", "bandwidth_x2"], blocks=[0, 1, 2],
        best_distance={"in_distribution": [0.1, 0.2, 0.6], "input_scale_x2": [0.3, 0.3, 0.9], "bandwidth_x2": [0.05, 0.1, 0.15]},
        mean_distance={"in_distribution": [0.2, 0.3, 0.7], "input_scale_x2": [0.4, 0.5, 1.0], "bandwidth_x2": [0.1, 0.2, 0.3]},
        best_row_spearman={name: [0.9, 0.8, 0.7] for name in ("in_distribution", "input_scale_x2", "bandwidth_x2")},
        best_tau={name: [1.0, 2.0, 3.0] for name in ("in_distribution", "input_scale_x2", "bandwidth_x2")},
        best_gaussian_distance={"in_distribution": [0.2, 0.4, 0.45], "input_scale_x2": [0.7, 0.8, 1.2], "bandwidth_x2": [0.25, 0.25, 0.4]},
        best_bandwidth={name: [0.5, 0.6, 0.7] for name in ("in_distribution", "input_scale_x2", "bandwidth_x2")},
        batch_size=4, n_support=8, n_query=2,
    )


def test_softmax_ood_overall_skips_layers_without_a_finite_distance(ood_result):
    """A layer whose best head has no finite distance (NaN) is left out of the mean over layers,
    as probes.compare's kernel columns do: (0.1 + 0.6) / 2; all NaN gives NaN."""
    ood_result.best_distance["in_distribution"] = [0.1, math.nan, 0.6]
    ood_result.best_gaussian_distance["bandwidth_x2"] = [math.nan] * 3
    assert ood_result.overall("in_distribution") == pytest.approx(0.35, rel=1e-12)
    assert math.isnan(ood_result.overall("bandwidth_x2", "gaussian"))


def test_softmax_ood_key_numbers_are_layer_means_and_ratios_written_out_by_hand(ood_result):
    """Mean over layers (0.3, 0.5, 0.1 for exp), the per-block line with block numbers 0..2, one ratio line per shift only,
    and the Gaussian means (0.35, 0.9, 0.3)."""
    assert ood_result.overall("in_distribution") == pytest.approx(0.3, rel=1e-12)
    assert ood_result.overall("input_scale_x2", "gaussian") == pytest.approx(0.9, rel=1e-12)
    numbers = ood_result.key_numbers()
    assert list(numbers) == [
        "in_distribution: exp-kernel distance (best head, mean over layers)", "in_distribution: per block",
        "input_scale_x2: distance (ratio to in-distribution)", "bandwidth_x2: distance (ratio to in-distribution)",
        "gaussian-kernel distance (best head, mean over layers)",
    ]
    assert numbers["in_distribution: exp-kernel distance (best head, mean over layers)"] == pytest.approx(0.3, rel=1e-12)
    assert numbers["in_distribution: per block"] == "block 0: 0.100, block 1: 0.200, block 2: 0.600"
    assert numbers["input_scale_x2: distance (ratio to in-distribution)"] == "0.5000 (1.667x)"
    assert numbers["bandwidth_x2: distance (ratio to in-distribution)"] == "0.1000 (0.333x)"
    assert numbers["gaussian-kernel distance (best head, mean over layers)"] == (
        "in_distribution 0.350, input_scale_x2 0.900, bandwidth_x2 0.300")


def test_softmax_ood_key_numbers_mark_a_block_whose_best_head_is_uniform(ood_result):
    """tau = inf (uniform attention) on block 1 marks its distance with "u" and adds the note, as
    diagnose's tables do; tau = NaN (a block without a best head) is not marked."""
    ood_result.best_tau["in_distribution"] = [1.0, math.inf, math.nan]
    numbers = ood_result.key_numbers()
    assert numbers["in_distribution: per block"] == "block 0: 0.100, block 1: 0.200u, block 2: 0.600"
    assert numbers["u"].startswith("the block's heads are all fitted as uniform attention (tau = inf, or within 5% of it)")


def test_softmax_ood_key_numbers_mark_the_blocks_the_alignment_flags_uniform_at_a_finite_tau(ood_result):
    """A result made by `softmax_ood` carries the alignment's own flags (`best_uniform`, which
    also counts a reference within 5% of uniform): block 2 is marked at tau = 3, block 1 not at
    tau = inf when the flags say otherwise."""
    ood_result.best_tau["in_distribution"] = [1.0, math.inf, 3.0]
    ood_result.best_uniform = {"in_distribution": [False, False, True]}
    numbers = ood_result.key_numbers()
    assert numbers["in_distribution: per block"] == "block 0: 0.100, block 1: 0.200, block 2: 0.600u"
    assert "u" in numbers


def test_softmax_ood_figure_draws_best_head_distances_per_layer_and_plain_exp_beside_hatched_gaussian_bars(ood_result):
    """Left: one line per set through (layer, best distance), in_distribution thick black. Right: exp bars at position - 0.2
    (unhatched) and Gaussian bars at + 0.2 (hatched), heights the means over layers, in_distribution black."""
    figure = ood_result.plot()
    left, right = figure.axes
    assert [line.get_label() for line in left.lines] == ood_result.task_sets
    for line, values in zip(left.lines, ([0.1, 0.2, 0.6], [0.3, 0.3, 0.9], [0.05, 0.1, 0.15])):
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
        np.testing.assert_array_equal(line.get_ydata(), values)
    assert left.lines[0].get_color() == "k" and left.lines[0].get_linewidth() == 2.2
    bars = right.patches
    assert len(bars) == 6
    for bar, centre, height, hatch in zip(bars, [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2], [0.3, 0.5, 0.1, 0.35, 0.9, 0.3], [None] * 3 + ["//"] * 3):
        assert bar.get_x() + bar.get_width() / 2 == pytest.approx(centre, abs=1e-12)
        assert bar.get_height() == pytest.approx(height, rel=1e-12)
        assert bar.get_hatch() == hatch
    assert [bar.get_facecolor() for bar in bars[:3]] == [to_rgba("k"), to_rgba("C1"), to_rgba("C2")]
    assert [label.get_text() for label in right.get_xticklabels()] == ood_result.task_sets
    plt.close(figure)


def test_softmax_ood_numbers_the_blocks_0_to_l_minus_1_as_diagnose_does_and_always_keeps_the_in_distribution_set():
    """The shipped softmax_gp checkpoint (its config.json says how many blocks) with no shift: blocks 0..L-1 (TransformerLens indices,
    as diagnose's kernel table), one distance per block."""
    from mi_krr.checkpoints import shipped_checkpoint
    from mi_krr.reproductions import softmax_ood

    checkpoint = shipped_checkpoint("softmax_gp")
    n_layers = json.loads((checkpoint / "config.json").read_text())["model"]["n_layers"]
    result = softmax_ood(checkpoint, batch_size=2, shifts=())
    assert result.task_sets == ["in_distribution"]
    assert result.blocks == list(range(n_layers))
    assert len(result.best_distance["in_distribution"]) == len(result.best_gaussian_distance["in_distribution"]) == n_layers
    assert result.key_numbers()["in_distribution: per block"].startswith("block 0: ")
    plt.close(result.plot())
