"""Checks written from mutation-testing survivors of session 13's changes: the Newton-Schulz
scale margin, the ReLU product-input check and Richardson's derived mlp_bound, weights_dtype,
Garg step listing, prefix_predictions' task check, bayes_optimal_ridge's dim check, GP input
shapes, cg_rate_study's device check, reproduce's quick-only shift filter and the Richardson
profile's withheld verdict. References are closed forms and hand-built inputs."""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from mi_krr.construct import richardson_transformer
from mi_krr.construct.primitives import Product, ReluArithmetic, compile_mlp, const, coord
from mi_krr.construct.studies import cg_rate_study
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.models.garg import load_garg_checkpoint
from mi_krr.models.registry import weights_dtype
from mi_krr.solvers.newton import newton_schulz_scale
from mi_krr.tasks import GPRegressionSampler, bayes_optimal_ridge
from prompts import random_task
from reproduction_recorder import record_reproduction_calls

EPS = np.finfo(np.float64).eps


# ----- solvers/newton.py --------------------------------------------------------------------------
def test_newton_schulz_scale_uses_the_documented_margin_of_four_n_eps():
    """c = 2 / ((1 + 4 n eps) mu_max^2 + mu_min^2) with n the number of eigenvalues per prompt (not
    the batch size): with mu_max = 1, mu_min = 0 and n = 1000, 2 / c - 1 recovers delta = 4000 eps
    (1000 eps or 4 * batch eps would be off by orders of magnitude more than rounding)."""
    n = 1000
    eigenvalues = torch.zeros(2, n, dtype=torch.float64)
    eigenvalues[:, -1] = 1.0
    eigenvalues[1, -1] = 2.0  # a second prompt: mu_max^2 = 4
    scale = newton_schulz_scale(eigenvalues)
    assert scale.shape == (2,)
    delta = 4 * n * EPS
    np.testing.assert_allclose(scale.numpy(), [2 / (1 + delta), 2 / (4 * (1 + delta))], rtol=4 * EPS, atol=0)
    recovered = 2 / scale[0].item() - 1
    assert abs(recovered - delta) < 16 * EPS


# ----- construct/primitives.py, construct/richardson.py -------------------------------------------
def test_relu_product_check_includes_the_readouts_constant_term():
    """Product(u = h0 + 2, v = h1) with bound 3 at h0 = 1.5, h1 = 0: u + v = 3.5 > 3, so the forward
    pass raises (the check must add the readout's bias); at h0 = 0.5 (u + v = 2.5) it computes
    u v = 0 exactly and does not raise."""
    mlp = compile_mlp([Product(3, coord(0) + const(2.0), coord(1))], 4, "relu", ReluArithmetic(width=9, bound=3.0))
    h = torch.zeros(1, 1, 4, dtype=torch.float64)
    h[..., 0] = 1.5
    with pytest.raises(ValueError, match=r"reached 3\.5, beyond mlp_bound=3"):
        mlp(h)
    h[..., 0] = 0.5
    assert abs(mlp(h)[0, 0, 3].item()) < 1e-12


def test_relu_richardson_accepts_a_reciprocal_range_that_exactly_meets_one_over_the_bound_and_one():
    """recip_range must contain [1 / mlp_bound, 1]: with mlp_bound = 4, (0.25, 1.0) contains it with
    both ends equal, so it is accepted (4 * 0.25 = 1 exactly)."""
    model = richardson_transformer(1, 0.1, 0.6, 1.0, dim=2, mlp="relu", mlp_width=16, mlp_bound=4.0, recip_range=(0.25, 1.0))
    assert model.blocks[0].mlp.bound == 4.0


def test_relu_richardson_default_bound_is_derived_from_max_support_32():
    """Default max_support = 32 and mlp_bound None: bound = 2 + c * 33 with c = (r + 1)^2 / (4 r),
    r = (2 / 1e-3)^(1 / 255) the knot ratio of the default width-256 reciprocal on (1e-3, 2)."""
    ratio = (2.0 / 1e-3) ** (1 / 255)
    expected = 2.0 + (ratio + 1) ** 2 / (4 * ratio) * 33
    model = richardson_transformer(1, 0.1, 0.6, 1.0, dim=2, mlp="relu")
    bounds = {module.bound for name, module in model.named_modules() if name.endswith("mlp") and hasattr(module, "bound")}
    assert len(bounds) == 1
    np.testing.assert_allclose(bounds.pop(), expected, rtol=1e-12)


# ----- models/registry.py -------------------------------------------------------------------------
def test_weights_dtype_ignores_integer_buffers():
    """BatchNorm holds an int64 `num_batches_tracked` buffer beside float weights: the dtype is
    that of the floating-point tensors only ("float32", then "float64" after .double())."""
    module = torch.nn.BatchNorm1d(3)
    assert {t.dtype for t in module.state_dict().values()} == {torch.float32, torch.int64}
    assert weights_dtype(module) == "float32"
    assert weights_dtype(module.double()) == "float64"


