"""The fitted global step: recovered from layers that run a known fixed-step solver (NumPy
references) and equal to the maximum of a brute-force dense scan, cross-fitting's split, the
lockstep Brent searches against SciPy's, and the closed-form (eigenbasis) trajectories the fit
evaluates its candidates with, against the real solvers and a NumPy loop."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import optimize

from brute_force import path_r2
from mi_krr.kernels import gaussian_kernel
from mi_krr.solvers import ALGORITHMS, heavy_ball, richardson
from probes.bounded_brent import bounded_brent
from probes.spectral_trajectories import FITTED_STEP_ALGORITHMS, fit_preconditioner, optimal_steps, spectral_system, spectral_systems
from probes.step_sizes import (
    MOMENTUM_GRID,
    cross_fit_folds,
    cross_fit_step,
    cross_fit_steps,
    fit_global_steps,
    fit_step,
    path_score,
    path_scores,
    scalar_jacobi,
)

B, N, M, LAM, T = 16, 8, 3, 0.05, 6


def system(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(B, M, 2, generator=g, dtype=torch.float64)
    y = torch.randn(B, N, generator=g, dtype=torch.float64)
    return gaussian_kernel(x), y, gaussian_kernel(xq, x)


def jacobi(K: np.ndarray) -> np.ndarray:
    return 1.0 / (np.diag(K) + LAM)


def numpy_layers(K, y, K_query, step, momentum=0.0, preconditioner=None) -> np.ndarray:
    """Per-step predictions [B, T+1, m] of alpha <- alpha + w P (y - A alpha) + beta (alpha - alpha_prev):
    the 'layers' of a network running that fixed-step iteration, one step per layer."""
    out = []
    for b in range(B):
        Kb, yb, Kq = K[b].numpy(), y[b].numpy(), K_query[b].numpy()
        A = Kb + LAM * np.eye(N)
        P = np.eye(N) if preconditioner is None else np.diag(preconditioner(Kb))
        alpha = previous = np.zeros(N)
        rows = [np.zeros(M)]
        for _ in range(T):
            alpha, previous = alpha + step * P @ (yb - A @ alpha) + momentum * (alpha - previous), alpha
            rows.append(Kq @ alpha)
        out.append(np.stack(rows))
    return np.stack(out)


@pytest.mark.parametrize(
    "algorithm, step, preconditioner",
    [("gd", 0.137, None), ("richardson_rowsum", 0.61, lambda K: 1.0 / K.sum(1)), ("richardson_jacobi", 0.3, jacobi)],
)
def test_fitted_step_recovers_the_fixed_step_of_the_layers(algorithm, step, preconditioner):
    K, y, K_query = system()
    layers = numpy_layers(K, y, K_query, step, preconditioner=preconditioner)
    fitted, momentum, score = fit_step(algorithm, K, y, LAM, T + 4, K_query, layers, np.arange(1, T + 1))
    assert fitted == pytest.approx(step, rel=1e-5) and momentum is None and score == pytest.approx(1.0, abs=1e-9)


def test_a_scalar_jacobi_preconditioner_takes_gds_fit_rescaled_instead_of_a_second_search(monkeypatch):
    K, y, K_query = system(12)  # Gaussian kernels: diag K = 1, so P = I / (1 + lam) for every prompt
    assert scalar_jacobi(K, y, LAM) == 1.0 / (1.0 + LAM)
    layers = numpy_layers(K, y, K_query, 0.3, preconditioner=jacobi)  # a network running Jacobi Richardson at 0.3
    scored = np.arange(1, T + 1)
    searched = cross_fit_step("richardson_jacobi", K, y, LAM, T, K_query, layers, scored, seed=2)  # its own search
    seen = []
    real = sys.modules["probes.step_sizes"].spectral_systems
    monkeypatch.setattr(sys.modules["probes.step_sizes"], "spectral_systems", lambda names, *args: seen.append(names) or real(names, *args))
    fitted, unfit = fit_global_steps(["gd", "richardson_jacobi", "heavy_ball"], K, y, LAM, K_query, T, layers, scored, seed=2)
    assert seen == [["gd", "heavy_ball"]] and unfit == {} and list(fitted) == ["gd", "richardson_jacobi", "heavy_ball"]
    shortcut = fitted["richardson_jacobi"]
    np.testing.assert_allclose(shortcut.step, [0.3, 0.3], rtol=1e-5)
    np.testing.assert_allclose(shortcut.step, searched.step, rtol=1e-5)
    np.testing.assert_allclose(shortcut.fit_score, searched.fit_score, rtol=1e-9)
    np.testing.assert_array_equal(shortcut.folds, searched.folds)
    assert shortcut.algorithm == "richardson_jacobi" and shortcut.momentum is None
    varied = K * torch.linspace(1.0, 2.0, N, dtype=torch.float64)[:, None].sqrt() * torch.linspace(1.0, 2.0, N, dtype=torch.float64).sqrt()
    assert scalar_jacobi(varied, y, LAM) is None  # a varying diagonal: Jacobi is searched like the others
    seen.clear()
    fit_global_steps(["gd", "richardson_jacobi"], varied, y, LAM, K_query, T, layers, scored, seed=2)
    assert seen == [["gd", "richardson_jacobi"]]


def test_heavy_ball_fit_recovers_step_and_a_grid_momentum():
    K, y, K_query = system(1)
    beta = float(MOMENTUM_GRID[3])  # 1 - 0.9 (0.03 / 0.9)^0.2 ~ 0.544
    layers = numpy_layers(K, y, K_query, 0.08, momentum=beta)
    step, momentum, score = fit_step("heavy_ball", K, y, LAM, T, K_query, layers, np.arange(1, T + 1))
    assert momentum == pytest.approx(beta) and step == pytest.approx(0.08, rel=1e-5) and score > 1 - 1e-9


def test_cross_fit_uses_each_half_for_its_own_step_only():
    """Halves whose layers run different steps get those steps: the fit never sees the other half."""
    K, y, K_query = system(2)
    folds = cross_fit_folds(B, seed=3)
    layers = np.where(folds[:, None, None] == 0, numpy_layers(K, y, K_query, 0.1), numpy_layers(K, y, K_query, 0.2))
    fit = cross_fit_step("gd", K, y, LAM, T, K_query, layers, np.arange(1, T + 1), seed=3)
    np.testing.assert_array_equal(fit.folds, folds)
    np.testing.assert_allclose(fit.step, [0.1, 0.2], rtol=1e-5)


def test_algorithms_fitted_together_get_what_each_gets_fitted_alone():
    """cross_fit_steps runs every algorithm's searches in one lockstep (candidates of several
    eigensystems scored in shared batches; searches of one algorithm and half finishing while
    others go on): each algorithm's steps, momenta and fit scores equal its own cross_fit_step's,
    and on layers running row-sum Richardson at 0.61 that algorithm recovers 0.61 on both halves."""
    K, y, K_query = system(5)
    layers = numpy_layers(K, y, K_query, 0.61, preconditioner=lambda K: 1.0 / K.sum(1))
    scored = np.arange(1, T + 1)
    systems = {name: spectral_system(name, K, y, LAM, K_query) for name in FITTED_STEP_ALGORITHMS}
    together = cross_fit_steps(systems, T, layers, scored, seed=1)
    assert list(together) == list(FITTED_STEP_ALGORITHMS)
    for name in FITTED_STEP_ALGORITHMS:
        alone = cross_fit_step(name, K, y, LAM, T, K_query, layers, scored, seed=1)
        np.testing.assert_array_equal(together[name].folds, alone.folds)
        np.testing.assert_allclose(together[name].step, alone.step, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(together[name].fit_score, alone.fit_score, rtol=1e-12, err_msg=name)
        assert (together[name].momentum is None) == (alone.momentum is None) == (name != "heavy_ball")
        if name == "heavy_ball":
            np.testing.assert_array_equal(together[name].momentum, alone.momentum)
    np.testing.assert_allclose(together["richardson_rowsum"].step, [0.61, 0.61], rtol=1e-5)


def test_lockstep_scores_candidates_of_systems_that_search_different_halves():
    """One call scoring gd's candidates on half 0 only and row-sum Richardson's on half 1 only
    (as late in a lockstep search, once one algorithm's searches on a half have finished): each
    candidate's score is the path R2 of that system's trajectory on that half's prompts alone."""
    from probes.step_sizes import _candidate_scores

    K, y, K_query = system(6)
    layers = numpy_layers(K, y, K_query, 0.2)
    scored = np.arange(1, T + 1)
    folds = cross_fit_folds(B, seed=2)
    systems = [spectral_system("gd", K, y, LAM, K_query), spectral_system("richardson_rowsum", K, y, LAM, K_query)]
    score = _candidate_scores(systems, folds, T, layers, scored)
    steps = np.array([0.15, 0.25, 0.5])
    got = score(np.array([0, 0, 1]), np.array([0, 0, 1]), np.log(steps), np.full(3, np.nan))
    for value, s, fold, step in zip(got, [0, 0, 1], [0, 0, 1], steps):
        half = torch.as_tensor(np.flatnonzero(folds == fold))
        pred = systems[s].select(half).predictions([step], T)[:, 0]
        assert value == pytest.approx(path_score(layers[half.numpy()], pred.numpy(), scored), rel=1e-12)


def test_heavy_ball_fit_on_gd_s_shared_eigensystem_recovers_its_step_and_momentum():
    """gd and heavy ball share fit_preconditioner "none", so diagnose computes one eigensystem for
    both; a heavy-ball fit given gd's recovers the layers' (step, momentum) on both halves."""
    K, y, K_query = system(4)
    assert fit_preconditioner("gd") == fit_preconditioner("heavy_ball") == "none"
    beta = float(MOMENTUM_GRID[2])  # 1 - 0.9 (0.03 / 0.9)^0.1 ~ 0.359, on the grid
    layers = numpy_layers(K, y, K_query, 0.08, momentum=beta)
    shared = spectral_system("gd", K, y, LAM, K_query)
    fit = cross_fit_step("heavy_ball", K, y, LAM, T, K_query, layers, np.arange(1, T + 1), seed=0, spectral=shared)
    np.testing.assert_allclose(fit.step, [0.08, 0.08], rtol=1e-5)
    np.testing.assert_allclose(fit.momentum, [beta, beta])


def test_cross_fit_needs_two_prompts():
    with pytest.raises(ValueError, match="step_sizes='optimal'"):
        cross_fit_folds(1, seed=0)


@pytest.mark.parametrize("n_prompts", [2, 7, 24])
def test_cross_fit_folds_are_seeded_halves_differing_by_at_most_one_prompt(n_prompts):
    folds = cross_fit_folds(n_prompts, seed=3)
    assert sorted(np.bincount(folds, minlength=2).tolist()) == [n_prompts // 2, n_prompts - n_prompts // 2]
    np.testing.assert_array_equal(folds, cross_fit_folds(n_prompts, seed=3))
    if n_prompts > 7:  # different seeds, different splits (C(24, 12) of them)
        assert not np.array_equal(folds, cross_fit_folds(n_prompts, seed=4))


@pytest.mark.parametrize("algorithm, precond", [("gd", "none"), ("richardson_jacobi", "jacobi"), ("richardson_rowsum", "rowsum")])
def test_spectral_richardson_trajectories_equal_the_solver_for_every_candidate_step(algorithm, precond):
    K, y, K_query = system(4)
    steps = np.array([0.02, 0.3, 0.9, 1.6])  # the largest diverges on some prompts: compared relative to size
    pred = spectral_system(algorithm, K, y, LAM, K_query).predictions(steps, T + 3)
    assert pred.shape == (B, len(steps), T + 4, M)
    for g, step in enumerate(steps):
        expected = richardson(K, y, LAM, T + 3, step=float(step), precond=precond, K_query=K_query).pred
        torch.testing.assert_close(pred[:, g], expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_spectral_heavy_ball_trajectories_equal_the_solver_and_a_numpy_loop():
    K, y, K_query = system(5)
    steps, momenta = np.array([0.05, 0.08, 0.2]), np.array([0.1, 0.5, 0.9])
    pred = spectral_system("heavy_ball", K, y, LAM, K_query).predictions(steps, T, momenta)
    for g, (step, momentum) in enumerate(zip(steps, momenta)):
        expected = heavy_ball(K, y, LAM, T, step=float(step), momentum=float(momentum), K_query=K_query).pred
        torch.testing.assert_close(pred[:, g], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(pred[:, g].numpy(), numpy_layers(K, y, K_query, step, momentum), rtol=1e-10, atol=1e-12)


def test_spectral_system_keeps_the_rowsum_preconditioners_error_on_a_linear_kernel():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="row sum"):
        spectral_system("richardson_rowsum", x @ x.mT, torch.randn(2, 5, dtype=torch.float64), LAM, x[:, :2] @ x.mT)


def test_spectral_systems_share_one_eigensystem_per_preconditioner_and_keep_errors_per_algorithm():
    K, y, K_query = system(7)
    systems, unfit = spectral_systems(list(FITTED_STEP_ALGORITHMS), K, y, LAM, K_query)
    assert not unfit and set(systems) == set(FITTED_STEP_ALGORITHMS)
    assert systems["gd"] is systems["heavy_ball"]  # both unpreconditioned: one eigendecomposition
    for name, spectral in systems.items():  # eigenvalues of P (K + lam I), P = I, diag(A)^-1 or diag(K 1)^-1
        A = K.numpy() + LAM * np.eye(N)
        P = {"gd": np.ones(N), "heavy_ball": np.ones(N)}.get(name)
        P = P if P is not None else 1.0 / (np.diagonal(A, axis1=1, axis2=2) if name == "richardson_jacobi" else K.numpy().sum(-1))
        expected = np.sort(np.linalg.eigvals(P[..., :, None] * A).real, axis=-1)
        np.testing.assert_allclose(spectral.eigenvalues.numpy(), expected, rtol=1e-9)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)  # linear kernel: some row sums <= 0
    systems, unfit = spectral_systems(["gd", "richardson_rowsum"], x @ x.mT, torch.randn(2, 5, dtype=torch.float64), LAM, x[:, :2] @ x.mT)
    assert set(systems) == {"gd"} and set(unfit) == {"richardson_rowsum"}
    assert "row sum" in str(unfit["richardson_rowsum"])


def test_batched_path_scores_equal_a_brute_force_monotone_alignment_and_minus_inf_for_divergence():
    rng = np.random.default_rng(7)
    layers, steps = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 4, 4, 2))  # [B, L', m], [B, G, T+1, m]
    steps[:, 3, 2, 0] = np.inf  # candidate 3 diverged
    scored = np.arange(1, 3)
    got = path_scores(layers, torch.as_tensor(steps), scored)
    np.testing.assert_allclose(got[:3], path_r2(layers, steps[:, :3].transpose(1, 0, 2, 3), scored), rtol=1e-12)
    assert got[3] == -np.inf


