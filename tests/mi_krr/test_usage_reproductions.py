"""A scientist's review of the four reproductions (cg-rate, width, softmax-ood, richardson-profile):
their numbers against independent NumPy / SciPy computations written here (CG, eigenvalues, d_eff,
rank-m projections, exp / Gaussian kernels, GD and row-sum Richardson), beyond the shipped
defaults where the docs imply generality; what their figures and JSON say; and their one-line
errors. Problems found were `xfail(strict=True)` tests; each passes with its fix, its marker removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy.linalg import eigvalsh
from scipy.optimize import minimize_scalar

from construct_references import numpy_cg_iterates
from mi_krr.checkpoints import shipped_checkpoint
from mi_krr.construct.studies import conditioned_linear_task, width_head, width_study
from mi_krr.reproductions import WidthResult, cg_rate, richardson_profile, softmax_ood, width
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler, sampler_from_config
from mi_krr.train import load_model, read_run_config

# ---- independent references ----------------------------------------------------------------------


def a_norm_ratios(A, iterates, solution):
    error = iterates - solution
    return np.sqrt(np.maximum(np.einsum("ti,ij,tj->t", error, A, error), 0.0) / (solution @ A @ solution))


def lower_median(values, axis=0):
    """torch.median's convention (the lower of the two middle values for an even count)."""
    ordered = np.sort(values, axis=axis)
    return np.take(ordered, (ordered.shape[axis] - 1) // 2, axis=axis)


def cg_bound(kappa, t):
    root = np.sqrt(kappa)
    return 2.0 * ((root - 1.0) / (root + 1.0)) ** np.asarray(t, dtype=np.float64)


def top_m_krr_error(X, y, n, lam, m, kernel):
    """Relative query error to oracle KRR of KRR on the best rank-m approximation of the joint
    (support + query) kernel, and d_eff(lam) of the support kernel (my own eigendecompositions)."""
    G = np.exp(X @ X.T) if kernel == "exp" else X @ X.T
    mu, U = np.linalg.eigh(G)
    keep = np.argsort(mu)[::-1][:m]
    G_m = (U[:, keep] * mu[keep]) @ U[:, keep].T
    K, K_query = G[:n, :n], G[n:, :n]
    oracle = K_query @ np.linalg.solve(K + lam * np.eye(n), y)
    pred = G_m[n:, :n] @ np.linalg.solve(G_m[:n, :n] + lam * np.eye(n), y)
    spectrum = np.clip(eigvalsh(K), 0.0, None)
    return np.linalg.norm(pred - oracle) / np.linalg.norm(oracle), float(np.sum(spectrum / (spectrum + lam)))


def gaussian_gram(a, b, bandwidth):
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth**2))


# ---- cg-rate ------------------------------------------------------------------------------------


def test_cg_rate_kappa_is_the_condition_number_of_k_plus_lam_i_not_of_k():
    """The prompts' K + lam I has cond = kappa exactly (scipy eigvalsh), K alone a larger one."""
    kappa, lam, n = 15.0, 0.05, 12
    task = conditioned_linear_task(3, n, kappa, lam, seed=4)
    for x in task.x_support.numpy():
        K = x @ x.T
        mu = eigvalsh(K + lam * np.eye(n))
        assert mu[-1] / mu[0] == pytest.approx(kappa, rel=1e-9)
        bare = eigvalsh(K)
        assert bare[-1] / bare[0] > 1.5 * kappa  # the ridge matters here: kappa is not cond(K)


