"""Usage review: a researcher's OWN model class behind the `mi_krr.models.adapter.ICLModel`
protocol (a small `HookedRootModule` with its own hook names, an is-query flag in its tokens, and
a structural mask that is the concat one, causal, reported as None, or malformed), the probes and
the architecture comparison run on it, the results' JSON / DataFrame / report round trips, and
`BridgeICLModel` in float32 with several heads. References are independent: a NumPy forward of
the custom model written from its weights, central finite differences, closed-form KRR, the
R2 formula of `probes.scoring` evaluated in NumPy, and a head built to be exactly a row-normalised
exp kernel of known temperature.

The problems the review found are fixed; their tests check the correct behaviour."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

import probes
from mi_krr.models import BridgeICLModel, ICLTransformerConfig
from mi_krr.models.adapter import AttentionHooks, ICLModel
from mi_krr.models.encoding import EncodedPrompt
from mi_krr.tasks import GPRegressionSampler
from brute_force import best_head_choices, lens_finite_differences
from own_attention import OwnAttention
from prompts import random_task


# ---------------------------------------------------------------- the researcher's model


class OwnModel(HookedRootModule):
    """Tokens (x, y, is_query) -> Linear read-in -> L residual attention blocks -> LayerNorm ->
    Linear read-out, with hook names of its own (`resid.{l}`, `attn.{l}.hook_*`).

    mask: "concat" (queries see the support tokens and themselves), "causal" (lower triangular:
    queries also see earlier queries), or "none" (applies the concat mask, reports None)."""

    def __init__(self, n_layers=2, n_heads=2, d_model=8, mask="concat", scores_hook=True, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.n_layers, self.n_heads, self.mask, self.scores_hook = n_layers, n_heads, mask, scores_hook
        self.read_in = nn.Linear(4, d_model)  # d = 2 inputs, the label, the is-query flag
        self.attn = nn.ModuleList([OwnAttention(d_model, n_heads) for _ in range(n_layers)])
        self.resid = nn.ModuleList([HookPoint() for _ in range(n_layers + 1)])
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 1)
        self.to(dtype)
        self.setup()

    def encode(self, task) -> EncodedPrompt:
        weight = self.out.weight
        task = task.to(device=weight.device, dtype=weight.dtype)
        zeros_s, zeros_q = torch.zeros_like(task.y_support)[..., None], torch.zeros_like(task.y_query)[..., None]
        support = torch.cat([task.x_support, task.y_support[..., None], zeros_s], -1)
        query = torch.cat([task.x_query, zeros_q, zeros_q + 1], -1)
        n, m = task.n_support, task.n_query
        return EncodedPrompt(tokens=torch.cat([support, query], 1), query_positions=torch.arange(n, n + m), batch_size=task.batch_size,
                             n_query=m, n_support=n, support_positions=torch.arange(n), label_positions=torch.arange(n))

    def structural_mask(self, is_query: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(is_query.shape[0])
        if self.mask == "causal":
            return positions[None, :] <= positions[:, None]
        return ~is_query[None, :] | (positions[None, :] == positions[:, None])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        allowed = self.structural_mask(tokens[0, :, -1] > 0.5)
        x = self.resid[0](self.read_in(tokens))
        for layer, attention in enumerate(self.attn):
            x = self.resid[layer + 1](x + attention(x, allowed))
        return self.readout(x)

    def residual_hook_names(self) -> list[str]:
        return [f"resid.{layer}" for layer in range(self.n_layers + 1)]

    def attention_hook_names(self) -> list[AttentionHooks]:
        return [AttentionHooks(pattern=f"attn.{layer}.hook_pattern", scores=f"attn.{layer}.hook_attn_scores" if self.scores_hook else None,
                               q=f"attn.{layer}.hook_q", k=f"attn.{layer}.hook_k") for layer in range(self.n_layers)]

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor | None:
        if self.mask == "none":
            return None
        return self.structural_mask(prompt.tokens[0, :, -1] > 0.5)

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(resid)).squeeze(-1)

    def predict(self, task) -> torch.Tensor:
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens))


def numpy_forward(model: OwnModel, task) -> tuple[np.ndarray, list[np.ndarray]]:
    """The custom model in NumPy from its weights: (read-out lens at the queries [B, L + 1, m],
    every block's attention pattern [B, head, seq, seq])."""
    w = {name: p.detach().numpy() for name, p in model.named_parameters()}
    n, m = task.n_support, task.n_query
    flag = np.concatenate([np.zeros((task.batch_size, n, 1)), np.ones((task.batch_size, m, 1))], 1)
    xs, ys, xq = (value.double().numpy() for value in (task.x_support, task.y_support, task.x_query))
    tokens = np.concatenate([np.concatenate([xs, ys[..., None]], -1), np.concatenate([xq, np.zeros((task.batch_size, m, 1))], -1)], 1)
    tokens = np.concatenate([tokens, flag], -1)
    seq = n + m
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = (j <= i) if model.mask == "causal" else ((j < n) | (i == j))

    def readout(h):
        centred = h - h.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * w["ln.weight"] + w["ln.bias"]
        return (normed @ w["out.weight"].T + w["out.bias"])[..., 0]

    x = tokens @ w["read_in.weight"].T + w["read_in.bias"]
    lens, patterns = [readout(x)[:, n:]], []
    for layer in range(model.n_layers):
        q, k, v = (np.einsum("bpd,hde->bphe", x, w[f"attn.{layer}.{name}"]) for name in ("W_Q", "W_K", "W_V"))
        scores = np.where(allowed, np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1]), -np.inf)
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        patterns.append(pattern)
        x = x + np.einsum("bqhe,hed->bqd", np.einsum("bhqk,bkhe->bqhe", pattern, v), w[f"attn.{layer}.W_O"])
        lens.append(readout(x)[:, n:])
    return np.stack(lens, 1), patterns


