"""A `Diagnosis` as text: the summary table, and a report folder (Markdown index, PNG figures,
JSON statistics, NumPy arrays)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from probes.diagnosis import Diagnosis, TaskSetDiagnosis


def _kernel_text(result: "TaskSetDiagnosis") -> str:
    params = ", ".join(f"{key}={value:g}" for key, value in result.kernel_params.items())
    return f"{result.kernel}({params})"


def interval_text(interval: tuple[float, float], digits: int) -> str:
    """A bootstrap interval as "[low, high]" with `digits` decimals, or "-" when it has none (both
    ends NaN: bootstrap=0)."""
    low, high = interval
    return "-" if math.isnan(low) and math.isnan(high) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def task_set_summary(result: "TaskSetDiagnosis") -> str:
    """One task set: header, per-algorithm scores ranked, the best algorithm's aligned step per
    layer with its R2, the fitted steps, the kernel alignment's best head per block, the verdict,
    and any notes."""
    header = (
        f"== {result.name}: {result.n_prompts} prompts, {result.n_query} queries, {result.n_support} support points"
        f"; KRR {_kernel_text(result)}, lam={result.lam:g}, {result.n_steps} solver steps; "
        f"kappa median {np.median(result.kappa):.3g} [{np.min(result.kappa):.3g}, {np.max(result.kappa):.3g}]"
    )
    lines = [header, f"{'algorithm':<18} {'path R2':>9} {'95% interval':>20} {'kappa-wtd R2':>13} {'log-err dist':>13} {'sens R2':>9}"]
    ranking = sorted(result.scores.values(), key=lambda s: -(s.score if np.isfinite(s.score) else -np.inf))
    for score in ranking:
        weighted = "" if score.weighted_r2 is None else f"{score.weighted_r2:.4f}"
        sens = "" if score.sensitivity_score is None else f"{score.sensitivity_score:.4f}"
        lines.append(
            f"{score.algorithm:<18} {score.score:>9.4f} {interval_text(score.score_ci, 4):>20} {weighted:>13} "
            f"{score.profile_distance:>13.3f} {sens:>9}"
        )
    best = result.scores[result.verdict.best]
    lines.append(f"best-matching step per layer ({best.algorithm}, monotone alignment; argmin in parentheses):")
    lines.append("  layer " + " ".join(f"{layer:>7d}" for layer in best.layers))
    lines.append("  step  " + " ".join(f"{a:>3d} ({b:>2d})" for a, b in zip(best.aligned_steps, best.argmin_steps)))
    lines.append("  R2    " + " ".join(f"{value:>7.4f}" if np.isfinite(value) else f"{'-':>7}" for value in best.aligned_r2))
    for name, fit in result.fitted_steps.items():
        momentum = "" if fit.momentum is None else f", momentum {fit.momentum[0]:.3g} / {fit.momentum[1]:.3g}"
        lines.append(
            f"{name}: one global step fitted to the layers, {fit.step[0]:.6g} / {fit.step[1]:.6g}{momentum} "
            "(fitted on each half of the prompts; each half scored with the other half's)"
        )
    lines += _alignment_lines(result)
    lines.append(result.verdict.message)
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


UNIFORM_MARK = "u"
"""Follows a kernel distance whose best head is fitted as uniform attention
(`KernelAlignment.uniform_best_heads`)."""


def distance_text(distance: float, uniform: bool) -> str:
    """A kernel distance at 3 decimals, `UNIFORM_MARK` after it where `uniform`, "-" for NaN."""
    return "-" if math.isnan(distance) else f"{distance:.3f}" + (UNIFORM_MARK if uniform else "")


def _alignment_lines(result: "TaskSetDiagnosis") -> list[str]:
    """Per reference kernel, the best head's relative operator distance per block
    (`KernelAlignment.best_heads`; the TransformerLens block index, as in the alignment figure;
    "-" where no head has one), marked `UNIFORM_MARK` where that head is uniform (a footnote then
    says so); then the same heads' row Spearman correlation with the kernel, which a distance
    alone does not show (nearly flat random heads are close to a nearly flat reference but rank
    keys at ~0.1); none without a kernel alignment."""
    alignment = result.kernel_alignment
    if alignment is None:
        return []
    best, spearman = {}, {}
    for kernel, metrics in alignment.metrics.items():
        head, distance = alignment.best_heads(kernel)
        best[kernel] = (distance, alignment.uniform_best_heads(kernel))
        if "row_spearman" in metrics:  # (an alignment built by hand may hold distances only)
            values = np.asarray(metrics["row_spearman"].cpu(), dtype=np.float64)[np.arange(len(head)), np.maximum(head, 0)]
            spearman[kernel] = np.where(head >= 0, values, np.nan)
    width = max(len("block"), *map(len, best))
    n_blocks = len(next(iter(best.values()))[0])
    lines = [f"kernel alignment ({alignment.block} rows vs support keys; best head's relative operator distance per block, 0 = identical):",
             f"  {'block':<{width}} " + " ".join(f"{block:>7d}" for block in range(n_blocks))]
    for kernel, (distances, uniform) in best.items():
        marks = [UNIFORM_MARK if flag else " " for flag in uniform]  # each takes the space after its cell
        cells = "".join(f"{distance_text(value, False):>7}{mark}" for value, mark in zip(distances, marks))
        lines.append(f"  {kernel:<{width}} " + cells.rstrip())
    if any(flags.any() for _, flags in best.values()):
        lines.append(f"  {UNIFORM_MARK}: that block's heads are all fitted as uniform attention (scale inf, or within 5% of it): its distance is "
                     "one to mean pooling, not to a kernel that ranks the keys")
    if spearman:
        lines.append("  row Spearman of those heads with the kernel (1 = ranks keys as the kernel does; random heads ~0.1):")
    for kernel, values in spearman.items():
        lines.append(f"  {kernel:<{width}} " + " ".join(f"{value:>7.2f}" if np.isfinite(value) else f"{'-':>7}" for value in values))
    return lines


def summary_text(diagnosis: "Diagnosis") -> str:
    """Every task set's summary, separated by blank lines."""
    return "\n\n".join(task_set_summary(result) for result in diagnosis.task_sets.values())