def test_cg_rate_error_follows_numpy_cg_at_every_step_and_stays_under_the_bound_off_the_defaults():
    """Seed 7, kappas 4 and 300, lam 1e-3, n 20: the model's median A-norm error is NumPy CG's at
    every step, every prompt's NumPy CG is under 2 q^t, and the summary's worst ratio is the max."""
    kappas, n, steps, lam, batch, seed = (4.0, 300.0), 20, 15, 1e-3, 3, 7
    result = cg_rate(kappas=kappas, n_support=n, n_steps=steps, lam=lam, batch_size=batch, seed=seed)
    t = np.arange(steps + 1)
    for kappa in kappas:
        key = str(kappa)
        task = conditioned_linear_task(batch, n, kappa, lam, n_query=16, seed=seed)
        ratios = []
        for x, y in zip(task.x_support.numpy(), task.y_support.numpy()):
            A = x @ x.T + lam * np.eye(n)
            ratios.append(a_norm_ratios(A, numpy_cg_iterates(A, y, steps), np.linalg.solve(A, y)))
        ratios = np.array(ratios)
        bound = cg_bound(kappa, t)
        assert np.all(ratios <= bound * (1 + 1e-9))  # per prompt, not only the median
        # rtol 1e-4: at kappa = 300 float64 CG's own rounding drift (model vs NumPy) reaches ~1e-5 by step 15
        np.testing.assert_allclose(result.study.a_norm_ratio[key], lower_median(ratios), rtol=1e-4, atol=1e-13)
        np.testing.assert_allclose(result.study.bound[key], bound, rtol=1e-12)
        assert result.within_bound[key] is True
        assert result.max_ratio_to_bound[key] == pytest.approx(np.max(lower_median(ratios) / bound), rel=1e-4)
        assert 0.3 < result.max_ratio_to_bound[key] < 1.0  # the bound is informative, not vacuous


def test_cg_rate_refuses_a_fractional_step_count_in_one_line_naming_n_steps():
    with pytest.raises(ValueError, match="n_steps"):
        cg_rate(kappas=(10.0,), n_support=8, n_steps=2.5, batch_size=2)


def test_cg_rate_refuses_an_empty_kappa_list():
    with pytest.raises(ValueError, match="kappas"):
        cg_rate(kappas=(), n_support=8, n_steps=3, batch_size=2)


def test_cg_rate_figure_says_its_curves_are_medians_over_prompts():
    result = cg_rate(kappas=(10.0,), n_support=8, n_steps=4, batch_size=3)
    figure = result.plot()
    suptitle = figure._suptitle.get_text() if figure._suptitle is not None else ""
    text = " ".join([suptitle] + [ax.get_title() + " " + ax.get_ylabel() for ax in figure.axes])
    plt.close(figure)
    assert "median" in text.lower()


# ---- width --------------------------------------------------------------------------------------


def test_width_top_m_head_and_d_eff_match_my_eigenprojection_on_exp_and_linear_kernels_off_the_defaults():
    """dim 6, n 20, 5 queries, lam 0.5 and a second ridge 3.0: the converged model's error with the
    top-m head is KRR on my own best rank-m approximation, d_eff is my trace formula at both ridges,
    and the model equals KRR on its head's kernel (the 'error is the head's' claim) for every head."""
    dim, n, n_query, batch, lam, widths = 6, 20, 5, 3, 0.5, (2, 6, 32)
    study = width_study(widths=widths, kernels=("linear", "exp"), dim=dim, n_support=n, n_query=n_query, lam=lam, lams=(3.0,),
                        n_steps=3 * n, batch_size=batch, seed=3, heads=("gaussian_sketch", "top_eigen"), n_seeds=1)
    samplers = {"linear": LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1),
                "exp": GPRegressionSampler(dim, kernel="exp", temperature=1.0)}
    for kernel, sampler in samplers.items():
        task = sampler.sample(batch, n, n_query, seed=3, dtype=torch.float64)
        X = torch.cat([task.x_support, task.x_query], 1).numpy()
        y = task.y_support.numpy()
        for ridge in (lam, 3.0):
            mine = np.array([[top_m_krr_error(X[b], y[b], n, ridge, m, kernel) for b in range(batch)] for m in widths])  # [w, b, 2]
            curve = study.curve(kernel, "top_eigen", ridge)
            np.testing.assert_allclose(curve.error, mine[..., 0].mean(1), rtol=1e-6, atol=1e-9)
            assert curve.d_eff == pytest.approx(mine[0, :, 1].mean(), rel=1e-9)
            assert curve.error[-1] < 1e-8  # m = 32 >= N = 25 points: the top-m head is exact
            for head in ("gaussian_sketch", "top_eigen"):
                c = study.curve(kernel, head, ridge)
                np.testing.assert_allclose(c.error, c.feature_krr_error, rtol=1e-6, atol=1e-9)
    assert study.curve("linear", "top_eigen").error[1] < 1e-8  # m = 6 = rank of the linear kernel in d = 6


