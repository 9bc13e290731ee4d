"""Comparing architectures as a researcher does (usage review `compare`): the shipped softmax
model, a 3-block linear-attention model and the CG construction are
diagnosed on the same task sets (one model missing a set) and put side by side with
`probes.compare`. Every number a comparison shows is recomputed here independently with NumPy:
path R2 with a brute-force monotone alignment, the bootstrap interval from our own resamples,
the kernel distances from the model's own `hook_pattern` and a NumPy spectral norm. The review's
findings, each fixed, are tests of the corrected behaviour."""

from __future__ import annotations

import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import probes
from mi_krr.construct import cg_transformer
from mi_krr.feature_maps import ProjectedKernelFeatures
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import apply_shift
from probes.compare import MODEL_OFFSET
from mi_krr.tasks.samplers import GPRegressionSampler
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.train import load_model

BANDWIDTH, NOISE = 0.5, 0.2
ALGORITHMS = ("cg", "gd", "heavy_ball")
COMMON = dict(n_steps=5, bootstrap=60, progress=False, algorithms=ALGORITHMS)


def sampler():
    return GPRegressionSampler(dim=2, kernel="gaussian", bandwidth=BANDWIDTH, noise_std=NOISE)


@pytest.fixture(scope="module")
def models():
    """The shipped `softmax_gp` run (4 softmax blocks, trained on this very sampler), a 3-block
    linear-attention model (random weights) and the CG construction with an exact Gaussian-kernel
    head (4 blocks per CG step)."""
    softmax = load_model(shipped_checkpoint("softmax_gp"))
    torch.manual_seed(1)
    linear = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=16, n_layers=3, n_heads=2, attention="linear"))
    exact = ProjectedKernelFeatures(kernel="gaussian", d=2, m=14, projection="top", bandwidth=BANDWIDTH)  # m >= n + m_query: exact
    cg = cg_transformer(n_steps=1, lam=NOISE**2, dim=2, feature_map=exact)
    return {"softmax": softmax.eval(), "linear": linear.eval(), "cg": cg}


@pytest.fixture(scope="module")
def task_sets():
    s = sampler()
    wide = apply_shift(s, "input_scale_x2")
    return {"in_distribution": s.sample(24, 10, 4, seed=1), "input_scale_x2": wide.sample(24, 10, 4, seed=2),
            "label_noise_0.5": s.sample(24, 10, 4, seed=3)}


@pytest.fixture(scope="module")
def diagnoses(models, task_sets):
    """Every model on every task set, except the linear model, which misses input_scale_x2."""
    linear_sets = {name: task for name, task in task_sets.items() if name != "input_scale_x2"}
    return {
        "softmax": probes.diagnose(models["softmax"], task_sets, **COMMON),
        "linear": probes.diagnose(models["linear"], linear_sets, **COMMON),
        "cg": probes.diagnose(models["cg"], task_sets, kernels=(), **COMMON),
    }


# ---- independent references --------------------------------------------------------------------


def numpy_path_r2(layer_pred, step_pred, layers):
    """Path R2 written from its definition: SSE / SST per (layer, step) summed by hand, the monotone
    alignment by enumerating every non-decreasing step sequence (argmin of the summed MSE), layer 0
    unscored. Returns (path R2, aligned steps, R2 matrix, MSE matrix)."""
    n_layers, n_steps = layer_pred.shape[1], step_pred.shape[1]
    sse = np.array([[np.sum((layer_pred[:, l] - step_pred[:, t]) ** 2) for t in range(n_steps)] for l in range(n_layers)])
    sst = np.array([np.sum((step_pred[:, t] - step_pred[:, t].mean()) ** 2) for t in range(n_steps)])
    sst = np.where(sst > 1e-12 * np.sum(step_pred**2, axis=(0, 2)), sst, 0.0)
    mse = sse / step_pred[:, 0].size
    aligned = min(itertools.combinations_with_replacement(range(n_steps), n_layers),
                  key=lambda steps: sum(mse[l, t] for l, t in enumerate(steps)))
    rows = [row for row, layer in enumerate(layers) if layer > 0]
    error, variance = sum(sse[r, aligned[r]] for r in rows), sum(sst[aligned[r]] for r in rows)
    score = 1 - error / variance if variance > 0 else (-math.inf if error > 0 else math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sst > 0, 1 - sse / sst, np.nan)
    return score, np.array(aligned), r2, mse


