"""Mutation review of session 17's changes: the gaps the existing tests left, each closed against an
independent reference (hand-written arrays and settings, NumPy order statistics, a tiny model of our
own on TransformerLens's `HookedRootModule`, matplotlib artists' data).

Covered: the verdict's input checks (`algorithm_agreement`, `identifiability_verdict`,
`check_thresholds`), the verdict's interval at its own `level` in the message, the bootstrap
fingerprint `resamples_digest`, `AlgorithmScore.level`, `Diagnosis.to_dataframe`'s `weighted_r2`,
`diagnose`'s up-front threshold check, the forward-order ranks of residual and attention hooks,
`_prompt_tensor_problem`'s checks, `_difference_text` on a missing candidate list, the overview's
titles (`plot_overview`, `write_overview_report`), the demo's printed notes, `_visible_floor` and
the CG-rate figure's floor, and the Richardson-profile figure's legends, y range and labels."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformer_lens import HookedRootModule  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402

import probes  # noqa: E402
from mi_krr.construct.studies import CGRateStudy, _visible_floor  # noqa: E402
from mi_krr.models import AttentionHooks, EncodedPrompt, ICLTransformer, ICLTransformerConfig  # noqa: E402
from mi_krr.reproductions.richardson_profile import LensResult, RichardsonProfileResult  # noqa: E402
from mi_krr.tasks.samplers import LinearRegressionSampler  # noqa: E402
from own_attention import OwnAttention  # noqa: E402
from prompts import random_task  # noqa: E402
from probes.identifiability import algorithm_agreement, check_thresholds, identifiability_verdict  # noqa: E402
from probes.scoring import bootstrap_weights, score_algorithm, score_algorithms  # noqa: E402
from probes.streaming import encode_for_probe, query_residuals, stream_probes  # noqa: E402


# ---------------------------------------------------------------- the verdict's inputs


def toy_trajectories(noise: float, n_prompts: int = 30, seed: int = 0):
    """Two separable toy algorithms converging geometrically (rates 0.3 and 0.8, steps 0..6) and
    layers that follow the fast one at steps 0..3 plus noise; z is the limit (the "KRR")."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_prompts, 3))
    steps = {name: (1 - r ** np.arange(7))[None, :, None] * z[:, None] for name, r in (("fast", 0.3), ("slow", 0.8))}
    layers = steps["fast"][:, [0, 1, 2, 3]] + noise * rng.normal(size=(n_prompts, 4, 3))
    return layers, steps, z


@pytest.mark.parametrize(
    "case, message",
    [
        ("other number of steps", r"same prompts B and steps T\+1"),
        ("step past T", r"leaves steps 0\.\.6"),
        ("negative step", r"leaves steps 0\.\.6"),
    ],
)
def test_algorithm_agreement_refuses_steps_it_cannot_compare(case, message):
    """Trajectories of 7 and 5 steps cannot be compared step by step; aligned step 7 lies past the
    7 steps 0..6 (it used to be an IndexError), and step -1 would silently read the last step."""
    _, steps, _ = toy_trajectories(0.0)
    aligned = {"fast": [1, 2], "slow": [1, 3]}
    if case == "other number of steps":
        steps = {"fast": steps["fast"], "slow": steps["slow"][:, :5]}
    elif case == "step past T":
        aligned["fast"] = [1, 7]
    else:
        aligned["slow"] = [-1, 2]
    with pytest.raises(ValueError, match=message):
        algorithm_agreement(steps, aligned)


@pytest.mark.parametrize("option", ["min_score", "agreement_threshold"])
def test_r2_thresholds_just_above_one_are_refused(option):
    """No R2 exceeds 1, so a threshold of 1.2 can never be met: refused (not only percentages)."""
    thresholds = {"min_score": 0.9, "min_gap": 0.01, "agreement_threshold": 0.99, option: 1.2}
    with pytest.raises(ValueError, match=f"{option} must be <= 1"):
        check_thresholds(**thresholds)
    layers, steps, z = toy_trajectories(0.01)
    scores = score_algorithms(layers, steps, z, bootstrap=100)
    with pytest.raises(ValueError, match=f"{option} must be <= 1"):
        identifiability_verdict(scores, steps, **{option: 1.2})
    assert check_thresholds(1, 0, 1) == (1.0, 0.0, 1.0)


