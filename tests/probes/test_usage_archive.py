"""Usage review of the diagnosis archive (`probes.save_diagnosis` / `probes.load_diagnosis`, the
`arrays.npz` of `Diagnosis.save`, the `<model>.npz` of the overview reports and `mi-krr compare`),
read adversarially by a researcher who diagnoses models in one session and compares them in the next.

Covered: round trips of every kind of diagnosis a user makes (method="ridge" with its withheld
verdict, bootstrap=0, kernels=() with optimal steps, functools.partial candidates, label
sensitivities, task sets with odd names, a float32 ICLTransformer, a BridgeICLModel, a Garg-format
checkpoint, one prompt per set); what a loaded diagnosis computes (summary, JSON, table, HTML,
figures, comparisons with fresh diagnoses, saving again, the fitted steps' solvers, the kernel
alignment's best heads); the `mi-krr compare` command on relative paths; and damaged, edited or
wrong files.

References, all independent of the archive's code: a recursive equality written here (types,
containers, dtypes, shapes, NaN and signed infinities, signed zeros), `np.load` of the documented
keys, a NumPy heavy-ball recursion run with the loaded folds / steps / momenta, a NumPy argmin over
heads, the figures' own pixel data, and comparisons made in memory before saving.

The review (session 21) found eight problems, all fixed: damaged, truncated or non-archive files and
edited manifests reached zipfile / NumPy / KeyError messages without the path (and tracebacks in
`mi-krr compare`); shapes were not checked on loading; shared arrays came back as copies, so an
archive of a loaded diagnosis differed; `load_diagnosis("run1")` did not find the `run1.npz` that
`save_diagnosis(d, "run1")` wrote; `mi-krr compare R --out R` replaced report R; and a report with a
missing model file or a damaged report.json gave errors naming neither."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pickle
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import probes
from mi_krr import solvers
from mi_krr.cli import main
from mi_krr.commands.overview import ModelEntry, write_overview_report
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, load_garg_checkpoint
from mi_krr.tasks import LinearRegressionSampler
from mi_krr.tasks.samplers import GPRegressionSampler
from probes.diagnosis_archive import MANIFEST_KEY

LINEAR = LinearRegressionSampler(dim=3, noise_std=0.3)
GP = GPRegressionSampler(dim=3, noise_std=0.2, bandwidth=0.8)
SMALL = dict(n_steps=3, bootstrap=40, progress=False)


# ---------------------------------------------------------------- independent references


def differences(original, loaded, where="diagnosis"):
    """Every place where `loaded` differs from `original` (empty when equal): the same classes
    (dataclasses field by field, list vs tuple, dict keys in order and of the same type), arrays
    and tensors of the same dtype, shape and values (NaN where NaN), floats equal with their sign
    (so -0.0 and +-inf are told apart), NumPy scalars as the Python numbers the loader documents."""
    if dataclasses.is_dataclass(original):
        if type(loaded) is not type(original):
            return [f"{where}: {type(original).__name__} became {type(loaded).__name__}"]
        return [d for f in dataclasses.fields(original) for d in differences(getattr(original, f.name), getattr(loaded, f.name), f"{where}.{f.name}")]
    if isinstance(original, dict):
        if not isinstance(loaded, dict) or list(loaded) != list(original):
            return [f"{where}: keys {list(original)} became {list(loaded) if isinstance(loaded, dict) else loaded!r}"]
        found = [f"{where}: key {key!r} changed type" for key, back in zip(original, loaded) if type(key) is not type(back)]
        return found + [d for key in original for d in differences(original[key], loaded[key], f"{where}[{key!r}]")]
    if isinstance(original, (list, tuple)):
        if type(loaded) is not type(original) or len(loaded) != len(original):
            return [f"{where}: {type(original).__name__} of {len(original)} became {loaded!r:.60}"]
        return [d for index, (a, b) in enumerate(zip(original, loaded)) for d in differences(a, b, f"{where}[{index}]")]
    if isinstance(original, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            return [f"{where}: tensor became {type(loaded).__name__}"]
        original, loaded = original.detach().cpu().numpy(), loaded.numpy()
    if isinstance(original, np.ndarray):
        if not isinstance(loaded, np.ndarray) or loaded.dtype != original.dtype or loaded.shape != original.shape:
            return [f"{where}: array {original.dtype} {original.shape} became {getattr(loaded, 'dtype', type(loaded))} {getattr(loaded, 'shape', '')}"]
        return [] if np.array_equal(original, loaded, equal_nan=original.dtype.kind in "fc") else [f"{where}: values differ"]
    if isinstance(original, np.generic):
        original = original.item()
    if isinstance(original, float):
        same = isinstance(loaded, float) and ((math.isnan(original) and math.isnan(loaded))
                                             or (loaded == original and math.copysign(1, loaded) == math.copysign(1, original)))
        return [] if same else [f"{where}: {original!r} became {loaded!r}"]
    return [] if type(loaded) is type(original) and loaded == original else [f"{where}: {original!r} became {loaded!r}"]


def figure_data(figure):
    """What a figure shows: per axes, its lines' data, images' arrays (masks filled with NaN) and
    texts; compared between a loaded and an original diagnosis's figures."""
    shown = []
    for ax in figure.axes:
        shown.append([np.asarray(line.get_xydata(), dtype=float) for line in ax.lines])
        shown.append([np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan) for image in ax.images])
        shown.append([text.get_text() for text in ax.texts] + [ax.get_title()])
    return shown


