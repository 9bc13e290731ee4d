"""Mutation review of session 13's changes in `probes/`: the overflow limit of the scores and of
`path_scores`, heavy ball's momentum grid, the withheld verdict and the n_steps hint, the ridge
probes' R2 and penalty choice, the scale fit's rule for a similarity that cannot tell the keys
apart, the -inf of blocked attention scores, and the interval text of the reports. Every test
failed on a hand-planted mutant the existing tests let through; the references are closed forms
(float64's max from NumPy's finfo), NumPy ridge solves and sums, softmax rows built in NumPy,
counts made by hand from the constructed inputs, and exact strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from probes.diagnose import _check_layer_predictions
from probes.fitted_probes import _fit_ridge, _r2
from probes.identifiability import MIN_VERDICT_PROMPTS, identifiability_verdict
from probes.alignment_metrics import alignment_metrics
from probes.kernel_scale_fit import fit_inverse_scale
from probes.report import interval_text
from probes.scoring import overflow_limit, score_algorithms
from probes.step_sizes import MOMENTUM_GRID, path_score
from probes.streaming import _blocked_to_minus_inf
from prompts import random_task

SQRT_MAX = float(np.sqrt(np.finfo(np.float64).max))


def _trajectory(rng, batch, n_steps, m):
    """Random step predictions `[batch, n_steps + 1, m]`: step 0 = 0, then a random walk."""
    steps = np.cumsum(rng.normal(size=(batch, n_steps + 1, m)), axis=1)
    steps[:, 0] = 0.0
    return steps


# ------------------------------------------------------------------------------------------------
# probes.scoring: overflow_limit and the refusal of diverging trajectories


def test_overflow_limit_of_no_values_is_that_of_one_value():
    """n_values = 0 (nothing to sum) must not divide by zero: the limit is sqrt(float64 max) / 2,
    as for one value (NumPy's finfo)."""
    assert overflow_limit(0) == pytest.approx(SQRT_MAX / 2, rel=1e-15)
    assert overflow_limit(0) == overflow_limit(1)


def test_score_algorithms_refuses_a_trajectory_diverging_to_large_negative_values():
    """A trajectory whose values run to -1e200 (finite, negative) diverges as much as one at
    +1e200: it must be refused naming it, not scored."""
    rng = np.random.default_rng(1)
    layers, krr = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 2))
    sane = np.concatenate([np.zeros((6, 1, 2)), np.repeat(krr[:, None], 4, axis=1)], axis=1)
    sane[..., 1:, :] = np.abs(sane[..., 1:, :]) + 0.1  # positive everywhere but step 0
    with pytest.raises(ValueError, match=r"step_preds\['down'\] holds values beyond"):
        score_algorithms(layers, {"sane": sane, "down": -1e200 * sane}, krr, bootstrap=0)


def test_score_algorithms_limit_counts_the_layer_values_too():
    """The limit is sqrt(max) / (2 n) with n every value of one scoring: B L' m layer values plus
    B (T+1) m step values (here 24 + 24 = 48). A step value 1.5x that limit, which is still below
    the limit the step values alone would give (n = 24), must be refused."""
    rng = np.random.default_rng(2)
    layers, krr = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 2))
    steps = _trajectory(rng, 4, 2, 2)
    limit = SQRT_MAX / (2 * (4 * 3 * 2 + 4 * 3 * 2))
    big = steps / np.abs(steps).max() * 1.5 * limit
    assert np.abs(big).max() < SQRT_MAX / (2 * 24)  # the premise: below the step-only limit
    with pytest.raises(ValueError, match=r"step_preds\['big'\] holds values beyond"):
        score_algorithms(layers, {"big": big}, krr, bootstrap=0)


# ------------------------------------------------------------------------------------------------
# probes.step_sizes: the diverged test of path_scores, the momentum grid


