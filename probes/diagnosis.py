"""What `probes.diagnose` returns: `Diagnosis` (one `TaskSetDiagnosis` per task set, and the
settings used), which prints (`summary`), plots (`plot`), tabulates (`to_dataframe`), serialises
(`to_dict`, `to_json`: strict JSON, null for NaN / inf) and writes a report folder (`save`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mi_krr._repr import compact_repr
from probes.compare import format_html, summary_rows
from probes.identifiability import Verdict
from probes.kernel_alignment import KernelAlignment
from probes.scoring import AlgorithmScore
from probes.step_sizes import FittedStep


@dataclass
class TaskSetDiagnosis:
    """Everything `diagnose` measured on one task set.

    Attributes:
        name: the task set's name.
        info: the task's `info` (sampler configuration).
        kernel, kernel_params, lam: the KRR system the algorithms solve.
        n_steps: solver steps T.
        n_support: support points n per prompt.
        layers: residual indices probed (0 = embeddings).
        kappa: condition number of K + lam I per prompt `[B]`.
        layer_predictions: the model's per-layer query predictions `[B, L', m]`.
        krr_predictions: exact KRR predictions `[B, m]`.
        step_predictions: algorithm -> per-step predictions `[B, T+1, m]`.
        scores: algorithm -> `AlgorithmScore`.
        verdict: the identifiability `Verdict`.
        layer_sensitivities: the model's d yhat / d y per layer `[B, L', m, n]`, or None.
        step_sensitivities: algorithm -> d pred_t / d y per step `[B, T+1, m, n]`, or None.
        kernel_alignment: per-layer/head alignment of attention with reference kernels, or None.
        fitted_steps: algorithm -> its cross-fitted global step (`step_sizes="fitted"`), see
            `probes.step_sizes`.
        notes: what was skipped and why.
        seconds: wall time per stage.
    """

    __repr__ = compact_repr

    name: str
    info: dict[str, Any]
    kernel: str
    kernel_params: dict[str, float]
    lam: float
    n_steps: int
    n_support: int
    layers: list[int]
    kappa: np.ndarray
    layer_predictions: np.ndarray
    krr_predictions: np.ndarray
    step_predictions: dict[str, np.ndarray]
    scores: dict[str, AlgorithmScore]
    verdict: Verdict
    layer_sensitivities: np.ndarray | None = None
    step_sensitivities: dict[str, np.ndarray] | None = None
    kernel_alignment: KernelAlignment | None = None
    fitted_steps: dict[str, FittedStep] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return self.layer_predictions.shape[0]

    @property
    def n_query(self) -> int:
        return self.layer_predictions.shape[2]


@dataclass
class Diagnosis:
    """The result of `diagnose`: one `TaskSetDiagnosis` per task set, and the settings used."""

    task_sets: dict[str, TaskSetDiagnosis]
    settings: dict[str, Any]

    def __getitem__(self, name: str) -> TaskSetDiagnosis:
        if name not in self.task_sets:
            raise KeyError(f"no task set {name!r} in this diagnosis; its task sets are {tuple(self.task_sets)}")
        return self.task_sets[name]

    def to_dataframe(self):
        """Long-format pandas DataFrame, one row per (task_set, algorithm, layer, step): r2, mse,
        sensitivity_r2, aligned (step is the layer's monotone-aligned step), argmin (step is the
        layer's MSE argmin), score (the algorithm's path R2) with its interval score_ci_low /
        score_ci_high and weighted_r2 (kappa-weighted; NaN without strata), best (the verdict's
        best)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - pandas ships with the test extra
            raise ImportError("Diagnosis.to_dataframe needs pandas: pip install pandas") from exc
        rows = []
        for set_name, result in self.task_sets.items():
            for algorithm, score in result.scores.items():
                for row, layer in enumerate(score.layers):
                    for step in range(score.r2.shape[1]):
                        rows.append(
                            {
                                "task_set": set_name,
                                "algorithm": algorithm,
                                "layer": int(layer),
                                "step": step,
                                "r2": score.r2[row, step],
                                "mse": score.mse[row, step],
                                "sensitivity_r2": np.nan if score.sensitivity_r2 is None else score.sensitivity_r2[row, step],
                                "aligned": bool(score.aligned_steps[row] == step),
                                "argmin": bool(score.argmin_steps[row] == step),
                                "score": score.score,
                                "score_ci_low": score.score_ci[0],
                                "score_ci_high": score.score_ci[1],
                                "weighted_r2": np.nan if score.weighted_r2 is None else score.weighted_r2,
                                "best": algorithm == result.verdict.best_algorithm,
                            }
                        )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Every statistic as nested lists and Python numbers (NaN / inf kept as floats here;
        `to_json` writes them as null)."""
        return {"settings": _jsonable(self.settings), "task_sets": {name: _task_set_dict(result) for name, result in self.task_sets.items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        """`to_dict()` as strict JSON text (RFC 8259): every NaN, inf and -inf is written as null
        (e.g. R2 at step 0, where the step has no variance; a path R2 of -inf when every layer
        sits at step 0), so any JSON parser reads it. Also written to `path` when given."""
        text = json.dumps(strict_json(self.to_dict()), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        """A readable table per task set: every algorithm's score, the best one's step per layer,
        and the verdict."""
        from probes.report import summary_text

        return summary_text(self)

    def __repr__(self) -> str:
        verdicts = "; ".join(
            f"{row.task_set}: best {row.best or 'none'} (path R2 {row.score:.3f}), {'identified' if row.identified else 'not identified'}"
            for row in summary_rows("", self)
        )
        return f"Diagnosis({verdicts})"

    def _repr_html_(self) -> str:
        """Per task set: best algorithm, path R2 with its CI, verdict, kernel distances and step
        map as an HTML table, shown when a notebook cell ends with the diagnosis."""
        return format_html(summary_rows("", self), with_model=False)

    def plot(self, task_set: str | None = None, model: str | None = None) -> dict[str, Any]:
        """matplotlib figures by name, titled with `model` when given (see
        `probes.plots.diagnosis_figures`)."""
        from probes.plots import diagnosis_figures

        return diagnosis_figures(self, task_set, model)

    def save(self, folder: str | Path) -> Path:
        """Write the report (Markdown index, PNG figures, JSON, arrays) to `folder`; returns the
        index path (see `probes.report.write_report`). `probes.load_diagnosis(folder)` reads the
        diagnosis back without loss (its `arrays.npz`)."""
        from probes.report import write_report

        return write_report(self, folder)


def _jsonable(value: Any) -> Any:
    """Arrays and NumPy scalars as lists and Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def strict_json(value: Any) -> Any:
    """Plain data (dicts, lists, numbers) with every non-finite float replaced by None, so
    `json.dumps(..., allow_nan=False)` writes strict JSON (null for NaN / inf / -inf)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _task_set_dict(result: TaskSetDiagnosis) -> dict[str, Any]:
    """One task set's statistics as plain data (predictions stay in `save`'s arrays.npz)."""
    scores = {}
    for name, score in result.scores.items():
        entry = {key: getattr(score, key) for key in score.__dataclass_fields__ if key != "strata"}
        entry["strata"] = [vars(stratum) for stratum in score.strata]
        scores[name] = entry
    verdict = dict(vars(result.verdict))
    return _jsonable(
        {
            "info": result.info,
            "kernel": result.kernel,
            "kernel_params": result.kernel_params,
            "lam": result.lam,
            "n_steps": result.n_steps,
            "layers": result.layers,
            "n_prompts": result.n_prompts,
            "n_support": result.n_support,
            "n_query": result.n_query,
            "kappa": result.kappa,
            "scores": scores,
            "verdict": verdict,
            "kernel_alignment": None if result.kernel_alignment is None else result.kernel_alignment.to_dict(),
            "fitted_steps": {name: fit.to_dict() for name, fit in result.fitted_steps.items()},
            "notes": result.notes,
            "seconds": result.seconds,
        }
    )