def assert_figures_show_the_same(original: dict, loaded: dict):
    assert list(loaded) == list(original)
    for name in original:
        for a, b in zip(figure_data(original[name]), figure_data(loaded[name]), strict=True):
            for x, y in zip(a, b, strict=True):
                if isinstance(x, str):
                    assert x == y, name
                else:
                    np.testing.assert_array_equal(x, y, err_msg=name)


def numpy_heavy_ball_predictions(x, y, xq, lam, step, momentum, n_steps):
    """alpha_{t+1} = alpha_t + w (y - (K + lam I) alpha_t) + beta (alpha_t - alpha_{t-1}) from
    alpha_{-1} = alpha_0 = 0 with the linear kernel, per prompt; query predictions `[B, T+1, m]`."""
    out = np.zeros((x.shape[0], n_steps + 1, xq.shape[1]))
    for b in range(x.shape[0]):
        A = x[b] @ x[b].T + lam * np.eye(x.shape[1])
        previous = alpha = np.zeros(x.shape[1])
        for t in range(1, n_steps + 1):
            previous, alpha = alpha, alpha + step[b] * (y[b] - A @ alpha) + momentum[b] * (alpha - previous)
            out[b, t] = xq[b] @ x[b].T @ alpha
    return out


# ---------------------------------------------------------------- models and diagnoses


def small_transformer(dtype: str = "float32") -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(ICLTransformerConfig(n_dims=3, d_model=16, n_layers=2, n_heads=2, dtype=dtype)).eval()


def bridge() -> BridgeICLModel:
    torch.manual_seed(1)
    return BridgeICLModel(ICLTransformerConfig(n_dims=3, d_model=8, n_layers=2, n_heads=2, max_seq_len=32, dtype="float64")).eval()


