"""Invariances and properties a researcher relies on without thinking, checked as a user would
call the public API (`mi_krr.solvers`, `mi_krr.kernels`, `probes.scoring`,
`probes.alignment_metrics`, `probes.kernel_alignment`, `probes.identifiability`,
`probes.sensitivity`, `probes.step_sizes`).

Properties: permutation of prompts (batch order), of support points (x and y together) and of
query points; scaling of labels (linear-in-y and 1-homogeneous solvers), of kernel and ridge
together, of inputs (fitted kernel scales); orthogonal rotation of x; strictly increasing maps
of a kernel (rank correlations) and isotropic scaling / constant offsets (CKA); the monotone
layer -> step alignment; degenerate inputs (all-zero labels, extreme scales).

References are independent of the library: brute-force enumeration of monotone paths (with
ties and inf), SciPy's `spearmanr` on the masked entries, NumPy closed forms (norms, KRR by
`numpy.linalg.solve`, the homogeneity of a linear map), and the permuted / rescaled inputs'
own exact images (a permutation of the inputs must permute the outputs, a rescaling must
rescale them by the closed-form factor). Session 22's fixes: the non-CG solvers' residual norms
and the scores' sums of squares at extreme scales, and `log_error_profile`'s floor.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import probes
from mi_krr import solvers
from mi_krr.kernels import exp_kernel, gaussian_kernel, linear_kernel
from mi_krr.tasks import ICLTask
from probes.attention_kernels import AttentionKernels
from probes.scoring import bootstrap_weights, log_error_profile, monotone_alignment, score_algorithm, score_algorithms
from probes.step_sizes import fit_step, path_score

LAM = 0.2


def gaussian_system(seed: int, batch: int = 3, n: int = 6, m: int = 3, d: int = 2, bandwidth: float = 0.8):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((batch, n, d)))
    x_query = torch.tensor(rng.standard_normal((batch, m, d)))
    y = torch.tensor(rng.standard_normal((batch, n)))
    return gaussian_kernel(x, bandwidth=bandwidth), y, gaussian_kernel(x_query, x, bandwidth=bandwidth)


SOLVER_RUNS = {name: (lambda K, y, lam, T, Kq, name=name: solvers.solve(name, K, y, lam, T, K_query=Kq)) for name in solvers.ALGORITHMS}
SOLVER_RUNS["cg(torch)"] = lambda K, y, lam, T, Kq: solvers.cg(K, y, lam, T, K_query=Kq, backend="torch")
SOLVER_RUNS["jacobi_cg(torch)"] = lambda K, y, lam, T, Kq: solvers.jacobi_cg(K, y, lam, T, K_query=Kq, backend="torch")


# ---------------------------------------------------------------- solvers and kernels


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_steps=st.sampled_from([0, 1, 4]))
def test_every_solver_is_equivariant_under_support_query_and_prompt_permutations(seed, n_steps):
    K, y, Kq = gaussian_system(seed % 1000)
    rng = np.random.default_rng(seed)
    sp, qp, bp = (torch.as_tensor(rng.permutation(size)) for size in (K.shape[-1], Kq.shape[-2], K.shape[0]))
    for name, run in SOLVER_RUNS.items():
        base = run(K, y, LAM, n_steps, Kq)
        moved = run(K[bp][:, sp][:, :, sp], y[bp][:, sp], LAM, n_steps, Kq[bp][:, qp][:, :, sp])
        torch.testing.assert_close(moved.pred, base.pred[bp][:, :, qp], rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(moved.alpha, base.alpha[bp][:, :, sp], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", list(SOLVER_RUNS))
def test_solver_predictions_are_1_homogeneous_in_y_and_invariant_to_scaling_kernel_and_ridge_together(name):
    # pred_t(c y) = c pred_t(y) (linear solvers; CG is 1-homogeneous), and every default step /
    # momentum / Chebyshev bound / Newton scale follows the spectrum, so (cK, c lam, c K_query)
    # runs the same predictions; the last step converges to NumPy's KRR prediction
    K, y, Kq = gaussian_system(3)
    run, lam = SOLVER_RUNS[name], 1.0  # kappa <= ~7: even GD has converged to 1e-9 by step 60
    base = run(K, y, lam, 60, Kq).pred
    torch.testing.assert_close(run(K, -3.5 * y, lam, 60, Kq).pred, -3.5 * base, rtol=0, atol=1e-12)
    torch.testing.assert_close(run(7.0 * K, y, 7.0 * lam, 60, 7.0 * Kq).pred, base, rtol=0, atol=1e-12)
    numpy_krr = np.einsum("bmn,bn->bm", Kq.numpy(), np.linalg.solve(K.numpy() + lam * np.eye(K.shape[-1]), y.numpy()[..., None])[..., 0])
    np.testing.assert_allclose(base[:, -1].numpy(), numpy_krr, atol=1e-9)


@pytest.mark.parametrize("name", list(SOLVER_RUNS))
def test_all_zero_labels_give_exact_zero_iterates_and_residuals_for_every_solver(name):
    K, y, Kq = gaussian_system(4)
    trajectory = SOLVER_RUNS[name](K, torch.zeros_like(y), LAM, 5, Kq)
    assert torch.equal(trajectory.pred, torch.zeros_like(trajectory.pred))
    assert torch.equal(trajectory.residual_norm, torch.zeros_like(trajectory.residual_norm))


@pytest.mark.parametrize("scale", [1e-170, 1e170])
def test_residual_norm_of_every_solver_is_1_homogeneous_in_y_at_extreme_label_scales(scale):
    K, y, Kq = gaussian_system(5)
    for name in ("gd", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"):
        base = solvers.solve(name, K, y, LAM, 4, K_query=Kq)
        scaled = solvers.solve(name, K, scale * y, LAM, 4, K_query=Kq)
        # the documented residual_norm = ||y - (K + lam I) alpha_t||, by NumPy on the rescaled iterates
        A = K.numpy() + LAM * np.eye(K.shape[-1])
        expected = scale * np.linalg.norm(y.numpy()[:, None] - base.alpha.numpy() @ A, axis=-1)
        np.testing.assert_allclose(scaled.residual_norm.numpy(), expected, rtol=1e-10, err_msg=name)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 4))
def test_kernels_are_invariant_under_orthogonal_rotation_and_gaussian_under_translation(seed, d):
    rng = np.random.default_rng(seed)
    x, z = rng.standard_normal((2, 5, d)), rng.standard_normal((2, 3, d))
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    shift = 3.0 * rng.standard_normal(d)
    t = lambda a: torch.tensor(a)  # noqa: E731
    # NumPy closed forms of the three kernels (mi_krr.kernels conventions)
    linear = x @ z.transpose(0, 2, 1)
    sq = ((x[:, :, None] - z[:, None]) ** 2).sum(-1)
    for kernel, expected, kw in ((linear_kernel, linear, {}), (exp_kernel, np.exp(linear / 1.7), {"temperature": 1.7}),
                                 (gaussian_kernel, np.exp(-sq / (2 * 0.6**2)), {"bandwidth": 0.6})):
        np.testing.assert_allclose(kernel(t(x @ Q), t(z @ Q), **kw).numpy(), expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gaussian_kernel(t(x + shift), t(z + shift), bandwidth=0.6).numpy(), np.exp(-sq / 0.72), rtol=1e-12, atol=1e-13)


def test_solver_label_sensitivities_permute_with_support_and_queries_and_cgs_are_0_homogeneous_in_y():
    K, y, Kq = gaussian_system(6, batch=2, n=5, m=3)
    rng = np.random.default_rng(6)
    sp, qp = torch.as_tensor(rng.permutation(5)), torch.as_tensor(rng.permutation(3))
    for name in solvers.ALGORITHMS:
        base = probes.solver_sensitivities(name, K, Kq, LAM, 4, y=y)
        moved = probes.solver_sensitivities(name, K[:, sp][:, :, sp], Kq[:, qp][:, :, sp], LAM, 4, y=y[:, sp])
        torch.testing.assert_close(moved, base[:, :, qp][..., sp], rtol=0, atol=1e-11, msg=name)
        # d pred / d y of a 1-homogeneous map is 0-homogeneous: the same at -3 y
        torch.testing.assert_close(probes.solver_sensitivities(name, K, Kq, LAM, 4, y=-3.0 * y), base, rtol=0, atol=1e-11, msg=name)
    # and for a linear solver it is the map itself: pred_t(y) = S_t y (NumPy contraction)
    gd = probes.solver_sensitivities("gd", K, Kq, LAM, 4)
    np.testing.assert_allclose(np.einsum("btmn,bn->btm", gd.numpy(), y.numpy()), solvers.solve("gd", K, y, LAM, 4, K_query=Kq).pred.numpy(), atol=1e-13)


# ---------------------------------------------------------------- scoring


def scoring_problem(seed: int = 2, batch: int = 24, n_layers: int = 4, n_steps: int = 5, m: int = 3):
    K, y, Kq = gaussian_system(seed, batch=batch, n=6, m=m)
    steps = {name: solvers.solve(name, K, y, LAM, n_steps, K_query=Kq).pred.numpy() for name in ("cg", "gd", "heavy_ball")}
    krr = np.einsum("bmn,bn->bm", Kq.numpy(), np.linalg.solve(K.numpy() + LAM * np.eye(6), y.numpy()[..., None])[..., 0])
    rng = np.random.default_rng(seed)
    layers = np.stack([np.zeros((batch, m))] + [steps["gd"][:, min(n_steps, l + 1)] + 0.05 * rng.standard_normal((batch, m)) for l in range(n_layers)], 1)
    kappa = rng.uniform(1.0, 100.0, batch)
    return layers, steps, krr, kappa


def test_prompt_order_leaves_scores_alignments_strata_and_paired_intervals_unchanged():
    """Permuting the prompts keeps every point estimate; the intervals are those of the same
    resamples only when the resample weights are permuted with the prompts (with the same seed,
    the multinomial counts attach to positions, so the intervals move by resampling noise)."""
    layers, steps, krr, kappa = scoring_problem()
    p = np.random.default_rng(11).permutation(len(layers))
    weights = bootstrap_weights(len(layers), 200, 3)
    for name, step in steps.items():
        base = score_algorithm(name, layers, step, krr, resamples=weights, kappa=kappa)
        moved = score_algorithm(name, layers[p], step[p], krr[p], resamples=weights[:, p], kappa=kappa[p])
        assert moved.score == pytest.approx(base.score, abs=1e-14)
        assert moved.score_ci == pytest.approx(base.score_ci, abs=1e-14)
        np.testing.assert_array_equal(moved.aligned_steps, base.aligned_steps)
        np.testing.assert_allclose(moved.r2, base.r2, atol=1e-14)
        np.testing.assert_allclose(moved.aligned_r2_ci, base.aligned_r2_ci, atol=1e-14)
        assert moved.weighted_r2 == pytest.approx(base.weighted_r2, abs=1e-14)
        assert moved.profile_distance == pytest.approx(base.profile_distance, abs=1e-14)


def test_r2_path_r2_and_profile_distance_ignore_a_common_scale_and_offset_and_mse_scales_by_c_squared():
    layers, steps, krr, _ = scoring_problem()
    base = score_algorithms(layers, steps, krr, bootstrap=50, seed=1)
    for c, shift in ((1e3, 0.0), (1e-3, 0.0), (1.0, 7.0)):
        moved = score_algorithms(c * layers + shift, {k: c * v + shift for k, v in steps.items()}, c * krr + shift, bootstrap=50, seed=1)
        for name in steps:
            assert moved[name].score == pytest.approx(base[name].score, abs=1e-12)
            assert moved[name].score_ci == pytest.approx(base[name].score_ci, abs=1e-12)
            np.testing.assert_array_equal(moved[name].aligned_steps, base[name].aligned_steps)
            np.testing.assert_allclose(moved[name].mse, c**2 * base[name].mse, rtol=1e-10, atol=1e-12 * c**2)
            assert moved[name].profile_distance == pytest.approx(base[name].profile_distance, abs=1e-10)
            # the NumPy definition: R2(l, t) = 1 - SSE / SST around the pooled mean of step t
            t = base[name].aligned_steps[-1]
            sse = ((layers[:, -1] - steps[name][:, t]) ** 2).sum()
            sst = ((steps[name][:, t] - steps[name][:, t].mean()) ** 2).sum()
            assert moved[name].r2[-1, t] == pytest.approx(1 - sse / sst, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-160, 1e-170, 1e-250, 1e100])
def test_path_r2_is_unchanged_by_a_common_scale_of_predictions_and_the_mse_scales_by_its_square(scale):
    layers, steps, krr, _ = scoring_problem()
    base = score_algorithms(layers, steps, krr, bootstrap=50, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        moved = score_algorithms(scale * layers, {k: scale * v for k, v in steps.items()}, scale * krr, bootstrap=50, seed=1)
    for name in steps:
        assert moved[name].score == pytest.approx(base[name].score, abs=1e-12)
        assert moved[name].score_ci == pytest.approx(base[name].score_ci, abs=1e-12)
        np.testing.assert_array_equal(moved[name].aligned_steps, base[name].aligned_steps)
        assert moved[name].profile_distance == pytest.approx(base[name].profile_distance, abs=1e-9)
        np.testing.assert_allclose(moved[name].model_profile, base[name].model_profile + 2 * np.log10(scale), rtol=1e-12)
        if scale**2 > np.finfo(np.float64).tiny:  # an MSE below float64's range is 0, as it should be
            np.testing.assert_allclose(moved[name].mse, scale**2 * base[name].mse, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-170, 1e-250])
def test_fitted_step_path_score_is_unchanged_by_a_tiny_common_scale(scale):
    layers, steps, _, _ = scoring_problem()
    scored = np.arange(1, layers.shape[1])
    for pred in steps.values():
        assert path_score(scale * layers, scale * pred, scored) == pytest.approx(path_score(layers, pred, scored), abs=1e-12)


def test_log_error_profile_floor_is_relative_to_the_reference_as_documented():
    reference = 1e-140 * np.random.default_rng(0).standard_normal((4, 3))
    exact = np.repeat(reference[:, None], 2, axis=1)  # two rows equal to the reference: MSE 0, floored
    expected = np.log10(np.finfo(np.float64).eps ** 2 * np.mean(reference**2))  # ~ -311.5
    np.testing.assert_allclose(log_error_profile(exact, reference), expected, rtol=1e-12)


def brute_force_alignment(cost: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Least total over every non-decreasing path; among equal totals the path whose steps,
    read from the last layer back, are lexicographically smallest (the documented earliest-step
    tie rule applied by backtracking)."""
    n_layers, n_steps = cost.shape
    return min(
        (sum(cost[row, step] for row, step in enumerate(path)), tuple(reversed(path)))
        for path in itertools.combinations_with_replacement(range(n_steps), n_layers)
    )