def test_path_scores_of_folds_equal_each_fold_scored_alone():
    """With `folds`, each fold's score uses its own prompts only (its own means too); a candidate
    diverging on one fold's prompt is -inf on that fold only."""
    rng = np.random.default_rng(9)
    layers, steps = rng.normal(size=(7, 3, 2)), rng.normal(size=(7, 3, 4, 2)) + 0.5  # [B, L', m], [B, G, T+1, m]
    folds = np.array([1, 0, 0, 1, 1, 0, 1])
    steps[3, 2, 1, 1] = np.nan  # candidate 2 diverged on a prompt of fold 1
    scored = np.arange(1, 3)
    got = path_scores(layers, torch.as_tensor(steps), scored, folds=folds)
    assert got.shape == (2, 3)
    for fold, finite in ((0, 3), (1, 2)):
        members = folds == fold
        expected = path_r2(layers[members], steps[members][:, :finite].transpose(1, 0, 2, 3), scored)
        np.testing.assert_allclose(got[fold, :finite], expected, rtol=1e-12)
    assert got[1, 2] == -np.inf


def richardson_trajectories(K, y, K_query, steps, preconditioner=None) -> np.ndarray:
    """Query predictions `[G, B, T+1, M]` of alpha <- alpha + w P (y - A alpha) for every step w
    `[G]` (NumPy, all steps at once)."""
    K, y, K_query = K.numpy(), y.numpy(), K_query.numpy()
    A = K + LAM * np.eye(N)
    P = np.ones((B, N)) if preconditioner is None else np.stack([preconditioner(k) for k in K])
    alpha = np.zeros((len(steps), B, N))
    out = [np.zeros((len(steps), B, M))]
    for _ in range(T):
        alpha = alpha + steps[:, None, None] * P * (y - np.einsum("bij,gbj->gbi", A, alpha))
        out.append(np.einsum("bmn,gbn->gbm", K_query, alpha))
    return np.stack(out, axis=2)


