"""Usage review: positive and negative controls for the attention-kernel instruments
(`probes.attention_kernels`, `probes.kernel_alignment`, `alignment_metrics`, and the kernel lines
of `diagnose` / `compare`). Positive controls are heads whose attention is exactly a known
row-normalised kernel: the Richardson construction's Gaussian heads, and hand-built softmax
`ICLTransformer`s whose q.k is c^2 x^T A A^T x' / sqrt(d_head) (exp kernel, tau = sqrt(d_head) / c^2
on the representation x A; on unit-norm support points also the Gaussian kernel with
sigma^2 = tau). Negative controls are random, anti-aligned and uniform heads. References are
independent: the known scales, a NumPy row softmax, a dense NumPy scan of the distance the fit
minimises, SciPy Spearman correlations, and brute-force argmins.

The tests under "findings" were the review's findings (strict xfails until fixed): they check the
correct behaviour."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import probes
from mi_krr.construct import richardson_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import ICLTask
from prompts import random_task

D = 3


def kernel_model(coefs, layout="concat", causal=None, dtype="float64", A=None) -> ICLTransformer:
    """Softmax ICLTransformer, no norm, no MLP, W_O = 0 (the residual stream stays the tokens, so
    every block sees x): head (l, h) scores c_lh^2 (x A) . (x' A) / sqrt(D), c_lh = coefs[l][h],
    i.e. attention = row-normalised exp kernel on x A with tau = sqrt(D) / c^2."""
    n_layers, n_heads = len(coefs), len(coefs[0])
    cfg = ICLTransformerConfig(n_dims=D, d_model=D + 1, n_layers=n_layers, n_heads=n_heads, d_head=D, norm="none", mlp=False,
                               dtype=dtype, layout=layout, causal=causal)
    model = ICLTransformer(cfg).eval()
    A = torch.eye(D, dtype=torch.float64) if A is None else torch.as_tensor(A, dtype=torch.float64)
    with torch.no_grad():
        model.read_in.weight.copy_(torch.eye(*model.read_in.weight.shape))  # tokens [x, y] (concat) or x / (y, 0, ..) (interleaved)
        model.read_in.bias.zero_()
        if model.W_pos is not None:
            model.W_pos.zero_()
        for layer, block in enumerate(model.blocks):
            weight = torch.zeros(n_heads, D + 1, D, dtype=torch.float64)
            for head in range(n_heads):
                weight[head, :D] = coefs[layer][head] * A
            block.attn.W_Q.copy_(weight)
            block.attn.W_K.copy_(weight)
            for parameter in (block.attn.b_Q, block.attn.b_K, block.attn.W_O, block.attn.b_O):
                parameter.zero_()
    return model


def numpy_row_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def numpy_similarity(kernel: str, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if kernel == "exp":
        return rows @ keys.swapaxes(-1, -2)
    return -0.5 * ((rows[..., :, None, :] - keys[..., None, :, :]) ** 2).sum(-1)


def tau_of(c: float) -> float:
    return math.sqrt(D) / c**2


# ---------------------------------------------------------------- positive controls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bandwidth", [0.3, 2.5])
@pytest.mark.parametrize("block", ["query", "support"])
def test_richardson_kernel_heads_recover_their_bandwidth_in_both_blocks_and_dtypes(dtype, bandwidth, block):
    """The Richardson construction's heads attend with D^-1 K of the Gaussian kernel of its
    bandwidth: in both blocks, float64 and float32 weights, both fits recover sigma (1e-9; float32: 1e-5), with
    Gaussian operator distance ~0 and row Spearman 1 on those heads; the exp kernel, which differs
    by the key norms, is clearly farther, and its distance at the fitted tau equals a NumPy row
    softmax of x . x' / tau against the renormalised attention."""
    model = richardson_transformer(n_steps=1, lam=0.1, bandwidth=bandwidth, step=0.5, dim=D, dtype=dtype)
    task = random_task(3, 8, 4, D, seed=0)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    scale_rtol = 1e-9 if dtype == torch.float64 else 1e-5
    attention = probes.attention_kernels(model, task)
    for fit in ("distance", "log_lstsq"):
        result = probes.kernel_alignment(model, task, block=block, fit=fit, attention=attention)
        kernel_heads = torch.isfinite(result.metrics["gaussian"]["operator_distance"])
        assert kernel_heads.sum() == 2  # two heads per block read this block's rows
        np.testing.assert_allclose(result.bandwidth[kernel_heads].numpy(), bandwidth, rtol=scale_rtol)
        assert result.metrics["gaussian"]["operator_distance"][kernel_heads].max() < tolerance
        np.testing.assert_allclose(result.metrics["gaussian"]["row_spearman"][kernel_heads].numpy(), 1.0, atol=1e-9)
        assert result.metrics["exp"]["operator_distance"][kernel_heads].min() > 0.05
    # the exp distance of one kernel head at its fitted tau, by NumPy
    layer, head = [int(i) for i in torch.nonzero(kernel_heads)[0]]
    pattern = (attention.query if block == "query" else attention.support)[:, layer, head].double().numpy()
    attn = pattern / pattern.sum(-1, keepdims=True)
    rows = (task.x_query if block == "query" else task.x_support).numpy()
    reference = numpy_row_softmax(numpy_similarity("exp", rows, task.x_support.numpy()) / float(result.tau[layer, head]))
    expected = np.mean([np.linalg.norm(a - r, 2) / np.linalg.norm(r, 2) for a, r in zip(attn, reference)])
    assert float(result.metrics["exp"]["operator_distance"][layer, head]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("layout, causal", [("concat", False), ("concat", True), ("interleaved", True)])
@pytest.mark.parametrize("block", ["query", "support"])
def test_every_layer_and_head_of_a_multi_layer_exp_model_recovers_its_own_temperature(layout, causal, block):
    """Two blocks x two heads, each its own temperature, in the concat layout (support rows see
    all support keys, or a prefix when causal) and the interleaved one (one sequence per query, y
    tokens among the keys): every fitted tau equals sqrt(d_head) / c^2 for both fits, the exp
    distance is ~0 everywhere and the Gaussian kernel is farther on every head."""
    coefs = [[1.0, 0.5], [2.0, 1.3]]
    truth = np.array([[tau_of(c) for c in row] for row in coefs])
    model, task = kernel_model(coefs, layout, causal), random_task(3, 6, 4, D, seed=1)
    for fit in ("distance", "log_lstsq"):
        result = probes.kernel_alignment(model, task, block=block, fit=fit)
        np.testing.assert_allclose(result.tau.numpy(), truth, rtol=1e-9)
        assert result.metrics["exp"]["operator_distance"].max() < 1e-12
        assert (result.metrics["gaussian"]["operator_distance"] > 0.03).all()


@pytest.mark.parametrize("block", ["query", "support"])
@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
def test_on_unit_norm_support_points_an_exp_head_is_also_the_gaussian_kernel_with_sigma_squared_tau(block, fit):
    """-|x - x'|^2 / 2 = x . x' - |x|^2 / 2 - |x'|^2 / 2: with every support key of norm 1 the key
    term is constant and the row term cancels, so an exact exp head of temperature tau is exactly
    the Gaussian kernel of sigma = sqrt(tau): both kernels fit exactly, both distances ~0."""
    raw = random_task(4, 7, 3, D, seed=2)
    task = ICLTask(raw.x_support / raw.x_support.norm(dim=-1, keepdim=True), raw.y_support, raw.x_query, raw.y_query)
    c = 0.6
    result = probes.kernel_alignment(kernel_model([[c]]), task, block=block, fit=fit)
    assert float(result.tau) == pytest.approx(tau_of(c), rel=1e-9)
    assert float(result.bandwidth) == pytest.approx(math.sqrt(tau_of(c)), rel=1e-9)
    for kernel in ("exp", "gaussian"):
        assert float(result.metrics[kernel]["operator_distance"]) < 1e-12
        assert float(result.metrics[kernel]["cka"]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("convert, rtol", [(lambda t: t, 1e-9), (lambda t: t.numpy(), 1e-9), (lambda t: t.float(), 1e-6)])
def test_a_representation_that_makes_the_head_exact_gives_the_known_temperature(convert, rtol):
    """A head scoring x^T A A^T x' / sqrt(d_head) is the exp kernel of tau = sqrt(d_head) on the
    representation (x A, x_* A), given as tensors, NumPy arrays or float32 (exact to float32
    rounding), in a list as well as a tuple; on the raw inputs it is not (distance > 0.1)."""
    A = np.random.default_rng(0).normal(size=(D, D))
    task = random_task(4, 7, 3, D, seed=6)
    model = kernel_model([[1.0]], A=A)
    features = [convert(x @ torch.as_tensor(A)) for x in (task.x_support, task.x_query)]
    for representation in (tuple(features), list(features)):
        for block in ("query", "support"):
            result = probes.kernel_alignment(model, task, kernels="exp", representation=representation, block=block)
            assert float(result.tau) == pytest.approx(math.sqrt(D), rel=rtol)
            assert float(result.metrics["exp"]["operator_distance"]) < 1e3 * rtol
    assert float(probes.kernel_alignment(model, task, kernels="exp").metrics["exp"]["operator_distance"]) > 0.1


@pytest.mark.parametrize("block", ["query", "support"])
def test_uniform_attention_fits_infinite_scales_at_distance_zero_end_to_end(block):
    """W_Q = 0: every row is uniform over its keys, the tau -> inf (sigma -> inf) limit of both
    kernels: the distance fit reports inf for both scales and operator distance ~0; CKA and the
    rank correlations are undefined (NaN) against a constant reference."""
    result = probes.kernel_alignment(kernel_model([[0.0]]), random_task(3, 7, 3, D, seed=2), block=block)
    assert float(result.tau) == math.inf and float(result.bandwidth) == math.inf
    for kernel in ("exp", "gaussian"):
        assert float(result.metrics[kernel]["operator_distance"]) < 1e-12
        assert math.isnan(float(result.metrics[kernel]["cka"])) and math.isnan(float(result.metrics[kernel]["row_spearman"]))


# ---------------------------------------------------------------- negative controls


def test_random_heads_are_far_from_both_kernels_and_match_an_independent_numpy_fit():
    """A randomly initialised 2 x 2 softmax model: for every head and both kernels, the fitted scale,
    the operator distance and the row Spearman equal those of a dense NumPy scan of the mean squared
    distance over log beta (refined by SciPy, uniform rows where those are closer) with SciPy
    Spearman correlations; every distance is clearly > 0 (no spurious perfect score)."""
    task = random_task(5, 6, 3, 2, seed=4)
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, dtype="float64", mlp=False, norm="none")).eval()
    result = probes.kernel_alignment(model, task)
    pattern = probes.attention_kernels(model, task).query.numpy()
    xs, xq = task.x_support.numpy(), task.x_query.numpy()
    for kernel in ("exp", "gaussian"):
        similarity = numpy_similarity(kernel, xq, xs)
        for layer in range(2):
            for head in range(2):
                attn = pattern[:, layer, head] / pattern[:, layer, head].sum(-1, keepdims=True)
                loss = lambda u: ((numpy_row_softmax(np.exp(u) * similarity) - attn) ** 2).sum((-2, -1)).mean()
                grid = np.linspace(-10, 8, 1201)
                start = grid[np.argmin([loss(u) for u in grid])]
                best = optimize.minimize_scalar(loss, bounds=(start - 0.02, start + 0.02), method="bounded", options={"xatol": 1e-10})
                uniform = ((1 / attn.shape[-1] - attn) ** 2).sum((-2, -1)).mean()
                beta = math.exp(best.x) if best.fun < uniform else 0.0
                reference = numpy_row_softmax(beta * similarity)
                distance = np.mean([np.linalg.norm(a - r, 2) / np.linalg.norm(r, 2) for a, r in zip(attn, reference)])
                scale = math.inf if beta == 0 else (1 / beta if kernel == "exp" else beta**-0.5)
                assert float(result.scale[kernel][layer, head]) == pytest.approx(scale, rel=1e-5)
                assert float(result.metrics[kernel]["operator_distance"][layer, head]) == pytest.approx(distance, rel=1e-6)
                assert distance > 0.1
                if beta > 0:
                    rows = [stats.spearmanr(a, r).statistic for p_a, p_r in zip(attn, reference) for a, r in zip(p_a, p_r)]
                    assert float(result.metrics[kernel]["row_spearman"][layer, head]) == pytest.approx(np.mean(rows), abs=1e-9)


def test_an_anti_aligned_head_is_far_from_the_kernel_under_the_distance_fit():
    """W_K = -W_Q: attention exp(-x . x' / tau), which ranks keys opposite to the exp kernel. The
    distance fit (beta >= 0) settles on uniform rows (tau = inf) at a clearly nonzero distance."""
    model = kernel_model([[1.0]])
    with torch.no_grad():
        model.blocks[0].attn.W_K.mul_(-1)
    result = probes.kernel_alignment(model, random_task(6, 8, 4, D, seed=3))
    assert float(result.tau) == math.inf
    assert float(result.metrics["exp"]["operator_distance"]) > 0.3


def test_diagnosis_summary_and_comparison_report_the_brute_force_best_head_per_block():
    """A random 3-block, 3-head model with sharpened queries (distinct distances per head): the
    summary's kernel lines, `best_heads` and the comparison's exp / Gaussian distance are the
    brute-force argmin over heads of the alignment's distances, and its mean over blocks."""
    task = random_task(20, 6, 3, 2, seed=5)
    torch.manual_seed(3)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=3, n_heads=3, dtype="float64")).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(4)
    diagnosis = probes.diagnose(model, task, kernel="gaussian", kernel_params={"bandwidth": 1.0}, lam=0.1, progress=False,
                                bootstrap=10, algorithms=("cg", "gd"), step_sizes="optimal")
    alignment = diagnosis["tasks"].kernel_alignment
    summary = diagnosis.summary()
    comparison = probes.compare({"random": diagnosis})
    row = comparison.to_dataframe().iloc[0]
    for kernel, column in (("exp", "exp_distance"), ("gaussian", "gaussian_distance")):
        distances = alignment.metrics[kernel]["operator_distance"].numpy()
        assert np.isfinite(distances).all() and len(set(distances.argmin(1))) > 1  # the best head moves between blocks
        head, best = alignment.best_heads(kernel)
        np.testing.assert_array_equal(head, distances.argmin(1))
        np.testing.assert_allclose(best, distances.min(1), rtol=0)
        line = re.search(rf"^\s+{kernel}\s+(.*)$", summary, flags=re.M).group(1).split()
        np.testing.assert_allclose([float(v.removesuffix("u")) for v in line], distances.min(1), atol=5e-4)
        uniform = np.isinf(alignment.scale[kernel].numpy()[np.arange(len(line)), distances.argmin(1)])  # brute-force best head's scale
        assert [v.endswith("u") for v in line] == uniform.tolist()
        assert row[column] == pytest.approx(distances.min(1).mean(), rel=1e-12)
        assert getattr(comparison.rows[0], f"{kernel}_uniform") == uniform.any()


