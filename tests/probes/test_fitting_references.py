"""The fitting machinery of `probes.step_sizes` and `probes.kernel_scale_fit` against independent
references: the cross-fitted solvers against NumPy loops, the grid + bracketed Brent search
against SciPy's bounded minimiser on a synthetic objective, chunked candidate scoring against
brute-force path R2, bounded Brent on plateaus and kinks against SciPy, and the kernel-scale
fit's grid, derivatives, Newton safeguards and uniform fallback against NumPy."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from scipy import optimize

from brute_force import path_r2
from kernel_references import numpy_mean_distance, numpy_row_softmax
from mi_krr.kernels import gaussian_kernel
from probes.attention_kernels import AttentionKernels
from probes.kernel_alignment import kernel_alignment
from probes.kernel_scale_fit import GRID_SPACING, fit_inverse_scale, log_similarity, row_normalised_kernel
from probes.bounded_brent import bounded_brent
from probes.spectral_trajectories import spectral_system
from probes.step_sizes import LOG_STEP_XTOL, MOMENTUM_GRID, REFINED_BRACKETS, STEP_GRID, FittedStep, cross_fit_folds, cross_fit_steps
from prompts import random_task

step_sizes = importlib.import_module("probes.step_sizes")
scale_fit = importlib.import_module("probes.kernel_scale_fit")

LAM = 0.05


def gaussian_prompts(batch: int, n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(batch, m, 2, generator=g, dtype=torch.float64)
    y = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return gaussian_kernel(x), y, gaussian_kernel(xq, x)


def numpy_iteration(K, y, K_query, n_steps: int, step: float, momentum: float = 0.0, diagonal=None) -> np.ndarray:
    """Query predictions `[T+1, m]` of alpha <- alpha + w P (y - A alpha) + beta (alpha - alpha_prev), one prompt."""
    A = K + LAM * np.eye(len(K))
    P = np.ones(len(K)) if diagonal is None else diagonal
    alpha = previous = np.zeros(len(K))
    rows = [np.zeros(len(K_query))]
    for _ in range(n_steps):
        alpha, previous = alpha + step * P * (y - A @ alpha) + momentum * (alpha - previous), alpha
        rows.append(K_query @ alpha)
    return np.stack(rows)


# ---------------------------------------------------------------- probes.step_sizes


@pytest.mark.parametrize("algorithm", ["heavy_ball", "richardson_rowsum"])
def test_cross_fitted_solver_runs_each_prompt_with_the_other_halfs_step_and_momentum(algorithm):
    batch, n, m, T = 6, 5, 2, 5
    K, y, K_query = gaussian_prompts(batch, n, m, seed=1)
    folds = np.array([0, 1, 1, 0, 1, 0])
    heavy = algorithm == "heavy_ball"
    fit = FittedStep(algorithm=algorithm, folds=folds, step=np.array([0.05, 0.11]),
                     momentum=np.array([0.3, 0.6]) if heavy else None, fit_score=np.zeros(2))
    pred = fit.solver()(K, y, LAM, T, K_query=K_query).pred.numpy()
    for b in range(batch):
        Kb = K[b].numpy()
        other = 1 - folds[b]
        expected = numpy_iteration(Kb, y[b].numpy(), K_query[b].numpy(), T, fit.step[other],
                                   momentum=fit.momentum[other] if heavy else 0.0,
                                   diagonal=None if heavy else 1.0 / Kb.sum(1))
        np.testing.assert_allclose(pred[b], expected, rtol=1e-10, atol=1e-12)


def test_fit_is_the_best_of_the_grid_and_scipys_bounded_searches_in_the_best_cells_brackets(monkeypatch):
    """A synthetic path R2 in log step (and momentum) replaces the model's: a broad peak between
    grid points and a spike ON a grid point far from it. Reference: each half's grid (STEP_GRID x
    the NumPy median of its prompts' optimal steps; halves of 7 prompts, an unambiguous median),
    SciPy's bounded minimiser in the brackets of the REFINED_BRACKETS best cells, the best of all
    of those. Half 0's peak beats its spike only through a cell that is not the best; half 1's spike
    (the best cell) beats what Brent finds in its bracket."""
    batch, n, m, seed = 14, 6, 2, 3
    K, y, K_query = gaussian_prompts(batch, n, m, seed=0)
    folds = cross_fit_folds(batch, seed)
    mu = np.linalg.eigvalsh(K.numpy() + LAM * np.eye(n))
    optimal = {"gd": 2 / (mu[:, 0] + mu[:, -1]), "heavy_ball": 4 / (np.sqrt(mu[:, -1]) + np.sqrt(mu[:, 0])) ** 2}
    names = list(optimal)
    grids = {name: [np.log(np.median(optimal[name][folds == f]) * STEP_GRID) for f in (0, 1)] for name in names}
    spacing = np.log(STEP_GRID[1] / STEP_GRID[0])

    def objective(a, f, u, beta):
        grid = grids[names[a]][f]
        weight = 1.0 if np.isnan(beta) else np.exp(-((beta - 0.66) ** 2))
        peak = 1.3 * np.exp(-(((u - grid[12] - 0.3 * spacing) / 0.3) ** 2))
        spike = (1.2 if f == 0 else 1.5) * np.exp(-(((u - grid[5]) / 1e-4) ** 2))
        return weight * (peak + spike)

    def synthetic_scores(systems, folds, n_steps, layer_pred, scored):
        return lambda system, fold, log_step, momentum: np.array(
            [objective(a, f, u, beta) for a, f, u, beta in zip(system, fold, log_step, momentum)]
        )

    monkeypatch.setattr(step_sizes, "_candidate_scores", synthetic_scores)
    shared = spectral_system("gd", K, y, LAM, K_query)
    fits = cross_fit_steps({"gd": shared, "heavy_ball": shared}, 4, np.zeros((batch, 2, m)), np.arange(1, 2), seed)
    for a, name in enumerate(names):
        rows = MOMENTUM_GRID if name == "heavy_ball" else [np.nan]
        for f in (0, 1):
            grid = grids[name][f]
            cells = [(objective(a, f, u, beta), r, c) for r, beta in enumerate(rows) for c, u in enumerate(grid)]
            candidates = []
            for value, r, c in sorted(cells, key=lambda cell: -cell[0])[:REFINED_BRACKETS]:
                bounds = (grid[max(c - 1, 0)], grid[min(c + 1, len(grid) - 1)])
                res = optimize.minimize_scalar(lambda u: -objective(a, f, u, rows[r]), bounds=bounds, method="bounded",
                                               options={"xatol": LOG_STEP_XTOL})
                candidates += [(value, grid[c], rows[r]), (-res.fun, res.x, rows[r])]
            score, log_step, beta = max(candidates, key=lambda candidate: candidate[0])
            assert fits[name].step[f] == pytest.approx(np.exp(log_step), rel=1e-12), (name, f)
            assert fits[name].fit_score[f] == pytest.approx(score, rel=1e-12), (name, f)
            if name == "heavy_ball":
                assert fits[name].momentum[f] == beta
        assert fits[name].step[1] == pytest.approx(np.exp(grids[name][1][5]), rel=1e-12)  # the spike, a grid point


def test_first_step_seeds_are_each_layers_least_squares_first_step():
    """first_step_seeds: per half and layer, argmin_w sum over the half's prompts and queries of
    (layer - pred_1(w))^2, where pred_1(w) is a NumPy Richardson (row-sum P) / heavy-ball first
    step (linear in w: found from pred_1(1)); layers built from a known first step come back exactly."""
    from probes.step_sizes import first_step_seeds

    batch, n, m = 8, 5, 3
    K, y, K_query = gaussian_prompts(batch, n, m, seed=6)
    folds = cross_fit_folds(batch, seed=2)
    members = [torch.as_tensor(np.flatnonzero(folds == f)) for f in (0, 1)]
    rng = np.random.default_rng(6)
    for algorithm, diagonal in (("richardson_rowsum", lambda Kb: 1.0 / Kb.sum(1)), ("heavy_ball", lambda Kb: None)):
        unit = np.stack([numpy_iteration(K[b].numpy(), y[b].numpy(), K_query[b].numpy(), 1, 1.0,
                                         diagonal=diagonal(K[b].numpy()))[1] for b in range(batch)])  # pred_1(w=1) [B, m]
        layers = np.stack([0.3 * unit, 0.7 * unit + 0.1 * rng.normal(size=unit.shape), rng.normal(size=unit.shape)], axis=1)
        seeds = first_step_seeds(spectral_system(algorithm, K, y, LAM, K_query), members, layers)
        for f, index in enumerate(members):
            g, h = unit[index.numpy()].ravel(), layers[index.numpy()]
            expected = [np.linalg.lstsq(g[:, None], h[:, layer].ravel(), rcond=None)[0][0] for layer in range(3)]
            np.testing.assert_allclose(seeds[f], expected, rtol=1e-10)
            assert seeds[f][0] == pytest.approx(0.3, rel=1e-12)


def test_candidate_scores_split_into_many_small_batches_equal_brute_force_path_r2(monkeypatch):
    """GRID_CHUNK_VALUES forcing 3 candidates per batch: candidates of three systems (gd and heavy
    ball sharing one eigensystem) on both halves, 2 + 2, 1 + 1 (sharing gd's batch) and 4 + 3 (two
    batches) per system and half, each scored as the path R2 of a NumPy trajectory on its half's
    prompts (brute-force alignment)."""
    from probes.step_sizes import _candidate_scores

    batch, n, m, T = 10, 6, 3, 4
    K, y, K_query = gaussian_prompts(batch, n, m, seed=4)
    monkeypatch.setattr(step_sizes, "GRID_CHUNK_VALUES", 3 * batch * (T + 1) * n)  # chunk = 3 candidates
    rng = np.random.default_rng(4)
    layers = np.stack([numpy_iteration(K[b].numpy(), y[b].numpy(), K_query[b].numpy(), T, 0.2)[::2] for b in range(batch)])
    layers = layers + 0.05 * rng.normal(size=layers.shape)  # [B, 3, m]
    scored = np.arange(1, 3)
    folds = cross_fit_folds(batch, seed=5)
    gd = spectral_system("gd", K, y, LAM, K_query)
    systems = [gd, spectral_system("richardson_rowsum", K, y, LAM, K_query), gd]
    system = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    fold = np.array([0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    steps = np.linspace(0.05, 0.5, len(system))
    momentum = np.where(system == 2, np.linspace(0.1, 0.8, len(system)), np.nan)
    got = _candidate_scores(systems, folds, T, layers, scored)(system, fold, np.log(steps), momentum)
    for s, f, step, beta, value in zip(system, fold, steps, momentum, got):
        members = np.flatnonzero(folds == f)
        trajectories = []
        for b in members:
            Kb = K[b].numpy()
            trajectories.append(numpy_iteration(Kb, y[b].numpy(), K_query[b].numpy(), T, step,
                                                momentum=0.0 if np.isnan(beta) else beta,
                                                diagonal=1.0 / Kb.sum(1) if s == 1 else None))
        expected = path_r2(layers[members], np.array(trajectories)[None], scored)[0]
        assert value == pytest.approx(expected, rel=1e-10), (s, f, step)


BRENT_EDGE_CASES = [  # (function, bounds, xatol): a parabola flat on one side (parabolic steps of exactly 0), a kink
    (lambda x: (x + 0.375) ** 2 * (x > -0.375), (-1.0, 2.0), 1e-3),
    (lambda x: abs(x + 1.0), (-2.0, 2.0), 1e-6),
]


@pytest.mark.parametrize("function, bounds, xatol", BRENT_EDGE_CASES)
def test_bounded_brent_takes_scipys_steps_on_plateaus_and_kinks(function, bounds, xatol):
    seen, expected_seen = [], []

    def loss(index, x):
        seen.extend(float(point) for point in x)
        return np.array([function(point) for point in x], dtype=np.float64)

    x, fun = bounded_brent(loss, np.array([bounds[0]]), np.array([bounds[1]]), xatol)
    expected = optimize.minimize_scalar(lambda point: expected_seen.append(float(point)) or function(point), bounds=bounds,
                                        method="bounded", options={"xatol": xatol})
    assert seen == expected_seen and x[0] == expected.x and fun[0] == expected.fun


# ---------------------------------------------------------------- probes.kernel_scale_fit


def noisy_heads(seed: int, per_head_keys: bool, batch: int = 5, n: int = 6):
    """2 x 2 heads of noisy row-normalised Gaussian kernels over causal keys (per head: some dropped)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    similarity = log_similarity("gaussian", x, x)[:, None, None]
    keys = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(batch, 2, 2, n, n)
    if per_head_keys:
        keys = keys & (torch.rand(batch, 2, 2, n, n, generator=g) > 0.3)
    betas = torch.tensor([[0.7, 1.6], [3.0, 0.25]], dtype=torch.float64)[:, :, None, None]
    noise = 0.4 * torch.randn(batch, 2, 2, n, n, generator=g, dtype=torch.float64)
    return row_normalised_kernel(betas * similarity + noise, keys), similarity, keys


