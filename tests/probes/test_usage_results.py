"""What a researcher does with `probes.diagnose`'s results, and the `mi-krr` command line, used as
a user would: the result views agree with a brute-force path R2 and with each other, the seed
reproduces and varies what it should, and the user errors found in a usage review (custom
solvers, task-set names, figures, `--out`, configs, prompts too long for the model, options a
construction ignores, short training runs) stay fixed."""

from __future__ import annotations

import inspect
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from brute_force import path_r2

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.cli import main
from mi_krr.construct import gd_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS, cg, richardson
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from probes.diagnose import diagnose
from probes.diagnosis import strict_json

LAM = 0.1


@pytest.fixture(scope="module")
def gd_network():
    """The GD construction with one fixed learning rate (stable on every prompt) and 24 prompts."""
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.1).sample(24, 12, 4, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + LAM))
    return gd_transformer(n_steps=4, lr=lr, lam=LAM, dim=4), task


def run(model, tasks, **kwargs):
    return diagnose(model, tasks, **{"lam": LAM, "n_steps": 6, "kernels": (), "progress": False, **kwargs})


@pytest.fixture(scope="module")
def two_sets(gd_network):
    model, task = gd_network
    shifted = LinearRegressionSampler(dim=4, condition_number=50.0, noise_std=0.1).sample(24, 12, 4, seed=3)
    return run(model, {"in_distribution": task, "shifted": shifted}, algorithms=("cg", "gd", "heavy_ball", "newton"), bootstrap=100)


def without_timings(diagnosis):
    data = diagnosis.to_dict()
    for result in data["task_sets"].values():
        result.pop("seconds")
    return json.dumps(strict_json(data), sort_keys=True)


# ---- the result views -------------------------------------------------------------------------


def test_every_view_carries_the_brute_force_path_r2_and_names_its_argmax_as_best(two_sets):
    """For each task set, every algorithm's path R2, enumerated over every monotone layer -> step map
    in NumPy (`brute_force.path_r2`) from the stored layer and step predictions, equals the
    dataframe's `score` column and the strict JSON's `score`; the dataframe's `best` rows, the
    summary's first ranked algorithm and the HTML row all name the argmax of those scores."""
    frame = two_sets.to_dataframe()
    data = json.loads(two_sets.to_json())
    html = two_sets._repr_html_()
    for block, (name, result) in zip(two_sets.summary().split("\n\n"), two_sets.task_sets.items()):
        names = list(result.step_predictions)
        reference = path_r2(result.layer_predictions, np.stack([result.step_predictions[a] for a in names]), np.arange(1, 5))
        rows = frame[frame.task_set == name]
        for algorithm, expected in zip(names, reference):
            assert list(rows[rows.algorithm == algorithm].score.unique()) == pytest.approx([expected], rel=1e-10)
            stored = data["task_sets"][name]["scores"][algorithm]["score"]  # strict JSON: -inf is null
            assert stored == pytest.approx(expected, rel=1e-10) if np.isfinite(expected) else stored is None
        argmax = names[int(np.argmax(reference))]
        assert set(rows[rows.best].algorithm) == {argmax}
        ranked = [line.split()[0] for line in block.splitlines() if line.split() and line.split()[0] in names]
        assert ranked[0] == argmax
        assert f"<td>{name}</td><td>{argmax}</td>" in html
        assert len(rows) == len(names) * 5 * 7  # algorithms x layers 0..4 x steps 0..6


def test_same_seed_reproduces_every_number_whatever_the_global_rng_and_another_seed_moves_only_the_intervals(gd_network):
    """Two runs with seed=3 under different global torch / NumPy RNG states give the same strict JSON
    (timings aside). seed=4 keeps CG's point estimate (no fitted step) but draws other resamples:
    its interval moves, and each interval is the 2.5 / 97.5% order statistic of its own replicates."""
    model, task = gd_network
    kwargs = dict(algorithms=("cg", "gd"), bootstrap=100, seed=3)
    torch.manual_seed(1), np.random.seed(1)
    first = run(model, task, **kwargs)
    torch.manual_seed(2), np.random.seed(2)
    second = run(model, task, **kwargs)
    assert without_timings(first) == without_timings(second)
    other = run(model, task, **{**kwargs, "seed": 4})
    a, b = first["tasks"].scores["cg"], other["tasks"].scores["cg"]
    assert a.score == b.score and a.score_ci != b.score_ci
    for score in (a, b):  # percentile interval without interpolation: the 3rd and 98th of 100 sorted replicates
        samples = np.sort(score.score_samples)
        assert score.score_ci == (samples[2], samples[97])


