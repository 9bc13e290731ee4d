"""Checks written from mutation-testing survivors of session 15's changes: the ReLU reciprocal
range check (threshold, readout constant, message), cg_transformer's kernel parameters and
params record, Richardson's derived-bound message, the construction's overflow warning and
shared step buffers, relu_width_study's figure, the scoring sensitivities' shape checks and
depth order, the probes' task check, input_mean strings, train's --resume folder rules and
run-folder default, the CLI's misplaced options and --seed check, reproduce / overview /
softmax-ood outputs and shipped_checkpoint's name check. References are closed forms, NumPy
interpolants and hand-built inputs."""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from mi_krr.construct import cg_transformer, gd_transformer
from mi_krr.construct.primitives import Reciprocal, ReluArithmetic, ReluRangeError, compile_mlp, const, coord
from mi_krr.construct.richardson import relu_arithmetic
from mi_krr.feature_maps import PositiveRandomFeatures
from mi_krr.tasks import ICLTask, LinearRegressionSampler
from probes.scoring import score_algorithms
from prompts import copied_steps_case
from run_configs import write_run_config

U, OFF, OUT = 0, 1, 2


def _tokens(u, off) -> torch.Tensor:
    """Residual `[1, pos, 3]`: coordinate 0 the reciprocal's input u, 1 its off flag, 2 the output."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.stack([u, torch.as_tensor(off, dtype=torch.float64), torch.zeros_like(u)], -1)[None]


# ----- construct/primitives.py ----------------------------------------------------------------
def test_relu_reciprocal_input_just_above_high_is_refused_and_just_below_is_the_numpy_interpolant():
    """high = 100: s = 150 (1.5x above, inside any slack of 2x) raises naming the value, the factor
    s / high = 1.5 and the fix recip_range=(low, >= 150); s = 99 computes NumPy's interpolant of 1/s
    on geomspace(0.01, 100, 8)."""
    mlp = compile_mlp([Reciprocal(OUT, coord(U), off=coord(OFF))], 3, "relu", ReluArithmetic(width=8, low=0.01, high=100.0))
    knots = np.geomspace(0.01, 100.0, 8)
    got = mlp(_tokens([2.0, 99.0], [0.0, 0.0]))[0, :, OUT].numpy()
    np.testing.assert_allclose(got, np.interp([2.0, 99.0], knots, 1 / knots), rtol=1e-10)
    with pytest.raises(ReluRangeError, match=r"reached 150, beyond recip_range's high end 100 .*1\.5x too large.*"
                                             r"recip_range=\(0\.01, >= 150\)"):
        mlp(_tokens([2.0, 150.0], [0.0, 0.0]))


def test_relu_reciprocal_check_adds_the_readouts_constant_term():
    """Reciprocal of u = h0 + 60 with high 100: at h0 = 50 the input is 110 > 100 and the forward
    raises (naming 110); at h0 = 30 (input 90) it returns NumPy's interpolant at 90."""
    mlp = compile_mlp([Reciprocal(OUT, coord(U) + const(60.0), off=coord(OFF))], 3, "relu", ReluArithmetic(width=8, low=0.01, high=100.0))
    knots = np.geomspace(0.01, 100.0, 8)
    np.testing.assert_allclose(mlp(_tokens([30.0], [0.0]))[0, 0, OUT].item(), np.interp(90.0, knots, 1 / knots), rtol=1e-10)
    with pytest.raises(ReluRangeError, match=r"reached 110, beyond recip_range's high end 100"):
        mlp(_tokens([50.0], [0.0]))


def test_relu_reciprocal_off_tokens_are_not_range_checked():
    """Reciprocal(off=o) is exactly 0 where o = 1 (module docstring): with recip_range (0.01, 0.5)
    an off token (u = 0, o = 1) yields 0 and an on token at u = 0.25 NumPy's interpolant, without a
    range error (no input the interpolant is read at lies above 0.5)."""
    mlp = compile_mlp([Reciprocal(OUT, coord(U), off=coord(OFF))], 3, "relu", ReluArithmetic(width=8, low=0.01, high=0.5))
    got = mlp(_tokens([0.25, 0.0], [0.0, 1.0]))[0, :, OUT].numpy()
    knots = np.geomspace(0.01, 0.5, 8)
    np.testing.assert_allclose(got, [np.interp(0.25, knots, 1 / knots), 0.0], rtol=1e-10, atol=1e-12)