@settings(max_examples=150, deadline=None)
@given(n_layers=st.integers(1, 4), n_steps=st.integers(1, 5), data=st.data())
def test_monotone_alignment_equals_brute_force_enumeration_with_ties_and_infinite_costs(n_layers, n_steps, data):
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, np.inf]), min_size=n_layers * n_steps, max_size=n_layers * n_steps))
    cost = np.array(values).reshape(n_layers, n_steps)
    steps, total = monotone_alignment(cost)
    expected_total, reversed_path = brute_force_alignment(cost)
    assert total == expected_total
    assert np.all(np.diff(steps) >= 0) and steps.min() >= 0 and steps.max() < n_steps
    if np.isfinite(expected_total):
        assert tuple(reversed(steps.tolist())) == reversed_path


# ---------------------------------------------------------------- alignment metrics


def test_alignment_metric_invariances_cka_scale_and_offset_spearman_monotone_maps_operator_distance_neither():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 6, 6))
    a = a @ a.transpose(0, 2, 1)
    b = a + 0.5 * rng.standard_normal((3, 6, 6))
    base = {k: v.numpy() for k, v in probes.alignment_metrics(a, b).items()}
    # NumPy / SciPy references of the base values
    H = np.eye(6) - 1.0 / 6
    for i in range(3):
        ac, bc = H @ a[i] @ H, H @ b[i] @ H
        assert base["cka"][i] == pytest.approx((ac * bc).sum() / np.linalg.norm(ac) / np.linalg.norm(bc), abs=1e-14)
        assert base["operator_distance"][i] == pytest.approx(np.linalg.norm(a[i] - b[i], 2) / np.linalg.norm(b[i], 2), rel=1e-12)
        assert base["spearman"][i] == pytest.approx(stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic, abs=1e-14)
    scaled, offset, monotone = (probes.alignment_metrics(m, b) for m in (5.0 * a, a + 3.0, np.exp(a)))
    for name in ("cka",):
        np.testing.assert_allclose(scaled[name].numpy(), base[name], atol=1e-13)
        np.testing.assert_allclose(offset[name].numpy(), base[name], atol=1e-13)
    for name in ("spearman", "row_spearman"):
        for moved in (scaled, offset, monotone):
            np.testing.assert_allclose(moved[name].numpy(), base[name], atol=1e-14)
    # the relative operator distance is neither scale- nor offset-invariant: NumPy's values
    for i in range(3):
        assert scaled["operator_distance"][i].item() == pytest.approx(np.linalg.norm(5 * a[i] - b[i], 2) / np.linalg.norm(b[i], 2), rel=1e-12)
        assert offset["operator_distance"][i].item() == pytest.approx(np.linalg.norm(a[i] + 3 - b[i], 2) / np.linalg.norm(b[i], 2), rel=1e-12)
    # a joint row / column permutation moves nothing
    p = rng.permutation(6)
    for name, value in probes.alignment_metrics(a[:, p][:, :, p], b[:, p][:, :, p]).items():
        np.testing.assert_allclose(value.numpy(), base[name], atol=1e-14)