# ----- models/garg.py -----------------------------------------------------------------------------
def test_garg_missing_step_lists_saved_steps_in_increasing_numeric_order(tmp_path, monkeypatch):
    """With files model_3/20/100.pt listed by the folder as 20, 100, 3 (neither numeric nor name
    order), step=7 names the saved steps sorted as numbers: (3, 20, 100)."""
    config = {"model": {"family": "gpt2", "n_dims": 3, "n_positions": 6, "n_embd": 12, "n_layer": 2, "n_head": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    for step in (3, 20, 100):
        (tmp_path / f"model_{step}.pt").write_bytes(b"")
    listed = pathlib.Path.iterdir
    order = {"model_20.pt": 0, "model_100.pt": 1, "model_3.pt": 2, "config.yaml": 3}
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(listed(self), key=lambda p: order.get(p.name, 4))))
    with pytest.raises(ValueError, match=r"pick a step whose file exists \(3, 20, 100\)$"):
        load_garg_checkpoint(tmp_path, step=7)


# ----- models/prompting.py ------------------------------------------------------------------------
def test_prefix_predictions_refuses_a_task_of_another_dimension_or_type():
    """prefix_predictions on an n_dims = 3 interleaved model: a d = 2 task is refused naming the
    dimension, and a non-task is refused naming ICLTask (one ValueError each)."""
    torch.manual_seed(0)
    config = ICLTransformerConfig(n_dims=3, d_model=8, n_layers=1, n_heads=2, layout="interleaved", max_seq_len=16, dtype="float64")
    model = ICLTransformer(config).eval()
    with pytest.raises(ValueError, match=r"task dimension d=2 does not fit this model \(n_dims=3\)"):
        model.prefix_predictions(random_task(1, 3, 1, 2, 0, torch.float64))
    with pytest.raises(ValueError, match=r"task must be an mi_krr\.tasks\.ICLTask, got dict"):
        model.prefix_predictions({"x_support": torch.zeros(1, 3, 3)})


# ----- tasks --------------------------------------------------------------------------------------
def test_bayes_optimal_ridge_checks_the_linear_dim():
    """Linear regression: noise_std^2 d = 0.25 * 4 = 1; dim 0 or 2.5 is refused naming dim
    (not truncated to 0 or 2)."""
    config = {"sampler": "linear_regression", "noise_std": 0.5}
    assert bayes_optimal_ridge({**config, "dim": 4}) == pytest.approx(1.0, rel=1e-15)
    for dim in (0, 2.5):
        with pytest.raises(ValueError, match=r"dim"):
            bayes_optimal_ridge({**config, "dim": dim})


def test_gp_covariance_and_function_draws_refuse_one_dimensional_inputs():
    """x of shape (d,) = (3,) lacks the point axis [..., N, d]: refused by covariance and by
    sample_functions with the sampler's shape message."""
    sampler = GPRegressionSampler(3)
    for call in (sampler.covariance, lambda x: sampler.sample_functions(x, seed=0)):
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., N, d=3\] \(this sampler's dim\), got shape \(3,\)"):
            call(torch.zeros(3))


# ----- construct/studies.py -----------------------------------------------------------------------
def test_cg_rate_study_checks_its_device_before_any_kappa():
    """A device string torch cannot parse is refused by name up front, even with no kappa to run."""
    with pytest.raises(ValueError, match=r"device 'nonsense' cannot be used here \(not a torch device name"):
        cg_rate_study(kappas=(), device="nonsense")


# ----- commands/reproduce.py ----------------------------------------------------------------------
def test_reproduce_softmax_ood_without_quick_passes_no_quick_shifts(monkeypatch, tmp_path):
    """Only --quick narrows softmax-ood's shifts to those the checkpoint's task has: a full run with
    --checkpoint hands the reproduction no `shifts` (a recorder stands in for it)."""
    from mi_krr.checkpoints import shipped_checkpoint
    from mi_krr.cli import main

    seen = record_reproduction_calls(monkeypatch)
    checkpoint = str(shipped_checkpoint("softmax_gp"))
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["reproduce", "softmax-ood", "--checkpoint", checkpoint, "--no-progress", "--out", str(tmp_path)])
    assert code == 0 and seen["checkpoint"] == checkpoint and "shifts" not in seen


# ----- reproductions/richardson_profile.py --------------------------------------------------------
def _fake_diagnosis(withheld: str | None) -> SimpleNamespace:
    score = SimpleNamespace(score=0.9, score_ci=(0.8, 0.95), profile_aligned_distance=0.1, aligned_steps=[1, 2],
                            model_profile=[-1.0, -2.0], algorithm_profile=[-1.0, -2.5])
    verdict = SimpleNamespace(best="cg", identified=False, runner_up=None, gap=None, gap_ci=None, equivalent=[],
                              message="m", withheld=withheld)
    return SimpleNamespace(verdict=verdict, scores={"cg": score}, fitted_steps={})


def test_richardson_profile_reports_a_withheld_verdict_as_withheld():
    """A verdict withheld by the diagnosis is kept in the LensResult and its key number reads
    "withheld; best cg" (not "not identified"); an ordinary one reads "not identified; best cg"."""
    from mi_krr.reproductions.richardson_profile import RichardsonProfileResult, _lens_result

    lenses = {"ridge": _lens_result(_fake_diagnosis("probes do not fit")), "readout": _lens_result(_fake_diagnosis(None))}
    assert lenses["ridge"].withheld == "probes do not fit" and lenses["readout"].withheld is None
    result = RichardsonProfileResult("ckpt", lenses, [1, 2], 2, 0.1, "gaussian", 4, 4, "optimal")
    numbers = result.key_numbers()
    assert numbers["ridge: verdict"] == "withheld; best cg"
    assert numbers["readout: verdict"] == "not identified; best cg"
    assert math.isclose(lenses["ridge"].scores["cg"], 0.9)