@pytest.mark.parametrize("algorithm, preconditioner", [("gd", None), ("richardson_jacobi", jacobi)])
def test_fitted_step_is_the_maximum_of_a_dense_scan(algorithm, preconditioner):
    """Noisy layers, one per two steps: the fit matches a brute-force scan (NumPy trajectories and
    alignments) of 4001 steps over the grid's whole range, then of 4001 steps 2e-6 apart in log
    step around the best: at least its path R2, at its step to 1e-5."""
    K, y, K_query = system(11)
    layers = numpy_layers(K, y, K_query, 0.137, preconditioner=preconditioner)[:, ::2]  # steps 0, 2, 4, 6
    layers = layers + 0.05 * np.abs(layers).mean() * np.random.default_rng(11).normal(size=layers.shape)
    scored = np.arange(1, 4)
    step, _, score = fit_step(algorithm, K, y, LAM, T, K_query, layers, scored)

    coarse = np.geomspace(1e-4, 10.0, 4001)
    r2 = path_r2(layers, richardson_trajectories(K, y, K_query, coarse, preconditioner), scored)
    fine = coarse[np.argmax(r2)] * np.exp(np.linspace(-1, 1, 4001) * np.log(coarse[1] / coarse[0]))
    r2 = path_r2(layers, richardson_trajectories(K, y, K_query, fine, preconditioner), scored)
    assert score >= r2.max() - 1e-12 and step == pytest.approx(fine[np.argmax(r2)], rel=1e-5)