def test_path_score_limit_counts_the_layer_values_too():
    """`path_score` is -inf for a trajectory beyond sqrt(max) / (2 n), n = candidate values plus
    layer values (here 2 x 4 x 2 + 2 x 3 x 2 = 28). Layers equal to steps 0-2 of a trajectory score
    1 at its own scale; scaled to 1.5x that limit (below the limit of the candidate values alone,
    n = 16) it counts as diverged: -inf."""
    rng = np.random.default_rng(3)
    steps = _trajectory(rng, 2, 3, 2)
    limit = SQRT_MAX / (2 * (2 * 4 * 2 + 2 * 3 * 2))
    big = steps / np.abs(steps).max() * 1.5 * limit
    assert np.abs(big).max() < SQRT_MAX / (2 * 16)  # the premise
    assert path_score(steps[:, :3], steps, np.array([1, 2])) == pytest.approx(1.0, abs=1e-12)
    assert path_score(big[:, :3], big, np.array([1, 2])) == -np.inf


def test_momentum_grid_starts_at_zero():
    """Heavy ball's momentum grid is 0 (GD, which heavy ball contains) and 1 - beta log-spaced from
    0.9 to 0.03 in 11 values, as the module docstring states."""
    one_minus = 0.9 * (0.03 / 0.9) ** (np.arange(11) / 10)  # closed form of the log spacing
    np.testing.assert_allclose(MOMENTUM_GRID, np.concatenate([[0.0], 1 - one_minus]), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# probes.identifiability: withheld verdicts and the n_steps hint


def _verdict_inputs(layer_rows, n_steps=4, batch=MIN_VERDICT_PROMPTS + 4, bootstrap=200, seed=0):
    """Scores of two candidates, "a" and "b" (independent random walks), against layer predictions
    built from "a": `layer_rows` lists, per layer, the step of "a" that layer equals."""
    rng = np.random.default_rng(seed)
    a, b = _trajectory(rng, batch, n_steps, 3), _trajectory(rng, batch, n_steps, 3)
    layers = np.stack([a[:, step] for step in layer_rows], axis=1)
    preds = {"a": a, "b": b}
    return score_algorithms(layers, preds, a[:, -1], bootstrap=bootstrap, seed=1), preds


def test_withheld_verdict_identifies_nothing_and_says_why():
    """Layers equal to steps 1, 2, 3 of "a": identified as "a" without `withheld`; with it, nothing
    is identified, `withheld` is kept and the message states it instead of an identification."""
    scores, preds = _verdict_inputs([0, 1, 2, 3])
    plain = identifiability_verdict(scores, preds)
    assert plain.identified and plain.best == "a"  # the premise
    verdict = identifiability_verdict(scores, preds, withheld="a reason")
    assert not verdict.identified and verdict.withheld == "a reason" and verdict.best == "a"
    assert "Verdict: withheld: a reason" in verdict.message
    assert "identified as" not in verdict.message


def test_n_steps_hint_names_the_piled_layers_and_the_last_step():
    """Layers 1-3 all equal "a"'s last step T = 4 and the verdict is withheld: the message must say
    that a's 3 deepest scored layers align with its last step (T = 4) and point at n_steps."""
    scores, preds = _verdict_inputs([0, 4, 4, 4])
    assert scores["a"].aligned_steps.tolist() == [0, 4, 4, 4]  # the premise
    message = identifiability_verdict(scores, preds, withheld="a reason").message
    assert "a's 3 deepest scored layers all align with its last step (T = 4)" in message
    assert "n_steps" in message


def test_no_n_steps_hint_when_identified():
    """Layers 2-3 on a's last step after layer 1 on step 1, identified as "a": the verdict needs no
    n_steps hint. (Layers 1-3 all on the last step hold one state: not identified since session 22.)"""
    scores, preds = _verdict_inputs([0, 1, 4, 4])
    verdict = identifiability_verdict(scores, preds)
    assert verdict.identified and verdict.best == "a"
    assert "n_steps" not in verdict.message


def test_no_n_steps_hint_for_one_piled_scored_layer():
    """Layers 0 and 1 both equal a's last step: only layer 1 is scored, one layer on step T is no
    pile-up (layer 0, never scored, does not count), so no n_steps hint even though nothing is
    identified (no bootstrap)."""
    scores, preds = _verdict_inputs([4, 4], bootstrap=0)
    assert scores["a"].aligned_steps.tolist() == [4, 4]  # the premise
    verdict = identifiability_verdict(scores, preds)
    assert not verdict.identified
    assert "n_steps" not in verdict.message


def test_no_n_steps_hint_for_zero_step_trajectories():
    """T = 0 (one step per trajectory): every layer aligns with step 0, which is no sign of too few
    steps, so no n_steps hint."""
    rng = np.random.default_rng(5)
    preds = {name: rng.normal(size=(8, 1, 3)) for name in ("a", "b")}
    layers = np.stack([preds["a"][:, 0] + 0.1 * rng.normal(size=(8, 3)) for _ in range(3)], axis=1)
    scores = score_algorithms(layers, preds, preds["a"][:, 0], bootstrap=0)
    verdict = identifiability_verdict(scores, preds)
    assert not verdict.identified
    assert "n_steps" not in verdict.message


# ------------------------------------------------------------------------------------------------
# probes.report: interval_text


def test_interval_text_rounds_to_the_given_digits_and_dashes_only_a_missing_interval():
    """"[low, high]" with `digits` decimals (Python's own rounding of the literals), "-" only when
    both ends are NaN (bootstrap=0); a half-NaN interval is shown as it is."""
    assert interval_text((0.123456, 0.987654), 3) == "[0.123, 0.988]"
    assert interval_text((0.123456, 0.987654), 4) == "[0.1235, 0.9877]"
    assert interval_text((-1.5, 2.0), 1) == "[-1.5, 2.0]"
    assert interval_text((float("nan"), float("nan")), 3) == "-"
    assert interval_text((float("nan"), 0.5), 2) == "[nan, 0.50]"


# ------------------------------------------------------------------------------------------------
# probes.diagnose: the overflow limit of layer and step predictions


def _tiny_model() -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")
    return ICLTransformer(cfg).eval()


def test_check_layer_predictions_names_the_layers_beyond_the_limit_and_the_rest():
    """Layer predictions `[B=4, L'=3, m=2]` finite everywhere, layer 2 at 1e120 beyond a limit of
    1e100: the error names layers [2] (the layers, not the prompts) and suggests layers=[0, 1]."""
    layer_pred = np.ones((4, 3, 2))
    layer_pred[:, 2] = 1e120
    with pytest.raises(ValueError) as info:
        _check_layer_predictions("tasks", layer_pred, [0, 1, 2], 1e100)
    message = str(info.value)
    assert "layers [2] are not finite" in message and "layers=[0, 1]" in message, message
    _check_layer_predictions("tasks", layer_pred, [0, 1, 2], 1e121)  # within the limit: no error


@pytest.mark.parametrize("factor", [1.1, 0.9])
def test_diagnose_limit_counts_every_layer_and_step_value_of_the_scoring(factor):
    """A custom solver whose predictions are CG's rescaled to `factor` x sqrt(max) / (2 n), n the
    values one scoring sums: B (L+1) m layer values + A B (T+1) m step values (A = 2 candidates;
    here 8 x 3 x 2 + 2 x 8 x 4 x 2 = 176). At 1.1x it is left out with a note (not an error from
    the scores); at 0.9x it is scored."""
    from mi_krr.solvers import ALGORITHMS

    limit = SQRT_MAX / (2 * (8 * 3 * 2 + 2 * 8 * 4 * 2))

    def scaled(K, y, lam, n_steps, K_query=None):
        trajectory = ALGORITHMS["cg"](K, y, lam, n_steps, K_query=K_query)
        trajectory.pred = trajectory.pred / trajectory.pred.abs().max() * (factor * limit)
        return trajectory

    diagnosis = probes.diagnose(
        _tiny_model(), random_task(8, 5, 2, 2, seed=2), kernel="gaussian", lam=0.1, n_steps=3,
        algorithms={"scaled": scaled, "cg": ALGORITHMS["cg"]}, kernels=(), bootstrap=0, progress=False,
    )["tasks"]
    if factor > 1:
        assert list(diagnosis.scores) == ["cg"]
        assert any("scaled" in note and "diverges" in note for note in diagnosis.notes)
    else:
        assert list(diagnosis.scores) == ["scaled", "cg"]


# ------------------------------------------------------------------------------------------------
# probes.fitted_probes: the penalty chosen by validation SSE, and R2's NaN rule


def _numpy_ridge(x, t, penalty):
    """argmin mean (x w + b - t)^2 + penalty |w|^2 (intercept unpenalised), by NumPy's solve."""
    x_mean, t_mean = x.mean(0), t.mean()
    xc = x - x_mean
    w = np.linalg.solve(xc.T @ xc / len(x) + penalty * np.eye(x.shape[1]), xc.T @ (t - t_mean) / len(x))
    return w, t_mean - x_mean @ w


def test_fit_ridge_picks_the_penalty_of_least_validation_sse_and_reports_its_r2():
    """Heavy-tailed targets on 4 training and 2 validation prompts, penalties 1e-3, 0.1, 1, 10 x the
    mean eigenvalue of the centred training features: NumPy's ridge per penalty, the one of least
    validation SSE (here the third: not the first, not the one of largest SSE, and not the one of
    least absolute error), its R2 on the validation targets, and the penalty rescaled to all
    prompts' mean eigenvalue."""
    rng = np.random.default_rng(0)
    batch, m, d = 6, 3, 4
    features = rng.normal(size=(batch, 1, m, d))
    target = features[:, 0] @ rng.normal(size=d) + rng.standard_t(1.5, size=(batch, m))
    grid = np.array([1e-3, 1e-1, 1.0, 10.0])
    x_train, t_train = features[:4, 0].reshape(-1, d), target[:4].ravel()
    x_val, t_val = features[4:, 0].reshape(-1, d), target[4:].ravel()

    def mean_eigenvalue(x):
        return np.sum((x - x.mean(0)) ** 2) / x.size

    residuals = []
    for lam in grid:
        w, b = _numpy_ridge(x_train, t_train, lam * mean_eigenvalue(x_train))
        residuals.append(x_val @ w + b - t_val)
    sse = [np.sum(r**2) for r in residuals]
    best = int(np.argmin(sse))
    assert best == 2 and int(np.argmin([np.sum(np.abs(r)) for r in residuals])) != best and int(np.argmax(sse)) != best
    fit = _fit_ridge(torch.as_tensor(features), torch.as_tensor(target), torch.arange(4), torch.arange(4, 6), torch.as_tensor(grid))
    x_all = features[:, 0].reshape(-1, d)
    assert float(fit.lam[0]) == pytest.approx(grid[best] * mean_eigenvalue(x_all), rel=1e-12)
    expected_r2 = 1 - sse[best] / np.sum((t_val - t_val.mean()) ** 2)
    assert float(fit.val_r2[0]) == pytest.approx(expected_r2, rel=1e-9)
    w, b = _numpy_ridge(x_all, target.ravel(), grid[best] * mean_eigenvalue(x_all))
    np.testing.assert_allclose(fit.weight[0].numpy(), w, rtol=1e-9)


def test_r2_is_nan_for_a_target_constant_up_to_the_rounding_of_its_mean():
    """Three targets 0.1: their float64 mean is not exactly 0.1 (NumPy: the sum is 0.30000000000000004),
    so SST is rounding residue > 0; R2 must be NaN (undefined), not 1 - SSE / residue. A target
    with variance gets NumPy's 1 - SSE / SST."""
    target = np.full(3, 0.1)
    assert np.sum((target - target.mean()) ** 2) > 0  # the premise: residue, not 0
    pred = torch.tensor([[0.2], [0.0], [0.1]], dtype=torch.float64)
    assert torch.isnan(_r2(pred, torch.as_tensor(target)[:, None])).all()
    varied = np.array([0.1, 0.4, -0.3])
    expected = 1 - np.sum((pred[:, 0].numpy() - varied) ** 2) / np.sum((varied - varied.mean()) ** 2)
    assert float(_r2(pred, torch.as_tensor(varied)[:, None])[0]) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# probes.kernel_alignment: which similarities discriminate the keys; probes.streaming: blocked scores


@pytest.mark.parametrize("fit", ["log_lstsq", "distance"])
def test_a_small_spread_on_a_large_similarity_still_fits_its_scale(fit):
    """Similarity 1e9 + k over 5 keys (integers, exact in float64): the row-centred spread is ~1e-9
    of the similarity's norm, far above rounding (the rule is CENTRED_RESIDUE = 1e-12 on norms,
    i.e. 1e-24 on squares), so attention that is exactly the row-normalised exp(0.7 S) must give
    beta = 0.7, not the beta = 0 of a constant similarity."""
    rng = np.random.default_rng(6)
    offsets = torch.as_tensor(rng.permutation(5)[None, :] * np.ones((3, 1)))  # [rows, keys]
    similarity = (1e9 + offsets).expand(2, 1, 1, 3, 5).clone()
    keys = torch.ones_like(similarity, dtype=torch.bool)
    attn = torch.as_tensor(np.exp(0.7 * offsets.numpy()) / np.exp(0.7 * offsets.numpy()).sum(-1, keepdims=True)).expand_as(similarity)
    beta = fit_inverse_scale(attn.clone(), similarity, keys, fit=fit)
    assert float(beta[0, 0]) == pytest.approx(0.7, rel=1e-5)


@pytest.mark.parametrize("fit", ["log_lstsq", "distance"])
def test_the_similarity_off_the_keys_does_not_decide_whether_it_discriminates(fit):
    """Causal keys over 4 support rows; the similarity holds 1e20 off the keys (never seen) and a
    spread of order 1 on them; attention exactly row-normalised exp(1.3 S) over the keys: beta = 1.3.
    A norm taken over every entry would call the visible spread (1e-20 of it) rounding residue."""
    rng = np.random.default_rng(7)
    n = 4
    visible = np.tril(np.ones((n, n), dtype=bool))
    values = rng.normal(size=(n, n))
    similarity = torch.as_tensor(np.where(visible, values, 1e20)).expand(2, 1, 1, n, n).clone()
    kernel = np.where(visible, np.exp(1.3 * values), 0.0)
    attn = torch.as_tensor(kernel / kernel.sum(-1, keepdims=True)).expand(2, 1, 1, n, n).clone()
    keys = torch.as_tensor(visible).expand(2, 1, 1, n, n)
    beta = fit_inverse_scale(attn, similarity, keys, fit=fit)
    assert float(beta[0, 0]) == pytest.approx(1.3, rel=1e-6)


def test_blocked_to_minus_inf_fills_exactly_the_blocked_entries():
    """Scores `[1, 1, 2, 3]` of -3.4e38 where the mask blocks (as HF GPT-2 fills them): -inf there,
    every allowed entry unchanged; no mask: nothing changes."""
    allowed = torch.tensor([[True, False, False], [True, True, False]])
    scores = torch.tensor([[[[0.5, -3.4e38, -3.4e38], [1.5, -2.0, -3.4e38]]]], dtype=torch.float64)
    out = _blocked_to_minus_inf(scores.clone(), allowed)
    expected = torch.tensor([[[[0.5, -np.inf, -np.inf], [1.5, -2.0, -np.inf]]]], dtype=torch.float64)
    assert torch.equal(out, expected)
    assert torch.equal(_blocked_to_minus_inf(scores.clone(), None), scores)


def test_cka_of_a_spread_far_above_rounding_is_numpys_value():
    """1 + 1e-9 A and 1 + 1e-9 B (A, B random 4 x 5): centring leaves ~1e-9 of the norm, far above
    rounding residue (CENTRED_RESIDUE = 1e-12), so CKA is defined and equals NumPy's CKA of the
    double-centred matrices (to the ~1e-7 relative precision at which float64 holds the spread)."""
    rng = np.random.default_rng(8)
    a, b = 1 + 1e-9 * rng.normal(size=(4, 5)), 1 + 1e-9 * rng.normal(size=(4, 5))

    def centred(matrix):
        return matrix - matrix.mean(1, keepdims=True) - matrix.mean(0, keepdims=True) + matrix.mean()

    ca, cb = centred(a), centred(b)
    expected = np.sum(ca * cb) / (np.linalg.norm(ca) * np.linalg.norm(cb))
    cka = float(alignment_metrics(torch.as_tensor(a), torch.as_tensor(b))["cka"])
    assert cka == pytest.approx(expected, abs=1e-5)