def test_verdict_refuses_step_predictions_longer_than_the_scores_trajectories():
    """Scores made on 7 steps (0..6) given trajectories with an 8th step appended: every aligned
    step is still in range, so only the shape check can say these are not the scored trajectories."""
    layers, steps, z = toy_trajectories(0.01)
    scores = score_algorithms(layers, steps, z, bootstrap=100)
    longer = {name: np.concatenate([value, value[:, -1:]], axis=1) for name, value in steps.items()}
    with pytest.raises(ValueError, match=r"scored on 30 prompts and 7 steps"):
        identifiability_verdict(scores, longer)


def test_a_score_without_a_resamples_fingerprint_pairs_with_any():
    """`resamples_digest` None (a score built by hand) is not a different draw: the verdict with one
    digest cleared equals the verdict on the untouched scores (fast identified over slow)."""
    layers, steps, z = toy_trajectories(0.01)
    scores = score_algorithms(layers, steps, z, bootstrap=200)
    assert scores["fast"].resamples_digest is not None and scores["fast"].resamples_digest == scores["slow"].resamples_digest
    reference = identifiability_verdict(scores, steps)
    cleared = identifiability_verdict({**scores, "slow": dataclasses.replace(scores["slow"], resamples_digest=None)}, steps)
    assert reference.identified and reference.best == "fast"
    assert (cleared.best, cleared.identified, cleared.gap, cleared.gap_ci) == (reference.best, reference.identified, reference.gap,
                                                                              reference.gap_ci)


def test_resamples_that_differ_only_past_the_first_prompt_are_told_apart():
    """Two weight matrices [200, 30] equal in prompt 0's column and different elsewhere are different
    draws: the verdict refuses to pair them and says they were drawn differently; the same matrix
    twice is paired."""
    layers, steps, z = toy_trajectories(0.01)
    first = bootstrap_weights(30, 200, 0)
    second = first.copy()
    second[:, 1:] = bootstrap_weights(30, 200, 1)[:, 1:]
    assert not np.array_equal(first, second) and np.array_equal(first[:, 0], second[:, 0])
    fast = score_algorithm("fast", layers, steps["fast"], z, resamples=first)
    with pytest.raises(ValueError, match="drawn differently"):
        identifiability_verdict({"fast": fast, "slow": score_algorithm("slow", layers, steps["slow"], z, resamples=second)}, steps)
    paired = identifiability_verdict({"fast": fast, "slow": score_algorithm("slow", layers, steps["slow"], z, resamples=first)}, steps)
    assert paired.best == "fast"


def test_scores_without_resamples_have_no_fingerprint():
    """Without bootstrap resamples there is nothing to pair: `resamples_digest` is None (a digest
    of no resamples would make every unbootstrapped score look like the same draw)."""
    layers, steps, z = toy_trajectories(0.01)
    assert all(score.resamples_digest is None for score in score_algorithms(layers, steps, z, bootstrap=0).values())
    assert score_algorithm("fast", layers, steps["fast"], z).resamples_digest is None


def test_score_records_its_level_and_the_verdict_recomputes_another():
    """Scores made at level 0.9 say so; a verdict at 0.95 on them reports the 95% order-statistic
    interval of the stored replicates (ranks ceil(0.025 R), ceil(0.975 R) of the sorted samples),
    not the stored 90% one."""
    layers, steps, z = toy_trajectories(0.05)
    scores = score_algorithms(layers, steps, z, bootstrap=400, level=0.9)
    assert scores["fast"].level == 0.9
    ordered = np.sort(scores["fast"].score_samples)
    assert scores["fast"].score_ci == pytest.approx((ordered[math.ceil(0.05 * 400) - 1], ordered[math.ceil(0.95 * 400) - 1]))
    verdict = identifiability_verdict(scores, steps, level=0.95)
    assert verdict.score_ci == pytest.approx((ordered[math.ceil(0.025 * 400) - 1], ordered[math.ceil(0.975 * 400) - 1]))
    assert verdict.score_ci != pytest.approx(scores["fast"].score_ci)


