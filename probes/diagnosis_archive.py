"""A `Diagnosis` written to one `.npz` file without loss, and read back: a diagnosis made in one
session can be summarised, plotted and `probes.compare`d with another's in the next.

`save_diagnosis(diagnosis, path)` writes every array in binary (NaN and +-inf kept apart, which
strict JSON cannot do: `Diagnosis.to_json` writes all three as null) and the structure as a JSON
manifest inside the same file. The file also holds the prediction arrays under the documented
keys of `prediction_arrays` ("<task set>/layer_predictions", ...), stored once, so
`np.load(path)["in_distribution/layer_predictions"]` keeps working. `Diagnosis.save(folder)`
writes its `arrays.npz` this way and the `mi-krr` commands their `<model>.npz`: both load with
`load_diagnosis`.

Archive layout: key `MANIFEST_KEY` holds the manifest as a 0-d string array; other arrays sit
under the prediction keys or `ARRAY_PREFIX` + a number. The manifest encodes values as JSON:
numbers, strings, booleans and null as themselves, and every container tagged by a one-key
object: {"dict": [[key, value], ...]}, {"tuple": [...]}, {"list": [...]}, {"ndarray": key}, {"tensor": key}, {"float":
"nan" | "inf" | "-inf"} and {"dataclass": class name, "fields": {...}} for the result classes in
`RESULT_CLASSES` only (nothing else is rebuilt, so loading runs no code named by the file, and the
file is read with `allow_pickle=False`).
"""

from __future__ import annotations

import dataclasses
import json
import io
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mi_krr.train.checkpoint import atomic_write_bytes
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
    path written (`path` with ".npz" appended when it has another suffix or none).

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
    entries: dict[str, Any] = {MANIFEST_KEY: np.array(text), **writer.arrays}  # Any: savez's stubs type its keywords as its flags
    archive = io.BytesIO()
    np.savez_compressed(archive, **entries)
    return atomic_write_bytes(path, archive.getvalue())  # an interrupted save leaves the old file whole


def load_diagnosis(path: str | Path) -> Diagnosis:
    """The `Diagnosis` saved at `path`: an archive written by `save_diagnosis` (the ".npz" may be
    left out, as `save_diagnosis` allows), a report folder of `Diagnosis.save` (its `arrays.npz`),
    or a `<model>.npz` of an `mi-krr demo` / `diagnose` report. Tensors come back on the CPU;
    NumPy scalars as Python numbers. A file that is not such an archive, or one that is damaged
    or edited (unreadable entries, a manifest this mi-krr does not read, arrays whose shapes
    disagree), is a ValueError naming it; loading never unpickles."""
    path = _archive_file(Path(path))
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"path {str(path)!r} is not an .npz archive: pass a file written by probes.save_diagnosis, a folder written by "
            "Diagnosis.save, or a <model>.npz of an mi-krr report (not its report.json, index.md or figures)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            diagnosis = _decode(_manifest(archive), archive, {})
        if not isinstance(diagnosis, Diagnosis):
            raise _Refused(f"holds a {type(diagnosis).__name__}, not a Diagnosis")
        for result in diagnosis.task_sets.values():
            _check_shapes(result)
    except _Refused as error:
        raise ValueError(f"path {str(path)!r} {error}") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"path {str(path)!r} is not a readable diagnosis archive ({type(error).__name__}: {error}): it is truncated, damaged "
            "or edited; save the diagnosis again"
        ) from error
    return diagnosis


class _Refused(ValueError):
    """Why an archive cannot be loaded; `load_diagnosis` puts its path in front."""


def _archive_file(path: Path) -> Path:
    """The archive file `path` names: itself; `path` + ".npz" (what `save_diagnosis(d, path)`
    wrote); a folder's `arrays.npz` (`Diagnosis.save`). FileNotFoundError naming what it looked
    for, ValueError where a folder and a file both answer."""
    written = path if path.suffix == ".npz" or not path.name else path.with_name(path.name + ".npz")  # no name: "." or "/"
    if path.is_file():
        return path
    if path.is_dir() and written.is_file():
        raise ValueError(f"path {str(path)!r} names both a folder and the file {str(written)!r}: pass the one to load, with or without '/arrays.npz'")
    if written.is_file():
        return written
    if path.is_dir():
        if (path / "arrays.npz").is_file():
            return path / "arrays.npz"
        models = sorted(file.name for file in path.glob("*.npz"))
        if models:
            raise FileNotFoundError(
                f"folder {str(path)!r} has no arrays.npz but holds {', '.join(models)}: load one of those (an mi-krr report "
                "keeps one per model; `mi-krr compare` reads the whole report)"
            )
    raise FileNotFoundError(
        f"path {str(path)!r} is not a file: pass a file written by probes.save_diagnosis, a folder written by "
        "Diagnosis.save, or a <model>.npz of an mi-krr report"
    )


