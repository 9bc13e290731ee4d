"""Figures of a `Diagnosis` (matplotlib; each function returns a Figure and draws nothing else).

- `plot_error_profiles`: the model's per-layer log10 error to the exact KRR prediction beside
  every algorithm's per-step one, each layer drawn at its aligned step.
- `plot_step_map`: the best algorithm's layer x step R2 matrix with the monotone alignment and
  the per-layer argmin on top, and every algorithm's aligned step per layer.
- `plot_kernel_alignment` (`plot_alignment` of any `KernelAlignment`, also
  `KernelAlignment.plot()`): per block and head, the relative operator distance, row-wise
  Spearman correlation and CKA of the attention pattern with each reference kernel.
- `plot_sensitivities`: label-sensitivity matrices d yhat / d y of one prompt, the model's layers
  above the best algorithm's aligned steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from probes.diagnose import Diagnosis, TaskSetDiagnosis
    from probes.kernel_alignment import KernelAlignment


def _figure(n_rows: int, n_cols: int, width: float, height: float):
    import matplotlib.pyplot as plt

    return plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)


PROFILE_MARGIN = 1.0
"""log10 units the error-profile plot shows beyond the model's and the best algorithm's range."""


def plot_error_profiles(result: "TaskSetDiagnosis"):
    """log10 MSE to the KRR prediction: algorithms against step, the model's layers at their
    aligned step of the best algorithm (and against layer index, dashed); the y range is the
    model's and the best algorithm's (other algorithms converging further leave the frame)."""
    figure, axes = _figure(1, 1, 8.5, 4.5)
    ax = axes[0, 0]
    best = result.scores[result.verdict.best]
    for name, score in result.scores.items():
        ax.plot(np.arange(score.algorithm_profile.size), score.algorithm_profile, lw=1.8 if name == best.algorithm else 1.0,
                label=name, alpha=1.0 if name == best.algorithm else 0.7)
    ax.plot(best.aligned_steps, best.model_profile, "ko-", ms=4, lw=2, label=f"model layers at {best.algorithm} steps")
    for layer, step, value in zip(best.layers, best.aligned_steps, best.model_profile):
        ax.annotate(str(layer), (step, value), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.plot(best.layers, best.model_profile, "k--", lw=0.8, alpha=0.5, label="model against layer index")
    ax.set_xlabel("solver step (model: aligned step; numbers = layer)")
    ax.set_ylabel("log10 MSE to exact KRR")
    ax.set_title(f"{result.name}: error profiles")
    shown = np.concatenate([best.model_profile, best.algorithm_profile])  # the other algorithms may leave the frame
    ax.set_ylim(shown.min() - PROFILE_MARGIN, shown.max() + PROFILE_MARGIN)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_step_map(result: "TaskSetDiagnosis"):
    """Left: R2(layer, step) of the best algorithm with the monotone path (white) and per-layer
    argmin (crosses). Right: aligned step per layer for every algorithm."""
    figure, axes = _figure(1, 2, 6.0, 4.5)
    best = result.scores[result.verdict.best]
    rows = np.arange(best.layers.size)
    image = axes[0, 0].imshow(np.clip(np.nan_to_num(best.r2, nan=0.0), 0.0, 1.0), aspect="auto", origin="lower",
                              cmap="viridis", vmin=0.0, vmax=1.0)
    axes[0, 0].plot(best.aligned_steps, rows, "w-o", ms=4, label="monotone alignment")
    axes[0, 0].plot(best.argmin_steps, rows, "rx", ms=6, label="per-layer argmin")
    axes[0, 0].set_yticks(rows, [str(layer) for layer in best.layers])
    axes[0, 0].set_xlabel(f"{best.algorithm} step")
    axes[0, 0].set_ylabel("layer")
    axes[0, 0].set_title(f"R2 of layer vs step ({best.algorithm}, clipped to [0, 1])")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    figure.colorbar(image, ax=axes[0, 0])
    for name, score in result.scores.items():
        axes[0, 1].plot(score.layers, score.aligned_steps, "o-", ms=3, label=f"{name} (R2 {score.score:.3f})")
    axes[0, 1].set_xticks(best.layers)
    axes[0, 1].set_xlabel("layer")
    axes[0, 1].set_ylabel("aligned step")
    axes[0, 1].set_title(f"{result.name}: best-matching step per layer")
    axes[0, 1].legend(fontsize=7)
    axes[0, 1].grid(alpha=0.3)
    figure.tight_layout()
    return figure


ALIGNMENT_PANELS = (
    ("operator_distance", "rel. op. distance", "magma_r", (0.0, None)),
    ("row_spearman", "row Spearman", "magma", (-1.0, 1.0)),
    ("cka", "CKA", "magma", (0.0, 1.0)),
)
"""The kernel-alignment heatmaps: (metric, title, colour map, (vmin, vmax); vmax None: the
larger of 1 and the data's maximum). Brighter is always closer to the kernel."""

MAX_ANNOTATED_CELLS = 64
"""Heatmaps with at most this many cells print each cell's value."""


def plot_kernel_alignment(result: "TaskSetDiagnosis"):
    """`plot_alignment` of a diagnosed task set's kernel alignment, or None when it was skipped."""
    if result.kernel_alignment is None:
        return None
    return plot_alignment(result.kernel_alignment, title=result.name)


def plot_alignment(alignment: "KernelAlignment", title: str = "attention"):
    """Per block x head heatmaps of the relative operator distance, row Spearman and CKA of the
    attention pattern against each reference kernel (one row of panels per kernel, the fitted
    scale's range in its first title); `title` starts the figure's title."""
    kernels = list(alignment.metrics)
    figure, axes = _figure(len(kernels), len(ALIGNMENT_PANELS), 4.2, 3.4)
    for row, kernel in enumerate(kernels):
        scale_name = "τ" if kernel == "exp" else "σ"
        scale = np.asarray(alignment.scale[kernel].cpu(), dtype=np.float64)
        for col, (metric, metric_title, cmap, (vmin, vmax)) in enumerate(ALIGNMENT_PANELS):
            values = np.asarray(alignment.metrics[kernel][metric].cpu(), dtype=np.float64)  # [block, head]
            if vmax is None:
                vmax = float(np.nanmax(values, initial=1.0))
            ax = axes[row, col]
            image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
            _integer_ticks(ax, *values.shape)
            if values.size <= MAX_ANNOTATED_CELLS:
                _annotate_cells(ax, values, image)
            ax.set_xlabel("head")
            ax.set_ylabel("block")
            fitted = f" ({scale_name} {_value_range(scale)})" if col == 0 else ""  # the first panel names the fitted scales
            ax.set_title(f"{kernel}{fitted}: {metric_title}", fontsize=9)
            figure.colorbar(image, ax=ax)
    figure.suptitle(f"{title}: attention pattern ({alignment.block} rows) vs reference kernels, brighter = closer")
    figure.tight_layout()
    return figure


def _integer_ticks(ax, n_rows: int, n_columns: int) -> None:
    """Tick every row and column of an `[n_rows, n_columns]` heatmap at its integer index."""
    ax.set_xticks(np.arange(n_columns))
    ax.set_yticks(np.arange(n_rows))


def _annotate_cells(ax, values: np.ndarray, image) -> None:
    """Write each cell's value `[rows, columns]` on the heatmap, dark on bright cells."""
    for (row, column), value in np.ndenumerate(values):
        if np.isfinite(value):
            brightness = np.mean(image.cmap(image.norm(value))[:3])
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if brightness > 0.5 else "white")


