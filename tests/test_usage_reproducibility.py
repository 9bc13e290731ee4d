"""Usage review: reproducibility, persistence and devices / dtypes, as a researcher moving work
between notebooks, sessions and machines. Seeds (samplers, training, diagnose's bootstrap and
cross-fitting, ridge probes), checkpoints written by `mi_krr.train` read back, state dicts of every
model kind, `Diagnosis.save` re-read, float32 / float64 models and prompts, and `device=` given
as a name torch does not know, "cuda" on a machine without CUDA, or "meta".

References are independent of the code under test: bitwise equality with a second computation
(a fresh process, a fresh model loaded from a state dict, the file written to disk), NumPy KRR on
the prompts, and torch's own global generator. The review's findings are tested here as fixed:
diagnose's seed reaching the ridge probes, loaders leaving the global generator alone, a CG
construction's state dict refusing a build with other features, clear errors for save_model of a
model it cannot describe and for devices that cannot be used here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probes
from mi_krr.checkpoints import load_checkpoint, shipped_checkpoint, task_sets
from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig, model_from_config
from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler
from mi_krr.train import build_run, load_model, save_model, train

REPO = Path(__file__).resolve().parents[1]
GP = GPRegressionSampler(2, noise_std=0.2, bandwidth=0.5)
TINY = dict(n_dims=2, d_model=8, n_layers=2, n_heads=2)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _digest(task) -> str:
    """sha256 of the float64 bytes of a task's four tensors."""
    parts = (task.x_support, task.y_support, task.x_query, task.y_query)
    return hashlib.sha256(b"".join(t.detach().to(torch.float64).numpy().tobytes() for t in parts)).hexdigest()


def _tiny_run(seed: int, out_dir: Path, dtype: str = "float32") -> dict:
    return {
        "model": {"model_type": "ICLTransformer", **TINY, "attention": "softmax", "dtype": dtype},
        "sampler": GP.to_config(),
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "n_support": 5, "n_query": 2, "eval_every": 2,
                  "eval_prompts": 8, "checkpoint_every": 2, "seed": seed, "out_dir": str(out_dir)},
    }


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _tiny_model(seed: int = 0, **overrides) -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(ICLTransformerConfig(**TINY, **overrides)).eval()


def _numpy_gaussian_krr(task, bandwidth: float, lam: float) -> np.ndarray:
    """sum_j k(x*, x_j) alpha_j, alpha = (K + lam I)^-1 y, one np.linalg.solve per prompt, in float64."""
    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth**2))

    xs, ys, xq = (t.detach().to(torch.float64).numpy() for t in (task.x_support, task.y_support, task.x_query))
    return np.stack([k(q, x) @ np.linalg.solve(k(x, x) + lam * np.eye(len(x)), y) for x, y, q in zip(xs, ys, xq)])


# ---------------------------------------------------------------------------------------------
# Seeds: same seed, same bits (also in a fresh process); another seed, other results


def test_a_seeded_draw_is_bitwise_identical_in_a_fresh_process_and_another_seed_differs():
    """The prompts of seed 11 hashed in a fresh interpreter equal this process's (a notebook
    restarted the next day draws the same prompts); seed 12 gives others."""
    code = (
        "import hashlib, torch\n"
        "from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler\n"
        "for s in (GPRegressionSampler(2, noise_std=0.2, bandwidth=0.5), LinearRegressionSampler(3, noise_std=0.4, condition_number=10.0)):\n"
        "    t = s.sample(3, 5, 2, seed=11, dtype=torch.float64)\n"
        "    print(hashlib.sha256(b''.join(x.numpy().tobytes() for x in (t.x_support, t.y_support, t.x_query, t.y_query))).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    samplers = (GP, LinearRegressionSampler(3, noise_std=0.4, condition_number=10.0))
    here = [_digest(s.sample(3, 5, 2, seed=11, dtype=torch.float64)) for s in samplers]
    assert result.stdout.split() == here
    assert all(_digest(s.sample(3, 5, 2, seed=12, dtype=torch.float64)) != h for s, h in zip(samplers, here))


def test_float32_prompts_are_the_float64_draws_rounded():
    """Draws happen in float64 and are then cast (module docstring of mi_krr.tasks.samplers): the
    float32 task of a seed is the float64 task of that seed rounded, bit for bit."""
    for sampler in (GP, LinearRegressionSampler(4, noise_std=0.4, condition_number=5.0, input_mean=0.3)):
        low, high = sampler.sample(3, 6, 2, seed=5), sampler.sample(3, 6, 2, seed=5, dtype=torch.float64)
        for name in ("x_support", "y_support", "x_query", "y_query"):
            assert getattr(low, name).dtype == torch.float32
            assert torch.equal(getattr(low, name), getattr(high, name).to(torch.float32))


def test_training_is_bitwise_reproducible_and_the_saved_model_forwards_bitwise(tmp_path):
    """Two runs with train.seed 3 (float32, and a float64 model) end with identical weights; the
    model read back with load_model (folder and newest training state) predicts bit for bit what
    the trained model does; train.seed 4 gives other weights."""
    task = GP.sample(3, 5, 2, seed=9)
    for dtype in ("float32", "float64"):
        models = []
        for name, seed in (("a", 3), ("b", 3), ("c", 4)):
            run = build_run(_tiny_run(seed, tmp_path / f"{dtype}_{name}", dtype))
            train(run.model, run.sampler, run.cfg, progress=False)
            models.append(run.model.eval())
        a, b, c = models
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())
        for source in (tmp_path / f"{dtype}_a", tmp_path / f"{dtype}_a" / "state" / "step_00000004.safetensors"):
            loaded = load_model(source)
            assert next(loaded.parameters()).dtype == getattr(torch, dtype)
            assert torch.equal(loaded.predict(task), a.predict(task))