def garg_model(folder):
    """A Garg et al. run folder (config.yaml + state.pt of a GPT-2 backbone with read-in / read-out)
    written here, loaded with `load_garg_checkpoint`."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(2)
    conf = GPT2Config(n_positions=16, n_embd=12, n_layer=2, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    module = torch.nn.Module()
    module._read_in, module._backbone, module._read_out = torch.nn.Linear(3, 12), GPT2Model(conf), torch.nn.Linear(12, 1)
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "gpt2", "n_dims": 3, "n_positions": 8, "n_embd": 12,
                                                                  "n_layer": 2, "n_head": 3}, "training": {"task": "linear_regression"}}))
    torch.save({"model_state_dict": module.state_dict(), "optimizer_state_dict": {}, "train_step": 1}, folder / "state.pt")
    return load_garg_checkpoint(folder)


ODD_NAMES = ("a/b", "a_b", "x.y", "ünïcödé ☃", "_archive", "mi_krr_manifest", "")
"""Task-set names: a slash (the archive's key separator), one that sanitises to the same file stem
as "a/b", a dot, non-ASCII, the archive's own prefix and manifest key, and the empty string."""


def make_case(kind: str, tmp_path_factory):
    """(diagnosis, what this kind must show in it) for each kind of diagnosis a user makes."""
    task = LINEAR.sample(20, 6, 2, seed=0)
    if kind == "ridge":
        d = probes.diagnose(small_transformer(), task, method="ridge", train_task=LINEAR.sample(48, 6, 2, seed=9), algorithms=("cg", "gd"), **SMALL)
        assert d["tasks"].verdict.withheld and not d["tasks"].verdict.identified
    elif kind == "bootstrap=0":
        d = probes.diagnose(small_transformer(), task, algorithms=("cg", "gd"), **{**SMALL, "bootstrap": 0})
        assert all(math.isnan(low) and math.isnan(high) for low, high in (s.score_ci for s in d["tasks"].scores.values()))
    elif kind == "lean":
        d = probes.diagnose(small_transformer(), task, kernels=(), step_sizes="optimal", algorithms=("cg", "heavy_ball"), **SMALL)
        assert d["tasks"].kernel_alignment is None and not d["tasks"].fitted_steps
    elif kind == "partial solvers":
        algorithms = {"gd(step=0.04)": functools.partial(solvers.richardson, step=0.04), "my cg": solvers.cg, "cg": solvers.ALGORITHMS["cg"]}
        d = probes.diagnose(small_transformer(), task, algorithms=algorithms, **SMALL)
        assert d.settings["algorithms"]["gd(step=0.04)"].endswith("(step=0.04)")
    elif kind == "sensitivities":
        d = probes.diagnose(small_transformer(), GP.sample(20, 6, 2, seed=0), algorithms=("cg", "heavy_ball"), sensitivities=True, **SMALL)
        assert d["tasks"].layer_sensitivities is not None and d["tasks"].fitted_steps["heavy_ball"].momentum is not None
    elif kind == "odd task-set names":
        d = probes.diagnose(small_transformer(), {name: LINEAR.sample(20, 6, 2, seed=i) for i, name in enumerate(ODD_NAMES)},
                            algorithms=("cg", "gd"), kernels=(), **SMALL)
    elif kind == "float64 bridge":
        d = probes.diagnose(bridge(), task, algorithms=("cg", "gd"), **SMALL)
        assert d["tasks"].kernel_alignment is not None
    elif kind == "garg checkpoint":
        d = probes.diagnose(garg_model(tmp_path_factory.mktemp("garg") / "run"), LINEAR.sample(20, 5, 2, seed=0), algorithms=("cg", "gd"), **SMALL)
    elif kind == "one prompt":
        d = probes.diagnose(small_transformer("float64"), LINEAR.sample(1, 6, 2, seed=0), step_sizes="optimal", algorithms=("cg", "gd"), **SMALL)
        assert d["tasks"].n_prompts == 1
    return d


KINDS = ("ridge", "bootstrap=0", "lean", "partial solvers", "sensitivities", "odd task-set names", "float64 bridge", "garg checkpoint", "one prompt")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {kind: make_case(kind, tmp_path_factory) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_diagnosis_comes_back_equal_and_computes_the_same_text_tables_and_documented_keys(kind, cases, tmp_path):
    original = cases[kind]
    path = probes.save_diagnosis(original, str(tmp_path / "saved.npz"))  # a str path, as in a notebook
    loaded = probes.load_diagnosis(path)
    assert differences(original, loaded) == []
    assert loaded.summary() == original.summary() and loaded.to_json() == original.to_json()
    assert loaded._repr_html_() == original._repr_html_() and repr(loaded) == repr(original)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), original.to_dataframe())
    with np.load(path, allow_pickle=False) as arrays:  # the documented keys, task-set names as they are
        for name, result in original.task_sets.items():
            np.testing.assert_array_equal(arrays[f"{name}/layer_predictions"], result.layer_predictions)
            np.testing.assert_array_equal(arrays[f"{name}/kappa"], result.kappa)
            for algorithm, pred in result.step_predictions.items():
                np.testing.assert_array_equal(arrays[f"{name}/steps/{algorithm}"], pred)