def test_verdict_message_gives_and_judges_the_interval_at_the_verdicts_level():
    """At level 0.999 with R = 1000 replicates the interval is (min, max) of the replicates. The
    95% bound is above min_score 0.9 and the 99.9% one below it: the message prints the 99.9%
    interval and says no algorithm explains the layers well enough (not that the gap is small)."""
    layers, steps, z = toy_trajectories(0.22)
    scores = score_algorithms(layers, steps, z, bootstrap=1000, seed=0)
    samples = scores["fast"].score_samples
    assert scores["fast"].score_ci[0] >= 0.9 > samples.min(), "the case must straddle min_score"
    verdict = identifiability_verdict(scores, steps, level=0.999)
    assert f"[{samples.min():.4f}, {samples.max():.4f}]" in verdict.message
    assert "no algorithm explains the layers well enough" in verdict.message
    assert "does not beat" not in verdict.message


# ---------------------------------------------------------------- diagnose, compare, overview, demo


@pytest.fixture(scope="module")
def tiny_diagnosis():
    """A random 2-layer softmax transformer on 8 linear-regression prompts (no bootstrap)."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=1)).eval()
    task = LinearRegressionSampler(2, noise_std=0.1).sample(8, 5, 2, seed=0)
    return probes.diagnose(model, {"in_distribution": task}, n_steps=3, bootstrap=0, kernels=(), algorithms=("gd", "cg"),
                           progress=False)


def with_settings(diagnosis, **settings):
    return dataclasses.replace(diagnosis, settings={**diagnosis.settings, **settings})


def test_dataframe_weighted_r2_is_nan_for_a_score_without_strata(tiny_diagnosis):
    """A score whose `weighted_r2` is None (no stratum with a finite score) shows NaN in the
    dataframe, not 0; the other algorithm keeps its own number."""
    diagnosis = copy.deepcopy(tiny_diagnosis)
    scores = diagnosis.task_sets["in_distribution"].scores
    scores["gd"].weighted_r2 = None
    scores["cg"].weighted_r2 = 0.25
    frame = diagnosis.to_dataframe()
    assert frame[frame.algorithm == "gd"].weighted_r2.isna().all()
    assert (frame[frame.algorithm == "cg"].weighted_r2 == 0.25).all()


class NotToBeRun(ICLTransformer):
    def encode(self, task):
        raise AssertionError("diagnose ran the model before checking its thresholds")


@pytest.mark.parametrize("option", [{"min_score": 1.5}, {"min_gap": -0.1}, {"agreement_threshold": float("inf")}])
def test_diagnose_refuses_bad_thresholds_before_running_the_model(option):
    """A bad verdict threshold is a ValueError up front, not after the model's passes and the
    solvers' trajectories (the encode of this model must never be reached)."""
    model = NotToBeRun(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=2, n_heads=1))
    with pytest.raises(ValueError, match=next(iter(option))):
        probes.diagnose(model, {"in_distribution": LinearRegressionSampler(2).sample(4, 5, 2, seed=0)}, bootstrap=0, kernels=(),
                        progress=False, **option)