def test_grid_losses_across_prompt_chunks_equal_numpy_distances_at_every_grid_point(monkeypatch):
    """Ten grid points (three squaring generations past the first GRID_CHAINS), chunks of one prompt."""
    from probes.kernel_scale_fit import _grid_losses

    attn, similarity, keys = noisy_heads(7, per_head_keys=False)
    monkeypatch.setattr(scale_fit, "CHUNK_VALUES", 1)
    points = GRID_SPACING * torch.arange(-4, 6, dtype=torch.float64)
    losses = _grid_losses(attn.flatten(1, 2), similarity[:, 0, 0], keys[:, 0, 0], points)  # [4 heads, 10]
    a, s, k = attn.flatten(1, 2).numpy(), similarity[:, 0, 0].numpy(), keys[:, 0, 0].numpy()
    expected = [[numpy_mean_distance(float(u), a[:, h], s, k) for u in points] for h in range(4)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("per_head_keys", [False, True])
def test_grid_start_is_the_parabola_vertex_at_the_best_grid_point_inside_each_heads_range(monkeypatch, per_head_keys):
    """Per head a different range [low, high]; the best in-range grid point (a multiple of
    GRID_SPACING) and the vertex of the parabola through it and its neighbours, from NumPy
    distances. Head (0, 0)'s range excludes its unconstrained best point."""
    from probes.kernel_scale_fit import _grid_minimum

    attn, similarity, keys = noisy_heads(8, per_head_keys)
    monkeypatch.setattr(scale_fit, "CHUNK_VALUES", 1)
    a, s, k = attn.numpy(), similarity.expand_as(attn).numpy(), keys.numpy()
    grid = GRID_SPACING * np.arange(-40, 41)
    distances = np.array([[[numpy_mean_distance(u, a[:, i, j], s[:, i, j], k[:, i, j]) for u in grid] for j in range(2)] for i in range(2)])
    low = np.array([[grid[np.argmin(distances[0, 0])] + 2.5 * GRID_SPACING, -3.1], [-2.0, -0.7]])
    high = low + np.array([[2.3, 4.0], [3.3, 5.2]])
    start = _grid_minimum(attn, similarity, keys, torch.as_tensor(low), torch.as_tensor(high)).numpy()
    for i in range(2):
        for j in range(2):
            inside = np.flatnonzero((grid >= low[i, j]) & (grid <= high[i, j]))
            best = inside[np.argmin(distances[i, j, inside])]
            if best - 1 in inside and best + 1 in inside:
                below, here, above = distances[i, j, best - 1 : best + 2]
                expected = grid[best] + 0.5 * GRID_SPACING * (below - above) / (below - 2 * here + above)
            else:
                expected = grid[best]
            assert start[i, j] == pytest.approx(np.clip(expected, low[i, j], high[i, j]), rel=1e-8, abs=1e-9), (i, j)
    assert start[0, 0] == pytest.approx(low[0, 0], abs=GRID_SPACING)  # pinned near the range's lower end


@pytest.mark.parametrize("per_head_keys", [False, True])
def test_distance_derivatives_in_log_beta_match_central_differences_of_numpy_distance(monkeypatch, per_head_keys):
    from probes.kernel_scale_fit import _distance_in_log_scale, head_invariant

    attn, similarity, keys = noisy_heads(9, per_head_keys)
    monkeypatch.setattr(scale_fit, "CHUNK_VALUES", 1)  # one prompt per chunk: the sums pool every chunk
    distance = _distance_in_log_scale(attn, head_invariant(similarity.expand_as(attn)), head_invariant(keys))
    log_beta = torch.tensor([[-0.5, 0.3], [1.1, -1.4]], dtype=torch.float64)
    value, slope, curve = (term.numpy() for term in distance(log_beta))
    a, s, k = attn.numpy(), similarity.expand_as(attn).numpy(), keys.numpy()
    h = 1e-4
    for i in range(2):
        for j in range(2):
            loss = lambda u: numpy_mean_distance(u, a[:, i, j], s[:, i, j], k[:, i, j])  # noqa: E731
            u = float(log_beta[i, j])
            assert value[i, j] == pytest.approx(loss(u), rel=1e-12)
            assert slope[i, j] == pytest.approx((loss(u + h) - loss(u - h)) / (2 * h), rel=1e-6)
            assert curve[i, j] == pytest.approx((loss(u + h) - 2 * loss(u) + loss(u - h)) / h**2, rel=1e-5)


def test_fits_pool_every_chunk_of_prompts(monkeypatch):
    """Chunks of one prompt: log_lstsq is NumPy's least squares of row-centred logs over all
    prompts, and the distance fit is the minimiser of NumPy's distance over all prompts (dense scan
    plus a stationary point)."""
    attn, similarity, keys = noisy_heads(10, per_head_keys=True)
    monkeypatch.setattr(scale_fit, "CHUNK_VALUES", 1)
    a, s, k = attn.numpy(), similarity.expand_as(attn).numpy(), keys.numpy()
    log_lstsq = fit_inverse_scale(attn, similarity, keys, fit="log_lstsq").numpy()
    fitted = fit_inverse_scale(attn, similarity, keys).log().numpy()
    for i in range(2):
        for j in range(2):
            logs, sims = [], []
            for row_attn, row_sim, row_keys in zip(*(value[:, i, j].reshape(-1, value.shape[-1]) for value in (a, s, k))):
                if row_keys.any():
                    logs.append(np.log(row_attn[row_keys]) - np.log(row_attn[row_keys]).mean())
                    sims.append(row_sim[row_keys] - row_sim[row_keys].mean())
            logs, sims = np.concatenate(logs), np.concatenate(sims)
            assert log_lstsq[i, j] == pytest.approx(logs @ sims / (sims @ sims), rel=1e-12)
            loss = lambda u: numpy_mean_distance(u, a[:, i, j], s[:, i, j], k[:, i, j])  # noqa: E731
            u, h = fitted[i, j], 1e-3
            assert loss(u) <= min(loss(v) for v in np.linspace(u - 5.0, u + 5.0, 1001)) + 1e-15
            slope, curvature = (loss(u + h) - loss(u - h)) / (2 * h), (loss(u + h) - 2 * loss(u) + loss(u - h)) / h**2
            assert abs(slope / curvature) < 1e-6  # a stationary point: the Newton step left is below 1e-6


@pytest.mark.parametrize(
    "scale_exponent, weights, log_lstsq_beta",
    [
        (9.0, [0.05, 0.05, 1e-200, 0.9], lambda beta: beta < 0),  # ~1e-200 on a similar key: logs slope the wrong way
        (0.0, [1e-200, 0.3, 0.3, 0.4], lambda beta: beta > 100),  # ~1e-200 on the least similar key: logs slope ~e^5 too steeply
    ],
)
def test_distance_fit_finds_the_minimum_where_log_lstsq_is_far_off(scale_exponent, weights, log_lstsq_beta):
    """Rows of 4 keys with similarities ~(0, 1, 2, 3) e^scale and one weight ~1e-200, which rules
    the logs but not the squared distance: log_lstsq's beta is anti-aligned (the minimiser ~e^-8
    lies ~e^9 from beta = the similarity's spread) or ~e^6 above the minimiser. The distance fit
    is the minimiser of a dense NumPy scan either way."""
    g = torch.Generator().manual_seed(11)
    base = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) * math.exp(scale_exponent)
    similarity = base + 0.3 * math.exp(scale_exponent) * torch.rand(6, 1, 1, 3, 4, generator=g, dtype=torch.float64)
    attn = torch.tensor(weights, dtype=torch.float64) * (1 + 0.2 * torch.rand(6, 1, 1, 3, 4, generator=g, dtype=torch.float64))
    attn = attn / attn.sum(-1, keepdim=True)
    keys = torch.ones_like(attn, dtype=torch.bool)
    a, s, k = attn[:, 0, 0].numpy(), similarity[:, 0, 0].numpy(), keys[:, 0, 0].numpy()
    centred_logs, centred_sims = np.log(a) - np.log(a).mean(-1, keepdims=True), s - s.mean(-1, keepdims=True)
    assert log_lstsq_beta((centred_logs * centred_sims).sum() / (centred_sims**2).sum())
    scan = np.linspace(-25.0, 10.0, 7001)
    losses = [numpy_mean_distance(u, a, s, k) for u in scan]
    assert min(losses) < numpy_mean_distance(-60.0, a, s, k) / 2  # far closer than uniform
    fitted = float(fit_inverse_scale(attn, similarity, keys).log()[0, 0])
    assert fitted == pytest.approx(scan[np.argmin(losses)], abs=2 * (scan[1] - scan[0]))
    assert numpy_mean_distance(fitted, a, s, k) <= min(losses) + 1e-15