def test_diagnose_with_one_seed_twice_writes_the_same_json_and_another_seed_other_intervals():
    """Bootstrap resamples and cross-fitting halves are seeded: the same seed gives the same
    strict JSON (wall times aside), another seed other intervals and other halves; the halves
    split 20 prompts 10 / 10."""
    model, task = load_model(shipped_checkpoint("softmax_gp")), GP.sample(20, 10, 3, seed=1)
    kwargs = dict(progress=False, bootstrap=100, algorithms=("cg", "gd"), kernels=("exp",))

    def stripped(diagnosis):
        data = json.loads(diagnosis.to_json())
        for result in data["task_sets"].values():
            result.pop("seconds")
        return data

    first, again, other = (probes.diagnose(model, task, seed=seed, **kwargs) for seed in (3, 3, 4))
    assert stripped(first) == stripped(again)
    a, b = first["tasks"], other["tasks"]
    assert not np.array_equal(a.fitted_steps["gd"].folds, b.fitted_steps["gd"].folds)
    assert not np.array_equal(a.scores["cg"].score_samples, b.scores["cg"].score_samples, equal_nan=True)
    assert np.bincount(a.fitted_steps["gd"].folds).tolist() == [10, 10]


def test_adding_a_task_set_to_diagnose_leaves_the_other_sets_results_unchanged():
    """Every task set is scored with the same seed, so set "b" diagnosed alone or after set "a"
    gives the same statistics (the CLI diagnoses its first set and its shifts in two calls)."""
    from probes.diagnosis import _task_set_dict

    model = load_model(shipped_checkpoint("softmax_gp"))
    t1, t2 = GP.sample(20, 10, 3, seed=1), GP.sample(20, 10, 3, seed=2)
    kwargs = dict(progress=False, bootstrap=100, algorithms=("cg", "gd"), kernels=(), seed=7)
    both, alone = probes.diagnose(model, {"a": t1, "b": t2}, **kwargs), probes.diagnose(model, {"b": t2}, **kwargs)
    left, right = _task_set_dict(both["b"]), _task_set_dict(alone["b"])
    left.pop("seconds"), right.pop("seconds")
    assert json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def test_diagnose_seed_reaches_the_ridge_probes_validation_split():
    """diagnose's ridge lens should be `fit_layer_probes(model, train_task, seed=seed)`'s: the
    seed a user varies to check robustness should re-draw the probes' validation split too.
    Today diagnose(seed=1) equals fit_layer_probes(seed=0), whose predictions differ from
    seed=1's by up to ~1 on softmax_gp."""
    model = load_model(shipped_checkpoint("softmax_gp"))
    task, train_task = GP.sample(8, 12, 4, seed=2), GP.sample(24, 12, 4, seed=3)
    kwargs = dict(method="ridge", train_task=train_task, progress=False, bootstrap=0, algorithms=("cg",), kernels=(),
                  step_sizes="optimal", seed=1)
    lens = probes.diagnose(model, task, **kwargs)["tasks"].layer_predictions
    reference = probes.fit_layer_probes(model, train_task, seed=1).predict(model, task).numpy()
    np.testing.assert_array_equal(lens, reference)


