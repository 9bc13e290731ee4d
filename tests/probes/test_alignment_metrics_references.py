"""Kernel alignment's comparison metrics and result object against independent references: rank
correlations on rows that a descending run of near-ties leaves unsorted (SciPy), mask and input
validation of `alignment_metrics`, the prompt aggregation of `kernel_alignment` (NumPy nanmean of
per-prompt NumPy / SciPy metrics, with a prompt whose rank correlations are undefined), the NaN
scale of an anti-aligned log_lstsq fit (NumPy least squares), `KernelAlignment.to_dict` on a
hand-built result, and the checks on `attention` / `representation` / `AttentionKernels`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from kernel_references import numpy_row_softmax
from probes import alignment_metrics, kernel_alignment
from probes.attention_kernels import AttentionKernels
from probes.kernel_alignment import KernelAlignment
from probes.kernel_scale_fit import log_similarity, row_normalised_kernel
from prompts import random_task

D, N, M = 3, 5, 4


def numpy_cka(a: np.ndarray, b: np.ndarray) -> float:
    """<H A H, H B H>_F / (|H A H|_F |H B H|_F), H = I - 11^T / size on each side."""
    h_rows, h_cols = np.eye(a.shape[0]) - 1.0 / a.shape[0], np.eye(a.shape[1]) - 1.0 / a.shape[1]
    ac, bc = h_rows @ a @ h_cols, h_rows @ b @ h_cols
    return float((ac * bc).sum() / (np.linalg.norm(ac) * np.linalg.norm(bc)))


def scipy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scipy.stats.spearmanr, NaN (without the warning) where an input is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(a, b).statistic)


def test_rank_correlations_of_rows_whose_near_ties_descend():
    """Each matrix's entries 0.5 + k ulp with k descending along every row and over the whole
    matrix (values closer than the packed-key sort resolves, so its first order is the reverse of
    the sorted one with no pair in order): Spearman as SciPy computes it, +1 against a reference
    ordered the same way and -1 against the reversed one."""
    ulp = np.nextafter(0.5, 1.0) - 0.5
    attn = 0.5 + ulp * np.array([[[3.0, 2.0], [1.0, 0.0]], [[7.0, 6.0], [5.0, 4.0]], [[1.0, 0.0], [1.0, 0.0]]])
    ref = np.array([[[4.0, 3.0], [2.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], [[9.0, 8.0], [7.0, 6.0]]])
    metrics = alignment_metrics(torch.as_tensor(attn), torch.as_tensor(ref))
    for i in range(3):
        expected_rows = np.mean([stats.spearmanr(attn[i, r], ref[i, r]).statistic for r in range(2)])
        assert float(metrics["spearman"][i]) == pytest.approx(stats.spearmanr(attn[i].ravel(), ref[i].ravel()).statistic, rel=1e-12)
        assert float(metrics["row_spearman"][i]) == pytest.approx(expected_rows, rel=1e-12)
    np.testing.assert_allclose(metrics["row_spearman"].numpy(), [1.0, -1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(metrics["spearman"][:2].numpy(), [1.0, -1.0], rtol=1e-12)


def test_a_numpy_bool_mask_restricts_the_rank_correlations_like_a_tensor():
    """mask given as a NumPy bool array (the signature takes any array): Spearman over its entries,
    overall and per row, against SciPy on the masked entries."""
    rng = np.random.default_rng(3)
    attn, ref = rng.random((2, 4, 5)), rng.random((2, 4, 5))
    mask = rng.random((2, 4, 5)) > 0.3
    mask[:, :, :2] = True  # every row keeps at least two entries
    metrics = alignment_metrics(attn, ref, mask=mask)
    for i in range(2):
        assert float(metrics["spearman"][i]) == pytest.approx(stats.spearmanr(attn[i][mask[i]], ref[i][mask[i]]).statistic, rel=1e-12)
        rows = [stats.spearmanr(attn[i, r][mask[i, r]], ref[i, r][mask[i, r]]).statistic for r in range(4)]
        assert float(metrics["row_spearman"][i]) == pytest.approx(np.mean(rows), rel=1e-12)


def test_alignment_metrics_reject_a_mask_of_another_shape_and_inputs_below_two_dimensions():
    """A mask that does not broadcast to the matrices `[batch, r, c]` (here `[r, c + 1]`), or is
    not bool, and vectors (no matrix to take a spectral norm of) raise ValueError naming the
    argument."""
    attn = torch.rand(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for mask in (torch.ones(3, 4, dtype=torch.bool), torch.ones(2, 3, 3)):
        with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3, 3\) or one that broadcasts to it"):
            alignment_metrics(attn, attn.flip(-1), mask=mask)
    with pytest.raises(ValueError, match="K_attn must have at least 2 dimensions"):
        alignment_metrics(torch.arange(4.0), torch.arange(4.0).flip(0))


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_cka_is_nan_where_centring_removes_either_matrix_and_numpys_value_beside_it(scale):
    """M_ij = a_i + b_j (one row, one column, identical rows, or a sum of a row and a column
    profile) is removed exactly by double centring, H M H = 0, so CKA is 0/0: NaN against any
    other matrix, on either side and at any scale, not the rounding residue's 0 or +-1. A matrix
    whose centred part is small but real (uniform rows plus 1e-7 of noise, as float32 attention
    that is not exactly uniform) keeps NumPy's CKA."""
    rng = np.random.default_rng(8)
    r, c = 30, 40
    removed = {
        "one row": rng.random((1, c)),
        "one column": rng.random((r, 1)),
        "identical rows": np.tile(rng.random((1, c)), (r, 1)),
        "row plus column profile": rng.random((r, 1)) + rng.random((1, c)),
    }
    for name, matrix in removed.items():
        other = rng.random(matrix.shape)
        for pair in ((matrix, other), (other, matrix)):
            cka = alignment_metrics(scale * torch.as_tensor(pair[0]), scale * torch.as_tensor(pair[1]))["cka"]
            assert torch.isnan(cka), (name, float(cka))
    near_uniform = np.full((r, c), 1.0 / c) + 1e-7 * rng.standard_normal((r, c))
    other = rng.random((r, c))
    cka = alignment_metrics(scale * torch.as_tensor(near_uniform), scale * torch.as_tensor(other))["cka"]
    assert float(cka) == pytest.approx(numpy_cka(near_uniform, other), rel=1e-6)


