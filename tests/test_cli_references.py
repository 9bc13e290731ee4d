"""The `mi-krr` subcommands' numbers against independent references: `construct`'s default steps
and feature-map solver against NumPy solvers, `reproduce`'s --checkpoint / --seed / --device
wiring against `probes.kernel_alignment` on prompts drawn here, `demo`'s table and --seed against
NumPy CG / KRR and the per-task-set diagnoses, `diagnose PATH`'s shifts, --seed, --lam and ridge
probes against NumPy KRR and probes fitted here, and Ctrl-C handling."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.cli import main
from mi_krr.tasks import (DEFAULT_SHIFTS, GPRegressionSampler, LinearRegressionSampler, apply_shift, sampler_from_config,
                          shift_applies)
from mi_krr.train import load_model, read_run_config
from probes.kernel_alignment import kernel_alignment
from probes.layer_predictions import layer_predictions
from construct_references import gaussian_kernel as gaussian
from construct_references import assert_construct_cg_feature_head_matches_numpy, numpy_cg_predictions, numpy_rowsum_richardson_errors, parse_construct_table, relative_errors_to_krr
from reproduction_recorder import record_reproduction_calls


def run_main(*args: str) -> tuple[int, str]:
    """`main(args)` with its stdout captured (usable from module-scoped fixtures)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(list(args))
    return code, buffer.getvalue()


# ---- construct ----------------------------------------------------------------------------------


def test_construct_cg_with_an_exp_head_runs_numpy_cg_on_the_heads_random_feature_kernel(capsys):
    """cg --kernel exp --head-width m --temperature 2: the solver column is NumPy CG on phi phi^T
    (positive random features phi(x) = exp(w . x' - |x'|^2 / 2) / sqrt(m), x' = x / sqrt(tau)), vs exact exp KRR."""
    tau = 2.0

    def features(points, W):
        scaled = points / np.sqrt(tau)
        return np.exp(scaled @ W - (scaled**2).sum(-1, keepdims=True) / 2)

    assert_construct_cg_feature_head_matches_numpy(capsys, "exp", tau, features, lambda a, b: np.exp(a @ b.T / tau))