def test_newton_steps_bracketed_by_the_slopes_sign_converge_where_plain_newton_overshoots():
    """f' = atan(30 u): Newton from |30 u| > 1.39 overshoots further each step; the bracket that
    each slope's sign shrinks (midpoints once an end is evaluated) still reaches u = 0."""
    from probes.kernel_scale_fit import _newton_minimum

    s = 30.0

    def distance(u):
        v = s * u
        return v * torch.atan(v) / s - 0.5 * torch.log1p(v * v) / s, torch.atan(v), s / (1 + v * v)

    start = torch.tensor([[0.05, -0.05, 0.06, -0.06, 0.2, -0.2]], dtype=torch.float64)
    point, value = _newton_minimum(distance, start, torch.full_like(start, -1.0), torch.full_like(start, 1.0))
    np.testing.assert_allclose(point.numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(value.numpy(), 0.0, atol=1e-9)


def test_newton_steps_of_at_most_one_grid_spacing_stay_in_the_starts_basin():
    """-exp(-u^2 / 2) with a deeper narrow well 10 spacings left of the start, where the
    nearly flat curvature at u = 0.95 aims a Newton step (~-10): the fit descends to the start's
    local minimum u = 0 (SciPy's bounded minimiser on [-0.5, 0.5]), never jumping into the well."""
    from probes.kernel_scale_fit import _newton_minimum

    start, width = 0.95, 0.15
    centre = start - 10 * GRID_SPACING

    def distance(u):
        well, bump = 2 * torch.exp(-0.5 * ((u - centre) / width) ** 2), torch.exp(-0.5 * u * u)
        slope = u * bump + (u - centre) / width**2 * well
        curve = (1 - u * u) * bump + (1 - ((u - centre) / width) ** 2) / width**2 * well
        return -bump - well, slope, curve

    numpy_value = lambda u: -np.exp(-0.5 * u * u) - 2 * np.exp(-0.5 * ((u - centre) / width) ** 2)  # noqa: E731
    expected = optimize.minimize_scalar(numpy_value, bounds=(-0.5, 0.5), method="bounded", options={"xatol": 1e-10}).x
    begin = torch.tensor([[start]], dtype=torch.float64)
    point, _ = _newton_minimum(distance, begin, torch.full_like(begin, -3.0), torch.full_like(begin, 3.0))
    assert float(point[0, 0]) == pytest.approx(expected, abs=1e-8)


def test_uniform_attention_over_causal_keys_reports_infinite_temperature_and_bandwidth():
    """Support block, each row uniform over its causal keys (1..n of them): the uniform reference is
    exact, so beta = 0 and tau = sigma = inf (not NaN), whatever the similarity."""
    task = random_task(3, 6, 2, 3, seed=2)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.float64))
    pattern = (causal / causal.sum(-1, keepdim=True)).expand(3, 1, 2, 6, 6)
    result = kernel_alignment(None, task, block="support", attention=AttentionKernels(support=pattern, query=None, source="pattern"))
    assert torch.isinf(result.tau).all() and torch.isinf(result.bandwidth).all()


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_log_lstsq_fits_beta_zero_to_rows_uniform_over_their_causal_keys_whatever_the_similarity_offset(offset):
    """Rows exactly uniform over their 1..n causal keys: every row-centred log weight is 0 up to
    rounding, so log_lstsq reports beta = 0 (tau = sigma = inf), not a slope fitted to rounding
    residue (it used to give |beta| ~ 1e-16, of either sign). Support points 1e6 from the origin
    make the exp similarity ~1e12 with a spread ~1e6: the residue a row's mean log weight would
    leave against it is what centring the logs removes."""
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + offset
    causal = torch.tril(torch.ones(6, 6, dtype=torch.float64))
    attn = (causal / causal.sum(-1, keepdim=True)).expand(3, 1, 2, 6, 6)
    keys = attn > 0
    for kernel in ("exp", "gaussian"):
        beta = fit_inverse_scale(attn, log_similarity(kernel, x, x)[:, None, None], keys, fit="log_lstsq")
        assert (beta == 0.0).all(), (kernel, beta)


