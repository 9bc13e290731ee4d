"""Kernel alignment: metrics against NumPy/SciPy (ties, near-ties, masks, per prompt across
chunks), the distance fit against a dense NumPy scan of its objective, fitted temperature and
bandwidth recovered exactly where attention is a row-normalised kernel, end to end on a
transformer built to attend with exp(x . x' / tau)."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from kernel_references import numpy_mean_distance, numpy_row_softmax
from mi_krr.construct import richardson_transformer
from mi_krr.kernels import exp_kernel, gaussian_kernel
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from probes import alignment_metrics, kernel_alignment
from probes.attention_kernels import AttentionKernels
from probes.kernel_scale_fit import fit_inverse_scale, log_similarity, row_normalised_kernel
from prompts import random_task

D, N, M = 3, 8, 5


def make_task(batch: int = 4, seed: int = 0) -> ICLTask:
    return random_task(batch, N, M, D, seed)


def centred_cka(a: np.ndarray, b: np.ndarray) -> float:
    h_rows = np.eye(a.shape[0]) - 1.0 / a.shape[0]
    h_cols = np.eye(a.shape[1]) - 1.0 / a.shape[1]
    ac, bc = h_rows @ a @ h_cols, h_rows @ b @ h_cols
    return float((ac * bc).sum() / (np.linalg.norm(ac) * np.linalg.norm(bc)))


def numpy_metrics(a: np.ndarray, r: np.ndarray, k: np.ndarray) -> dict[str, float]:
    """The four alignment metrics of one head's row-normalised attention a against the reference r
    `[rows, keys]` over the visible keys k, by NumPy / SciPy."""
    rows = [stats.spearmanr(a[i][k[i]], r[i][k[i]]).statistic for i in range(len(a)) if k[i].sum() > 1]
    return {
        "operator_distance": np.linalg.norm(a - r, ord=2) / np.linalg.norm(r, ord=2),
        "cka": centred_cka(a, r),
        "spearman": stats.spearmanr(a[k], r[k]).statistic,
        "row_spearman": np.mean(rows),
    }


@pytest.mark.parametrize("shape", [(6, 6), (4, 7)])
def test_alignment_metrics_match_numpy_and_scipy(shape):
    rng = np.random.default_rng(0)
    attn, ref = rng.random((2, 3, *shape)), rng.random((2, 3, *shape))
    attn[0, 0, 1, :3] = attn[0, 0, 1, 3]  # ties: average ranks as in scipy
    metrics = alignment_metrics(torch.as_tensor(attn), torch.as_tensor(ref))
    for i in range(2):
        for j in range(3):
            a, r = attn[i, j], ref[i, j]
            assert metrics["operator_distance"][i, j] == pytest.approx(np.linalg.norm(a - r, ord=2) / np.linalg.norm(r, ord=2), rel=1e-10)
            assert metrics["cka"][i, j] == pytest.approx(centred_cka(a, r), rel=1e-10)
            assert metrics["spearman"][i, j] == pytest.approx(stats.spearmanr(a.ravel(), r.ravel()).statistic, rel=1e-10)
            rows = [stats.spearmanr(a[k], r[k]).statistic for k in range(shape[0])]
            assert metrics["row_spearman"][i, j] == pytest.approx(np.mean(rows), rel=1e-10)


def test_masked_rank_correlations_use_only_masked_entries():
    rng = np.random.default_rng(1)
    attn, ref = rng.random((5, 5)), rng.random((5, 5))
    mask = np.tril(np.ones((5, 5), dtype=bool))
    metrics = alignment_metrics(attn, ref, mask=torch.as_tensor(mask))
    assert float(metrics["spearman"]) == pytest.approx(stats.spearmanr(attn[mask], ref[mask]).statistic, rel=1e-10)
    rows = [stats.spearmanr(attn[k, : k + 1], ref[k, : k + 1]).statistic for k in range(1, 5)]  # row 0: one entry
    assert float(metrics["row_spearman"]) == pytest.approx(np.mean(rows), rel=1e-10)


def test_row_normalised_references_follow_mi_krr_kernel_conventions():
    g = torch.Generator().manual_seed(2)
    rows, keys = torch.randn(4, D, generator=g, dtype=torch.float64), torch.randn(6, D, generator=g, dtype=torch.float64)
    visible = torch.ones(4, 6, dtype=torch.bool)
    tau, sigma = 1.7, 0.8
    for logits, kernel in [
        (log_similarity("exp", rows, keys) / tau, exp_kernel(rows, keys, temperature=tau)),
        (log_similarity("gaussian", rows, keys) / sigma**2, gaussian_kernel(rows, keys, bandwidth=sigma)),
    ]:
        expected = (kernel / kernel.sum(-1, keepdim=True)).numpy()
        np.testing.assert_allclose(row_normalised_kernel(logits, visible).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
@pytest.mark.parametrize("kernel, true_beta", [("exp", 1 / 0.6), ("gaussian", 1 / 1.3**2)])
def test_fitted_scale_recovers_a_known_kernel_under_a_causal_mask(fit, kernel, true_beta):
    """attn = row-normalised exp(beta * S) over the visible keys of a lower-triangular mask, for
    2 layers x 2 heads with different betas; the fit returns each beta."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, N, D, generator=g, dtype=torch.float64)
    similarity = log_similarity(kernel, x, x)[:, None, None]  # [B, 1, 1, n, n]
    betas = true_beta * torch.tensor([[1.0, 0.5], [2.0, 1.5]], dtype=torch.float64)
    keys = torch.tril(torch.ones(N, N, dtype=torch.bool)).expand(6, 2, 2, N, N)
    attn = row_normalised_kernel(betas[:, :, None, None] * similarity, keys)
    fitted = fit_inverse_scale(attn, similarity, keys, fit=fit)
    torch.testing.assert_close(fitted, betas, rtol=1e-6, atol=0)


