"""Gaps a by-hand mutation review of `mi-krr construct` (option refusal, defaults, --mlp wiring),
`mi-krr train`'s schedule check and run-folder message, `--device`, the CG construction's
aggregator state and the exact reciprocal unit left open. Each test checks printed numbers
against NumPy re-implementations (CG and row-sum Richardson with the ReLU interpolants written
out as `np.interp`), closed forms, or messages and option tables written out by hand."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import yaml

from construct_references import gaussian_kernel as gaussian
from construct_references import numpy_cg_predictions, numpy_rowsum_richardson_errors, parse_construct_table, relative_errors_to_krr
from mi_krr.cli import main
from mi_krr.commands.construct import option_readers, refuse_unread_options
from mi_krr.construct import cg_transformer
from mi_krr.construct.primitives import RECIPROCAL_FLOOR, Reciprocal, compile_mlp, coord
from mi_krr.feature_maps import PositiveRandomFeatures
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import TrainConfig
from mi_krr.train.cli import add_train_parser, run_description
from prompts import random_task

SMALL = ["--dim", "2", "--n-support", "3", "--batch", "1", "--steps", "1"]


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def recip_interpolant(low, high, width):
    """The ReLU reciprocal by hand: 1/s interpolated linearly between `width` geometric knots on
    [low, high], constant outside."""
    knots = np.logspace(np.log10(low), np.log10(high), width)
    return lambda s: np.interp(s, knots, 1.0 / knots)


def square_interpolant(bound, width):
    """The ReLU square by hand: s^2 interpolated between `width` uniform knots on [-bound, bound]."""
    knots = np.linspace(-bound, bound, width)
    return lambda s: np.interp(s, knots, knots**2)


# ---- construct: options a construction does not read are refused ------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["richardson", "--head-width", "8"], "construct richardson does not use --head-width (used by: cg): drop it"),
        (["cg", "--temperature", "2"], "construct cg does not use --temperature (used by: cg --kernel exp): drop it"),
        # 0 is a value given, not an option left out
        (["cg", "--step", "0"], "construct cg does not use --step (used by: richardson, gd): drop it"),
        (["gd", "--head-width", "0"], "construct gd does not use --head-width (used by: cg): drop it"),
        # two unread options: the first of head_width, bandwidth, temperature, step, mlp, mlp_width is named
        (["gd", "--mlp", "relu", "--head-width", "8"], "construct gd does not use --head-width (used by: cg): drop it"),
    ],
)
def test_construct_refuses_more_unread_options_in_one_line(args, message, capsys):
    """Each option the construction (or its kernel) ignores exits 2 with the exact one-line
    message written out here, including zero values and, of two, the first in option order."""
    assert main(["construct", *args, *SMALL]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and message in lines[0], lines


def test_option_readers_table_written_out_by_hand():
    """option_readers(construction, kernel, mlp): which options each construction reads, against
    the module docstring's list (--mlp-width only with --mlp relu on cg / richardson)."""
    expected = {
        ("cg", "linear", None): dict(head_width=True, step=False, mlp=True, mlp_width=False, bandwidth=False, temperature=False),
        ("cg", "exp", "relu"): dict(head_width=True, step=False, mlp=True, mlp_width=True, bandwidth=False, temperature=True),
        ("cg", "gaussian", "exact"): dict(head_width=True, step=False, mlp=True, mlp_width=False, bandwidth=True, temperature=False),
        ("richardson", "gaussian", "relu"): dict(head_width=False, step=True, mlp=True, mlp_width=True, bandwidth=True,
                                                 temperature=False),
        ("gd", "linear", "relu"): dict(head_width=False, step=True, mlp=False, mlp_width=False, bandwidth=False, temperature=False),
        ("gd", "linear", None): dict(head_width=False, step=True, mlp=False, mlp_width=False, bandwidth=False, temperature=False),
    }
    for key, reads in expected.items():
        assert {name: read for name, (_, read) in option_readers(*key).items()} == reads, key


