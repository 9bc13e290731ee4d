"""`probes.save_diagnosis` / `probes.load_diagnosis`: a diagnosis written to disk and read back is
the same object, field by field. The reference is the diagnosis held in memory, compared by an
equality written here (types, dtypes, shapes, values, NaN where NaN and +-inf with their signs),
not by the archive's own code; and what the loaded diagnosis computes (summary, JSON, table,
comparison, the fitted steps' solvers) against what the original computes."""

import dataclasses
import json
import math
import os
import zipfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import probes
from mi_krr.commands.overview import ModelEntry, write_overview_report
from mi_krr.construct import richardson_transformer
from mi_krr.kernels import kernel_matrix
from mi_krr.tasks.samplers import GPRegressionSampler
from probes.diagnosis_archive import MANIFEST_KEY


def assert_same(original, loaded, where="diagnosis"):
    """`loaded` equals `original`: the same containers (dict keys in order, list vs tuple),
    arrays and tensors of the same dtype, shape and values (NaN at the same places), numbers equal
    (NaN to NaN, inf to inf of the same sign); dataclasses field by field."""
    if dataclasses.is_dataclass(original):
        assert type(loaded) is type(original), where
        for field in dataclasses.fields(original):
            assert_same(getattr(original, field.name), getattr(loaded, field.name), f"{where}.{field.name}")
    elif isinstance(original, dict):
        assert isinstance(loaded, dict) and list(loaded) == list(original), where
        for key, value in original.items():
            assert type(key) is type(next(k for k in loaded if k == key)), where
            assert_same(value, loaded[key], f"{where}[{key!r}]")
    elif isinstance(original, (list, tuple)):
        assert type(loaded) is type(original) and len(loaded) == len(original), where
        for index, (a, b) in enumerate(zip(original, loaded)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(original, np.ndarray):
        assert isinstance(loaded, np.ndarray) and loaded.dtype == original.dtype and loaded.shape == original.shape, where
        np.testing.assert_array_equal(loaded, original, err_msg=where)  # NaN matches NaN here
    elif isinstance(original, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and loaded.dtype == original.dtype and loaded.shape == original.shape, where
        np.testing.assert_array_equal(loaded.numpy(), original.detach().cpu().numpy(), err_msg=where)
    elif isinstance(original, (float, np.floating)):
        assert isinstance(loaded, float), where
        assert (math.isnan(original) and math.isnan(loaded)) or loaded == original, f"{where}: {loaded} != {original}"
    else:
        assert type(loaded) is type(original.item() if isinstance(original, np.generic) else original), where
        assert loaded == original, where


def non_finite_floats(value):
    """Every NaN / inf / -inf float (as "nan", "inf", "-inf") anywhere in `value`, arrays and
    tensors included."""
    if dataclasses.is_dataclass(value):
        return set().union(*(non_finite_floats(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, dict):
        return set().union(set(), *map(non_finite_floats, value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(set(), *map(non_finite_floats, value))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        return set()
    return {text for text, mask in (("nan", np.isnan(array)), ("inf", array == np.inf), ("-inf", array == -np.inf)) if mask.any()}


SAMPLER = GPRegressionSampler(dim=3, noise_std=0.1, bandwidth=0.7, input_std=1.0, condition_number=10.0)
LAM, STEP = 0.01, 0.9


@pytest.fixture(scope="module")
def diagnosis():
    """The row-sum Richardson construction on two task sets, with everything a diagnosis can hold:
    fitted steps (with heavy ball's momentum), the kernel alignment of both reference kernels,
    label sensitivities, kappa strata, intervals and an identified verdict."""
    model = richardson_transformer(n_steps=2, lam=LAM, bandwidth=0.7, step=STEP, dim=3)
    tasks = {"in distribution": SAMPLER.sample(24, 8, 3, seed=0), "shifted x2": SAMPLER.sample(24, 8, 3, seed=1)}
    tasks["shifted x2"].x_support *= 2
    tasks["shifted x2"].x_query *= 2
    return probes.diagnose(model, tasks, algorithms=("richardson_rowsum", "gd", "heavy_ball", "cg"), n_steps=4,
                           bootstrap=100, sensitivities=True, n_kappa_bins=2, progress=False)


@pytest.fixture(scope="module")
def loaded(diagnosis, tmp_path_factory):
    path = probes.save_diagnosis(diagnosis, tmp_path_factory.mktemp("archive") / "richardson")
    assert path.name == "richardson.npz"
    return probes.load_diagnosis(path)


def test_a_loaded_diagnosis_equals_the_original_field_by_field(diagnosis, loaded):
    result = diagnosis["in distribution"]
    assert result.verdict.identified and result.layer_sensitivities is not None and result.kernel_alignment is not None
    assert result.fitted_steps["heavy_ball"].momentum is not None and len(result.scores["gd"].strata) == 2
    assert "nan" in non_finite_floats(diagnosis)  # R2 at step 0 (infinities: the next test)
    assert_same(diagnosis, loaded)


def test_non_finite_values_of_every_sign_and_every_container_survive_in_the_settings(diagnosis, tmp_path):
    """The settings are a free dict: NaN, inf and -inf apart, tuples apart from lists, integer keys,
    NumPy scalars (as Python numbers), arrays of each dtype and float32 tensors."""
    settings = {
        "floats": (math.nan, math.inf, -math.inf, 0.1, -0.0),
        "nested": {1: [True, None, "text"], "k": {"deeper": ()}},
        "numpy scalars": [np.float32(0.25), np.int64(-3), np.bool_(True)],
        "arrays": [np.array([1, 2], dtype=np.int8), np.array([[np.nan, np.inf, -np.inf]]), np.zeros((0, 2), dtype=bool)],
        "tensor": torch.tensor([[1.5, -np.inf]], dtype=torch.float32),
    }
    path = probes.save_diagnosis(dataclasses.replace(diagnosis, settings=settings), tmp_path / "settings.npz")
    back = probes.load_diagnosis(path).settings
    assert_same(settings, back, "settings")
    assert [type(value) for value in back["numpy scalars"]] == [float, int, bool]
    assert back["floats"][4] == 0.0 and math.copysign(1.0, back["floats"][4]) == -1.0


def test_a_loaded_diagnosis_summarises_serialises_tabulates_and_compares_as_the_original(diagnosis, loaded):
    assert loaded.summary() == diagnosis.summary()
    assert loaded.to_json() == diagnosis.to_json()
    pd.testing.assert_frame_equal(loaded.to_dataframe(), diagnosis.to_dataframe())
    assert probes.compare({"saved": loaded, "fresh": diagnosis}).summary() == probes.compare({"saved": diagnosis, "fresh": diagnosis}).summary()
    assert sorted(loaded.plot()) == sorted(diagnosis.plot())
    plt.close("all")


def test_the_loaded_fitted_step_reruns_the_trajectory_the_diagnosis_stored(diagnosis, loaded):
    """The folds come back with the steps: each prompt's solver uses the other half's step, so
    the loaded fit's solver reproduces the stored row-sum Richardson predictions."""
    result, task = loaded["in distribution"], SAMPLER.sample(24, 8, 3, seed=0)
    x, xq = task.x_support.double(), task.x_query.double()
    K, K_query = kernel_matrix("gaussian", x, bandwidth=0.7), kernel_matrix("gaussian", xq, x, bandwidth=0.7)
    trajectory = result.fitted_steps["richardson_rowsum"].solver()(K, task.y_support.double(), result.lam, result.n_steps, K_query=K_query)
    np.testing.assert_allclose(trajectory.pred.numpy(), result.step_predictions["richardson_rowsum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(result.fitted_steps["gd"].folds, diagnosis["in distribution"].fitted_steps["gd"].folds)


def test_a_report_folder_and_an_overview_model_file_load_back_with_the_documented_keys_stored_once(diagnosis, tmp_path):
    index = diagnosis.save(tmp_path / "report")
    assert_same(diagnosis, probes.load_diagnosis(index.parent))
    write_overview_report([ModelEntry("rich/son", "the construction", diagnosis)], tmp_path / "overview", "t", {})
    model_file = tmp_path / "overview" / "rich_son.npz"
    assert_same(diagnosis, probes.load_diagnosis(model_file))
    plt.close("all")
    with np.load(model_file) as arrays:
        manifest = str(arrays[MANIFEST_KEY])
        np.testing.assert_array_equal(arrays["in distribution/layer_predictions"], diagnosis["in distribution"].layer_predictions)
        stored = [arrays[key] for key in arrays.files if key != MANIFEST_KEY]
    for name, result in diagnosis.task_sets.items():  # the predictions are referenced by their key, not stored twice
        assert json.dumps({"ndarray": f"{name}/layer_predictions"}) in manifest
        assert sum(array.shape == result.layer_predictions.shape and np.array_equal(array, result.layer_predictions) for array in stored) == 1


def test_loading_names_the_path_and_the_fix_when_the_file_is_not_a_diagnosis(diagnosis, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' is not a file: pass a file written by probes.save_diagnosis"):
        probes.load_diagnosis(tmp_path / "nowhere")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match=r"holds arrays but no diagnosis .*diagnose again \(Diagnosis.save, or rerun the mi-krr command\)"):
        probes.load_diagnosis(tmp_path / "plain.npz")
    path = probes.save_diagnosis(diagnosis, tmp_path / "d.npz")
    with np.load(path) as archive:
        contents = {key: archive[key] for key in archive.files}
    manifest = json.loads(str(contents[MANIFEST_KEY]))
    np.savez(tmp_path / "future.npz", **{**contents, MANIFEST_KEY: np.array(json.dumps({**manifest, "version": 99}))})
    with pytest.raises(ValueError, match="version 99; this mi-krr reads 'mi-krr diagnosis' version 1"):
        probes.load_diagnosis(tmp_path / "future.npz")


def test_loading_rebuilds_only_the_result_classes_and_refuses_any_other_name(diagnosis, tmp_path):
    path = probes.save_diagnosis(diagnosis, tmp_path / "d.npz")
    with np.load(path) as archive:
        contents = {key: archive[key] for key in archive.files}
    manifest = json.loads(str(contents[MANIFEST_KEY]))
    manifest["diagnosis"] = {"dataclass": "Popen", "fields": {"args": "true"}}
    np.savez(tmp_path / "other.npz", **{**contents, MANIFEST_KEY: np.array(json.dumps(manifest))})
    with pytest.raises(ValueError, match='other.npz\' has a manifest holding {"dataclass": "Popen".*which this mi-krr does not read'):
        probes.load_diagnosis(tmp_path / "other.npz")


def test_saving_names_the_field_that_holds_something_an_archive_cannot_store(diagnosis, tmp_path):
    with pytest.raises(TypeError, match=r"diagnosis.settings\['callback'\] is a function, which an archive does not store"):
        probes.save_diagnosis(dataclasses.replace(diagnosis, settings={"callback": lambda: None}), tmp_path / "x.npz")
    with pytest.raises(TypeError, match=r"diagnosis.settings\['objects'\] is an array of Python objects"):
        probes.save_diagnosis(dataclasses.replace(diagnosis, settings={"objects": np.array([None, 1])}), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="diagnosis must be a probes Diagnosis .*got dict"):
        probes.save_diagnosis({"a": 1}, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_an_interrupted_save_leaves_the_previous_archive_whole_and_no_partial_file(diagnosis, tmp_path, monkeypatch):
    path = probes.save_diagnosis(diagnosis, tmp_path / "d.npz")
    before = path.read_bytes()

    def interrupted(source, target):  # the new archive is written whole; the rename is cut off
        assert zipfile.is_zipfile(source)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probes.save_diagnosis(diagnosis, path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