def _manifest(archive: Any) -> Any:
    """The encoded diagnosis of an open archive, after checking its format and version."""
    if MANIFEST_KEY not in archive.files:
        raise _Refused(
            f"holds arrays but no diagnosis (no {MANIFEST_KEY!r} entry): it was written before mi-krr saved diagnoses "
            "losslessly, or by another program; diagnose again (Diagnosis.save, or rerun the mi-krr command)"
        )
    manifest = json.loads(str(archive[MANIFEST_KEY]))
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (ARCHIVE_FORMAT, ARCHIVE_VERSION):
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise _Refused(
            f"is archive format {found[0]!r} version {found[1]!r}; this mi-krr reads {ARCHIVE_FORMAT!r} version "
            f"{ARCHIVE_VERSION}: load it with the mi-krr that wrote it"
        )
    return manifest["diagnosis"]


def _check_shapes(result: TaskSetDiagnosis) -> None:
    """Refuse a task set whose arrays disagree: layer_predictions `[B, L', m]` with one row per
    layer, krr_predictions `[B, m]`, kappa `[B]`, each algorithm's steps `[B, T+1, m]`."""
    layers = np.shape(result.layer_predictions)
    if len(layers) != 3 or layers[1] != len(result.layers):
        raise _Refused(f"holds task set {result.name!r} with layer_predictions of shape {layers}, not [B, {len(result.layers)}, m]: save it again")
    batch, _, queries = layers
    checks = [("krr_predictions", result.krr_predictions, (batch, queries)), ("kappa", result.kappa, (batch,))]
    checks += [(f"step_predictions[{name!r}]", pred, (batch, result.n_steps + 1, queries)) for name, pred in result.step_predictions.items()]
    for name, value, shape in checks:
        if np.shape(value) != shape:
            raise _Refused(f"holds task set {result.name!r} with {name} of shape {np.shape(value)}, not {shape} (from layer_predictions {layers}): save it again")


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
    """Turns a result into manifest JSON, collecting its arrays. Each array or tensor object is
    stored once however many fields hold it (`_decode` gives them one object again), and one of
    `named` (the prediction arrays) under its name there."""

    def __init__(self, named: dict[str, np.ndarray]):
        self.arrays: dict[str, np.ndarray] = dict(named)
        self._names = {id(array): name for name, array in named.items()}
        self._held: list[Any] = []  # what an id in _names belongs to, kept alive so no id is reused

    def _store(self, value: np.ndarray | torch.Tensor, where: str) -> str:
        name = self._names.get(id(value))
        if name is not None:
            return name
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if array.dtype.hasobject:
            raise TypeError(f"{where} is an array of Python objects, which an archive does not store: hold numbers in it")
        name = f"{ARRAY_PREFIX}{len(self.arrays)}"
        self.arrays[name] = array
        self._names[id(value)] = name
        self._held.append(value)
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
            return {"tensor": self._store(value, where)}
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


def _decode(value: Any, archive: Any, loaded: dict[tuple[str, str], Any]) -> Any:
    """The value `_Encoder.encode` wrote as `value`, arrays read from `archive`; `loaded` holds
    each (tag, key) read so far, so fields that shared an array share it again."""
    if not isinstance(value, dict):
        return value
    if len(value) == 1 or "dataclass" in value:
        tag = "dataclass" if "dataclass" in value else next(iter(value))
        content = value[tag]
        if tag == "float" and content in NON_FINITE:
            return NON_FINITE[content]
        if tag in ("ndarray", "tensor"):
            if (tag, content) not in loaded:
                if content not in archive.files:
                    raise _Refused(f"has a manifest naming the array {content!r}, which the file lacks: save the diagnosis again")
                array = archive[content]
                loaded[tag, content] = torch.from_numpy(array) if tag == "tensor" else array
            return loaded[tag, content]
        if tag in ("list", "tuple"):
            items = [_decode(item, archive, loaded) for item in content]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            return {_decode(key, archive, loaded): _decode(item, archive, loaded) for key, item in content}
        if tag == "dataclass" and content in RESULT_CLASSES:
            cls = RESULT_CLASSES[content]
            fields = {field.name for field in dataclasses.fields(cls) if field.init}
            required = {field.name for field in dataclasses.fields(cls) if field.init and field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING}
            given = set(value["fields"])
            if not required <= given <= fields:
                raise _Refused(f"has a manifest whose {content} lacks {sorted(required - given)} or has unknown {sorted(given - fields)}: "
                               "load it with the mi-krr that wrote it")
            return cls(**{name: _decode(item, archive, loaded) for name, item in value["fields"].items()})
    raise _Refused(f"has a manifest holding {json.dumps(value)[:80]}, which this mi-krr does not read: load it with the mi-krr that wrote it")
