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

from mi_krr._validation import check_count

if TYPE_CHECKING:
    from probes.diagnosis import Diagnosis, TaskSetDiagnosis
    from probes.kernel_alignment import KernelAlignment


def _figure(n_rows: int, n_cols: int, width: float, height: float):
    import matplotlib.pyplot as plt

    return plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)


PROFILE_MARGIN = 1.0
"""log10 units the error-profile plot shows beyond the model's and the best algorithm's range."""


def plot_error_profiles(result: "TaskSetDiagnosis", title: str | None = None):
    """log10 MSE to the KRR prediction: algorithms against step, the model's layers at their
    aligned step of the best algorithm (and dashed, the k-th probed layer at step k: layer index
    when every layer is probed, step boundaries of a construction at their step); the y range is the
    model's and the best algorithm's (other algorithms converging further leave the frame).
    `title` starts the title (default: the task set's name)."""
    figure, axes = _figure(1, 1, 8.5, 4.5)
    ax = axes[0, 0]
    best = result.scores[result.verdict.best]
    for name, score in result.scores.items():
        ax.plot(np.arange(score.algorithm_profile.size), score.algorithm_profile, lw=1.8 if name == best.algorithm else 1.0,
                label=name, alpha=1.0 if name == best.algorithm else 0.7)
    ax.plot(best.aligned_steps, best.model_profile, "ko-", ms=4, lw=2, label=f"model layers at {best.algorithm} steps")
    annotate_layers(ax, best.layers, best.aligned_steps, best.model_profile)
    ax.plot(np.arange(best.layers.size), best.model_profile, "k--", lw=0.8, alpha=0.5, label="model, one step per probed layer")
    ax.set_xlabel("solver step (model: aligned step; numbers = layer)")
    ax.set_ylabel("log10 MSE to exact KRR")
    ax.set_title(f"{title or result.name}: error profiles")
    shown = np.concatenate([best.model_profile, best.algorithm_profile])  # the other algorithms may leave the frame
    ax.set_ylim(shown.min() - PROFILE_MARGIN, shown.max() + PROFILE_MARGIN)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def annotate_layers(ax, layers, steps, values) -> None:
    """Number the model's points of an error profile by layer: `layers`, `steps`, `values` are
    `[n_layers]`. Layers aligned to one step (runs, as the alignment is monotone) share one label
    "first-last" at the run's last point, so a stack of layers at one step stays legible."""
    layers, steps = np.asarray(layers), np.asarray(steps)
    starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], steps.size]):
        text = str(layers[start]) if stop - start == 1 else f"{layers[start]}-{layers[stop - 1]}"
        ax.annotate(text, (steps[stop - 1], values[stop - 1]), textcoords="offset points", xytext=(3, 3), fontsize=7)


def plot_step_map(result: "TaskSetDiagnosis", title: str | None = None):
    """Left: R2(layer, step) of the best algorithm with the monotone path (white) and per-layer
    argmin (crosses). Right: aligned step per layer for every algorithm. `title` starts the right
    panel's title (default: the task set's name)."""
    figure, axes = _figure(1, 2, 6.0, 4.5)
    best = result.scores[result.verdict.best]
    rows = np.arange(best.layers.size)
    r2 = np.ma.masked_invalid(np.clip(best.r2, 0.0, 1.0))  # undefined R2 (a step without variance) is a grey gap
    image = axes[0, 0].imshow(r2, aspect="auto", origin="lower", cmap=_with_gaps("viridis"), vmin=0.0, vmax=1.0)
    axes[0, 0].plot(best.aligned_steps, rows, "w-o", ms=4, label="monotone alignment")
    axes[0, 0].plot(best.argmin_steps, rows, "rx", ms=6, label="per-layer argmin")
    axes[0, 0].set_yticks(rows, [str(layer) for layer in best.layers])
    axes[0, 0].set_xlabel(f"{best.algorithm} step")
    axes[0, 0].set_ylabel("layer")
    axes[0, 0].set_title(f"R2 of layer vs step ({best.algorithm}, clipped to [0, 1]; grey: undefined)", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    figure.colorbar(image, ax=axes[0, 0])
    for name, score in result.scores.items():
        axes[0, 1].plot(score.layers, score.aligned_steps, "o-", ms=3, label=f"{name} (R2 {score.score:.3f})")
    axes[0, 1].set_xticks(best.layers)
    axes[0, 1].set_xlabel("layer")
    axes[0, 1].set_ylabel("aligned step")
    axes[0, 1].set_title(f"{title or result.name}: best-matching step per layer")
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


def plot_kernel_alignment(result: "TaskSetDiagnosis", title: str | None = None):
    """`plot_alignment` of a diagnosed task set's kernel alignment, or None when it was skipped
    (`title`: default the task set's name)."""
    if result.kernel_alignment is None:
        return None
    return plot_alignment(result.kernel_alignment, title=title or result.name)


def plot_alignment(alignment: "KernelAlignment", title: str = "attention"):
    """Per block x head heatmaps of the relative operator distance, row Spearman and CKA of the
    attention pattern against each reference kernel (one row of panels per kernel, the fitted
    scale's range in its first title); `title` starts the figure's title."""
    kernels = list(alignment.metrics)
    values = {(kernel, metric): np.asarray(alignment.metrics[kernel][metric].cpu(), dtype=np.float64)  # [block, head]
              for kernel in kernels for metric, *_ in ALIGNMENT_PANELS}
    figure, axes = _figure(len(kernels), len(ALIGNMENT_PANELS), 4.2, 3.4)
    for row, kernel in enumerate(kernels):
        scale_name = "τ" if kernel == "exp" else "σ"
        scale = np.asarray(alignment.scale[kernel].cpu(), dtype=np.float64)
        for col, (metric, metric_title, cmap, (vmin, vmax)) in enumerate(ALIGNMENT_PANELS):
            if vmax is None:  # one range for every kernel's row: the rows are read against each other
                vmax = max(float(np.nanmax(values[other, metric], initial=1.0)) for other in kernels)
            cells = values[kernel, metric]
            ax = axes[row, col]
            image = ax.imshow(np.ma.masked_invalid(cells), aspect="auto", origin="lower", cmap=_with_gaps(cmap), vmin=vmin, vmax=vmax)
            _integer_ticks(ax, *cells.shape)
            if cells.size <= MAX_ANNOTATED_CELLS:
                _annotate_cells(ax, cells, image)
            ax.set_xlabel("head")
            ax.set_ylabel("block")
            fitted = f" ({scale_name} {_value_range(scale)})" if col == 0 else ""  # the first panel names the fitted scales
            ax.set_title(f"{kernel}{fitted}: {metric_title}", fontsize=9)
            figure.colorbar(image, ax=ax)
    figure.suptitle(f"{title}: attention pattern ({alignment.block} rows) vs reference kernels, brighter = closer, grey = undefined")
    figure.tight_layout()
    return figure


def _integer_ticks(ax, n_rows: int, n_columns: int) -> None:
    """Tick every row and column of an `[n_rows, n_columns]` heatmap at its integer index."""
    ax.set_xticks(np.arange(n_columns))
    ax.set_yticks(np.arange(n_rows))


def _annotate_cells(ax, values: np.ndarray, image) -> None:
    """Write each cell's value `[rows, columns]` on the heatmap, dark on bright cells ("n/a" on
    undefined ones)."""
    for (row, column), value in np.ndenumerate(values):
        if np.isfinite(value):
            brightness = np.mean(image.cmap(image.norm(value))[:3])
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if brightness > 0.5 else "white")
        else:
            ax.text(column, row, "n/a", ha="center", va="center", fontsize=7, color="white")