def test_construct_gd_default_rate_is_one_over_the_largest_gram_eigenvalue_plus_lam(capsys):
    """gd without --step: NumPy GD with rate 1 / (max_b mu_max(X_b^T X_b) + lam) gives both error-to-KRR columns."""
    steps, lam, dim, n, m, batch, seed = 4, 0.1, 3, 8, 3, 4, 2
    assert main(["construct", "gd", "--steps", str(steps), "--lam", str(lam), "--dim", str(dim), "--n-support", str(n),
                 "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    task = LinearRegressionSampler(dim, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    rate = 1.0 / (max(np.linalg.eigvalsh(x[b].T @ x[b])[-1] for b in range(batch)) + lam)
    preds, exact = [], []
    for b in range(batch):
        w, trajectory = np.zeros(dim), [np.zeros(m)]
        for _ in range(steps):
            w = w + rate * (x[b].T @ y[b] - (x[b].T @ x[b] + lam * np.eye(dim)) @ w)
            trajectory.append(xq[b] @ w)
        preds.append(trajectory)
        exact.append(xq[b] @ x[b].T @ np.linalg.solve(x[b] @ x[b].T + lam * np.eye(n), y[b]))
    expected = relative_errors_to_krr(np.array(preds), np.array(exact))
    np.testing.assert_allclose(table[:, 3], expected, rtol=2e-3)
    np.testing.assert_allclose(table[:, 2], expected, rtol=2e-3)


def test_construct_richardson_default_step_is_the_median_prompts_optimal_rowsum_step(capsys):
    """richardson without --step: NumPy row-sum Richardson at the median over prompts of 2 / (mu_min + mu_max)."""
    steps, lam, bandwidth, dim, n, m, batch, seed = 4, 0.05, 0.8, 2, 8, 3, 5, 1  # odd batch: one middle prompt
    assert main(["construct", "richardson", "--steps", str(steps), "--lam", str(lam), "--bandwidth", str(bandwidth),
                 "--dim", str(dim), "--n-support", str(n), "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    task = GPRegressionSampler(dim, kernel="gaussian", bandwidth=bandwidth, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    optimal = []
    for b in range(batch):
        K = gaussian(x[b], x[b], bandwidth)
        root = np.sqrt(K.sum(1))
        mu = np.linalg.eigvalsh((K + lam * np.eye(n)) / np.outer(root, root))
        optimal.append(2.0 / (mu[0] + mu[-1]))
    step = float(np.median(optimal))
    expected = numpy_rowsum_richardson_errors(x, xq, y, lam, bandwidth, step, steps)
    np.testing.assert_allclose(table[:, 3], expected, rtol=2e-3)
    np.testing.assert_allclose(table[:, 2], expected, rtol=2e-3)


def test_construct_builds_the_model_on_the_requested_device(monkeypatch, capsys):
    """--device reaches the constructed model (spied: only a CPU is assumed; "cpu:0" is a distinct, valid name)."""
    import mi_krr.construct as construct

    seen, original = [], construct.gd_transformer

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(construct, "gd_transformer", spy)
    assert main(["construct", "gd", "--steps", "2", "--device", "cpu:0"]) == 0
    assert seen == ["cpu:0"]


# ---- reproduce ----------------------------------------------------------------------------------


def exp_alignment_by_layer(model, task):
    """Best-head exp-kernel operator distance per layer, from `kernel_alignment` (NumPy min over heads)."""
    distance = kernel_alignment(model, task, kernels=("exp",)).metrics["exp"]["operator_distance"].double().numpy()
    return np.nanmin(distance, axis=1)


def shifted_seed(sampler, name, seed):
    """The seed `task_sets` documents for shift `name`: seed + its 1-based position among applicable shifts."""
    applicable = [key for key, shift in DEFAULT_SHIFTS.items() if shift_applies(sampler, shift)]
    return seed + 1 + applicable.index(name)


@pytest.fixture(scope="module")
def sharper_checkpoint(tmp_path_factory):
    """A copy of checkpoints/softmax_gp with every W_Q scaled by 1.7 (sharper attention, other distances)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = shipped_checkpoint("softmax_gp")
    folder = tmp_path_factory.mktemp("ckpt") / "sharper_gp"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    weights = load_file(str(source / "model.safetensors"))
    save_file({key: value * 1.7 if key.endswith("W_Q") else value for key, value in weights.items()}, str(folder / "model.safetensors"),
              metadata=metadata)
    return folder


def test_reproduce_softmax_ood_measures_the_given_checkpoint_on_prompts_of_the_given_seed(sharper_checkpoint, tmp_path):
    """--checkpoint and --seed reach softmax-ood: its JSON equals kernel_alignment of that model on seed-7 prompts."""
    from mi_krr.reproductions.softmax_ood import QUICK

    seed, out = 7, tmp_path / "ood"
    code, _ = run_main("reproduce", "softmax-ood", "--quick", "--seed", str(seed), "--checkpoint", str(sharper_checkpoint),
                       "--no-progress", "--out", str(out))
    assert code == 0
    result = json.loads((out / "softmax-ood.json").read_text())["result"]
    config = read_run_config(sharper_checkpoint)
    sampler = sampler_from_config(config["sampler"])
    n, m, batch = config["train"]["n_support"], config["train"]["n_query"], QUICK["batch_size"]
    model = load_model(sharper_checkpoint)
    tasks = {"in_distribution": sampler.sample(batch, n, m, seed=seed, dtype=torch.float32)}
    for name in QUICK["shifts"]:
        tasks[name] = apply_shift(sampler, DEFAULT_SHIFTS[name]).sample(batch, n, m, seed=shifted_seed(sampler, name, seed), dtype=torch.float32)
    assert result["task_sets"] == list(tasks)
    for name, task in tasks.items():
        np.testing.assert_allclose(result["best_distance"][name], exp_alignment_by_layer(model, task), rtol=1e-9)


def test_reproduce_loads_checkpoint_reproductions_on_the_requested_device(monkeypatch, tmp_path):
    """--device reaches the checkpoint loader of softmax-ood (spied: only a CPU is assumed)."""
    import mi_krr.checkpoints as checkpoints

    seen, original = [], checkpoints.load_checkpoint

    def spy(path, device="cpu", **kwargs):
        seen.append(device)
        return original(path, device=device, **kwargs)

    monkeypatch.setattr(checkpoints, "load_checkpoint", spy)
    code, _ = run_main("reproduce", "softmax-ood", "--quick", "--device", "cpu:0", "--no-progress", "--out", str(tmp_path))
    assert code == 0 and seen == ["cpu:0"]


@pytest.mark.parametrize("name", ["cg-rate", "width", "softmax-ood", "richardson-profile"])
def test_reproduce_hands_device_and_seed_to_every_reproduction(name, monkeypatch, tmp_path):
    """--device and --seed reach each reproduction function (a recorder stands in for it)."""
    seen = record_reproduction_calls(monkeypatch)
    code, _ = run_main("reproduce", name, "--device", "cpu:0", "--seed", "3", "--no-progress", "--out", str(tmp_path))
    assert code == 0 and seen["device"] == "cpu:0" and seen["seed"] == 3


@pytest.fixture(scope="module")
def softmax_linear_checkpoint(tmp_path_factory):
    """checkpoints/softmax_gp's softmax model, its run config naming linear regression prompts
    (a task without a kernel, so without the bandwidth shift of softmax-ood's QUICK)."""
    source = shipped_checkpoint("softmax_gp")
    folder = tmp_path_factory.mktemp("ckpt") / "softmax_linear"
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["sampler"] = LinearRegressionSampler(config["sampler"]["dim"], noise_std=0.2).to_config()
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    return folder


def test_reproduce_softmax_ood_quick_on_another_checkpoint_measures_the_shifts_its_task_has(softmax_linear_checkpoint, tmp_path):
    """--quick's shifts are chosen for softmax_gp (one is a bandwidth shift); on a checkpoint
    whose task has no bandwidth, the quick run measures those that apply to its task instead of
    failing on an option the user never passed."""
    from mi_krr.reproductions.softmax_ood import QUICK

    seed, out = 2, tmp_path / "ood"
    code, _ = run_main("reproduce", "softmax-ood", "--quick", "--seed", str(seed), "--checkpoint", str(softmax_linear_checkpoint),
                       "--no-progress", "--out", str(out))
    assert code == 0
    result = json.loads((out / "softmax-ood.json").read_text())["result"]
    sampler = sampler_from_config(read_run_config(softmax_linear_checkpoint)["sampler"])
    assert QUICK["shifts"] == ("input_scale_x2", "bandwidth_x2") and not shift_applies(sampler, "bandwidth_x2")
    assert result["task_sets"] == ["in_distribution", "input_scale_x2"]
    train = read_run_config(softmax_linear_checkpoint)["train"]
    n, m, batch, model = train["n_support"], train["n_query"], QUICK["batch_size"], load_model(softmax_linear_checkpoint)
    tasks = {"in_distribution": sampler.sample(batch, n, m, seed=seed, dtype=torch.float32),
             "input_scale_x2": apply_shift(sampler, "input_scale_x2").sample(batch, n, m, seed=shifted_seed(sampler, "input_scale_x2", seed),
                                                                             dtype=torch.float32)}
    for name, task in tasks.items():
        np.testing.assert_allclose(result["best_distance"][name], exp_alignment_by_layer(model, task), rtol=1e-9)


def test_reproduce_softmax_ood_quick_on_a_linear_attention_checkpoint_names_the_attention_not_the_quick_shifts(capsys):
    assert main(["reproduce", "softmax-ood", "--quick", "--checkpoint", str(shipped_checkpoint("linear_lr")), "--no-progress",
                 "--out", "unused"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "attention pattern has negative entries (not softmax-normalised)" in lines[0]
    assert "shifts" not in lines[0]


# ---- cli ----------------------------------------------------------------------------------------


def test_keyboard_interrupt_exits_130_with_one_line_and_reraises_with_debug(monkeypatch, capsys):
    """Ctrl-C in a command: exit 130 and one stderr line; with --debug the KeyboardInterrupt propagates."""
    import mi_krr.commands.construct as construct

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(construct, "run", interrupted)
    assert main(["construct", "cg"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mi-krr construct: interrupted"]
    with pytest.raises(KeyboardInterrupt):
        main(["construct", "cg", "--debug"])


# ---- demo ---------------------------------------------------------------------------------------

DEMO_SEED = 1


@pytest.fixture(scope="module")
def demo_seed1(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_seed1")
    code, text = run_main("demo", "--quick", "--no-progress", "--seed", str(DEMO_SEED), "--out", str(out))
    assert code == 0
    return out, text, json.loads((out / "report.json").read_text())


def test_demo_seed_draws_the_cg_constructions_and_shipped_models_prompts(demo_seed1):
    """--seed 1: the CG construction's layers are NumPy CG, softmax_gp's KRR is NumPy KRR, on prompts drawn here with seed 1."""
    from mi_krr.commands.demo import QUICK

    out, _, report = demo_seed1
    cg = report["models"]["cg_construction"]["diagnosis"]["task_sets"]["in_distribution"]
    lam = 0.05  # the demo's documented setting: d = 8, n = 16, 4 queries, input condition number 20, lam 0.05
    task = LinearRegressionSampler(8, condition_number=20.0, noise_std=0.1).sample(QUICK.construction_batch, 16, 4, seed=DEMO_SEED)
    x, xq, y = (t.to(torch.float64).numpy() for t in (task.x_support, task.x_query, task.y_support))
    layer_predictions_cg = np.load(out / "cg_construction.npz")["in_distribution/layer_predictions"]
    assert cg["lam"] == pytest.approx(lam)
    for b in range(x.shape[0]):
        expected = numpy_cg_predictions(x[b] @ x[b].T, y[b], lam, xq[b] @ x[b].T, QUICK.cg_steps)
        np.testing.assert_allclose(layer_predictions_cg[b], expected, rtol=1e-6, atol=1e-8)

    checkpoint = shipped_checkpoint("softmax_gp")
    config = read_run_config(checkpoint)
    sampler = sampler_from_config(config["sampler"])
    gp = sampler.sample(QUICK.batch, config["train"]["n_support"], config["train"]["n_query"], seed=DEMO_SEED, dtype=torch.float32)
    xs, xq, y = (t.double().numpy() for t in (gp.x_support, gp.x_query, gp.y_support))
    lam = sampler.noise_std**2
    krr = [gaussian(xq[b], xs[b], sampler.bandwidth) @ np.linalg.solve(gaussian(xs[b], xs[b], sampler.bandwidth) + lam * np.eye(len(xs[b])), y[b])
           for b in range(len(xs))]
    np.testing.assert_allclose(np.load(out / "softmax_gp.npz")["in_distribution/krr_predictions"], np.array(krr), rtol=1e-5, atol=1e-6)


def printed_rows(text: str) -> list[list[str]]:
    """The data rows of the printed summary table, split into cells (the table ends at a blank
    line, the comparison's notes or the report line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model ")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("report:", "Note: ")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_demo_table_rows_carry_each_task_sets_own_verdict_score_and_label(demo_seed1):
    """Every printed row's best algorithm, path R2, identified yes/no match that (model, task set)'s diagnosis."""
    _, text, report = demo_seed1
    rows = printed_rows(text)
    expected_rows = sum(len(entry["diagnosis"]["task_sets"]) for entry in report["models"].values())
    assert len(rows) == expected_rows
    seen_identified = set()
    for cells in rows:
        model, task_set, best, score, identified = cells[:5]
        result = report["models"][model]["diagnosis"]["task_sets"][task_set]
        verdict = result["verdict"]
        assert best == verdict["best"]
        assert score.split()[0] == f"{result['scores'][verdict['best']]['score']:.4f}"
        assert identified == ("yes" if verdict["identified"] else "no")
        seen_identified.add(identified)
    cg_row = next(cells for cells in rows if cells[0] == "cg_construction")
    assert cg_row[4] == "yes"  # the positive control
    assert seen_identified == {"yes", "no"}


def test_demo_kernel_distance_is_the_best_head_per_layer_averaged_over_layers(demo_seed1):
    """softmax_gp's in-distribution exp-kernel distance = mean over layers of min over heads of kernel_alignment's distance."""
    from mi_krr.commands.demo import QUICK

    _, text, report = demo_seed1
    checkpoint = shipped_checkpoint("softmax_gp")
    config = read_run_config(checkpoint)
    sampler = sampler_from_config(config["sampler"])
    task = sampler.sample(QUICK.batch, config["train"]["n_support"], config["train"]["n_query"], seed=DEMO_SEED, dtype=torch.float32)
    expected = float(np.mean(exp_alignment_by_layer(load_model(checkpoint), task)))
    row = next(r for r in report["table"] if r["model"] == "softmax_gp" and r["task_set"] == "in_distribution")
    assert row["exp_distance"] == pytest.approx(expected, rel=1e-6)
    printed = next(cells for cells in printed_rows(text) if cells[0] == "softmax_gp" and cells[1] == "in_distribution")
    assert printed[5] == f"{expected:.3f}"


# ---- diagnose -----------------------------------------------------------------------------------


def test_diagnose_applies_every_applicable_shift_with_the_given_seed_and_lam(tmp_path):
    """diagnose PATH --seed 4 --lam 0.05: one set per applicable shift, each set's KRR = NumPy KRR on prompts drawn here."""
    checkpoint, seed, lam, batch, n_query, out = shipped_checkpoint("linear_lr"), 4, 0.05, 5, 2, tmp_path / "diag"
    code, _ = run_main("diagnose", str(checkpoint), "--batch", str(batch), "--n-query", str(n_query), "--bootstrap", "10", "--seed", str(seed),
                       "--lam", str(lam), "--no-sensitivities", "--no-progress", "--shift-step-sizes", "optimal", "--out", str(out))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["models"].values()
    sets = entry["diagnosis"]["task_sets"]
    config = read_run_config(checkpoint)
    sampler = sampler_from_config(config["sampler"])
    n = config["train"]["n_support"]
    samplers = {"in_distribution": (sampler, seed)}
    for name, shift in DEFAULT_SHIFTS.items():
        if shift_applies(sampler, shift):
            samplers[name] = (apply_shift(sampler, shift), shifted_seed(sampler, name, seed))
    assert list(sets) == list(samplers) and len(sets) > 1
    arrays = np.load(out / f"{checkpoint.name}.npz")
    for name, (shifted, shifted_seed_value) in samplers.items():
        assert sets[name]["lam"] == pytest.approx(lam)
        task = shifted.sample(batch, n, n_query, seed=shifted_seed_value, dtype=torch.float32)
        x, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
        krr = [xq[b] @ x[b].T @ np.linalg.solve(x[b] @ x[b].T + lam * np.eye(x.shape[1]), y[b]) for b in range(batch)]
        np.testing.assert_allclose(arrays[f"{name}/krr_predictions"], np.array(krr), rtol=1e-5, atol=1e-6, err_msg=name)


def test_diagnose_ridge_method_fits_probes_on_separate_seed_plus_10000_prompts(tmp_path):
    """diagnose --method ridge: layer predictions equal probes fitted here on 4 x batch prompts drawn with seed + 10000,
    their validation split drawn with --seed."""
    checkpoint, seed, batch, n_query, out = shipped_checkpoint("linear_lr"), 2, 6, 2, tmp_path / "ridge"
    code, _ = run_main("diagnose", str(checkpoint), "--method", "ridge", "--no-shifts", "--batch", str(batch), "--n-query", str(n_query),
                       "--bootstrap", "10", "--seed", str(seed), "--no-sensitivities", "--no-progress", "--out", str(out))
    assert code == 0
    config = read_run_config(checkpoint)
    sampler = sampler_from_config(config["sampler"])
    n = config["train"]["n_support"]
    task = sampler.sample(batch, n, n_query, seed=seed, dtype=torch.float32)
    train = sampler.sample(4 * batch, n, n_query, seed=seed + 10_000, dtype=torch.float32)
    expected = layer_predictions(load_model(checkpoint), task, method="ridge", train_task=train, seed=seed).numpy()  # --seed splits too
    actual = np.load(out / f"{checkpoint.name}.npz")["in_distribution/layer_predictions"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-8)