# ----- construct/cg.py ------------------------------------------------------------------------
def test_cg_params_record_the_kernel_parameter_it_reads_and_the_seed_only_for_random_features():
    """Hand-written expected params: exact linear features record no seed; random linear
    features (head_width) do; exp records temperature 1.0 when none is given; gaussian in relu
    mode records its bandwidth, mlp_width and the recip_range as floats."""
    assert cg_transformer(2, 0.1, dim=2).params == {"lam": 0.1, "kernel": "linear", "head_width": 2, "mlp": "exact"}
    assert cg_transformer(2, 0.1, dim=2, head_width=4, seed=3).params == {
        "lam": 0.1, "kernel": "linear", "seed": 3, "head_width": 4, "mlp": "exact"}
    assert cg_transformer(2, 0.1, kernel="exp", dim=2, head_width=4).params == {
        "lam": 0.1, "kernel": "exp", "temperature": 1.0, "seed": 0, "head_width": 4, "mlp": "exact"}
    params = cg_transformer(2, 0.1, kernel="gaussian", dim=2, head_width=4, bandwidth=0.5, mlp="relu", mlp_width=16,
                            recip_range=(1, 1000)).params
    assert params == {"lam": 0.1, "kernel": "gaussian", "bandwidth": 0.5, "seed": 0, "head_width": 4, "mlp_width": 16,
                      "recip_range": (1.0, 1000.0), "mlp": "relu"}


@pytest.mark.parametrize("kernel, given, name", [("exp", {"bandwidth": 0.5}, "bandwidth"), ("gaussian", {"temperature": 2.0}, "temperature"),
                                                 ("linear", {"temperature": 2.0}, "temperature")])
def test_cg_refuses_the_other_kernels_parameter(kernel, given, name):
    """exp reads temperature only, gaussian bandwidth only, linear neither: the other is refused
    naming it (not silently ignored)."""
    with pytest.raises(ValueError, match=rf"{name} is the .* kernel's parameter; kernel '{kernel}' does not read it"):
        cg_transformer(2, 0.1, kernel=kernel, dim=2, head_width=4, **given)


@pytest.mark.parametrize("given", [{"temperature": 1.0}, {"bandwidth": 1.0}, {"temperature": 2.0}])
def test_cg_refuses_kernel_parameters_next_to_an_explicit_feature_map(given):
    """An explicit feature_map carries its own parameters: even the default value 1.0 passed
    beside it is refused."""
    with pytest.raises(ValueError, match="temperature / bandwidth are the feature_map's own"):
        cg_transformer(2, 0.1, dim=2, feature_map=PositiveRandomFeatures(2, 4, kind="exp"), **given)


# ----- construct/richardson.py ----------------------------------------------------------------
def test_relu_arithmetic_derived_bound_message_spells_out_its_formula():
    """width 4 on (0.2, 2): knot ratio r = 10^(1/3), overshoot c = (r + 1)^2 / (4 r), default bound
    2 + (1 + 3) c ~ 6.62 > 1 / 0.2, so it is refused with the formula written out."""
    r = 10 ** (1 / 3)
    c = (r + 1) ** 2 / (4 * r)
    bound = 2 + 4 * c
    assert 0.2 * bound > 1
    with pytest.raises(ValueError, match=rf"the default mlp_bound {bound:.4g} = 2 \+ \(1 \+ max_support=3\) x {c:.4g} \(the "
                                         r"reciprocal's overshoot at mlp_width=4\) is too large: raise mlp_width"):
        relu_arithmetic(4, None, 3, (0.2, 2.0))


