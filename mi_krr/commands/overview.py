"""The report folder `mi-krr demo` and `mi-krr diagnose` write: several models' diagnoses on one
page, with `probes.compare`'s table and overview figure.

Report folder:
    index.md           the table, the settings, and the figures
    report.json        every number (strict JSON: NaN / inf as null): the table rows, the comparison's
                       notes (`probes.compare.protocol_differences`), per model its description and
                       `Diagnosis.to_dict()`
    overview.png       best path R2 and kernel distance per task set, every model
    <model>_<figure>.png   in-distribution figures of each model (probes.plots)
    <model>.npz        per-layer, per-step and KRR predictions and kappa
                       (`probes.diagnosis_archive.prediction_arrays`), and the whole diagnosis:
                       `probes.load_diagnosis("<model>.npz")` reads it back
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable


from probes.compare import IN_DISTRIBUTION, Comparison, compare

REPORT_JSON = "report.json"
INDEX = "index.md"
OVERVIEW_FIGURE = "overview.png"
MODEL_FIGURES = ("error_profiles", "step_map", "kernel_alignment", "sensitivities")


@dataclass
class ModelEntry:
    """One model of a report: its name, a one-line description and its `Diagnosis`."""

    name: str
    description: str
    diagnosis: Any
    extra: dict[str, Any] | None = None


def overview_comparison(entries: list[ModelEntry]) -> Comparison:
    """`probes.compare` of the entries' diagnoses, by entry name: its `summary()` is the table the
    commands print, with the notes on how the diagnoses were made differently."""
    return compare({entry.name: entry.diagnosis for entry in entries})


def write_overview_report(entries: list[ModelEntry], folder: str | Path, title: str, settings: dict[str, Any]) -> Path:
    """Write the report folder (module docstring) for `entries`; returns the index path."""
    import matplotlib.pyplot as plt

    from probes.plots import plot_error_profiles, plot_kernel_alignment, plot_sensitivities, plot_step_map
    from probes.diagnosis import strict_json
    from probes.diagnosis_archive import save_diagnosis
    from probes.report import _file_stems

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comparison = overview_comparison(entries)
    figure = comparison.plot(title=title)
    figure.savefig(folder / OVERVIEW_FIGURE, dpi=80, bbox_inches="tight")
    plt.close(figure)

    lines = [f"# {title}", "", "```", comparison.summary(), "```", "",
             "path R2: share of the best algorithm's trajectory variance (along the layer -> step alignment) the "
             "layers reproduce; identified: the verdict of `probes.identifiability`; exp- / gauss-kernel dist: relative "
             "operator-norm distance of attention to a row-normalised exp / Gaussian kernel, scale fitted per head "
             "(best head per layer, mean over layers; `-` where attention is not a normalised kernel).", "",
             f"![overview]({OVERVIEW_FIGURE})", "",
             "Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()), ""]
    drawers: dict[str, Callable[[Any], Any]] = {"error_profiles": plot_error_profiles, "step_map": plot_step_map,
                                                "kernel_alignment": plot_kernel_alignment, "sensitivities": plot_sensitivities}
    document: dict[str, Any] = {"title": title, "settings": settings, "table": [asdict(row) for row in comparison.rows],
                                "notes": comparison.notes, "models": {}}
    stems = _file_stems([entry.name for entry in entries])
    for entry in entries:
        safe = stems[entry.name]
        lines += [f"## {entry.name}", "", entry.description, ""]
        result = entry.diagnosis.task_sets.get(IN_DISTRIBUTION) or next(iter(entry.diagnosis.task_sets.values()))
        lines += ["```", result.verdict.message, "```", ""]
        sensitivity = {name: score.sensitivity_score for name, score in result.scores.items() if score.sensitivity_score is not None}
        if sensitivity:
            lines += ["Label sensitivities d yhat / d y_i (" + result.name + "): path R2 of the layers' against each algorithm's, "
                      "along the prediction alignment: " + ", ".join(f"{name} {value:.3f}" for name, value in sensitivity.items()), ""]
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
        save_diagnosis(entry.diagnosis, folder / f"{safe}.npz")
        document["models"][entry.name] = {
            "description": entry.description,
            "diagnosis": entry.diagnosis.to_dict(),
            **({"extra": entry.extra} if entry.extra else {}),
        }
    lines += [f"Every number: [{REPORT_JSON}]({REPORT_JSON}); predictions and each whole diagnosis (`probes.load_diagnosis`): `<model>.npz`.", ""]
    (folder / REPORT_JSON).write_text(json.dumps(strict_json(document), indent=1, allow_nan=False))
    index = folder / INDEX
    index.write_text("\n".join(lines))
    return index