# ---------------------------------------------------------------- findings


@pytest.mark.parametrize("dtype, c", [("float64", 30.0), ("float32", 8.0)])
def test_rows_with_no_weight_on_support_keys_do_not_spoil_an_exact_kernel_head(dtype, c):
    """A sharp but exact exp head in the concat layout: a query token's score with itself can
    exceed every support score by more than the softmax's range, so its weight on the support
    keys is exactly 0. Such a row has no similarity over the support keys (0 / 0 after
    renormalisation) and is left out, as it is for the same attention without a structural mask;
    it used to be compared and fitted as an all-zero row: operator distance 0.60 / 0.52 and tau
    132x / 4x the truth (float64 / float32) for a head that is exactly the kernel on every other
    row."""
    model, task = kernel_model([[c]], dtype=dtype), random_task(6, 8, 4, D, seed=7)
    attention = probes.attention_kernels(model, task)
    assert (attention.query.sum(-1) == 0).any()  # the premise: some rows put no weight on support keys
    result = probes.kernel_alignment(model, task, kernels="exp", attention=attention)
    assert float(result.tau) == pytest.approx(tau_of(c), rel=1e-4)
    assert float(result.metrics["exp"]["operator_distance"]) < 1e-5


def test_a_prompt_whose_rows_all_miss_the_support_keys_gets_nan_metrics_and_the_mask_changes_nothing():
    """The float64 head above: in one prompt every query row puts its weight on its own token
    alone. That prompt has nothing left to compare, so its per-prompt metrics are NaN; every other
    prompt is the kernel (distance < 1e-12). For the exp kernel, the model's structural mask and
    none (visible keys = the nonzero weights: the underflowed ones drop out, where the exact
    kernel's reference underflows too) give the same temperature and per-prompt distances."""
    c = 30.0
    model, task = kernel_model([[c]]), random_task(6, 8, 4, D, seed=7)
    attention = probes.attention_kernels(model, task)
    empty = (attention.query[:, 0, 0].sum(-1) == 0).all(-1)  # [batch]: prompts whose every row misses the keys
    assert empty.any() and not empty.all()
    masked = probes.kernel_alignment(model, task, attention=attention)
    unmasked = probes.kernel_alignment(model, task, attention=dataclasses.replace(attention, query_allowed=None))
    for kernel in ("exp", "gaussian"):
        for name, values in masked.per_prompt[kernel].items():
            assert torch.isnan(values[empty]).all(), (kernel, name)
    distance = masked.per_prompt["exp"]["operator_distance"][:, 0, 0]
    assert float(distance[~empty].max()) < 1e-12
    torch.testing.assert_close(distance, unmasked.per_prompt["exp"]["operator_distance"][:, 0, 0], rtol=0, atol=1e-15, equal_nan=True)
    torch.testing.assert_close(masked.tau, unmasked.tau, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype, c, distance_rtol", [("float64", 30.0, 1e-8), ("float32", 8.0, 1e-5)])
def test_log_lstsq_recovers_the_temperature_of_a_sharp_exact_head_with_underflowed_weights(dtype, c, distance_rtol):
    """A sharp exact exp head (support block, every row keeps its own key): some visible keys'
    weights underflow to 0 (float32: or to subnormals, with few significant bits). The log
    regression used to clamp them to 1e-300 (log -690.8, where the true log weight is far lower),
    so the fitted tau was 4.9x the truth (float32: 70% off) while fit="distance" recovers it.
    Leaving zero and subnormal weights out of the log regression keeps it exact on the rest."""
    model, task = kernel_model([[c]], dtype=dtype), random_task(4, 7, 3, D, seed=2)
    assert (probes.attention_kernels(model, task).support == 0).any()
    distance_fit = probes.kernel_alignment(model, task, kernels="exp", block="support")
    assert float(distance_fit.tau) == pytest.approx(tau_of(c), rel=distance_rtol)
    result = probes.kernel_alignment(model, task, kernels="exp", block="support", fit="log_lstsq")
    assert float(result.tau) == pytest.approx(tau_of(c), rel=1e-6)


def test_log_lstsq_does_not_score_an_anti_aligned_head_as_a_perfect_kernel():
    """W_K = -W_Q: attention exp(-x . x' / tau). log_lstsq fits beta < 0 and reports tau = NaN
    ("anti-aligned"), but used to build the reference at that negative beta, which reproduces the
    attention: operator distance 0, CKA 1, Spearman 1, and `best_heads` picked this head as the
    layer's closest to the exp kernel. A negative beta is no exp kernel: the metrics are those of
    the admissible reference beta = 0, uniform rows (NumPy: distance 0.65, as fit="distance"
    reports)."""
    model, task = kernel_model([[1.0, 0.5]]), random_task(6, 8, 4, D, seed=3)
    with torch.no_grad():
        model.blocks[0].attn.W_K[0].mul_(-1)  # head 0 anti-aligned, head 1 an exact exp kernel
    result = probes.kernel_alignment(model, task, fit="log_lstsq")
    assert math.isnan(float(result.tau[0, 0]))
    assert not float(result.metrics["exp"]["operator_distance"][0, 0]) < 0.1
    assert result.best_heads("exp")[0][0] == 1
    pattern = probes.attention_kernels(model, task).query[:, 0, 0].numpy()
    attn = pattern / pattern.sum(-1, keepdims=True)
    uniform = np.full_like(attn[0], 1 / attn.shape[-1])
    expected = np.mean([np.linalg.norm(a - uniform, 2) / np.linalg.norm(uniform, 2) for a in attn])
    assert float(result.metrics["exp"]["operator_distance"][0, 0]) == pytest.approx(expected, rel=1e-9)
    distance_fit = probes.kernel_alignment(model, task)
    assert float(distance_fit.tau[0, 0]) == math.inf
    assert float(distance_fit.metrics["exp"]["operator_distance"][0, 0]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("block", ["query", "support"])
def test_log_lstsq_on_uniform_attention_gives_infinite_scales(block):
    """Uniform rows have row-centred log weights that are 0 up to rounding; the regression's
    numerator was then rounding residue of either sign, giving tau = 1.8e16 and sigma = NaN (which
    the docstring reserves for anti-aligned heads) or 4e8. Like fit="distance", it reports beta =
    0: tau = sigma = inf."""
    result = probes.kernel_alignment(kernel_model([[0.0]]), random_task(4, 7, 3, D, seed=2), block=block, fit="log_lstsq")
    assert float(result.tau) == math.inf and float(result.bandwidth) == math.inf


def test_heads_without_attention_on_the_block_get_nan_scales_like_their_metrics():
    """Richardson construction, query block: the heads that serve only support rows put no weight
    on any support key from a query row. Their metrics are NaN (no visible keys); their tau and
    sigma used to be inf, which `KernelAlignment.scale` documents as "the best reference is uniform
    over the keys": a claim about attention these heads do not have. Their scales are NaN, for both
    fits."""
    model = richardson_transformer(n_steps=1, lam=0.1, bandwidth=0.9, step=0.5, dim=D)
    task = random_task(3, 8, 4, D, seed=0)
    silent = (probes.attention_kernels(model, task).query == 0).all(-1).all(-1).all(0)  # [layer, head]
    assert silent.any() and not silent.all()
    for fit in ("distance", "log_lstsq"):
        result = probes.kernel_alignment(model, task, block="query", fit=fit)
        assert torch.isnan(result.metrics["gaussian"]["operator_distance"][silent]).all()
        assert torch.isnan(result.bandwidth[silent]).all() and torch.isnan(result.tau[silent]).all()
        assert torch.isfinite(result.bandwidth[~silent]).all()


def test_summary_flags_a_best_head_that_is_uniform_attention():
    """Negative control: every head attends uniformly (mean pooling, no similarity at all). The
    fitted scales are inf, but the summary's kernel lines and the comparison table used to show only
    distances, 0.000 for both kernels on every block, exactly what the Richardson construction's
    Gaussian heads show. Both now mark such distances "u" and say why in a footnote."""
    diagnosis = probes.diagnose(kernel_model([[0.0], [0.0]]), random_task(20, 6, 3, D, seed=5), kernel="gaussian",
                                kernel_params={"bandwidth": 1.0}, lam=0.1, progress=False, bootstrap=10, algorithms=("cg",),
                                step_sizes="optimal")
    kernel_lines = diagnosis.summary().split("kernel alignment", 1)[1].split("Best:", 1)[0]
    assert "uniform" in kernel_lines or "inf" in kernel_lines
    for kernel in ("exp", "gaussian"):
        assert re.search(rf"^\s+{kernel}\s+(.*)$", kernel_lines, flags=re.M).group(1).split() == ["0.000u", "0.000u"]
    table = probes.compare({"uniform": diagnosis}).summary().splitlines()
    assert table[2].split()[7:9] == ["0.000u", "0.000u"] and "uniform attention" in table[3]


def test_alignment_metrics_nan_error_does_not_advise_a_mask_that_cannot_help():
    """A NaN in K_attn was refused with "clean or mask those entries", but passing mask= with that
    entry masked off is refused the same way (the norms see every entry). The message no longer
    suggests masking."""
    a = np.random.default_rng(0).random((4, 5))
    bad, mask = a.copy(), np.ones((4, 5), dtype=bool)
    bad[0, 0], mask[0, 0] = np.nan, False
    with pytest.raises(ValueError, match="K_attn contains NaN or inf: replace those entries") as error:
        probes.alignment_metrics(bad, a, mask=mask)
    assert "mask" not in str(error.value)
