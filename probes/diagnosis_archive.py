"""A `Diagnosis` written to one `.npz` file without loss, and read back: a diagnosis made in one
session can be summarised, plotted and `probes.compare`d with another's in the next.

`save_diagnosis(diagnosis, path)` writes every array in binary (NaN and +-inf kept apart, which
strict JSON cannot do: `Diagnosis.to_json` writes all three as null) and the structure as a JSON
manifest inside the same file. The file also holds the prediction arrays under the documented
keys of `probes.report.prediction_arrays` ("<task set>/layer_predictions", ...), stored once, so
`np.load(path)["in_distribution/layer_predictions"]` keeps working. `Diagnosis.save(folder)`
writes its `arrays.npz` this way and the `mi-krr` commands their `<model>.npz`: both load with
`load_diagnosis`.

Archive layout: key `MANIFEST_KEY` holds the manifest as a 0-d string array; other arrays sit
under the prediction keys or `ARRAY_PREFIX` + a number. The manifest encodes values as JSON: numbers, strings,
booleans and null as themselves, and every container tagged by a one-key object: {"dict": [[key,
value], ...]}, {"tuple": [...]}, {"list": [...]}, {"ndarray": key}, {"tensor": key}, {"float":
"nan" | "inf" | "-inf"} and {"dataclass": class name, "fields": {...}} for the result classes in
`RESULT_CLASSES` only (nothing else is rebuilt, so loading runs no code named by the file, and the
file is read with `allow_pickle=False`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.diagnosis import Diagnosis, TaskSetDiagnosis
from probes.identifiability import Verdict
from probes.kernel_alignment import KernelAlignment
from probes.scoring import AlgorithmScore, KappaStratum
from probes.step_sizes import FittedStep

ARCHIVE_FORMAT = "mi-krr diagnosis"
ARCHIVE_VERSION = 1
MANIFEST_KEY = "mi_krr_manifest"
ARRAY_PREFIX = "_archive/"
RESULT_CLASSES = {cls.__name__: cls for cls in (Diagnosis, TaskSetDiagnosis, AlgorithmScore, KappaStratum, Verdict, KernelAlignment, FittedStep)}
"""The dataclasses an archive may rebuild, by name."""
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def save_diagnosis(diagnosis: Diagnosis, path: str | Path) -> Path:
    """Write `diagnosis` to the `.npz` file `path` (module docstring), losslessly; returns the
    path written (NumPy adds ".npz" when `path` lacks it).

    Reading it back (`load_diagnosis`) gives every field: arrays with their dtypes and shapes,
    tensors (on the CPU), NaN / inf, tuples, the fitted steps' folds and the sensitivities."""
    if not isinstance(diagnosis, Diagnosis):
        raise TypeError(f"diagnosis must be a probes Diagnosis (what probes.diagnose returns), got {type(diagnosis).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = prediction_arrays(diagnosis)
    writer = _Encoder(arrays)
    manifest = {"format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "diagnosis": writer.encode(diagnosis, "diagnosis")}
    text = json.dumps(manifest, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {MANIFEST_KEY: np.array(text), **writer.arrays}  # Any: savez's stubs type its keywords as its flags
    np.savez_compressed(path, **entries)
    return path


def load_diagnosis(path: str | Path) -> Diagnosis:
    """The `Diagnosis` saved at `path`: an archive written by `save_diagnosis`, a report folder
    of `Diagnosis.save` (its `arrays.npz`), or a `<model>.npz` of an `mi-krr demo` / `diagnose`
    report. Tensors come back on the CPU; NumPy scalars as Python numbers."""
    path = Path(path)
    if path.is_dir():
        path = path / "arrays.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"path {str(path)!r} is not a file: pass a file written by probes.save_diagnosis, a folder written by "
            "Diagnosis.save, or a <model>.npz of an mi-krr report"
        )
    with np.load(path, allow_pickle=False) as archive:
        if MANIFEST_KEY not in archive.files:
            raise ValueError(
                f"path {str(path)!r} holds arrays but no diagnosis (no {MANIFEST_KEY!r} entry): it was written before "
                "mi-krr saved diagnoses losslessly, or by another program; diagnose again and save with Diagnosis.save"
            )
        manifest = json.loads(str(archive[MANIFEST_KEY]))
        if manifest.get("format") != ARCHIVE_FORMAT or manifest.get("version") != ARCHIVE_VERSION:
            raise ValueError(
                f"path {str(path)!r} is archive format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                f"mi-krr reads {ARCHIVE_FORMAT!r} version {ARCHIVE_VERSION}: load it with the mi-krr that wrote it"
            )
        diagnosis = _decode(manifest["diagnosis"], archive)
    if not isinstance(diagnosis, Diagnosis):
        raise ValueError(f"path {str(path)!r} holds a {type(diagnosis).__name__}, not a Diagnosis")
    return diagnosis


def prediction_arrays(diagnosis: "Diagnosis") -> dict[str, np.ndarray]:
    """The arrays a report saves, keyed "<task set>/layer_predictions" `[B, L', m]`,
    "<task set>/krr_predictions" `[B, m]`, "<task set>/kappa" `[B]` and
    "<task set>/steps/<algorithm>" `[B, T+1, m]`."""
    arrays = {}
    for name, result in diagnosis.task_sets.items():
        arrays[f"{name}/layer_predictions"] = result.layer_predictions
        arrays[f"{name}/krr_predictions"] = result.krr_predictions
        arrays[f"{name}/kappa"] = result.kappa
        for algorithm, pred in result.step_predictions.items():
            arrays[f"{name}/steps/{algorithm}"] = pred
    return arrays


class _Encoder:
    """Turns a result into manifest JSON, collecting its arrays; an array that is one of
    `named` (the prediction arrays, by identity) is stored once under its name."""

    def __init__(self, named: dict[str, np.ndarray]):
        self.arrays: dict[str, np.ndarray] = dict(named)
        self._names = {id(array): name for name, array in named.items()}

    def _store(self, array: np.ndarray, where: str) -> str:
        if array.dtype.hasobject:
            raise TypeError(f"{where} is an array of Python objects, which an archive does not store: hold numbers in it")
        name = self._names.get(id(array))
        if name is None:
            name = f"{ARRAY_PREFIX}{len(self.arrays)}"
            self.arrays[name] = array
            self._names[id(array)] = name
        return name

    def encode(self, value: Any, where: str) -> Any:
        """`value` as manifest JSON; `where` names it in errors (e.g. "diagnosis.settings['seed']")."""
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"float": str(value)}
        if isinstance(value, np.ndarray):
            return {"ndarray": self._store(value, where)}
        if isinstance(value, torch.Tensor):
            return {"tensor": self._store(value.detach().cpu().numpy(), where)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = type(value).__name__
            if RESULT_CLASSES.get(name) is not type(value):
                raise TypeError(f"{where} is a {name}, which an archive does not store: only {tuple(RESULT_CLASSES)}")
            fields = {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value) if f.init}
            return {"dataclass": name, "fields": fields}
        if isinstance(value, dict):
            return {"dict": [[self.encode(key, f"a key of {where}"), self.encode(item, f"{where}[{key!r}]")] for key, item in value.items()]}
        if isinstance(value, (tuple, list)):
            items = [self.encode(item, f"{where}[{index}]") for index, item in enumerate(value)]
            return {"tuple" if isinstance(value, tuple) else "list": items}
        raise TypeError(f"{where} is a {type(value).__name__}, which an archive does not store: hold numbers, strings, arrays or tensors there")


def _decode(value: Any, archive: Any) -> Any:
    """The value `_Encoder.encode` wrote as `value`, arrays read from `archive`."""
    if not isinstance(value, dict):
        return value
    if len(value) == 1 or "dataclass" in value:
        tag = "dataclass" if "dataclass" in value else next(iter(value))
        content = value[tag]
        if tag == "float":
            return NON_FINITE[content]
        if tag == "ndarray":
            return archive[content]
        if tag == "tensor":
            return torch.from_numpy(archive[content])
        if tag == "list":
            return [_decode(item, archive) for item in content]
        if tag == "tuple":
            return tuple(_decode(item, archive) for item in content)
        if tag == "dict":
            return {_decode(key, archive): _decode(item, archive) for key, item in content}
        if tag == "dataclass" and content in RESULT_CLASSES:
            return RESULT_CLASSES[content](**{name: _decode(item, archive) for name, item in value["fields"].items()})
    raise ValueError(f"the archive's manifest holds {json.dumps(value)[:80]}, which this mi-krr does not read: load it with the mi-krr that wrote it")
