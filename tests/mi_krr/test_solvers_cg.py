"""CG, Jacobi-PCG and the direct solver against SciPy, exact arithmetic facts and the error bound."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_krr.solvers import cg, cg_error_bound, jacobi_cg, krr
from solver_systems import a_norm_errors, gaussian_kernel, scipy_cg_iterates, spd_matrix

RNG = np.random.default_rng(2024)




def test_krr_matches_scipy_solve_on_batched_gaussian_kernels():
    kernels = np.stack([gaussian_kernel(RNG, 9)[0] for _ in range(6)]).reshape(2, 3, 9, 9)
    y = RNG.standard_normal((2, 3, 9))
    alpha = krr(kernels, y, 0.05)
    assert alpha.dtype == torch.float64 and alpha.shape == (2, 3, 9)
    for index in np.ndindex(2, 3):
        expected = scipy.linalg.solve(kernels[index] + 0.05 * np.eye(9), y[index], assume_a="pos")
        np.testing.assert_allclose(alpha[index].numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("kappa", [2.0, 10.0, 50.0])
def test_cg_matches_scipy_iterates_on_well_conditioned_systems(kappa, backend):
    lam = 0.1
    K = np.stack([spd_matrix(RNG, 16, 1.0, kappa) - lam * np.eye(16) for _ in range(4)])
    y = RNG.standard_normal((4, 16))
    K_query = RNG.standard_normal((4, 3, 16))
    trajectory = cg(K, y, lam, 8, K_query=K_query, backend=backend)
    for b in range(4):
        A = K[b] + lam * np.eye(16)
        expected = scipy_cg_iterates(A, y[b], 8)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(trajectory.pred[b].numpy(), expected @ K_query[b].T, rtol=0, atol=1e-9 * scale)
        true_residuals = np.linalg.norm(y[b] - expected @ A, axis=1)
        np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), true_residuals, rtol=1e-8)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_jacobi_cg_matches_scipy_preconditioned_cg(backend):
    lam = 0.2
    # badly scaled rows and columns: the case Jacobi preconditioning is for
    scaling = np.diag(np.geomspace(0.3, 3.0, 12))
    K = np.stack([scaling @ spd_matrix(RNG, 12, 1.0, 5.0) @ scaling for _ in range(3)])
    y = RNG.standard_normal((3, 12))
    trajectory = jacobi_cg(K, y, lam, 7, backend=backend)
    assert trajectory.method == "jacobi_cg" and trajectory.preconditioner == "jacobi"
    for b in range(3):
        A = K[b] + lam * np.eye(12)
        expected = scipy_cg_iterates(A, y[b], 7, M=np.diag(1.0 / np.diag(A)))
        np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
        np.testing.assert_allclose(
            trajectory.residual_norm[b].numpy(), np.linalg.norm(y[b] - expected @ A, axis=1), rtol=1e-8
        )


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_cg_reaches_the_krr_solution_after_n_steps(n, backend):
    K, K_query = gaussian_kernel(RNG, n, m=4)
    y = RNG.standard_normal(n)
    lam = 0.5
    trajectory = cg(K, y, lam, n, K_query=K_query, backend=backend)
    expected = scipy.linalg.solve(K + lam * np.eye(n), y)
    np.testing.assert_allclose(trajectory.alpha[-1].numpy(), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(trajectory.pred[-1].numpy(), K_query @ expected, rtol=1e-8, atol=1e-10)
    assert trajectory.residual_norm[-1] < 1e-9 * np.linalg.norm(y)


@pytest.mark.parametrize("kappa", [2.0, 10.0, 100.0, 1000.0])
def test_cg_a_norm_error_obeys_the_classical_bound(kappa):
    lam = 1e-2
    n, n_steps = 60, 40
    A = spd_matrix(RNG, n, 1.0, kappa)
    y = RNG.standard_normal(n)
    trajectory = cg(A - lam * np.eye(n), y, lam, n_steps)
    errors = a_norm_errors(A, y, trajectory.alpha.numpy())
    bound = cg_error_bound(kappa, np.arange(n_steps + 1))
    assert np.all(errors / errors[0] <= bound * (1 + 1e-8) + 1e-12)
    assert bound[-1] < 0.3  # the check has teeth: the bound ends well below 1


def test_cg_error_bound_is_vectorised_over_floats_arrays_and_tensors():
    expected = 2 * ((np.sqrt(9.0) - 1) / (np.sqrt(9.0) + 1)) ** 3  # = 2 * 0.5^3
    assert cg_error_bound(9.0, 3) == pytest.approx(0.25)
    assert expected == pytest.approx(0.25)
    array = cg_error_bound(np.array([1.0, 9.0]), np.array([[0], [3]]))
    np.testing.assert_allclose(array, [[2.0, 2.0], [0.0, 0.25]])
    tensor = cg_error_bound(torch.tensor([9.0, 9.0]), torch.tensor([1, 2]))
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), [1.0, 0.5])
    with pytest.raises(ValueError, match="kappa"):
        cg_error_bound(0.5, 1)
    with pytest.raises(ValueError, match="t must"):
        cg_error_bound(2.0, -1)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    log_lam=st.floats(-3, 1),
    n_steps=st.integers(0, 14),
    seed=st.integers(0, 2**16),
)
def test_cg_a_norm_error_is_nonincreasing(n, log_lam, n_steps, seed):
    rng = np.random.default_rng(seed)
    K, _ = gaussian_kernel(rng, n)
    lam = 10.0**log_lam
    y = rng.standard_normal(n)
    errors = a_norm_errors(K + lam * np.eye(n), y, cg(K, y, lam, n_steps).alpha.numpy())
    assert np.all(errors[1:] <= errors[:-1] * (1 + 1e-6) + 1e-9 * errors[0])


@pytest.mark.parametrize("block_size", [1, 3, 7, 100])
def test_cg_block_schedule_does_not_change_results(block_size):
    K = np.stack([gaussian_kernel(RNG, 10)[0] for _ in range(7)])
    y = RNG.standard_normal((7, 10))
    blocked = cg(K, y, 0.1, 6, block_size=block_size, backend="torch")
    for b in range(7):
        single = scipy_cg_iterates(K[b] + 0.1 * np.eye(10), y[b], 6)
        np.testing.assert_allclose(blocked.alpha[b].numpy(), single, rtol=0, atol=1e-10 * np.abs(single).max())


@pytest.mark.parametrize("block_size", [None, 1])
def test_cg_label_sensitivities_match_finite_differences(block_size):
    n, lam = 6, 0.3
    pairs = [gaussian_kernel(RNG, n, m=2) for _ in range(2)]
    K, K_query = (torch.from_numpy(np.stack(arrays)) for arrays in zip(*pairs))
    y = torch.from_numpy(RNG.standard_normal((2, n))).requires_grad_(True)

    def predictions(labels):
        return cg(K, labels, lam, 4, K_query=K_query, block_size=block_size).pred

    assert torch.autograd.gradcheck(predictions, (y,), eps=1e-6, atol=1e-7)


def test_cg_kernel_sensitivities_match_finite_differences():
    n, lam = 5, 0.3
    K, _ = gaussian_kernel(RNG, n)
    y = torch.from_numpy(RNG.standard_normal(n))
    half = torch.from_numpy(K).requires_grad_(True)

    def iterates(matrix):
        return cg((matrix + matrix.mT) / 2, y, lam, 3).alpha

    assert torch.autograd.gradcheck(iterates, (half,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("solver", [cg, jacobi_cg])
def test_cg_zero_labels_give_zero_iterates_and_finite_gradients(solver):
    K, K_query = (torch.from_numpy(a).requires_grad_(True) for a in gaussian_kernel(RNG, 6, m=2))
    y = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    trajectory = solver(K.expand(2, 6, 6), y, 0.1, 5, K_query=K_query.expand(2, 2, 6))
    assert torch.equal(trajectory.alpha, torch.zeros(2, 6, 6, dtype=torch.float64))
    assert torch.equal(trajectory.residual_norm, torch.zeros(2, 6, dtype=torch.float64))
    (trajectory.pred.sum() + trajectory.residual_norm.sum() + trajectory.alpha.sum()).backward()
    for tensor in (y, K, K_query):
        assert torch.isfinite(tensor.grad).all()


def test_cg_exact_convergence_before_the_last_step_stays_finite():
    # K = 0, lam = 1: CG is exact after one step and every later residual is exactly zero
    y = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    K = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    trajectory = cg(K, y, 1.0, 5, K_query=torch.ones(1, 1, 3, dtype=torch.float64))
    np.testing.assert_array_equal(trajectory.residual_norm[0, 1:].detach().numpy(), 0.0)
    np.testing.assert_allclose(trajectory.alpha[0, -1].detach().numpy(), [1.0, -2.0, 3.0])
    trajectory.pred[:, -1].sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [[1.0, 1.0, 1.0]])  # d sum(alpha) / dy = (K + I)^-1 1
    assert torch.isfinite(K.grad).all()


def test_cg_with_zero_steps_returns_the_start():
    K, K_query = gaussian_kernel(RNG, 4, m=2)
    y = RNG.standard_normal(4)
    trajectory = cg(K, y, 0.1, 0, K_query=K_query)
    assert trajectory.alpha.shape == (1, 4) and trajectory.n_steps == 0
    assert torch.equal(trajectory.alpha, torch.zeros(1, 4, dtype=torch.float64))
    np.testing.assert_allclose(trajectory.residual_norm.numpy(), [np.linalg.norm(y)])
    assert torch.equal(trajectory.pred, torch.zeros(1, 2, dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(0, 9),
    n=st.integers(1, 13),  # the fused mat-vec takes rows four at a time: every remainder
    n_steps=st.integers(0, 10),
    m=st.integers(0, 6),  # 0: no queries
    jacobi=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_and_torch_schedules_agree_with_scipy_on_every_shape(batch, n, n_steps, m, jacobi, seed):
    rng = np.random.default_rng(seed)
    lam = 0.3
    K = np.array([spd_matrix(rng, n, 1.0, 20.0) - lam * np.eye(n) for _ in range(batch)]).reshape(batch, n, n)
    y = rng.standard_normal((batch, n))
    K_query = rng.standard_normal((batch, m, n)) if m else None
    solver = jacobi_cg if jacobi else cg
    fused, torch_schedule = (solver(K, y, lam, n_steps, K_query=K_query, backend=backend) for backend in ("fused", "torch"))
    assert fused.alpha.shape == torch_schedule.alpha.shape == (batch, n_steps + 1, n)
    for b in range(batch):
        A = K[b] + lam * np.eye(n)
        # SciPy divides by zero past exact convergence: its iterates up to step n, then the solution
        expected = scipy_cg_iterates(A, y[b], min(n_steps, n), M=np.diag(1.0 / np.diag(A)) if jacobi else None)
        expected = np.concatenate([expected, np.tile(scipy.linalg.solve(A, y[b]), (n_steps - min(n_steps, n), 1))])
        scale = np.abs(expected).max() + 1e-300
        for trajectory in (fused, torch_schedule):
            np.testing.assert_allclose(trajectory.alpha[b].numpy(), expected, rtol=0, atol=1e-9 * scale)
            true_residuals = np.linalg.norm(y[b] - expected @ A, axis=1)
            np.testing.assert_allclose(trajectory.residual_norm[b].numpy(), true_residuals, rtol=1e-6, atol=1e-9 * np.linalg.norm(y[b]))
            if m:
                np.testing.assert_allclose(trajectory.pred[b].numpy(), expected @ K_query[b].T, rtol=0, atol=1e-8 * scale)
    assert (fused.pred is None) == (torch_schedule.pred is None) == (m == 0)


def test_fused_schedule_does_not_depend_on_the_thread_count():
    pairs = [gaussian_kernel(RNG, 11, m=3) for _ in range(9)]
    K, K_query = (np.stack(arrays) for arrays in zip(*pairs))
    y = RNG.standard_normal((9, 11))
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            trajectory = cg(K, y, 0.1, 12, K_query=K_query, backend="fused")
            runs.append(torch.cat([trajectory.alpha, trajectory.pred], dim=-1))
    finally:
        torch.set_num_threads(threads)
    # every prompt is one sequential loop, whichever thread runs it: bit for bit the same
    assert all(torch.equal(runs[0], other) for other in runs[1:])
    single = [cg(K[b], y[b], 0.1, 12, K_query=K_query[b], backend="fused") for b in range(9)]
    assert torch.equal(runs[0], torch.stack([torch.cat([one.alpha, one.pred], dim=-1) for one in single]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fused_schedule_runs_in_a_forked_child_after_the_parent_used_it():
    K = np.stack([gaussian_kernel(RNG, 8)[0] for _ in range(6)])
    y = RNG.standard_normal((6, 8))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's pool of helper threads exists before the fork
    try:
        parent = cg(K, y, 0.1, 5, backend="fused").alpha
        pid = os.fork()
        if pid == 0:  # child: a hang would be killed by the alarm, a wrong result exits 1
            signal.alarm(30)
            os._exit(0 if torch.equal(cg(K, y, 0.1, 5, backend="fused").alpha, parent) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(threads)
    assert os.waitstatus_to_exitcode(status) == 0


def test_fused_schedule_stops_cleanly_on_exact_convergence():
    # y an eigenvector of K + lam I: CG converges in one step, then every denominator is 0
    K = np.diag([2.0, 3.0, 5.0])
    y = np.array([0.0, 1.0, 0.0])
    trajectory = cg(K, y, 0.5, 4, backend="fused")
    assert torch.isfinite(trajectory.alpha).all()
    np.testing.assert_allclose(trajectory.alpha[1:].numpy(), np.tile([0.0, 1.0 / 3.5, 0.0], (4, 1)), rtol=1e-15)
    np.testing.assert_array_equal(trajectory.residual_norm[1:].numpy(), 0.0)


def test_auto_backend_differentiates_and_fused_refuses_gradients():
    K, K_query = gaussian_kernel(RNG, 5, m=2)
    y = torch.from_numpy(RNG.standard_normal(5)).requires_grad_(True)
    assert cg(K, y, 0.3, 3, K_query=K_query).pred.requires_grad  # auto: the torch schedule
    with torch.no_grad():
        assert not cg(K, y, 0.3, 3, K_query=K_query).pred.requires_grad  # auto: fused, nothing to record
    with pytest.raises(ValueError, match="backend='fused' records no gradients.*backend='torch'"):
        cg(K, y, 0.3, 3, backend="fused")
    queries = torch.from_numpy(K_query).requires_grad_(True)  # the fused loop computes predictions too
    assert cg(K, y.detach(), 0.3, 3, K_query=queries).pred.requires_grad
    with pytest.raises(ValueError, match="K_query requires grad"):
        cg(K, y.detach(), 0.3, 3, K_query=queries, backend="fused")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'fused', 'torch'"):
        cg(K, y.detach(), 0.3, 3, backend="numba")
