"""Usage review: the per-layer instruments called one by one, as a researcher does before
trusting `diagnose` (read-out lens and ridge probes, label and solver sensitivities, the attached
model's methods, the diagnosis fields, report arrays and figures), checked against independent
NumPy references: the GD construction's closed-form predictor and sensitivity matrix
K_q sum_k lr (I - lr (K + lam I))^k, NumPy KRR maps, and NumPy log-errors.

The bugs the review found are fixed; their tests check the correct behaviour."""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import probes  # noqa: E402
from mi_krr import solvers  # noqa: E402
from mi_krr.construct import gd_transformer  # noqa: E402
from mi_krr.kernels import kernel_matrix  # noqa: E402
from mi_krr.models import ICLTransformer, ICLTransformerConfig  # noqa: E402
from brute_force import lens_finite_differences  # noqa: E402
from probes.diagnose import STAGES  # noqa: E402
from prompts import random_task  # noqa: E402

LR, LAM, T, N = 0.05, 0.3, 4, 6


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tiny_model() -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")
    return ICLTransformer(cfg).eval()


def gd_closed_form(task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy: per step t = 0..T the GD construction's query predictions `[B, T+1, m]` and
    sensitivity matrices `[B, T+1, m, n]` (alpha_{t+1} = alpha_t + lr (y - (K + lam I) alpha_t),
    alpha_0 = 0, on the linear kernel), and the exact KRR predictions `[B, m]`."""
    x = task.x_support.detach().to(torch.float64).numpy()
    xq = task.x_query.detach().to(torch.float64).numpy()
    y = task.y_support.detach().to(torch.float64).numpy()
    K, Kq = x @ x.transpose(0, 2, 1), xq @ x.transpose(0, 2, 1)
    A = K + LAM * np.eye(x.shape[1])
    M, P = np.zeros_like(A), np.broadcast_to(np.eye(x.shape[1]), A.shape).copy()
    sens = [Kq @ M]
    for _ in range(T):
        M, P = M + LR * P, P @ (np.eye(x.shape[1]) - LR * A)
        sens.append(Kq @ M)
    sens = np.stack(sens, axis=1)
    krr = np.einsum("bmn,bn->bm", Kq, np.linalg.solve(A, y[..., None])[..., 0])
    return np.einsum("btmn,bn->btm", sens, y), sens, krr


@pytest.fixture(scope="module")
def gd_setup():
    return gd_transformer(T, LR, lam=LAM, dim=2), random_task(24, N, 3, 2, seed=3)


def test_gd_construction_lens_and_attached_sensitivities_equal_the_closed_form(gd_setup):
    """Read-out lens and label sensitivities (plain function, attached method with a layer subset
    and chunk_size=1) of the GD construction equal the NumPy closed-form predictor and its matrix
    K_q sum_k lr (I - lr A)^k per layer."""
    model, task = gd_setup
    pred, sens, _ = gd_closed_form(task)
    np.testing.assert_allclose(probes.layer_predictions(model, task).numpy(), pred, rtol=0, atol=1e-12)
    attached = probes.attach(model)
    np.testing.assert_allclose(probes.label_sensitivities(model, task).numpy(), sens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(attached.label_sensitivities(task, layers=[2, 4]).numpy(), sens[:, [2, 4]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(attached.label_sensitivities(task, chunk_size=1).numpy(), sens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(attached.layer_predictions(task, layers=(1, 3)).numpy(), pred[:, [1, 3]], rtol=0, atol=1e-12)


def test_diagnose_with_a_fixed_step_callable_reports_exact_fields(gd_setup):
    """diagnose with algorithms={label: partial(richardson, step=lr)}, step_sizes="optimal",
    sensitivities=True, kernels=(): path R2 1 with step t at layer t, step predictions and both
    sensitivity arrays equal the NumPy closed form, no fitted steps, no notes, one time per stage,
    and the callable recorded in the settings."""
    model, task = gd_setup
    pred, sens, krr = gd_closed_form(task)
    diagnosis = probes.diagnose(
        model, task, algorithms={"my gd": functools.partial(solvers.richardson, step=LR)}, kernel="linear", lam=LAM,
        kernels=(), step_sizes="optimal", sensitivities=True, n_steps=T, bootstrap=100, progress=False,
    )
    result = diagnosis["tasks"]
    score = result.scores["my gd"]
    assert score.score == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(score.aligned_steps, np.arange(T + 1))
    np.testing.assert_allclose(result.step_predictions["my gd"], pred, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.krr_predictions, krr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.step_sensitivities["my gd"], sens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.layer_sensitivities, sens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(score.sensitivity_r2.diagonal()[1:], 1.0, atol=1e-9)
    assert result.fitted_steps == {} and result.notes == []
    assert list(result.seconds) == list(STAGES) and all(v >= 0 for v in result.seconds.values())
    assert diagnosis.settings["algorithms"] == {"my gd": "mi_krr.solvers.richardson.richardson(step=0.05)"}


def test_layer_subset_report_arrays_and_figures_carry_the_closed_form_numbers(gd_setup, tmp_path):
    """layers=[0, 2, 4]: the saved arrays.npz holds the layer lens and the solver's steps as the
    NumPy closed form, the error-profile figure's model line is NumPy's log10 MSE to KRR at those
    layers, and the step map labels its rows by the probed layers."""
    model, task = gd_setup
    pred, _, krr = gd_closed_form(task)
    diagnosis = probes.diagnose(
        model, task, algorithms={"fixed": functools.partial(solvers.richardson, step=LR)}, kernel="linear", lam=LAM,
        kernels=(), step_sizes="optimal", layers=[0, 2, 4], n_steps=T, bootstrap=0, progress=False,
    )
    diagnosis.save(tmp_path)
    arrays = np.load(tmp_path / "arrays.npz")
    np.testing.assert_allclose(arrays["tasks/layer_predictions"], pred[:, [0, 2, 4]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["tasks/steps/fixed"], pred, rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["tasks/krr_predictions"], krr, rtol=0, atol=1e-12)
    figures = diagnosis.plot()
    lines = {line.get_label(): line for line in figures["error_profiles"].axes[0].lines}
    expected = np.log10(((pred[:, [0, 2, 4]] - krr[:, None]) ** 2).mean(axis=(0, 2)))
    np.testing.assert_allclose(lines["model layers at fixed steps"].get_ydata(), expected, rtol=1e-10)
    np.testing.assert_array_equal(lines["model layers at fixed steps"].get_xdata(), [0, 2, 4])
    np.testing.assert_allclose(lines["fixed"].get_ydata(), np.log10(((pred - krr[:, None]) ** 2).mean(axis=(0, 2))), rtol=1e-10)
    step_map = figures["step_map"].axes[0]
    assert [label.get_text() for label in step_map.get_yticklabels()] == ["0", "2", "4"]
    assert step_map.images[0].get_array().shape == (3, T + 1)


def test_ridge_diagnosis_skips_sensitivities_with_a_note_and_keeps_the_layer_subset():
    """method="ridge" with train_task, layers=(0, 2) and sensitivities=True: no sensitivity
    arrays, a note saying why, and layer predictions `[B, 2, m]` for exactly those layers."""
    model = tiny_model()
    task, train = random_task(8, 5, 2, 2, seed=1), random_task(12, 5, 2, 2, seed=2)
    result = probes.diagnose(
        model, task, method="ridge", train_task=train, layers=(0, 2), sensitivities=True, kernel="linear", lam=0.1,
        algorithms=("cg",), kernels=(), n_steps=3, bootstrap=0, progress=False,
    )["tasks"]
    assert result.layer_sensitivities is None and result.step_sensitivities is None
    assert any("label sensitivities skipped" in note for note in result.notes)
    assert result.layers == [0, 2] and result.layer_predictions.shape == (8, 2, 2)


def numpy_system(batch: int = 3, n: int = 5, m: int = 2, seed: int = 0):
    g = np.random.default_rng(seed)
    x, xq, y = g.normal(size=(batch, n, 2)), g.normal(size=(batch, m, 2)), g.normal(size=(batch, n))
    K = kernel_matrix("exp", torch.as_tensor(x)).numpy()
    Kq = kernel_matrix("exp", torch.as_tensor(xq), torch.as_tensor(x)).numpy()
    return K, Kq, y


@pytest.mark.parametrize("algorithm", ["jacobi_cg", "newton", "chebyshev"])
def test_solver_sensitivities_converge_to_the_numpy_krr_map_from_numpy_inputs(algorithm):
    """NumPy K, K_query and y (and an int lam) are accepted; far enough along, each solver's
    last-step sensitivity equals NumPy's K_q (K + lam I)^-1, and step 0 is zero."""
    K, Kq, y = numpy_system()
    lam, steps = 1, {"jacobi_cg": 8, "newton": 40, "chebyshev": 300}[algorithm]
    sens = probes.solver_sensitivities(algorithm, K, Kq, lam, steps, y=y).numpy()
    krr_map = Kq @ np.linalg.inv(K + lam * np.eye(K.shape[-1]))
    np.testing.assert_allclose(sens[:, -1], krr_map, rtol=0, atol=1e-8)
    assert np.all(sens[:, 0] == 0)


def test_solver_sensitivities_broadcast_one_kernel_over_a_batch_of_query_blocks():
    """One K `[n, n]` against K_query `[B, m, n]`: the Richardson-rowsum map per prompt equals the
    NumPy closed form K_q sum_k (I - w D^-1 A)^k w D^-1 (A = K + lam I, D = row sums of K, w the
    optimal step 2 / (mu_min + mu_max) of D^-1 A)."""
    K, Kq, _ = numpy_system()
    K = K[0]
    lam, steps = 0.2, 5
    sens = probes.solver_sensitivities("richardson_rowsum", K, Kq, lam, steps).numpy()
    A = K + lam * np.eye(K.shape[0])
    D_inv = np.diag(1.0 / K.sum(axis=1))
    mu = np.linalg.eigvals(D_inv @ A).real
    w = 2.0 / (mu.min() + mu.max())
    M, P = np.zeros_like(A), np.eye(A.shape[0])
    for _ in range(steps):
        M, P = M + w * P @ D_inv, (np.eye(A.shape[0]) - w * D_inv @ A) @ P
    np.testing.assert_allclose(sens[:, -1], Kq @ M, rtol=0, atol=1e-10)


def test_readout_lens_refuses_a_train_task_it_would_ignore():
    """A user who forgets method="ridge" but passes train_task gets the read-out lens back
    silently; diagnose raises one line for the same mistake, so layer_predictions should too."""
    model = tiny_model()
    with pytest.raises(ValueError, match="train_task"):
        probes.layer_predictions(model, random_task(3, 4, 2, 2, seed=2), train_task=random_task(6, 4, 2, 2, seed=1))


@pytest.mark.parametrize("seed", [-1, 1.7])
def test_ridge_probes_refuse_a_seed_diagnose_refuses(seed):
    """diagnose checks seed as an integer >= 0; the ridge probes run int(seed) and
    torch.manual_seed, so 1.7 silently becomes 1 and -1 is used as given."""
    model = tiny_model()
    with pytest.raises(ValueError, match="seed"):
        probes.fit_layer_probes(model, random_task(6, 4, 2, 2, seed=1), seed=seed)


def test_float32_task_on_float64_model_gets_float64_accurate_sensitivities():
    """A float32 task on a float64 ICLTransformer: the lens runs in float64, but the Jacobian is
    accumulated into the float32 label leaf, so it is off by ~7e-9 from float64 central finite
    differences of the lens on the same (float32-representable) labels, which are accurate to
    ~2e-10 here."""
    model = tiny_model()
    task32 = random_task(3, 4, 2, 2, seed=1).to(dtype=torch.float32)
    task64 = task32.to(dtype=torch.float64)
    reference = lens_finite_differences(model, task64).numpy()
    np.testing.assert_allclose(probes.label_sensitivities(model, task64).numpy(), reference, rtol=0, atol=1.5e-9)  # float64 task: fine
    np.testing.assert_allclose(probes.label_sensitivities(model, task32).numpy(), reference, rtol=0, atol=1.5e-9)
