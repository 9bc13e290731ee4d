"""The `mi-krr` command line: every subcommand has help and the common options, user errors are
one line with a non-zero exit (the traceback only with --debug), `--help` imports no torch, and
`construct` prints the per-step errors of its model, checked against NumPy solvers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.cli import COMMANDS, main
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from construct_references import numpy_cg_predictions, numpy_rowsum_richardson_errors, parse_construct_table, relative_errors_to_krr

COMMON_OPTIONS = ("--device", "--seed", "--out", "--debug")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`mi-krr ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "mi_krr.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help_with_the_common_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: mi-krr {command}")
    for option in COMMON_OPTIONS:
        assert option in text


def test_top_level_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\nfrom mi_krr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", result.stdout, flags=re.MULTILINE)
    assert result.stdout.strip().endswith("NO-TORCH")


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_option_is_a_one_line_error_pointing_to_help():
    assert_one_line_error(run_cli("demo", "--no-such-option"), "unrecognized arguments: --no-such-option", "mi-krr demo --help")


def test_bad_choice_is_a_one_line_error():
    assert_one_line_error(run_cli("reproduce", "nonsense"), "invalid choice", "mi-krr reproduce --help")


def test_missing_checkpoint_is_a_one_line_error_naming_what_is_supported(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no checkpoint at" in lines[0] and "Garg" in lines[0]


@pytest.mark.parametrize("make", ["foreign_file", "folder_without_config", "pt_without_config"])
def test_unsupported_checkpoint_is_a_one_line_error(tmp_path, make):
    if make == "foreign_file":
        path = tmp_path / "weights.bin"
        path.write_bytes(b"\x00" * 16)
    elif make == "folder_without_config":
        path = tmp_path / "run"
        path.mkdir()
    else:
        path = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(2)}, path)
    assert_one_line_error(run_cli("diagnose", str(path)), "not a supported checkpoint")


@pytest.mark.parametrize("device", ["nonsense", "cuda:99" if torch.cuda.is_available() else "cuda", "meta"])
def test_unusable_device_is_a_one_line_error_before_any_work(device, capsys):
    """An unknown device name, one this machine lacks, or meta (shapes without values) exits 2 with
    one line naming --device."""
    assert main(["construct", "cg", "--steps", "1", "--device", device]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"--device {device!r} cannot be used here" in lines[0] and "--device cpu" in lines[0]
    assert captured.out == ""  # refused before the command printed anything


def test_diagnose_batch_below_two_is_a_one_line_error(capsys):
    """--batch 1 cannot be cross-fitted: one line naming --batch (not the library's step_sizes hint)."""
    assert main(["diagnose", str(shipped_checkpoint("linear_lr")), "--batch", "1", "--no-shifts"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--batch must be >= 2, got 1" in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("diagnose", str(tmp_path / "nowhere"), "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_train_is_wired_and_reports_a_missing_choice_in_one_line(tmp_path):
    assert_one_line_error(run_cli("train", "--out", str(tmp_path / "run")), "say what to train")


def test_train_keeps_the_configs_seed_and_device_unless_given():
    from mi_krr.cli import build_parser

    parser, _ = build_parser()
    untouched = parser.parse_args(["train", "--preset", "softmax_gp"])
    assert untouched.seed is None and untouched.device is None
    given = parser.parse_args(["train", "--preset", "softmax_gp", "--seed", "3", "--device", "cpu"])
    assert given.seed == 3 and given.device == "cpu"
    assert parser.parse_args(["demo"]).seed == 0


# ---- construct --------------------------------------------------------------------------------


def test_construct_cg_prints_zero_error_to_its_solver_and_the_numpy_cg_error_to_krr(capsys):
    steps, lam, dim, n, m, batch, seed = 5, 0.1, 3, 10, 4, 4, 3
    assert main(["construct", "cg", "--steps", str(steps), "--lam", str(lam), "--dim", str(dim), "--n-support", str(n),
                 "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    np.testing.assert_array_equal(table[:, 0], np.arange(steps + 1))
    assert table[:, 1].max() < 1e-10

    task = LinearRegressionSampler(dim, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    preds, exact = [], []
    for b in range(batch):
        K, K_query = x[b] @ x[b].T, xq[b] @ x[b].T
        preds.append(numpy_cg_predictions(K, y[b], lam, K_query, steps))
        exact.append(K_query @ np.linalg.solve(K + lam * np.eye(n), y[b]))
    expected = relative_errors_to_krr(np.array(preds), np.array(exact))
    np.testing.assert_allclose(table[:, 2], expected, rtol=2e-3, atol=1e-12)  # printed to 4 significant digits
    np.testing.assert_allclose(table[:, 3], expected, rtol=2e-3, atol=1e-12)


def test_construct_richardson_matches_numpy_rowsum_richardson(capsys):
    steps, lam, bandwidth, step, seed = 4, 0.05, 0.8, 0.9, 1
    assert main(["construct", "richardson", "--steps", str(steps), "--lam", str(lam), "--bandwidth", str(bandwidth), "--step", str(step),
                 "--dim", "2", "--n-support", "8", "--n-query", "3", "--batch", "3", "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    assert table[:, 1].max() < 1e-10
    task = GPRegressionSampler(2, kernel="gaussian", bandwidth=bandwidth, noise_std=0.1).sample(3, 8, 3, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    np.testing.assert_allclose(table[:, 2], numpy_rowsum_richardson_errors(x, xq, y, lam, bandwidth, step, steps), rtol=2e-3)


def test_construct_gd_is_exact_and_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "gd"
    assert main(["construct", "gd", "--steps", "3", "--save", "--out", str(out)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    assert table[:, 1].max() < 1e-12
    recipe = yaml.safe_load((out / "construction.json").read_text())  # JSON is YAML
    assert recipe["construction"] == "gd" and recipe["steps"] == [0, 1, 2, 3]
    from safetensors.torch import load_file

    assert len(load_file(str(out / "model.safetensors"))) > 0


SMALL_CONSTRUCTION = ["--steps", "1", "--dim", "2", "--n-support", "3", "--batch", "1"]


@pytest.mark.parametrize(
    "args, option, used_by",
    [
        (["gd", "--head-width", "8"], "--head-width", "used by: cg"),
        (["gd", "--mlp", "exact"], "--mlp", "used by: cg, richardson"),  # given, though it is the default
        (["cg", "--bandwidth", "0.5"], "--bandwidth", "used by: richardson, cg --kernel gaussian"),  # cg's default kernel is linear
        (["richardson", "--temperature", "2"], "--temperature", "used by: cg --kernel exp"),
        (["cg", "--mlp-width", "64"], "--mlp-width", "used by: cg --mlp relu, richardson --mlp relu"),
    ],
)
def test_construct_refuses_an_option_its_construction_or_kernel_does_not_read(args, option, used_by, capsys):
    assert main(["construct", *args, *SMALL_CONSTRUCTION]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"construct {args[0]} does not use {option} ({used_by}): drop it" in err[0], err


@pytest.mark.parametrize(
    "args",
    [
        ["cg"], ["richardson"], ["gd"],  # every option at its default
        ["cg", "--kernel", "gaussian", "--head-width", "8", "--bandwidth", "0.5", "--mlp", "relu", "--mlp-width", "64"],
        ["cg", "--kernel", "exp", "--head-width", "8", "--temperature", "2"],
        ["richardson", "--bandwidth", "0.8", "--step", "0.5", "--mlp", "relu", "--mlp-width", "64"],
        ["gd", "--step", "0.1"],
    ],
)
def test_construct_accepts_its_defaults_and_every_option_it_reads(args, capsys):
    assert main(["construct", *args, *SMALL_CONSTRUCTION]) == 0
    assert capsys.readouterr().err == ""


def test_construct_rejects_a_kernel_the_construction_cannot_run_in_one_line(capsys):
    assert main(["construct", "richardson", "--kernel", "linear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Gaussian kernel" in err[0]


# ---- diagnose on a Garg-format run ---------------------------------------------------------------


def write_garg_run(folder, n_dims=3, n_positions=12, n_embd=16, n_layer=2, n_head=2):
    """A random Garg et al. run folder: config.yaml and state.pt of a GPT-2 TransformerModel."""
    from transformers import GPT2Config, GPT2Model

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    config = GPT2Config(n_positions=2 * n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    state = {f"_backbone.{key}": value for key, value in GPT2Model(config).state_dict().items()}
    state.update({f"_read_in.{key}": value for key, value in torch.nn.Linear(n_dims, n_embd).state_dict().items()})
    state.update({f"_read_out.{key}": value for key, value in torch.nn.Linear(n_embd, 1).state_dict().items()})
    torch.save({"model_state_dict": state, "train_step": 7}, folder / "state.pt")
    model = {"family": "gpt2", "n_dims": n_dims, "n_positions": n_positions, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model, "training": {"task": "linear_regression"}}))
    return folder


def test_diagnose_detects_a_garg_run_and_writes_a_report(tmp_path, capsys):
    run = write_garg_run(tmp_path / "garg")
    out = tmp_path / "report"
    assert main(["diagnose", str(run / "state.pt"), "--batch", "6", "--n-query", "2", "--bootstrap", "20", "--no-shifts",
                 "--no-sensitivities", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "garg/state.pt" in text and "noiseless" in text
    import json

    report = json.loads((out / "report.json").read_text())
    (entry,) = report["models"].values()
    result = entry["diagnosis"]["task_sets"]["in_distribution"]
    assert result["kernel"] == "linear" and result["lam"] == pytest.approx(0.01)
    assert result["info"]["label_scale"] == pytest.approx(np.sqrt(3)) and result["n_prompts"] == 6
    assert (out / "index.md").is_file() and (out / "overview.png").stat().st_size > 1000