def test_refuse_unread_options_names_the_first_unread_option_of_the_given_order():
    """gd reads neither --mlp nor --mlp-width (even with mlp relu): given mlp_width first, it is
    the one named; given mlp first, mlp is; cg with mlp relu reads both (no error)."""
    with pytest.raises(ValueError, match=r"^construct gd does not use --mlp-width \(used by: cg --mlp relu, richardson --mlp relu\)"):
        refuse_unread_options("gd", "linear", {"mlp_width": 64, "mlp": "relu"})
    with pytest.raises(ValueError, match=r"^construct gd does not use --mlp \(used by: cg, richardson\)"):
        refuse_unread_options("gd", "linear", {"mlp": "relu", "mlp_width": 64})
    refuse_unread_options("cg", "linear", {"mlp_width": 64, "mlp": "relu", "step": None})


# ---- construct: defaults of options not given -----------------------------------------------------


def test_construct_richardson_without_bandwidth_uses_the_unit_bandwidth(capsys):
    """No --bandwidth: prompts and kernel use sigma = 1 (module docstring): the printed model-vs-KRR
    column is NumPy row-sum Richardson (fixed step) against NumPy KRR on the sigma = 1 Gaussian kernel."""
    steps, lam, step, dim, n, m, batch, seed = 3, 0.1, 0.7, 2, 6, 3, 2, 4
    assert main(["construct", "richardson", "--steps", str(steps), "--lam", str(lam), "--step", str(step), "--dim", str(dim),
                 "--n-support", str(n), "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    task = GPRegressionSampler(dim, kernel="gaussian", bandwidth=1.0, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    np.testing.assert_allclose(table[:, 2], numpy_rowsum_richardson_errors(x, xq, y, lam, 1.0, step, steps), rtol=2e-3)


def test_construct_cg_exp_head_without_temperature_uses_the_unit_temperature(capsys):
    """No --temperature: tau = 1 for the prompts, the head's random features and exact exp KRR;
    both error-to-KRR columns are NumPy CG on phi phi^T (phi written out) against NumPy exp KRR."""
    steps, lam, dim, n, m, batch, seed, width = 3, 0.1, 2, 6, 3, 2, 3, 8
    assert main(["construct", "cg", "--kernel", "exp", "--head-width", str(width), "--steps", str(steps), "--lam", str(lam),
                 "--dim", str(dim), "--n-support", str(n), "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    task = GPRegressionSampler(dim, kernel="exp", temperature=1.0, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    W = PositiveRandomFeatures(dim, width, kind="exp", temperature=1.0, seed=seed).weights.numpy()

    def phi(points):  # exp(w . x - |x|^2 / 2) / sqrt(m) at tau = 1
        return np.exp(points @ W - (points**2).sum(-1, keepdims=True) / 2) / np.sqrt(width)

    preds, exact = [], []
    for b in range(batch):
        features, features_q = phi(x[b]), phi(xq[b])
        preds.append(numpy_cg_predictions(features @ features.T, y[b], lam, features_q @ features.T, steps))
        exact.append(np.exp(xq[b] @ x[b].T) @ np.linalg.solve(np.exp(x[b] @ x[b].T) + lam * np.eye(n), y[b]))
    expected = relative_errors_to_krr(np.array(preds), np.array(exact))
    np.testing.assert_allclose(table[:, 3], expected, rtol=2e-3)
    np.testing.assert_allclose(table[:, 2], expected, rtol=2e-3)


# ---- construct: --mlp relu and --mlp-width reach the model -----------------------------------------


def numpy_relu_cg(K, K_query, y, lam, n_steps, reciprocal):
    """The CG construction's recurrences with 1/s replaced by `reciprocal` (rr = 1 at the start,
    step lengths from the new r^T r): predictions k_*^T alpha_t, t = 0..T."""
    n = len(y)
    alpha, r, p, Kp, rr = np.zeros(n), y.copy(), np.zeros(n), np.zeros(n), 1.0
    preds = [K_query @ alpha]
    for _ in range(n_steps):
        rr_new = r @ r
        b = rr_new * reciprocal(rr)
        p, Kp = r + b * p, K @ r + b * Kp
        a = rr_new * reciprocal(p @ (Kp + lam * p))
        alpha, r = alpha + a * p, r - a * (Kp + lam * p)
        rr = rr_new
        preds.append(K_query @ alpha)
    return np.array(preds)


@pytest.mark.parametrize("width", [16, None])
def test_construct_cg_relu_mlp_is_numpy_cg_with_the_interpolated_reciprocal(width, capsys):
    """--mlp relu [--mlp-width w] (default 256): the printed |model - solver| and model-vs-KRR
    columns are those of NumPy CG whose reciprocals are the width-w interpolant of 1/s on the CG
    construction's range [1e-6, 1e4], against NumPy CG and NumPy KRR."""
    steps, lam, dim, n, m, batch, seed = 3, 0.1, 3, 8, 3, 2, 1
    flags = [] if width is None else ["--mlp-width", str(width)]
    assert main(["construct", "cg", "--mlp", "relu", *flags, "--steps", str(steps), "--lam", str(lam), "--dim", str(dim),
                 "--n-support", str(n), "--n-query", str(m), "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    reciprocal = recip_interpolant(1e-6, 1e4, 256 if width is None else width)
    task = LinearRegressionSampler(dim, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    relu, solver, exact = [], [], []
    for b in range(batch):
        K, K_query = x[b] @ x[b].T, xq[b] @ x[b].T
        relu.append(numpy_relu_cg(K, K_query, y[b], lam, steps, reciprocal))
        solver.append(numpy_cg_predictions(K, y[b], lam, K_query, steps))
        exact.append(K_query @ np.linalg.solve(K + lam * np.eye(n), y[b]))
    relu, solver, exact = np.array(relu), np.array(solver), np.array(exact)
    vs_solver = np.abs(relu - solver).max(axis=(0, 2)) / np.abs(exact).max()
    assert vs_solver[1:].min() > 1e-6  # the interpolant is visibly inexact, so the check has teeth
    np.testing.assert_allclose(table[:, 1], vs_solver, rtol=3e-3, atol=1e-12)
    np.testing.assert_allclose(table[:, 2], relative_errors_to_krr(relu, exact), rtol=3e-3)


def test_construct_richardson_relu_mlp_width_is_numpy_richardson_with_interpolated_arithmetic(capsys):
    """richardson --mlp relu --mlp-width 12: the printed columns are those of NumPy row-sum
    Richardson whose products u v are (S(u + v) - S(u - v)) / 4 with S the 12-knot interpolant
    of s^2 on [-b, b], b = 2 + c (1 + n) (n = --n-support, c = (r + 1)^2 / (4 r) the reciprocal's
    overshoot, r = 2000^(1/11) its knot ratio), and whose reciprocals are the 12-knot interpolant
    of 1/s on [1e-3, 2] (dinv = 1 / (1 - z) - 1 with z = 1 / (1 + D), pred = o * (1 / z_*) with
    o = k_*^T alpha z_*)."""
    steps, lam, step, bandwidth, dim, n, m, batch, seed, width = 3, 0.1, 0.5, 0.8, 2, 6, 3, 2, 2, 12
    assert main(["construct", "richardson", "--mlp", "relu", "--mlp-width", str(width), "--steps", str(steps), "--lam", str(lam),
                 "--step", str(step), "--bandwidth", str(bandwidth), "--dim", str(dim), "--n-support", str(n), "--n-query", str(m),
                 "--batch", str(batch), "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    ratio = (2.0 / 1e-3) ** (1 / (width - 1))
    bound = 2 + (ratio + 1) ** 2 / (4 * ratio) * (1 + n)
    reciprocal, square = recip_interpolant(1e-3, 2.0, width), square_interpolant(bound, width)

    def product(u, v):
        return (square(u + v) - square(u - v)) / 4

    task = GPRegressionSampler(dim, kernel="gaussian", bandwidth=bandwidth, noise_std=0.1).sample(batch, n, m, seed=seed,
                                                                                                  dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    relu, solver, exact = [], [], []
    for b in range(batch):
        K, K_query = gaussian(x[b], x[b], bandwidth), gaussian(xq[b], x[b], bandwidth)
        D, D_query = K.sum(1), K_query.sum(1)
        dinv, izq = reciprocal(1 - 1 / (1 + D)) - 1, reciprocal(1 / (1 + D_query))
        alpha, exact_alpha, path, exact_path = np.zeros(n), np.zeros(n), [np.zeros(m)], [np.zeros(m)]
        for _ in range(steps):
            alpha = alpha + step * (product(dinv, y[b] - lam * alpha) - K @ alpha / D)
            path.append(product(K_query @ alpha / (1 + D_query), izq))
            exact_alpha = exact_alpha + step * (y[b] - (K + lam * np.eye(n)) @ exact_alpha) / D
            exact_path.append(K_query @ exact_alpha)
        relu.append(path)
        solver.append(exact_path)
        exact.append(K_query @ np.linalg.solve(K + lam * np.eye(n), y[b]))
    relu, solver, exact = np.array(relu), np.array(solver), np.array(exact)
    vs_solver = np.abs(relu - solver).max(axis=(0, 2)) / np.abs(exact).max()
    assert vs_solver[1:].min() > 1e-4
    np.testing.assert_allclose(table[:, 1], vs_solver, rtol=3e-3, atol=1e-12)
    np.testing.assert_allclose(table[:, 2], relative_errors_to_krr(relu, exact), rtol=3e-3)


def test_construct_richardson_relu_at_its_defaults_follows_the_solver(capsys):
    """`mi-krr construct richardson --mlp relu` with every other option at its default (d = 4,
    n = 16, bandwidth 1, width 256): its products are sized for the prompts' row sums (up to
    1 + n), so the printed |model - solver| stays below 1e-2 of max |KRR| at every step (it was
    ~1.1 with a fixed bound of 10, under the largest row sums)."""
    assert main(["construct", "richardson", "--mlp", "relu"]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    assert table.shape[0] == 11 and table[:, 1].max() < 1e-2


# ---- the CG construction's aggregator state ------------------------------------------------------


def test_cg_construction_rr_kp_and_kq_states_follow_numpy_cg():
    """After step t the aggregator holds rr = r_{t-1}^T r_{t-1} (1 after the embedding), and
    Kp = K p_{t-1}, kq = K_query p_{t-1} (0 at t = 0), with r, p from textbook NumPy CG
    (p_0 = r_0 = y; p_t = r_t + (r_t^T r_t / r_{t-1}^T r_{t-1}) p_{t-1})."""
    lam, n_steps = 0.3, 4
    task = random_task(2, 6, 3, 3, seed=8)
    states = cg_transformer(n_steps, lam, dim=3).step_states(task)
    for b in range(2):
        x, xq, y = task.x_support[b].numpy(), task.x_query[b].numpy(), task.y_support[b].numpy()
        K, A = x @ x.T, x @ x.T + lam * np.eye(6)
        r, p, rs, ps = y.copy(), y.copy(), [], []
        for _ in range(n_steps):
            rs.append(r)
            ps.append(p)
            a = (r @ r) / (p @ A @ p)
            r_new = r - a * A @ p
            p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
        expected_rr = np.array([1.0] + [v @ v for v in rs])
        np.testing.assert_allclose(states.aux["rr"][b].numpy(), expected_rr, rtol=1e-10)
        expected_Kp = np.stack([np.zeros(6)] + [K @ v for v in ps])
        expected_kq = np.stack([np.zeros(3)] + [xq @ x.T @ v for v in ps])
        np.testing.assert_allclose(states.support["Kp"][b].numpy(), expected_Kp, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(states.query["kq"][b].numpy(), expected_kq, rtol=1e-9, atol=1e-10)


def test_exact_reciprocal_unit_inverts_negative_arguments_too():
    """The exact reciprocal is 1/s for |s| above RECIPROCAL_FLOOR whatever the sign (closed form),
    and 0 at or below it: s = -3, -1e-100, -2e-154 give 1/s; -1e-200 and -FLOOR give 0."""
    s = torch.tensor([-3.0, -1e-100, -2e-154, -1e-200, -RECIPROCAL_FLOOR], dtype=torch.float64)
    zeros = torch.zeros_like(s)
    h = torch.stack([s, zeros, zeros, zeros], -1)  # [u, unused, off = 0, out]
    got = compile_mlp([Reciprocal(3, coord(0), off=coord(2))], 4, "exact")(h.unsqueeze(0)).squeeze(0)[:, 3]
    expected = torch.tensor([-1 / 3.0, -1e100, -1 / 2e-154, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)


# ---- --device ----------------------------------------------------------------------------------


def test_meta_device_with_an_index_is_refused_like_meta(capsys):
    """--device meta:0 is a meta device too (no values): one line naming it, before any output."""
    assert main(["construct", "gd", "--steps", "1", "--device", "meta:0"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--device 'meta:0' cannot be used here (meta tensors hold no values" in lines[0]
    assert captured.out == ""


# ---- train: the schedule must fit the run; the used-folder message ---------------------------------


def train_args(*argv: str, out: str = "run") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    args.out = out
    return args


def write_config(tmp_path, **train_section) -> str:
    description = {"model": {"model_type": "ICLTransformer", "n_dims": 2, "d_model": 8, "n_layers": 1, "n_heads": 1, "max_seq_len": 16},
                   "sampler": LinearRegressionSampler(2, noise_std=0.1).to_config(), "train": train_section}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(description))
    return str(path)


def test_train_phases_as_long_as_the_run_are_accepted():
    """A warm-up and a curriculum exactly --steps long fit (the limit is N <= steps)."""
    train = run_description(train_args("--preset", "linear_lr", "--steps", "5", "--warmup-steps", "5", "--curriculum-steps", "5"))["train"]
    assert (train["steps"], train["warmup_steps"], train["curriculum_steps"]) == (5, 5, 5)


def test_train_phases_are_checked_against_the_default_steps_and_warmup(tmp_path):
    """Keys missing from the config take TrainConfig's defaults (steps 10000, warm-up 500): a
    600-step warm-up fits the default 10000 steps, 20000 does not; the default 500-step warm-up
    does not fit --steps 100."""
    assert (TrainConfig.steps, TrainConfig.warmup_steps) == (10_000, 500)
    train = run_description(train_args("--config", write_config(tmp_path, warmup_steps=600)))["train"]
    assert "steps" not in train and train["warmup_steps"] == 600
    with pytest.raises(ValueError, match=r"train\.warmup_steps=20000 is longer than the run's 10000 steps: pass --warmup-steps N "
                                          r"with N <= 10000"):
        run_description(train_args("--config", write_config(tmp_path, warmup_steps=20_000)))
    with pytest.raises(ValueError, match=r"train\.warmup_steps=500 is longer than the run's 100 steps: pass --warmup-steps N "
                                          r"with N <= 100 \(--until-step"):
        run_description(train_args("--config", write_config(tmp_path), "--steps", "100"))


@pytest.mark.parametrize("section, field", [({"steps": 2, "warmup_steps": "ten"}, "warmup_steps"),
                                            ({"steps": "many", "warmup_steps": 0}, "steps")])
def test_train_non_integer_schedule_lengths_are_left_to_train_config(section, field, tmp_path, capsys):
    """A non-integer steps / warmup_steps in the config is not compared (no TypeError): the run
    is refused in one line by TrainConfig naming the field."""
    assert main(["train", "--config", write_config(tmp_path, **section), "--no-progress", "--out", str(tmp_path / "out")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and f"{field} must be" in lines[0], lines


def test_train_into_a_used_folder_gives_the_command_line_message(tmp_path, capsys):
    """The whole message in the command line's terms: the folder given with --out, --resume to
    continue it, or a new --out (written out here)."""
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "state" / "step_00000001.safetensors").write_bytes(b"")
    assert main(["train", "--preset", "linear_lr", "--until-step", "1", "--no-progress", "--out", str(run)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert f"--out {run} already holds checkpoints: pass --resume to continue it, or choose a new --out (rerun" in lines[0], lines