def test_metrics_are_nan_ignoring_means_over_prompts_of_numpy_and_scipy_per_prompt_metrics():
    """Query block of 4 prompts, 1 layer x 2 heads of noisy row-normalised exp kernels; in prompt 0
    every row sees a single key, so its rank correlations are undefined (NaN) while its distance and
    CKA are not. Per prompt: each metric against NumPy / SciPy at the fitted scale; `metrics`: the
    NumPy nanmean over prompts of those (not a plain mean, which prompt 0 would make NaN, nor a
    median)."""
    task = random_task(4, N, M, D, seed=5)
    g = torch.Generator().manual_seed(6)
    similarity = log_similarity("exp", task.x_query, task.x_support)[:, None, None]  # [B, 1, 1, M, N]
    keys = (torch.rand(4, 1, 2, M, N, generator=g) > 0.2) | (torch.arange(N) < 2)  # at least 2 keys a row
    keys[0] = torch.arange(N) == torch.arange(M)[:, None]  # prompt 0: row i sees key i only
    noise = 0.5 * torch.randn(4, 1, 2, M, N, generator=g, dtype=torch.float64)
    betas = torch.tensor([[0.9, 2.5]], dtype=torch.float64)[:, :, None, None]
    pattern = 0.7 * row_normalised_kernel(betas * similarity + noise, keys)
    result = kernel_alignment(None, task, attention=AttentionKernels(support=None, query=pattern, source="pattern"))
    attn, visible = (pattern / pattern.sum(-1, keepdim=True)).numpy(), keys.numpy()
    for kernel, scale in result.scale.items():
        beta = (1 / scale if kernel == "exp" else scale**-2).numpy()[:, :, None, None]
        ref = numpy_row_softmax(beta * log_similarity(kernel, task.x_query, task.x_support).numpy()[:, None, None], visible)
        expected = {name: np.empty((4, 1, 2)) for name in ("operator_distance", "cka", "spearman", "row_spearman")}
        for b in range(4):
            for head in range(2):
                a, r, k = attn[b, 0, head], ref[b, 0, head], visible[b, 0, head]
                rows = [scipy_spearman(a[i][k[i]], r[i][k[i]]) for i in range(M) if k[i].sum() > 1]
                expected["operator_distance"][b, 0, head] = np.linalg.norm(a - r, ord=2) / np.linalg.norm(r, ord=2)
                expected["cka"][b, 0, head] = numpy_cka(a, r)
                expected["spearman"][b, 0, head] = scipy_spearman(a[k], r[k])
                expected["row_spearman"][b, 0, head] = np.mean(rows) if rows else np.nan
        assert np.isnan(expected["spearman"][0]).all() and np.isnan(expected["row_spearman"][0]).all()
        for name, values in expected.items():
            np.testing.assert_allclose(result.per_prompt[kernel][name].numpy(), values, rtol=1e-9, atol=1e-12, equal_nan=True)
            np.testing.assert_allclose(result.metrics[kernel][name].numpy(), np.nanmean(values, axis=0), rtol=1e-9, atol=1e-12)