@pytest.mark.parametrize("loader", [load_model, lambda path: load_checkpoint(path).model], ids=["load_model", "load_checkpoint"])
def test_loading_a_checkpoint_leaves_the_global_torch_generator_alone(loader):
    """`torch.manual_seed(0); model = load_model(run); task = sampler.sample(...)` (seed=None draws
    from the global generator) should draw what it draws without the load, as `build_run` is
    documented to ("without touching the global RNG"); today the load consumes the random init
    of a model whose weights it then replaces."""
    run = shipped_checkpoint("linear_lr")
    torch.manual_seed(0)
    loader(run)
    after_load = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(4))


def test_task_sets_draw_in_distribution_and_shifts_from_consecutive_seeds_reproducibly():
    """task_sets(seed=s): in-distribution prompts are sampler.sample(seed=s) as float32; a second
    call returns the same bits."""
    sets, _ = task_sets(GP, 3, 5, 2, seed=40)
    again, _ = task_sets(GP, 3, 5, 2, seed=40)
    assert _digest(sets["in_distribution"]) == _digest(GP.sample(3, 5, 2, seed=40))
    assert all(_digest(sets[name]) == _digest(again[name]) for name in sets)


# ---------------------------------------------------------------------------------------------
# Persistence: state dicts, torch.save, save_model, Diagnosis.save


CONSTRUCTIONS = {
    "cg": (lambda: cg_transformer(2, 0.1, dim=2), LinearRegressionSampler(2, noise_std=0.1)),
    "cg_relu": (lambda: cg_transformer(2, 0.1, dim=2, mlp="relu", mlp_width=64), LinearRegressionSampler(2, noise_std=0.1)),
    "richardson": (lambda: richardson_transformer(2, 0.1, 1.0, 0.5, dim=2), GPRegressionSampler(2, noise_std=0.1)),
    "gd": (lambda: gd_transformer(2, 0.1, dim=2), LinearRegressionSampler(2, noise_std=0.1)),
}


@pytest.mark.parametrize("overrides", [{}, {"attention": "linear"}, {"attention": "relu", "norm": "rmsnorm"},
                                       {"layout": "interleaved"}, {"dtype": "float64"}], ids=str)
def test_icl_transformer_state_dict_torch_save_and_save_model_round_trips_forward_bitwise(overrides, tmp_path):
    """torch.save(state_dict) into a freshly initialised model of another seed, torch.save of the
    whole model, and save_model / load_model all give the original layer predictions bit for bit."""
    model, task = _tiny_model(0, **overrides), GP.sample(2, 5, 2, seed=0)
    expected = probes.layer_predictions(model, task)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _tiny_model(1, **overrides)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(probes.layer_predictions(fresh, task), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(probes.layer_predictions(torch.load(buffer, weights_only=False), task), expected)
    loaded = load_model(save_model(tmp_path / "model.safetensors", model))
    assert torch.equal(probes.layer_predictions(loaded, task), expected)


@pytest.mark.parametrize("name", CONSTRUCTIONS)
def test_construction_state_dicts_and_pickles_round_trip_step_predictions_bitwise(name):
    """A construction's state dict loaded into a fresh build, and torch.save of the whole model,
    reproduce its per-step predictions bit for bit (float64 prompts)."""
    build, sampler = CONSTRUCTIONS[name]
    model, task = build(), sampler.sample(2, 5, 2, seed=0, dtype=torch.float64)
    expected = model.step_states(task).pred
    fresh = build()
    fresh.load_state_dict(_weights(model))
    assert torch.equal(fresh.step_states(task).pred, expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False).step_states(task).pred, expected)


def test_cg_construction_state_dict_refuses_a_build_with_another_random_feature_map():
    """cg_transformer(kernel="exp", head_width=8, seed=0)'s state dict (what `mi-krr construct
    --save` writes) loaded with strict=True into the seed-1 build used to report "All keys matched"
    and then predict with seed 1's features (2.4 away on these prompts). It must refuse, naming
    the rebuild; into a same-seed build it loads and predicts the saved model bit for bit."""
    task = GPRegressionSampler(2, kernel="exp", noise_std=0.1).sample(2, 6, 2, seed=11, dtype=torch.float64)
    saved = cg_transformer(3, 0.1, dim=2, kernel="exp", head_width=8, seed=0)
    other = cg_transformer(3, 0.1, dim=2, kernel="exp", head_width=8, seed=1)
    assert not torch.allclose(other.step_states(task).pred, saved.step_states(task).pred)
    with pytest.raises(ValueError, match="other embedding features .* rebuild it with the saved arguments"):
        other.load_state_dict(_weights(saved), strict=True)
    same = cg_transformer(3, 0.1, dim=2, kernel="exp", head_width=8, seed=0)
    same.load_state_dict(_weights(saved), strict=True)
    assert torch.equal(same.step_states(task).pred, saved.step_states(task).pred)


