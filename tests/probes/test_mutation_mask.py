"""The structural attention mask the adapter states and the probes carry, and the texts that
print an interval or a gap, against hand-built references: masks written out row by row in
NumPy for a model whose queries are split into groups, q . k / sqrt(d_head) from a full
run_with_cache, the storage a kept mask owns, hand-set scores and intervals (order statistics
taken by hand) in the verdict's sentence, and the summary table's column arithmetic."""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import torch

from mi_krr.models import AttentionHooks, ICLTransformer, ICLTransformerConfig, adapter_for
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.tasks import ICLTask
from probes import attention_kernels, kernel_alignment, stream_probes
from probes.attention_kernels import AttentionKernels
from probes.identifiability import identifiability_verdict
from probes.report import task_set_summary
from probes.scoring import percentile_interval, score_algorithms
from grouped_models import GroupedQueries
from prompts import random_task

D, N, M = 2, 5, 4
GROUPS = GroupedQueries.GROUPS
PER_GROUP = M // GROUPS


def make_model(cls: type = ICLTransformer, layout: str = "concat", causal: bool | None = None) -> ICLTransformer:
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(
        n_dims=D, d_model=12, n_layers=2, n_heads=3, d_head=4, layout=layout, causal=causal, max_seq_len=32, dtype="float64"
    )
    return cls(cfg).eval()


def make_task(batch: int = 2, seed: int = 0) -> ICLTask:
    return random_task(batch, N, M, D, seed)


class GroupedWithOwnMask(GroupedQueries):
    """Concat layout split into GROUPS sequences per prompt (the support tokens, then PER_GROUP of
    the queries), stating a mask in which the j-th query of each sequence may not see support key
    j. Query rows thus differ within a sequence, so the order in which groups are folded into the
    task's queries shows in `query_allowed`. The forward keeps the plain concat mask (a concat
    query sees the support and itself), so q and k equal the ungrouped model's."""

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor:
        allowed = super().allowed_attention(prompt).clone()
        for j in range(PER_GROUP):
            allowed[N + j, j] = False
        return allowed


class GroupedWithoutScoreHook(GroupedWithOwnMask):
    """The same, with no pre-softmax score hook: source='scores' rebuilds q . k / sqrt(d_head)."""

    def attention_hook_names(self) -> list[AttentionHooks]:
        return [AttentionHooks(pattern=h.pattern, scores=None, q=h.q, k=h.k) for h in super().attention_hook_names()]


def expected_query_mask() -> np.ndarray:
    """[M, N] by hand: task query i = g * PER_GROUP + j is blocked from support key j only."""
    mask = np.ones((M, N), dtype=bool)
    for g in range(GROUPS):
        for j in range(PER_GROUP):
            mask[g * PER_GROUP + j, j] = False
    return mask


# --- the mask each block carries ---------------------------------------------------------------------


def test_grouped_query_mask_is_folded_into_the_tasks_query_order():
    """query_allowed [m, n] lists the task's queries in order (group-major, as the query block is):
    row g * PER_GROUP + j is the j-th query row of the sequence's mask, cut to the support keys;
    support_allowed is the support x support corner (all True: concat, not causal)."""
    model, task = make_model(GroupedWithOwnMask), make_task()
    prompt = model.encode(task)
    assert prompt.groups == GROUPS
    streamed = stream_probes(model, prompt, blocks=("support", "query"))
    np.testing.assert_array_equal(streamed.query_allowed.numpy(), expected_query_mask())
    np.testing.assert_array_equal(streamed.support_allowed.numpy(), np.ones((N, N), dtype=bool))


def test_rebuilt_query_scores_are_minus_inf_exactly_where_the_folded_mask_blocks_them():
    """Without a score hook, the grouped model's rebuilt query scores are -inf at the hand-built
    blocked entries of every prompt, layer and head, and elsewhere q . k / sqrt(d_head) from the
    ungrouped model's cached q and k (concat queries see only the support and themselves)."""
    model, plain, task = make_model(GroupedWithoutScoreHook), make_model(), make_task()
    kernels = attention_kernels(model, task, source="scores")
    _, cache = plain.run_with_cache(plain.encode(task).tokens)
    blocked = ~expected_query_mask()
    for layer in range(2):
        q, k = cache[f"blocks.{layer}.attn.hook_q"].numpy(), cache[f"blocks.{layer}.attn.hook_k"].numpy()
        scores = np.einsum("bqhe,bkhe->bhqk", q, k)[:, :, N : N + M, :N] / 2.0  # sqrt(d_head = 4)
        expected = np.where(blocked, -np.inf, scores)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_only_the_blocks_read_carry_a_mask():
    """A pass that reads one block leaves the other block's mask None (as its attention), so a
    query-only pass (what `diagnose` streams) states no support mask."""
    model, task = make_model(causal=True), make_task()
    prompt = model.encode(task)
    query_only = stream_probes(model, prompt, blocks=("query",))
    assert query_only.support is None and query_only.support_allowed is None
    np.testing.assert_array_equal(query_only.query_allowed.numpy(), np.ones((M, N), dtype=bool))
    support_only = stream_probes(model, prompt, blocks=("support",))
    assert support_only.query is None and support_only.query_allowed is None
    np.testing.assert_array_equal(support_only.support_allowed.numpy(), np.tril(np.ones((N, N), dtype=bool)))


