"""Usage review: are the two other instruments calibrated? Kernel alignment (`probes.kernel_alignment`,
`probes.attention_kernels`, the best-head distances and `u` marks of `diagnose`'s summary) and label
sensitivities (`probes.label_sensitivities`, `probes.solver_sensitivities`, `diagnose(sensitivities=True)`
and its "sens R2").

Alignment: synthetic attention patterns with a known answer, fed through `AttentionKernels`
(row-softmax of beta * S + logit noise, S the inputs' log-similarity; pure-noise near-uniform
heads) and small randomly initialised softmax models. References: the true tau / sigma, a NumPy
row softmax at the fitted scale, NumPy spectral norms and double-centred CKA, SciPy Spearman.
Sensitivities: the CG construction and differentiable table models whose layers are a NumPy-closed-
form fixed-step GD (faithful, passed through a non-linearity, shifted by a y-independent term, or
GD's values with another map's derivative). References: GD's closed-form maps, the chain rule on
them, the KRR map by matrix inverse, central differences of a textbook NumPy (Jacobi-)CG.
Simulation numbers behind these tests: /tmp/review/instruments.md.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import stats

import probes
from table_model import TableModel
from mi_krr.construct import cg_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.solvers import ALGORITHMS, richardson
from mi_krr.tasks import ICLTask
from mi_krr.tasks.samplers import GPRegressionSampler, LinearRegressionSampler
from probes.attention_kernels import AttentionKernels

# ---------------------------------------------------------------- helpers


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def log_similarity(kernel: str, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if kernel == "exp":
        return rows @ keys.swapaxes(-1, -2)
    return -0.5 * ((rows[..., :, None, :] - keys[..., None, :, :]) ** 2).sum(-1)


def inputs_task(batch=32, n=16, m=6, d=2, seed=0):
    rng = np.random.default_rng(seed)
    xs, xq = rng.normal(scale=0.7, size=(batch, n, d)), rng.normal(scale=0.7, size=(batch, m, d))
    task = ICLTask(torch.tensor(xs), torch.tensor(rng.normal(size=(batch, n))), torch.tensor(xq), torch.zeros(batch, m, dtype=torch.float64))
    return task, xs, xq, rng


def given_attention(heads: list[np.ndarray]) -> AttentionKernels:
    """Query blocks `[B, m, n]` per head -> one layer of heads `[B, 1, H, m, n]`."""
    return AttentionKernels(support=None, query=torch.tensor(np.stack(heads, 1)[:, None]), source="pattern")


def numpy_metrics(attn: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean over prompts of the four alignment metrics, by NumPy / SciPy."""
    m, n = attn.shape[-2:]
    H_r, H_c = np.eye(m) - 1 / m, np.eye(n) - 1 / n
    op, cka, sp, rsp = [], [], [], []
    for a, r in zip(attn, ref):
        op.append(np.linalg.norm(a - r, 2) / np.linalg.norm(r, 2))
        ca, cr = H_r @ a @ H_c, H_r @ r @ H_c
        cka.append((ca * cr).sum() / np.linalg.norm(ca) / np.linalg.norm(cr))
        sp.append(stats.spearmanr(a.ravel(), r.ravel()).statistic)
        rsp.append(np.mean([stats.spearmanr(ar, rr).statistic for ar, rr in zip(a, r)]))
    return {"operator_distance": np.mean(op), "cka": np.mean(cka), "spearman": np.mean(sp), "row_spearman": np.mean(rsp)}




LAM, LR, T, L = 0.4, 0.02, 8, 4
STEPS = [0, 2, 4, 6, 8]  # layer l runs GD step 2 l
GD_CANDIDATES = {"gd(lr)": functools.partial(richardson, step=LR), "gd(2lr)": functools.partial(richardson, step=2 * LR),
                 "cg": ALGORITHMS["cg"], "jacobi_cg": ALGORITHMS["jacobi_cg"]}