def test_a_bridge_model_moved_to_float64_saves_and_reloads_as_float64_bitwise(tmp_path):
    """save_model records the weights' dtype: a bridge moved with .to(torch.float64) reloads as
    float64 and predicts bit for bit what it did."""
    torch.manual_seed(0)
    model = BridgeICLModel(ICLTransformerConfig(**TINY)).eval().to(torch.float64)
    task = GP.sample(2, 5, 2, seed=0, dtype=torch.float64)
    loaded = load_model(save_model(tmp_path / "bridge.safetensors", model))
    assert type(loaded) is BridgeICLModel and next(loaded.parameters()).dtype == torch.float64
    assert torch.equal(probes.layer_predictions(loaded, task), probes.layer_predictions(model, task))


@pytest.mark.parametrize("model", [lambda: cg_transformer(1, 0.1, dim=2), lambda: torch.nn.Linear(2, 1)], ids=["cg", "linear"])
def test_save_model_of_a_model_it_cannot_describe_is_a_one_line_value_error(model, tmp_path):
    """save_model writes mi-krr models rebuilt from `config_dict()`; a construction or a plain
    module should get a ValueError naming what it needs (as `train` does for the same model),
    not an AttributeError from inside."""
    with pytest.raises(ValueError, match="config_dict"):
        save_model(tmp_path / "model.safetensors", model())


def test_diagnosis_save_writes_the_in_memory_arrays_and_scores(tmp_path):
    """Diagnosis.save: arrays.npz holds the layer and KRR predictions bit for bit, diagnosis.json
    every path R2 as the same float (JSON floats round-trip exactly)."""
    model, task = load_model(shipped_checkpoint("softmax_gp")), GP.sample(20, 10, 3, seed=1)
    diagnosis = probes.diagnose(model, {"in distribution": task}, progress=False, bootstrap=100, algorithms=("cg", "gd"),
                                kernels=(), seed=0)
    diagnosis.save(tmp_path)
    result = diagnosis["in distribution"]
    arrays = np.load(tmp_path / "arrays.npz")
    assert np.array_equal(arrays["in distribution/layer_predictions"], result.layer_predictions)
    assert np.array_equal(arrays["in distribution/krr_predictions"], result.krr_predictions)
    back = json.loads((tmp_path / "diagnosis.json").read_text())["task_sets"]["in distribution"]
    for name, score in result.scores.items():
        stored = back["scores"][name]["score"]
        assert (stored is None and not np.isfinite(score.score)) or stored == score.score


# ---------------------------------------------------------------------------------------------
# dtypes


def test_krr_reference_is_float64_numpy_krr_on_the_prompts_the_model_sees():
    """diagnose's KRR predictions on the float32 softmax_gp model (float32 or float64 prompts) and
    on a float64 copy (float64 prompts) equal NumPy KRR in float64 on the prompts cast to the
    model's dtype, to 1e-12; the two float32-model diagnoses are identical."""
    model = load_model(shipped_checkpoint("softmax_gp"))
    kwargs = dict(progress=False, bootstrap=0, algorithms=("cg",), kernels=(), step_sizes="optimal", lam=0.04)
    task64 = GP.sample(4, 10, 3, seed=5, dtype=torch.float64)
    r32 = probes.diagnose(model, task64.to(dtype=torch.float32), **kwargs)["tasks"]
    r32_64 = probes.diagnose(model, task64, **kwargs)["tasks"]
    r64 = probes.diagnose(model.to(torch.float64), task64, **kwargs)["tasks"]
    assert r32.krr_predictions.dtype == np.float64
    np.testing.assert_allclose(r32.krr_predictions, _numpy_gaussian_krr(task64.to(dtype=torch.float32), 0.5, 0.04), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r64.krr_predictions, _numpy_gaussian_krr(task64, 0.5, 0.04), rtol=0, atol=1e-12)
    assert np.array_equal(r32.layer_predictions, r32_64.layer_predictions)
    assert np.array_equal(r32.krr_predictions, r32_64.krr_predictions)