# ----- construct/transformer.py ---------------------------------------------------------------
def test_a_read_out_overflowing_on_one_prompt_only_still_warns():
    """GD with lr = 50, lam = 0: prompt 0 (x ~ 0.01 N(0, 1), eigenvalues ~1e-3) is stable, prompt 1
    (x ~ N(0, 1), lr * s_max >> 2) diverges to inf/NaN; one non-finite prompt is enough to warn,
    and prompt 0's prediction stays finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    x[0] *= 0.01
    task = ICLTask(x_support=x, y_support=x.sum(-1), x_query=x[:, :2], y_query=x[:, :2].sum(-1))
    s_max = [float(np.linalg.eigvalsh(x[b].numpy() @ x[b].numpy().T).max()) for b in range(2)]
    assert 50 * s_max[0] < 2 < 50 * s_max[1]
    with pytest.warns(RuntimeWarning, match="the read-out holds inf/NaN"):
        prediction = gd_transformer(200, lr=50.0, dim=2).predict(task)
    assert torch.isfinite(prediction[0]).all() and not torch.isfinite(prediction[1]).all()


def test_later_relu_steps_share_the_first_steps_buffers():
    """relu mode: the range-check buffers (W_product, W_reciprocal, ...) of step t's blocks are the
    very tensors of step 1's (one step's memory whatever n_steps), and they stay out of the state
    dict (a saved model holds the ReLU network's weights only)."""
    model = cg_transformer(3, 0.1, dim=2, mlp="relu", mlp_width=16)
    per_step = model.layers_per_step
    shared = 0
    for t in (1, 2):
        for b in range(per_step):
            for name, tensor in model.blocks[b].named_buffers():
                assert model.blocks[t * per_step + b].get_buffer(name) is tensor, name
                shared += 1
    assert shared > 0
    names = {name.rsplit(".", 1)[-1] for name in model.state_dict()}
    assert names.isdisjoint({"W_product", "b_product", "W_reciprocal", "b_reciprocal"}), sorted(names)
    assert {"W_in", "b_in", "W_out", "b_out"} <= names


# ----- probes/scoring.py ----------------------------------------------------------------------
def test_repeated_layer_indices_are_in_depth_order():
    """layers [1, 2, 2] (non-decreasing) are accepted: rows copying steps 1, 3, 4 still align to
    [1, 3, 4] with path R2 exactly 1; only a decrease is refused."""
    step, _, layer, _, krr = copied_steps_case()
    score = score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 2], bootstrap=0)["a"]
    assert score.aligned_steps.tolist() == [1, 3, 4] and score.score == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="depth order"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 1], bootstrap=0)


def test_an_empty_step_sensitivities_dict_counts_as_none():
    """{} with no layer_sensitivity is the same as neither (score 1, no sensitivity score); {} with
    a layer_sensitivity is refused: the two go together."""
    step, _, layer, layer_sens, krr = copied_steps_case()
    score = score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, step_sensitivities={})["a"]
    assert score.score == pytest.approx(1.0, abs=1e-12) and score.sensitivity_score is None
    with pytest.raises(ValueError, match="layer_sensitivity and step_sensitivities go together"):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens, step_sensitivities={})


@pytest.mark.parametrize("layer_slice, step_slice, message", [
    ((slice(None), slice(None), slice(0, 1)), None,
     r"layer_sensitivity \(6, 3, 1, 3\) must be \[B, L', m, n\] for the rows of layer_pred \(6, 3, 2\)"),
    ((slice(None), slice(0, 2)), None, r"layer_sensitivity \(6, 2, 2, 3\) must be \[B, L', m, n\]"),
    (None, (Ellipsis, slice(0, 2)), r"step_sensitivities\['a'\] \(6, 5, 2, 2\) must be .* with layer_sensitivity's n=3"),
    ((Ellipsis, slice(0, 2)), None, r"step_sensitivities\['a'\] \(6, 5, 2, 3\) must be .* with layer_sensitivity's n=2"),
    (None, (slice(None), slice(None), slice(0, 1)), r"step_sensitivities\['a'\] \(6, 5, 1, 3\) must be"),
    ((slice(None), slice(None), 0, 0), None, r"layer_sensitivity must have at least 3 dimensions \[batch, index, \.\.\.\], got shape \(6, 3\)"),
])
def test_sensitivity_shapes_are_checked_against_the_predictions_and_each_other(layer_slice, step_slice, message):
    """A layer sensitivity for other queries or layers than layer_pred, or a step sensitivity with
    another label count n than the layer's, is one ValueError with both shapes."""
    step, sens, layer, layer_sens, krr = copied_steps_case()
    layer_sens = layer_sens if layer_slice is None else layer_sens[layer_slice]
    sens = sens if step_slice is None else sens[step_slice]
    with pytest.raises(ValueError, match=message):
        score_algorithms(layer, {"a": step}, krr, layers=[1, 2, 3], bootstrap=0, layer_sensitivity=layer_sens, step_sensitivities={"a": sens})