def gd_maps(task) -> torch.Tensor:
    """Closed form of fixed-step GD on the linear kernel, alpha <- alpha + lr (y - (K + lam I) alpha)
    from 0: the step-t query map K_q sum_{k<t} lr (I - lr A)^k `[B, T+1, m, n]`."""
    x, xq = task.x_support.double(), task.x_query.double()
    K, Kq = x @ x.mT, xq @ x.mT
    eye = torch.eye(K.shape[-1], dtype=K.dtype)
    A, M, P, maps = K + LAM * eye, torch.zeros_like(K), eye.expand_as(K).clone(), [torch.zeros_like(Kq)]
    for _ in range(T):
        M, P = M + LR * P, P @ (eye - LR * A)
        maps.append(Kq @ M)
    return torch.stack(maps, 1)


def gd_values(task) -> torch.Tensor:
    return torch.einsum("blmn,bn->blm", gd_maps(task)[:, STEPS], task.y_support.double())


def gd_task(batch=24):
    return LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.3).sample(batch, n_support=12, n_query=4, seed=3)


def diagnose_table(values, task, bootstrap=100):
    model = TableModel(values, L)
    return probes.diagnose(model, task, algorithms=GD_CANDIDATES, kernel="linear", lam=LAM, n_steps=T, sensitivities=True,
                           kernels=(), bootstrap=bootstrap, progress=False, step_sizes="optimal")["tasks"]


# ---------------------------------------------------------------- kernel alignment: verified behaviour


@pytest.mark.parametrize("kernel", ["gaussian", "exp"])
def test_noisy_kernel_heads_recover_the_true_scale_and_every_metric_matches_numpy_and_scipy(kernel):
    """Attention = row-softmax(S / sigma^2 + eps N(0, 1)) (Gaussian) or (S / tau + eps N) (exp) with
    sigma = tau = 0.5 and eps = 0, 0.3, 1. log_lstsq recovers the scale within 5% at every eps (2% at 64 prompts)
    (logit noise is independent of S); the default distance fit within 20% (it drifts upward
    with eps: 0.50 -> 0.54 (Gaussian) / 0.58 (exp) at eps = 1, 64 prompts of 24 keys); the
    operator distance grows with eps; the four metrics equal NumPy / SciPy at the fitted scale."""
    task, xs, xq, rng = inputs_task()
    S = log_similarity(kernel, xq, xs)
    beta = 1 / 0.5 if kernel == "exp" else 1 / 0.5**2
    noises = [0.0, 0.3, 1.0]
    heads = [softmax(beta * S + eps * rng.normal(size=S.shape)) for eps in noises]
    for fit, rtol in (("log_lstsq", 0.05), ("distance", 0.2)):
        result = probes.kernel_alignment(None, task, kernels=(kernel,), attention=given_attention(heads), fit=fit)
        scale = result.scale[kernel][0].numpy()
        np.testing.assert_allclose(scale, 0.5, rtol=rtol)
        distances = result.metrics[kernel]["operator_distance"][0].numpy()
        assert distances[0] < 1e-8 and distances[0] < distances[1] < distances[2]
        for h, head in enumerate(heads):
            fitted = 1 / scale[h] if kernel == "exp" else 1 / scale[h] ** 2
            expected = numpy_metrics(head, softmax(fitted * S))
            for name, value in expected.items():
                assert float(result.metrics[kernel][name][0, h]) == pytest.approx(value, rel=1e-8, abs=1e-10), (fit, h, name)


# ---------------------------------------------------------------- kernel alignment: findings


def test_a_near_uniform_noise_head_is_not_reported_as_the_block_closest_to_the_kernel_without_a_mark():
    """One block, two heads: head 0 is the Gaussian kernel at sigma = 0.5 with logit noise 1 (it
    ranks keys like the kernel, row Spearman 0.86); head 1 is row-softmax(0.3 N(0, 1)), logits
    unrelated to the inputs. The best-head distance (the summary's and README's 'kernel distance')
    must not present head 1 as the block's closest head to the kernel unless it marks it as
    (near-)uniform; today it picks head 1 (0.18 < 0.62) with no `u` (its fitted sigma is finite)."""
    task, xs, xq, rng = inputs_task()
    S = log_similarity("gaussian", xq, xs)
    kernel_head = softmax(S / 0.25 + 1.0 * rng.normal(size=S.shape))
    noise_head = softmax(0.3 * rng.normal(size=S.shape))
    result = probes.kernel_alignment(None, task, kernels=("gaussian",), attention=given_attention([kernel_head, noise_head]))
    assert float(result.metrics["gaussian"]["row_spearman"][0, 0]) > 0.8  # head 0 ranks keys like the kernel
    assert abs(float(result.metrics["gaussian"]["row_spearman"][0, 1])) < 0.1  # head 1 does not
    head, _ = result.best_heads("gaussian")
    assert head[0] == 0 or bool(result.uniform_best_heads("gaussian")[0])


