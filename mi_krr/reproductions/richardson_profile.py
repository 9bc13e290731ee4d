"""richardson-profile: does a softmax model trained on Gaussian-kernel GP regression follow
preconditioned Richardson layer by layer?

Yan et al. (2026) report that per-layer linear probes' error profiles of GPT-2-style models
trained on GP regression align best with preconditioned Richardson among classical KRR solvers.
Here the shipped softmax model (checkpoints/softmax_gp) is diagnosed on in-distribution prompts
with two lenses: the model's own read-out applied to every layer, and ridge probes fitted per
layer on separate prompts (method="ridge", targets y_query). Every candidate of
`probes.diagnose.DEFAULT_ALGORITHMS` (CG, Jacobi-CG, GD, Jacobi- and row-sum-preconditioned
Richardson, Chebyshev, heavy ball, Newton-Schulz) is scored by path R2 with a bootstrap interval
and by the distance between error profiles (log10 MSE to exact KRR, monotone-aligned: Yan et
al.'s comparison), and the identifiability verdict is given. Whatever comes out is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mi_krr.reproductions._format import key_numbers_text

QUICK: dict[str, Any] = {"batch_size": 16, "train_batch_size": 64, "bootstrap": 100, "n_steps": 20}
LENSES = ("readout", "ridge")
RICHARDSON = ("richardson_rowsum", "richardson_jacobi")
PROFILE_CURVES = ("richardson_rowsum", "richardson_jacobi", "gd", "cg")
"""The solvers whose error profiles the figure always draws; each lens's best is drawn too."""
PROFILE_MARGIN = 1.5
"""Decades of log10 MSE the error-profile panel shows below and above the model's layers: solver
curves that leave that band (CG reaching float64 rounding, ~1e-30) leave the panel instead of
squeezing the layers into a sliver of it."""
LENS_STYLES = ("-", "--", ":", "-.")
"""Line style of each lens's solver curves in the error-profile panel, in the order of
`RichardsonProfileResult.lenses` (`LENSES`)."""


@dataclass
class LensResult:
    """One lens's scores.

    Attributes:
        scores: algorithm -> path R2; score_ci: algorithm -> 95% interval.
        profile_distance: algorithm -> RMS gap of log10-MSE error profiles under their own
            monotone alignment (smaller = closer profile).
        aligned_steps: algorithm -> monotone-aligned step per probed layer (1..L).
        model_profile: per-layer log10 MSE to exact KRR (layers 1..L).
        algorithm_profiles: algorithm -> per-step log10 MSE to exact KRR `[n_steps + 1]` (with
            this lens's fitted steps: the step-size algorithms' curves differ between lenses).
        best, identified, runner_up, gap, gap_ci, equivalent, message, withheld: the verdict
            (withheld: why none was drawn, as for the ridge lens; else None).
        fitted_steps: step-size algorithm (gd, Richardson, heavy ball) -> its cross-fitted
            parameters (`probes.step_sizes.FittedStep.to_dict()` and the halves): "step" `[2]`,
            the step fitted on each half of the prompts, "momentum" `[2]` (heavy ball; else
            None), "fit_score" `[2]` (in-sample path R2 of each half), "fold_sizes" `[2]` and
            "folds" `[batch_size]` (each prompt's half, 0 or 1: prompt b runs with
            step[1 - folds[b]], fitted on the other half). Empty with step_sizes="optimal".
    """

    scores: dict[str, float]
    score_ci: dict[str, tuple[float, float]]
    profile_distance: dict[str, float]
    aligned_steps: dict[str, list[int]]
    model_profile: list[float]
    algorithm_profiles: dict[str, list[float]]
    best: str
    identified: bool
    runner_up: str | None
    gap: float | None
    gap_ci: tuple[float, float] | None
    equivalent: list[str]
    message: str
    withheld: str | None = None
    fitted_steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        return sorted(self.scores, key=lambda name: -self.scores[name] if np.isfinite(self.scores[name]) else np.inf)

    def profile_ranking(self) -> list[str]:
        return sorted(self.profile_distance, key=lambda name: self.profile_distance[name])


def _runner_up_text(result: LensResult) -> str:
    """", runner-up <name> gap <gap> [<gap_ci>]" for a verdict with a runner-up, else ""."""
    if not result.runner_up:
        return ""
    assert result.gap is not None and result.gap_ci is not None  # a verdict with a runner-up has both
    return f", runner-up {result.runner_up} gap {result.gap:+.4f} [{result.gap_ci[0]:+.4f}, {result.gap_ci[1]:+.4f}]"