# ----- probes/fitted_probes.py, tasks ---------------------------------------------------------
def test_probes_given_something_other_than_a_task_name_the_argument():
    """predict(model, x_support tensor) instead of a task: one ValueError naming task."""
    from mi_krr.models import ICLTransformer, ICLTransformerConfig
    from probes import fit_layer_probes

    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=1, max_seq_len=16, dtype="float64")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 2, generator=g, dtype=torch.float64)
    task = ICLTask(x_support=x, y_support=x.sum(-1), x_query=x[:, :2] + 1, y_query=x[:, :2].sum(-1))
    fitted = fit_layer_probes(model, task, layers=[1])
    with pytest.raises(ValueError, match="task must be an mi_krr.tasks.ICLTask, got Tensor"):
        fitted.predict(model, x)


@pytest.mark.parametrize("text, value", [("1e-1", 0.1), ("2", 2.0), ("-0.5", -0.5)])
def test_input_mean_given_as_a_yaml_string_is_the_number(text, value):
    """PyYAML reads 1e-1 as the string '1e-1': input_mean '1e-1' is the float 0.1 on every
    coordinate (dim 3), not a refused sequence of characters."""
    sampler = LinearRegressionSampler(3, input_mean=text)
    assert sampler.input_mean == value
    assert sampler.input_mean_vector().tolist() == [value] * 3


def test_input_mean_string_inf_is_refused_as_not_finite():
    with pytest.raises(ValueError, match="input_mean"):
        LinearRegressionSampler(3, input_mean="inf")


# ----- train/cli.py -------------------------------------------------------------------------
def _train_args(*argv: str, out: str | None = None) -> argparse.Namespace:
    from mi_krr.train.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    args.out, args.seed, args.device = out, None, None
    return args