def write_report(diagnosis: "Diagnosis", folder: str | Path) -> Path:
    """Write `folder/index.md` (summary and figures), `folder/diagnosis.json` (every statistic),
    `folder/<task set>_<figure>.png` and `folder/arrays.npz` (layer, step and KRR predictions and
    kappa under `probes.diagnosis_archive.prediction_arrays`'s keys, and the whole diagnosis:
    `probes.load_diagnosis(folder)` reads it back). Returns the index path."""
    import matplotlib.pyplot as plt

    from probes.diagnosis_archive import save_diagnosis
    from probes.plots import diagnosis_figures

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    diagnosis.to_json(folder / "diagnosis.json")
    save_diagnosis(diagnosis, folder / "arrays.npz")

    lines = ["# mi-krr diagnosis", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in diagnosis.settings.items()), ""]
    stems = _file_stems(list(diagnosis.task_sets))
    for name, result in diagnosis.task_sets.items():
        lines += [f"## {name}", "", "```", task_set_summary(result), "```", ""]
        for figure_name, figure in diagnosis_figures(diagnosis, name).items():
            file_name = f"{stems[name]}_{figure_name}.png"
            figure.savefig(folder / file_name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            lines += [f"![{name}: {figure_name}]({file_name})", ""]
    lines += ["Statistics: [diagnosis.json](diagnosis.json); predictions and the whole diagnosis "
              "(`probes.load_diagnosis(folder)` reads it back): arrays.npz.", ""]
    index = folder / "index.md"
    index.write_text("\n".join(lines))
    return index


def _file_stems(names: list[str]) -> dict[str, str]:
    """Each task-set name as a distinct file-name stem: characters other than letters, digits, '-'
    and '_' become '_', and a stem already taken gets '_2', '_3', ... ("scale x2" and "scale_x2"
    must not overwrite each other's figures)."""
    stems: dict[str, str] = {}
    for name in names:
        base = _safe(name)
        stem, copy = base, 1
        while stem in stems.values():
            copy += 1
            stem = f"{base}_{copy}"
        stems[name] = stem
    return stems


def _safe(name: str) -> str:
    """A task-set name usable in a file name."""
    return "".join(char if char.isalnum() or char in "-_" else "_" for char in name)