def test_one_hot_rows_leave_log_lstsq_nothing_to_regress_but_the_distance_fit_reads_their_zeros():
    """Every query row one-hot on its most similar key (the other weights exactly 0): no row keeps
    two weights, so log_lstsq has no logs to regress (beta NaN, and kernel_alignment's scale and
    metrics NaN where the model's mask shows every key), while the distance fit, which reads the zeros, fits a beta > 0 at which a NumPy
    row softmax is one-hot to 1e-6 on every row."""
    task = random_task(4, 7, 3, 3, seed=8)
    similarity = log_similarity("exp", task.x_query.double(), task.x_support.double())  # [B, m, n]
    attn = torch.nn.functional.one_hot(similarity.argmax(-1), 7).double()[:, None, None]
    keys = torch.ones_like(attn, dtype=torch.bool)
    assert math.isnan(float(fit_inverse_scale(attn, similarity[:, None, None], keys, fit="log_lstsq")[0, 0]))
    beta = float(fit_inverse_scale(attn, similarity[:, None, None], keys)[0, 0])
    assert 0 < beta < math.inf
    s = similarity.numpy()
    np.testing.assert_allclose(numpy_row_softmax(beta * s, np.ones_like(s, dtype=bool)), attn[:, 0, 0].numpy(), atol=1e-6)
    attention = AttentionKernels(support=None, query=attn, source="pattern", query_allowed=torch.ones(3, 7, dtype=torch.bool))
    result = kernel_alignment(None, task, kernels="exp", fit="log_lstsq", attention=attention)  # every key visible, as masked
    assert math.isnan(float(result.tau)) and all(math.isnan(float(value)) for value in result.metrics["exp"].values())


