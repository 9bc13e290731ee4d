"""Several models' diagnoses side by side: which algorithm best explains each model's layers on
each task set, whether it is identified, and how close its attention is to an exp and to a
Gaussian kernel.

    comparison = probes.compare({"linear": probes.diagnose(linear_model, tasks),
                                 "softmax": probes.diagnose(softmax_model, tasks)})
    comparison.to_dataframe(); print(comparison.summary()); comparison.plot()

`mi-krr demo` and `mi-krr diagnose` print `summary()` and draw `plot()` in their reports.
Where the diagnoses were made differently (candidates, layer-prediction method, step sizes, or the
KRR system of a shared task set), `Comparison.notes` says so and `summary()` prints it.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np

from probes.report import UNIFORM_MARK, distance_text, interval_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

    from probes.diagnosis import Diagnosis, TaskSetDiagnosis

IN_DISTRIBUTION = "in_distribution"
KERNEL_LABELS = {"exp_distance": "exp", "gaussian_distance": "Gaussian"}
"""`SummaryRow` distance fields and the kernel each measures."""
SCORE_FLOOR = -0.5
"""`plot_overview` draws path R2 below this at the floor (a diverging match would squash the rest)."""


@dataclass
class SummaryRow:
    """One model on one task set.

    Attributes:
        model, task_set: names.
        best: the top-scoring algorithm (None where every candidate's path R2 is -inf or
            undefined: none is best); `score` its path R2 and `score_ci` the interval.
        step_map: the best algorithm's monotone-aligned step per probed block output,
            "layer:step" pairs.
        identified: the verdict.
        withheld: whether the verdict was withheld (`Verdict.withheld`, e.g. ridge probes):
            the tables print "withheld" rather than "no".
        exp_distance: relative operator-norm distance of attention to the fitted exp kernel,
            best head per layer, mean over layers (NaN when the alignment was skipped, e.g. for
            linear attention, whose pattern is not a row-normalised kernel).
        gaussian_distance: the same for the fitted Gaussian kernel.
        exp_uniform, gaussian_uniform: whether some layer's best head for that kernel is fitted
            as uniform attention (`KernelAlignment.uniform_heads`: scale inf, or a reference within 5%
            of uniform), so the mean includes a distance to mean pooling;
            the tables mark such distances with `UNIFORM_MARK`.
    """

    model: str
    task_set: str
    best: str | None
    score: float
    score_ci: tuple[float, float]
    step_map: str
    identified: bool
    exp_distance: float
    gaussian_distance: float
    exp_uniform: bool = False
    gaussian_uniform: bool = False
    withheld: bool = False


@dataclass
class Comparison:
    """The result of `compare`.

    Attributes:
        diagnoses: model name -> its `Diagnosis`, in the order given.
        rows: one `SummaryRow` per model and task set (models in order, each model's task sets
            in its diagnosis's order).
        notes: how the diagnoses were made differently, where that changes what a row means
            (`protocol_differences`); `summary()` and the notebook table print them below the rows.
    """

    diagnoses: dict[str, "Diagnosis"]
    rows: list[SummaryRow]
    notes: list[str] = field(default_factory=list)

    def to_dataframe(self):
        """pandas DataFrame, one row per (model, task_set): best (None where no candidate has a
        defined path R2), score, ci_low, ci_high, identified, withheld, exp_distance, exp_uniform,
        gaussian_distance, gaussian_uniform, step_map (see `SummaryRow`); the uniform flags are
        None where the distance is NaN (no alignment measured, so nothing to flag)."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"model": row.model, "task_set": row.task_set, "best": row.best, "score": row.score, "ci_low": row.score_ci[0],
                 "ci_high": row.score_ci[1], "identified": row.identified, "withheld": row.withheld,
                 "exp_distance": row.exp_distance, "exp_uniform": _measured(row.exp_uniform, row.exp_distance),
                 "gaussian_distance": row.gaussian_distance, "gaussian_uniform": _measured(row.gaussian_uniform, row.gaussian_distance),
                 "step_map": row.step_map}
                for row in self.rows
            ]
        )

    def summary(self) -> str:
        """The rows as a fixed-width text table (`format_table`), then the `notes`."""
        return "\n".join([format_table(self.rows), *(f"Note: {note}" for note in self.notes)])

    def plot(self, title: str | None = None):
        """The overview figure (`plot_overview`; `title` default: the models' names)."""
        return plot_overview(self.rows, title=title)

    def _repr_html_(self) -> str:
        """The summary as an HTML table, shown when a notebook cell ends with the comparison."""
        return format_html(self.rows) + "".join(f"<p>Note: {html.escape(note)}</p>" for note in self.notes)

    def __repr__(self) -> str:
        return f"Comparison({len(self.diagnoses)} models, {len(self.rows)} rows)\n{self.summary()}"