def test_width_reports_mean_over_prompts_as_its_curve_documents():
    """WidthCurve.error is the mean over prompts of my per-prompt errors (and here differs from the median)."""
    dim, n, n_query, batch, lam = 5, 16, 4, 5, 0.2
    study = width_study(widths=(3,), kernels=("exp",), dim=dim, n_support=n, n_query=n_query, lam=lam, n_steps=2 * n, batch_size=batch,
                        seed=11, heads=("top_eigen",))
    task = GPRegressionSampler(dim, kernel="exp", temperature=1.0).sample(batch, n, n_query, seed=11, dtype=torch.float64)
    X = torch.cat([task.x_support, task.x_query], 1).numpy()
    per_prompt = np.array([top_m_krr_error(X[b], task.y_support.numpy()[b], n, lam, 3, "exp")[0] for b in range(batch)])
    assert study.curves[0].error[0] == pytest.approx(per_prompt.mean(), rel=1e-6)
    assert abs(per_prompt.mean() - np.median(per_prompt)) > 1e-3


def test_width_result_docstring_names_the_mean_it_reports():
    assert "median" not in (WidthResult.__doc__ or "")


def test_width_runs_with_only_the_projection_heads():
    result = width(widths=(4,), kernels=("linear",), dim=4, n_support=8, n_query=2, n_steps=4, batch_size=2, heads=("top_eigen",))
    assert result.study.heads == ["top_eigen"]
    result.summary()


def test_width_top_m_head_kernel_is_numpys_best_rank_m_approximation():
    """The top-m head ("top_eigen") computes the Eckart-Young best rank-m approximation of each
    prompt's joint kernel matrix, which is what the docs now call it: its kernel is my own
    eigenprojection, its Frobenius error the root of the sum of the squared discarded eigenvalues
    and its operator-norm error the largest discarded one (scipy eigvalsh), on the exp kernel and
    the linear kernel (rank d)."""
    dim, n_points, batch = 5, 14, 3
    points = torch.randn(batch, n_points, dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64) / np.sqrt(dim)
    X = points.numpy()
    for kernel, gram in (("exp", lambda x: np.exp(x @ x.T)), ("linear", lambda x: x @ x.T)):
        for m in (1, 3, 5, 9):
            head = width_head("top_eigen", kernel, dim, m, temperature=1.0, seed=0).gram(points).numpy()
            for b in range(batch):
                G = gram(X[b])
                mu = eigvalsh(G)  # ascending
                discarded = mu[: n_points - m]
                assert np.linalg.norm(G - head[b], "fro") == pytest.approx(np.sqrt(np.sum(discarded**2)), rel=1e-6, abs=1e-10)
                assert np.linalg.norm(G - head[b], 2) == pytest.approx(np.max(np.abs(discarded)), rel=1e-6, abs=1e-10)
                w, U = np.linalg.eigh(G)
                np.testing.assert_allclose(head[b], (U[:, -m:] * np.clip(w[-m:], 0.0, None)) @ U[:, -m:].T, atol=1e-10)


