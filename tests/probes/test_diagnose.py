"""`diagnose` end to end: positive controls on constructed transformers, the negative control on
a random one, the result object's views, and bad inputs."""

import functools
import json
import math
import re
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from brute_force import path_r2

from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS, richardson
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
import probes
from probes.diagnose import default_n_steps, diagnose, resolve_lam
from probes.diagnosis import Diagnosis

LAM = 0.1


@pytest.fixture(scope="module")
def cg_diagnosis():
    model = cg_transformer(n_steps=4, lam=LAM, dim=4)
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.1).sample(24, 12, 4, seed=0)
    diagnosis = diagnose(model, task, lam=LAM, n_steps=8, kernels=(), sensitivities=False, bootstrap=200, progress=False)
    return model, diagnosis["tasks"]


def test_cg_transformer_is_identified_as_cg_with_step_t_at_layer_4t(cg_diagnosis):
    model, result = cg_diagnosis
    assert result.verdict.best == "cg" and result.verdict.identified
    assert result.verdict.runner_up is not None and result.verdict.gap_ci[0] > 0
    score = result.scores["cg"]
    boundaries = np.arange(model.layers_per_step, model.n_layers + 1, model.layers_per_step)
    np.testing.assert_array_equal(score.aligned_steps[boundaries], boundaries // model.layers_per_step)
    assert np.all(score.aligned_r2[boundaries] > 0.999)
    # inside a step the prediction slot still holds the previous step's prediction
    np.testing.assert_array_equal(score.aligned_steps, np.arange(model.n_layers + 1) // model.layers_per_step)


def test_cg_diagnosis_leaves_out_the_rowsum_preconditioner_on_a_linear_kernel_and_says_so(cg_diagnosis):
    _, result = cg_diagnosis
    assert "richardson_rowsum" not in result.scores
    assert any(note.startswith("richardson_rowsum left out") for note in result.notes)


def gd_control():
    """The GD transformer with one fixed learning rate (stable on every prompt), and its prompts."""
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.1).sample(24, 12, 4, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + LAM))
    return gd_transformer(n_steps=6, lr=lr, lam=LAM, dim=4), task, lr


def test_gd_transformer_is_identified_as_gd_by_the_default_algorithms_with_its_learning_rate_fitted():
    model, task, lr = gd_control()
    result = diagnose(model, task, lam=LAM, n_steps=12, kernels=(), sensitivities=False, bootstrap=200, progress=False)["tasks"]
    assert result.verdict.best == "gd" and result.verdict.identified
    np.testing.assert_allclose(result.fitted_steps["gd"].step, [lr, lr], rtol=1e-5)  # each half recovers the construction's lr
    score = result.scores["gd"]
    np.testing.assert_array_equal(score.aligned_steps, np.arange(7))
    assert np.all(score.aligned_r2[1:] > 0.999)
    assert "one global step fitted" in diagnosis_text(result)


def diagnosis_text(result):
    return Diagnosis(task_sets={"tasks": result}, settings={}).summary()


def test_per_prompt_optimal_steps_do_not_match_a_fixed_learning_rate_network():
    model, task, _ = gd_control()
    result = diagnose(model, task, lam=LAM, n_steps=12, kernels=(), sensitivities=False, bootstrap=200, progress=False,
                      step_sizes="optimal")["tasks"]
    assert result.fitted_steps == {}
    assert result.scores["gd"].score < 0.9 and not (result.verdict.identified and result.verdict.best == "gd")