BRENT_CASES = [  # (function, bounds): smooth, multimodal, a jump, monotone (converges to a bound), flat, a narrow dip
    (lambda x: (x - 0.3) ** 2, (-1.0, 2.0)),
    (lambda x: np.sin(5 * x) + 0.1 * x, (-2.0, 3.0)),
    (lambda x: -x if x < 0.7 else 1.0 - x, (0.0, 1.0)),
    (lambda x: x, (0.5, 1.5)),
    (lambda x: 2.0, (-1.0, 1.0)),
    (lambda x: -np.exp(-(((x - 1e-3) / 1e-4) ** 2)), (-0.5, 0.5)),
]


def test_bounded_brent_takes_scipys_steps_on_every_search_at_once():
    evaluated = [[] for _ in BRENT_CASES]

    def loss(index, x):
        for i, point in zip(index, x):
            evaluated[i].append(float(point))
        return np.array([BRENT_CASES[i][0](point) for i, point in zip(index, x)])

    low, high = np.array([bounds for _, bounds in BRENT_CASES]).T
    x, fun = bounded_brent(loss, low, high, xatol=1e-6)
    for i, (function, bounds) in enumerate(BRENT_CASES):
        seen = []
        expected = optimize.minimize_scalar(
            lambda point: seen.append(float(point)) or function(point), bounds=bounds, method="bounded", options={"xatol": 1e-6}
        )
        assert evaluated[i] == seen and x[i] == expected.x and fun[i] == expected.fun