def test_width_top_m_head_error_rises_from_m16_to_m32_at_lam_0_1_as_the_docs_say():
    """The caveat docs/reproductions.md states: the best rank-m approximation is not the best head
    for prediction, and at lam = 0.1 (exp kernel, the docs' prompts: d 16, n 64 + 16 queries, 8
    prompts, seed 0) its error to oracle KRR rises from 0.36 at m = 16 to 0.56 at m = 32 (at the
    shipped lam = 1 it falls). Both computed in NumPy (KRR on my own best rank-m approximation)
    and matched by the study's feature-KRR error, which the model converges to."""
    dim, n, n_query, batch, widths = 16, 64, 16, 8, (16, 32)
    task = GPRegressionSampler(dim, kernel="exp", temperature=1.0).sample(batch, n, n_query, seed=0, dtype=torch.float64)
    X = torch.cat([task.x_support, task.x_query], 1).numpy()
    y = task.y_support.numpy()
    mine = {lam: [np.mean([top_m_krr_error(X[b], y[b], n, lam, m, "exp")[0] for b in range(batch)]) for m in widths] for lam in (0.1, 1.0)}
    assert np.round(mine[0.1], 2).tolist() == [0.36, 0.56]  # the documented rise
    assert np.round(mine[1.0], 2).tolist() == [0.26, 0.18]  # the documented fall at the shipped ridge (0.257, 0.184)
    study = width_study(widths=widths, kernels=("exp",), dim=dim, n_support=n, n_query=n_query, lam=0.1, lams=(1.0,), n_steps=1,
                        batch_size=batch, seed=0, heads=("top_eigen",))
    for lam, errors in mine.items():
        np.testing.assert_allclose(study.curve("exp", "top_eigen", lam).feature_krr_error, errors, rtol=1e-6)


# ---- softmax-ood --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softmax_gp():
    path = shipped_checkpoint("softmax_gp")
    config = read_run_config(path)
    return path, load_model(path), sampler_from_config(config["sampler"])


def my_kernel_distances(model, task, blocks):
    """Per block: min over heads and over the kernel's scale (SciPy bounded search + grid, uniform
    attention included) of the mean over prompts of ||attn - R||_2 / ||R||_2, R the row-normalised
    exp(x.x'/tau) or exp(-|x-x'|^2 / 2 sigma^2); attn = query rows over support keys, renormalised."""
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    xs, xq = task.x_support.double().numpy(), task.x_query.double().numpy()
    support, query = prompt.support_positions.numpy(), prompt.query_positions.numpy()
    dot = xq @ xs.transpose(0, 2, 1)
    squared = ((xq[:, :, None] - xs[:, None]) ** 2).sum(-1)

    def distance(attn, logits):
        R = np.exp(logits - logits.max(-1, keepdims=True))
        R /= R.sum(-1, keepdims=True)
        return float(np.mean(np.linalg.norm(attn - R, 2, axis=(1, 2)) / np.linalg.norm(R, 2, axis=(1, 2))))

    out = {}
    for block in blocks:
        pattern = cache[f"blocks.{block}.attn.hook_pattern"].double().numpy()
        best = {"exp": np.inf, "gaussian": np.inf}
        for head in range(pattern.shape[1]):
            attn = pattern[:, head][:, query][:, :, support]
            attn = attn / attn.sum(-1, keepdims=True)
            for kernel, logits_at, (low, high) in (("exp", lambda s: dot / np.exp(s), (-6.0, 8.0)),
                                                   ("gaussian", lambda s: -squared / (2 * np.exp(s) ** 2), (-5.0, 5.0))):
                grid = np.linspace(low, high, 43)
                values = [distance(attn, logits_at(s)) for s in grid]
                start = grid[int(np.argmin(values))]
                refined = minimize_scalar(lambda s: distance(attn, logits_at(s)), bounds=(max(low, start - 0.4), min(high, start + 0.4)),
                                          method="bounded")
                best[kernel] = min(best[kernel], min(values), refined.fun, distance(attn, 0 * dot))
        out[block] = best
    return out