def test_random_heads_whose_fitted_reference_is_uniform_to_within_5_percent_are_marked_uniform():
    """Freshly initialised 2-block, 4-head softmax models on GP prompts (the negative control the
    README's 'kernel distance' column needs). For each block and kernel, the reference at the
    best head's fitted scale is rebuilt in NumPy; where every row is uniform over the keys to
    within 5% (max |n R_ij - 1| < 0.05), its distance is one to mean pooling, which is what the
    `u` mark is documented to say, so `uniform_best_heads` must be True there."""
    task = GPRegressionSampler(2, kernel="gaussian", bandwidth=0.5, noise_std=0.2).sample(32, n_support=16, n_query=6, seed=0)
    xs, xq = task.x_support.numpy(), task.x_query.numpy()
    near_uniform, marked = 0, 0
    for seed in range(3):
        torch.manual_seed(seed)
        model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=32, n_layers=2, n_heads=4, d_head=8, dtype="float64")).eval()
        result = probes.kernel_alignment(model, task)
        for kernel in ("exp", "gaussian"):
            head, _ = result.best_heads(kernel)
            flags = result.uniform_best_heads(kernel)
            for block in range(2):
                scale = float(result.scale[kernel][block, head[block]])
                if np.isinf(scale):
                    continue
                beta = 1 / scale if kernel == "exp" else 1 / scale**2
                reference = softmax(beta * log_similarity(kernel, xq, xs))
                if np.abs(reference * xs.shape[1] - 1).max() < 0.05:
                    near_uniform += 1
                    marked += bool(flags[block])
    assert near_uniform > 0  # the control has such heads (not vacuous)
    assert marked == near_uniform


# ---------------------------------------------------------------- sensitivities: verified behaviour


def test_on_the_cg_construction_sensitivity_scores_separate_candidates_far_more_than_predictions():
    """The CG construction (3 steps, linear kernel, condition number 10): CG's path R2 and sens R2
    are 1; every rival's sens R2 lies below its path R2 by more than 1 (Jacobi-CG: path 0.79,
    sens -3.6; GD: 0.34 vs -50), so the sensitivities separate what predictions only rank."""
    model = cg_transformer(n_steps=3, lam=0.1, dim=4)
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.3).sample(24, n_support=10, n_query=3, seed=1)
    d = probes.diagnose(model, task, kernel="linear", lam=0.1, n_steps=3, sensitivities=True, kernels=(), bootstrap=100, progress=False,
                        algorithms=("cg", "jacobi_cg", "gd", "heavy_ball"))["tasks"]
    assert d.scores["cg"].score == pytest.approx(1.0, abs=1e-9)
    assert d.scores["cg"].sensitivity_score == pytest.approx(1.0, abs=1e-9)
    for name in ("jacobi_cg", "gd", "heavy_ball"):
        assert d.scores[name].sensitivity_score < d.scores[name].score - 1.0, name


def test_sens_r2_drops_for_a_nonlinear_readout_and_stays_for_a_label_free_offset():
    """Layers = fixed-step GD's step 2l prediction v, (a) passed through v + 0.3 v^3: the model's
    sensitivities equal the chain rule (1 + 0.9 v^2) S_t on GD's closed-form map, and gd(lr)'s
    sens R2 falls below its path R2; (b) plus a y-independent term of the queries: sensitivities
    are GD's maps exactly (sens R2 >= 0.9, read at the prediction alignment) while path R2 collapses below 0.5."""
    task = gd_task()
    nonlinear = lambda t: gd_values(t) + 0.3 * gd_values(t) ** 3  # noqa: E731
    v, maps = gd_values(task).numpy(), gd_maps(task)[:, STEPS].numpy()
    sens = probes.label_sensitivities(TableModel(nonlinear, L), task).numpy()
    np.testing.assert_allclose(sens, (1 + 0.9 * v**2)[..., None] * maps, rtol=1e-10, atol=1e-12)
    d = diagnose_table(nonlinear, task)
    assert d.scores["gd(lr)"].sensitivity_score < d.scores["gd(lr)"].score - 0.1
    offset = lambda t: gd_values(t) + 0.3 * t.x_query.double().sum(-1)[:, None] * torch.arange(L + 1)[None, :, None] / L  # noqa: E731
    d = diagnose_table(offset, task)
    assert d.scores["gd(lr)"].sensitivity_score >= 0.9 > 0.5 > d.scores["gd(lr)"].score