def test_note_on_a_candidate_list_missing_for_one_model_groups_by_value(tiny_diagnosis):
    """One diagnosis records no candidate list (None, e.g. built by hand): the note cannot list
    shared candidates, so it groups the models by value like any other setting."""
    settings = dict(tiny_diagnosis.settings)
    settings.pop("algorithms")
    notes = probes.compare({"a": with_settings(tiny_diagnosis, algorithms={"gd": "registry", "cg": "registry"}),
                            "b": dataclasses.replace(tiny_diagnosis, settings=settings)}).notes
    assert notes == ["the models were diagnosed with different candidate algorithms (each row's best is chosen among its own "
                     "model's): a: {'gd': 'registry', 'cg': 'registry'}; b: None."]


def test_overview_default_title_lists_the_models_in_the_order_given(tiny_diagnosis):
    """The default suptitle names the models in the order they were passed, not sorted."""
    figure = probes.compare({"zeta": tiny_diagnosis, "alpha": tiny_diagnosis}).plot()
    assert figure._suptitle.get_text() == "Overview: zeta, alpha"
    plt.close(figure)


def test_overview_report_figure_carries_the_report_title(tiny_diagnosis, tmp_path, monkeypatch):
    """overview.png is drawn with the report's title as its suptitle (recorded as it is saved)."""
    from matplotlib.figure import Figure

    from mi_krr.commands.overview import ModelEntry, write_overview_report

    saved = {}
    original = Figure.savefig

    def recording(self, fname, *args, **kwargs):
        saved[str(fname).rsplit("/", 1)[-1]] = self._suptitle.get_text() if self._suptitle is not None else None
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    write_overview_report([ModelEntry("m", "a model", tiny_diagnosis)], tmp_path, title="my overview", settings={})
    plt.close("all")
    assert saved["overview.png"] == "my overview"


def test_demo_prints_the_comparisons_notes_under_the_table(tiny_diagnosis, monkeypatch, capsys):
    """`mi-krr demo` prints the comparison's summary: the table, then a "Note:" line for the step
    sizes the models differ in (entries replaced by the tiny diagnosis: fitted for the CG
    construction, optimal for the others)."""
    from mi_krr.commands import demo, overview

    fitted, optimal = with_settings(tiny_diagnosis, step_sizes="fitted"), with_settings(tiny_diagnosis, step_sizes="optimal")
    monkeypatch.setattr(demo, "cg_construction_entry", lambda **_: overview.ModelEntry("cg_construction", "", fitted))
    monkeypatch.setattr(demo, "richardson_construction_entry", lambda **_: overview.ModelEntry("richardson_construction", "", optimal))
    monkeypatch.setattr(demo, "shipped_entry", lambda path, name, **_: overview.ModelEntry(name, "", optimal))
    monkeypatch.setattr(overview, "write_overview_report", lambda *args, **kwargs: "index.md")
    args = argparse.Namespace(quick=True, checkpoints=None, seed=0, device="cpu", no_progress=True, sensitivities=False, out="unused")
    assert demo.run(args) == 0
    printed = capsys.readouterr().out
    assert ("Note: the models were diagnosed with different step sizes: cg_construction: fitted; "
            "richardson_construction, linear_lr, softmax_gp: optimal.") in printed.splitlines()


# ---------------------------------------------------------------- streaming: a model of our own