def test_softmax_ood_gaussian_kernel_is_closer_than_exp_on_every_block_by_my_own_scale_fits(softmax_gp):
    """README: 'The Gaussian kernel ... is closer on every layer and task set'. Seed 5 (not the
    default), 12 prompts: with tau / sigma fitted here to the reported metric, every block holds."""
    path, model, sampler = softmax_gp
    batch, seed = 12, 5
    result = softmax_ood(path, batch_size=batch, shifts=("input_scale_x2",), seed=seed)
    task = sampler.sample(batch, result.n_support, result.n_query, seed=seed)
    mine = my_kernel_distances(model, task, range(model.n_layers))
    for block in range(model.n_layers):
        assert mine[block]["gaussian"] < mine[block]["exp"], (block, mine[block])
        assert result.best_gaussian_distance["in_distribution"][block] < result.best_distance["in_distribution"][block]
        # the library's fitted Gaussian distance is near the minimum over sigma (Frobenius fit, operator metric)
        assert mine[block]["gaussian"] - 1e-9 <= result.best_gaussian_distance["in_distribution"][block] <= mine[block]["gaussian"] + 0.03
    assert all(g < e for g, e in zip(result.best_gaussian_distance["input_scale_x2"], result.best_distance["input_scale_x2"]))


def test_softmax_ood_reports_the_operator_distance_at_the_frobenius_fitted_tau_and_the_best_tau_is_lower(softmax_gp):
    """docs/reproductions.md: tau is fitted per head by the squared Frobenius distance and the
    operator-norm distance is reported at that tau; for the last block (the docs' 64 prompts,
    seed 0) that is 0.990, while the operator distance minimised over tau is 0.897 (same head).
    Here, per head, SciPy finds the tau minimising the Frobenius distance summed over prompts (or
    uniform attention if that is as close), the operator distance there, minimised over heads, is
    the reported distance (and its tau the reported tau); and my operator-norm minimum over tau
    and heads is the documented, lower, number."""
    path, model, sampler = softmax_gp
    batch, seed, block = 64, 0, 3
    result = softmax_ood(path, batch_size=batch, shifts=(), seed=seed)
    task = sampler.sample(batch, result.n_support, result.n_query, seed=seed)
    prompt = model.encode(task)
    _, cache = model.run_with_cache(prompt.tokens, names_filter=lambda name: name == f"blocks.{block}.attn.hook_pattern")
    pattern = cache[f"blocks.{block}.attn.hook_pattern"].double().numpy()
    dot = task.x_query.double().numpy() @ task.x_support.double().numpy().transpose(0, 2, 1)

    def reference(inverse_tau):
        logits = inverse_tau * dot
        R = np.exp(logits - logits.max(-1, keepdims=True))
        return R / R.sum(-1, keepdims=True)

    def operator(attn, R):
        return float(np.mean(np.linalg.norm(attn - R, 2, axis=(1, 2)) / np.linalg.norm(R, 2, axis=(1, 2))))

    at_fitted = []
    for head in range(pattern.shape[1]):
        attn = pattern[:, head][:, prompt.query_positions.numpy()][:, :, prompt.support_positions.numpy()]
        attn = attn / attn.sum(-1, keepdims=True)

        def frobenius(log_tau):
            return float(np.sum((attn - reference(np.exp(-log_tau))) ** 2))

        grid = np.linspace(-6.0, 8.0, 141)
        start = grid[int(np.argmin([frobenius(s) for s in grid]))]
        fit = minimize_scalar(frobenius, bounds=(start - 0.2, start + 0.2), method="bounded", options={"xatol": 1e-9})
        inverse_tau = np.exp(-fit.x) if fit.fun < float(np.sum((attn - reference(0.0)) ** 2)) else 0.0
        at_fitted.append((operator(attn, reference(inverse_tau)), 1.0 / inverse_tau if inverse_tau else np.inf))
    distance, tau = min(at_fitted)
    assert result.best_distance["in_distribution"][block] == pytest.approx(distance, rel=1e-5)
    assert result.best_tau["in_distribution"][block] == pytest.approx(tau, rel=1e-4)
    best_over_tau = my_kernel_distances(model, task, (block,))[block]["exp"]
    assert round(result.best_distance["in_distribution"][block], 3) == 0.990 and round(best_over_tau, 3) == 0.897  # as documented
    assert best_over_tau < distance - 0.05  # the Frobenius-fitted tau is far from the operator norm's best here