def test_cross_fitting_scores_each_prompt_with_the_step_fitted_on_the_other_half():
    """step_predictions["gd"] of prompt b is plain GD (NumPy) with the step fitted on the half b is not in."""
    model, task, _ = gd_control()
    result = diagnose(model, task, algorithms=("gd", "cg"), lam=LAM, n_steps=5, kernels=(), sensitivities=False, bootstrap=0,
                      progress=False)["tasks"]
    fit = result.fitted_steps["gd"]
    assert sorted(np.bincount(fit.folds)) == [12, 12]
    x, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    for b in range(task.batch_size):
        step, A = fit.step[1 - fit.folds[b]], x[b] @ x[b].T + LAM * np.eye(12)
        alpha, expected = np.zeros(12), [np.zeros(4)]
        for _ in range(5):
            alpha = alpha + step * (y[b] - A @ alpha)
            expected.append(xq[b] @ x[b].T @ alpha)
        np.testing.assert_allclose(result.step_predictions["gd"][b], np.stack(expected), rtol=1e-10, atol=1e-12)
    assert fit.to_dict()["fold_sizes"] == np.bincount(fit.folds, minlength=2).tolist()
    for fold in (0, 1):  # fit_score: the path R2 of the fold's own step on its own prompts (in-sample)
        members = np.flatnonzero(fit.folds == fold)
        steps = []
        for b in members:
            A, alpha, pred = x[b] @ x[b].T + LAM * np.eye(12), np.zeros(12), [np.zeros(4)]
            for _ in range(5):
                alpha = alpha + fit.step[fold] * (y[b] - A @ alpha)
                pred.append(xq[b] @ x[b].T @ alpha)
            steps.append(pred)
        layers = result.layer_predictions[members]
        expected_score = path_r2(layers, np.array(steps)[None], np.arange(1, layers.shape[1]))[0]  # layer 0 aligned, not scored
        assert fit.fit_score[fold] == pytest.approx(expected_score, rel=1e-9)


def test_richardson_transformer_is_identified_as_rowsum_richardson_and_separable_from_gd():
    sampler = GPRegressionSampler(dim=3, noise_std=0.1, bandwidth=0.7, input_std=1.0, condition_number=10.0)
    task = sampler.sample(24, 12, 4, seed=0)
    lam = 0.01
    K = torch.exp(-torch.cdist(task.x_support.double(), task.x_support.double()) ** 2 / (2 * 0.7**2))
    rowsum = K.sum(-1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh((K + lam * torch.eye(12)) / rowsum.sqrt() / rowsum.sqrt().mT)
    step = float((2.0 / (eigenvalues[:, 0] + eigenvalues[:, -1])).median())  # the solver's optimal step, typical prompt
    model = richardson_transformer(n_steps=5, lam=lam, bandwidth=0.7, step=step, dim=3)
    algorithms = ("richardson_rowsum", "gd", "richardson_jacobi", "cg", "chebyshev")
    result = diagnose(model, task, algorithms=algorithms, n_steps=15, kernels=(), sensitivities=False,
                      bootstrap=200, progress=False)["tasks"]
    verdict = result.verdict
    assert verdict.best == "richardson_rowsum" and verdict.identified and verdict.equivalent == []
    np.testing.assert_allclose(result.fitted_steps["richardson_rowsum"].step, [step, step], rtol=1e-5)  # the built step
    assert verdict.scores["gd"] < 0.99  # the row-sum preconditioner makes a measurable difference here
    score = result.scores["richardson_rowsum"]
    boundaries = np.arange(model.layers_per_step, model.n_layers + 1, model.layers_per_step)
    np.testing.assert_array_equal(score.aligned_steps[boundaries], boundaries // model.layers_per_step)
    assert np.all(score.aligned_r2[boundaries] > 0.99)


def test_default_ridge_of_linear_regression_makes_krr_the_posterior_mean_of_the_weights():
    """w ~ N(0, I/d), y = X w + noise: Gaussian conditioning (closed form, NumPy) gives the posterior
    mean of w; linear-kernel KRR with the default ridge must predict with exactly that mean."""
    noise, dim = 0.3, 4
    task = LinearRegressionSampler(dim=dim, noise_std=noise).sample(3, 6, 2, seed=0)
    lam = resolve_lam(task, None)
    assert lam == pytest.approx(noise**2 * dim, rel=1e-12)
    for b in range(3):
        x, xq, y = (t[b].double().numpy() for t in (task.x_support, task.x_query, task.y_support))
        prior = np.eye(dim) / dim
        posterior_mean = prior @ x.T @ np.linalg.solve(x @ prior @ x.T + noise**2 * np.eye(6), y)
        krr_pred = xq @ x.T @ np.linalg.solve(x @ x.T + lam * np.eye(6), y)
        np.testing.assert_allclose(krr_pred, xq @ posterior_mean, rtol=1e-10, atol=1e-12)
    assert resolve_lam(GPRegressionSampler(dim=2, noise_std=0.2).sample(1, 3, 1, seed=0), None) == pytest.approx(0.04)


@pytest.fixture(scope="module")
def random_diagnosis():
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2))
    tasks = {
        "in_distribution": GPRegressionSampler(dim=3).sample(24, 10, 3, seed=1),  # enough prompts for a verdict
        "ill_conditioned": GPRegressionSampler(dim=3, condition_number=20.0).sample(24, 10, 3, seed=2),
    }
    algorithms = ("cg", "gd", "richardson_rowsum")
    return tasks, diagnose(model, tasks, algorithms=algorithms, n_steps=6, bootstrap=200, sensitivities=True, progress=False)