def exp_kernel_model(n_heads: int, mask: str = "concat", scores_hook: bool = True) -> OwnModel:
    """One block whose head h scores c_h^2 x.x' / sqrt(e) (c_h = h + 1): on the support keys its
    query and support rows are exactly the row-normalised exp kernel with tau_h = sqrt(e) / c_h^2."""
    model = OwnModel(n_layers=1, n_heads=n_heads, d_model=4, mask=mask, scores_hook=scores_hook)
    with torch.no_grad():
        model.read_in.weight.copy_(torch.eye(4, dtype=torch.float64))
        model.read_in.bias.zero_()
        weight = torch.zeros(n_heads, 4, 4 // n_heads, dtype=torch.float64)
        for head in range(n_heads):
            weight[head, 0, 0] = weight[head, 1, 1] = head + 1
        model.attn[0].W_Q.copy_(weight)
        model.attn[0].W_K.copy_(weight)
    return model


# ---------------------------------------------------------------- probes on the custom model


@pytest.mark.parametrize("mask", ["concat", "causal", "none"])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (3, 4, 2)])
def test_own_model_lens_attention_and_sensitivities_equal_a_numpy_forward(mask, sizes):
    """A custom HookedRootModule with its own hook names passes `attach`; its read-out lens and
    attention blocks equal a NumPy forward from its weights (last lens row = predict), and label
    sensitivities equal central differences, at 1 x 1 x 1 and 3 x 4 x 2."""
    model = OwnModel(mask=mask)
    assert isinstance(model, ICLModel)
    attached = probes.attach(model)
    task = random_task(*sizes, 2, seed=4)
    lens, patterns = numpy_forward(model, task)
    np.testing.assert_allclose(attached.layer_predictions(task).numpy(), lens, rtol=0, atol=1e-12)
    np.testing.assert_allclose(attached.layer_predictions(task)[:, -1].numpy(), model.predict(task).detach().numpy(), rtol=0, atol=1e-14)
    kernels = attached.attention_kernels(task)
    n = task.n_support
    for layer, pattern in enumerate(patterns):
        np.testing.assert_allclose(kernels.support[:, layer].numpy(), pattern[:, :, :n, :n], rtol=0, atol=1e-13)
        np.testing.assert_allclose(kernels.query[:, layer].numpy(), pattern[:, :, n:, :n], rtol=0, atol=1e-13)
    expected_support_mask = None if mask == "none" else (np.tril(np.ones((n, n), bool)) if mask == "causal" else np.ones((n, n), bool))
    if expected_support_mask is None:
        assert kernels.support_allowed is None and kernels.query_allowed is None
    else:
        np.testing.assert_array_equal(kernels.support_allowed.numpy(), expected_support_mask)
        assert kernels.query_allowed.all()
    torch.testing.assert_close(attached.label_sensitivities(task), lens_finite_differences(model, task), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mask", ["concat", "causal", "none"])
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("fit", ["distance", "log_lstsq"])
@pytest.mark.parametrize("block", ["query", "support"])
def test_exact_exp_kernel_head_recovers_its_temperature_under_every_mask(mask, n_heads, fit, block):
    """A head built so its rows on the support keys are exactly softmax(x.x' / tau_h): the fitted
    temperature is tau_h = sqrt(e) / (h + 1)^2 and the operator distance and 1 - row Spearman
    are ~0, whether the mask is reported (concat, causal: support rows see a prefix) or None."""
    alignment = probes.kernel_alignment(exp_kernel_model(n_heads, mask), random_task(5, 6, 3, 2, seed=2), fit=fit, block=block)
    expected = [math.sqrt(4 // n_heads) / (head + 1) ** 2 for head in range(n_heads)]
    np.testing.assert_allclose(alignment.tau.numpy(), [expected], rtol=1e-9)
    assert alignment.metrics["exp"]["operator_distance"].max() < 1e-10
    np.testing.assert_allclose(alignment.metrics["exp"]["row_spearman"].numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("mask", ["concat", "causal"])
def test_scores_rebuilt_from_q_and_k_equal_the_models_own_score_hook(mask):
    """A model exposing no score hook (scores=None): scores rebuilt from hook_q / hook_k equal those
    of the same weights' own score hook, -inf at exactly the entries its mask blocks."""
    task = random_task(2, 4, 3, 2, seed=1)
    own = probes.attention_kernels(OwnModel(mask=mask, scores_hook=True), task, source="scores")
    rebuilt = probes.attention_kernels(OwnModel(mask=mask, scores_hook=False), task, source="scores")
    for block in ("support", "query"):
        a, b = getattr(own, block), getattr(rebuilt, block)
        assert torch.equal(torch.isneginf(a), torch.isneginf(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=0, atol=1e-14)
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    assert torch.isneginf(rebuilt.support[..., upper]).all() == (mask == "causal")


@pytest.mark.parametrize("bad, shape", [(lambda a: a[None], "(1, 6, 6)"), (lambda a: a[:-1], "(5, 6)")])
def test_wrong_shaped_mask_is_a_one_line_error_naming_allowed_attention(bad, shape):
    """allowed_attention returning [1, seq, seq] or [seq - 1, seq]: attention_kernels,
    kernel_alignment and diagnose all refuse it in one line naming the method and the shape
    expected; the read-out lens (which needs no mask) still works."""

    class Malformed(OwnModel):
        def allowed_attention(self, prompt):
            return bad(super().allowed_attention(prompt))

    model, task = Malformed(), random_task(24, 4, 2, 2)
    for call in (lambda: probes.attention_kernels(model, task), lambda: probes.kernel_alignment(model, task),
                 lambda: probes.diagnose(model, task, kernel="exp", lam=0.1, bootstrap=0, progress=False)):
        with pytest.raises(ValueError, match=r"Malformed\.allowed_attention\(prompt\) must be a bool tensor \[6, 6\]") as error:
            call()
        assert shape in str(error.value) and "\n" not in str(error.value)
    assert probes.layer_predictions(model, task).shape == (24, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_mask_of_the_wrong_dtype_error_names_the_dtype(dtype):
    """A 0/1 mask of the right shape but not bool: the error should say the dtype is the
    problem (the message today repeats the shape it asked for)."""

    class NumericMask(OwnModel):
        def allowed_attention(self, prompt):
            return super().allowed_attention(prompt).to(dtype)

    with pytest.raises(ValueError, match=str(dtype).removeprefix("torch.")):
        probes.attention_kernels(NumericMask(), random_task(2, 4, 2, 2))


def test_mask_on_another_device_is_a_clear_error_naming_allowed_attention():
    """allowed_attention returning its mask on a device the model is not on (here 'meta', which
    any CPU run has; on a GPU machine a CPU mask for a CUDA model is the same case): a ValueError
    naming allowed_attention and the device, not NotImplementedError from deep in the fit."""

    class MetaMask(OwnModel):
        def allowed_attention(self, prompt):
            return super().allowed_attention(prompt).to("meta")

    with pytest.raises(ValueError, match="allowed_attention"):
        probes.kernel_alignment(MetaMask(), random_task(2, 4, 2, 2))


def test_mask_contradicted_by_the_attention_pattern_is_refused():
    """The model applies the concat mask (support rows see every support key) but reports a
    causal one: its pattern puts weight (~0.3 here) on keys the reported mask calls blocked, so the
    alignment's row normalisation is wrong. Probes read the pattern anyway and could refuse."""

    class MisreportedMask(OwnModel):
        def allowed_attention(self, prompt):
            seq = prompt.tokens.shape[1]
            return torch.tril(torch.ones(seq, seq, dtype=torch.bool))

    model, task = MisreportedMask(), random_task(3, 4, 2, 2)
    kernels = probes.attention_kernels(model, task)
    assert (kernels.support * ~kernels.support_allowed).max() > 0.1  # the contradiction is visible
    with pytest.raises(ValueError, match="allowed_attention"):
        probes.kernel_alignment(model, task, block="support")


def test_readout_keeping_a_trailing_unit_dimension_is_refused_in_one_line():
    """`ICLModel.readout` maps [..., d_model] -> [...]; a user's `Linear(d_model, 1)` without
    `.squeeze(-1)` is a common slip. layer_predictions should not return a 4-d tensor against its
    documented [batch, L + 1, n_query], and diagnose should name readout."""

    class Unsqueezed(OwnModel):
        def readout(self, resid):
            return self.out(self.ln(resid))

    model, task = Unsqueezed(), random_task(24, 4, 2, 2)
    with pytest.raises(ValueError, match="readout"):
        probes.layer_predictions(model, task)
    with pytest.raises(ValueError, match="readout"):
        probes.diagnose(model, task, kernel="exp", lam=0.1, bootstrap=0, progress=False)


@pytest.mark.parametrize("field, value", [("batch_size", 12), ("query_positions", torch.tensor([4]))])
def test_encoded_prompt_that_contradicts_the_task_is_refused_naming_encode(field, value):
    """A custom encode whose prompt says 12 prompts for a 24-prompt task, or reads 1 query
    position where the task has 2 (groups * q != n_query, against `EncodedPrompt`'s docstring):
    today layer_predictions returns [12, 3, 4] / [24, 3, 1] and diagnose fails in torch.cdist.
    Both should raise a ValueError naming encode."""

    class Inconsistent(OwnModel):
        def encode(self, task):
            return dataclasses.replace(super().encode(task), **{field: value})

    model, task = Inconsistent(), random_task(24, 4, 2, 2)
    with pytest.raises(ValueError, match="encode"):
        probes.layer_predictions(model, task)
    with pytest.raises(ValueError, match="encode"):
        probes.diagnose(model, task, kernel="exp", lam=0.1, bootstrap=0, progress=False)


# ---------------------------------------------------------------- diagnose, results, compare


def numpy_gaussian_krr(task, bandwidth: float, lam: float) -> np.ndarray:
    """Closed-form KRR predictions [B, m] with the Gaussian kernel exp(-|x - x'|^2 / (2 s^2))."""
    xs, xq, y = (value.double().numpy() for value in (task.x_support, task.x_query, task.y_support))
    kernel = lambda a, b: np.exp(-((a[:, :, None] - b[:, None]) ** 2).sum(-1) / (2 * bandwidth**2))  # noqa: E731
    alpha = np.linalg.solve(kernel(xs, xs) + lam * np.eye(xs.shape[1]), y[..., None])[..., 0]
    return np.einsum("bmn,bn->bm", kernel(xq, xs), alpha)


@pytest.fixture(scope="module")
def custom_diagnoses():
    """Two custom models (1 block / 1 head exact exp kernel; 3 blocks, 2 heads, causal) and a
    bridge model, diagnosed on three task sets of different sizes (2 x 1 x 1 up to 25 x 7 x 3)."""
    sampler = GPRegressionSampler(dim=2, noise_std=0.3, bandwidth=0.8)
    tasks = {"big": sampler.sample(25, 7, 3, seed=2), "small": sampler.sample(4, 3, 1, seed=1), "tiny": sampler.sample(2, 1, 1, seed=3)}
    torch.manual_seed(0)
    bridge = BridgeICLModel(ICLTransformerConfig(n_dims=2, d_model=12, n_layers=2, n_heads=3, dtype="float64", max_seq_len=16)).eval()
    models = {"exp head": exp_kernel_model(1), "causal x3": OwnModel(n_layers=3, mask="causal"), "bridge": bridge}
    common = dict(algorithms=("cg", "gd", "heavy_ball"), n_steps=6, bootstrap=30, progress=False)
    return tasks, models, {name: probes.diagnose(model, tasks, **common) for name, model in models.items()}


def test_diagnosis_of_own_models_carries_the_numpy_lens_and_closed_form_krr(custom_diagnoses):
    """Each task set's layer predictions equal the NumPy forward's lens, KRR predictions equal
    closed-form Gaussian KRR at the sampler's bandwidth and Bayes ridge noise^2 = 0.09."""
    tasks, models, diagnoses = custom_diagnoses
    for name in ("exp head", "causal x3"):
        for set_name, task in tasks.items():
            result = diagnoses[name][set_name]
            np.testing.assert_allclose(result.layer_predictions, numpy_forward(models[name], task)[0], rtol=0, atol=1e-12)
            np.testing.assert_allclose(result.krr_predictions, numpy_gaussian_krr(task, 0.8, 0.09), rtol=1e-9, atol=1e-12)
            assert result.lam == pytest.approx(0.09)


def test_dataframe_has_the_documented_columns_and_r2_equal_to_the_scoring_formula(custom_diagnoses):
    """Diagnosis.to_dataframe: the documented columns, one row per (task set, algorithm, layer
    0..L, step 0..T), and r2 = 1 - SSE(l, t) / SST(t) computed in NumPy from the diagnosis's own
    layer and step predictions (SST around the mean pooled over prompts and queries; NaN where 0)."""
    tasks, models, diagnoses = custom_diagnoses
    diagnosis = diagnoses["causal x3"]
    frame = diagnosis.to_dataframe()
    assert list(frame.columns) == ["task_set", "algorithm", "layer", "step", "r2", "mse", "sensitivity_r2", "aligned", "argmin", "score", "score_ci_low",
                                   "score_ci_high", "weighted_r2", "best"]
    assert len(frame) == len(tasks) * 3 * 4 * 7
    for set_name, result in diagnosis.task_sets.items():
        for algorithm, steps in result.step_predictions.items():
            sse = ((result.layer_predictions[:, :, None] - steps[:, None]) ** 2).sum((0, 3))  # [L', T+1]
            sst = ((steps - steps.mean((0, 2), keepdims=True)) ** 2).sum((0, 2))  # [T+1]
            with np.errstate(divide="ignore", invalid="ignore"):
                expected = np.where(sst > 0, 1 - sse / sst, np.nan)
            rows = frame[(frame.task_set == set_name) & (frame.algorithm == algorithm)]
            got = rows.pivot(index="layer", columns="step", values="r2").to_numpy()
            np.testing.assert_allclose(got[:, 1:], expected[:, 1:], rtol=1e-9, atol=1e-12)
            assert rows.aligned.sum() == 4 and rows.argmin.sum() == 4
        named = [result.verdict.best] if result.verdict.score > -np.inf else []  # a top path R2 of -inf / NaN: none is best
        assert frame[(frame.task_set == set_name) & frame.best].algorithm.unique().tolist() == named


def test_json_is_strict_and_round_trips_the_numbers_for_every_model_and_set_size(custom_diagnoses, tmp_path):
    """to_json parses with NaN / Infinity refused, and carries each task set's sizes, lam, scores
    and scores; save() writes one set of figures per task set and arrays whose layer predictions
    equal the diagnosis's."""
    tasks, _, diagnoses = custom_diagnoses

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    for name, diagnosis in diagnoses.items():
        data = json.loads(diagnosis.to_json(), parse_constant=refuse)
        for set_name, task in tasks.items():
            entry, result = data["task_sets"][set_name], diagnosis[set_name]
            assert (entry["n_prompts"], entry["n_support"], entry["n_query"]) == (task.batch_size, task.n_support, task.n_query)
            assert entry["lam"] == pytest.approx(0.09)
            for algorithm, score in result.scores.items():
                expected = score.score if math.isfinite(score.score) else None
                assert entry["scores"][algorithm]["score"] == expected
    folder, full = tmp_path / "report", diagnoses["exp head"]
    two_sets = dataclasses.replace(full, task_sets={name: full[name] for name in ("small", "tiny")})  # fewer figures to draw
    two_sets.save(folder)
    for set_name in ("small", "tiny"):
        assert (folder / f"{set_name}_error_profiles.png").stat().st_size > 0
    arrays = np.load(folder / "arrays.npz")
    np.testing.assert_array_equal(arrays["tiny/layer_predictions"], full["tiny"].layer_predictions)
    json.loads((folder / "diagnosis.json").read_text(), parse_constant=refuse)


def test_compare_puts_own_and_bridge_models_side_by_side_with_the_exact_head_at_zero_distance(custom_diagnoses):
    """compare: one row per (model, task set) in order; the exact exp head's exp distance is ~0
    (and its Gaussian one is not), each row's exp distance is the NumPy min over heads / mean over
    layers of that set's operator distances; the DataFrame has the documented columns."""
    tasks, _, diagnoses = custom_diagnoses
    comparison = probes.compare(diagnoses)
    frame = comparison.to_dataframe()
    assert list(frame.columns) == ["model", "task_set", "best", "score", "ci_low", "ci_high", "identified", "withheld", "exp_distance",
                                   "exp_uniform", "gaussian_distance", "gaussian_uniform", "step_map"]
    assert list(zip(frame.model, frame.task_set)) == [(model, name) for model in diagnoses for name in tasks]
    exact = frame[frame.model == "exp head"]
    assert (exact.exp_distance < 1e-10).all() and (exact[exact.task_set != "tiny"].gaussian_distance > 1e-3).all()
    for row in comparison.rows:
        choices = best_head_choices(diagnoses[row.model][row.task_set].kernel_alignment, "exp")  # closest head ranking keys
        assert row.exp_distance == pytest.approx(float(np.mean([distance for _, distance, _ in choices])), rel=1e-12, abs=1e-15)
    marked = any(row.exp_uniform or row.gaussian_uniform for row in comparison.rows)  # footnote: some best head is uniform
    assert len(comparison.summary().splitlines()) == 2 + len(diagnoses) * len(tasks) + marked


def test_one_task_set_and_a_prompt_of_one_support_point_serialise_strictly():
    """One task set given as a bare ICLTask (named "tasks"), one prompt with one support point
    and one query, step_sizes='optimal', bootstrap=0, sensitivities on: every R2 is undefined
    there, and the JSON writes them as null, never NaN / Infinity."""
    task = GPRegressionSampler(dim=2).sample(1, 1, 1, seed=5)
    diagnosis = probes.diagnose(OwnModel(), task, step_sizes="optimal", bootstrap=0, sensitivities=True, progress=False)
    data = json.loads(diagnosis.to_json(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert list(data["task_sets"]) == ["tasks"]
    assert data["task_sets"]["tasks"]["verdict"]["score_ci"] == [None, None]
    assert diagnosis.to_dataframe().r2.isna().all()


def test_a_one_prompt_task_set_among_several_is_named_in_the_fitted_step_error():
    """Several task sets, one of which ('single') holds one prompt: the default fitted steps need
    two; the one-line error should say which task set to enlarge."""
    sampler = GPRegressionSampler(dim=2)
    tasks = {"many": sampler.sample(6, 3, 1, seed=1), "single": sampler.sample(1, 3, 1, seed=2)}
    with pytest.raises(ValueError, match="single"):
        probes.diagnose(OwnModel(), tasks, kernels=(), bootstrap=0, progress=False)


# ---------------------------------------------------------------- BridgeICLModel options


@pytest.mark.parametrize("layout, causal, norm", [("concat", False, "rmsnorm"), ("concat", True, "layernorm"), ("interleaved", True, "none")])
def test_float32_bridge_with_several_heads_pattern_is_the_softmax_of_its_q_k_scores(layout, causal, norm):
    """BridgeICLModel in float32 with 4 heads: the lens's last row equals predict, and every
    layer's applied pattern on the support keys equals softmax(q.k / sqrt(d_head)) of its own
    q / k over the keys the layout's mask allows (rebuilt scores, -inf where blocked), rows of the
    support block summing to 1 in the concat layout."""
    torch.manual_seed(0)
    cfg = ICLTransformerConfig(n_dims=2, d_model=16, n_layers=2, n_heads=4, norm=norm, layout=layout, causal=causal, max_seq_len=32)
    model, task = BridgeICLModel(cfg).eval(), random_task(3, 5, 2, 2, seed=6, dtype=torch.float32)
    lens = probes.layer_predictions(model, task)
    np.testing.assert_allclose(lens[:, -1].numpy(), model.predict(task).detach().double().numpy(), rtol=0, atol=1e-6)
    pattern, scores = probes.attention_kernels(model, task), probes.attention_kernels(model, task, source="scores")
    assert pattern.support.shape == (3, 2, 4, 5, 5) and pattern.support.dtype == torch.float32
    if layout == "concat":  # support rows see only support keys, so they are a whole softmax
        expected = torch.softmax(scores.support.double(), -1)
        torch.testing.assert_close(pattern.support.double(), expected, rtol=0, atol=1e-6)
    else:
        weights = scores.support.double().exp()  # interleaved: the softmax also runs over the y tokens, not in this block
        ratio = pattern.support.double() / weights.clamp_min(1e-300)
        finite = torch.isfinite(scores.support)
        spread = torch.where(finite, ratio, torch.nan)
        torch.testing.assert_close(spread.nan_to_num(0).amax(-1), spread.nan_to_num(float("inf")).amin(-1), rtol=1e-5, atol=0)