def _measured(flag: bool, distance: float) -> bool | None:
    """A kernel-distance flag for a table: None where the distance was not measured (NaN)."""
    return flag if math.isfinite(distance) else None


def compare(diagnoses: Mapping[str, "Diagnosis"]) -> Comparison:
    """Put several models' diagnoses side by side.

    Args:
        diagnoses: model name -> `probes.diagnose(...)` of that model (any task sets; the
            overview lines up task sets by name).

    Returns:
        `Comparison` with `.rows`, `.to_dataframe()`, `.summary()` and `.plot()`.
    """
    from probes.diagnosis import Diagnosis

    if not isinstance(diagnoses, Mapping) or not diagnoses:
        raise ValueError("diagnoses must be a non-empty dict {model name: probes.diagnose(...)}")
    for name, diagnosis in diagnoses.items():
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise ValueError(
                f"diagnoses keys must be model names (non-empty, printable str: one table cell each), got {name!r}: "
                "name each model, e.g. {'softmax': diagnosis}"
            )
        if not isinstance(diagnosis, Diagnosis):
            raise ValueError(f"diagnoses[{name!r}] must be the Diagnosis that probes.diagnose returns, got {type(diagnosis).__name__}")
    rows = [row for name, diagnosis in diagnoses.items() for row in summary_rows(name, diagnosis)]
    return Comparison(diagnoses=dict(diagnoses), rows=rows, notes=protocol_differences(diagnoses))


PROTOCOL_SETTINGS = {
    "algorithms": "candidate algorithms (each row's best is chosen among its own model's)",
    "method": "layer-prediction method",
    "step_sizes": "step sizes",
}
"""`Diagnosis.settings` entries that change what a row's best algorithm and score mean, and how
`protocol_differences` names them."""


def protocol_differences(diagnoses: Mapping[str, "Diagnosis"]) -> list[str]:
    """One sentence per way the diagnoses differ that changes what their rows mean side by side:
    a `PROTOCOL_SETTINGS` entry that is not the same for every model, or, for a task set that
    several models were diagnosed on with the same sampler configuration (`TaskSetDiagnosis.info`),
    a different KRR system (kernel, its parameters, lam). Differences in depth, layers or n_steps
    are what comparing architectures is for and are not listed."""
    notes = []
    for key, meaning in PROTOCOL_SETTINGS.items():
        values = {name: diagnosis.settings.get(key) for name, diagnosis in diagnoses.items()}
        if len({repr(value) for value in values.values()}) > 1:
            notes.append(f"the models were diagnosed with different {meaning}: {_difference_text(values)}.")
    for set_name in dict.fromkeys(name for diagnosis in diagnoses.values() for name in diagnosis.task_sets):
        results = {name: diagnosis.task_sets[set_name] for name, diagnosis in diagnoses.items() if set_name in diagnosis.task_sets}
        same_prompts = len({repr(result.info) for result in results.values()}) == 1
        systems = {name: (result.kernel, result.kernel_params, result.lam) for name, result in results.items()}
        if same_prompts and len({repr(system) for system in systems.values()}) > 1:
            notes.append(f"task set {set_name!r} (one sampler) was solved as different KRR systems: "
                         + "; ".join(f"{name}: {kernel} {params} lam={lam:g}" for name, (kernel, params, lam) in systems.items()) + ".")
    return notes


def _difference_text(values: dict[str, object]) -> str:
    """How one settings entry differs across models (model name -> value). Candidate lists (dicts
    name -> how the solver is recorded): the candidates every model shares, then each model's own
    ("cg also: ..."), a non-registry solver with how it is recorded. Other values: the models
    grouped by value ("a, b: fitted; c: optimal")."""
    candidates = {model: value for model, value in values.items() if isinstance(value, dict)}
    if len(candidates) == len(values):
        lists = list(candidates.values())
        shared = [name for name in lists[0] if all(name in other for other in lists)]
        parts = ["shared: " + (", ".join(shared) or "none")]
        for model, candidate in candidates.items():
            own = [name if how == "registry" else f"{name} ({how})" for name, how in candidate.items() if name not in shared]
            if own:
                parts.append(f"{model} also: {', '.join(own)}")
        return "; ".join(parts)
    groups: dict[str, list[str]] = {}
    for model, value in values.items():
        groups.setdefault(str(value), []).append(model)
    return "; ".join(f"{', '.join(models)}: {value}" for value, models in groups.items())