def test_uniform_attention_fits_beta_zero_so_tau_is_infinite():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, N, D, generator=g, dtype=torch.float64)
    keys = torch.ones(3, 1, 1, M, N, dtype=torch.bool)
    uniform = torch.full((3, 1, 1, M, N), 1.0 / N, dtype=torch.float64)
    beta = fit_inverse_scale(uniform, log_similarity("exp", x[:, :M], x)[:, None, None], keys)
    assert float(beta[0, 0]) == 0.0


def exp_attention_transformer(tau: float) -> ICLTransformer:
    """One softmax layer, one head, no norm: read-in = identity on [x, y], W_Q = W_K = c * (identity
    on the x block), so scores = q . k / sqrt(d_head) = x . x' / tau."""
    cfg = ICLTransformerConfig(n_dims=D, d_model=D + 1, n_layers=1, n_heads=1, norm="none", mlp=False, dtype="float64")
    model = ICLTransformer(cfg).eval()
    c = math.sqrt(math.sqrt(cfg.d_head) / tau)
    x_block = torch.diag(torch.tensor([1.0] * D + [0.0], dtype=torch.float64))
    with torch.no_grad():
        model.read_in.weight.copy_(torch.eye(D + 1, dtype=torch.float64))
        model.read_in.bias.zero_()
        for weight, bias in ((model.blocks[0].attn.W_Q, model.blocks[0].attn.b_Q), (model.blocks[0].attn.W_K, model.blocks[0].attn.b_K)):
            weight.copy_(c * x_block[None])
            bias.zero_()
    return model