def _value_range(values: np.ndarray) -> str:
    """The range of the finite entries of `values` as "low-high" (3 significant digits), then how
    many are infinite (a fitted scale of inf: the best reference is uniform over the keys)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        text = "none finite"
    elif np.isclose(finite.min(), finite.max()):
        text = f"{finite.min():.3g}"
    else:
        text = f"{finite.min():.3g}-{finite.max():.3g}"
    infinite = int(np.isinf(values).sum())
    return text + (f"; ∞ in {infinite}" if infinite else "")


def plot_sensitivities(result: "TaskSetDiagnosis", prompt: int = 0, max_columns: int = 5):
    """d yhat / d y `[m, n]` of one prompt: the model's layers (top) and the best algorithm at
    their aligned steps (bottom); None when sensitivities were not computed."""
    if result.layer_sensitivities is None:
        return None
    best = result.scores[result.verdict.best]
    scored = best.scored
    picks = scored[np.unique(np.linspace(0, scored.size - 1, min(max_columns, scored.size)).round().astype(int))]
    step_sens = result.step_sensitivities[best.algorithm][prompt] if result.step_sensitivities else None
    figure, axes = _figure(2, picks.size, 2.6, 2.4)
    layer_sens = result.layer_sensitivities[prompt]
    scale = np.abs(layer_sens[picks]).max() or 1.0
    for col, row in enumerate(picks):
        step = best.aligned_steps[row]
        axes[0, col].imshow(layer_sens[row], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        axes[0, col].set_title(f"layer {best.layers[row]}", fontsize=8)
        if step_sens is not None:
            axes[1, col].imshow(step_sens[step], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        axes[1, col].set_title(f"{best.algorithm} step {step}", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("model\nquery")
    axes[1, 0].set_ylabel("algorithm\nquery")
    figure.suptitle(f"{result.name}: d yhat / d y (prompt {prompt}; columns = support labels)")
    figure.tight_layout()
    return figure


def diagnosis_figures(diagnosis: "Diagnosis", task_set: str | None = None) -> dict[str, Any]:
    """Every figure of one task set (default: each task set), keyed "<task set>/<figure>" when
    several task sets are drawn, else "<figure>"."""
    names = list(diagnosis.task_sets) if task_set is None else [task_set]
    unknown = [name for name in names if name not in diagnosis.task_sets]
    if unknown:
        raise ValueError(f"task_set must be one of {list(diagnosis.task_sets)}, got {unknown[0]!r}")
    figures = {}
    for name in names:
        result = diagnosis.task_sets[name]
        prefix = f"{name}/" if len(names) > 1 else ""
        drawn = {
            "error_profiles": plot_error_profiles(result),
            "step_map": plot_step_map(result),
            "kernel_alignment": plot_kernel_alignment(result),
            "sensitivities": plot_sensitivities(result),
        }
        figures.update({prefix + key: figure for key, figure in drawn.items() if figure is not None})
    return figures