def test_a_similarity_constant_over_each_rows_keys_fits_beta_zero():
    """Identical support points: every beta gives the uniform rows, exactly as close as beta = 0,
    which the fit then returns (beta = 0 "if that is at least as close")."""
    x = torch.randn(4, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).expand(4, 8, 3)
    rows = torch.randn(4, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    attn = torch.full((4, 1, 2, 5, 8), 0.125, dtype=torch.float64)  # uniform over 8 keys, exactly
    keys = torch.ones_like(attn, dtype=torch.bool)
    for kernel in ("exp", "gaussian"):
        similarity = log_similarity(kernel, rows, x)[:, None, None]
        assert (fit_inverse_scale(attn, similarity, keys) == 0.0).all()


@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
@pytest.mark.parametrize("case", ["identical support points", "queries at 0"])
def test_a_reference_uniform_at_every_scale_fits_beta_zero_whatever_the_attention(case, fit):
    """256 features, 40 keys: identical support points (the support block, causal keys) or queries
    at the origin (exp kernel, x . x' = 0) make exp(beta * S) uniform over each row's keys for
    every beta (S constant over them), so no beta beats beta = 0 against any attention, here
    random rows: beta = 0 for every head (tau = sigma = inf), not an end of the search range. The
    Gaussian's squared distances between identical points are exactly 0 (NumPy's (x - x')^2
    summed), where the expansion |x|^2 + |x'|^2 - 2 x . x' leaves residue of ~1e-13 that differs
    between pairs at this size (read as spread, it made log_lstsq's beta ~ -1e13)."""
    g = torch.Generator().manual_seed(11)
    batch, n, width = 4, 40, 256
    point = torch.randn(batch, 1, width, generator=g, dtype=torch.float64)
    if case == "identical support points":
        rows = support = point.expand(batch, n, width)
        kernels = ("exp", "gaussian")
        keys = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(batch, 2, 2, n, n)
    else:
        rows = torch.zeros(batch, 3, width, dtype=torch.float64)
        support = point + torch.randn(batch, n, width, generator=g, dtype=torch.float64)
        kernels = ("exp",)
        keys = torch.ones(batch, 2, 2, 3, n, dtype=torch.bool)
    attn = row_normalised_kernel(torch.randn(keys.shape, generator=g, dtype=torch.float64), keys)
    for kernel in kernels:
        similarity = log_similarity(kernel, rows, support)
        if kernel == "gaussian":
            squared_distances = ((rows.numpy()[:, :, None] - support.numpy()[:, None]) ** 2).sum(-1)
            np.testing.assert_array_equal(-2 * similarity.numpy(), squared_distances)
        beta = fit_inverse_scale(attn, similarity[:, None, None], keys, fit=fit)
        assert (beta == 0.0).all(), (kernel, beta)


@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
def test_a_head_whose_similarity_is_constant_fits_zero_beside_heads_that_recover_their_kernels(fit):
    """Per-head similarities: head (0, 0) sees identical points (a constant similarity, uniform
    reference at every beta), the others an exact row-normalised Gaussian kernel at their beta
    under causal keys: the fit gives 0 for the first and each known beta for the others."""
    g = torch.Generator().manual_seed(12)
    batch, n = 5, 6
    x = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    similarity = log_similarity("gaussian", x, x)[:, None, None].repeat(1, 2, 2, 1, 1)
    similarity[:, 0, 0] = log_similarity("gaussian", x[:, :1].expand(batch, n, 3), x[:, :1].expand(batch, n, 3))
    keys = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(batch, 2, 2, n, n)
    betas = torch.tensor([[0.3, 0.8], [2.0, 5.0]], dtype=torch.float64)
    attn = row_normalised_kernel(betas[:, :, None, None] * log_similarity("gaussian", x, x)[:, None, None], keys)
    attn[:, 0, 0] = row_normalised_kernel(torch.randn(batch, n, n, generator=g, dtype=torch.float64), keys[:, 0, 0])
    fitted = fit_inverse_scale(attn, similarity, keys, fit=fit)
    assert float(fitted[0, 0]) == 0.0
    torch.testing.assert_close(fitted.flatten()[1:], betas.flatten()[1:], rtol=1e-6, atol=0)
