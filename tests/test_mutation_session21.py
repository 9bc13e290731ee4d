"""Mutation review of session 21's changes (74f9a3a..HEAD in mi_krr/ and probes/): the new module
probes/diagnosis_archive.py (save_diagnosis's file name and atomic write, the encoder and its memo,
the decoder and its memo, load_diagnosis's error handling, _manifest, _check_shapes, _archive_file's
path resolution, prediction_arrays), `mi-krr compare` (mi_krr/commands/compare.py: saved_models,
--names, repeated names, --title, the --out refusal), the overview reports' file stems
(mi_krr/commands/overview.py) and probes/report.py's archive write.

Counts: 76 mutants planted one at a time, 42 killed by the existing tests, 30 survived and are
killed by the tests below, 4 equivalent (no observable change): the encoder's `_held` list removed
(every value it stores is a field of the diagnosis being encoded, alive for the whole save, so no id
is reused); `if f.init` dropped from the encoded fields (no result class has an init=False field);
the decoder's memo keyed by array name without its tag (an archive written by save_diagnosis names
each stored key under one tag only); report.py writing `folder / "arrays"` (save_diagnosis adds the
".npz"). Survivors: ".npz" appended only without a suffix, or put in place of the suffix
("run.v1"); shared arrays not memoised when saved (stored twice, loaded as two objects); a user's
dataclass accepted when it bears a result class's name, or any dataclass accepted at save time;
dict keys written raw (tuple, NumPy-integer and infinite keys) or read raw; a list element's error
naming index + 1; the decoder's "dataclass" tag taken from the first key only (a manifest listing
"fields" first); unknown float spellings, missing fields and missing array keys refused with the
generic "damaged" message instead of what is wrong; the Diagnosis type check removed; KeyError left
out of the caught errors (a manifest without its diagnosis); shapes checked in the first task set
only; the layer-count, kappa and step checks removed; the archive format not compared; the
folder-and-file ambiguity check removed; the model-file listing condition negated; compare's
empty-models check, AttributeError and UnicodeDecodeError handling removed; the --out refusal
comparing unresolved paths or only the first input; too many --names accepted; repeated --names not
refused (checked on the saved names, or skipped with --names); --title ignored.

Each test asserts against a reference independent of the archive's code: NumPy's own rule for the
file name np.savez writes, `np.load` of the file (how many entries hold an array), the diagnosis
held in memory (values, key types, `is` identity of shared arrays, its to_json), JSON's unordered
objects, the edit made here to a manifest or an array, and the documented behaviour (the archive
module's "RESULT_CLASSES only", load_diagnosis's "a ValueError naming it" for damaged, edited or
misshapen files, _archive_file's "FileNotFoundError naming what it looked for" and "ValueError where
a folder and a file both answer", --names' "one name per model", the command's one-line errors).
One finding that is not a mutant: the archive module's docstring named
`probes.report.prediction_arrays`, which this session moved (fixed; the last test checks every
dotted name that docstring gives).
"""

from __future__ import annotations

import dataclasses
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import probes
from mi_krr.cli import main
from mi_krr.commands.overview import ModelEntry, write_overview_report
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import LinearRegressionSampler
from probes.diagnosis_archive import MANIFEST_KEY

SAMPLER = LinearRegressionSampler(dim=3, noise_std=0.3)


