"""`mi-krr compare PATH [PATH ...]`: saved diagnoses side by side, without re-running any model.

    mi-krr diagnose checkpoints/softmax_gp --out reports/softmax
    mi-krr diagnose runs/garg_linear --out reports/garg
    mi-krr compare reports/softmax reports/garg --out reports/compare
    mi-krr compare reports/demo my_model.npz --names demo-cg demo-rich demo-lr demo-gp mine

Each PATH is a report folder of `mi-krr demo` / `mi-krr diagnose` (every model in it, by its name
there), a folder written by `Diagnosis.save`, or a `.npz` file of `probes.save_diagnosis`.
Prints `probes.compare`'s table and notes and writes the same report folder as `mi-krr diagnose`
(index.md, overview.png, per-model figures, report.json, <model>.npz) to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_OUT = "reports/compare"


def add_arguments(parser: argparse.ArgumentParser) -> str:
    """The options of `mi-krr compare` on its parser; returns its default --out."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="report folder, Diagnosis.save folder or probes.save_diagnosis .npz")
    parser.add_argument("--names", nargs="+", default=None,
                        help="one name per model loaded, in order (default: the names in each report, else the file or folder name)")
    parser.add_argument("--title", default="mi-krr compare", help="the report's title")
    return DEFAULT_OUT


def saved_models(path: str | Path) -> list[tuple[str, str, Any]]:
    """(name, description, Diagnosis) of every model saved at `path` (module docstring): a report
    folder's models in its report.json's order, with their descriptions."""
    from mi_krr.commands.overview import REPORT_JSON
    from probes.diagnosis_archive import load_diagnosis
    from probes.report import _file_stems

    path = Path(path)
    report = path / REPORT_JSON
    if path.is_dir() and report.is_file():
        try:
            models = json.loads(report.read_text()).get("models")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(report)!r} is not a report's JSON ({error}): rerun the command that wrote {str(path)!r}") from None
        if not isinstance(models, dict) or not models:
            raise ValueError(f"{str(report)!r} lists no models by name: rerun the command that wrote {str(path)!r}, or pass its <model>.npz files")
        stems = _file_stems(list(models))  # the file names write_overview_report gave them
        entries = []
        for name, entry in models.items():
            file = path / f"{stems[name]}.npz"
            if not file.is_file():
                raise ValueError(f"{str(report)!r} lists model {name!r} but {str(file)!r} is missing: rerun the command that wrote {str(path)!r}")
            description = entry.get("description", "") if isinstance(entry, dict) else ""
            entries.append((name, description, load_diagnosis(file)))
        return entries
    name = path.resolve().stem if path.is_file() else path.resolve().name
    return [(name, f"loaded from `{path}`.", load_diagnosis(path))]


def run(args: argparse.Namespace) -> int:
    import time

    from mi_krr.commands.overview import ModelEntry, overview_comparison, write_overview_report

    start = time.perf_counter()
    out = Path(args.out).resolve()
    for path in args.paths:
        if Path(path).is_dir() and Path(path).resolve() == out:
            raise ValueError(f"--out {args.out!r} is the input {path!r}: its report would be replaced by the comparison; pass another folder")
    loaded = [model for path in args.paths for model in saved_models(path)]
    names = [name for name, _, _ in loaded]
    if args.names is not None:
        if len(args.names) != len(loaded):
            raise ValueError(f"--names gives {len(args.names)} names for {len(loaded)} models ({', '.join(names)}): pass one name per model, in that order")
        names = list(args.names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two models are named {repeated[0]!r}: pass --names with one distinct name per model ({len(loaded)} in all)")
    entries = [ModelEntry(name, description, diagnosis) for name, (_, description, diagnosis) in zip(names, loaded)]
    print(overview_comparison(entries).summary())
    index = write_overview_report(entries, args.out, title=args.title, settings={"inputs": [str(path) for path in args.paths]})
    print(f"report: {index} ({time.perf_counter() - start:.0f} s)")
    return 0