def test_random_transformer_is_identified_as_no_algorithm(random_diagnosis):
    _, diagnosis = random_diagnosis
    for result in diagnosis.task_sets.values():
        assert not result.verdict.identified and "too few" not in result.verdict.message
        assert "not identified" in result.verdict.message


def test_krr_system_is_the_gaussian_kernel_with_the_noise_variance_as_ridge(random_diagnosis):
    tasks, diagnosis = random_diagnosis
    task, result = tasks["in_distribution"], diagnosis["in_distribution"]
    x = task.x_support.double().numpy()
    xq = task.x_query.double().numpy()
    lam = 0.1**2  # the GP sampler's default noise_std, squared
    for b in range(3):
        gram = np.exp(-((x[b][:, None] - x[b][None]) ** 2).sum(-1) / 2)
        cross = np.exp(-((xq[b][:, None] - x[b][None]) ** 2).sum(-1) / 2)
        expected = cross @ np.linalg.solve(gram + lam * np.eye(10), task.y_support[b].double().numpy())
        np.testing.assert_allclose(result.krr_predictions[b], expected, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(result.kappa[b], np.linalg.cond(gram + lam * np.eye(10)), rtol=1e-6)
    assert result.kernel == "gaussian" and result.lam == pytest.approx(lam)


def test_dataframe_holds_every_layer_step_pair_with_r2_from_the_stored_predictions(random_diagnosis):
    _, diagnosis = random_diagnosis
    frame = diagnosis.to_dataframe()
    assert len(frame) == 2 * 3 * 3 * 7  # task sets x algorithms x layers x steps
    result = diagnosis["ill_conditioned"]
    layer, step = 2, 3
    a = result.layer_predictions[:, layer].ravel()
    s = result.step_predictions["gd"][:, step].ravel()
    expected = 1 - np.sum((a - s) ** 2) / np.sum((s - s.mean()) ** 2)
    row = frame[(frame.task_set == "ill_conditioned") & (frame.algorithm == "gd") & (frame.layer == layer) & (frame.step == step)]
    assert row.r2.item() == pytest.approx(expected, rel=1e-10)
    assert row.mse.item() == pytest.approx(np.mean((a - s) ** 2), rel=1e-10)
    assert frame.groupby(["task_set", "algorithm", "layer"]).aligned.sum().eq(1).all()
    for (set_name, algorithm, layer), rows in frame.groupby(["task_set", "algorithm", "layer"]):
        score = diagnosis[set_name].scores[algorithm]
        row = list(score.layers).index(layer)
        assert rows.step[rows.aligned].item() == score.aligned_steps[row]
        assert rows.step[rows.argmin].item() == int(np.argmin(rows.mse.to_numpy()))  # the MSE checked above
        verdict = diagnosis[set_name].verdict
        named_best = algorithm == verdict.best and verdict.score > -math.inf  # a top path R2 of -inf / NaN: none is best
        assert rows.best.all() == named_best == rows.best.any()


def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_json_is_strict_with_null_for_nan_and_infinity(random_diagnosis, tmp_path):
    _, diagnosis = random_diagnosis
    result = diagnosis["in_distribution"]
    data = json.loads(diagnosis.to_json(tmp_path / "d.json"), parse_constant=reject_constant)
    json.loads((tmp_path / "d.json").read_text(), parse_constant=reject_constant)
    r2 = data["task_sets"]["in_distribution"]["scores"]["cg"]["r2"]
    assert np.isnan(result.scores["cg"].r2[:, 0]).all() and all(row[0] is None for row in r2)  # step 0 has no variance
    assert data["task_sets"]["in_distribution"]["fitted_steps"]["gd"]["step"] == result.fitted_steps["gd"].step.tolist()


def test_json_summary_plots_and_report_carry_the_same_numbers(random_diagnosis, tmp_path):
    _, diagnosis = random_diagnosis
    data = json.loads(diagnosis.to_json())
    for name, result in diagnosis.task_sets.items():
        for algorithm, score in result.scores.items():
            stored = data["task_sets"][name]["scores"][algorithm]
            np.testing.assert_allclose(np.array(stored["r2"], dtype=float), score.r2, equal_nan=True)
            assert stored["aligned_steps"] == score.aligned_steps.tolist()
        assert data["task_sets"][name]["verdict"]["identified"] is False
        assert result.layer_sensitivities.shape == (24, 3, 3, 10)
        assert result.kernel_alignment is not None
    text = diagnosis.summary()
    assert "in_distribution" in text and "ill_conditioned" in text and "Verdict" in text
    for block, result in zip(text.split("\n\n"), diagnosis.task_sets.values()):  # each algorithm's row, ranked
        rows = [line.split() for line in block.splitlines() if line.split() and line.split()[0] in result.scores]
        assert [row[0] for row in rows] == sorted(result.scores, key=lambda name: -result.scores[name].score)
        for row in rows:
            score = result.scores[row[0]]
            printed = [float(value.strip("[],")) for value in row[1:4]]
            np.testing.assert_allclose(printed, [score.score, *score.score_ci], atol=5e-5)
        best = result.scores[result.verdict.best]
        step_line = next(line for line in block.splitlines() if line.startswith("  step  "))
        pairs = re.findall(r"(\d+) \(\s*(\d+)\)", step_line)  # "aligned (argmin)" per layer
        assert [int(aligned) for aligned, _ in pairs] == best.aligned_steps.tolist()
        assert [int(argmin) for _, argmin in pairs] == best.argmin_steps.tolist()
    figures = diagnosis.plot("in_distribution")
    assert set(figures) == {"error_profiles", "step_map", "kernel_alignment", "sensitivities"}
    plt.close("all")
    one_set = Diagnosis(task_sets={"in_distribution": diagnosis["in_distribution"]}, settings=diagnosis.settings)
    index = one_set.save(tmp_path / "report")
    written = {path.name for path in index.parent.iterdir()}
    assert {"index.md", "diagnosis.json", "arrays.npz", "in_distribution_step_map.png"} <= written
    json.loads((index.parent / "diagnosis.json").read_text(), parse_constant=reject_constant)
    assert "![in_distribution: error_profiles]" in index.read_text()
    arrays, result = np.load(index.parent / "arrays.npz"), diagnosis["in_distribution"]
    np.testing.assert_array_equal(arrays["in_distribution/krr_predictions"], result.krr_predictions)
    np.testing.assert_array_equal(arrays["in_distribution/layer_predictions"], result.layer_predictions)
    np.testing.assert_array_equal(arrays["in_distribution/kappa"], result.kappa)
    for algorithm, pred in result.step_predictions.items():
        np.testing.assert_array_equal(arrays[f"in_distribution/steps/{algorithm}"], pred)
    colliding = Diagnosis(task_sets={"scale x2": diagnosis["in_distribution"], "scale_x2": diagnosis["ill_conditioned"]},
                          settings=diagnosis.settings)
    index = colliding.save(tmp_path / "colliding")
    text = index.read_text()  # names that sanitise alike get their own figure files
    assert "(scale_x2_step_map.png)" in text and "(scale_x2_2_step_map.png)" in text
    assert (index.parent / "scale_x2_2_step_map.png").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algorithms": ("cg", "lanczos")}, "unknown algorithm 'lanczos'"),
        ({"algorithms": ()}, "at least one"),
        ({"layers": []}, "at least one"),
        ({"layers": [0]}, "index >= 1"),
        ({"kernels": ("laplace",)}, "kernels entry"),
        ({"method": "ridge"}, "train_task"),
        ({"kernel": "cosine"}, "kernel must be one of"),
        ({"n_steps": 0}, "n_steps"),
        ({"step_sizes": "per_prompt"}, "step_sizes must be one of"),
        ({"layers": [1, 0]}, r"increasing without repeats .*pass \[0, 1\]"),
        ({"layers": [1, 1]}, r"increasing without repeats .*pass \[1\]"),
        ({"kernels": None}, "kernels must name reference kernels"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"n_kappa_bins": 0}, "n_kappa_bins must be an integer >= 1"),
        ({"min_score": 2}, "min_score must be <= 1"),
        ({"min_score": float("nan")}, "min_score"),
        ({"min_gap": -1}, "min_gap"),
        ({"sensitivities": "no"}, "sensitivities must be True or False"),
        ({"train_task": GPRegressionSampler(dim=3).sample(2, 4, 1, seed=5)}, "train_task is only read by method='ridge'"),
        ({"method": "ridge", "train_task": {"a": 1}}, "train_task must be an mi_krr.tasks.ICLTask"),
        ({"algorithms": {"mine": lambda K, y, lam: None}}, r"algorithms entry 'mine' must map a name to a solver callable \(K, y, lam, n_steps"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1))
    task = GPRegressionSampler(dim=3).sample(2, 4, 1, seed=0)
    with pytest.raises(ValueError, match=message) as error:
        diagnose(model, task, progress=False, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_tasks_raise_one_line_value_errors():
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1))
    with pytest.raises(ValueError, match="dimension"):
        diagnose(model, GPRegressionSampler(dim=5).sample(2, 4, 1, seed=0), sensitivities=False, kernels=(), progress=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        diagnose(model, {}, progress=False)
    unlabelled = GPRegressionSampler(dim=3).sample(2, 4, 1, seed=0)
    unlabelled.info = {}
    with pytest.raises(ValueError, match="kernel='auto'"):
        diagnose(model, unlabelled, progress=False)
    noiseless = GPRegressionSampler(dim=3, noise_std=0.0).sample(2, 4, 1, seed=0)
    with pytest.raises(ValueError, match="lam="):
        diagnose(model, noiseless, progress=False)


def test_attach_results_single_names_and_numpy_scalars_are_accepted_and_written_as_plain_json():
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=2, n_heads=1))
    task = GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0)
    common = dict(algorithms="gd", n_steps=3, progress=False)
    plain = diagnose(model, task, kernels=("exp",), layers=[0, 2], bootstrap=10, seed=1, **common)
    numpy_args = diagnose(probes.attach(model), task, kernels="exp", layers=np.array([0, 2]), bootstrap=np.int64(10),
                          seed=np.int64(1), min_score=np.float32(0.5), **common)
    assert numpy_args.to_dict()["settings"]["bootstrap"] == 10 and type(numpy_args.settings["seed"]) is int
    text = numpy_args.to_json()  # NumPy scalars in the arguments: still plain JSON
    assert json.loads(text)["settings"]["algorithms"] == {"gd": "registry"}
    np.testing.assert_array_equal(numpy_args["tasks"].scores["gd"].r2, plain["tasks"].scores["gd"].r2)
    assert diagnose(model, task, layers=torch.tensor(2), kernels=(), bootstrap=0, **common)["tasks"].layers == [2]


