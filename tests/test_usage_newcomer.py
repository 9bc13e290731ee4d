"""Usage review: the `mi-krr` command line as a newcomer meets it after reading README.md
(`diagnose` on the shipped checkpoints and from inside a run folder, `train` with a tiny YAML
config, `--resume`, `reproduce --quick` on a freshly trained model, `construct`, options typed in
the wrong place or out of range). Numbers are checked against independent references: NumPy CG,
NumPy eigenvalues and NumPy ridge regression on the prompts drawn here.

The review's findings, each fixed, are tests of the corrected behaviour."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.cli import main
from mi_krr.tasks import sampler_from_config
from mi_krr.train import load_model, read_run_config
from construct_references import numpy_cg_predictions
from reproduction_recorder import record_reproduction_calls
from run_configs import write_run_config

# A model and task small enough that `mi-krr train` takes well under a second.
TINY_CONFIG = {
    "model": {"model_type": "ICLTransformer", "n_dims": 2, "d_model": 16, "n_layers": 2, "n_heads": 2, "attention": "softmax"},
    "sampler": {"sampler": "linear_regression", "dim": 2, "noise_std": 0.1},
    "train": {"steps": 2, "warmup_steps": 0, "curriculum_steps": 0, "batch_size": 4, "n_support": 6, "n_query": 3,
              "eval_every": 1, "checkpoint_every": 1, "eval_prompts": 16},
}


def run_main(*args: str) -> tuple[int, str]:
    """`main(args)` with its stdout captured."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(list(args))
    return code, buffer.getvalue()


def one_error_line(capsys) -> str:
    """The single stderr line a user error must be (asserted), returned."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- diagnose: the arrays it writes, against NumPy ----------------------------------------------


@pytest.fixture(scope="module")
def linear_lr_report(tmp_path_factory):
    """`mi-krr diagnose checkpoints/linear_lr --no-shifts` on 4 prompts (seed 2), report folder."""
    out = tmp_path_factory.mktemp("diagnose")
    code, _ = run_main("diagnose", str(shipped_checkpoint("linear_lr")), "--no-shifts", "--batch", "4", "--bootstrap", "0",
                       "--no-sensitivities", "--no-progress", "--seed", "2", "--out", str(out))
    assert code == 0
    return out


def test_diagnose_npz_holds_numpy_cg_steps_condition_numbers_and_the_models_output(linear_lr_report):
    """linear_lr.npz, on the seed-2 prompts drawn here: CG's step predictions equal textbook NumPy
    CG on (X X^T + 0.64 I) (lam = noise variance 0.16 x d = 4, the documented default) for every
    step up to n = 16; kappa equals NumPy's eigenvalue ratio; the lens's last layer is the model's
    own prediction."""
    arrays = np.load(linear_lr_report / "linear_lr.npz")
    run = shipped_checkpoint("linear_lr")
    task = sampler_from_config(read_run_config(run)["sampler"]).sample(4, 16, 8, seed=2, dtype=torch.float32)
    X, Xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    lam = 0.4**2 * 4
    steps = arrays["in_distribution/steps/cg"]
    assert steps.shape == (4, 21, 8)
    for b in range(4):
        K, Kq = X[b] @ X[b].T, Xq[b] @ X[b].T
        np.testing.assert_allclose(steps[b, :17], numpy_cg_predictions(K, y[b], lam, Kq, 16), rtol=1e-9, atol=1e-11)
        eigenvalues = np.linalg.eigvalsh(K + lam * np.eye(16))
        np.testing.assert_allclose(arrays["in_distribution/kappa"][b], eigenvalues[-1] / eigenvalues[0], rtol=1e-9)
    with torch.no_grad():
        own = load_model(run).predict(task).double().numpy()
    np.testing.assert_allclose(arrays["in_distribution/layer_predictions"][:, -1], own, rtol=1e-6, atol=1e-7)


def test_diagnose_from_inside_a_run_folder_names_the_model_after_the_folder(tmp_path, monkeypatch):
    """`cd checkpoints/linear_lr && mi-krr diagnose .`: the report must name the model linear_lr
    (`<model>.npz`, a report.json entry), as `mi-krr diagnose checkpoints/linear_lr` does."""
    monkeypatch.chdir(shipped_checkpoint("linear_lr"))
    code, _ = run_main("diagnose", ".", "--no-shifts", "--batch", "2", "--bootstrap", "0", "--no-sensitivities", "--no-progress",
                       "--out", str(tmp_path))
    assert code == 0
    assert list(json.loads((tmp_path / "report.json").read_text())["models"]) == ["linear_lr"]
    assert (tmp_path / "linear_lr.npz").is_file()


# ---- train: the printed metrics, the run folder, the errors -------------------------------------


def test_train_cli_prints_numpy_ridge_as_the_optimal_mse_and_the_saved_models_own_mse(tmp_path):
    """`mi-krr train --config tiny.yaml`: the JSON line's optimal_mse is NumPy ridge regression
    (lam = noise variance x d, the Bayes posterior mean for w ~ N(0, I/d)) on the held-out prompts,
    zero_mse the mean square label, and model_mse the saved model's own error on them."""
    from mi_krr.train import build_run
    from mi_krr.train.evaluation import held_out_task

    run_dir = tmp_path / "run"
    code, printed = run_main("train", "--config", write_run_config(tmp_path, TINY_CONFIG), "--out", str(run_dir), "--no-progress")
    assert code == 0
    metrics = json.loads(printed.strip().splitlines()[-1])
    run = build_run(read_run_config(run_dir))
    task = held_out_task(run.sampler, run.cfg)
    X, Xq, y, yq = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support, task.y_query))
    lam = 0.1**2 * 2
    w = np.linalg.solve(np.einsum("bnd,bne->bde", X, X) + lam * np.eye(2), np.einsum("bnd,bn->bd", X, y)[..., None])[..., 0]
    optimal = np.einsum("bmd,bd->bm", Xq, w)
    assert metrics["step"] == 2
    assert metrics["optimal_mse"] == pytest.approx(((optimal - yq) ** 2).mean(), rel=1e-10)
    assert metrics["zero_mse"] == pytest.approx((yq**2).mean(), rel=1e-12)
    with torch.no_grad():
        own = load_model(run_dir).predict(task).double().numpy()
    assert metrics["model_mse"] == pytest.approx(((own - yq) ** 2).mean(), rel=1e-6)