def kernel_distance(result: "TaskSetDiagnosis", kernel: str = "exp") -> float:
    """Operator-norm distance of a task set's attention to `kernel`: min over heads, mean over
    layers (NaN without an alignment for that kernel)."""
    alignment = result.kernel_alignment
    if alignment is None or kernel not in alignment.metrics:
        return math.nan
    _, best = alignment.best_heads(kernel)
    best = best[np.isfinite(best)]
    return float(best.mean()) if best.size else math.nan


def has_uniform_best_head(result: "TaskSetDiagnosis", kernel: str = "exp") -> bool:
    """Whether some layer's best head for `kernel` is fitted as uniform attention
    (`KernelAlignment.uniform_best_heads`; False without an alignment for that kernel)."""
    alignment = result.kernel_alignment
    return alignment is not None and kernel in alignment.metrics and bool(alignment.uniform_best_heads(kernel).any())


def summary_rows(model_name: str, diagnosis: "Diagnosis") -> list[SummaryRow]:
    """One `SummaryRow` per task set of `diagnosis`."""
    rows = []
    for set_name, result in diagnosis.task_sets.items():
        best = result.scores[result.verdict.best]
        pairs = [f"{layer}:{step}" for layer, step in zip(best.layers, best.aligned_steps) if layer > 0]
        rows.append(
            SummaryRow(
                model=model_name,
                task_set=set_name,
                best=result.verdict.best_algorithm,
                score=float(best.score),
                score_ci=(float(best.score_ci[0]), float(best.score_ci[1])),
                step_map=" ".join(pairs),
                identified=bool(result.verdict.identified),
                withheld=result.verdict.withheld is not None,
                exp_distance=kernel_distance(result),
                gaussian_distance=kernel_distance(result, "gaussian"),
                exp_uniform=has_uniform_best_head(result),
                gaussian_uniform=has_uniform_best_head(result, "gaussian"),
            )
        )
    return rows


TABLE_HEADER = ("model", "task set", "best algorithm", "path R2 [95% CI]", "identified", "exp-kernel dist", "gauss-kernel dist",
                "best-step map (layer:step)")
"""Column titles of `format_table` and `format_html`, in `table_cells` order."""

UNIFORM_NOTE = (f"{UNIFORM_MARK}: some layer's heads are all fitted as uniform attention (scale inf, or within 5% of it): the mean includes a distance to "
                "mean pooling, not to a kernel that ranks the keys")
"""The footnote `format_table` and `format_html` add when a distance carries `UNIFORM_MARK`."""


def table_cells(row: SummaryRow) -> tuple[str, ...]:
    """One row's cells as text, in `TABLE_HEADER` order (interval and distances "-" where not
    computed, distances marked `UNIFORM_MARK` where a best head is uniform; the best algorithm "-"
    where none is best)."""
    return (
        row.model,
        row.task_set,
        row.best or "-",
        f"{row.score:.4f} {interval_text(row.score_ci, 3)}",
        "withheld" if row.withheld else "yes" if row.identified else "no",
        distance_text(row.exp_distance, row.exp_uniform),
        distance_text(row.gaussian_distance, row.gaussian_uniform),
        row.step_map,
    )


def format_table(rows: list[SummaryRow]) -> str:
    """The rows as a fixed-width text table (also valid inside a Markdown code block), then
    `UNIFORM_NOTE` if a distance is marked uniform."""
    cells = [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [TABLE_HEADER, *cells]) for i in range(len(TABLE_HEADER) - 1)]
    lines = []
    for line in [TABLE_HEADER, *cells]:
        lines.append("  ".join(value.ljust(width) for value, width in zip(line, widths)) + "  " + line[-1])
        if line is TABLE_HEADER:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * len(TABLE_HEADER[-1]))
    if _any_uniform(rows):
        lines.append(UNIFORM_NOTE)
    return "\n".join(lines)


def _any_uniform(rows: list[SummaryRow]) -> bool:
    """Whether some row's distance is marked `UNIFORM_MARK`."""
    return any(row.exp_uniform or row.gaussian_uniform for row in rows)


def format_html(rows: list[SummaryRow], with_model: bool = True) -> str:
    """The rows as an HTML table (what a notebook shows for a `Comparison` or a `Diagnosis`), then
    `UNIFORM_NOTE` if a distance is marked uniform; `with_model=False` leaves out the model
    column (one model's task sets)."""
    first = 0 if with_model else 1
    header = "".join(f"<th>{html.escape(title)}</th>" for title in TABLE_HEADER[first:])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in table_cells(row)[first:]) + "</tr>" for row in rows
    )
    note = f"<p>{html.escape(UNIFORM_NOTE)}</p>" if _any_uniform(rows) else ""
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>{note}"


