"""The construction studies report what they claim, on small settings."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import mi_krr.construct.studies as studies
from mi_krr.construct import cg_transformer
from mi_krr.construct.studies import conditioned_linear_task, cg_rate_study, relu_width_study, width_study
from mi_krr.feature_maps import ProjectedKernelFeatures
from mi_krr.tasks import GPRegressionSampler
from device_placement import REQUESTED, PlacementRecorder, emulate_a_second_device


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The studies run thousands of tiny tensor ops, where intra-op threads only add
    synchronisation (and stall when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numpy_exp_kernel(points: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp(points @ points.swapaxes(-1, -2) / temperature)


def _numpy_eigh_descending(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    eigenvalues, eigenvectors = np.linalg.eigh(K)
    return np.clip(eigenvalues[..., ::-1], 0.0, None), eigenvectors[..., ::-1]


def _numpy_head_gram(K: np.ndarray, projection: str, m: int, sketch: np.ndarray) -> np.ndarray:
    """Gaussian: K^(1/2) R R^T K^(1/2) / m; top: the best rank-m approximation of K."""
    eigenvalues, eigenvectors = _numpy_eigh_descending(K)
    if projection == "top":
        U = eigenvectors[..., :m]
        return U @ (eigenvalues[..., :m, None] * U.swapaxes(-1, -2))
    root = eigenvectors @ (np.sqrt(eigenvalues)[..., :, None] * eigenvectors.swapaxes(-1, -2))
    projected = root @ sketch
    return projected @ projected.swapaxes(-1, -2) / m


def test_conditioned_linear_task_has_the_requested_condition_number():
    task = conditioned_linear_task(batch_size=3, n_support=16, kappa=250.0, lam=1e-3, seed=4)
    K = (task.x_support @ task.x_support.mT).numpy()
    np.testing.assert_allclose(np.linalg.cond(K + 1e-3 * np.eye(16)), 250.0, rtol=1e-8)
    with pytest.raises(ValueError, match="lam"):
        conditioned_linear_task(batch_size=1, n_support=4, kappa=1e3, lam=0.1)


def test_cg_rate_study_stays_under_the_cg_bound_and_on_the_solver():
    study = cg_rate_study(kappas=(10.0, 100.0), n_support=32, n_steps=12, batch_size=4)
    for key in ("10.0", "100.0"):
        model, solver, bound = map(np.array, (study.a_norm_ratio[key], study.solver_a_norm_ratio[key], study.bound[key]))
        assert (model <= bound + 1e-12).all()
        np.testing.assert_allclose(model, solver, rtol=1e-7)
    assert study.a_norm_ratio["10.0"][-1] < study.a_norm_ratio["100.0"][-1]
    json.dumps(study.to_dict())
    assert study.plot().axes[0].get_yscale() == "log"


def test_gaussian_sketch_of_the_exp_kernel_is_unbiased():
    rng = np.random.default_rng(3)
    points = 0.6 * rng.standard_normal((5, 3))
    n_draws = 20000
    head = ProjectedKernelFeatures("exp", 3, 2, "gaussian", temperature=0.8, seed=11)
    grams = head.gram(torch.from_numpy(np.broadcast_to(points, (n_draws, 5, 3)).copy())).numpy()
    K = _numpy_exp_kernel(points, 0.8)
    standard_error = grams.std(axis=0) / np.sqrt(n_draws)
    assert np.abs(grams.mean(axis=0) - K).max() < 0.05 * np.abs(K).max()
    assert (np.abs(grams.mean(axis=0) - K) < 5 * standard_error + 1e-12).all()
    assert np.abs(grams[0] - K).max() > 0.05 * np.abs(K).max()  # one draw is a rank-2 head, not K


@pytest.mark.parametrize("projection", ["gaussian", "top"])
def test_cg_transformer_with_a_projected_head_is_krr_on_the_projected_gram(projection):
    temperature, lam, m = 0.7, 0.05, 6
    task = GPRegressionSampler(3, kernel="exp", temperature=temperature).sample(3, 10, 4, seed=1, dtype=torch.float64)
    head = ProjectedKernelFeatures("exp", 3, m, projection, temperature=temperature, seed=5)
    model = cg_transformer(12, lam, dim=3, feature_map=head)
    points = torch.cat([task.x_support, task.x_query], dim=-2).numpy()
    gram = _numpy_head_gram(_numpy_exp_kernel(points, temperature), projection, m, head.sketch((3,), 14).numpy())
    y = task.y_support.numpy()
    alpha = np.linalg.solve(gram[:, :10, :10] + lam * np.eye(10), y[..., None])[..., 0]
    expected = np.einsum("bqn,bn->bq", gram[:, 10:, :10], alpha)
    np.testing.assert_allclose(model.predict(task).numpy(), expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def test_width_study_projection_heads_fall_with_width_and_top_eigen_is_exact_at_the_prompt_size():
    study = width_study(widths=(2, 16, 64), kernels=("exp",), dim=4, n_support=12, n_query=4, lam=1.0, n_steps=16,
                        batch_size=4, heads=("gaussian_sketch", "top_eigen"), lams=(10.0,), n_seeds=2)
    for lam in (1.0, 10.0):
        sketch, top = study.curve("exp", "gaussian_sketch", lam), study.curve("exp", "top_eigen", lam)
        for curve in (sketch, top):
            np.testing.assert_allclose(curve.error, curve.feature_krr_error, rtol=1e-6, atol=1e-9)
        assert sketch.error[0] > sketch.error[1] > sketch.error[2] > 0.05  # unbiased but random at any m
        assert top.error[0] > 0.1 and max(top.error[1:]) < 1e-8  # m >= N = 16 points: the exact kernel
    assert 0 < study.curve("exp", "top_eigen", 10.0).d_eff < study.curve("exp", "top_eigen", 1.0).d_eff < 12
    assert all(sem > 0 for sem in study.curve("exp", "gaussian_sketch").error_sem)
    json.dumps(study.to_dict())
    axes = study.plot().axes
    assert len(axes) == 3 and all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    with pytest.raises(ValueError, match="heads"):
        width_study(widths=(2,), heads=("softmax",))


def test_width_study_random_features_error_is_the_feature_krr_error_and_falls_with_width():
    study = width_study(widths=(2, 8, 32), kernels=("linear",), dim=8, n_support=24, n_query=8, n_steps=24, batch_size=4,
                        heads=("random_features",), n_seeds=2)
    model, floor = np.array(study.model_error["linear"]), np.array(study.feature_krr_error["linear"])
    np.testing.assert_allclose(model, floor, rtol=1e-6, atol=1e-9)
    assert model[0] > model[1] > model[2]
    assert 0 < study.d_eff["linear"] <= 8
    json.dumps(study.to_dict())


def _record_what_the_study_computes_with(monkeypatch, recorder: PlacementRecorder) -> list[str]:
    """Spy on the solvers, kernels and constructions the studies call: each call whose tensors
    (arguments, and the built model's parameters and buffers) are not all placed is named in the
    returned list; `<name> called` is appended at each call."""
    calls = []

    def spied(name, function):
        def spy(*args, **kwargs):
            result = function(*args, **kwargs)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if isinstance(result, torch.nn.Module):
                tensors += [*result.parameters(), *result.buffers()]
            calls.append(f"{name} called")
            if not all(recorder.placed(tensor) for tensor in tensors):
                calls.append(f"{name} got an unplaced tensor")
            return result
        return spy

    for name in ("krr", "cg", "kernel_matrix", "effective_dimension", "cg_transformer"):
        monkeypatch.setattr(studies, name, spied(name, getattr(studies, name)))
    return calls


def test_cg_rate_study_places_its_prompts_kernels_model_and_solver_on_the_requested_device(monkeypatch):
    """Asked for "cpu:0" under `PlacementRecorder` (tests/device_placement.py: placement followed
    as on a second device), the study hands placed prompts and kernels to the solvers, builds a
    placed model, and mixes no placed tensor with an unplaced one (the ridge matrix included); its
    ratios are those of a run on "cpu"."""
    emulate_a_second_device(monkeypatch)
    expected = cg_rate_study(kappas=(10.0,), n_support=8, n_steps=3, batch_size=2)
    recorder = PlacementRecorder()
    calls = _record_what_the_study_computes_with(monkeypatch, recorder)
    with recorder:
        study = cg_rate_study(kappas=(10.0,), n_support=8, n_steps=3, batch_size=2, device=REQUESTED)
    assert set(calls) == {"krr called", "cg called", "cg_transformer called"}, calls
    assert recorder.mixed == []
    assert study.to_dict() == expected.to_dict()


def test_width_study_places_its_prompts_kernels_heads_and_models_on_the_requested_device(monkeypatch):
    """As for cg_rate_study, with both kernels and every head (random features, sketches, top-m)."""
    emulate_a_second_device(monkeypatch)
    settings = dict(widths=(2, 4), kernels=("linear", "exp"), dim=3, n_support=6, n_query=2, n_steps=2, batch_size=2, n_seeds=1)
    expected = width_study(**settings)
    recorder = PlacementRecorder()
    calls = _record_what_the_study_computes_with(monkeypatch, recorder)
    with recorder:
        study = width_study(**settings, device=REQUESTED)
    assert set(calls) == {"krr called", "kernel_matrix called", "effective_dimension called", "cg_transformer called"}, calls
    assert recorder.mixed == []
    assert study.to_dict() == expected.to_dict()


def test_conditioned_linear_task_draws_the_same_prompts_whatever_the_device():
    task = conditioned_linear_task(batch_size=2, n_support=6, kappa=20.0, lam=1e-3, seed=3)
    recorder = PlacementRecorder()
    with recorder:
        placed = conditioned_linear_task(batch_size=2, n_support=6, kappa=20.0, lam=1e-3, seed=3, device="cpu:0")
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert recorder.placed(getattr(placed, name)) and torch.equal(getattr(placed, name), getattr(task, name))
    with pytest.raises(ValueError, match="device 'nonsense' cannot be used here \\(not a torch device name"):
        conditioned_linear_task(batch_size=2, n_support=6, kappa=20.0, lam=1e-3, device="nonsense")


def test_relu_width_study_error_falls_with_width():
    study = relu_width_study(widths=(16, 64, 256), n_steps=4, n_support=16, batch_size=2)
    for errors in study.error.values():
        assert errors[0] > errors[1] > errors[2] > 0
    assert len(study.plot().axes) == 1


def test_relu_width_study_records_a_failed_width_as_inf_and_anchors_the_reference_at_a_finite_one():
    """CG at 8 ReLU units fails in 10 steps (reciprocal overshoot (r+1)^2/(4r) ~ 4x over 8
    decades): the study records inf for it without the forward's error or warning, and the
    figure's width^-2 guide passes through the first curve's first finite error (cg at 16 units)
    and is 4x that at half the width."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study = relu_width_study(widths=(8, 16), n_support=16, batch_size=2)
    assert study.error["cg"][0] == math.inf and 0 < study.error["cg"][1] < math.inf
    assert all(0 < e < math.inf for e in study.error["richardson"])
    lines = {line.get_label(): line for line in study.plot().axes[0].get_lines()}
    assert "cg transformer (failed at width 8)" in lines
    guide = lines["$\\propto$ width$^{-2}$"]
    at_16 = study.error["cg"][1]
    np.testing.assert_allclose(guide.get_ydata(), [4 * at_16, at_16], rtol=1e-12)


def test_cg_rate_figure_floor_follows_the_smallest_error_above_float64_rounding():
    """The A-norm panel's log axis starts 0.3x below the smallest drawn ratio above 1e-13 (a fixed
    1e-12 floor left most of a short study's panel empty); a rounding-level 1e-17 after
    convergence falls below it. Hand-written ratios."""
    import matplotlib.pyplot as plt

    from mi_krr.construct.studies import CGRateStudy

    study = CGRateStudy(kappas=[10.0], steps=[0, 1, 2], a_norm_ratio={"10.0": [1.0, 1e-2, 1e-17]},
                        solver_a_norm_ratio={"10.0": [1.0, 2e-2, 4e-4]}, pred_error={"10.0": [1.0, 0.1, 0.01]},
                        bound={"10.0": [2.0, 0.5, 0.1]}, n_support=8, lam=1e-4)
    figure = study.plot()
    assert figure.axes[0].get_ylim() == pytest.approx((0.3 * 4e-4, 3.0))
    plt.close(figure)