def test_train_with_a_config_and_no_out_writes_the_run_to_the_configs_out_dir(tmp_path, monkeypatch):
    """--help: --config is a file 'with model, sampler and train sections'; run_description's
    error says 'pass --out DIR (or set train.out_dir in the config)'. With train.out_dir set and no
    --out, the run must land there, not in ./runs/train."""
    target = tmp_path / "from_config"
    config = write_run_config(tmp_path, TINY_CONFIG, out_dir=str(target))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, _ = run_main("train", "--config", config, "--no-progress")
    assert code == 0
    assert (target / "model.safetensors").is_file()


def test_train_resume_with_config_continues_that_run(tmp_path, monkeypatch):
    """The train docstring: '--resume: the config.json of the run in --out (or --config)'. A run
    stopped at --until-step 1 of 2, resumed with --config RUN and no --out, must finish in RUN."""
    run_dir = tmp_path / "run"
    assert run_main("train", "--config", write_run_config(tmp_path, TINY_CONFIG), "--until-step", "1", "--out", str(run_dir), "--no-progress")[0] == 0
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, printed = run_main("train", "--resume", "--config", str(run_dir), "--no-progress")
    assert code == 0 and json.loads(printed.strip().splitlines()[-1])["step"] == 2
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_nonpositive_steps_names_steps_not_the_warmup(steps, tmp_path, capsys):
    """--steps 0 or -3 can never be fixed by a shorter warm-up: the one line must name --steps."""
    assert main(["train", "--preset", "linear_lr", "--steps", steps, "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "steps must be" in line and "warmup" not in line


def test_train_divergence_is_one_line_naming_lr(tmp_path, capsys):
    """--lr 1e9: the loss becomes NaN at step 1. A user error (the learning rate) must exit 2 with
    one line naming --lr, not a traceback (the config already clips gradients at 1.0)."""
    code = main(["train", "--config", write_run_config(tmp_path, TINY_CONFIG, lr=1e9), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "--lr" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["diagnose", "train"])
def test_out_of_range_seed_is_one_line_naming_seed(command, tmp_path, capsys):
    """`reproduce` and `construct` answer --seed 2**64 with 'seed must be an integer in [0, 2**32)';
    diagnose and train must too."""
    args = {"diagnose": ["diagnose", str(shipped_checkpoint("linear_lr")), "--no-shifts", "--batch", "2", "--no-progress"],
            "train": ["train", "--config", write_run_config(tmp_path, TINY_CONFIG), "--no-progress"]}[command]
    assert main([*args, "--seed", str(2**64), "--out", str(tmp_path / "out")]) == 2
    assert "seed must be" in one_error_line(capsys)


def test_train_resume_without_states_names_the_command_line_flag(tmp_path, capsys):
    """A run folder holding only config.json (e.g. a copy of a shipped run): the one line must
    speak the command line's language (--resume), not the Python API's (resume=True)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(shipped_checkpoint("linear_lr") / "config.json", run_dir / "config.json")
    assert main(["train", "--resume", "--out", str(run_dir), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "--resume" in line and "resume=" not in line


def test_train_preset_with_curriculum_off_accepts_a_shorter_n_support(tmp_path, capsys):
    """README: --curriculum-steps 0 switches the curriculum off (the CLI's way to shorten a run).
    softmax_gp with --n-support 4 then has no use for its start length 8: it trains."""
    code = main(["train", "--preset", "softmax_gp", "--steps", "1", "--warmup-steps", "0", "--curriculum-steps", "0",
                 "--n-support", "4", "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0 and (tmp_path / "run" / "model.safetensors").is_file()


# ---- reproduce ----------------------------------------------------------------------------------


def test_reproduce_json_is_strict_on_a_freshly_trained_model(tmp_path):
    """A newcomer trains a softmax model for 2 steps and runs `reproduce softmax-ood --quick` on
    it: uniform heads have tau = inf and row Spearman NaN. Like report.json and
    Diagnosis.to_json, the file must parse with NaN / Infinity refused (RFC 8259)."""
    config = json.loads(json.dumps(TINY_CONFIG))
    config["sampler"] = {"sampler": "gp_regression", "dim": 2, "kernel": "gaussian", "bandwidth": 0.5, "noise_std": 0.2}
    path = tmp_path / "gp.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir, out = tmp_path / "run", tmp_path / "ood"
    assert run_main("train", "--config", str(path), "--out", str(run_dir), "--no-progress")[0] == 0
    assert run_main("reproduce", "softmax-ood", "--quick", "--checkpoint", str(run_dir), "--no-progress", "--out", str(out))[0] == 0

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    json.loads((out / "softmax-ood.json").read_text(), parse_constant=refuse)


@pytest.mark.parametrize("name", ["cg-rate", "width"])
def test_reproduce_refuses_checkpoint_for_a_reproduction_that_reads_none(name, tmp_path, monkeypatch, capsys):
    """`construct` refuses options its construction does not read; --checkpoint is read only by
    softmax-ood and richardson-profile, so `reproduce cg-rate --checkpoint X` must exit 2 with one
    line naming --checkpoint, before running anything."""
    seen = record_reproduction_calls(monkeypatch)
    code = main(["reproduce", name, "--checkpoint", str(tmp_path / "nowhere"), "--no-progress", "--out", str(tmp_path)])
    assert code == 2 and not seen
    assert "--checkpoint" in one_error_line(capsys)


# ---- construct and option placement ------------------------------------------------------------


def test_construct_missing_head_width_names_the_command_line_option(capsys):
    """`mi-krr construct cg --kernel exp`: the fix must be spelled as the command line takes it
    (the reviewed snapshot said only 'pass e.g. head_width=256', a spelling argparse refuses)."""
    assert main(["construct", "cg", "--kernel", "exp"]) == 2
    assert "--head-width" in one_error_line(capsys)


def test_common_option_before_the_command_is_explained(capsys):
    """`mi-krr --seed 3 construct cg --steps 1` (README: every command takes --seed): one line
    saying options go after the command, with the line reordered; not "invalid choice: '3'"."""
    assert main(["--seed", "3", "construct", "cg", "--steps", "1"]) == 2
    assert one_error_line(capsys) == "mi-krr: error: options go after the command: mi-krr construct --seed 3 cg --steps 1"


def test_construct_on_one_prompt_one_point_one_query_matches_closed_form_ridge(capsys):
    """gd --dim 1 --n-support 1 --n-query 1 --batch 1 --steps 1: the default rate 1 / (x^2 + lam)
    makes one GD step the exact ridge solution w = x y / (x^2 + lam), so both error columns are 0
    after step 1 and 1 at step 0 (the prediction 0)."""
    assert main(["construct", "gd", "--dim", "1", "--n-support", "1", "--n-query", "1", "--batch", "1", "--steps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]
    step0, step1 = (list(map(float, row[1:])) for row in rows)
    assert step0[1] == pytest.approx(1.0) and step0[2] == pytest.approx(1.0)
    assert max(step1) < 1e-14


def test_shipped_checkpoint_with_a_mistyped_name_lists_the_shipped_runs():
    """The README's first notebook line with a typo: the error must name the shipped runs
    (linear_lr, softmax_gp), not advise training a preset that does not exist."""
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        shipped_checkpoint("softmax")
    message = str(info.value)
    assert "softmax_gp" in message and "linear_lr" in message and "--preset softmax " not in message


def test_construct_gd_at_lam_zero_says_why_and_where_plain_gd_lives(capsys):
    """gd_transformer's Python default is lam = 0 (plain least-squares GD), but `construct` checks
    the model against KRR at lam, which needs lam > 0: the one line must say so and point to
    gd_transformer, not only 'lam must be > 0'."""
    assert main(["construct", "gd", "--lam", "0"]) == 2
    line = one_error_line(capsys)
    assert "lam must be > 0" in line and "gd_transformer" in line