def test_single_layer_single_algorithm_and_several_sets_all_plot_and_serialise(gd_network, two_sets):
    """One probed layer, one candidate, no kernels: every view works; two task sets get prefixed
    figure keys, each a matplotlib Figure."""
    model, task = gd_network
    one = run(model, task, algorithms="gd", layers=[4], bootstrap=0)
    assert one["tasks"].layers == [4] and list(one["tasks"].scores) == ["gd"]
    json.loads(one.to_json())
    assert len(one.to_dataframe()) == 7 and "gd" in one.summary()
    figures = two_sets.plot()
    assert set(figures) == {f"{s}/{f}" for s in ("in_distribution", "shifted") for f in ("error_profiles", "step_map")}
    assert all(isinstance(figure, matplotlib.figure.Figure) for figure in figures.values())
    assert set(one.plot()) == {"error_profiles", "step_map"}
    plt.close("all")


def test_every_figure_of_a_task_set_names_the_task_set(two_sets):
    """Error profiles title with the set's name; the step map must too (suptitle or an axis title)."""
    for key, figure in two_sets.plot().items():
        name = key.split("/")[0]
        texts = [ax.get_title() for ax in figure.axes] + [figure._suptitle.get_text() if figure._suptitle else ""]
        assert any(name in text for text in texts), (key, texts)
    plt.close("all")


def test_unknown_task_set_name_says_which_names_exist(gd_network):
    model, task = gd_network
    diagnosis = run(model, task, algorithms="gd", bootstrap=0)
    with pytest.raises((KeyError, ValueError)) as error:
        diagnosis["in_distribution"]
    assert "tasks" in str(error.value)


# ---- diagnose's options -----------------------------------------------------------------------


def test_registry_solver_under_its_own_label_is_fitted_like_its_name(gd_network):
    """The docstring: registry solvers in an `algorithms` dict are treated like names. The GD
    construction runs GD with one fixed rate, so the fitted GD trajectory reproduces it (path R2 1,
    as `algorithms=["gd"]` gives); relabelled as "GD (fixed rate)" it must score the same."""
    model, task = gd_network
    named = run(model, task, algorithms=["gd"], bootstrap=0)["tasks"]
    assert named.scores["gd"].score > 0.999
    labelled = run(model, task, algorithms={"GD (fixed rate)": ALGORITHMS["gd"]}, bootstrap=0)["tasks"]
    assert labelled.scores["GD (fixed rate)"].score > 0.999


def diverging(K, y, lam, n_steps, K_query=None):
    return richardson(K, y, lam, 120, step=1e3, K_query=K_query)  # overflows to inf


def too_short(K, y, lam, n_steps, K_query=None):
    return cg(K, y, lam, max(n_steps - 3, 1), K_query=K_query)


def returns_none(K, y, lam, n_steps, K_query=None):
    return None


@pytest.mark.parametrize("solver", [diverging, too_short, returns_none], ids=["diverges", "wrong_steps", "returns_none"])
def test_a_faulty_custom_solver_is_named_in_the_error_or_left_out_with_a_note(gd_network, solver):
    model, task = gd_network
    label = f"mine:{solver.__name__}"
    try:
        diagnosis = run(model, task, algorithms={label: solver, "cg": ALGORITHMS["cg"]}, bootstrap=0, n_steps=6)
    except ValueError as error:
        assert label in str(error)
    else:
        assert label not in diagnosis["tasks"].scores and any(label in note for note in diagnosis["tasks"].notes)


def test_a_single_candidate_is_not_identified_against_no_rival(gd_network):
    """The GD construction is GD (path R2 1 for gd); offered heavy ball alone (path R2 0.98) the
    verdict must not claim heavy ball is identified: nothing was ruled out."""
    model, task = gd_network
    verdict = run(model, task, algorithms=["heavy_ball"], bootstrap=200)["tasks"].verdict
    assert not verdict.identified