@pytest.fixture(scope="module")
def diagnosis():
    """A small diagnosis of a random softmax model on two task sets (kernels off, optimal steps:
    under a second)."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2)).eval()
    tasks = {"first": SAMPLER.sample(12, 6, 2, seed=0), "second": SAMPLER.sample(12, 6, 2, seed=1)}
    return probes.diagnose(model, tasks, algorithms=("cg", "gd"), kernels=(), step_sizes="optimal", n_steps=3, bootstrap=10, progress=False)


def archive_contents(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def rewrite(path, target, contents=None, manifest=None):
    """`path`'s archive written again to `target` with `contents` entries replaced and the
    manifest replaced by `manifest` (a dict) when given."""
    entries = archive_contents(path)
    entries.update(contents or {})
    if manifest is not None:
        entries[MANIFEST_KEY] = np.array(json.dumps(manifest))
    np.savez(target, **entries)
    return target


def manifest_of(path):
    return json.loads(str(archive_contents(path)[MANIFEST_KEY]))


def one_line_error(capsys):
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


# ---------------------------------------------------------------- save_diagnosis's file name


def test_a_dotted_name_gets_npz_appended_as_numpy_savez_does_and_loads_back_by_the_same_name(diagnosis, tmp_path):
    """"NumPy adds '.npz' when path lacks it": np.savez itself (the reference) writes 'probe.v1' as
    'probe.v1.npz'; save_diagnosis must do the same, and load_diagnosis must find it by the name
    given to save."""
    np.savez(str(tmp_path / "probe.v1"), a=np.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.v1.npz"]
    written = probes.save_diagnosis(diagnosis, tmp_path / "run.v1")
    assert written == tmp_path / "run.v1.npz" and written.is_file()
    np.testing.assert_array_equal(probes.load_diagnosis(tmp_path / "run.v1")["second"].kappa, diagnosis["second"].kappa)


# ---------------------------------------------------------------- the encoder


def test_an_array_held_by_two_fields_is_stored_once_and_loads_back_as_one_object(diagnosis, tmp_path):
    shared = np.arange(6.0).reshape(2, 3)
    tensor = torch.arange(4, dtype=torch.float64)
    settings = {"a": shared, "b": [shared, tensor], "c": tensor}
    path = probes.save_diagnosis(dataclasses.replace(diagnosis, settings=settings), tmp_path / "shared")
    stored = archive_contents(path).values()
    assert sum(a.shape == shared.shape and np.array_equal(a, shared) for a in stored) == 1
    assert sum(a.shape == (4,) and np.array_equal(a, tensor.numpy()) for a in stored) == 1
    back = probes.load_diagnosis(path).settings
    assert back["a"] is back["b"][0] and back["b"][1] is back["c"]
    np.testing.assert_array_equal(back["a"], shared)


def test_a_users_dataclass_named_like_a_result_class_is_refused_when_saved(diagnosis, tmp_path):
    """Only the result classes themselves are stored (module docstring): a user's own dataclass
    that happens to be called FittedStep is not one of them."""

    @dataclasses.dataclass
    class FittedStep:
        algorithm: str

    with pytest.raises(TypeError, match=r"diagnosis.settings\['fit'\] is a FittedStep, which an archive does not store"):
        probes.save_diagnosis(dataclasses.replace(diagnosis, settings={"fit": FittedStep("cg")}), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_any_other_dataclass_is_refused_when_saved_not_when_loaded(diagnosis, tmp_path):
    @dataclasses.dataclass
    class Mine:
        value: float

    with pytest.raises(TypeError, match=r"diagnosis.settings\['mine'\] is a Mine, which an archive does not store"):
        probes.save_diagnosis(dataclasses.replace(diagnosis, settings={"mine": Mine(1.0)}), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_dict_keys_of_every_kind_come_back_with_their_types(diagnosis, tmp_path):
    """Tuple, integer, NumPy integer, boolean and infinite float keys: the loaded keys equal the
    in-memory ones, in order and type (NumPy scalars as Python numbers, as documented)."""
    settings = {"grid": {(1, 2): "pair", 3: "int", np.int64(4): "numpy int", True: "bool", float("inf"): "inf", ("a", (0.5,)): "nested"}}
    back = probes.load_diagnosis(probes.save_diagnosis(dataclasses.replace(diagnosis, settings=settings), tmp_path / "keys")).settings
    expected = [((1, 2), tuple), (3, int), (4, int), (True, bool), (float("inf"), float), (("a", (0.5,)), tuple)]
    assert [(key, type(key)) for key in back["grid"]] == expected
    assert list(back["grid"].values()) == list(settings["grid"].values())


def test_the_error_names_the_list_element_that_cannot_be_stored(diagnosis, tmp_path):
    with pytest.raises(TypeError, match=r"^diagnosis\.settings\['hooks'\]\[1\] is a function, which an archive does not store"):
        probes.save_diagnosis(dataclasses.replace(diagnosis, settings={"hooks": [1, lambda: None]}), tmp_path / "x")


# ---------------------------------------------------------------- load_diagnosis: edited and damaged files


@pytest.fixture
def saved(diagnosis, tmp_path):
    return probes.save_diagnosis(diagnosis, tmp_path / "good.npz")


@pytest.mark.parametrize("task_set", ["first", "second"])
@pytest.mark.parametrize("entry, cut", [("layer_predictions", np.s_[:, :-1]), ("kappa", np.s_[:-1]), ("krr_predictions", np.s_[:, :-1]),
                                        ("steps/gd", np.s_[:, :-1])], ids=["a layer less", "a kappa less", "a query less", "a step less"])
def test_an_array_cut_short_in_either_task_set_is_refused_naming_the_file_and_the_entry(saved, tmp_path, task_set, entry, cut):
    """"arrays whose shapes disagree" are "a ValueError naming it" (load_diagnosis's docstring):
    one layer, prompt, query or step fewer than the rest of the task set says, in the first or
    the second task set."""
    key = f"{task_set}/{entry}"
    target = rewrite(saved, tmp_path / "cut.npz", {key: archive_contents(saved)[key][cut]})
    field = "step_predictions['gd']" if entry.startswith("steps/") else entry
    with pytest.raises(ValueError, match=rf"cut.npz' holds task set '{task_set}' with {re.escape(field)} of shape"):
        probes.load_diagnosis(target)


def test_a_manifest_of_another_format_is_refused_naming_it(saved, tmp_path):
    manifest = manifest_of(saved)
    target = rewrite(saved, tmp_path / "other.npz", manifest={**manifest, "format": "another program"})
    with pytest.raises(ValueError, match="other.npz' is archive format 'another program' version 1; this mi-krr reads 'mi-krr diagnosis' version 1"):
        probes.load_diagnosis(target)


def test_a_manifest_without_its_diagnosis_is_a_value_error_naming_the_file(saved, tmp_path):
    manifest = manifest_of(saved)
    del manifest["diagnosis"]
    with pytest.raises(ValueError, match="headless.npz"):
        probes.load_diagnosis(rewrite(saved, tmp_path / "headless.npz", manifest=manifest))


def test_a_manifest_holding_a_task_set_instead_of_a_diagnosis_is_refused_naming_what_it_holds(saved, tmp_path):
    manifest = manifest_of(saved)
    manifest["diagnosis"] = manifest["diagnosis"]["fields"]["task_sets"]["dict"][0][1]
    with pytest.raises(ValueError, match="part.npz' holds a TaskSetDiagnosis, not a Diagnosis"):
        probes.load_diagnosis(rewrite(saved, tmp_path / "part.npz", manifest=manifest))


# ---------------------------------------------------------------- load_diagnosis: which file a path names


def test_a_folder_and_a_file_of_the_same_name_are_refused_as_ambiguous(diagnosis, tmp_path):
    """`_archive_file`: "ValueError where a folder and a file both answer": run1/arrays.npz and
    run1.npz both exist, so 'run1' names two archives."""
    probes.save_diagnosis(diagnosis, tmp_path / "run1" / "arrays.npz")
    probes.save_diagnosis(diagnosis, tmp_path / "run1.npz")
    with pytest.raises(ValueError, match=r"'.*run1' names both a folder and the file '.*run1.npz'"):
        probes.load_diagnosis(tmp_path / "run1")


def test_a_folder_of_model_files_without_arrays_npz_names_the_files_it_holds(diagnosis, tmp_path):
    for name in ("b", "a"):
        probes.save_diagnosis(diagnosis, tmp_path / "models" / name)
    with pytest.raises(FileNotFoundError, match="has no arrays.npz but holds a.npz, b.npz: load one of those"):
        probes.load_diagnosis(tmp_path / "models")


# ---------------------------------------------------------------- mi-krr compare


@pytest.fixture(scope="module")
def report(diagnosis, tmp_path_factory):
    """An overview report of two models (the same diagnosis twice), as mi-krr demo writes it."""
    folder = tmp_path_factory.mktemp("report") / "report"
    write_overview_report([ModelEntry("one", "the first", diagnosis), ModelEntry("two", "the second", diagnosis)], folder, "t", {})
    plt.close("all")
    return folder


@pytest.mark.parametrize("content", [b'{"models": {}}', b"[1, 2]", b'{"models": "\xff\xfe"}'], ids=["no models", "a list", "not UTF-8"])
def test_a_report_json_that_lists_no_models_is_a_one_line_error_naming_it(report, tmp_path, content, capsys):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for file in report.glob("*.npz"):
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "report.json").write_bytes(content)
    try:
        code = main(["compare", str(folder), "--out", str(tmp_path / "out")])
    except Exception:  # a traceback is the failure documented here
        code = None
    assert code == 2 and "report.json" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inputs", [["report"], ["good.npz", "report"], ["./report/../report"]], ids=["relative", "second input", "dotted"])
def test_out_naming_an_input_report_is_refused_however_the_path_is_spelled(report, saved, tmp_path, monkeypatch, inputs, capsys):
    (tmp_path / "report").mkdir()
    for file in report.iterdir():
        (tmp_path / "report" / file.name).write_bytes(file.read_bytes())
    before = (tmp_path / "report" / "report.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["compare", *inputs, "--out", "report"])
    finally:
        plt.close("all")
    assert code == 2 and "--out 'report' is the input" in one_line_error(capsys)
    assert (tmp_path / "report" / "report.json").read_bytes() == before


def test_names_must_be_one_per_model_not_more(report, tmp_path, capsys):
    assert main(["compare", str(report), "--names", "a", "b", "c", "--out", str(tmp_path / "out")]) == 2
    assert "--names gives 3 names for 2 models (one, two): pass one name per model, in that order" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_names_given_twice_on_the_command_line_are_refused(report, tmp_path, capsys):
    assert main(["compare", str(report), "--names", "same", "same", "--out", str(tmp_path / "out")]) == 2
    assert "two models are named 'same': pass --names with one distinct name per model (2 in all)" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_compare_writes_the_title_and_the_names_in_the_order_given(report, saved, tmp_path, capsys):
    """--title reaches index.md's heading and report.json; --names are given to the models in the
    order they are loaded (the report's models in its report.json order, then the file)."""
    out = tmp_path / "out"
    try:
        assert main(["compare", str(report), str(saved), "--names", "zeta", "alpha", "mid", "--title", "My comparison", "--out", str(out)]) == 0
    finally:
        plt.close("all")
    document = json.loads((out / "report.json").read_text())
    assert document["title"] == "My comparison" and (out / "index.md").read_text().startswith("# My comparison\n")
    assert list(document["models"]) == ["zeta", "alpha", "mid"]
    assert [document["models"][name]["description"] for name in ("zeta", "alpha")] == ["the first", "the second"]


# ---------------------------------------------------------------- edited manifests: the reason given


def _first_task_set_fields(manifest):
    return manifest["diagnosis"]["fields"]["task_sets"]["dict"][0][1]["fields"]


@pytest.mark.parametrize("edit, reason", [
    (lambda fields: fields.update(lam={"float": "NaN"}), r'has a manifest holding \{"float": "NaN"\}, which this mi-krr does not read'),
    (lambda fields: fields.pop("lam"), r"has a manifest whose TaskSetDiagnosis lacks \['lam'\] or has unknown \[\]"),
    (lambda fields: fields.update(kappa={"ndarray": "first/kappa_v2"}), r"has a manifest naming the array 'first/kappa_v2', which the file lacks"),
], ids=["unknown float spelling", "field removed", "array key not in the file"])
def test_an_edited_manifest_is_refused_with_what_the_edit_changed(saved, tmp_path, edit, reason):
    """The edit made here (a float spelled "NaN", the field 'lam' removed, an array key the file
    lacks) is what the error names, after the file's path."""
    manifest = manifest_of(saved)
    edit(_first_task_set_fields(manifest))
    with pytest.raises(ValueError, match=rf"edited.npz' {reason}"):
        probes.load_diagnosis(rewrite(saved, tmp_path / "edited.npz", manifest=manifest))


def test_a_manifest_whose_objects_list_their_keys_in_another_order_loads_the_same(diagnosis, saved, tmp_path):
    """JSON objects are unordered: a manifest rewritten with every object's keys reversed (as
    another JSON tool may write it: "fields" before "dataclass") holds the same diagnosis."""

    def reversed_keys(value):
        if isinstance(value, dict):
            return {key: reversed_keys(value[key]) for key in reversed(list(value))}
        return [reversed_keys(item) for item in value] if isinstance(value, list) else value

    manifest = manifest_of(saved)
    assert list(manifest["diagnosis"]) == ["dataclass", "fields"]
    loaded = probes.load_diagnosis(rewrite(saved, tmp_path / "reordered.npz", manifest=reversed_keys(manifest)))
    assert loaded.to_json() == diagnosis.to_json()
    for name, result in diagnosis.task_sets.items():
        np.testing.assert_array_equal(loaded[name].layer_predictions, result.layer_predictions)


# ---------------------------------------------------------------- found while reading (not a mutant)


def test_the_functions_the_archive_module_docstring_names_exist():
    import importlib

    import probes.diagnosis_archive as module

    for dotted in sorted(set(re.findall(r"`(probes(?:\.\w+)+)`", module.__doc__))):
        parent, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(parent), name), dotted