@pytest.mark.parametrize("kind", ["icl", "bridge"])
def test_moving_an_attached_model_to_float64_probes_it_in_float64(kind):
    """attach, then model.to(torch.float64): the attached probes read the float64 model, exactly
    as a model built in float64 with the same weights is read."""
    cls = ICLTransformer if kind == "icl" else BridgeICLModel
    torch.manual_seed(0)
    model = cls(ICLTransformerConfig(**TINY)).eval()
    task = GP.sample(3, 5, 2, seed=0, dtype=torch.float64)
    attached = probes.attach(model)
    before = attached.layer_predictions(task)
    model.to(torch.float64)
    after = attached.layer_predictions(task)
    built64 = cls(ICLTransformerConfig(**TINY, dtype="float64")).eval()
    built64.load_state_dict(model.state_dict())
    assert torch.equal(after, probes.layer_predictions(built64, task))
    assert 0 < (after - before).abs().max() < 1e-4  # float32 rounding, no more


# ---------------------------------------------------------------------------------------------
# device= arguments


def test_device_as_a_string_or_a_torch_device_gives_the_same_bits():
    """"cpu" and torch.device("cpu") are the same device to samplers and loaders."""
    run = shipped_checkpoint("softmax_gp")
    assert _digest(GP.sample(2, 4, 1, seed=3, device="cpu")) == _digest(GP.sample(2, 4, 1, seed=3, device=torch.device("cpu")))
    task = GP.sample(2, 4, 1, seed=3)
    assert torch.equal(load_model(run, device="cpu").predict(task), load_model(run, device=torch.device("cpu")).predict(task))


UNKNOWN_DEVICE_BUILDERS = {
    "load_model": lambda device: load_model(shipped_checkpoint("softmax_gp"), device=device),
    "load_checkpoint": lambda device: load_checkpoint(shipped_checkpoint("softmax_gp"), device=device),
    "ICLTransformer": lambda device: ICLTransformer(ICLTransformerConfig(**TINY), device=device),
    "BridgeICLModel": lambda device: BridgeICLModel(ICLTransformerConfig(**TINY), device=device),
    "model_from_config": lambda device: model_from_config({"model_type": "ICLTransformer", **ICLTransformerConfig(**TINY).to_dict()}, device=device),
}


@pytest.mark.parametrize("build", UNKNOWN_DEVICE_BUILDERS.values(), ids=UNKNOWN_DEVICE_BUILDERS.keys())
def test_an_unknown_device_name_is_refused_naming_the_argument(build):
    """Samplers, constructions and TrainConfig answer device="gpu" with "device must be a torch
    device such as 'cpu' or 'cuda'"; the loaders and model classes should too."""
    with pytest.raises(ValueError, match="device"):
        build("gpu")


CUDA_BUILDERS = {
    "sample": lambda: GP.sample(2, 4, 1, seed=0, device="cuda"),
    "load_model": lambda: load_model(shipped_checkpoint("softmax_gp"), device="cuda"),
    "ICLTransformer": lambda: ICLTransformer(ICLTransformerConfig(**TINY), device="cuda"),
    "cg_transformer": lambda: cg_transformer(1, 0.1, dim=2, device="cuda"),
}


@NO_CUDA
@pytest.mark.parametrize("build", CUDA_BUILDERS.values(), ids=CUDA_BUILDERS.keys())
def test_cuda_on_a_machine_without_it_is_a_value_error_naming_device(build):
    """The command line answers --device cuda here with one line naming --device and the fix
    (`mi_krr.cli._check_device`); the Python API should say as much about device=."""
    with pytest.raises(ValueError, match="device"):
        build()


META_BUILDERS = {
    "sample": lambda: GP.sample(2, 4, 1, seed=0, device="meta"),
    "load_model": lambda: load_model(shipped_checkpoint("softmax_gp"), device="meta"),
    "load_checkpoint": lambda: load_checkpoint(shipped_checkpoint("softmax_gp"), device="meta"),
}


@pytest.mark.parametrize("build", META_BUILDERS.values(), ids=META_BUILDERS.keys())
def test_meta_device_is_refused_where_values_are_needed(build):
    """load_model(path, device="meta") returns a model whose loaded weights are gone (its first
    use raises deep inside); sample(device="meta") fails inside ICLTask. Both should be the
    CLI's one-line refusal: meta tensors hold no values to compute with."""
    with pytest.raises(ValueError, match="meta"):
        build()