@pytest.mark.parametrize("cls", [ICLTransformer, GroupedWithOwnMask])
def test_kept_masks_own_their_storage(cls):
    """The masks outlive the pass: each is a contiguous tensor in its own storage (numel bytes),
    never a view of the [seq, seq] mask (concat positions are consecutive, where a cut is a view)."""
    model, task = make_model(cls, causal=True), make_task()
    streamed = stream_probes(model, model.encode(task), blocks=("support", "query"))
    for mask in (streamed.support_allowed, streamed.query_allowed):
        assert mask.dtype == torch.bool and mask.is_contiguous()
        assert mask.untyped_storage().nbytes() == mask.numel() * mask.element_size()


# --- what the model states ---------------------------------------------------------------------------


class IntegerMask(ICLTransformer):
    """States its mask as 0 / 1 integers instead of bools (~ would flip every bit, not negate)."""

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor:
        return super().allowed_attention(prompt).long()


class ListMask(ICLTransformer):
    """States its mask as nested Python lists."""

    def allowed_attention(self, prompt: EncodedPrompt) -> list:
        return super().allowed_attention(prompt).tolist()


@pytest.mark.parametrize("cls, got", [(IntegerMask, rf"torch.int64 \({N + M}, {N + M}\) on cpu"), (ListMask, r"list$")])
def test_a_mask_that_is_not_a_bool_tensor_is_refused(cls, got):
    """allowed_attention must give a bool tensor: an integer tensor of the right shape, and a
    nested list, are each refused with the ValueError that names the method and what came back."""
    model, task = make_model(cls), make_task()
    with pytest.raises(ValueError, match=rf"{cls.__name__}.allowed_attention\(prompt\) must be a bool tensor .* got {got}"):
        stream_probes(model, model.encode(task), blocks=("query",))


class NoMaskMethod(ICLTransformer):
    """Every ICLModel method but allowed_attention."""

    allowed_attention = None


def test_adapter_names_a_missing_allowed_attention():
    with pytest.raises(ValueError, match="NoMaskMethod has no method 'allowed_attention'"):
        adapter_for(make_model(NoMaskMethod))


def test_model_mask_is_built_on_the_prompts_device():
    """The mask lives where the prompt's tokens do: tokens on the meta device give a meta mask of
    shape [seq, seq] (no values needed)."""
    model = make_model()
    prompt = model.encode(make_task())
    seq = prompt.tokens.shape[1]
    meta = model.allowed_attention(dataclasses.replace(prompt, tokens=prompt.tokens.to("meta")))
    assert meta.device.type == "meta" and meta.shape == (seq, seq) and meta.dtype == torch.bool


# --- the source recorded ----------------------------------------------------------------------------


def test_attention_kernels_record_the_source_they_read_and_alignment_refuses_scores():
    """source='scores' is recorded as such (from attention_kernels and from_stream), and so
    kernel_alignment, which needs applied weights, refuses those kernels."""
    model, task = make_model(), make_task()
    scores = attention_kernels(model, task, source="scores")
    assert scores.source == "scores" and torch.isfinite(scores.query).all()
    streamed = stream_probes(model, model.encode(task), blocks=("query",), source="scores")
    assert AttentionKernels.from_stream(streamed, "scores").source == "scores"
    assert AttentionKernels.from_stream(streamed).source == "pattern"
    with pytest.raises(ValueError, match="attention must be the AttentionKernels of attention_kernels"):
        kernel_alignment(model, task, attention=scores)


# --- the summary table's interval cell ----------------------------------------------------------------


def hand_built_task_set(intervals: dict[str, tuple[float, float]]):
    """The fields task_set_summary reads, set by hand: one score per algorithm with the given
    interval, no kernel alignment, no fitted steps, no notes."""
    def score(name, value, ci):
        return types.SimpleNamespace(algorithm=name, score=value, score_ci=ci, weighted_r2=None, sensitivity_score=None,
                                     profile_distance=0.5, layers=np.array([0, 1, 2]), aligned_steps=np.array([0, 1, 2]),
                                     argmin_steps=np.array([0, 1, 3]), aligned_r2=np.array([np.nan, 0.9, 0.95]))
    values = {"cg": 0.9, "gd": -0.1234}
    scores = {name: score(name, values[name], ci) for name, ci in intervals.items()}
    return types.SimpleNamespace(
        name="set", n_prompts=3, n_query=2, n_support=4, kernel="exp", kernel_params={"temperature": 1.0}, lam=0.1,
        n_steps=3, kappa=np.array([1.0, 2.0, 4.0]), scores=scores, verdict=types.SimpleNamespace(best="cg", message="hand-built"),
        fitted_steps={}, kernel_alignment=None, notes=[],
    )