def test_cg_sensitivities_past_exact_convergence_are_the_krr_map_and_early_jacobi_cg_ones_match_numpy_pcg():
    """Linear kernel of 12 points in d = 4: K + lam I has 5 distinct eigenvalues, so CG converges
    exactly at step 5 and its later residuals are rounding. CG's sensitivities at steps 5-10 equal
    the KRR map K_q (K + lam I)^-1 (matrix inverse) to 1e-10; Jacobi-CG's at step 3 equal central
    differences of a textbook NumPy preconditioned CG."""
    task = LinearRegressionSampler(dim=4, condition_number=10.0, noise_std=0.3).sample(3, n_support=12, n_query=4, seed=3)
    x, xq, y = task.x_support.double(), task.x_query.double(), task.y_support.double()
    K, Kq = x @ x.mT, xq @ x.mT
    krr_map = (Kq @ torch.linalg.inv(K + LAM * torch.eye(12, dtype=torch.float64))).numpy()
    cg_sens = probes.solver_sensitivities("cg", K, Kq, LAM, 10, y=y).numpy()
    np.testing.assert_allclose(cg_sens[:, 5:], np.broadcast_to(krr_map[:, None], cg_sens[:, 5:].shape), atol=1e-10)

    def pcg(Kb, Kqb, yb, steps):
        A = Kb + LAM * np.eye(len(yb))
        inverse_diagonal = 1 / np.diag(A)
        alpha, r = np.zeros(len(yb)), yb.copy()
        z = inverse_diagonal * r
        p = z.copy()
        for _ in range(steps):
            rz = r @ z
            step = rz / (p @ A @ p)
            alpha, r = alpha + step * p, r - step * (A @ p)
            z = inverse_diagonal * r
            p = z + (r @ z) / rz * p
        return Kqb @ alpha

    jacobi = probes.solver_sensitivities("jacobi_cg", K, Kq, LAM, 3, y=y).numpy()
    for b in range(3):
        Kb, Kqb, yb = K[b].numpy(), Kq[b].numpy(), y[b].numpy()
        fd = np.stack([(pcg(Kb, Kqb, yb + 1e-6 * e, 3) - pcg(Kb, Kqb, yb - 1e-6 * e, 3)) / 2e-6 for e in np.eye(12)], -1)
        np.testing.assert_allclose(jacobi[b, 3], fd, atol=1e-7)


# ---------------------------------------------------------------- sensitivities: findings


def test_an_identified_algorithm_whose_sensitivities_the_model_does_not_share_is_flagged():
    """Layers whose values are fixed-step GD's predictions but whose derivative in y is mean
    pooling (value of one map, gradient of another): path R2 1 for gd(lr), sens R2 < 0. A
    diagnosis run with sensitivities=True must not present 'identified as gd(lr)' without saying
    that the model's label sensitivities disagree with gd(lr)'s (a note, or the verdict text)."""
    task = gd_task()

    def value_only(t):
        v = gd_values(t)
        pooled = t.y_support.double().mean(-1)[:, None, None].expand_as(v)
        return v.detach() + pooled - pooled.detach()

    d = diagnose_table(value_only, task)
    assert d.scores["gd(lr)"].score == pytest.approx(1.0, abs=1e-9)
    assert d.scores["gd(lr)"].sensitivity_score < 0
    assert not d.verdict.identified
    sens = d.scores["gd(lr)"].sensitivity_score
    assert f"the layers' label sensitivities disagree with gd(lr)'s (sensitivity path R2 {sens:.4f} < 0.9" in d.verdict.message
