"""`mi-krr compare`: saved diagnoses (an overview report folder of several models, a
`Diagnosis.save` folder, a `probes.save_diagnosis` file) side by side. The reference is the
comparison made in memory from the diagnoses before they were saved: the printed table and the
report's numbers must be the same, under the names the command documents."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

import probes
from mi_krr.cli import main
from mi_krr.commands.overview import ModelEntry, write_overview_report
from mi_krr.construct import cg_transformer, gd_transformer
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import LinearRegressionSampler

SAMPLER = LinearRegressionSampler(dim=3, noise_std=0.3)


@pytest.fixture(scope="module")
def diagnoses():
    """Three small diagnoses on the same prompts: the CG and GD constructions and a random
    softmax model."""
    task = SAMPLER.sample(24, 6, 2, seed=0)
    torch.manual_seed(0)
    models = {
        "cg": cg_transformer(n_steps=2, lam=0.27, kernel="linear", dim=3),
        "gd": gd_transformer(n_steps=2, lr=0.1, lam=0.27, dim=3),
        "softmax": ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2)).eval(),
    }
    common = dict(algorithms=("cg", "gd"), n_steps=3, bootstrap=100, progress=False)
    return {name: probes.diagnose(model, {"in_distribution": task}, **common) for name, model in models.items()}


@pytest.fixture(scope="module")
def saved(diagnoses, tmp_path_factory):
    """The overview report of cg and gd (names that sanitise to the same file stem), the softmax
    model saved twice: as a Diagnosis.save folder and as a save_diagnosis file."""
    root = tmp_path_factory.mktemp("saved")
    write_overview_report([ModelEntry("cg/x", "CG, linear attention.", diagnoses["cg"]), ModelEntry("cg_x", "GD.", diagnoses["gd"])],
                          root / "overview", "two constructions", {})
    diagnoses["softmax"].save(root / "softmax_folder")
    probes.save_diagnosis(diagnoses["softmax"], root / "softmax_file.npz")
    plt.close("all")
    return root


def test_compare_prints_the_in_memory_comparison_of_every_saved_model_under_its_documented_name(diagnoses, saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(saved / "overview"), str(saved / "softmax_folder"), str(saved / "softmax_file.npz"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = probes.compare({"cg/x": diagnoses["cg"], "cg_x": diagnoses["gd"], "softmax_folder": diagnoses["softmax"],
                               "softmax_file": diagnoses["softmax"]})
    assert printed.startswith(expected.summary() + "\n")
    document = json.loads((out / "report.json").read_text())
    assert list(document["models"]) == ["cg/x", "cg_x", "softmax_folder", "softmax_file"]
    assert document["models"]["cg/x"]["description"] == "CG, linear attention."
    for name, model in (("cg/x", "cg"), ("cg_x", "gd")):  # one file each, though both names sanitise to cg_x
        assert document["models"][name]["diagnosis"] == json.loads(diagnoses[model].to_json())
    assert document["settings"]["inputs"][2] == str(saved / "softmax_file.npz")
    plt.close("all")


def test_names_replace_the_saved_ones_in_order_and_must_be_one_per_distinct_model(diagnoses, saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", str(saved / "overview"), str(saved / "softmax_file.npz"), "--names", "CG", "GD", "soft", "--out", str(out)]) == 0
    assert list(json.loads((out / "report.json").read_text())["models"]) == ["CG", "GD", "soft"]
    plt.close("all")
    capsys.readouterr()
    assert main(["compare", str(saved / "overview"), "--names", "one", "--out", str(out)]) == 2
    assert "--names gives 1 names for 2 models (cg/x, cg_x): pass one name per model, in that order" in capsys.readouterr().err
    assert main(["compare", str(saved / "softmax_file.npz"), str(saved / "softmax_file.npz"), "--out", str(out)]) == 2
    assert "two models are named 'softmax_file': pass --names with one distinct name per model (2 in all)" in capsys.readouterr().err


def test_a_path_without_a_saved_diagnosis_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a file: pass a file written by probes.save_diagnosis" in error