def test_softmax_ood_refuses_seeds_outside_32_bits_like_the_cli(softmax_gp):
    path, _, _ = softmax_gp
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match="seed"):
            softmax_ood(path, batch_size=2, shifts=(), seed=seed)


# ---- richardson-profile -------------------------------------------------------------------------

PROFILE_SETTING = {"batch_size": 32, "train_batch_size": 128, "bootstrap": 50, "n_steps": 64, "seed": 1}  # 64 steps: the default


@pytest.fixture(scope="module")
def profile(softmax_gp):
    path, _, sampler = softmax_gp
    result = richardson_profile(path, **PROFILE_SETTING)
    task = sampler.sample(PROFILE_SETTING["batch_size"], 24, 8, seed=PROFILE_SETTING["seed"], dtype=torch.float32)
    return result, task, sampler


def stationary_mse(K, K_query, y, exact, lam, step, n_steps, precond):
    """Per prompt and step, the mean over queries of (prediction - KRR)^2 for
    alpha += step P (y - (K + lam I) alpha) from 0 (P = I or diag(K 1)^-1), `[B, T + 1]`."""
    alpha = np.zeros_like(y)
    diagonal = 1.0 / K.sum(-1) if precond == "rowsum" else np.ones_like(y)
    A = K + lam * np.eye(K.shape[-1])
    out = []
    for _ in range(n_steps + 1):
        out.append(np.mean((np.einsum("bqn,bn->bq", K_query, alpha) - exact) ** 2, axis=-1))
        alpha = alpha + np.asarray(step)[:, None] * diagonal * (y - np.einsum("bij,bj->bi", A, alpha))
    return np.array(out).T


def best_two_step_fit(reported, K, K_query, y, exact, lam, precond):
    """The smallest max |log10 MSE gap| to `reported` `[T + 1]` of my stationary iteration on 2
    prompts with one step each: a fine grid of steps (0.2-5x each prompt's spectrum-optimal
    2 / (mu_min + mu_max) of P (K + lam I)), combined pairwise, then least squares from the 20 best
    cells (a step fitted on one prompt may diverge on the other, which makes the fit sharp)."""
    from scipy.optimize import least_squares

    n_steps = len(reported) - 1
    P = np.ones_like(y) if precond == "none" else 1.0 / K.sum(-1)
    optimal = []
    for b in range(2):
        mu = np.linalg.eigvals(P[b][:, None] * (K[b] + lam * np.eye(K.shape[-1]))).real
        optimal.append(2.0 / (mu.min() + mu.max()))

    def residual(log_steps):
        return np.log10(stationary_mse(K, K_query, y, exact, lam, np.exp(log_steps), n_steps, precond).mean(0)) - reported

    grid = np.geomspace(0.2, 5.0, 801)
    per_prompt = [stationary_mse(*(np.repeat(a[b:b + 1], len(grid), 0) for a in (K, K_query, y, exact)), lam, optimal[b] * grid,
                                 n_steps, precond) for b in range(2)]  # [grid, T + 1] each
    gaps = np.abs(np.log10((per_prompt[0][:, None] + per_prompt[1][None]) / 2) - reported).max(-1)  # [grid, grid]
    starts = zip(*np.unravel_index(np.argsort(gaps, axis=None)[:20], gaps.shape))
    return min(np.max(np.abs(least_squares(residual, np.log([optimal[0] * grid[i], optimal[1] * grid[j]])).fun)) for i, j in starts)