EXTREME_VALUES = st.sampled_from([-1e300, -2.0, -0.0, 0.0, 5e-324, 1e-300, 1.0, 1.0000000000000002, 2.0, 1e300])


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 6), data=st.data())
def test_rank_correlations_under_a_mask_equal_scipy_on_tied_signed_zero_and_extreme_entries(rows, cols, data):
    draw = lambda strategy: np.array(data.draw(st.lists(strategy, min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)  # noqa: E731
    a, b, mask = draw(EXTREME_VALUES), draw(EXTREME_VALUES), draw(st.booleans()).astype(bool)

    def spearman(u, v):
        if len(u) < 2 or np.all(u == u[0]) or np.all(v == v[0]):
            return np.nan
        return stats.spearmanr(u, v).statistic

    metrics = probes.alignment_metrics(a, b, mask=torch.tensor(mask))
    per_row = [spearman(a[i][mask[i]], b[i][mask[i]]) for i in range(rows)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_rows = np.nanmean(per_row)
    np.testing.assert_allclose(float(metrics["spearman"]), spearman(a[mask], b[mask]), atol=1e-12)
    np.testing.assert_allclose(float(metrics["row_spearman"]), expected_rows, atol=1e-12)


# ---------------------------------------------------------------- kernel alignment


def hand_built_attention(x_support: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
    """Query-block patterns [B, L=2, H=2, m, n]: row-normalised Gaussian (sigma 0.7) and exp (tau 2) kernels."""
    gaussian = gaussian_kernel(x_query, x_support, bandwidth=0.7)
    exp = torch.exp(x_query @ x_support.mT / 2.0)
    g, e = gaussian / gaussian.sum(-1, keepdim=True), exp / exp.sum(-1, keepdim=True)
    return torch.stack([torch.stack([g, e], 1), torch.stack([0.6 * e + 0.4 * g, g], 1)], 1)


def test_kernel_alignment_is_invariant_to_prompt_support_and_query_order_and_rotation_and_its_scales_follow_input_scale():
    rng = np.random.default_rng(8)
    xs, xq = torch.tensor(rng.standard_normal((5, 7, 2))), torch.tensor(rng.standard_normal((5, 3, 2)))
    task = ICLTask(xs, torch.tensor(rng.standard_normal((5, 7))), xq, torch.zeros(5, 3))
    attention = hand_built_attention(xs, xq)

    def align(task, pattern):
        return probes.kernel_alignment(None, task, attention=AttentionKernels(support=None, query=pattern, source="pattern"))

    base = align(task, attention)
    # the constructed heads are recovered: sigma 0.7 for the Gaussian head, tau 2 for the exp head
    assert base.scale["gaussian"][0, 0].item() == pytest.approx(0.7, rel=1e-6)
    assert base.scale["exp"][0, 1].item() == pytest.approx(2.0, rel=1e-6)
    sp, qp, bp = (torch.as_tensor(rng.permutation(k)) for k in (7, 3, 5))
    Q = torch.tensor(np.linalg.qr(rng.standard_normal((2, 2)))[0])
    c = 3.0
    variants = {
        "support and query order": (ICLTask(xs[:, sp], task.y_support[:, sp], xq[:, qp], task.y_query[:, qp]), attention[..., qp, :][..., sp], 1.0, 1.0),
        "prompt order": (task.select(bp), attention[bp], 1.0, 1.0),
        "rotation": (ICLTask(xs @ Q, task.y_support, xq @ Q, task.y_query), attention, 1.0, 1.0),
        "input scale": (ICLTask(c * xs, task.y_support, c * xq, task.y_query), attention, c**2, c),  # tau ~ |x|^2, sigma ~ |x|
    }
    for label, (moved_task, pattern, tau_factor, sigma_factor) in variants.items():
        moved = align(moved_task, pattern)
        torch.testing.assert_close(moved.scale["exp"], tau_factor * base.scale["exp"], rtol=1e-9, atol=0, msg=label)
        torch.testing.assert_close(moved.scale["gaussian"], sigma_factor * base.scale["gaussian"], rtol=1e-9, atol=0, msg=label)
        for kernel in base.metrics:
            for metric, value in base.metrics[kernel].items():
                torch.testing.assert_close(moved.metrics[kernel][metric], value, rtol=0, atol=1e-12, msg=f"{label} {kernel} {metric}")


# ---------------------------------------------------------------- verdict and fitted steps


def test_verdict_is_unchanged_by_candidate_order_and_prompt_order():
    K, y, Kq = gaussian_system(5, batch=30, n=8, m=3)
    names = ["cg", "gd", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"]  # no exact ties (jacobi variants left out)
    steps = {a: solvers.solve(a, K, y, 0.1, 6, K_query=Kq).pred.numpy() for a in names}
    krr = steps["cg"][:, -1]
    rng = np.random.default_rng(5)
    outcomes = []
    for truth in ("cg", "heavy_ball"):
        layers = np.stack([np.zeros((30, 3))] + [steps[truth][:, l + 1] + 0.002 * rng.standard_normal((30, 3)) for l in range(5)], 1)
        p = rng.permutation(30)
        runs = []
        for order, perm in ((names, np.arange(30)), (names[::-1], np.arange(30)), (list(rng.permutation(names)), p)):
            given_steps = {a: steps[a][perm] for a in order}
            verdict = probes.identifiability_verdict(score_algorithms(layers[perm], given_steps, krr[perm], bootstrap=200, seed=0), given_steps)
            runs.append((verdict.best, verdict.runner_up, verdict.identified, sorted(verdict.equivalent), round(verdict.score, 12)))
        assert runs[0] == runs[1] and runs[0][:4] == runs[2][:4], runs
        outcomes.append(runs[0])
    assert [(best, identified) for best, _, identified, _, _ in outcomes] == [("cg", True), ("heavy_ball", True)]


def test_fitted_global_step_follows_the_spectrum_scale_and_ignores_label_scale_and_prompt_order():
    K, y, Kq = gaussian_system(7, batch=10, n=6, m=3)
    rng = np.random.default_rng(7)
    truth = solvers.richardson(K, y, 0.1, 6, step=0.3, K_query=Kq).pred.numpy()
    layers = np.stack([np.zeros((10, 3))] + [truth[:, l] + 0.01 * rng.standard_normal((10, 3)) for l in (1, 2, 3, 4)], 1)
    scored, p = np.arange(1, 5), rng.permutation(10)
    for algorithm, step_factor in (("gd", 1 / 4.0), ("richardson_rowsum", 1.0)):  # P = diag(K 1)^-1 absorbs the scale
        step, _, score = fit_step(algorithm, K, y, 0.1, 6, Kq, layers, scored)
        assert fit_step(algorithm, K, 5 * y, 0.1, 6, Kq, 5 * layers, scored)[0] == pytest.approx(step, rel=1e-9)
        assert fit_step(algorithm, 4 * K, y, 0.4, 6, 4 * Kq, layers, scored)[0] == pytest.approx(step * step_factor, rel=1e-7)
        assert fit_step(algorithm, K[p], y[p], 0.1, 6, Kq[p], layers[p], scored)[0] == pytest.approx(step, rel=1e-9)
    assert fit_step("gd", K, y, 0.1, 6, Kq, layers, scored)[0] == pytest.approx(0.3, rel=2e-2)


# ---------------------------------------------------------------- the model's label sensitivities


def test_model_label_sensitivities_and_lens_permute_with_support_and_query_points():
    # the shipped softmax_gp model concatenates (x, y) tokens without a causal mask: it is
    # permutation invariant over the support and treats queries independently
    from mi_krr.checkpoints import shipped_checkpoint
    from mi_krr.tasks import sampler_from_config
    from mi_krr.train import load_model, read_run_config

    run = shipped_checkpoint("softmax_gp")
    model = load_model(run).double()
    task = sampler_from_config(read_run_config(run)["sampler"]).sample(2, n_support=5, n_query=3, seed=1).to(dtype=torch.float64)
    rng = np.random.default_rng(0)
    sp, qp = torch.as_tensor(rng.permutation(5)), torch.as_tensor(rng.permutation(3))
    moved = ICLTask(task.x_support[:, sp], task.y_support[:, sp], task.x_query[:, qp], task.y_query[:, qp], task.info)
    lens = probes.attach(model)
    torch.testing.assert_close(lens.layer_predictions(moved), lens.layer_predictions(task)[:, :, qp], rtol=0, atol=1e-12)
    base = probes.label_sensitivities(model, task)
    torch.testing.assert_close(probes.label_sensitivities(model, moved), base[:, :, qp][..., sp], rtol=0, atol=1e-12)
    # against central differences of the lens in each label
    h = 1e-6
    for i in range(5):
        step = torch.zeros(2, 5, dtype=torch.float64)
        step[:, i] = h
        plus = lens.layer_predictions(ICLTask(task.x_support, task.y_support + step, task.x_query, task.y_query))
        minus = lens.layer_predictions(ICLTask(task.x_support, task.y_support - step, task.x_query, task.y_query))
        torch.testing.assert_close(base[..., i], (plus - minus) / (2 * h), rtol=0, atol=1e-7)