@pytest.mark.parametrize("block", ["query", "support"])
def test_kernel_alignment_recovers_tau_of_a_transformer_attending_with_the_exp_kernel(block):
    tau = 0.7
    result = kernel_alignment(exp_attention_transformer(tau), make_task(), kernels=("exp", "gaussian"), block=block)
    assert result.block == block
    assert float(result.tau[0, 0]) == pytest.approx(tau, rel=1e-6)
    exp_metrics = result.metrics["exp"]
    assert float(exp_metrics["operator_distance"][0, 0]) < 1e-6
    assert float(exp_metrics["cka"][0, 0]) == pytest.approx(1.0, abs=1e-9)
    assert float(exp_metrics["spearman"][0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert float(exp_metrics["row_spearman"][0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert result.per_prompt["exp"]["cka"].shape == (4, 1, 1)
    # the Gaussian kernel differs from exp(x.x'/tau) by the key norms |x'|^2: a real, measurable gap
    assert float(result.metrics["gaussian"]["operator_distance"][0, 0]) > 1e-2
    json.dumps(result.to_dict())


def test_richardson_construction_heads_recover_the_gaussian_bandwidth_they_were_built_with():
    """The softmax Richardson construction attends with D^-1 K of a Gaussian kernel in its kernel
    heads: those heads fit the built bandwidth with perfect alignment."""
    model = richardson_transformer(n_steps=1, lam=0.1, bandwidth=0.9, step=0.5, dim=D)
    result = kernel_alignment(model, make_task(), kernels=("gaussian",), block="support")
    aligned = result.metrics["gaussian"]["cka"] > 1 - 1e-9
    assert aligned.any()
    torch.testing.assert_close(result.bandwidth[aligned], torch.full_like(result.bandwidth[aligned], 0.9), rtol=1e-6, atol=0)
    assert (result.metrics["gaussian"]["operator_distance"][aligned] < 1e-8).all()


def test_kernel_alignment_on_a_given_representation():
    """The reference evaluated on 2x the inputs with tau' = 4 tau is the same kernel."""
    tau, task = 0.7, make_task()
    representation = (2 * task.x_support, 2 * task.x_query)
    result = kernel_alignment(exp_attention_transformer(tau), task, kernels=("exp",), representation=representation)
    assert float(result.tau[0, 0]) == pytest.approx(4 * tau, rel=1e-6)


def test_kernel_alignment_bad_arguments_raise():
    model, task = exp_attention_transformer(1.0), make_task()
    with pytest.raises(ValueError, match="kernels entry must be one of"):
        kernel_alignment(model, task, kernels=("laplace",))
    with pytest.raises(ValueError, match="at least one"):
        kernel_alignment(model, task, kernels=())
    with pytest.raises(ValueError, match="block must be one of"):
        kernel_alignment(model, task, block="keys")
    with pytest.raises(ValueError, match="representation"):
        kernel_alignment(model, task, representation=(task.x_support, task.x_support))
    torch.manual_seed(0)
    linear = ICLTransformer(ICLTransformerConfig(n_dims=D, d_model=8, n_layers=1, n_heads=2, attention="linear", dtype="float64"))
    with pytest.raises(ValueError, match="negative entries"):
        kernel_alignment(linear, task)
    with pytest.raises(ValueError, match="same shape"):
        alignment_metrics(np.ones((3, 3)), np.ones((3, 4)))


def noisy_kernel_attention(seed: int, kernel: str, per_head_keys: bool):
    """Attention of 2 x 2 heads that is a row-normalised kernel times noise (so no beta fits exactly),
    over causal keys shared by all heads or over keys that differ between heads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, N, D, generator=g, dtype=torch.float64)
    similarity = log_similarity(kernel, x, x)[:, None, None]  # [B, 1, 1, n, n]
    betas = torch.tensor([[0.7, 1.6], [3.0, 0.25]], dtype=torch.float64)[:, :, None, None]
    keys = torch.tril(torch.ones(N, N, dtype=torch.bool)).expand(5, 2, 2, N, N)
    if per_head_keys:
        keys = keys & (torch.rand(5, 2, 2, N, N, generator=g) > 0.3)
    noise = 0.4 * torch.randn(5, 2, 2, N, N, generator=g, dtype=torch.float64)
    return row_normalised_kernel(betas * similarity + noise, keys), similarity, keys


@pytest.mark.parametrize("per_head_keys", [False, True])
@pytest.mark.parametrize("kernel", ["exp", "gaussian"])
def test_distance_fit_is_the_minimiser_found_by_a_dense_numpy_scan(kernel, per_head_keys):
    """Against the objective recomputed in NumPy: the fitted log beta beats every point of a dense
    scan of its range and is a stationary point (central differences) to 1e-6."""
    attn, similarity, keys = noisy_kernel_attention(5, kernel, per_head_keys)
    fitted = fit_inverse_scale(attn, similarity, keys).log()
    start = fit_inverse_scale(attn, similarity, keys, fit="log_lstsq").log()
    a, s, k = attn.numpy(), similarity.expand_as(attn).numpy(), keys.numpy()
    for layer in range(2):
        for head in range(2):
            head_data = (a[:, layer, head], s[:, layer, head], k[:, layer, head])
            loss = lambda u: numpy_mean_distance(u, *head_data)  # noqa: E731
            u = float(fitted[layer, head])
            scan = np.linspace(float(start[layer, head]) - 7.0, float(start[layer, head]) + 7.0, 2801)
            assert loss(u) <= min(loss(v) for v in scan) + 1e-15
            h = 1e-3
            slope, curvature = (loss(u + h) - loss(u - h)) / (2 * h), (loss(u + h) - 2 * loss(u) + loss(u - h)) / h**2
            assert abs(slope / curvature) < 1e-6


def test_distance_fit_walks_to_the_minimum_where_the_distance_is_below_the_grid_rounding():
    """Attention exactly a row-normalised Gaussian kernel with beta ~ 25 over 1 to 4 visible keys:
    nearly one-hot rows, so the mean squared distance stays below the rounding of the grid's
    expanded form |attn|^2 + |ref|^2 - 2 attn . ref over a wide range and the grid's best point
    lies more than a spacing from the minimum; the Newton steps walk there. (Within ~1e-5 of
    beta the distance is at double precision's floor, hence the tolerance.)"""
    g = torch.Generator().manual_seed(27)
    rows, keys_x = torch.randn(4, 1, 3, generator=g, dtype=torch.float64), torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    keys = (torch.rand(4, 2, 2, 1, 7, generator=g) > 0.5)[:, :1, :1]  # 1, 2, 4 and 4 visible keys
    similarity = log_similarity("gaussian", rows, keys_x)[:, None, None]
    beta = 25.154287892051848
    attn = row_normalised_kernel(beta * similarity, keys)
    assert float(fit_inverse_scale(attn, similarity, keys)[0, 0]) == pytest.approx(beta, rel=1e-4)


def test_log_lstsq_fit_matches_numpy_least_squares_of_row_centred_logs():
    attn, similarity, keys = noisy_kernel_attention(6, "gaussian", per_head_keys=True)
    a, s, k = attn.numpy(), similarity.expand_as(attn).numpy(), keys.numpy()
    expected = np.empty((2, 2))
    for layer in range(2):
        for head in range(2):
            logs, sims = [], []
            rows = (value[:, layer, head].reshape(-1, N) for value in (a, s, k))
            for row_attn, row_sim, row_keys in zip(*rows):
                if row_keys.any():
                    logs.append(np.log(row_attn[row_keys]) - np.log(row_attn[row_keys]).mean())
                    sims.append(row_sim[row_keys] - row_sim[row_keys].mean())
            logs, sims = np.concatenate(logs), np.concatenate(sims)
            expected[layer, head] = logs @ sims / (sims @ sims)
    np.testing.assert_allclose(fit_inverse_scale(attn, similarity, keys, fit="log_lstsq").numpy(), expected, rtol=1e-12)


def test_rank_correlations_match_scipy_on_near_ties_signed_zeros_and_masks():
    """Values a few ulps apart (closer than the packed-key sort resolves), exact ties, -0.0 beside
    +0.0 and negative entries: Spearman as scipy computes it, with average ranks."""
    rng = np.random.default_rng(7)
    attn = rng.standard_normal((40, 6, 9))
    ulps = np.nextafter(0.5, 1.0) - 0.5
    attn[:10] = 0.5 + ulps * rng.integers(0, 4, size=(10, 6, 9))  # near-ties and exact ties
    attn[10:15, :, :3] = np.array([-0.0, 0.0, -0.0])
    ref = attn[rng.permutation(40)] + 1e-15 * rng.standard_normal((40, 6, 9))
    mask = rng.random((40, 6, 9)) > 0.2
    metrics = alignment_metrics(torch.as_tensor(attn), torch.as_tensor(ref), mask=torch.as_tensor(mask))
    for i in range(40):
        expected = stats.spearmanr(attn[i][mask[i]], ref[i][mask[i]]).statistic
        assert float(metrics["spearman"][i]) == pytest.approx(expected, rel=1e-12, abs=1e-14)
        rows = [stats.spearmanr(attn[i, r][mask[i, r]], ref[i, r][mask[i, r]]).statistic for r in range(6) if mask[i, r].sum() > 1]
        assert float(metrics["row_spearman"][i]) == pytest.approx(np.nanmean(rows), rel=1e-12, abs=1e-14)


def test_kernel_alignment_compares_rows_over_the_structural_mask_not_the_nonzero_weights():
    """A causal support block (support_allowed lower-triangular) whose heads put exactly zero
    weight on some keys they may see (as a saturated softmax does): the fitted scale minimises
    the NumPy mean distance over the structural keys, and each prompt's metrics equal the NumPy /
    SciPy ones with every row's reference a softmax over all its allowed keys."""
    task = make_task(batch=5, seed=4)
    g = torch.Generator().manual_seed(11)
    allowed = torch.tril(torch.ones(N, N, dtype=torch.bool))
    similarity = log_similarity("gaussian", task.x_support, task.x_support)[:, None, None]  # [B, 1, 1, N, N]
    seen = allowed & ((torch.rand(5, 1, 2, N, N, generator=g) > 0.3) | torch.eye(N, dtype=torch.bool))  # zero weight elsewhere
    noise = 0.2 * torch.randn(5, 1, 2, N, N, generator=g, dtype=torch.float64)
    pattern = row_normalised_kernel(torch.tensor([1.5, 0.4], dtype=torch.float64)[:, None, None] * similarity + noise, seen)
    attention = AttentionKernels(support=pattern, query=None, source="pattern", support_allowed=allowed)
    result = kernel_alignment(None, task, kernels=("gaussian",), block="support", attention=attention)
    attn, keys, s = pattern.numpy(), np.broadcast_to(allowed.numpy(), (5, N, N)), similarity[:, 0, 0].numpy()
    beta = result.bandwidth.numpy() ** -2.0  # [1, 2]
    for head in range(2):
        loss = lambda u: numpy_mean_distance(u, attn[:, 0, head], s, keys)  # noqa: E731
        u = math.log(beta[0, head])
        assert loss(u) <= min(loss(v) for v in np.linspace(u - 5.0, u + 5.0, 2001)) + 1e-15
        ref = numpy_row_softmax(beta[0, head] * s, keys)
        for b in range(5):
            for name, value in numpy_metrics(attn[b, 0, head], ref[b], keys[b]).items():
                got = float(result.per_prompt["gaussian"][name][b, 0, head])
                assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (name, b, head)


def test_kernel_alignment_refuses_a_structural_mask_of_another_shape():
    task = make_task()
    pattern = torch.full((4, 1, 1, M, N), 1.0 / N, dtype=torch.float64)
    attention = AttentionKernels(support=None, query=pattern, source="pattern", query_allowed=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention's allowed mask is \(8, 8\) but its block has rows, keys = \(5, 8\)"):
        kernel_alignment(None, task, attention=attention)


@pytest.mark.parametrize("per_head_keys", [False, True])
def test_kernel_alignment_per_prompt_metrics_match_numpy_and_scipy_across_chunks(monkeypatch, per_head_keys):
    """End to end, with chunks of one or two prompts: each prompt's metrics against the reference
    rebuilt in NumPy at the fitted scale. The attention: noisy row-normalised exp kernels with
    some keys unseen (the same for all heads, or not), giving 0.8 of each row to the support."""
    monkeypatch.setattr(importlib.import_module("probes.kernel_scale_fit"), "CHUNK_VALUES", 300)  # a prompt holds 2 x 2 heads x 5 x 8 entries
    task = make_task(batch=7, seed=3)
    g = torch.Generator().manual_seed(8)
    similarity = log_similarity("exp", task.x_query, task.x_support)[:, None, None]  # [B, 1, 1, M, N]
    betas = torch.tensor([[0.8, 2.0], [0.3, 1.2]], dtype=torch.float64)[:, :, None, None]
    keys = torch.rand(7, 1 if not per_head_keys else 2, 1 if not per_head_keys else 2, M, N, generator=g) > 0.15
    noise = 0.3 * torch.randn(7, 2, 2, M, N, generator=g, dtype=torch.float64)
    pattern = 0.8 * row_normalised_kernel(betas * similarity + noise, keys.expand(7, 2, 2, M, N))
    result = kernel_alignment(None, task, attention=AttentionKernels(support=None, query=pattern, source="pattern"))
    attn, keys = (pattern / pattern.sum(-1, keepdim=True)).numpy(), (pattern > 0).numpy()
    for kernel, scale in result.scale.items():
        assert torch.isfinite(scale).all()
        beta = (1 / scale if kernel == "exp" else scale**-2).numpy()[:, :, None, None]
        ref = numpy_row_softmax(beta * log_similarity(kernel, task.x_query, task.x_support).numpy()[:, None, None], keys)
        for b in range(7):
            for layer in range(2):
                for head in range(2):
                    expected = numpy_metrics(attn[b, layer, head], ref[b, layer, head], keys[b, layer, head])
                    for name, value in expected.items():
                        got = float(result.per_prompt[kernel][name][b, layer, head])
                        assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (kernel, name, b, layer, head)