def test_richardson_profile_gd_and_rowsum_curves_are_my_own_iterations_at_fitted_steps(softmax_gp):
    """On 2 prompts (so each cross-fitting half is one prompt), each lens's GD and row-sum
    Richardson error profiles are NumPy's iterations on the Gaussian kernel with one step per
    prompt (two numbers fitted here to 13 profile points: residual ~0; CG's curve, the negative
    control, fits no two GD steps); Jacobi Richardson equals GD (diag(K + lam I) is constant on a
    Gaussian kernel)."""
    path, _, sampler = softmax_gp
    steps, seed = 12, 2
    result = richardson_profile(path, batch_size=2, train_batch_size=16, bootstrap=5, n_steps=steps, seed=seed)
    task = sampler.sample(2, 24, 8, seed=seed, dtype=torch.float32)
    xs, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    K = np.stack([gaussian_gram(a, a, sampler.bandwidth) for a in xs])
    K_query = np.stack([gaussian_gram(q, a, sampler.bandwidth) for q, a in zip(xq, xs)])
    lam = sampler.noise_std**2
    assert result.lam == pytest.approx(lam)
    exact = np.einsum("bqn,bn->bq", K_query, np.linalg.solve(K + lam * np.eye(K.shape[-1]), y[..., None])[..., 0])
    for lens in result.lenses.values():
        assert lens.scores["gd"] == pytest.approx(lens.scores["richardson_jacobi"], abs=1e-9)
        np.testing.assert_allclose(lens.algorithm_profiles["gd"], lens.algorithm_profiles["richardson_jacobi"], atol=1e-9)
        for name, precond in (("gd", "none"), ("richardson_rowsum", "rowsum")):
            worst = best_two_step_fit(np.array(lens.algorithm_profiles[name]), K, K_query, y, exact, lam, precond)
            assert worst < 1e-5, (lens.best, name, worst)
    assert best_two_step_fit(np.array(result.lenses["readout"].algorithm_profiles["cg"]), K, K_query, y, exact, lam, "none") > 1e-2


def test_richardson_profile_json_records_the_fitted_steps_behind_its_curves(profile):
    lens = profile[0].to_dict()["lenses"]["readout"]
    assert any("step" in key and key != "aligned_steps" for key in lens)


def test_richardson_profile_json_fitted_steps_rebuild_each_lens_gd_rowsum_and_heavy_ball_curves(profile):
    """From the JSON alone (each half's step, heavy ball's momentum, each prompt's half), my NumPy
    GD, row-sum Richardson and heavy ball on the Gaussian kernel, each prompt run with the step
    fitted on the other half, give every lens's error profile log10 mean (pred - KRR)^2."""
    result, task, sampler = profile
    document = json.loads(json.dumps(result.to_dict()))
    xs, xq, y = (t.double().numpy() for t in (task.x_support, task.x_query, task.y_support))
    K = np.stack([gaussian_gram(a, a, sampler.bandwidth) for a in xs])
    K_query = np.stack([gaussian_gram(q, a, sampler.bandwidth) for q, a in zip(xq, xs)])
    A = K + result.lam * np.eye(K.shape[-1])
    exact = np.einsum("bqn,bn->bq", K_query, np.linalg.solve(A, y[..., None])[..., 0])
    for lens in document["lenses"].values():
        fitted = lens["fitted_steps"]
        assert set(fitted) == {"gd", "richardson_jacobi", "richardson_rowsum", "heavy_ball"}
        for name, precond in (("gd", np.ones_like(y)), ("richardson_rowsum", 1.0 / K.sum(-1)), ("heavy_ball", np.ones_like(y))):
            fit = fitted[name]
            other = 1 - np.asarray(fit["folds"])
            assert np.bincount(fit["folds"], minlength=2).tolist() == fit["fold_sizes"] == [16, 16]
            step = np.asarray(fit["step"])[other][:, None] * precond
            momentum = np.asarray(fit["momentum"])[other][:, None] if name == "heavy_ball" else 0.0
            assert (fit["momentum"] is None) == (name != "heavy_ball")
            previous = alpha = np.zeros_like(y)
            mse = []
            for _ in range(result.n_steps + 1):
                mse.append(np.mean((np.einsum("bqn,bn->bq", K_query, alpha) - exact) ** 2))
                previous, alpha = alpha, alpha + step * (y - np.einsum("bij,bj->bi", A, alpha)) + momentum * (alpha - previous)
            np.testing.assert_allclose(lens["algorithm_profiles"][name], np.log10(mse), atol=1e-4)


