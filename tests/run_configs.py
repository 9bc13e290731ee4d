"""Run configs written to disk for the `mi-krr train` tests."""

import json
from pathlib import Path

import yaml


def write_run_config(folder: Path, config: dict, **train_changes) -> str:
    """`config` (model, sampler and train sections; left unchanged) with its train section
    updated by `train_changes`, as YAML in `folder`/tiny.yaml; returns that path."""
    written = json.loads(json.dumps(config))
    written["train"].update(train_changes)
    path = Path(folder) / "tiny.yaml"
    path.write_text(yaml.safe_dump(written))
    return str(path)
