"""Usage review: persistence and process boundaries, as a researcher who saves objects, reloads them
in another session and fans work out to worker processes.

Covered: pickle / `torch.save(obj)` + `torch.load(weights_only=False)` / `copy.deepcopy` of the
objects a user holds (ICLTask and its `.to` copies, samplers, solver `Trajectory`s, ICLTransformer of
each attention kind and dtype, BridgeICLModel, the three constructions, a Garg-format checkpoint,
probe results: Diagnosis, KernelAlignment, AttentionKernels, LayerProbes, StreamedProbes,
Comparison); a model pickled together with its optimizer; `save_model` / `load_model` on the paths
and objects a user passes; `load_construction` on damaged folders; `probes.layer_predictions` and
`probes.diagnose` mapped over models in `ProcessPoolExecutor` workers (spawn and fork, models passed
pickled or rebuilt from `config_dict()` + `state_dict()`).

References, independent of the code under test: the in-memory original (its own predictions,
weights, flags and fields) compared through a recursive equality written here (classes field by
field, container types and key order, tensor / array dtype, shape, device, requires_grad and bits,
NaN where NaN); torch's global generator state before and after; the identity of the tensors an
optimizer holds; one SGD step applied to the original in process.

The review (session 21) found eleven problems, all fixed: a Garg-format model did not pickle; a
BridgeICLModel pickled with its optimizer came back with new parameters (the optimizer then trained
orphans), a subclass did not unpickle and a bfloat16 one did not pickle (all: the bridge models now
pickle their class, its constructor arguments and their very parameter objects); `save_model` wrote
`.pt` names `load_model` reads as torch pickles, subclasses `load_model` cannot rebuild, and raw
errors for a folder or a non-JSON `run_config` (all now refused at save time, naming the fix);
`load_construction` named no file on damaged folders; `ICLTask.to`'s docstring promised a copy
(it now says what Tensor.to does) and `task.to(torch.float64)` advised passing a device.

Note on fork pools: a fork after any multi-threaded torch op in the parent deadlocks the child's
first parallel op (plain torch reproduces it: libgomp is not fork-safe); this suite's conftest runs
torch on one thread, so fork is safe here. Researchers need spawn, or one thread before forking.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import io
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

import probes
from mi_krr import solvers
from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, load_garg_checkpoint, model_from_config
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import load_model, save_model

GP = GPRegressionSampler(2, noise_std=0.1)
LINEAR = LinearRegressionSampler(2, noise_std=0.1)
TINY = dict(n_dims=2, d_model=16, n_layers=2, n_heads=2)
SMALL_DIAGNOSIS = dict(bootstrap=30, progress=False, n_steps=3, algorithms=("cg", "gd"))


# ---------------------------------------------------------------- independent references


def differences(original, copied, where="x"):
    """Every place where `copied` differs from `original` (empty when equal)."""
    if dataclasses.is_dataclass(original) and not isinstance(original, type):
        if type(copied) is not type(original):
            return [f"{where}: {type(original).__name__} became {type(copied).__name__}"]
        return [d for f in dataclasses.fields(original) for d in differences(getattr(original, f.name), getattr(copied, f.name), f"{where}.{f.name}")]
    if isinstance(original, dict):
        if type(copied) is not type(original) or list(copied) != list(original):
            return [f"{where}: keys {list(original)} became {copied!r:.80}"]
        return [d for key in original for d in differences(original[key], copied[key], f"{where}[{key!r}]")]
    if isinstance(original, (list, tuple, frozenset, set)):
        if type(copied) is not type(original) or len(copied) != len(original):
            return [f"{where}: {type(original).__name__} of {len(original)} became {copied!r:.80}"]
        if isinstance(original, (set, frozenset)):
            return [] if copied == original else [f"{where}: set changed"]
        return [d for i, (a, b) in enumerate(zip(original, copied)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(original, torch.Tensor):
        if not isinstance(copied, torch.Tensor) or (original.dtype, original.shape, original.device, original.requires_grad) != (
            copied.dtype, copied.shape, copied.device, copied.requires_grad
        ):
            return [f"{where}: tensor metadata changed"]
        a, b = original.detach(), copied.detach()
        same = torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) if a.is_floating_point() else torch.equal(a, b)
        return [] if same else [f"{where}: tensor values changed"]
    if isinstance(original, np.ndarray):
        if not isinstance(copied, np.ndarray) or (original.dtype, original.shape) != (copied.dtype, copied.shape):
            return [f"{where}: array metadata changed"]
        return [] if np.array_equal(original, copied, equal_nan=original.dtype.kind in "fc") else [f"{where}: array values changed"]
    if isinstance(original, float) and np.isnan(original):
        return [] if isinstance(copied, float) and np.isnan(copied) else [f"{where}: NaN became {copied!r}"]
    if type(copied) is not type(original) or copied != original:
        return [f"{where}: {original!r:.60} became {copied!r:.60}"]
    return []


def round_trips(obj):
    """(name, copy) for pickle, torch.save + torch.load(weights_only=False) and copy.deepcopy."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return [("pickle", pickle.loads(pickle.dumps(obj))), ("torch.save", torch.load(buffer, weights_only=False)),
            ("deepcopy", copy.deepcopy(obj))]