def numpy_interval(layer_pred, step_pred, layers, n_resamples, seed, level=0.95):
    """The percentile bootstrap interval of path R2 by resampling the prompts ourselves (the same
    seeded draws `probes.scoring.bootstrap_weights` documents) and re-aligning each resample; the
    ceil(q R)-th order statistics, NaN replicates dropped."""
    batch = layer_pred.shape[0]
    draws = np.random.default_rng(seed).integers(0, batch, size=(n_resamples, batch))
    samples = np.array([numpy_path_r2(layer_pred[d], step_pred[d], layers)[0] for d in draws])
    samples = np.sort(samples[~np.isnan(samples)])
    tail = (1 - level) / 2
    return samples[math.ceil(round(tail * samples.size, 9)) - 1], samples[math.ceil(round((1 - tail) * samples.size, 9)) - 1]


def row_normalised(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(-1, keepdims=True)


# ---- the numbers a comparison shows ------------------------------------------------------------


def test_rows_follow_models_and_their_own_task_sets_and_every_number_is_the_numpy_path_r2_and_interval(diagnoses):
    """Models of depths 4, 3 and 4 (the construction), one lacking a task set: one row per model
    and task set it was diagnosed on, in order; each row's best algorithm, path R2, interval and
    step map equal a NumPy recomputation from the stored prediction arrays (brute-force alignment,
    our own bootstrap resamples)."""
    comparison = probes.compare(diagnoses)
    assert [(row.model, row.task_set) for row in comparison.rows] == [
        (model, name) for model, diagnosis in diagnoses.items() for name in diagnosis.task_sets]
    assert ("linear", "input_scale_x2") not in [(row.model, row.task_set) for row in comparison.rows]
    frame = comparison.to_dataframe()
    for record, row in zip(frame.to_dict("records"), comparison.rows, strict=True):
        result = diagnoses[row.model][row.task_set]
        references = {name: numpy_path_r2(result.layer_predictions, result.step_predictions[name], result.layers)
                      for name in result.step_predictions}
        best = max(references, key=lambda name: references[name][0])
        score, aligned, _, _ = references[best]
        named = best if score > -math.inf else None  # no candidate with a defined path R2: none is best
        assert (record["best"] if isinstance(record["best"], str) else None) == named
        assert record["score"] == pytest.approx(score, rel=1e-10, abs=1e-12)
        assert record["step_map"] == " ".join(f"{layer}:{step}" for layer, step in zip(result.layers, aligned) if layer > 0)
        low, high = numpy_interval(result.layer_predictions, result.step_predictions[best], result.layers, 60, seed=0)
        assert (record["ci_low"], record["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert all(row.best == "cg" and row.score > 0.999 for row in comparison.rows if row.model == "cg")  # the positive control


def test_diagnosis_dataframes_concatenated_across_models_carry_the_numpy_r2_and_mse_matrices(diagnoses):
    """`Diagnosis.to_dataframe()` of each model, concatenated with a model column (the notebook
    idiom): every (task set, algorithm) block's r2 / mse pivot equals the matrices written from
    the prediction arrays, and its `aligned` rows are the brute-force alignment."""
    import pandas as pd

    frame = pd.concat([diagnosis.to_dataframe().assign(model=name) for name, diagnosis in diagnoses.items()], ignore_index=True)
    blocks = frame.groupby(["model", "task_set", "algorithm"], sort=False)
    assert blocks.ngroups == sum(len(d.task_sets) * len(ALGORITHMS) for d in diagnoses.values())
    for (model, task_set, algorithm), block in blocks:
        result = diagnoses[model][task_set]
        _, aligned, r2, mse = numpy_path_r2(result.layer_predictions, result.step_predictions[algorithm], result.layers)
        np.testing.assert_allclose(block.pivot(index="layer", columns="step", values="r2").to_numpy(), r2, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(block.pivot(index="layer", columns="step", values="mse").to_numpy(), mse, rtol=1e-9, atol=1e-15)
        assert block[block.aligned].sort_values("layer").step.tolist() == aligned.tolist()
        assert sorted(block.layer.unique()) == list(result.layers)


def test_kernel_distances_are_the_numpy_spectral_distance_of_hook_pattern_to_the_kernel_at_each_heads_fitted_scale(models, task_sets, diagnoses):
    """The softmax row's exp / Gaussian distance: from the model's own `hook_pattern` (query rows
    over support columns, renormalised), the row-normalised kernel on the raw inputs at the
    alignment's fitted scale, ||A - R||_2 / ||R||_2 by NumPy per prompt, mean over prompts, min
    over heads, mean over blocks; each finite fitted scale is a local minimum of the squared
    Frobenius distance. Linear attention and the construction (no alignment) show NaN."""
    comparison = probes.compare(diagnoses)
    model, task = models["softmax"], task_sets["in_distribution"]
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens)
    query, support = prompt.query_positions.numpy(), prompt.support_positions.numpy()
    alignment = diagnoses["softmax"]["in_distribution"].kernel_alignment
    xq, xs = task.x_query.double().numpy(), task.x_support.double().numpy()
    logits = {"exp": lambda s: np.einsum("bmd,bnd->bmn", xq, xs) / s,
              "gaussian": lambda s: -((xq[:, :, None] - xs[:, None]) ** 2).sum(-1) / (2 * s * s)}
    expected = {}
    for kernel, logit in logits.items():
        reference = lambda s: np.full((len(xq), xq.shape[1], xs.shape[1]), 1 / xs.shape[1]) if np.isinf(s) else row_normalised(logit(s))
        per_block = []
        for block in range(model.n_layers):
            pattern = cache[f"blocks.{block}.attn.hook_pattern"].double().numpy()[:, :, query][:, :, :, support]  # [B, H, m, n]
            distances = []
            for head in range(model.n_heads):
                attention = pattern[:, head] / pattern[:, head].sum(-1, keepdims=True)
                scale = float(alignment.scale[kernel][block, head])
                ref = reference(scale)
                distances.append(np.mean([np.linalg.norm(a - r, 2) / np.linalg.norm(r, 2) for a, r in zip(attention, ref)]))
                if np.isfinite(scale):
                    objective = lambda s: np.sum((attention - reference(s)) ** 2)
                    assert objective(scale) <= min(objective(scale * 1.05), objective(scale / 1.05)) + 1e-12
            per_block.append(min(distances))
        expected[kernel] = np.mean(per_block)
    row = next(row for row in comparison.rows if (row.model, row.task_set) == ("softmax", "in_distribution"))
    assert (row.exp_distance, row.gaussian_distance) == (pytest.approx(expected["exp"], rel=1e-6), pytest.approx(expected["gaussian"], rel=1e-6))
    assert all(math.isnan(row.exp_distance) and math.isnan(row.gaussian_distance) for row in comparison.rows if row.model != "softmax")


def test_json_of_each_diagnosis_reproduces_the_comparison_rows_with_non_finite_values_as_null(diagnoses):
    """`to_json()` round trip: strict JSON whose per-task-set verdict best, scores and intervals
    equal the comparison's rows (a -inf interval end is null)."""
    comparison = probes.compare(diagnoses)
    loaded = {name: json.loads(diagnosis.to_json()) for name, diagnosis in diagnoses.items()}
    for row in comparison.rows:
        entry = loaded[row.model]["task_sets"][row.task_set]
        best = entry["scores"][entry["verdict"]["best"]]
        finite = lambda value: value if math.isfinite(value) else None
        assert (entry["verdict"]["best"] if best["score"] is not None else None) == row.best and best["score"] == finite(row.score)
        assert best["score_ci"] == [finite(value) for value in row.score_ci]
        assert entry["verdict"]["identified"] == row.identified
        assert entry["layers"] == diagnoses[row.model][row.task_set].layers


def test_overview_puts_each_task_set_at_one_position_for_every_model(diagnoses):
    """The overview lines up task sets by name: in distribution, then the shifts in
    `DEFAULT_SHIFTS` order; a model's points sit at its own sets' positions with its path R2."""
    figure = probes.compare(diagnoses).plot()
    left = figure.axes[0]
    assert [label.get_text() for label in left.get_xticklabels()] == ["in_distribution", "input_scale_x2", "label_noise_0.5"]
    position = {"in_distribution": 0, "input_scale_x2": 1, "label_noise_0.5": 2}
    lines = {line.get_label(): line for line in left.lines if not line.get_label().startswith("_")}
    for index, (name, diagnosis) in enumerate(diagnoses.items()):
        offset = (index - (len(diagnoses) - 1) / 2) * MODEL_OFFSET  # models side by side, so equal scores stay visible
        np.testing.assert_allclose(lines[name].get_xdata(), np.array([0, 1, 2]) + offset)
        expected = np.full(3, np.nan)  # NaN: a gap where the model was not diagnosed, or where no algorithm is best
        for set_name, r in diagnosis.task_sets.items():
            if r.verdict.best_algorithm is not None:
                expected[position[set_name]] = max(r.scores[r.verdict.best].score, -0.5)
        np.testing.assert_allclose(lines[name].get_ydata(), expected)
    plt.close(figure)


def test_read_out_lens_of_two_architectures_side_by_side_ends_at_each_models_prediction(models, task_sets):
    """`attach(model).layer_predictions(task)` for a 4- and a 3-block model: `[B, L + 1, m]`
    each, and the last layer is the model's own forward at the query positions; a float64 copy of
    the softmax model reads the same lens on the same float32 prompts to float32 accuracy."""
    task = task_sets["in_distribution"]
    for name, layers in (("softmax", 4), ("linear", 3)):
        model = models[name]
        lens = probes.attach(model).layer_predictions(task)
        assert tuple(lens.shape) == (24, layers + 1, 4) and lens.dtype == torch.float64
        prompt = model.encode(task)
        with torch.no_grad():
            forward = model(prompt.tokens)[:, prompt.query_positions]
        np.testing.assert_allclose(lens[:, -1].numpy(), forward.double().numpy(), rtol=1e-5, atol=1e-6)
    import copy

    double = copy.deepcopy(models["softmax"]).double()
    np.testing.assert_allclose(probes.layer_predictions(double, task).numpy(), probes.layer_predictions(models["softmax"], task).numpy(),
                               rtol=1e-4, atol=1e-5)


# ---- findings of the review --------------------------------------------------------------------


@pytest.fixture(scope="module")
def silent_model(task_sets):
    """A random softmax model whose read-out is zeroed: every layer predicts 0, so every
    candidate's path R2 is undefined (NaN) and the verdict says there is no best."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=16, n_layers=2, n_heads=2)).eval()
    with torch.no_grad():
        model.read_out.weight.zero_()
        model.read_out.bias.zero_()
    return probes.diagnose(model, {"in_distribution": task_sets["in_distribution"]}, **COMMON)


def test_table_and_verdict_say_no_algorithm_is_best_when_every_layer_predicts_zero(silent_model):
    """The reference behaviour the xfails below hold the other views to: the table prints "-"
    and the verdict "Best: none"."""
    assert probes.compare({"silent": silent_model}).summary().splitlines()[2].split()[2] == "-"
    assert silent_model["in_distribution"].verdict.message.startswith("Best: none")


def test_comparison_dataframe_names_no_best_algorithm_when_every_candidate_is_undefined(silent_model):
    """Every candidate's path R2 is NaN / -inf: the dataframe's `best` should match the table's
    "-" (not claim "cg", the first candidate listed)."""
    assert probes.compare({"silent": silent_model}).to_dataframe().loc[0, "best"] not in ALGORITHMS


def test_diagnosis_dataframe_and_repr_name_no_best_algorithm_when_every_candidate_is_undefined(silent_model):
    """The same diagnosis's long dataframe should flag no algorithm as best, and its repr should
    not say "best cg"."""
    assert not silent_model.to_dataframe().best.any()
    assert "best cg" not in repr(silent_model)


def test_comparison_dataframe_keeps_which_distances_are_to_uniform_attention(diagnoses, silent_model):
    """The random softmax model's best heads are fitted as uniform attention (the table marks
    its distances "u": a distance to mean pooling, not to a kernel); the dataframe, which the
    notebooks show, should carry the same flags, and None (not False) where no distance was
    measured (NaN, e.g. linear attention)."""
    comparison = probes.compare({"random": silent_model, **diagnoses})
    assert any(row.exp_uniform or row.gaussian_uniform for row in comparison.rows)
    frame = comparison.to_dataframe()
    for kernel in ("exp", "gaussian"):
        distances = [getattr(row, f"{kernel}_distance") for row in comparison.rows]
        flags = [getattr(row, f"{kernel}_uniform") for row in comparison.rows]
        assert any(np.isnan(distances)) and any(np.isfinite(distances))  # both cases are exercised
        assert frame[f"{kernel}_uniform"].tolist() == [flag if np.isfinite(d) else None for flag, d in zip(flags, distances)]


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_overview_legend_names_every_model_whatever_its_name(diagnoses):
    """matplotlib hides labels starting with "_" from legends: a model named "_ablation" gets a
    line but no legend entry, so its line cannot be told from the others."""
    figure = probes.compare({"_ablation": diagnoses["softmax"], "linear": diagnoses["linear"]}).plot()
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == ["_ablation", "linear"]
    plt.close(figure)


def test_overview_line_breaks_at_a_task_set_the_model_lacks(diagnoses):
    """The linear model lacks input_scale_x2 (position 1): its line should not join positions 0
    and 2 as if it had a value in between (a NaN gap, or separate points)."""
    figure = probes.compare(diagnoses).plot()
    line = next(line for line in figure.axes[0].lines if line.get_label() == "linear")
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    finite = np.isfinite(y)
    joined = [(a, b) for a, b, fa, fb in zip(x, x[1:], finite, finite[1:]) if fa and fb]
    assert all(b - a == pytest.approx(1) for a, b in joined)
    plt.close(figure)


def test_table_shows_a_withheld_verdict_as_withheld_not_as_not_identified(models, task_sets):
    """With method="ridge" the verdict is withheld (`RIDGE_LENS_BIAS`), not negative; the
    comparison's identified cell should say so rather than "no"."""
    train_task = sampler().sample(48, 10, 4, seed=9)
    diagnosis = probes.diagnose(models["cg"], {"in_distribution": task_sets["in_distribution"]}, method="ridge", train_task=train_task,
                                kernels=(), **COMMON)
    assert diagnosis["in_distribution"].verdict.withheld
    assert probes.compare({"cg ridge": diagnosis}).summary().splitlines()[2].split()[7] != "no"


def test_relu_attention_is_not_reported_as_a_row_normalised_kernel_without_a_note(task_sets):
    """ReLU attention weighs keys by relu(q.k) / n_keys (row sums from 0 to well above 1), like
    linear attention not a row-normalised kernel; the comparison gives linear attention NaN
    distances, but a ReLU model's rows are renormalised and scored without a word. Expected: NaN,
    or at least a note saying the rows were renormalised."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=16, n_layers=2, n_heads=2, attention="relu")).eval()
    rows = probes.attention_kernels(model, task_sets["in_distribution"]).query.sum(-1)
    assert rows.max() > 1.2  # not row-normalised
    diagnosis = probes.diagnose(model, {"in_distribution": task_sets["in_distribution"]}, **COMMON)
    row = probes.compare({"relu": diagnosis}).rows[0]
    notes = " ".join(diagnosis["in_distribution"].notes)
    assert math.isnan(row.exp_distance) or "normalis" in notes


@pytest.mark.parametrize("name", ["", "softmax\nrun 2"])
def test_model_names_that_break_the_table_are_refused(diagnoses, name):
    """An empty name prints rows with a blank model cell; a line break splits every row of the
    fixed-width table. Expected: a one-line ValueError naming the model name."""
    with pytest.raises(ValueError, match="name"):
        probes.compare({name: diagnoses["softmax"]})
