"""What the CLI and construction tests share: reading `mi-krr construct`'s table, and the NumPy
CG and error references they are checked against."""

from __future__ import annotations

import re

import numpy as np


def parse_construct_table(text: str) -> np.ndarray:
    """Rows (step, |model - solver|, model vs KRR, solver vs KRR) of `construct`'s table."""
    rows = [line.split() for line in text.splitlines() if re.fullmatch(r"\s*\d+(\s+\S+){3}\s*", line)]
    return np.array(rows, dtype=np.float64)


def numpy_cg_iterates(A: np.ndarray, y: np.ndarray, n_steps: int) -> np.ndarray:
    """Textbook CG on A alpha = y from alpha_0 = 0: iterates alpha_0..alpha_T `[T+1, n]`."""
    alpha, r = np.zeros_like(y), y.copy()
    p, iterates = r.copy(), [alpha]
    for _ in range(n_steps):
        a = (r @ r) / (p @ A @ p)
        alpha = alpha + a * p
        r_next = r - a * (A @ p)
        p = r_next + (r_next @ r_next) / (r @ r) * p
        r = r_next
        iterates.append(alpha)
    return np.stack(iterates)


def numpy_cg_predictions(K, y, lam, K_query, n_steps):
    """Plain CG on (K + lam I) alpha = y from alpha = 0: predictions K_query alpha_t, t = 0..T
    `[T + 1, m]` (a step with r = 0 leaves alpha as it is: CG has terminated)."""
    A = K + lam * np.eye(len(y))
    alpha, r = np.zeros_like(y), y.copy()
    p = r.copy()
    preds = [K_query @ alpha]
    for _ in range(n_steps):
        if r @ r > 0:
            Ap = A @ p
            step = (r @ r) / (p @ Ap)
            alpha = alpha + step * p
            r_new = r - step * Ap
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
        preds.append(K_query @ alpha)
    return np.array(preds)


def numpy_cg_a_norm_ratios(K, y, lam, n_steps):
    """||alpha_t - alpha*||_A / ||alpha*||_A for plain CG on (K + lam I) alpha = y from 0, t = 0..T."""
    A = K + lam * np.eye(len(y))
    solution = np.linalg.solve(A, y)
    alpha, r = np.zeros_like(y), y.copy()
    p = r.copy()
    ratios = []
    for t in range(n_steps + 1):
        error = alpha - solution
        ratios.append(np.sqrt(max(error @ A @ error, 0.0) / (solution @ A @ solution)))
        if t == n_steps:
            break
        Ap = A @ p
        step = (r @ r) / (p @ Ap)
        alpha, r_new = alpha + step * p, r - step * Ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return np.array(ratios)


def gaussian_kernel(a, b, bandwidth):
    """exp(-|a_i - b_j|^2 / (2 bandwidth^2)) for points a `[p, d]`, b `[q, d]` -> `[p, q]`."""
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth**2))


def numpy_rowsum_richardson_errors(x, xq, y, lam, bandwidth, step, n_steps):
    """Row-sum Richardson alpha += step D^-1 (y - (K + lam I) alpha) from 0, D = diag(K 1), on the
    Gaussian kernel of x `[B, n, d]` (queries xq `[B, m, d]`, labels y `[B, n]`): per step the
    relative error of its predictions to KRR (`relative_errors_to_krr`) `[T+1]`."""
    preds, exact = [], []
    for b in range(len(x)):
        K, K_query = gaussian_kernel(x[b], x[b], bandwidth), gaussian_kernel(xq[b], x[b], bandwidth)
        A, D = K + lam * np.eye(len(K)), K.sum(1)
        alpha, trajectory = np.zeros(len(K)), [np.zeros(len(K_query))]
        for _ in range(n_steps):
            alpha = alpha + step * (y[b] - A @ alpha) / D
            trajectory.append(K_query @ alpha)
        preds.append(trajectory)
        exact.append(K_query @ np.linalg.solve(A, y[b]))
    return relative_errors_to_krr(np.array(preds), np.array(exact))


def relative_errors_to_krr(preds, exact):
    """Per step ||pred_t - KRR|| / ||KRR|| pooled over prompts and queries; preds [B, T+1, m]."""
    return np.sqrt(((preds - exact[:, None]) ** 2).sum(axis=(0, 2))) / np.sqrt((exact**2).sum())