def model_state(model):
    """What a copy must keep: class, mode, every parameter's dtype / device / flag / bits, the
    buffers' bits, and which parameters are shared (by position in the named listing)."""
    named = list(model.named_parameters(remove_duplicate=False))
    first = {}
    sharing = [first.setdefault(id(p), i) for i, (_, p) in enumerate(named)]
    return {"class": type(model).__name__, "training": model.training, "sharing": sharing,
            "parameters": {name: p for name, p in named}, "buffers": dict(model.named_buffers())}


def tiny_garg_run(folder):
    """A Garg et al. run folder (config.yaml + state.pt) written from plain HF modules."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    section = {"family": "gpt2", "n_dims": 2, "n_positions": 8, "n_embd": 16, "n_layer": 2, "n_head": 2}
    backbone = GPT2Model(GPT2Config(n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, use_cache=False))
    state = {f"_backbone.{k}": v for k, v in backbone.state_dict().items()}
    read_in, read_out = torch.nn.Linear(2, 16), torch.nn.Linear(16, 1)
    state.update({f"_read_in.{k}": v for k, v in read_in.state_dict().items()})
    state.update({f"_read_out.{k}": v for k, v in read_out.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": section, "training": {"task": "linear_regression"}}))
    torch.save({"model_state_dict": state, "train_step": 7}, folder / "state.pt")
    return folder


# ---------------------------------------------------------------- worker functions (importable by spawn)


def _worker_layer_predictions(model, task):
    return probes.layer_predictions(model, task), torch.get_num_threads(), os.getpid()


def _worker_rebuild_and_predict(description, state, task):
    with torch.random.fork_rng(devices=[]):
        model = model_from_config(description)
    model.load_state_dict(state)
    return probes.layer_predictions(model.eval(), task)


def _worker_diagnose(model, task):
    return probes.diagnose(model, {"in distribution": task}, **SMALL_DIAGNOSIS)


def _single_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------- round trips of what a user holds


def test_tasks_samplers_and_trajectories_round_trip_field_for_field_and_copied_samplers_draw_the_same_prompts():
    task = GP.sample(3, 5, 2, seed=4)
    features = np.random.default_rng(0).normal(size=(2, 5, 9))
    K = torch.tensor(features @ features.transpose(0, 2, 1) / 9)  # [2, 5, 5] SPD, float64
    y = torch.tensor(np.random.default_rng(1).normal(size=(2, 5)))
    objects = [task, task.to(dtype=torch.float64), task.select([2, 0]), solvers.cg(K, y, 0.1, 3, K_query=K[:, :2]),
               solvers.richardson(K, y, 0.1, 3, step=0.05), solvers.heavy_ball(K, y, 0.1, 3)]
    for obj in objects:
        for how, back in round_trips(obj):
            assert not differences(obj, back), (type(obj).__name__, how, differences(obj, back))
    for sampler in (GP, LINEAR, GPRegressionSampler(3, kernel="exp", noise_std=0.2, condition_number=10.0)):
        for how, back in round_trips(sampler):
            assert back == sampler, how
            assert not differences(sampler.sample(2, 4, 2, seed=9), back.sample(2, 4, 2, seed=9)), how


MODELS = {
    "softmax": lambda: ICLTransformer(ICLTransformerConfig(**TINY)),
    "linear": lambda: ICLTransformer(ICLTransformerConfig(**TINY, attention="linear")),
    "relu_float64": lambda: ICLTransformer(ICLTransformerConfig(**TINY, attention="relu", dtype="float64")),
    "bridge": lambda: BridgeICLModel(ICLTransformerConfig(**TINY)),
    "cg_exp_features": lambda: cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=3),
    "richardson_relu": lambda: richardson_transformer(2, 0.1, 1.0, 0.5, dim=2, mlp="relu", mlp_width=16),
    "gd": lambda: gd_transformer(2, 0.1, lam=0.05, dim=2),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_copy_keeps_mode_flags_sharing_and_bits_and_leaves_the_global_generator_alone(name):
    """Each model in train mode with one parameter frozen (constructions: all frozen as built):
    pickle, torch.save and deepcopy give the same mode, requires_grad flags, dtypes, shared
    parameters, buffers (a construction's feature fingerprint) and layer predictions, and neither
    copying nor unpickling draws from torch's global generator."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    first = next(model.parameters())
    if first.requires_grad:
        first.requires_grad_(False)
    task = GP.sample(2, 5, 2, seed=1, dtype=next(model.parameters()).dtype)
    expected, state = probes.layer_predictions(model, task), model_state(model)
    generator = torch.random.get_rng_state()
    copies = round_trips(model)
    assert torch.equal(torch.random.get_rng_state(), generator)
    for how, back in copies:
        assert not differences(state, model_state(back)), (how, differences(state, model_state(back))[:3])
        assert torch.equal(probes.layer_predictions(back, task), expected), how


def test_probe_results_round_trip_field_for_field_and_compute_the_same_after():
    """Diagnosis (kernel alignment, fitted steps), AttentionKernels, KernelAlignment, LayerProbes,
    StreamedProbes and Comparison come back field for field; a copied LayerProbes predicts held-out
    prompts bit for bit and a copied diagnosis prints the same summary and compares the same."""
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(**TINY)).eval()
    task, held_out = GP.sample(16, 6, 2, seed=0), GP.sample(4, 6, 2, seed=1)
    diagnosis = probes.diagnose(model, task, bootstrap=30, progress=False, n_steps=3, algorithms=("cg", "gd", "richardson_rowsum"))
    results = {
        "diagnosis": diagnosis,
        "attention": probes.attention_kernels(model, task),
        "alignment": probes.kernel_alignment(model, task),
        "ridge_probes": probes.fit_layer_probes(model, task),
        "streamed": probes.stream_probes(model, model.encode(task), layers=[0, 1, 2], blocks=("support", "query")),
        "comparison": probes.compare({"a": diagnosis, "b": diagnosis}),
    }
    assert diagnosis["tasks"].kernel_alignment is not None and diagnosis["tasks"].fitted_steps
    for name, result in results.items():
        for how, back in round_trips(result):
            assert not differences(result, back), (name, how, differences(result, back)[:3])
            if name == "ridge_probes":
                assert torch.equal(back.predict(model, held_out), result.predict(model, held_out))
            if name == "diagnosis":
                assert back.summary() == result.summary()
                assert probes.compare({"a": back, "b": result}).summary() == results["comparison"].summary()