def test_tasks_without_queries_raise_a_one_line_error_in_every_probe():
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1))
    task = GPRegressionSampler(dim=3).sample(2, 4, 0, seed=0)
    for probe in (lambda: diagnose(model, task, progress=False), lambda: probes.layer_predictions(model, task),
                  lambda: probes.attention_kernels(model, task)):
        with pytest.raises(ValueError, match=r"no query points \(n_query=0\).*n_query >= 1") as error:
            probe()
        assert "\n" not in str(error.value)


def test_non_icl_models_raise_a_one_line_error_naming_the_missing_method():
    task = GPRegressionSampler(dim=3).sample(2, 4, 1, seed=0)
    with pytest.raises(ValueError, match="Linear has no method 'encode'"):
        diagnose(torch.nn.Linear(2, 2), task, progress=False)


def test_diagnose_reads_the_model_in_one_forward_pass_with_the_same_numbers_as_the_separate_probes(monkeypatch):
    import probes.streaming
    from probes import kernel_alignment, layer_predictions

    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2))
    task = GPRegressionSampler(dim=3).sample(8, 10, 3, seed=1)
    passes = []
    original = probes.streaming.run_with_reductions

    def counting(model, tokens, reductions, **options):
        passes.append(len(reductions))
        return original(model, tokens, reductions, **options)

    monkeypatch.setattr(probes.streaming, "run_with_reductions", counting)
    result = diagnose(model, task, algorithms=("cg", "gd"), n_steps=4, sensitivities=False, bootstrap=0, progress=False)["tasks"]
    assert passes == [3 + 2]  # one forward: read-outs of residual indices 0..2 and both layers' attention
    np.testing.assert_allclose(result.layer_predictions, layer_predictions(model, task).numpy(), rtol=1e-6, atol=1e-7)
    separate = kernel_alignment(model, task)
    torch.testing.assert_close(result.kernel_alignment.tau, separate.tau, rtol=1e-6, atol=0, equal_nan=True)