@pytest.mark.parametrize("algorithm", FITTED_STEP_ALGORITHMS)
def test_optimal_steps_are_the_closed_forms_on_numpy_eigenvalues_and_the_registry_default_steps(algorithm):
    K, y, K_query = system(8)
    diagonals = {"gd": lambda Kb: np.ones(N), "heavy_ball": lambda Kb: np.ones(N), "richardson_jacobi": jacobi,
                 "richardson_rowsum": lambda Kb: 1.0 / Kb.sum(1)}
    expected = []
    for Kb in K.numpy():
        root = np.sqrt(diagonals[algorithm](Kb))
        mu = np.linalg.eigvalsh(root[:, None] * (Kb + LAM * np.eye(N)) * root[None, :])  # spectrum of P (K + lam I)
        low, high = mu[0], mu[-1]
        expected.append(4.0 / (np.sqrt(high) + np.sqrt(low)) ** 2 if algorithm == "heavy_ball" else 2.0 / (low + high))
    eigenvalues = spectral_system(algorithm, K, y, LAM, K_query).eigenvalues
    np.testing.assert_allclose(optimal_steps(algorithm, eigenvalues).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(ALGORITHMS[algorithm](K, y, LAM, 0).step.numpy(), expected, rtol=1e-10)


def test_spectral_trajectories_take_a_step_and_momentum_per_prompt():
    K, y, K_query = system(10)
    steps = np.linspace(0.05, 0.3, B)[:, None] * np.array([1.0, 1.5])  # [B, G]
    momenta = np.linspace(0.1, 0.8, B)[:, None] * np.array([1.0, 0.5])
    richardson_pred = spectral_system("richardson_jacobi", K, y, LAM, K_query).predictions(steps, T)
    heavy_pred = spectral_system("heavy_ball", K, y, LAM, K_query).predictions(steps, T, momenta)
    for g in range(2):
        step, momentum = torch.as_tensor(steps[:, g]), torch.as_tensor(momenta[:, g])
        expected = richardson(K, y, LAM, T, step=step, precond="jacobi", K_query=K_query).pred
        torch.testing.assert_close(richardson_pred[:, g], expected, rtol=1e-10, atol=1e-12)
        expected = heavy_ball(K, y, LAM, T, step=step, momentum=momentum, K_query=K_query).pred
        torch.testing.assert_close(heavy_pred[:, g], expected, rtol=1e-10, atol=1e-12)
    assert not spectral_system("gd", K, y, LAM, K_query).predictions(steps, 0).any()  # T = 0: alpha_0 = 0 only
