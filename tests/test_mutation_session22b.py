"""Mutation review of 2a86bb0 / 50dfb81 in probes/ (c9d29a1..50dfb81): identifiability_verdict's
condition d (`sensitivities_agree`: where label sensitivities were scored, the best's
`sensitivity_score` must reach `min_score`; NaN disagrees) and its message branch;
kernel_alignment's FLAT_REFERENCE, KernelAlignment.reference_spread, uniform_heads, best_heads'
selection among the heads that rank keys, uniform_best_heads, `_reference_spread` and
`_alignment_per_prompt`'s spread collection; the uniform footnotes of compare.py / report.py.

Counts: 28 mutants planted one at a time in a copy of the repository, 9 killed by the existing
tests (best_heads never falling back to all heads; uniform_best_heads by scale inf only;
uniform_heads' `|` made `&`; the ranking mask inverted; the spread taken of the attention instead
of the reference; the two verdict-message branches swapped; the message branch without min_gap;
condition d dropped; the message quoting the best's path R2 for its sensitivity R2), 19 survived
and are killed by the tests below, 0 equivalent. Survivors: `< FLAT_REFERENCE` made `<=`;
FLAT_REFERENCE 0.05 -> 0.1; `counts > 1` made `>= 1`; the spread's max over rows made a mean over
rows (amax over the key axis only); the spread not masked where beta is NaN; `.abs()` dropped;
the spread's NaN mask (no row with two keys) dropped; counts clamped to >= 2 (one-key rows
compared); best_heads' old selection (closest over all heads); `ranks` by `.all` instead of
`.any`; reference_spread by torch.mean instead of nanmean over prompts; uniform_best_heads true
where any head of the layer is uniform; condition d on the runner-up's sensitivity score;
`>= min_score` made `>`; NaN counted as agreeing; `>= min_score - 0.1`; the message branch's
`gap_ci[0] > 0` made `>= 0`; compare.UNIFORM_NOTE and report's footnote reverted to the old
"best head ... (scale inf)" wording.

References are independent of the code under test: a NumPy loop for max |n_i R_ij - 1| over rows
with >= 2 visible keys (NaN where none), over references rebuilt in NumPy at the fitted scales
(kernel_references.numpy_row_softmax) and averaged with np.nanmean; the documented rule (scale
inf, or spread below 0.05) and a brute-force enumeration of the selection (closest finite head
among the non-uniform ones, or among all finite ones where every finite one is uniform); the
documented verdict rule ("reaches min_score", NaN disagrees, a to d in order) and message texts.
No real bug found in scope. (Outside it: mi_krr/reproductions/softmax_ood.py still marks only
tau = inf best heads with "u", not the near-flat ones uniform_best_heads now marks.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernel_references import numpy_row_softmax
from probes import kernel_alignment
from probes.attention_kernels import AttentionKernels
from probes.identifiability import identifiability_verdict
from probes.kernel_alignment import KernelAlignment, _reference_spread
from probes.kernel_scale_fit import log_similarity, row_normalised_kernel
from probes.scoring import score_algorithms
from prompts import random_task

# ---------------------------------------------------------------- NumPy references


def numpy_spread(reference: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """max |n_i R_ij - 1| over the rows i with n_i >= 2 visible keys and their visible keys j, by
    loops over `[..., r, n]` -> `[...]`; NaN where no row sees two keys."""
    out = np.full(reference.shape[:-2], np.nan)
    for index in np.ndindex(*reference.shape[:-2]):
        deviations = []
        for row, visible in zip(reference[index], keys[index]):
            n = int(visible.sum())
            if n >= 2:
                deviations += [abs(n * row[j] - 1.0) for j in range(len(row)) if visible[j]]
        if deviations:
            out[index] = max(deviations)
    return out


def brute_uniform(scale: np.ndarray, spread: np.ndarray | None) -> np.ndarray:
    """The documented rule: scale inf, or a reference spread below 0.05."""
    flat = np.isinf(scale)
    if spread is not None:
        flat = flat | (spread < 0.05)
    return flat


def brute_best(distance: np.ndarray, flat: np.ndarray) -> list[tuple[int, float, bool]]:
    """Per layer: the closest finite head among the non-flat ones, or among all finite ones where
    every finite one is flat; (-1, nan, False) without a finite one."""
    out = []
    for row, flats in zip(distance, flat):
        finite = [h for h in range(len(row)) if np.isfinite(row[h])]
        if not finite:
            out.append((-1, float("nan"), False))
            continue
        pool = [h for h in finite if not flats[h]] or finite
        head = min(pool, key=lambda h: row[h])
        out.append((head, float(row[head]), bool(flats[head])))
    return out


# ---------------------------------------------------------------- _reference_spread


def test_reference_spread_matches_a_numpy_loop_over_rows_with_two_visible_keys():
    """Row-normalised references with rows of 0, 1 and >= 2 visible keys (per head), one prompt x
    head whose rows all see <= 1 key (NaN), one whose largest deviation lies on a row other than
    the first and is negative (n R - 1 < 0)."""
    g = torch.Generator().manual_seed(3)
    b, L, H, r, n = 3, 2, 2, 4, 6
    keys = torch.rand(b, L, H, r, n, generator=g) > 0.35
    keys[:, :, :, 0] = False  # a row without keys
    keys[:, :, :, 1] = False
    keys[:, :, :, 1, 2] = True  # a row with one key
    keys[0, 1, 0, 2:] = False
    keys[0, 1, 0, 2:, 0] = True  # prompt 0, layer 1, head 0: no row sees two keys
    keys[1, 0, 1, 3] = True
    logits = 2.0 * torch.randn(b, L, H, r, n, generator=g, dtype=torch.float64)
    logits[1, 0, 1, 3, 4] = -30.0  # a weight ~0 on a 6-key row: deviation ~1 from below
    reference = row_normalised_kernel(logits, keys)
    got = _reference_spread(reference, keys).numpy()
    expected = numpy_spread(reference.numpy(), keys.numpy())
    assert np.isnan(expected[0, 1, 0]) and np.isfinite(expected).sum() == expected.size - 1
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, equal_nan=True)
    # an unnormalised row with one key counts for nothing either
    reference2 = reference.clone()
    reference2[..., 1, 2] = 0.3
    np.testing.assert_allclose(_reference_spread(reference2, keys).numpy(), expected, rtol=1e-12, atol=1e-15, equal_nan=True)


# ---------------------------------------------------------------- kernel_alignment's reference_spread


def test_kernel_alignment_reference_spread_is_the_nanmean_of_numpy_rebuilt_reference_rows():
    """End to end: each head's reference rebuilt in NumPy at its fitted scale, its spread per
    prompt by the loop, averaged over the prompts where it is defined (prompt 0 of head (0, 0)
    sees one key per row: NaN there, left out)."""
    B, N, M, D = 5, 8, 5, 3
    task = random_task(B, N, M, D, 3)
    g = torch.Generator().manual_seed(8)
    similarity = log_similarity("exp", task.x_query, task.x_support)[:, None, None]
    betas = torch.tensor([[0.8, 2.0], [0.3, 1.2]], dtype=torch.float64)[:, :, None, None]
    keys = torch.rand(B, 2, 2, M, N, generator=g) > 0.15
    keys[0, 0, 0] = False
    keys[0, 0, 0, :, 1] = True
    noise = 0.3 * torch.randn(B, 2, 2, M, N, generator=g, dtype=torch.float64)
    pattern = 0.8 * row_normalised_kernel(betas * similarity + noise, keys)
    result = kernel_alignment(None, task, attention=AttentionKernels(support=None, query=pattern, source="pattern"))
    visible = (pattern > 0).numpy()
    for kernel, scale in result.scale.items():
        beta = (1 / scale if kernel == "exp" else scale**-2).numpy()[:, :, None, None]
        ref = numpy_row_softmax(beta * log_similarity(kernel, task.x_query, task.x_support).numpy()[:, None, None], visible)
        per_prompt = numpy_spread(ref, visible)  # [B, L, H]
        assert np.isnan(per_prompt[0, 0, 0]) and np.isfinite(per_prompt[1:, 0, 0]).all()
        np.testing.assert_allclose(result.reference_spread[kernel].numpy(), np.nanmean(per_prompt, axis=0), rtol=1e-9, atol=1e-12)


def test_a_head_without_a_fitted_scale_has_no_reference_spread_and_is_not_uniform():
    """fit="log_lstsq" on one-hot attention over 8 allowed keys: no row has two weights to
    regress, so beta is NaN (scale NaN); its reference (built at beta 0, uniform) must not count:
    spread NaN, not uniform (the documented rule needs scale inf or a spread below 0.05)."""
    B, N, M, D = 3, 8, 5, 3
    task = random_task(B, N, M, D, 1)
    pattern = torch.zeros(B, 1, 2, M, N, dtype=torch.float64)
    pattern[..., 0, :, 0] = 1.0  # head 0: one-hot rows
    pattern[..., 1, :, :] = row_normalised_kernel(
        1.5 * log_similarity("exp", task.x_query, task.x_support)[:, None], torch.ones(M, N, dtype=torch.bool))
    attention = AttentionKernels(support=None, query=pattern, source="pattern", query_allowed=torch.ones(M, N, dtype=torch.bool))
    result = kernel_alignment(None, task, kernels=("exp",), fit="log_lstsq", attention=attention)
    assert np.isnan(result.scale["exp"][0, 0].item()) and np.isfinite(result.scale["exp"][0, 1].item())
    assert np.isnan(result.reference_spread["exp"][0, 0].item())
    expected = brute_uniform(result.scale["exp"].numpy(), result.reference_spread["exp"].numpy())
    np.testing.assert_array_equal(result.uniform_heads("exp"), expected)
    assert not result.uniform_heads("exp")[0, 0]


# ---------------------------------------------------------------- best_heads / uniform_heads


def _hand_alignment(distance, scale, spread):
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    metrics = {name: t(distance) for name in ("operator_distance", "cka", "spearman", "row_spearman")}
    return KernelAlignment(block="query", scale={"exp": t(scale)}, metrics={"exp": metrics},
                           per_prompt={"exp": {k: v[None] for k, v in metrics.items()}},
                           reference_spread=None if spread is None else {"exp": t(spread)})


INF, NAN = float("inf"), float("nan")
DISTANCE = [[0.10, 0.30, 0.20, 0.50],   # flat by spread, ranks, scale inf, ranks: head 1
            [0.40, 0.20, NAN, 0.90],    # flat, scale inf, NaN, flat: every finite one flat: head 1
            [NAN, NAN, NAN, NAN],       # no finite distance: -1
            [0.10, 0.20, 0.15, 0.30],   # spread exactly 0.05 (not below), 0.07, ranks, ranks: head 0
            [NAN, 0.30, 0.60, 0.25],    # ranks but no distance; the finite ones flat by spread only: head 3
            [0.30, 0.20, 0.40, 0.10]]   # flat (0.049), ranks, ranks, flat: head 1
SCALE = [[2.0, 3.0, INF, 1.0], [5.0, INF, NAN, 4.0], [NAN] * 4, [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0] * 4]
SPREAD = [[0.01, 0.50, 0.0, 0.80], [0.02, 0.0, NAN, 0.049], [NAN] * 4, [0.05, 0.07, 0.3, 0.3],
          [0.60, 0.01, 0.04, 0.03], [0.049, 0.3, 0.2, 0.0499]]


@pytest.mark.parametrize("with_spread", [True, False])
def test_best_heads_and_uniform_flags_match_brute_force_enumeration(with_spread):
    """Hand-built alignment: uniform_heads by the documented rule (scale inf, or spread < 0.05;
    scale inf only without reference_spread), best_heads and uniform_best_heads by enumeration."""
    spread = SPREAD if with_spread else None
    alignment = _hand_alignment(DISTANCE, SCALE, spread)
    flat = brute_uniform(np.array(SCALE), None if spread is None else np.array(SPREAD))
    np.testing.assert_array_equal(alignment.uniform_heads("exp"), flat)
    expected = brute_best(np.array(DISTANCE), flat)
    head, best = alignment.best_heads("exp")
    np.testing.assert_array_equal(head, [h for h, _, _ in expected])
    np.testing.assert_array_equal(best, [d for _, d, _ in expected])
    np.testing.assert_array_equal(alignment.uniform_best_heads("exp"), [u for _, _, u in expected])
    if with_spread:  # the cases the table was built to hold
        assert head.tolist() == [1, 1, -1, 0, 3, 1]
        assert alignment.uniform_best_heads("exp").tolist() == [False, True, False, False, True, False]


def test_a_reference_spread_of_exactly_flat_reference_is_not_uniform():
    """"below FLAT_REFERENCE": 0.05 itself ranks keys."""
    alignment = _hand_alignment([[0.1, 0.2]], [[1.0, 1.0]], [[0.05, 0.3]])
    assert alignment.uniform_heads("exp").tolist() == [[False, False]]
    assert alignment.best_heads("exp")[0].tolist() == [0]


# ---------------------------------------------------------------- the verdict's condition d


def _two_candidates():
    rng = np.random.default_rng(5)
    target = rng.standard_normal((30, 3))
    a = np.stack([(1 - 0.5**t) * target for t in range(7)], 1)
    preds = {"a": a, "b": a**2 * np.sign(a)}
    return preds, score_algorithms(a[:, :5], preds, target, bootstrap=120, seed=0)


@pytest.fixture(scope="module")
def candidates():
    return _two_candidates()


def _set(score, value, held, noise, sensitivity):
    samples = value + noise
    return dataclasses.replace(score, score=value, score_ci=(value - 0.05, value + 0.05), score_samples=samples,
                               held_score=held, held_samples=samples - 0.5, sensitivity_score=sensitivity)


def _verdict(candidates, top_sens, rival_sens, rival=0.25, rival_samples=None):
    preds, scores = candidates
    noise = 0.001 * np.random.default_rng(6).standard_normal(scores["a"].score_samples.shape)
    a = _set(scores["a"], 0.75, 0.25, noise, top_sens)
    b = _set(scores["b"], rival, -1.0, noise, rival_sens)
    if rival_samples is not None:
        b = dataclasses.replace(b, score_samples=rival_samples(a.score_samples))
    return identifiability_verdict({"a": a, "b": b}, preds, min_score=0.5, min_gap=0.25)


SENS_MESSAGE = "Verdict: not identified: the layers' label sensitivities disagree with a's (sensitivity path R2 {} < 0.5 at the same alignment)"
BEAT_MESSAGE = "Verdict: not identified: a does not beat b beyond the interval by at least 0.25."


@pytest.mark.parametrize("top_sens, rival_sens, identified, shown", [
    (None, None, True, None),
    (0.5, -3.0, True, None),        # exactly min_score reaches it ("reaches min_score": >=)
    (0.9, -3.0, True, None),        # the runner-up's sensitivities do not matter
    (0.2, 0.9, False, "0.2000"),    # the best's do
    (0.45, 0.9, False, "0.4500"),
    (0.4999, 0.9, False, "0.4999"),
    (float("nan"), 0.9, False, "undefined"),  # NaN: they do not agree
])
def test_condition_d_is_the_best_candidates_sensitivity_score_reaching_min_score(candidates, top_sens, rival_sens, identified, shown):
    """Every other condition holds (path R2 0.75 with a tight interval, b beaten by 0.5, the
    layers move); only the best's sensitivity score decides, and the message says so."""
    verdict = _verdict(candidates, top_sens, rival_sens)
    assert verdict.best == "a" and verdict.runner_up == "b" and verdict.gap_ci[0] > 0.25
    assert verdict.identified == identified, verdict.message
    if shown is not None:
        assert SENS_MESSAGE.format(shown) in verdict.message
        assert "does not beat" not in verdict.message
    else:
        assert "label sensitivities disagree" not in verdict.message