def test_interval_cell_is_right_aligned_in_its_twenty_character_column():
    """Columns: algorithm (18), space, path R2 (9), space, then the 20-character interval cell, so
    the header's '95% interval' and every row's cell end at character 18 + 1 + 9 + 1 + 20 = 49:
    '[-0.2500, 0.1250]' for a stored interval, '-' for none (both ends NaN)."""
    result = hand_built_task_set({"cg": (0.85, 0.95), "gd": (-0.25, 0.125)})
    lines = task_set_summary(result).splitlines()
    header, cg, gd = lines[1], lines[2], lines[3]
    assert header[29:49] == f"{'95% interval':>20}"
    assert cg[:49] == f"{'cg':<18} {0.9:>9.4f} " + " " * 4 + "[0.8500, 0.9500]"
    assert gd[:49] == f"{'gd':<18} {-0.1234:>9.4f} " + " " * 3 + "[-0.2500, 0.1250]"
    bare = task_set_summary(hand_built_task_set({"cg": (math.nan, math.nan), "gd": (math.nan, math.nan)})).splitlines()
    for line, name, value in ((bare[2], "cg", "   0.9000"), (bare[3], "gd", "  -0.1234")):
        assert line[:49] == f"{name:<18} {value} " + " " * 19 + "-"


# --- the verdict's gap ------------------------------------------------------------------------------

R = 50


def hand_scored(runner_up_score: float, runner_up_samples: np.ndarray):
    """Scores of two separable candidates (independent random trajectories), with 'a' set by
    hand to path R2 0.9 (samples 0.800, 0.804, ..., 0.996 shuffled) and 'b' to the given score and
    samples; returns (scores, step predictions)."""
    rng = np.random.default_rng(0)
    preds = {name: np.concatenate([np.zeros((24, 1, 2)), rng.normal(size=(24, 4, 2))], axis=1) for name in ("a", "b")}
    layers = preds["a"][:, [0, 1, 2, 3]] + 0.01 * rng.normal(size=(24, 4, 2))
    scores = score_algorithms(layers, preds, preds["a"][:, -1], bootstrap=R, seed=0)
    samples = rng.permutation(0.80 + 0.004 * np.arange(R))
    scores["a"] = dataclasses.replace(scores["a"], score=0.9, score_ci=(0.8, 1.0), score_samples=samples)
    scores["b"] = dataclasses.replace(scores["b"], score=runner_up_score, score_samples=runner_up_samples)
    return scores, preds


def order_statistic_interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval by hand: sorted samples at ranks ceil(0.025 R), ceil(0.975 R)."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.025 * len(ordered)) - 1], ordered[math.ceil(0.975 * len(ordered)) - 1]  # R = 50: ranks 2, 49


def test_verdict_states_a_finite_gap_signed_to_four_decimals_with_its_paired_interval():
    """Runner-up at path R2 0.712345: the sentence reads 'gap +0.1877' (0.9 - 0.712345) and the
    paired interval of the per-resample differences taken by hand as order statistics."""
    rng = np.random.default_rng(3)
    runner_samples = 0.7 + 0.05 * rng.standard_normal(R)
    scores, preds = hand_scored(0.712345, runner_samples)
    verdict = identifiability_verdict(scores, preds)
    assert verdict.best == "a" and verdict.runner_up == "b"
    low, high = order_statistic_interval(scores["a"].score_samples - runner_samples)
    assert f"Runner-up: b, gap +0.1877 [{low:+.4f}, {high:+.4f}] (paired bootstrap)." in verdict.message


def test_verdict_states_an_infinite_gap_when_only_the_runner_up_is_minus_inf():
    """Best finite (0.9), runner-up path R2 -inf on the estimate and every resample: the gap is +inf,
    stated as such; 'undefined (both path R2 -inf)' is only for two -inf scores."""
    scores, preds = hand_scored(-math.inf, np.full(R, -math.inf))
    verdict = identifiability_verdict(scores, preds)
    assert verdict.runner_up == "b" and verdict.gap == math.inf
    assert "Runner-up: b, gap +inf [+inf, +inf] (paired bootstrap)." in verdict.message
    assert "undefined" not in verdict.message


def test_verdict_names_an_undefined_runner_up_score_instead_of_calling_both_minus_inf():
    """Best finite (0.9), runner-up path R2 NaN (undefined) on the estimate and every resample: the
    gap is NaN; the sentence gives both scores ('0.9000 for a, undefined for b'), prints no
    '[+nan, +nan]' interval and does not claim both scores are -inf."""
    scores, preds = hand_scored(math.nan, np.full(R, math.nan))
    verdict = identifiability_verdict(scores, preds)
    assert verdict.runner_up == "b" and math.isnan(verdict.gap)
    assert "Runner-up: b, gap undefined (path R2 0.9000 for a, undefined for b)." in verdict.message
    assert "nan" not in verdict.message and "-inf" not in verdict.message


def test_percentile_interval_takes_the_documented_order_statistics_at_the_default_resample_count():
    """The docstring: order statistics at ceil(q R) for q = 0.025 and 0.975. R = 1000 samples 1..1000:
    ranks ceil(25) = 25 and ceil(975) = 975, so the interval is (25, 975)."""
    assert percentile_interval(np.arange(1.0, 1001.0)) == (25.0, 975.0)