def test_seed_docstring_matches_what_the_seed_changes(gd_network):
    """Either the point estimates do not depend on `seed`, or the docstring says it picks the halves."""
    model, task = gd_network
    scores = [run(model, task, algorithms=["heavy_ball"], bootstrap=0, seed=seed)["tasks"].scores["heavy_ball"].score for seed in (0, 1)]
    doc = inspect.getdoc(diagnose)
    seed_doc = re.search(r"^\s*seed:(.*?)^\s*\w+:", doc, re.S | re.M).group(1)
    assert scores[0] == scores[1] or re.search(r"half|halves|fold|cross", seed_doc)


def test_duplicate_reference_kernels_are_refused_or_recorded_once():
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=1))
    task = GPRegressionSampler(dim=2).sample(4, 5, 2, seed=0)
    try:
        diagnosis = diagnose(model, task, kernels=("exp", "exp"), algorithms="cg", n_steps=2, bootstrap=0, progress=False)
    except ValueError as error:
        assert "kernels" in str(error)
    else:
        assert diagnosis.settings["kernels"] == ["exp"]


# ---- the command line -------------------------------------------------------------------------


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.mark.parametrize("option, fragment", [("--lam=0", "lam must be a finite number > 0"), ("--bootstrap=-1", "bootstrap must be an integer >= 0"),
                                              ("--n-query=0", "n_query must be an integer >= 1")])
def test_diagnose_bad_numbers_are_one_line_errors(option, fragment, tmp_path, capsys):
    assert main(["diagnose", str(shipped_checkpoint("linear_lr")), option, "--batch", "2", "--no-shifts", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "r").exists()


def test_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["construct", "gd", "--steps", "1", "--dim", "2", "--n-support", "3", "--batch", "1", "--save", "--out", str(taken)]) == 2
    one_line_error(capsys, "--out")


def test_diagnose_prompts_too_long_for_the_model_say_so(tmp_path, capsys):
    """An interleaved-layout model with 16 positions (as Garg et al. runs have n_positions) cannot
    take the softmax_gp config's 24-support prompts: the error must say why (max_seq_len / fewer
    support points), not fail unpacking an empty dict."""
    from mi_krr.train.checkpoint import save_model

    config = json.loads((shipped_checkpoint("softmax_gp") / "config.json").read_text())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=1, layout="interleaved", max_seq_len=16))
    save_model(run_dir / "model.safetensors", model, config)
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["diagnose", str(run_dir), "--no-shifts", "--bootstrap", "0", "--batch", "2", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "max_seq_len")


@pytest.mark.parametrize("name, text", [("bad.yaml", "model: [unclosed\n  train: {\n"), ("bad.json", '{"model": {}, "sampler": {}')])
def test_train_malformed_config_is_one_line_naming_the_file(name, text, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path), "--until-step", "1", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, name)


@pytest.mark.parametrize("args, option", [(["gd", "--mlp", "relu"], "--mlp"), (["cg", "--step", "0.5"], "--step")])
def test_construct_refuses_an_option_the_construction_does_not_use(args, option, capsys):
    rc = main(["construct", *args, "--steps", "1", "--dim", "2", "--n-support", "3", "--batch", "1"])
    assert rc == 2
    one_line_error(capsys, option)


def test_train_into_a_used_run_folder_points_to_the_resume_flag(tmp_path, capsys):
    (tmp_path / "run" / "state").mkdir(parents=True)
    (tmp_path / "run" / "state" / "step_00000001.safetensors").write_bytes(b"")
    assert main(["train", "--preset", "linear_lr", "--until-step", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "already holds checkpoints", "--resume")


@pytest.mark.parametrize("flags, fix", [(["--steps", "2"], "--warmup-steps"),
                                        (["--steps", "2", "--warmup-steps", "1"], "--curriculum-steps")])
def test_train_a_short_preset_run_names_the_flag_that_fits_its_schedule(flags, fix, tmp_path, capsys):
    """The preset's 200-step warm-up and 500-step curriculum do not fit in --steps 2: the error names the flag to pass."""
    assert main(["train", "--preset", "linear_lr", *flags, "--no-progress", "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, fix, "N <= 2")