def test_a_loaded_diagnosis_draws_the_same_figures_and_its_kernel_alignment_picks_the_numpy_best_heads(cases, tmp_path):
    original = cases["sensitivities"]
    loaded = probes.load_diagnosis(probes.save_diagnosis(original, tmp_path / "s"))
    assert_figures_show_the_same(original.plot(), loaded.plot())
    alignment, before = loaded["tasks"].kernel_alignment, original["tasks"].kernel_alignment
    for kernel in alignment.metrics:
        distance = alignment.metrics[kernel]["operator_distance"].numpy()
        head, best = alignment.best_heads(kernel)
        np.testing.assert_array_equal(head, np.nanargmin(distance, axis=1))
        np.testing.assert_array_equal(best, np.nanmin(distance, axis=1))
        np.testing.assert_array_equal(alignment.uniform_best_heads(kernel), before.uniform_best_heads(kernel))
    assert_figures_show_the_same({"alignment": before.plot()}, {"alignment": alignment.plot()})
    plt.close("all")


def test_a_loaded_heavy_ball_fit_explains_the_stored_trajectory_by_a_numpy_recursion(tmp_path):
    """Each prompt runs the step and momentum fitted on the other half of the prompts: the loaded
    folds, steps and momenta in a NumPy heavy-ball recursion give the stored predictions, and so
    does the loaded fit's own solver."""
    task = LINEAR.sample(20, 6, 2, seed=0)
    d = probes.diagnose(small_transformer("float64"), task, algorithms=("heavy_ball",), kernels=(), **SMALL)
    fit = probes.load_diagnosis(probes.save_diagnosis(d, tmp_path / "hb"))["tasks"]
    hb = fit.fitted_steps["heavy_ball"]
    other = 1 - hb.folds
    x, y, xq = (value.double().numpy() for value in (task.x_support, task.y_support, task.x_query))
    expected = numpy_heavy_ball_predictions(x, y, xq, fit.lam, hb.step[other], hb.momentum[other], fit.n_steps)
    np.testing.assert_allclose(fit.step_predictions["heavy_ball"], expected, rtol=1e-10, atol=1e-12)
    trajectory = hb.solver()(torch.from_numpy(x @ x.transpose(0, 2, 1)), torch.from_numpy(y), fit.lam, fit.n_steps,
                             K_query=torch.from_numpy(xq @ x.transpose(0, 2, 1)))
    np.testing.assert_allclose(trajectory.pred.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_an_archive_of_a_loaded_diagnosis_holds_the_same_manifest_and_arrays(cases, tmp_path):
    first = probes.save_diagnosis(cases["sensitivities"], tmp_path / "first")
    loaded = probes.load_diagnosis(first)
    second = probes.save_diagnosis(loaded, tmp_path / "second")
    assert differences(cases["sensitivities"], loaded) == []
    with np.load(first) as a, np.load(second) as b:
        assert a.files == b.files and str(a[MANIFEST_KEY]) == str(b[MANIFEST_KEY])
        for key in a.files:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_comparing_a_loaded_diagnosis_with_fresh_ones_gives_the_notes_of_the_in_memory_comparison(cases, tmp_path):
    """A saved diagnosis (fitted steps, cg + gd) against a fresh one (optimal steps, another
    candidate, another lam): the same three notes as when both are in memory, in both orders."""
    saved = cases["partial solvers"]
    fresh = probes.diagnose(small_transformer(), LINEAR.sample(20, 6, 2, seed=0), algorithms=("cg", "gd"), lam=1.0,
                            step_sizes="optimal", kernels=(), **SMALL)
    loaded = probes.load_diagnosis(probes.save_diagnosis(saved, tmp_path / "saved"))
    in_memory = probes.compare({"saved": saved, "fresh": fresh}).notes
    assert len(in_memory) == 3 and any("lam=1" in note for note in in_memory)
    assert probes.compare({"saved": loaded, "fresh": fresh}).notes == in_memory
    assert probes.compare({"fresh": fresh, "saved": loaded}).notes == probes.compare({"fresh": fresh, "saved": saved}).notes


def test_loading_never_unpickles_what_a_file_holds(cases, tmp_path):
    """A manifest or an array entry replaced by a pickled object whose unpickling would write a
    file: loading refuses it (allow_pickle=False) and the file is never written."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = probes.save_diagnosis(cases["lean"], tmp_path / "d")
    with np.load(path) as archive:
        contents = {key: archive[key] for key in archive.files}
    payload = np.empty(1, dtype=object)
    payload[0] = Payload()
    np.savez(tmp_path / "manifest.npz", **{**contents, MANIFEST_KEY: payload}, allow_pickle=True)
    np.savez(tmp_path / "array.npz", **{**contents, "tasks/kappa": payload}, allow_pickle=True)
    for name in ("manifest.npz", "array.npz"):
        with pytest.raises(ValueError):
            probes.load_diagnosis(tmp_path / name)
    pickle.loads(pickle.dumps(Payload())).close()  # the payload does write the marker when unpickled
    assert marker.exists()
    marker.unlink()
    for name in ("manifest.npz", "array.npz"):
        with pytest.raises(ValueError):
            probes.load_diagnosis(tmp_path / name)
    assert not marker.exists()


def test_compare_reads_relative_paths_and_a_dot_folder_and_writes_inside_an_input_folder(cases, tmp_path, monkeypatch, capsys):
    """From inside a Diagnosis.save-style folder (an arrays.npz archive): `mi-krr compare . ../other.npz
    --out cmp` names the models after the folder and the file, as an in-memory comparison does."""
    lean, bootstrap0 = cases["lean"], cases["bootstrap=0"]
    folder = tmp_path / "run1"
    probes.save_diagnosis(lean, folder / "arrays.npz")
    probes.save_diagnosis(bootstrap0, tmp_path / "other.npz")
    monkeypatch.chdir(folder)
    assert main(["compare", ".", "../other.npz", "--out", "cmp"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(probes.compare({"run1": lean, "other": bootstrap0}).summary() + "\n")
    document = json.loads((folder / "cmp" / "report.json").read_text())
    assert list(document["models"]) == ["run1", "other"] and document["settings"]["inputs"] == [".", "../other.npz"]
    assert differences(bootstrap0, probes.load_diagnosis(folder / "cmp" / "other.npz")) == []
    plt.close("all")


# ---------------------------------------------------------------- damaged, edited and mistaken input


def _one_model_archive(cases, tmp_path):
    return probes.save_diagnosis(cases["lean"], tmp_path / "good.npz")


def test_a_truncated_archive_is_a_value_error_naming_the_path(cases, tmp_path):
    data = _one_model_archive(cases, tmp_path).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        probes.load_diagnosis(tmp_path / "cut.npz")


def test_compare_on_a_truncated_archive_is_one_line_naming_the_path(cases, tmp_path, capsys):
    data = _one_model_archive(cases, tmp_path).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:-10])
    try:
        code = main(["compare", str(tmp_path / "cut.npz"), "--out", str(tmp_path / "out")])
    except Exception:  # a traceback is the failure documented here
        code = None
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "cut.npz" in error


@pytest.mark.parametrize("name, content", [("report.json", b'{"models": {}}'), ("index.md", b"# mi-krr demo\n"),
                                           ("overview.png", b"\x89PNG\r\n\x1a\n" + bytes(64))], ids=["json", "markdown", "png"])
def test_a_file_that_is_not_an_archive_is_named_without_advice_to_unpickle(name, content, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        probes.load_diagnosis(tmp_path / name)
    assert name in str(error.value) and "allow_pickle" not in str(error.value)


def test_a_npy_file_is_a_value_error_naming_the_path(tmp_path):
    np.save(tmp_path / "predictions.npy", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="predictions.npy"):
        probes.load_diagnosis(tmp_path / "predictions.npy")


def _edit_manifest(path, target, edit):
    with np.load(path) as archive:
        contents = {key: archive[key] for key in archive.files}
    manifest = json.loads(str(contents[MANIFEST_KEY]))
    edit(manifest["diagnosis"]["fields"]["task_sets"]["dict"][0][1]["fields"])
    np.savez(target, **{**contents, MANIFEST_KEY: np.array(json.dumps(manifest))})


EDITS = {
    "unknown float tag": lambda fields: fields.update(lam={"float": "NaN"}),
    "array key not in the file": lambda fields: fields.update(kappa={"ndarray": "tasks/kappa_v2"}),
    "field missing": lambda fields: fields.pop("lam"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_a_value_error_naming_the_file(edit, cases, tmp_path):
    _edit_manifest(_one_model_archive(cases, tmp_path), tmp_path / "edited.npz", EDITS[edit])
    with pytest.raises(ValueError, match="edited.npz"):
        probes.load_diagnosis(tmp_path / "edited.npz")


def test_an_archive_with_a_wrongly_shaped_prediction_array_is_refused_when_loaded(cases, tmp_path):
    path = _one_model_archive(cases, tmp_path)
    with np.load(path) as archive:
        contents = {key: archive[key] for key in archive.files}
    contents["tasks/layer_predictions"] = contents["tasks/layer_predictions"][:, :, 0]  # [B, L'] instead of [B, L', m]
    np.savez(tmp_path / "reshaped.npz", **contents)
    with pytest.raises(ValueError, match="layer_predictions"):
        probes.load_diagnosis(tmp_path / "reshaped.npz")


def test_the_path_given_to_save_loads_back(cases, tmp_path):
    written = probes.save_diagnosis(cases["lean"], str(tmp_path / "run1"))
    assert written.name == "run1.npz"
    assert differences(cases["lean"], probes.load_diagnosis(str(tmp_path / "run1"))) == []


@pytest.fixture(scope="module")
def pristine_report(cases, tmp_path_factory):
    """An overview report of two models, one name with a slash (file stem "rich_son")."""
    folder = tmp_path_factory.mktemp("pristine") / "report"
    write_overview_report([ModelEntry("rich/son", "first", cases["lean"]), ModelEntry("second", "second", cases["bootstrap=0"])],
                          folder, "two models", {"seed": 7, "mode": "quick"})
    plt.close("all")
    return folder


@pytest.fixture
def report_folder(pristine_report, tmp_path):
    """A copy of the pristine report this test may damage."""
    return shutil.copytree(pristine_report, tmp_path / "report")


def test_compare_does_not_silently_overwrite_the_report_it_reads(report_folder, capsys):
    before = json.loads((report_folder / "report.json").read_text())
    code = main(["compare", str(report_folder), "--out", str(report_folder)])
    error = capsys.readouterr().err
    after = json.loads((report_folder / "report.json").read_text())
    plt.close("all")
    assert (code == 2 and "--out" in error) or after["settings"] == before["settings"]


def test_a_report_folder_missing_a_model_file_names_the_model(report_folder, capsys):
    (report_folder / "rich_son.npz").unlink()
    assert main(["compare", str(report_folder), "--out", str(report_folder.parent / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'rich/son'" in error and "report.json" in error


@pytest.mark.parametrize("text", ['{"models": ', '{"models": ["rich/son"]}'])
def test_a_damaged_report_json_is_one_line_naming_it(text, report_folder, capsys):
    (report_folder / "report.json").write_text(text)
    try:
        code = main(["compare", str(report_folder), "--out", str(report_folder.parent / "out")])
    except Exception:  # a traceback is the failure documented here
        code = None
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "report.json" in error