def test_a_garg_checkpoint_pickles_and_its_copy_predicts_the_same(tmp_path):
    model = load_garg_checkpoint(tiny_garg_run(tmp_path / "garg"))
    task = LINEAR.sample(2, 5, 2, seed=3)
    expected = probes.layer_predictions(model, task)
    generator = torch.random.get_rng_state()
    for how, back in round_trips(model):
        assert type(back) is type(model) and back.source == model.source and back.garg_config == model.garg_config, how
        assert torch.equal(probes.layer_predictions(back, task), expected), how
    assert torch.equal(torch.random.get_rng_state(), generator)


@pytest.mark.parametrize("name", [
    "softmax",
    "bridge",
])
def test_a_model_saved_with_its_optimizer_still_trains_through_that_optimizer(name):
    """torch.save({"model": model, "optimizer": optimizer}) and back: the optimizer must hold the
    loaded model's parameters, so one SGD step moves the loaded model as it moves the original."""
    torch.manual_seed(0)
    model = MODELS[name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = io.BytesIO()
    torch.save({"model": model, "optimizer": optimizer}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    task = GP.sample(4, 5, 2, seed=2)
    for pair in ({"model": model, "optimizer": optimizer}, loaded):
        pair["optimizer"].zero_grad()
        pair["model"].training_predictions(task).mse().backward()
        pair["optimizer"].step()
    for (key, after), (_, reference) in zip(loaded["model"].state_dict().items(), model.state_dict().items()):
        assert torch.equal(after, reference), key


class ProbeReadyBridge(BridgeICLModel):
    """A user's subclass (at module level: pickle names classes by where they are defined)."""


def test_a_subclass_of_bridge_model_unpickles_as_itself():
    model = ProbeReadyBridge(ICLTransformerConfig(**TINY)).eval()
    back = pickle.loads(pickle.dumps(model))  # ICLTransformer subclasses come back as themselves
    assert type(back) is ProbeReadyBridge
    task = GP.sample(2, 5, 2, seed=0)
    assert torch.equal(probes.layer_predictions(back, task), probes.layer_predictions(model, task))


def test_a_bfloat16_bridge_model_pickles_like_a_bfloat16_icl_transformer():
    model = BridgeICLModel(ICLTransformerConfig(**TINY)).to(torch.bfloat16)
    back = pickle.loads(pickle.dumps(model))
    assert not differences(model_state(model), model_state(back))


def test_a_task_moved_to_where_it_already_is_shares_its_tensors_as_documented_and_a_new_info():
    """ICLTask.to's docstring (fixed in this review: it said "a copy"): as with Tensor.to, tensors
    already in place are the same tensors; the info dict is the task's own."""
    task = GP.sample(2, 4, 2, seed=0)
    moved = task.to("cpu")
    assert moved.y_support is task.y_support and moved.info == task.info and moved.info is not task.info
    assert task.to(dtype=torch.float64).y_support.data_ptr() != task.y_support.data_ptr()


def test_task_to_with_a_dtype_in_first_position_names_dtype():
    task = GP.sample(2, 4, 2, seed=0)
    try:
        moved = task.to(torch.float64)
    except ValueError as error:
        assert "dtype=" in str(error)
    else:
        assert moved.dtype == torch.float64


# ---------------------------------------------------------------- save_model / load_model / load_construction


def test_save_model_to_a_pt_name_is_refused_when_saved_naming_a_safetensors_path(tmp_path):
    """load_model reads .pt files as torch state dicts, so save_model (safetensors) refuses the name
    it could not read back, suggesting one it can; nothing is written."""
    model = ICLTransformer(ICLTransformerConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"path must name a safetensors file .*model\.safetensors"):
        save_model(tmp_path / "model.pt", model)
    assert list(tmp_path.iterdir()) == []


def test_save_model_of_a_subclass_loads_back_or_is_refused_when_saved(tmp_path):
    class MyTransformer(ICLTransformer):
        pass

    model = MyTransformer(ICLTransformerConfig(**TINY)).eval()
    try:
        path = save_model(tmp_path / "model.safetensors", model)
    except ValueError as error:
        assert "MyTransformer" in str(error)
        return
    task = GP.sample(2, 5, 2, seed=0)
    assert torch.equal(probes.layer_predictions(load_model(path), task), probes.layer_predictions(model, task))


def test_save_model_into_an_existing_folder_is_readable_or_a_value_error_naming_a_file_path(tmp_path):
    model = ICLTransformer(ICLTransformerConfig(**TINY)).eval()
    folder = tmp_path / "run"
    folder.mkdir()
    try:
        save_model(folder, model)
    except ValueError as error:
        assert str(folder) in str(error) and ".tmp" not in str(error)
    else:
        task = GP.sample(2, 5, 2, seed=0)
        assert torch.equal(probes.layer_predictions(load_model(folder), task), probes.layer_predictions(model, task))


def test_save_model_with_a_non_json_run_config_names_run_config(tmp_path):
    model = ICLTransformer(ICLTransformerConfig(**TINY))
    with pytest.raises(ValueError, match="run_config"):
        save_model(tmp_path / "model.safetensors", model, run_config={"lr_schedule": torch.tensor([1.0, 0.5])})
    assert not (tmp_path / "model.safetensors").exists()


def _saved_construction(tmp_path):
    from mi_krr.cli import main

    out = tmp_path / "gd"
    assert main(["construct", "gd", "--steps", "2", "--dim", "2", "--n-support", "5", "--batch", "2", "--save", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage", ["json_without_arguments", "json_cut", "weights_cut"])
def test_load_construction_of_a_damaged_folder_is_a_value_error_naming_the_file(damage, tmp_path, capsys):
    from mi_krr.commands.construct import load_construction

    out = _saved_construction(tmp_path)
    capsys.readouterr()
    if damage == "json_without_arguments":
        (out / "construction.json").write_text(json.dumps({"command": "mi-krr construct"}))
        name = "construction.json"
    elif damage == "json_cut":
        text = (out / "construction.json").read_text()
        (out / "construction.json").write_text(text[: len(text) // 2])
        name = "construction.json"
    else:
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[:100])
        name = "model.safetensors"
    with pytest.raises(ValueError, match=name):
        load_construction(out)


# ---------------------------------------------------------------- worker processes


@pytest.fixture(scope="module")
def worker_inputs():
    torch.manual_seed(0)
    models = {"softmax": ICLTransformer(ICLTransformerConfig(**TINY)).eval(), "bridge": BridgeICLModel(ICLTransformerConfig(**TINY)).eval(),
              "cg": cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=3)}
    task = GP.sample(12, 6, 2, seed=0)
    return models, task


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_probes_in_worker_processes_equal_the_in_process_results(context, worker_inputs):
    """Two workers map probes.layer_predictions over pickled models (ICLTransformer, BridgeICLModel,
    a CG construction with random features), rebuild models from config_dict() + state_dict(), and
    run probes.diagnose: every result equals the in-process one bit for bit (spawn workers run
    torch's default thread count, this process one thread)."""
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method on this platform")
    models, task = worker_inputs
    expected = {name: probes.layer_predictions(model, task) for name, model in models.items()}
    expected_diagnosis = probes.diagnose(models["softmax"], {"in distribution": task}, **SMALL_DIAGNOSIS)
    rebuildable = {name: models[name] for name in ("softmax", "bridge")}
    initializer = _single_thread if context == "fork" else None  # see the module docstring
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(context), initializer=initializer) as pool:
        passed = {name: pool.submit(_worker_layer_predictions, model, task) for name, model in models.items()}
        rebuilt = {name: pool.submit(_worker_rebuild_and_predict, model.config_dict(), model.state_dict(), task)
                   for name, model in rebuildable.items()}
        diagnosis = pool.submit(_worker_diagnose, models["softmax"], task).result()
        passed = {name: future.result() for name, future in passed.items()}
        rebuilt = {name: future.result() for name, future in rebuilt.items()}
    assert {pid for _, _, pid in passed.values()} - {os.getpid()}, "ran in this process"
    for name, (predictions, _, _) in passed.items():
        assert torch.equal(predictions, expected[name]), name
    for name, predictions in rebuilt.items():
        assert torch.equal(predictions, expected[name]), name
    diagnosis["in distribution"].seconds.clear(), expected_diagnosis["in distribution"].seconds.clear()
    assert not differences(expected_diagnosis, diagnosis), differences(expected_diagnosis, diagnosis)[:3]
