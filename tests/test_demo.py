"""`mi-krr demo --quick` (the demo's code path on small batches): the report folder is complete,
the CG construction is identified as CG with its per-step predictions equal to NumPy CG, and every
model's statistics are finite."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mi_krr.cli import main
from mi_krr.commands.demo import QUICK
from mi_krr.tasks import sampler_from_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = ("cg_construction", "richardson_construction", "linear_lr", "softmax_gp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_folder_has_index_valid_pngs_and_json(demo):
    out, report = demo
    index = (out / "index.md").read_text()
    linked = [line[line.index("](") + 2 : -1] for line in index.splitlines() if line.startswith("![")]
    assert "overview.png" in linked and len(linked) >= 1 + 2 * len(MODELS)
    for name in linked:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000, name
    assert set(report["models"]) == set(MODELS)
    for model in MODELS:
        assert f"## {model}" in index


def test_cg_construction_is_identified_as_cg_with_r2_above_0999_at_every_step_boundary(demo):
    _, report = demo
    result = report["models"]["cg_construction"]["diagnosis"]["task_sets"]["in_distribution"]
    assert result["verdict"]["best"] == "cg" and result["verdict"]["identified"] is True
    score = result["scores"]["cg"]
    layers = np.array(result["layers"])
    np.testing.assert_array_equal(layers, 4 * np.arange(QUICK.cg_steps + 1))  # probed at step boundaries
    np.testing.assert_array_equal(score["aligned_steps"], np.arange(QUICK.cg_steps + 1))
    assert min(score["aligned_r2"][1:]) > 0.999


def test_cg_construction_layers_equal_numpy_cg_on_the_recorded_prompts(demo):
    out, report = demo
    result = report["models"]["cg_construction"]["diagnosis"]["task_sets"]["in_distribution"]
    info = dict(result["info"])
    seed = info.pop("seed")
    info.pop("active_dim")
    task = sampler_from_config(info).sample(result["n_prompts"], 16, 4, seed=seed)  # as the demo drew them (float32)
    x, xq, y = (t.to(torch.float64).numpy() for t in (task.x_support, task.x_query, task.y_support))
    lam = result["lam"]
    layer_predictions = np.load(out / "cg_construction.npz")["in_distribution/layer_predictions"]  # [B, steps + 1, m]
    for b in range(x.shape[0]):
        K, K_query = x[b] @ x[b].T, xq[b] @ x[b].T
        A = K + lam * np.eye(len(K))
        alpha, r = np.zeros(len(K)), y[b].copy()
        p = r.copy()
        for t in range(1, QUICK.cg_steps + 1):
            step = (r @ r) / (p @ A @ p)
            alpha, r_new = alpha + step * p, r - step * (A @ p)
            p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
            np.testing.assert_allclose(layer_predictions[b, t], K_query @ alpha, rtol=1e-7, atol=1e-9)


def test_richardson_construction_is_best_matched_by_its_fixed_step_rowsum_solver(demo):
    _, report = demo
    verdict = report["models"]["richardson_construction"]["diagnosis"]["task_sets"]["in_distribution"]["verdict"]
    assert verdict["best"].startswith("richardson_rowsum(w=") and verdict["score"] > 0.999
    row = next(row for row in report["table"] if row["model"] == "richardson_construction")
    # its kernel heads attend with exactly D^-1 K of the Gaussian kernel: 0 to rounding; the exp kernel differs by the key norms
    assert row["gaussian_distance"] < 1e-9 and row["exp_distance"] > 0.1


def test_every_model_and_task_set_has_finite_scores_and_a_table_row(demo):
    _, report = demo
    rows = {(row["model"], row["task_set"]) for row in report["table"]}
    for model in MODELS:
        task_sets = report["models"][model]["diagnosis"]["task_sets"]
        expected = {"in_distribution"} | (set(QUICK.shifts) if model in ("linear_lr", "softmax_gp") else set())  # a longer prompt among them
        assert set(task_sets) == expected
        for name, result in task_sets.items():
            assert (model, name) in rows
            best = result["scores"][result["verdict"]["best"]]
            assert math.isfinite(best["score"]) and all(math.isfinite(v) for v in best["score_ci"])
            moved = np.array(best["aligned_steps"]) > 0  # R2 is undefined (null) at step 0, where every solver predicts 0
            assert all(math.isfinite(v) for v in np.array(best["aligned_r2"], dtype=object)[moved])
            for score in result["scores"].values():  # -inf (null) only when every scored layer sits at step 0
                at_start = all(np.array(score["aligned_steps"])[score["scored"]] == 0)
                assert math.isfinite(score["score"]) if score["score"] is not None else at_start
    softmax_row = next(row for row in report["table"] if row["model"] == "softmax_gp")
    assert 0.0 < softmax_row["exp_distance"] < 2.0  # softmax attention has an exp-kernel distance
    linear_row = next(row for row in report["table"] if row["model"] == "linear_lr")
    assert linear_row["exp_distance"] is None  # linear attention is not a normalised kernel (NaN, written as null)


def test_table_notes_name_the_richardson_constructions_own_candidate_and_the_step_size_protocols(demo):
    """The four models were diagnosed differently on purpose: the Richardson construction also
    scores its fixed-step solver, and the shipped models' shifts use each prompt's optimal step
    while the constructions fit one. The index (below the table) and report.json say so."""
    out, report = demo
    step = report["models"]["richardson_construction"]["diagnosis"]["settings"]["algorithms"]
    fixed = next(name for name in step if name.startswith("richardson_rowsum(w="))
    candidates, step_sizes = report["notes"]
    assert f"; richardson_construction also: {fixed} (" in candidates and "shared: cg, jacobi_cg, gd," in candidates
    assert step_sizes.endswith(": cg_construction, richardson_construction: fitted; "
                               "linear_lr, softmax_gp: fitted on in_distribution, optimal on shifts.")
    index = (out / "index.md").read_text()
    assert f"Note: {candidates}" in index and f"Note: {step_sizes}" in index


def test_full_demo_as_the_readme_runs_it_covers_every_shift_of_the_shipped_models(tmp_path):
    """`mi-krr demo` on its shipped defaults (what `make demo` runs, ~12 s): every task set of
    both shipped models, longer prompts included, gets a finite best score."""
    assert main(["demo", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for model, n_sets in (("linear_lr", 7), ("softmax_gp", 9)):
        task_sets = report["models"][model]["diagnosis"]["task_sets"]
        assert len(task_sets) == n_sets and "longer_prompts_x2" in task_sets, sorted(task_sets)
        for result in task_sets.values():
            assert math.isfinite(result["scores"][result["verdict"]["best"]]["score"])