MODEL_OFFSET = 0.06
"""Horizontal offset between models' points in `plot_overview` (task-set units), so that models
with equal scores stay visible side by side."""


def plot_overview(rows: list[SummaryRow], title: str | None = None):
    """Left: best path R2 per task set with its 95% interval, one line per model (filled markers:
    identified; triangles: below the floor, drawn at it; no point where no algorithm is best).
    Right: exp-kernel (solid) and Gaussian-kernel (dashed) distance per task set for models whose
    attention was aligned (softmax attention), "u" beside a distance whose best head is uniform.
    `title`: the figure's title (default: the models' names)."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row.model for row in rows))
    sets = sorted(dict.fromkeys(row.task_set for row in rows), key=_set_order)
    position = {name: index for index, name in enumerate(sets)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=80)
    # legends from explicit handles: matplotlib would drop a model named "_..." from automatic ones
    legends: dict[Axes, tuple[list[Line2D], list[str]]] = {left: ([], []), right: ([], [])}  # axis -> (lines, labels)
    for index, model in enumerate(models):
        mine = {row.task_set: row for row in rows if row.model == model}
        x = np.arange(len(sets)) + (index - (len(models) - 1) / 2) * MODEL_OFFSET
        colour = f"C{index}"

        def across_sets(value) -> np.ndarray:
            """`value(row)` at every task set's position, NaN (a gap in the line) where the model has none."""
            return np.array([value(mine[name]) if name in mine else math.nan for name in sets], dtype=float)

        scores = across_sets(lambda row: max(row.score, SCORE_FLOOR) if row.best is not None else math.nan)
        (line,) = left.plot(x, scores, "-", color=colour, lw=1, label=model)
        legends[left][0].append(line)
        legends[left][1].append(model)
        low, high = (np.clip(across_sets(lambda row, end=end: row.score_ci[end]), SCORE_FLOOR, None) for end in (0, 1))
        with_interval = np.isfinite(scores) & np.isfinite(low) & np.isfinite(high)
        if with_interval.any():
            # a percentile interval need not contain its point estimate; matplotlib refuses negative bar lengths
            spread = np.clip(np.vstack([scores - low, high - scores])[:, with_interval], 0.0, None)
            left.errorbar(x[with_interval], scores[with_interval], yerr=spread, fmt="none", ecolor=colour, elinewidth=1, capsize=2)
        for name, row in sorted(mine.items(), key=lambda item: position[item[0]]):
            if row.best is not None:
                marker = "v" if row.score < SCORE_FLOOR else "o"
                left.plot(x[position[name]], scores[position[name]], marker, color=colour, mfc=colour if row.identified else "white")
        for kernel, style in (("exp_distance", "o-"), ("gaussian_distance", "s--")):
            distances = across_sets(lambda row: getattr(row, kernel))
            if np.isfinite(distances).any():
                label = f"{model} ({KERNEL_LABELS[kernel]})"
                (line,) = right.plot(x, distances, style, color=colour, label=label)
                legends[right][0].append(line)
                legends[right][1].append(label)
                uniform = kernel.replace("distance", "uniform")
                for name, row in mine.items():
                    if getattr(row, uniform) and math.isfinite(getattr(row, kernel)):
                        right.annotate(UNIFORM_MARK, (x[position[name]], getattr(row, kernel)), textcoords="offset points",
                                       xytext=(4, 2), fontsize=8, color=colour)
    for ax in (left, right):
        ax.set_xticks(range(len(sets)), sets, rotation=40, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    left.set_ylabel(f"best algorithm's path R2, 95% CI (floor {SCORE_FLOOR})")
    left.set_title("Which algorithm explains the layers (filled: identified)", fontsize=9)
    left.legend(*legends[left], fontsize=7)
    right.set_ylabel("attention vs kernel (rel. op. distance)")
    right.set_title(f"Attention as a kernel: best head per layer, mean ({UNIFORM_MARK}: uniform head)", fontsize=9)
    if right.lines:
        right.legend(*legends[right], fontsize=7)
    figure.suptitle(title or "Overview: " + ", ".join(models), fontsize=10)
    figure.tight_layout()
    return figure


def _set_order(name: str) -> tuple[int, str]:
    """In-distribution first, then the shifts in `DEFAULT_SHIFTS` order, then the rest by name."""
    from mi_krr.tasks import DEFAULT_SHIFTS

    order = [IN_DISTRIBUTION, *DEFAULT_SHIFTS]
    return (order.index(name), "") if name in order else (len(order), name)