class Block(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.attn = OwnAttention(d_model, 1, "softmax")
        self.hook_resid_post = HookPoint()


class TinyModel(HookedRootModule):
    """Concat layout (x_i, y_i), then (x_*, 0): support rows see the support, query rows the
    support and themselves; Linear read-in (hook_embed), 2 softmax blocks, Linear read-out."""

    def __init__(self, residual_names=None, embed_twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.n_layers, self.n_heads, self.embed_twice = 2, 1, embed_twice
        self.names = residual_names or ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        self.read_in = nn.Linear(3, 4)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([Block(4) for _ in range(2)])
        self.unembed = nn.Linear(4, 1)
        self.to(torch.float64)
        self.setup()

    def encode(self, task) -> EncodedPrompt:
        task = task.to(dtype=torch.float64)
        n, m = task.n_support, task.n_query
        support = torch.cat([task.x_support, task.y_support[..., None]], -1)
        query = torch.cat([task.x_query, torch.zeros(task.batch_size, m, 1, dtype=torch.float64)], -1)
        return EncodedPrompt(tokens=torch.cat([support, query], 1), query_positions=torch.arange(n, n + m), batch_size=task.batch_size,
                             n_query=m, n_support=n, support_positions=torch.arange(n), label_positions=torch.arange(n))

    def mask(self, seq: int) -> torch.Tensor:
        allowed = torch.zeros(seq, seq, dtype=torch.bool)
        allowed[:, : self.n_support] = True
        return allowed | torch.eye(seq, dtype=torch.bool)

    def forward(self, tokens):
        x = self.hook_embed(self.read_in(tokens))
        allowed = self.mask(tokens.shape[1])
        for block in self.blocks:
            x = block.hook_resid_post(x + block.attn(x, allowed))
        return self.readout(self.hook_embed(x) if self.embed_twice else x)

    def residual_hook_names(self):
        return list(self.names)

    def attention_hook_names(self):
        return [AttentionHooks(pattern=f"blocks.{b}.attn.hook_pattern", scores=f"blocks.{b}.attn.hook_attn_scores",
                               q=f"blocks.{b}.attn.hook_q", k=f"blocks.{b}.attn.hook_k") for b in range(2)]

    def allowed_attention(self, prompt):
        return self.mask(prompt.tokens.shape[1])

    def readout(self, resid):
        return self.unembed(resid)[..., 0]

    def predict(self, task):
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens))


def tiny_prompt(model: TinyModel) -> EncodedPrompt:
    task = random_task(2, 3, 2, 2, seed=0)
    model.n_support = task.n_support
    return model.encode(task)


def test_tiny_model_reads_correctly_listed_hooks():
    """The correctly listed model streams the lens and both attention blocks in one pass; the
    last layer's lens is its own prediction."""
    model = TinyModel()
    prompt = tiny_prompt(model)
    streamed = stream_probes(model, prompt, layers=[0, 1, 2], blocks=("support", "query"))
    assert streamed.readouts.shape == (2, 3, 2)
    np.testing.assert_allclose(streamed.readouts[:, 2].numpy(), model.predict(random_task(2, 3, 2, 2, seed=0)).detach().numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "names, fires",
    [
        # residual index 1 listed as a hook that fires before block 0's attention (the embeddings again)
        (["hook_embed", "hook_embed", "blocks.1.hook_resid_post"], "before"),
        # residual index 1 listed as block 1's output, which fires after block 1's attention
        (["hook_embed", "blocks.1.hook_resid_post", "blocks.1.hook_resid_post"], "after"),
    ],
)
def test_a_residual_hook_on_the_wrong_side_of_an_attention_block_is_refused(names, fires):
    """Residual index l must fire after block l-1's attention and before block l's: read together
    with the attention, a residual index 1 that fires before block 0's attention or after block
    1's is refused, naming both methods."""
    model = TinyModel(residual_names=names)
    prompt = tiny_prompt(model)
    with pytest.raises(ValueError, match=r"residual_hook_names\(\).*attention_hook_names\(\)|attention_hook_names\(\).*residual_hook_names\(\)"):
        stream_probes(model, prompt, layers=[1], blocks=("support",))


