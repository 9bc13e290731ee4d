"""Usage review: moving from the shipped 4-layer toy models to bigger settings.

Covers freshly initialised `ICLTransformer`s with 8-12 layers and 8 heads, prompts with many
support points (n = 96-130) and batch sizes that divide nothing (1, 3, 7), and what the probes
cost there: the read-out lens, attention kernels, kernel alignment, label sensitivities (model and
solver side), scores with many layers, the monotone layer -> step alignment when layers outnumber
steps and vice versa, and `diagnose`'s progress bar. The five problems it found (solver
sensitivities copying K per label column, Newton's n-fold work, kernel alignment reading the
support block it never compares, label sensitivities holding every prompt's graph, the progress
bar naming the finished stage) are fixed, and their tests assert the fixes.

References, all independent of the library's own outputs:
- a NumPy forward of `ICLTransformer` written from its state dict (LayerNorm, softmax attention
  with the concat mask, GELU MLP, final norm and read-out) for the lens and the attention blocks;
- central finite differences of the lens in one support label for `label_sensitivities`;
- NumPy row-normalised Gaussian kernels, spectral norms and SciPy Spearman correlations for
  `kernel_alignment`'s per-prompt metrics;
- the Newton-Schulz matrices M_t built in NumPy for its sensitivities (K_query M_{t-1});
- closed-form alignments of synthetic layer predictions that copy known solver steps;
- memory and work measured with torch's own counters: the profiler's allocation records (live
  bytes in time order), a dispatch mode recording the largest tensor any op creates, and
  `torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import probes
from benchmarks.bench_probes import torch_peak_mb  # the profiler-based peak the benchmark reports
from icl_numpy_forward import numpy_lens_and_patterns
from mi_krr.kernels import kernel_matrix
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import GPRegressionSampler

diagnose_module = importlib.import_module("probes.diagnose")  # `probes.diagnose` is the function


# ----------------------------------------------------------------------------- helpers


def fresh_model(n_layers=8, d_model=64, n_heads=8, n_dims=3, dtype="float32", seed=0) -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(n_dims=n_dims, d_model=d_model, n_layers=n_layers, n_heads=n_heads, dtype=dtype)).eval()


def gp_task(batch, n_support, n_query, dim=3, seed=2, dtype=torch.float32):
    return GPRegressionSampler(dim=dim, noise_std=0.2).sample(batch, n_support, n_query, seed=seed, dtype=dtype)


def numpy_forward(model: ICLTransformer, task, b: int):
    """Per-layer read-out lens `[L + 1, m]` and every layer's attention pattern `[H, S, S]` of
    prompt b, from the state dict (`icl_numpy_forward`)."""
    return numpy_lens_and_patterns(model, *(t[b].double().numpy() for t in (task.x_support, task.y_support, task.x_query)))


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) any torch op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def largest_tensor_bytes(run) -> int:
    with LargestTensor() as mode:
        run()
    return mode.largest


def gaussian_system(batch, n, m, seed=0, lam=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(batch, m, 2, generator=g, dtype=torch.float64)
    y = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return kernel_matrix("gaussian", x, bandwidth=1.0), kernel_matrix("gaussian", xq, x, bandwidth=1.0), y, lam


# ----------------------------------------------------------------------------- correct numbers at scale


def test_lens_and_attention_blocks_of_an_8_layer_8_head_model_match_a_numpy_forward_at_130_support_points_and_batch_3():
    model = fresh_model(n_layers=8, d_model=64, n_heads=8, dtype="float64")
    task = gp_task(3, 130, 7, dtype=torch.float64)
    lens = probes.layer_predictions(model, task).numpy()
    kernels = probes.attention_kernels(model, task)
    assert lens.shape == (3, 9, 7)
    assert kernels.support.shape == (3, 8, 8, 130, 130) and kernels.query.shape == (3, 8, 8, 7, 130)
    n = 130
    for b in (0, 2):
        ref_lens, patterns = numpy_forward(model, task, b)
        np.testing.assert_allclose(lens[b], ref_lens, rtol=0, atol=1e-12)
        for layer in (0, 5, 7):
            np.testing.assert_allclose(kernels.query[b, layer].numpy(), patterns[layer][:, n:, :n], rtol=0, atol=1e-14)
            np.testing.assert_allclose(kernels.support[b, layer].numpy(), patterns[layer][:, :n, :n], rtol=0, atol=1e-14)
    # a query row also attends to itself: its weight on the support keys is 1 minus that self weight
    self_weight = np.stack([patterns[3][:, n + j, n + j] for j in range(7)], axis=-1)
    np.testing.assert_allclose(kernels.query[2, 3].sum(-1).numpy(), 1 - self_weight, atol=1e-14)


def test_label_sensitivities_of_an_8_layer_model_at_130_support_points_match_finite_differences_with_a_ragged_chunk():
    """3 layers x 3 queries = 9 rows taken 5 at a time (the last chunk short), batch of 3."""
    model = fresh_model(n_layers=8, d_model=32, n_heads=8, dtype="float64")
    task = gp_task(3, 130, 3, dtype=torch.float64)
    sens = probes.label_sensitivities(model, task, layers=[0, 3, 8], chunk_size=5).numpy()
    assert sens.shape == (3, 3, 3, 130)
    assert np.abs(sens[:, 0]).max() == 0.0  # the embedding row of a query token carries no label

    def lens(b, i, delta, layer, j):
        y = task.y_support.clone()
        y[b, i] += delta
        return probes.layer_predictions(model, dataclasses.replace(task, y_support=y), layers=[layer])[b, 0, j].item()

    h = 1e-5
    for b, row, layer, j, i in [(2, 1, 3, 1, 77), (0, 2, 8, 2, 129), (1, 2, 8, 0, 0)]:
        fd = (lens(b, i, h, layer, j) - lens(b, i, -h, layer, j)) / (2 * h)
        assert sens[b, row, j, i] == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_kernel_alignment_per_prompt_metrics_at_200_support_points_match_numpy_at_the_fitted_scale():
    model = fresh_model(n_layers=8, d_model=64, n_heads=8)
    task = gp_task(3, 200, 9)
    alignment = probes.kernel_alignment(model, task, kernels=("exp", "gaussian"))
    attention = probes.attention_kernels(model, task)
    checked = 0
    for b, layer, head in [(2, 7, 5), (1, 4, 0), (0, 6, 2)]:
        attn = attention.query[b, layer, head].double().numpy()
        attn = attn / attn.sum(1, keepdims=True)
        xs, xq = task.x_support[b].double().numpy(), task.x_query[b].double().numpy()
        sigma, tau = alignment.bandwidth[layer, head].item(), alignment.tau[layer, head].item()
        references = {
            "gaussian": np.exp(-((xq[:, None] - xs[None]) ** 2).sum(-1) / (2 * sigma**2)),
            "exp": np.exp(xq @ xs.T / tau),
        }
        for kernel, ref in references.items():
            ref = ref / ref.sum(1, keepdims=True)
            distance = np.linalg.norm(attn - ref, 2) / np.linalg.norm(ref, 2)
            assert alignment.per_prompt[kernel]["operator_distance"][b, layer, head].item() == pytest.approx(distance, rel=1e-9)
            if np.isfinite(sigma if kernel == "gaussian" else tau):
                rows = np.mean([spearmanr(attn[i], ref[i]).correlation for i in range(len(attn))])
                assert alignment.per_prompt[kernel]["row_spearman"][b, layer, head].item() == pytest.approx(rows, rel=1e-9)
                checked += 1
    assert checked >= 2  # at least one finite-scale head was compared on ranks


def test_monotone_alignment_when_12_layers_outnumber_4_steps_and_when_60_steps_outnumber_the_layers():
    """Synthetic layers copying known steps of a trajectory: the alignment must recover them, and
    the path R2 be 1 (layers past the last step pile up on it)."""
    rng = np.random.default_rng(0)
    batch, m = 7, 5
    for n_steps, copied in [(4, [min(layer, 4) for layer in range(13)]), (60, [5 * layer for layer in range(13)])]:
        growth = np.linspace(0.0, 1.0, n_steps + 1) ** 0.5  # distinct steps, step 0 = 0
        target = rng.normal(size=(batch, 1, m))
        steps = growth[None, :, None] * target + 0.01 * rng.normal(size=(batch, n_steps + 1, m)) * growth[None, :, None]
        layers = steps[:, copied]
        score = probes.score_algorithms(layers, {"a": steps}, steps[:, -1], bootstrap=50, seed=1)["a"]
        np.testing.assert_array_equal(score.aligned_steps, copied)
        assert score.score == pytest.approx(1.0, abs=1e-12)
        assert score.score_ci == pytest.approx((1.0, 1.0), abs=1e-12)


def test_diagnose_on_a_batch_of_one_prompt_with_optimal_steps_gives_shapes_and_no_verdict():
    model = fresh_model(n_layers=8, d_model=32, n_heads=8, n_dims=2)
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(1, 96, 5, seed=3)
    diagnosis = probes.diagnose(model, task, step_sizes="optimal", kernels=("gaussian",), bootstrap=100, progress=False)
    result = diagnosis["tasks"]
    assert result.layer_predictions.shape == (1, 9, 5)
    assert result.kernel_alignment.per_prompt["gaussian"]["operator_distance"].shape == (1, 8, 8)
    assert not result.verdict.identified
    assert all(score.n_prompts == 1 for score in result.scores.values())
    with torch.no_grad():
        np.testing.assert_allclose(result.layer_predictions[:, -1], model.predict(task).double().numpy(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- memory and work


def test_streaming_lens_on_a_12_layer_model_peaks_at_the_bare_forward_while_run_with_cache_peaks_far_above():
    """The README's promise, measured with torch's allocation records: the read-out lens of all
    13 residual indices holds no more than a bare forward (within 10%); run_with_cache of every
    hook, the pitfall it avoids, holds several times more (so the measure can see the difference)."""
    model = fresh_model(n_layers=12, d_model=32, n_heads=4, n_dims=2)
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(7, 96, 4, seed=1)

    def forward():
        with torch.no_grad():
            model.predict(task)

    def cache():
        with torch.no_grad():
            model.run_with_cache(model.encode(task).tokens)

    bare = torch_peak_mb(forward)
    lens = torch_peak_mb(lambda: probes.layer_predictions(model, task))
    assert lens <= 1.1 * bare
    assert torch_peak_mb(cache) >= 4 * bare


def test_kernel_alignment_of_the_query_block_builds_no_support_block():
    """kernel_alignment with attention=None used to read both of attention_kernels' blocks, so
    every layer's support x support block [B, L, H, n, n] was stacked and kept though the default
    block="query" compares only [B, L, H, m, n] (`benchmarks/bench_scale.py` measures both
    codes' peak memory at 256 support points).
    Now no tensor reaches half the support block's size (the largest left is the scale fit's grid,
    [grid points, B * m * n]); attention_kernels(blocks=("query",)) reads that block alone."""
    model = fresh_model(n_layers=8, d_model=32, n_heads=4, n_dims=2)
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(3, 60, 4, seed=1)
    support_block_bytes = 3 * 8 * 4 * 60 * 60 * 4  # float32 [B, L, H, n, n]
    aligned = largest_tensor_bytes(lambda: probes.kernel_alignment(model, task, kernels=("gaussian",), block="query"))
    assert aligned < support_block_bytes / 2
    query_only = probes.attention_kernels(model, task, blocks=("query",))
    both = probes.attention_kernels(model, task)
    assert query_only.support is None and query_only.query.shape == (3, 8, 4, 4, 60)
    assert torch.equal(query_only.query, both.query)
    with pytest.raises(ValueError, match="blocks must name at least one"):
        probes.attention_kernels(model, task, blocks=())


def test_solver_sensitivities_of_linear_solvers_copy_k_in_bounded_blocks_of_columns(monkeypatch):
    """The n identity columns run as a batch with K.expand(n, B, n, n), which the solvers turn into
    n copies of K (`benchmarks/bench_scale.py` measures both codes). They now run in blocks of
    columns whose copies fit SENSITIVITY_COLUMN_BYTES (64 MiB by default); with the budget set to
    four kernels' worth, no tensor exceeds eight kernels or results, and the sensitivities equal
    the one-block ones, which equal a NumPy GD loop run on each identity column."""
    sensitivity_module = importlib.import_module("probes.sensitivity")
    K, K_query, y, lam = gaussian_system(2, 48, 6)
    one_block = {algorithm: probes.solver_sensitivities(algorithm, K, K_query, lam, 8) for algorithm in ("gd", "richardson_rowsum", "chebyshev", "heavy_ball")}
    monkeypatch.setattr(sensitivity_module, "SENSITIVITY_COLUMN_BYTES", 4 * K[0].numel() * 8)
    out_bytes = 2 * 9 * 6 * 48 * 8
    for algorithm, expected in one_block.items():
        largest = largest_tensor_bytes(lambda: probes.solver_sensitivities(algorithm, K, K_query, lam, 8))
        assert largest <= 8 * max(K.numel() * 8, out_bytes), algorithm
        torch.testing.assert_close(probes.solver_sensitivities(algorithm, K, K_query, lam, 8), expected, rtol=1e-12, atol=1e-14)
    A = K[1].numpy() + lam * np.eye(48)
    mu = np.linalg.eigvalsh(A)
    step, alpha, reference = 2 / (mu[0] + mu[-1]), np.zeros((48, 48)), [np.zeros((6, 48))]
    for _ in range(8):
        alpha = alpha + step * (np.eye(48) - A @ alpha)  # column i: GD on the label vector e_i
        reference.append(K_query[1].numpy() @ alpha)
    np.testing.assert_allclose(one_block["gd"][1].numpy(), np.array(reference), rtol=0, atol=1e-12)


def test_newton_sensitivities_equal_k_query_times_the_newton_schulz_matrices():
    K, K_query, y, lam = gaussian_system(2, 40, 5, seed=1)
    T = 7
    sens = probes.solver_sensitivities("newton", K, K_query, lam, T).numpy()
    assert sens.shape == (2, T + 1, 5, 40)
    for b in range(2):
        A = K[b].numpy() + lam * np.eye(40)
        eig = np.linalg.eigvalsh(A)
        c = 2.0 / ((1 + 4 * 40 * np.finfo(float).eps) * eig[-1] ** 2 + eig[0] ** 2)
        M = c * A
        np.testing.assert_allclose(sens[b, 0], 0.0)
        for t in range(1, T + 1):
            np.testing.assert_allclose(sens[b, t], K_query[b].numpy() @ M, rtol=1e-9, atol=1e-12)
            M = 2 * M - M @ A @ M


def test_newton_sensitivities_cost_no_more_than_a_few_newton_schulz_runs():
    """Newton-Schulz's step-t map is the matrix K_query M_{t-1} itself: one run of the iteration
    (2 n^3 multiply-adds per matrix product, two per step) gives every sensitivity. The identity
    column trick used before ran the matrix iteration n times over (`benchmarks/bench_scale.py`
    times both codes)."""
    B, n, T = 2, 48, 8
    K, K_query, y, lam = gaussian_system(B, n, 6)
    with FlopCounterMode(display=False) as counter:
        probes.solver_sensitivities("newton", K, K_query, lam, T)
    one_run = B * T * 2 * (2 * n**3)
    assert counter.get_total_flops() <= 4 * one_run


def test_label_sensitivities_in_passes_of_few_prompts_keep_peak_memory_flat_and_the_numbers():
    """Prompts are independent (the docstring says so), so the Jacobian can be taken a few prompts
    at a time at the same total cost; in one pass the graph holds every prompt's activations
    (`benchmarks/bench_scale.py` measures both ways on a 12-layer, width-256 model).
    Here: a 12-layer toy model; with prompts_per_pass=2 the peak at B = 8 stays within 2x the peak
    at B = 2 (one pass over all 8 prompts: ~4x), and the result equals the one-pass result (which
    the other tests check against finite differences) to float32 rounding."""
    model = fresh_model(n_layers=12, d_model=32, n_heads=4, n_dims=2)
    sampler = GPRegressionSampler(dim=2, noise_std=0.2)
    small, large = sampler.sample(2, 48, 2, seed=1), sampler.sample(8, 48, 2, seed=1)
    peak_small = torch_peak_mb(lambda: probes.label_sensitivities(model, small, layers=[1, 12]))
    peak_one_pass = torch_peak_mb(lambda: probes.label_sensitivities(model, large, layers=[1, 12]))
    peak_passes = torch_peak_mb(lambda: probes.label_sensitivities(model, large, layers=[1, 12], prompts_per_pass=2))
    assert peak_passes <= 2 * peak_small < peak_one_pass
    one_pass = probes.label_sensitivities(model, large, layers=[1, 12])
    in_passes = probes.label_sensitivities(model, large, layers=[1, 12], prompts_per_pass=3, progress=True)
    torch.testing.assert_close(in_passes, one_pass, rtol=1e-5, atol=1e-6 * float(one_pass.abs().max()))
    with pytest.raises(ValueError, match="prompts_per_pass must be an integer >= 1"):
        probes.label_sensitivities(model, large, prompts_per_pass=0)


# ----------------------------------------------------------------------------- progress


def test_diagnose_progress_bar_names_the_stage_that_is_running(monkeypatch):
    """While a stage runs the bar names it: before, it named the stage just finished, so a long
    kernel alignment (6 s at n = 128 on a 12-layer model) showed 'tasks: sensitivities'."""
    bars = []

    class RecordingBar(diagnose_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.postfix_text = ""
            bars.append(self)

        def set_postfix_str(self, s="", refresh=True):
            self.postfix_text = s
            return super().set_postfix_str(s, refresh)

    seen = {}
    original_alignment, original_sensitivities = diagnose_module.kernel_alignment, diagnose_module.label_sensitivities

    def alignment(*args, **kwargs):
        seen["kernel alignment"] = bars[-1].postfix_text
        return original_alignment(*args, **kwargs)

    def sensitivities(*args, **kwargs):
        seen["sensitivities"] = bars[-1].postfix_text
        return original_sensitivities(*args, **kwargs)

    def kernel_matrix(*args, **kwargs):  # first called by the first stage, "KRR system"
        seen.setdefault("KRR system", bars[-1].postfix_text if bars else "")
        return original_kernel_matrix(*args, **kwargs)

    original_kernel_matrix = diagnose_module.kernel_matrix
    monkeypatch.setattr(diagnose_module, "tqdm", RecordingBar)
    monkeypatch.setattr(diagnose_module, "kernel_alignment", alignment)
    monkeypatch.setattr(diagnose_module, "label_sensitivities", sensitivities)
    monkeypatch.setattr(diagnose_module, "kernel_matrix", kernel_matrix)
    model = fresh_model(n_layers=2, d_model=16, n_heads=2, n_dims=2)
    task = GPRegressionSampler(dim=2, noise_std=0.2).sample(4, 8, 2, seed=0)
    probes.diagnose(model, task, algorithms=("gd", "cg"), n_steps=4, kernels=("gaussian",), sensitivities=True, bootstrap=0,
                    step_sizes="optimal", progress=True)
    assert seen["KRR system"] == "tasks: KRR system"
    assert seen["sensitivities"] == "tasks: sensitivities"
    assert seen["kernel alignment"] == "tasks: kernel alignment"