@pytest.mark.parametrize("case", ["small_gap", "interval_at_0"])
def test_an_unbeaten_runner_up_is_reported_before_disagreeing_sensitivities(candidates, case):
    """Conditions c and d both fail: the message gives c (the documented order). small_gap: the
    interval above 0 but gap 0.2 < min_gap 0.25; interval_at_0: gap 0.3 but a tenth of the paired
    replicates show no gap, so the interval's lower bound is exactly 0 (not above it)."""
    if case == "small_gap":
        verdict = _verdict(candidates, 0.1, 0.9, rival=0.55)
        assert verdict.gap_ci[0] > 0 and verdict.gap == pytest.approx(0.2)
    else:
        def rival_samples(top):
            return top - np.where(np.arange(top.size) % 10 == 0, 0.0, 0.3)
        verdict = _verdict(candidates, 0.1, 0.9, rival=0.45, rival_samples=rival_samples)
        assert verdict.gap_ci[0] == 0 and verdict.gap >= 0.25
    assert not verdict.identified
    assert BEAT_MESSAGE in verdict.message
    assert "label sensitivities disagree" not in verdict.message


# ---------------------------------------------------------------- the uniform footnotes


def test_the_uniform_footnotes_say_every_head_is_uniform_within_flat_reference():
    """A mark now means every head of the layer is uniform (the best is picked among heads that
    rank keys), by scale inf or a spread below FLAT_REFERENCE: both footnotes say so, quoting the
    threshold (5%); the report's footnote follows the marked cells of the hand-built alignment
    (marks where brute force finds a uniform best head: layers 1 and 4)."""
    from types import SimpleNamespace

    from probes.compare import UNIFORM_NOTE
    from probes.kernel_alignment import FLAT_REFERENCE
    from probes.report import _alignment_lines

    within = f"(scale inf, or within {FLAT_REFERENCE:.0%} of it)"
    assert UNIFORM_NOTE == (f"u: some layer's heads are all fitted as uniform attention {within}: the mean includes a "
                            "distance to mean pooling, not to a kernel that ranks the keys")
    hand = _hand_alignment(DISTANCE, SCALE, SPREAD)
    lines = _alignment_lines(SimpleNamespace(kernel_alignment=hand))
    marked = [u for _, _, u in brute_best(np.array(DISTANCE), brute_uniform(np.array(SCALE), np.array(SPREAD)))]
    assert [i for i, cell in enumerate(lines[2][len("  block "):].split()) if cell.endswith("u")] == \
        [i for i, m in enumerate(marked) if m] == [1, 4]
    # header, block row, one distance row per kernel, then the footnote
    assert lines[2 + len(hand.metrics)] == (f"  u: that block's heads are all fitted as uniform attention {within}: its distance is one to "
                                            "mean pooling, not to a kernel that ranks the keys")