def test_query_residuals_refuse_residual_names_out_of_forward_order():
    """`query_residuals` (the fitted probes' features) checks the order too: the names listed in
    reverse make layer 0's features the last block's."""
    model = TinyModel(residual_names=["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "hook_embed"])
    with pytest.raises(ValueError, match="residual_hook_names"):
        query_residuals(model, tiny_prompt(model), [0, 1, 2])


def test_a_hook_that_fires_twice_is_named_with_its_count():
    """`hook_embed` reused before the read-out fires twice per pass: the error says so (not only
    an ordering complaint)."""
    model = TinyModel(embed_twice=True)
    with pytest.raises(ValueError, match=r"hook 'hook_embed' fired 2 times in one forward pass"):
        stream_probes(model, tiny_prompt(model), layers=[0, 1])


class Changed(TinyModel):
    def __init__(self, **changes):
        super().__init__()
        self.changes = changes

    def encode(self, task):
        prompt = super().encode(task)
        return dataclasses.replace(prompt, **{name: change(prompt) for name, change in self.changes.items()})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(tokens=lambda p: p.tokens.to("meta")), "on meta"),
        (dict(tokens=lambda p: p.tokens[0]), r"tokens must be a torch tensor \[sequences, seq, d_token\]"),
        (dict(query_positions=lambda p: p.query_positions.float()), "query_positions must be a 1-D integer"),
        (dict(support_positions=lambda p: p.support_positions[None]), "support_positions must be a 1-D integer"),
        (dict(support_positions=lambda p: p.support_positions - 1), r"support_positions \[-1, 0, 1\] leave"),
        (dict(label_positions=lambda p: p.label_positions + 3), r"label_positions \[3, 4, 5\] leave the sequence's positions 0\.\.4"),
        (dict(label_positions=lambda p: p.label_positions[:0]), "label_positions must list n_support = 3 positions"),
    ],
    ids=["tokens on another device", "2-D tokens", "float32 positions", "2-D positions", "negative position", "label past the end",
         "no label positions"],
)
def test_prompt_tensors_the_model_cannot_use_are_refused_naming_encode(changes, message):
    """Each malformed `EncodedPrompt` tensor is one ValueError naming encode and what is wrong
    (hand-made changes to a correct prompt of 3 support points and 2 queries: seq = 5)."""
    model = Changed(**changes)
    task = random_task(2, 3, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"Changed\.encode\(task\) returned a prompt") as error:
        encode_for_probe(model, task)
    assert len(error.value.args) == 1 and re.search(message, str(error.value))


# ---------------------------------------------------------------- figures: floors and the richardson profile


def test_visible_floor_threshold_default_and_fallback():
    """Default threshold 1e-9: 1e-11 (a rounding-level error of an exact head) falls below the
    floor, which is 0.3 x the smallest error above it; nothing above the threshold: the threshold."""
    assert _visible_floor([[1e-11, 1e-2], [0.5]]) == pytest.approx(0.3e-2)
    assert _visible_floor([[1e-11, 1e-2]], threshold=1e-13) == pytest.approx(0.3e-11)
    assert _visible_floor([[1e-15, 0.0]], threshold=1e-13) == 1e-13


def cg_rate_study(ratio, solver, bound):
    return CGRateStudy(kappas=[10.0], steps=[0, 1, 2], a_norm_ratio={"10.0": ratio}, solver_a_norm_ratio={"10.0": solver},
                       pred_error={"10.0": [1.0, 0.1, 0.01]}, bound={"10.0": bound}, n_support=8, lam=1e-4)


@pytest.mark.parametrize(
    "ratio, solver, bound, bottom",
    [
        ([1.0, 1e-2, 1e-3], [1.0, 2e-2, 4e-3], [2.0, 1e-4, 1e-6], 0.3e-6),  # the CG bound is the smallest curve drawn
        ([1.0, 1e-2, 1e-11], [1.0, 2e-2, 4e-4], [2.0, 0.5, 0.1], 0.3e-11),  # 1e-11 is above float64 rounding (1e-13)
    ],
)
def test_cg_rate_floor_covers_the_bound_and_errors_down_to_1e13(ratio, solver, bound, bottom):
    """The A-norm panel's floor is 0.3 x the smallest value above 1e-13 of all three curves drawn
    there (model, solver, bound). Hand-written ratios."""
    figure = cg_rate_study(ratio, solver, bound).plot()
    assert figure.axes[0].get_ylim() == pytest.approx((bottom, 3.0))
    plt.close(figure)


PROFILES = {"gd": [0.0, -0.3, -0.6, -0.9], "cg": [0.0, -1.0, -2.0, -3.0], "heavy_ball": [0.0, -0.7, -1.1, -1.3]}