GAP_GREY = "0.5"
"""The colour of undefined (NaN) heatmap cells: mid grey, far from both ends of every colour map
used here (a transparent cell would look white, the "closest" end of magma)."""


def _with_gaps(cmap: str):
    """Colour map `cmap` drawing masked / NaN cells in `GAP_GREY`."""
    import matplotlib

    return matplotlib.colormaps[cmap].with_extremes(bad=GAP_GREY)


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


def plot_sensitivities(result: "TaskSetDiagnosis", prompt: int = 0, max_columns: int = 5, title: str | None = None):
    """d yhat / d y `[m, n]` of one prompt: the model's layers (top) and the best algorithm at
    their aligned steps (bottom); None when sensitivities were not computed. `title` starts the
    title (default: the task set's name)."""
    if result.layer_sensitivities is None:
        return None
    n_prompts = result.layer_sensitivities.shape[0]
    if isinstance(prompt, bool) or not isinstance(prompt, (int, np.integer)) or not 0 <= prompt < n_prompts:
        raise ValueError(f"prompt must be a prompt index in [0, {n_prompts}) (this task set's prompts), got {prompt!r}")
    max_columns = check_count("max_columns", max_columns, minimum=1)
    best = result.scores[result.verdict.best]
    scored = best.scored
    picks = scored[np.unique(np.linspace(0, scored.size - 1, min(max_columns, scored.size)).round().astype(int))]
    step_sens = result.step_sensitivities[best.algorithm][prompt] if result.step_sensitivities else None
    figure, axes = _figure(2, picks.size, 2.6, 2.4)
    layer_sens = result.layer_sensitivities[prompt]
    drawn = [layer_sens[picks]] + ([step_sens[best.aligned_steps[picks]]] if step_sens is not None else [])
    scale = max(float(np.abs(values).max()) for values in drawn) or 1.0  # one range for both rows
    for col, row in enumerate(picks):
        step = best.aligned_steps[row]
        image = axes[0, col].imshow(layer_sens[row], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        axes[0, col].set_title(f"layer {best.layers[row]}", fontsize=8)
        if step_sens is not None:
            axes[1, col].imshow(step_sens[step], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        axes[1, col].set_title(f"{best.algorithm} step {step}", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("model\nquery")
    axes[1, 0].set_ylabel("algorithm\nquery")
    figure.suptitle(f"{title or result.name}: d yhat / d y (prompt {prompt}; columns = support labels)")
    figure.tight_layout()
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="d yhat / d y")
    return figure


def diagnosis_figures(diagnosis: "Diagnosis", task_set: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Every figure of one task set (default: each task set), keyed "<task set>/<figure>" when
    several task sets are drawn, else "<figure>"; titles start "<model>, <task set>" with `model`
    (tell several models' figures apart), else with the task set.

    The figures are pyplot figures, so a notebook's inline backend shows them when the cell ends
    (and closes them); a script that only saves them closes them (`plt.close(figure)`)."""
    names = list(diagnosis.task_sets) if task_set is None else [task_set]
    unknown = [name for name in names if name not in diagnosis.task_sets]
    if unknown:
        raise ValueError(f"task_set must be one of {list(diagnosis.task_sets)}, got {unknown[0]!r}")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be the model's name as a str (it starts the figure titles), got {model!r}")
    figures = {}
    for name in names:
        result = diagnosis.task_sets[name]
        prefix = f"{name}/" if len(names) > 1 else ""
        title = f"{model}, {name}" if model else name
        drawn = {
            "error_profiles": plot_error_profiles(result, title),
            "step_map": plot_step_map(result, title),
            "kernel_alignment": plot_kernel_alignment(result, title),
            "sensitivities": plot_sensitivities(result, title=title),
        }
        figures.update({prefix + key: figure for key, figure in drawn.items() if figure is not None})
    return figures
