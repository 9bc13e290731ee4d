"""Several models' diagnoses on one page: the summary table (one row per model and task set), the
overview figure, and the report folder `mi-krr demo` and `mi-krr diagnose` write.

Report folder:
    index.md           the table, the settings, and the figures
    report.json        every number (strict JSON: NaN / inf as null): per model its description, table
                       rows and `Diagnosis.to_dict()`
    overview.png       best path R2 and kernel distance per task set, every model
    <model>_<figure>.png   in-distribution figures of each model (probes.plots)
    <model>.npz        per-layer, per-step and KRR predictions (as `probes.report.write_report`)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

IN_DISTRIBUTION = "in_distribution"
REPORT_JSON = "report.json"
INDEX = "index.md"
OVERVIEW_FIGURE = "overview.png"
MODEL_FIGURES = ("error_profiles", "step_map", "kernel_alignment")


@dataclass
class SummaryRow:
    """One model on one task set.

    Attributes:
        model, task_set: names.
        best: the top-scoring algorithm; `score` its path R2 and `score_ci` the interval.
        step_map: the best algorithm's monotone-aligned step per probed block output,
            "layer:step" pairs.
        identified: the verdict.
        kernel_distance: relative operator-norm distance of attention to the fitted exp kernel,
            best head per layer, mean over layers (NaN when the alignment was skipped, e.g. for
            linear attention, whose pattern is not a row-normalised kernel).
    """

    model: str
    task_set: str
    best: str
    score: float
    score_ci: tuple[float, float]
    step_map: str
    identified: bool
    kernel_distance: float


def kernel_distance(result: Any, kernel: str = "exp") -> float:
    """Operator-norm distance of a task set's attention to `kernel`: min over heads, mean over
    layers (NaN without an alignment for that kernel)."""
    alignment = result.kernel_alignment
    if alignment is None or kernel not in alignment.metrics:
        return math.nan
    distance = np.asarray(alignment.metrics[kernel]["operator_distance"].cpu(), dtype=np.float64)  # [layer, head]
    finite = np.where(np.isfinite(distance), distance, np.inf).min(axis=1)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def summary_rows(model_name: str, diagnosis: Any) -> list[SummaryRow]:
    """One `SummaryRow` per task set of `diagnosis`."""
    rows = []
    for set_name, result in diagnosis.task_sets.items():
        best = result.scores[result.verdict.best]
        pairs = [f"{layer}:{step}" for layer, step in zip(best.layers, best.aligned_steps) if layer > 0]
        rows.append(
            SummaryRow(
                model=model_name,
                task_set=set_name,
                best=best.algorithm,
                score=float(best.score),
                score_ci=(float(best.score_ci[0]), float(best.score_ci[1])),
                step_map=" ".join(pairs),
                identified=bool(result.verdict.identified),
                kernel_distance=kernel_distance(result),
            )
        )
    return rows


def format_table(rows: list[SummaryRow]) -> str:
    """The rows as a fixed-width text table (also valid inside a Markdown code block)."""
    header = ("model", "task set", "best algorithm", "path R2 [95% CI]", "identified", "exp-kernel dist", "best-step map (layer:step)")
    cells = [
        (
            row.model,
            row.task_set,
            row.best,
            f"{row.score:.4f} [{row.score_ci[0]:.3f}, {row.score_ci[1]:.3f}]",
            "yes" if row.identified else "no",
            "-" if math.isnan(row.kernel_distance) else f"{row.kernel_distance:.3f}",
            row.step_map,
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *cells]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *cells]:
        lines.append("  ".join(str(value).ljust(width) for value, width in zip(line, widths)) + "  " + line[-1])
        if line is header:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(lines)


def plot_overview(rows: list[SummaryRow]):
    """Left: best path R2 per task set, one line per model (filled markers: identified).
    Right: exp-kernel distance per task set for models with softmax attention."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row.model for row in rows))
    sets = sorted(dict.fromkeys(row.task_set for row in rows), key=_set_order)
    position = {name: index for index, name in enumerate(sets)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=80)
    for index, model in enumerate(models):
        mine = sorted((row for row in rows if row.model == model), key=lambda row: position[row.task_set])
        x = [position[row.task_set] for row in mine]
        left.plot(x, [max(row.score, -0.5) for row in mine], "-", color=f"C{index}", lw=1, label=model)
        for row, xi in zip(mine, x):
            left.plot(xi, max(row.score, -0.5), "o", color=f"C{index}", mfc=f"C{index}" if row.identified else "white")
        distances = [row.kernel_distance for row in mine]
        if any(math.isfinite(value) for value in distances):
            right.plot(x, distances, "o-", color=f"C{index}", label=model)
    for ax in (left, right):
        ax.set_xticks(range(len(sets)), sets, rotation=40, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    left.set_ylabel("best algorithm's path R2 (clipped at -0.5)")
    left.set_title("Which algorithm explains the layers (filled: identified)", fontsize=9)
    left.legend(fontsize=7)
    right.set_ylabel("attention vs exp kernel (rel. op. distance)")
    right.set_title("Attention as an exp kernel: best head per layer, mean", fontsize=9)
    if right.lines:
        right.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _set_order(name: str) -> tuple[int, str]:
    """In-distribution first, then the shifts in `DEFAULT_SHIFTS` order, then the rest by name."""
    from mi_krr.tasks import DEFAULT_SHIFTS

    order = [IN_DISTRIBUTION, *DEFAULT_SHIFTS]
    return (order.index(name), "") if name in order else (len(order), name)


@dataclass
class ModelEntry:
    """One model of a report: its name, a one-line description and its `Diagnosis`."""

    name: str
    description: str
    diagnosis: Any
    extra: dict[str, Any] | None = None


def write_overview_report(entries: list[ModelEntry], folder: str | Path, title: str, settings: dict[str, Any]) -> Path:
    """Write the report folder (module docstring) for `entries`; returns the index path."""
    import matplotlib.pyplot as plt

    from probes.plots import plot_error_profiles, plot_kernel_alignment, plot_step_map
    from probes.diagnose import strict_json
    from probes.report import _safe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for entry in entries for row in summary_rows(entry.name, entry.diagnosis)]
    figure = plot_overview(rows)
    figure.savefig(folder / OVERVIEW_FIGURE, dpi=80, bbox_inches="tight")
    plt.close(figure)

    lines = [f"# {title}", "", "```", format_table(rows), "```", "",
             "path R2: share of the best algorithm's trajectory variance (along the layer -> step alignment) the "
             "layers reproduce; identified: the verdict of `probes.identifiability`; exp-kernel dist: relative "
             "operator-norm distance of attention to a row-normalised exp kernel (best head per layer, mean over "
             "layers; `-` where attention is not a normalised kernel).", "",
             f"![overview]({OVERVIEW_FIGURE})", "",
             "Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()), ""]
    drawers = {"error_profiles": plot_error_profiles, "step_map": plot_step_map, "kernel_alignment": plot_kernel_alignment}
    document: dict[str, Any] = {"title": title, "settings": settings, "table": [asdict(row) for row in rows], "models": {}}
    for entry in entries:
        safe = _safe(entry.name)
        lines += [f"## {entry.name}", "", entry.description, ""]
        result = entry.diagnosis.task_sets.get(IN_DISTRIBUTION) or next(iter(entry.diagnosis.task_sets.values()))
        lines += ["```", result.verdict.message, "```", ""]
        for name in MODEL_FIGURES:
            drawn = drawers[name](result)
            if drawn is None:
                continue
            file_name = f"{safe}_{name}.png"
            drawn.savefig(folder / file_name, dpi=80, bbox_inches="tight")
            plt.close(drawn)
            lines += [f"![{entry.name}: {name} ({result.name})]({file_name})", ""]
        notes = sorted({note for result in entry.diagnosis.task_sets.values() for note in result.notes})
        lines += [f"- note: {note}" for note in notes] + ([""] if notes else [])
        arrays = {}
        for set_name, result in entry.diagnosis.task_sets.items():
            arrays[f"{set_name}/layer_predictions"] = result.layer_predictions
            arrays[f"{set_name}/krr_predictions"] = result.krr_predictions
            for algorithm, pred in result.step_predictions.items():
                arrays[f"{set_name}/steps/{algorithm}"] = pred
        np.savez_compressed(folder / f"{safe}.npz", **arrays)
        document["models"][entry.name] = {
            "description": entry.description,
            "diagnosis": entry.diagnosis.to_dict(),
            **({"extra": entry.extra} if entry.extra else {}),
        }
    lines += [f"Every number: [{REPORT_JSON}]({REPORT_JSON}); predictions: `<model>.npz`.", ""]
    (folder / REPORT_JSON).write_text(json.dumps(strict_json(document), indent=1, allow_nan=False))
    index = folder / INDEX
    index.write_text("\n".join(lines))
    return index