def test_richardson_profile_figure_draws_each_lens_against_its_own_best_solver_curve(profile):
    result = profile[0]
    differing = [name for name in result.lenses["ridge"].algorithm_profiles
                 if not np.allclose(result.lenses["ridge"].algorithm_profiles[name], result.lenses["readout"].algorithm_profiles[name])]
    assert "heavy_ball" in differing  # precondition: the lenses' fitted-step curves do differ
    figure = result.plot()
    curves = [np.asarray(line.get_ydata(), dtype=float) for line in figure.axes[1].get_lines()]
    plt.close(figure)
    for lens in result.lenses.values():
        wanted = np.asarray(lens.algorithm_profiles[lens.best])
        assert any(c.shape == wanted.shape and np.allclose(c, wanted) for c in curves), lens.best


def test_richardson_profile_figure_axis_is_not_set_by_rounding_level_errors(profile):
    result = profile[0]
    figure = result.plot()
    bottom = figure.axes[1].get_ylim()[0]
    plt.close(figure)
    assert min(min(lens.model_profile) for lens in result.lenses.values()) > -3  # the model's layers sit high up
    assert bottom > -20


@pytest.mark.parametrize("kwargs, option", [({"train_batch_size": 0}, "train_batch_size"), ({"train_batch_size": 1}, "train_batch_size"),
                                            ({"batch_size": 1}, "batch_size")])
def test_richardson_profile_bad_sizes_get_one_line_errors_naming_its_own_option(softmax_gp, kwargs, option):
    setting = {"batch_size": 4, "train_batch_size": 8, "bootstrap": 5, "n_steps": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        richardson_profile(softmax_gp[0], **setting)
    message = str(error.value)
    assert option in message and "train_task" not in message and "step_sizes" not in message


# ---- command line -------------------------------------------------------------------------------


def test_reproduce_cg_rate_cli_seed_reaches_the_prompts_and_its_json_is_numpy_cg(tmp_path):
    """`mi-krr reproduce cg-rate --quick --seed 3`: the JSON's curves are NumPy CG's (lower median over
    4 prompts drawn at seed 3) and the bound's closed form; the key numbers agree with them."""
    out = tmp_path / "cg"
    command = [str(Path(sys.executable).with_name("mi-krr")), "reproduce", "cg-rate", "--quick", "--seed", "3", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "cg-rate.json").read_text())
    study = document["result"]["study"]
    n, lam, steps = study["n_support"], study["lam"], len(study["steps"]) - 1
    assert (n, steps) == (24, 12)
    for kappa in study["kappas"]:
        key = str(kappa)
        task = conditioned_linear_task(4, n, kappa, lam, n_query=16, seed=3)
        ratios = []
        for x, y in zip(task.x_support.numpy(), task.y_support.numpy()):
            A = x @ x.T + lam * np.eye(n)
            ratios.append(a_norm_ratios(A, numpy_cg_iterates(A, y, steps), np.linalg.solve(A, y)))
        model = lower_median(np.array(ratios))
        np.testing.assert_allclose(study["a_norm_ratio"][key], model, rtol=1e-6, atol=1e-13)
        np.testing.assert_allclose(study["bound"][key], cg_bound(kappa, np.arange(steps + 1)), rtol=1e-12)
        worst = np.max(model / cg_bound(kappa, np.arange(steps + 1)))
        assert document["key_numbers"][f"kappa={kappa:g}: max error / bound"] == pytest.approx(worst, rel=1e-6)
    seed0 = conditioned_linear_task(4, n, 10.0, lam, n_query=16, seed=0).y_support.numpy()
    assert not np.allclose(seed0, conditioned_linear_task(4, n, 10.0, lam, n_query=16, seed=3).y_support.numpy())
    assert "== cg-rate" in done.stdout and (out / "cg-rate.png").read_bytes().startswith(b"\x89PNG")