def feature_cg_errors_to_krr(phi, kernel, x, xq, y, lam, n_steps):
    """`relative_errors_to_krr` of NumPy CG on each prompt's feature kernel phi(x) phi(x)^T (query
    rows phi(xq) phi(x)^T) against exact KRR on `kernel(a, b)`: x `[B, n, d]`, xq `[B, m, d]`,
    y `[B, n]` -> `[T + 1]`."""
    preds, exact = [], []
    for b in range(len(x)):
        features, features_q = phi(x[b]), phi(xq[b])
        preds.append(numpy_cg_predictions(features @ features.T, y[b], lam, features_q @ features.T, n_steps))
        exact.append(kernel(xq[b], x[b]) @ np.linalg.solve(kernel(x[b], x[b]) + lam * np.eye(len(y[b])), y[b]))
    return relative_errors_to_krr(np.array(preds), np.array(exact))


def assert_construct_cg_feature_head_matches_numpy(capsys, kernel: str, scale: float, feature_map, exact_kernel) -> None:
    """`mi-krr construct cg --kernel K --head-width 16 --temperature|--bandwidth scale` (3 steps,
    lam 0.1, d 2, 3 prompts of 8 support and 3 query points, seed 5): the model matches its solver
    to 1e-10, and both error-to-KRR columns are NumPy CG on the head's positive random-feature kernel
    phi phi^T, phi(x) = feature_map(x, W) / sqrt(16) with W the features' weights, against exact KRR
    on `exact_kernel(a, b)`."""
    import torch

    from mi_krr.cli import main
    from mi_krr.feature_maps import PositiveRandomFeatures
    from mi_krr.tasks import GPRegressionSampler

    steps, lam, dim, n, m, batch, seed, width = 3, 0.1, 2, 8, 3, 3, 5, 16
    scale_option = {"exp": "temperature", "gaussian": "bandwidth"}[kernel]
    assert main(["construct", "cg", "--kernel", kernel, "--head-width", str(width), f"--{scale_option}", str(scale), "--steps", str(steps),
                 "--lam", str(lam), "--dim", str(dim), "--n-support", str(n), "--n-query", str(m), "--batch", str(batch),
                 "--seed", str(seed)]) == 0
    table = parse_construct_table(capsys.readouterr().out)
    assert table[:, 1].max() < 1e-10
    task = GPRegressionSampler(dim, kernel=kernel, noise_std=0.1, **{scale_option: scale}).sample(batch, n, m, seed=seed, dtype=torch.float64)
    weights = PositiveRandomFeatures(dim, width, kind=kernel, seed=seed, **{scale_option: scale}).weights.numpy()
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    expected = feature_cg_errors_to_krr(lambda points: feature_map(points, weights) / np.sqrt(width), exact_kernel, x, xq, y, lam, steps)
    np.testing.assert_allclose(table[:, 3], expected, rtol=2e-3)
    np.testing.assert_allclose(table[:, 2], expected, rtol=2e-3)


def random_projection_width_errors(x, xq, y, lam, widths, n_steps, seed):
    """The width study's random-projection head by hand: for each width w, CG for `n_steps` on the
    head's kernel of features x W / sqrt(w) (W = `RandomProjection(d, w, seed).weights`), and KRR
    on the same features, each as relative error to oracle linear-kernel KRR, averaged over prompts
    (x `[B, n, d]`, xq `[B, m, d]`, y `[B, n]` NumPy). Returns (model errors, feature-KRR errors)
    `[len(widths)]` each."""
    from mi_krr.feature_maps import RandomProjection

    batch, n, dim = x.shape
    model_error, krr_error = [], []
    for w in widths:
        W = RandomProjection(dim, w, seed=seed).weights.numpy()
        per_model, per_krr = [], []
        for b in range(batch):
            oracle = xq[b] @ x[b].T @ np.linalg.solve(x[b] @ x[b].T + lam * np.eye(n), y[b])
            phi, phi_q = x[b] @ W / np.sqrt(w), xq[b] @ W / np.sqrt(w)
            K, K_query = phi @ phi.T, phi_q @ phi.T
            pred = numpy_cg_predictions(K, y[b], lam, K_query, n_steps)[-1]
            head_krr = K_query @ np.linalg.solve(K + lam * np.eye(n), y[b])
            per_model.append(np.linalg.norm(pred - oracle) / np.linalg.norm(oracle))
            per_krr.append(np.linalg.norm(head_krr - oracle) / np.linalg.norm(oracle))
        model_error.append(np.mean(per_model))
        krr_error.append(np.mean(per_krr))
    return np.array(model_error), np.array(krr_error)