def _run_config(folder, out_dir) -> None:
    """A run folder's config.json whose train.out_dir is `out_dir` (e.g. a moved run)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = {"steps": 2, "warmup_steps": 0, "curriculum_steps": 0, "batch_size": 2, "n_support": 4, "n_query": 2, "eval_every": 1,
             "eval_prompts": 4, "out_dir": out_dir}
    description = {"model": {"model_type": "ICLTransformer", "n_dims": 2, "d_model": 8, "n_layers": 1, "n_heads": 1, "max_seq_len": 16},
                   "sampler": LinearRegressionSampler(2).to_config(), "train": train}
    (folder / "config.json").write_text(json.dumps(description))


def test_resume_with_a_moved_run_folder_continues_in_that_folder(tmp_path):
    """--resume --config MOVED (no --out), MOVED's config.json still naming its old folder: the
    run continues in MOVED, where its states are, not in the old out_dir."""
    from mi_krr.train.cli import run_description

    moved = tmp_path / "moved"
    _run_config(moved, str(tmp_path / "original"))
    assert run_description(_train_args("--resume", "--config", str(moved)))["train"]["out_dir"] == str(moved)


def test_resume_with_config_and_out_reads_the_config_and_continues_in_out(tmp_path):
    """--resume --config RUN --out ELSEWHERE: the settings come from RUN's config.json (ELSEWHERE
    holds none) and the run continues in ELSEWHERE."""
    from mi_krr.train.cli import run_description

    run = tmp_path / "run"
    _run_config(run, str(run))
    elsewhere = str(tmp_path / "elsewhere")
    train = run_description(_train_args("--resume", "--config", str(run), out=elsewhere))["train"]
    assert train["out_dir"] == elsewhere and train["steps"] == 2


def test_resume_with_a_config_file_keeps_its_out_dir_and_bare_resume_reads_runs_train(tmp_path, monkeypatch):
    """--resume --config FILE (a file, not a run folder): the file's own train.out_dir; a bare
    --resume reads runs/train/config.json under the working directory and continues there."""
    from mi_krr.train.cli import run_description

    folder = tmp_path / "cfg"
    _run_config(folder, "somewhere/else")
    assert run_description(_train_args("--resume", "--config", str(folder / "config.json")))["train"]["out_dir"] == "somewhere/else"
    monkeypatch.chdir(tmp_path)
    _run_config(tmp_path / "runs" / "train", "old")
    assert run_description(_train_args("--resume"))["train"]["out_dir"] == "runs/train"


TINY_RUN = {
    "model": {"model_type": "ICLTransformer", "n_dims": 2, "d_model": 8, "n_layers": 1, "n_heads": 1, "max_seq_len": 16},
    "sampler": {"sampler": "linear_regression", "dim": 2, "noise_std": 0.1},
    "train": {"steps": 3, "warmup_steps": 0, "curriculum_steps": 0, "batch_size": 2, "n_support": 4, "n_query": 2,
              "eval_every": 1, "checkpoint_every": 1, "eval_prompts": 4},
}


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_train_divergence_line_names_the_lr_and_the_gradient_clip(tmp_path, capsys):
    """lr 1e9 with grad_clip 0.5: the loss becomes NaN/inf and the one line says so, with the
    lr to lower and that gradients are already clipped at 0.5; without grad_clip no clip clause."""
    from mi_krr.cli import main

    assert main(["train", "--config", write_run_config(tmp_path, TINY_RUN, lr=1e9, grad_clip=0.5), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert re.search(r"training loss became (nan|inf) at step \d+: lower --lr \(now 1e\+09\); gradients are already clipped at 0\.5", line), line
    assert main(["train", "--config", write_run_config(tmp_path, TINY_RUN, lr=1e9, grad_clip=None), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert re.search(r"at step \d+: lower --lr \(now 1e\+09\)", line) and "clipped" not in line, line


def test_resume_with_an_until_step_before_the_saved_step_names_both(tmp_path, capsys):
    """A run stopped at --until-step 2 of 3, resumed with --until-step 1: one line saying 1 is
    before the saved step 2."""
    from mi_krr.cli import main

    run = tmp_path / "run"
    with contextlib_redirect():
        assert main(["train", "--config", write_run_config(tmp_path, TINY_RUN), "--until-step", "2", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--until-step", "1", "--no-progress"]) == 2
    assert "--until-step 1 is before the run's saved step 2" in _one_error_line(capsys)
    from mi_krr.train import StopBeforeCheckpointError, build_run, train
    from mi_krr.train.runs import read_run_config

    resumed = build_run(read_run_config(run))
    with pytest.raises(StopBeforeCheckpointError, match=r"until_step=1 is before the checkpoint's step 2") as caught:
        train(resumed.model, resumed.sampler, resumed.cfg, resume=True, progress=False, until_step=1)
    assert (caught.value.until_step, caught.value.checkpoint_step) == (1, 2)


def test_resume_of_a_folder_without_states_names_that_folder(tmp_path, capsys):
    """A run folder holding only config.json: the one line names that folder and --resume; the
    API's NothingToResumeError (a FileNotFoundError) carries it as out_dir."""
    from mi_krr.cli import main
    from mi_krr.train import NothingToResumeError, build_run, train

    run = tmp_path / "copied"
    _run_config(run, str(run))
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2
    assert f"--resume, but {run} holds no training states" in _one_error_line(capsys)
    built = build_run(json.loads((run / "config.json").read_text()))
    with pytest.raises(NothingToResumeError) as caught:
        train(built.model, built.sampler, built.cfg, resume=True, progress=False)
    assert isinstance(caught.value, FileNotFoundError) and str(caught.value.out_dir) == str(run)


def contextlib_redirect():
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())