@dataclass
class RichardsonProfileResult:
    """Both lenses on the same in-distribution prompts.

    Attributes:
        checkpoint: the model's path.
        lenses: "readout" / "ridge" -> `LensResult`.
        layers: probed block outputs 1..L.
        n_steps, lam, kernel, batch_size, train_batch_size: the setting.
        step_sizes: how GD / Richardson / heavy ball steps were set (`probes.diagnose`'s
            step_sizes: "fitted" = per algorithm and lens, one global step (and momentum for
            heavy ball) fitted on each half of the prompts and used to score the other half;
            the values are each lens's `LensResult.fitted_steps`).
    """

    checkpoint: str
    lenses: dict[str, LensResult]
    layers: list[int]
    n_steps: int
    lam: float
    kernel: str
    batch_size: int
    train_batch_size: int
    step_sizes: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_numbers(self) -> dict[str, Any]:
        numbers: dict[str, Any] = {}
        for lens, result in self.lenses.items():
            top = ", ".join(
                f"{name} {result.scores[name]:.3f} [{result.score_ci[name][0]:.3f}, {result.score_ci[name][1]:.3f}]"
                for name in result.ranking()[:4]
            )
            numbers[f"{lens}: path R2, top 4"] = top
            numbers[f"{lens}: rank of preconditioned Richardson by path R2"] = ", ".join(
                f"{name} #{result.ranking().index(name) + 1}" for name in RICHARDSON if name in result.scores
            )
            numbers[f"{lens}: closest error profile (Yan et al.'s comparison)"] = ", ".join(
                f"{name} {result.profile_distance[name]:.3f}" for name in result.profile_ranking()[:3]
            )
            state = "withheld" if result.withheld else "identified" if result.identified else "not identified"
            numbers[f"{lens}: verdict"] = (f"{state}; best {result.best}" + _runner_up_text(result)
                                           + (f"; inseparable: {', '.join(result.equivalent)}" if result.equivalent else ""))
        return numbers

    def summary(self) -> str:
        return key_numbers_text(self.key_numbers())

    def _plot_profiles(self, profiles) -> None:
        """Each lens's model layers at their aligned steps of that lens's best solver, on that
        lens's solver curves: `PROFILE_CURVES` and every lens's best, one line style per lens
        (`LENS_STYLES`), a curve that is the same under every lens (no fitted step) drawn once,
        solid. The y axis spans the model's layers +- `PROFILE_MARGIN` decades."""
        from probes.plots import annotate_layers

        wanted = dict.fromkeys([*PROFILE_CURVES, *(result.best for result in self.lenses.values())])  # and what the layers sit on
        names = [name for name in wanted if any(name in result.algorithm_profiles for result in self.lenses.values())]
        for index, name in enumerate(names):
            drawn = [(lens, result.algorithm_profiles[name]) for lens, result in self.lenses.items() if name in result.algorithm_profiles]
            shared = all(np.array_equal(profile, drawn[0][1], equal_nan=True) for _, profile in drawn)
            for style, (lens, profile) in zip(LENS_STYLES, drawn[:1] if shared else drawn):
                profiles.plot(np.arange(len(profile)), profile, "-" if shared else style, color=f"C{index + 2}", lw=1.2,
                              label=name if shared else f"{name}, {lens} lens")
        for index, (lens, result) in enumerate(self.lenses.items()):
            steps = result.aligned_steps[result.best]
            profiles.plot(steps, result.model_profile, "o:", color=f"C{index}", ms=5,
                          label=f"model layers, {lens} lens (at its {result.best} steps)")
            annotate_layers(profiles, self.layers, steps, result.model_profile)
        model = np.concatenate([result.model_profile for result in self.lenses.values()])
        finite = model[np.isfinite(model)]
        if finite.size:
            profiles.set_ylim(finite.min() - PROFILE_MARGIN, finite.max() + PROFILE_MARGIN)

    def plot(self):
        import matplotlib.pyplot as plt

        figure, (bars, profiles) = plt.subplots(1, 2, figsize=(13.5, 4.0), dpi=90)
        names = self.lenses["readout"].ranking() if "readout" in self.lenses else next(iter(self.lenses.values())).ranking()
        width = 0.8 / len(self.lenses)
        for index, (lens, result) in enumerate(self.lenses.items()):
            x = np.arange(len(names)) + (index - (len(self.lenses) - 1) / 2) * width
            values = np.array([result.scores[name] for name in names])
            low = np.array([result.score_ci[name][0] for name in names])
            high = np.array([result.score_ci[name][1] for name in names])
            shown = np.clip(values, -0.5, 1.0)
            bars.bar(x, shown, width, label=f"{lens} lens", color=f"C{index}",
                     yerr=np.vstack([np.clip(shown - low, 0, None), np.clip(high - shown, 0, None)]), capsize=2)
        bars.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=7)
        bars.set_ylabel("path R2 (95% CI; clipped at -0.5)")
        bars.set_title("Which solver do the layers follow?", fontsize=9)
        bars.set_ylim(top=1.2)  # path R2 <= 1: the band above the bars holds the legend
        bars.set_yticks([tick for tick in bars.get_yticks() if bars.get_ylim()[0] <= tick <= 1.0])
        bars.legend(fontsize=7, loc="upper center", ncol=len(self.lenses))
        bars.grid(alpha=0.3, axis="y")
        self._plot_profiles(profiles)
        profiles.set_xlabel("solver step (model: aligned step; numbers = layer)")
        profiles.set_ylabel("log10 MSE to exact KRR")
        profiles.set_title(f"Error profiles ({self.kernel} kernel, lam={self.lam:g})", fontsize=9)
        profiles.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never on them
        profiles.grid(alpha=0.3)
        figure.suptitle(f"Layer-wise error profile of {Path(self.checkpoint).name} vs KRR solvers", fontsize=10)
        figure.tight_layout()
        return figure