def test_log_lstsq_scale_of_anti_aligned_attention_is_nan():
    """Attention = row-normalised exp(-2 x . x'): NumPy's least squares of row-centred log attention
    on row-centred x . x' gives beta = -2 < 0, which no temperature represents, so tau is NaN (not
    -1/2); a positively aligned head beside it keeps tau = 1 / beta."""
    task = random_task(3, N, M, D, seed=7)
    similarity = log_similarity("exp", task.x_query, task.x_support)[:, None, None]
    betas = torch.tensor([[-2.0, 1.25]], dtype=torch.float64)[:, :, None, None]
    pattern = row_normalised_kernel(betas * similarity, torch.ones(3, 1, 2, M, N, dtype=torch.bool))
    logs, sims = np.log(pattern[:, 0, 0].numpy()), similarity[:, 0, 0].numpy()
    logs, sims = logs - logs.mean(-1, keepdims=True), sims - sims.mean(-1, keepdims=True)
    assert (logs * sims).sum() / (sims * sims).sum() == pytest.approx(-2.0, rel=1e-10)
    attention = AttentionKernels(support=None, query=pattern, source="pattern")
    result = kernel_alignment(None, task, kernels="exp", fit="log_lstsq", attention=attention)
    assert np.isnan(float(result.tau[0, 0]))
    assert float(result.tau[0, 1]) == pytest.approx(1 / 1.25, rel=1e-10)


def test_to_dict_of_a_hand_built_alignment_keeps_block_scale_metrics_and_per_prompt_apart():
    """Every field lands under its own key with the values given (inf / NaN left as floats)."""
    result = KernelAlignment(
        block="support",
        scale={"exp": torch.tensor([[0.5, float("inf")]]), "gaussian": torch.tensor([[2.0, 4.0]])},
        metrics={"exp": {"cka": torch.tensor([[0.25, 0.75]])}},
        per_prompt={"exp": {"cka": torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]]])}},
    )
    data = result.to_dict()
    assert set(data) == {"block", "scale", "metrics", "per_prompt"}
    assert data["block"] == "support"
    assert data["scale"] == {"exp": [[0.5, float("inf")]], "gaussian": [[2.0, 4.0]]}
    assert data["metrics"] == {"exp": {"cka": [[0.25, 0.75]]}}
    assert data["per_prompt"] == {"exp": {"cka": [[[0.0, 1.0]], [[0.5, 0.5]]]}}
    assert result.tau.tolist() == [[0.5, float("inf")]] and result.bandwidth.tolist() == [[2.0, 4.0]]


def test_kernel_alignment_rejects_attention_that_is_not_a_pattern_and_malformed_representations():
    """attention of source "scores" (not softmax weights) or not an AttentionKernels at all, and a
    representation of three arrays or of 4-d features: ValueError naming the argument."""
    task = random_task(2, N, M, D, seed=8)
    pattern = torch.full((2, 1, 1, M, N), 1.0 / N, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention must be the AttentionKernels"):
        kernel_alignment(None, task, attention=AttentionKernels(support=None, query=pattern, source="scores"))
    with pytest.raises(ValueError, match="attention must be the AttentionKernels"):
        kernel_alignment(None, task, attention=(None, pattern))
    attention = AttentionKernels(support=None, query=pattern, source="pattern")
    with pytest.raises(ValueError, match="representation must be None or a pair"):
        kernel_alignment(None, task, attention=attention, representation=(task.x_support, task.x_query, task.x_query))
    with pytest.raises(ValueError, match=r"representation\[0\] must be \[batch=2, 5, p\]"):
        kernel_alignment(None, task, attention=attention, representation=(task.x_support[..., None], task.x_query[..., None]))


def test_layer_and_head_counts_of_attention_holding_only_the_query_block():
    """support=None is a documented state: the counts come from the query block `[B, L, H, m, n]`."""
    attention = AttentionKernels(support=None, query=torch.zeros(2, 3, 4, M, N), source="pattern")
    assert (attention.n_layers, attention.n_heads) == (3, 4)
    support_only = AttentionKernels(support=torch.zeros(2, 5, 6, N, N), query=None, source="pattern")
    assert (support_only.n_layers, support_only.n_heads) == (5, 6)
    with pytest.raises(ValueError, match="neither block"):
        AttentionKernels(support=None, query=None, source="pattern").n_layers