def lens_result(aligned):
    scores = {"heavy_ball": 0.86, "gd": 0.81, "cg": 0.70}
    return LensResult(scores=scores, score_ci={name: (value - 0.05, value + 0.03) for name, value in scores.items()},
                      profile_distance={name: 0.0 for name in scores}, aligned_steps={name: aligned for name in scores},
                      model_profile=[-0.3, -0.7, -0.75], algorithm_profiles=PROFILES, best="heavy_ball", identified=False,
                      runner_up=None, gap=None, gap_ci=None, equivalent=[], message="")


def profile_figure():
    """Two lenses; the layers 1, 2, 3 aligned to steps 0, 2, 2 (readout) and 1, 2, 3 (ridge)."""
    result = RichardsonProfileResult(checkpoint="checkpoints/softmax_gp", lenses={"readout": lens_result([0, 2, 2]),
                                     "ridge": lens_result([1, 2, 3])}, layers=[1, 2, 3], n_steps=3, lam=0.04, kernel="gaussian",
                                     batch_size=16, train_batch_size=64, step_sizes="fitted")
    figure = result.plot()
    figure.canvas.draw()
    return figure


def test_richardson_bar_legend_is_one_row_above_r2_one():
    """The bar legend holds one entry per lens in one row (equal text heights), entirely above the
    display height of path R2 = 1 (the axis reaches 1.2, R2 cannot)."""
    figure = profile_figure()
    bars = figure.axes[0]
    legend = bars.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["readout lens", "ridge lens"]
    rows = {round(text.get_window_extent().y0, 3) for text in legend.get_texts()}
    assert len(rows) == 1
    assert legend.get_window_extent().y0 > bars.transData.transform((0.0, 1.0))[1]
    assert bars.get_ylim()[1] == pytest.approx(1.2)
    plt.close(figure)


def test_richardson_bar_axis_keeps_its_autoscaled_bottom_under_negative_scores():
    """With cg's path R2 at -0.3 (interval -0.35..-0.27) the bars' y axis starts at matplotlib's
    5% margin below the lowest drawn value, -0.35 - 0.05 (0.89 + 0.35); the y ticks kept are
    inside that view (a tick below it would widen the axis)."""
    lens = lens_result([0, 2, 2])
    lens.scores = {"heavy_ball": 0.86, "gd": 0.81, "cg": -0.3}
    lens.score_ci = {name: (value - 0.05, value + 0.03) for name, value in lens.scores.items()}
    result = RichardsonProfileResult(checkpoint="c", lenses={"readout": lens}, layers=[1, 2, 3], n_steps=3, lam=0.04,
                                     kernel="gaussian", batch_size=16, train_batch_size=64, step_sizes="fitted")
    figure = result.plot()
    bars = figure.axes[0]
    bottom, top = bars.get_ylim()
    assert bottom == pytest.approx(-0.35 - 0.05 * (0.89 + 0.35)) and top == pytest.approx(1.2)
    assert all(bottom <= tick <= 1.0 for tick in bars.get_yticks())
    plt.close(figure)


def test_richardson_profile_labels_layers_at_their_aligned_steps_and_the_legend_fits_the_figure():
    """Each lens's model points are numbered at their aligned steps, runs of one step sharing one
    label ("2-3" at step 2 for the readout lens); the legend right of the profiles stays inside
    the figure."""
    figure = profile_figure()
    profiles = figure.axes[1]
    labels = [(text.get_text(), tuple(float(v) for v in text.xy)) for text in profiles.texts]
    assert labels == [("1", (0.0, -0.3)), ("2-3", (2.0, -0.75)), ("1", (1.0, -0.3)), ("2", (2.0, -0.7)), ("3", (3.0, -0.75))]
    assert profiles.get_legend().get_window_extent().x1 <= figure.bbox.x1
    plt.close(figure)