# ----- construct/studies.py -------------------------------------------------------------------
def test_relu_width_study_records_an_overflowing_width_as_inf_without_the_warning(monkeypatch):
    """A relu construction whose forward overflows to NaN without a range error (stubbed here: the
    width-32 CG model's MLP output bias set to NaN) is a failed width: error inf, not NaN, and the
    forward's read-out warning is silenced inside the study; width 64 and Richardson stay finite."""
    from mi_krr.construct import studies

    real = studies.cg_transformer

    def overflowing_at_32(*args, **kwargs):
        model = real(*args, **kwargs)
        if kwargs.get("mlp") == "relu" and kwargs.get("mlp_width") == 32:
            with torch.no_grad():
                model.blocks[0].mlp.b_out.fill_(math.nan)
        return model

    monkeypatch.setattr(studies, "cg_transformer", overflowing_at_32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study = studies.relu_width_study(widths=(32, 64), n_steps=2, n_support=8, batch_size=2)
    assert study.error["cg"][0] == math.inf and 0 < study.error["cg"][1] < math.inf
    assert all(0 < e < math.inf for e in study.error["richardson"])


# ----- train/config.py, train/loop.py -----------------------------------------------------------
def test_curriculum_may_start_at_the_full_support_length():
    """n_support_start == n_support with a curriculum is allowed (the limit is <=); one more is refused."""
    from mi_krr.train import TrainConfig

    assert TrainConfig(steps=10, warmup_steps=0, n_support=8, n_support_start=8, curriculum_steps=5).n_support_start == 8
    with pytest.raises(ValueError, match="n_support_start must be <= n_support=8, got 9"):
        TrainConfig(steps=10, warmup_steps=0, n_support=8, n_support_start=9, curriculum_steps=5)


def test_training_divergence_error_names_the_existing_gradient_clip():
    """The Python API's TrainingDivergedError (a FloatingPointError) carries the step and value, and
    with grad_clip 0.5 says gradients are already clipped at 0.5 instead of 'set grad_clip'."""
    from mi_krr.train import TrainingDivergedError, build_run, train

    description = json.loads(json.dumps(TINY_RUN))
    description["train"].update(lr=1e9, grad_clip=0.5)
    run = build_run(description)
    with pytest.raises(TrainingDivergedError, match=r"lower lr \(gradients are already clipped at grad_clip=0\.5\)") as caught:
        train(run.model, run.sampler, run.cfg, progress=False)
    assert isinstance(caught.value, FloatingPointError) and not math.isfinite(caught.value.value)
    assert 0 <= caught.value.step < 3


# ----- cli.py ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_before_the_command_is_the_top_level_help_not_a_misplaced_option(flag, capsys):
    """`mi-krr -h train` is asking for help: argparse prints the top-level usage and exits 0 (the
    'options go after the command' error is for other options written first)."""
    from mi_krr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([flag, "train"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: mi-krr") and "options go after the command" not in captured.err


def test_a_single_dash_option_before_the_command_is_shown_moved_after_it(capsys):
    """`mi-krr -x construct cg`: an option (single dash too) written before the command gives the
    one-line error with the command line reordered, exit 2."""
    from mi_krr.cli import main

    assert main(["-x", "construct", "cg"]) == 2
    assert _one_error_line(capsys) == "mi-krr: error: options go after the command: mi-krr construct -x cg"


def test_relu_arithmetic_explicit_bound_message_asks_to_widen_the_range_or_lower_the_bound():
    """mlp_bound 10 given with recip_range (0.2, 2): 1 / 10 < 0.2, refused with the fix for a
    given bound (not the derived bound's 'raise mlp_width')."""
    with pytest.raises(ValueError, match=r"recip_range=\(0\.2, 2\.0\) must contain \[1 / mlp_bound, 1\] = \[0\.1, 1\] .*: widen "
                                         r"recip_range or lower mlp_bound$"):
        relu_arithmetic(16, 10.0, 3, (0.2, 2.0))


def test_relu_width_figure_with_every_width_failed_draws_the_guide_from_one():
    """Every width failed (all inf): no finite anchor, so the width^-2 guide starts at 1 at the first
    width (1, 1/4 at twice the width) and the curve's label lists both failed widths."""
    from mi_krr.construct.studies import ReluWidthStudy

    figure = ReluWidthStudy([16, 32], {"cg": [math.inf, math.inf]}, 10, 32).plot()
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert "cg transformer (failed at width 16, 32)" in lines
    guide = lines["$\\propto$ width$^{-2}$"]
    np.testing.assert_allclose(guide.get_xdata(), [16, 32])
    np.testing.assert_allclose(guide.get_ydata(), [1.0, 0.25], rtol=1e-12)


# ----- commands/overview.py -------------------------------------------------------------------
def test_overview_sensitivity_line_names_the_task_set_and_scores_gd_exactly(tmp_path):
    """The GD construction diagnosed with sensitivities on a task set named 'in_distribution', entry
    named 'model-a': the index line is labelled with the task set (not the entry) and gives gd 1.000
    (its label sensitivities are GD's at the fitted lr, both linear in y with the same matrix)."""
    import matplotlib.pyplot as plt

    import probes
    from mi_krr.commands.overview import ModelEntry, write_overview_report

    task = LinearRegressionSampler(dim=2, noise_std=0.1).sample(8, 6, 2, seed=0)
    K = task.x_support.double() @ task.x_support.double().mT
    lr = float(1.0 / (torch.linalg.eigvalsh(K)[:, -1].max() + 0.1))
    diagnosis = probes.diagnose(gd_transformer(n_steps=2, lr=lr, lam=0.1, dim=2), {"in_distribution": task}, lam=0.1, n_steps=3,
                                kernels=(), sensitivities=True, bootstrap=0, algorithms=("gd",), progress=False)
    index = write_overview_report([ModelEntry("model-a", "GD", diagnosis)], tmp_path, title="t", settings={})
    plt.close("all")
    line = next(line for line in index.read_text().splitlines() if line.startswith("Label sensitivities"))
    assert line.startswith("Label sensitivities d yhat / d y_i (in_distribution): path R2") and line.endswith("alignment: gd 1.000"), line


def test_prompt_fingerprints_round_to_the_given_dtype():
    """Two prompts whose support inputs differ by 1e-12 (below float32's resolution, above
    float64's): different fingerprints at the default float64, the same at float32; each equals
    blake2b (16 bytes) of the inputs rounded to that dtype, as float64 bytes."""
    import hashlib

    from probes.fitted_probes import prompt_fingerprints

    x = torch.tensor([[[0.5, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    near = x + 1e-12
    task, other = (ICLTask(x_support=v, y_support=v.sum(-1), x_query=v[:, :1], y_query=v[:, :1].sum(-1)) for v in (x, near))

    def reference(values: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()

    assert prompt_fingerprints(task) == [reference(x[0].numpy())]
    assert prompt_fingerprints(task) != prompt_fingerprints(other)
    rounded = reference(x[0].numpy().astype(np.float32).astype(np.float64))
    assert prompt_fingerprints(task, torch.float32) == prompt_fingerprints(other, torch.float32) == [rounded]


# ----- commands/reproduce.py ------------------------------------------------------------------
def test_reproduce_all_with_a_checkpoint_hands_it_to_the_reproductions_that_read_one(tmp_path, monkeypatch):
    """`reproduce all --checkpoint C`: two of the four read a checkpoint, so C is not refused; the
    reproductions (recorders here) run and receive checkpoint=C; `reproduce width --checkpoint C`
    is refused (width reads none)."""
    from mi_krr.cli import main
    from reproduction_recorder import record_reproduction_calls

    seen = record_reproduction_calls(monkeypatch)
    with contextlib_redirect():
        assert main(["reproduce", "all", "--checkpoint", "my_ckpt", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    assert seen["checkpoint"] == "my_ckpt"
    assert sorted(path.name for path in (tmp_path / "all").iterdir()) == ["cg-rate", "richardson-profile", "softmax-ood", "width"]
    assert main(["reproduce", "width", "--checkpoint", "my_ckpt", "--out", str(tmp_path / "w"), "--no-progress"]) == 2