def test_task_sets_of_other_prompt_lengths_and_splits_each_get_their_own_concat_mask():
    """diagnose encodes every task set up front and streams them one after another: each set's
    last read-out equals `model.predict` on that set (which passes its n_support explicitly),
    including a set of the same token count as another but a different support / query split."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2))
    tasks = {
        "short": GPRegressionSampler(dim=3).sample(6, 8, 3, seed=1),  # 11 tokens, 8 support
        "long": GPRegressionSampler(dim=3).sample(6, 16, 3, seed=2),  # 19 tokens
        "other_split": GPRegressionSampler(dim=3).sample(6, 5, 6, seed=3),  # 11 tokens, 5 support
    }
    result = diagnose(model, tasks, algorithms=("cg",), n_steps=4, kernels=(), bootstrap=0, progress=False)
    for name, task in tasks.items():
        with torch.no_grad():
            expected = model.predict(task).double().numpy()
        np.testing.assert_allclose(result[name].layer_predictions[:, -1], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_default_solver_steps_are_twice_the_layers_but_at_least_20():
    assert [default_n_steps(layers) for layers in (1, 4, 10, 12)] == [20, 20, 20, 24]
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1))
    result = diagnose(model, GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0), algorithms="cg", kernels=(), bootstrap=0,
                      progress=False)["tasks"]
    assert result.n_steps == 20 and result.step_predictions["cg"].shape == (4, 21, 2)


def test_plots_draw_the_stored_statistics_and_only_the_figures_a_diagnosis_has(random_diagnosis):
    _, diagnosis = random_diagnosis
    figures = diagnosis.plot()  # both task sets: keys prefixed by the task set
    assert set(figures) == {f"{name}/{figure}" for name in diagnosis.task_sets
                            for figure in ("error_profiles", "step_map", "kernel_alignment", "sensitivities")}
    result = diagnosis["ill_conditioned"]
    best = result.scores[result.verdict.best]
    left = figures["ill_conditioned/step_map"].axes[0]
    path, argmin = (line for line in left.get_lines())
    np.testing.assert_array_equal(path.get_xdata(), best.aligned_steps)  # the white path is the alignment
    np.testing.assert_array_equal(argmin.get_xdata(), best.argmin_steps)  # the crosses the per-layer argmin
    assert list(figures["ill_conditioned/step_map"].axes[1].get_xticks()) == list(best.layers)  # one tick per layer
    low, high = figures["ill_conditioned/error_profiles"].axes[0].get_ylim()
    assert low <= best.model_profile.min() and best.model_profile.max() <= high  # every layer in the frame
    alignment = result.kernel_alignment
    panels = [ax for ax in figures["ill_conditioned/kernel_alignment"].axes if ax.get_images()]  # not the colour bars
    assert [ax.get_title().split(":")[-1].strip() for ax in panels] == ["rel. op. distance", "row Spearman", "CKA"] * 2
    for ax, (kernel, metric) in zip(panels, [(k, m) for k in ("exp", "gaussian") for m in ("operator_distance", "row_spearman", "cka")]):
        values = alignment.metrics[kernel][metric].numpy()  # [block, head] = [2, 2]
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), values)
        assert list(ax.get_xticks()) == [0, 1] and list(ax.get_yticks()) == [0, 1]
        expected = [f"{value:.2f}" for value in values[np.isfinite(values)]] + ["n/a"] * int(np.isnan(values).sum())  # NaN cells read n/a
        assert sorted(text.get_text() for text in ax.texts) == sorted(expected)
    standalone = [ax for ax in alignment.plot("mine").axes if ax.get_images()]  # KernelAlignment.plot: the same panels
    assert [ax.get_title() for ax in standalone] == [ax.get_title() for ax in panels]
    assert standalone[0].figure.texts[0].get_text().startswith("mine: ")
    tau = alignment.tau.numpy()
    finite = tau[np.isfinite(tau)]
    assert f"τ {finite.min():.3g}-{finite.max():.3g}; ∞ in {np.isinf(tau).sum()}" in panels[0].get_title()  # inf: uniform is closest
    plt.close("all")
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=1))
    lean = diagnose(model, GPRegressionSampler(dim=3).sample(4, 5, 2, seed=0), algorithms="cg", kernels=(), bootstrap=0, progress=False)
    assert set(lean.plot()) == {"error_profiles", "step_map"}  # no alignment, no sensitivities: no empty figures
    plt.close("all")


def test_custom_solvers_in_a_dict_run_as_given_and_registry_ones_like_names():
    model, task, _ = gd_control()
    custom = functools.partial(richardson, step=0.05)
    result = diagnose(model, task, algorithms={"gd_at_0.05": custom, "gd": ALGORITHMS["gd"]}, lam=LAM, n_steps=4, kernels=(),
                      bootstrap=0, progress=False)["tasks"]
    assert list(result.fitted_steps) == ["gd"]  # the registry gd is fitted, the custom one is not
    x, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    for b in range(3):
        A, alpha, expected = x[b] @ x[b].T + LAM * np.eye(12), np.zeros(12), [np.zeros(4)]
        for _ in range(4):
            alpha = alpha + 0.05 * (y[b] - A @ alpha)
            expected.append(xq[b] @ x[b].T @ alpha)
        np.testing.assert_allclose(result.step_predictions["gd_at_0.05"][b], np.stack(expected), rtol=1e-10, atol=1e-12)
    assert diagnose(model, task, algorithms={"mine": custom}, lam=LAM, n_steps=4, kernels=(), bootstrap=0,
                    progress=False).settings["algorithms"] == {"mine": "mi_krr.solvers.richardson.richardson(step=0.05)"}