def richardson_profile(
    checkpoint: str | Path | None = None,
    batch_size: int = 128,
    train_batch_size: int = 512,
    bootstrap: int = 1000,
    n_steps: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> RichardsonProfileResult:
    """Diagnose the softmax GP model with both lenses (module docstring). `checkpoint` defaults to
    the shipped checkpoints/softmax_gp; the ridge probes train on `train_batch_size` other prompts.
    `n_steps` solver steps (64: room for the slow stationary solvers, which need many steps on
    these kappa ~ 100-200 systems, to reach what a layer does). Both prompt counts must be >= 2:
    the steps are cross-fitted on two halves of the `batch_size` prompts, and the ridge probes
    hold some of the `train_batch_size` other prompts out to pick their penalty."""
    from mi_krr._validation import check_count, offset_seed
    from mi_krr.checkpoints import load_checkpoint, shipped_checkpoint, task_sets
    from probes.diagnose import diagnose

    batch_size = check_count("batch_size", batch_size, minimum=2)
    train_batch_size = check_count("train_batch_size", train_batch_size, minimum=2)
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint("softmax_gp")
    loaded = load_checkpoint(path, device=device)
    sets, _ = task_sets(loaded.sampler, batch_size, loaded.n_support, loaded.n_query, seed=seed, shifts=False, label_scale=loaded.label_scale)
    train, _ = task_sets(loaded.sampler, train_batch_size, loaded.n_support, loaded.n_query, seed=offset_seed(seed, 10_000), shifts=False,
                         label_scale=loaded.label_scale)
    layers = list(range(1, loaded.model.n_layers + 1))
    lenses, result, settings = {}, None, {}
    for lens in LENSES:
        diagnosis = diagnose(loaded.model, sets, lam=loaded.lam, n_steps=n_steps, method=lens, layers=layers,
                             train_task=train["in_distribution"] if lens == "ridge" else None, kernels=(), sensitivities=False,
                             bootstrap=bootstrap, seed=seed, progress=progress)
        result, settings = diagnosis["in_distribution"], diagnosis.settings
        lenses[lens] = _lens_result(result)
    assert result is not None  # LENSES is not empty
    return RichardsonProfileResult(
        checkpoint=str(path),
        lenses=lenses,
        layers=layers,
        n_steps=result.n_steps,
        lam=result.lam,
        kernel=result.kernel,
        batch_size=batch_size,
        train_batch_size=train_batch_size,
        step_sizes=str(settings.get("step_sizes", "optimal")),
    )


def _lens_result(result: Any) -> LensResult:
    """The numbers of one `TaskSetDiagnosis` that the reproduction reports."""
    verdict = result.verdict
    scores = result.scores
    best = scores[verdict.best]
    return LensResult(
        scores={name: float(score.score) for name, score in scores.items()},
        score_ci={name: (float(score.score_ci[0]), float(score.score_ci[1])) for name, score in scores.items()},
        profile_distance={name: float(score.profile_aligned_distance) for name, score in scores.items()},
        aligned_steps={name: [int(step) for step in score.aligned_steps] for name, score in scores.items()},
        model_profile=[float(value) for value in best.model_profile],
        algorithm_profiles={name: [float(value) for value in score.algorithm_profile] for name, score in scores.items()},
        best=verdict.best,
        identified=bool(verdict.identified),
        runner_up=verdict.runner_up,
        gap=None if verdict.gap is None else float(verdict.gap),
        gap_ci=None if verdict.gap_ci is None else (float(verdict.gap_ci[0]), float(verdict.gap_ci[1])),
        equivalent=list(verdict.equivalent),
        message=verdict.message,
        withheld=verdict.withheld,
        fitted_steps={name: {**fit.to_dict(), "folds": fit.folds.tolist()} for name, fit in result.fitted_steps.items()},
    )
