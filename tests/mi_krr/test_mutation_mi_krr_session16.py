"""Checks written from mutation-testing survivors of session 16's changes: check_device's meta,
TypeError and multi-line-reason paths and `available=False` (TrainConfig) against training's own
check, TrainConfig's eval_seed range, load_checkpoint / load_garg_checkpoint refusing a device
before touching the path, construction_keywords and load_construction (the saved weights are what
is loaded, on the device asked for), the CG construction's feature fingerprint (another head
width, joint prompt features, a 1% temperature change, older state dicts, a float32 move, a
parent module), the derived seeds of width_study / conditioned_linear_task / diagnose /
richardson_profile, an unseeded draw's seed range, derived_seed's low 32 bits, the Richardson
profile's best curves, the width study's title and the Garg loader leaving the global generator
alone. References are NumPy (SeedSequence), torch's own generators and hand-built inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from mi_krr._validation import check_device
from mi_krr.cli import main
from mi_krr.train import TrainConfig

# A CUDA device this machine cannot use: "cuda:0" without CUDA, one past the last GPU with it.
UNAVAILABLE = f"cuda:{torch.cuda.device_count()}"


class Stop(BaseException):
    """Raised by a spy to end a command once it has recorded what it needs (no `except Exception`
    in the code under test catches it)."""


# ----- _validation.check_device / TrainConfig / train ------------------------------------------
def test_train_config_refuses_meta_but_keeps_a_gpu_this_machine_lacks():
    """TrainConfig checks its device with available=False (a run config may be written for a GPU
    box): "cuda:N" past this machine's GPUs is kept as given, but "meta" (no values to train)
    is still a ValueError naming meta."""
    assert TrainConfig(device=UNAVAILABLE).device == UNAVAILABLE
    with pytest.raises(ValueError, match="device 'meta' cannot be used here \\(meta tensors hold no values"):
        TrainConfig(device="meta")


def test_training_refuses_a_config_device_this_machine_lacks_naming_cfg_device():
    """TrainConfig(device=UNAVAILABLE) is accepted, so train() must refuse it itself, before any
    step, with a ValueError naming cfg.device (not torch's assertion from deep inside)."""
    from mi_krr.models import ICLTransformer, ICLTransformerConfig
    from mi_krr.tasks import LinearRegressionSampler
    from mi_krr.train import train

    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=1))
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=0, n_support=3, n_query=1, device=UNAVAILABLE)
    with pytest.raises(ValueError, match=f"cfg.device '{UNAVAILABLE}' cannot be used here"):
        train(model, LinearRegressionSampler(2), cfg, progress=False)



def test_train_config_eval_seed_is_a_seed_in_0_to_2_32():
    """eval_seed seeds the held-out prompts as seed seeds training: 2**32 - 1 is kept, 2**32 (which
    torch's CPU generator would take as 0) is a ValueError naming eval_seed and the range."""
    assert TrainConfig(eval_seed=2**32 - 1).eval_seed == 2**32 - 1
    with pytest.raises(ValueError, match=r"eval_seed must be an integer in \[0, 2\*\*32\)"):
        TrainConfig(eval_seed=2**32)

@pytest.mark.parametrize("value", [1.5, ["cpu"]], ids=["float", "list"])
def test_a_device_of_the_wrong_type_is_a_value_error_naming_it(value):
    """torch.device(1.5) raises TypeError (not RuntimeError): check_device must still answer
    with its one-line ValueError naming the argument and the fix."""
    with pytest.raises(ValueError, match=r"^device .* cannot be used here \(not a torch device name.*pass e.g. 'cpu'$"):
        check_device("device", value)


def test_an_unusable_device_reason_is_the_first_line_of_torchs_error(monkeypatch):
    """CUDA errors run over several lines ("invalid device ordinal\\nCUDA kernel errors might
    be ..."): the reason quoted is the first line only, hand-built here with a fake torch.empty."""
    def fake_empty(*args, **kwargs):
        raise RuntimeError("first line of the error\nsecond line with advice")

    monkeypatch.setattr(torch, "empty", fake_empty)
    with pytest.raises(ValueError) as info:
        check_device("device", "cpu")
    assert str(info.value) == "device 'cpu' cannot be used here (first line of the error): pass e.g. 'cpu'"



# ----- tasks/samplers.py: seed=None --------------------------------------------------------------
def test_an_unseeded_draw_records_a_seed_from_the_whole_range_drawn_from_the_global_generator():
    """sample(seed=None) takes its seed from torch's global generator as randint(0, 2**32) (torch
    itself as the reference, after the same manual_seed), records it in info["seed"], and the
    prompts are those of that seed; over 8 global seeds some recorded seed exceeds 2**16."""
    from mi_krr.tasks import LinearRegressionSampler

    sampler, recorded = LinearRegressionSampler(2), []
    for global_seed in range(8):
        torch.manual_seed(global_seed)
        expected = int(torch.randint(0, 2**32, (1,)).item())
        torch.manual_seed(global_seed)
        task = sampler.sample(2, 3, 1)
        assert task.info["seed"] == expected
        assert torch.equal(task.x_support, sampler.sample(2, 3, 1, seed=expected).x_support)
        recorded.append(expected)
    assert max(recorded) > 2**16

# ----- commands/construct.py: construction_keywords, load_construction -------------------------
def test_construction_keywords_maps_every_recorded_argument_to_check_constructions_keyword():
    """A hand-built `vars(args)` (as construction.json records it, with the extras save / out /
    command / debug): steps becomes n_steps, the other fifteen options pass through by name with
    their values (device and the kernel options included), nothing else."""
    from mi_krr.commands.construct import construction_keywords

    arguments = {"command": "construct", "construction": "cg", "steps": 3, "lam": 0.2, "kernel": "exp", "dim": 2, "n_support": 5,
                 "n_query": 4, "batch": 1, "head_width": 8, "bandwidth": 0.7, "temperature": 1.5, "step": 0.3, "mlp": "relu",
                 "mlp_width": 32, "seed": 5, "device": UNAVAILABLE, "save": True, "out": "somewhere", "debug": False}
    assert construction_keywords(arguments) == {
        "construction": "cg", "n_steps": 3, "lam": 0.2, "kernel": "exp", "dim": 2, "n_support": 5, "n_query": 4, "batch": 1,
        "head_width": 8, "bandwidth": 0.7, "temperature": 1.5, "step": 0.3, "mlp": "relu", "mlp_width": 32, "seed": 5,
        "device": UNAVAILABLE,
    }


@pytest.fixture(scope="module")
def saved_cg(tmp_path_factory):
    """`mi-krr construct cg --kernel exp --head-width 8 --seed 5 --steps 2 --dim 2 --n-support 5
    --batch 1 --save`: its --out folder."""
    out = tmp_path_factory.mktemp("construct") / "cg"
    assert main(["construct", "cg", "--kernel", "exp", "--head-width", "8", "--seed", "5", "--steps", "2", "--dim", "2",
                 "--n-support", "5", "--batch", "1", "--save", "--out", str(out)]) == 0
    return out


def _copy(folder, target):
    target.mkdir()
    for name in ("construction.json", "model.safetensors"):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def test_load_construction_loads_the_saved_weights_not_a_fresh_build(saved_cg, tmp_path):
    """The model is rebuilt from construction.json and then given model.safetensors' tensors: a
    file whose W_E was edited (doubled) loads as the edited W_E, every other tensor as written."""
    from mi_krr.commands.construct import load_construction

    folder = _copy(saved_cg, tmp_path / "edited")
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    tensors["W_E"] = tensors["W_E"] * 2.0
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    state = load_construction(folder).state_dict()
    assert torch.equal(state["W_E"], tensors["W_E"]) and bool((tensors["W_E"] != 0).any())
    for name, value in tensors.items():
        assert torch.equal(state[name], value), name


def test_load_construction_builds_on_the_device_asked_for_not_the_recorded_one(saved_cg, tmp_path):
    """A construction saved on a GPU box records --device cuda:N; load_construction(folder,
    device="cpu") on a machine without that GPU must build on the CPU (the argument wins over
    the recorded device)."""
    from mi_krr.commands.construct import load_construction

    folder = _copy(saved_cg, tmp_path / "gpu_box")
    recipe = json.loads((folder / "construction.json").read_text())
    recipe["arguments"]["device"] = UNAVAILABLE
    (folder / "construction.json").write_text(json.dumps(recipe))
    model = load_construction(folder, device="cpu")
    assert {p.device.type for p in model.state_dict().values()} == {"cpu"}


def test_load_construction_without_the_weights_file_names_it(saved_cg, tmp_path):
    """construction.json present, model.safetensors missing: FileNotFoundError naming the
    weights file and what to pass."""
    from mi_krr.commands.construct import load_construction

    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "construction.json").write_bytes((saved_cg / "construction.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors does not exist: pass the --out folder"):
        load_construction(folder)


# ----- train/seeding.py -------------------------------------------------------------------------
SEED_TRIPLES = [(0, 0, 0), (3, 1, 7), (2**32 - 1, 0, 10**6), (1, 0, 1), (5, 1, 2), (7, 0, 3)]


def test_derived_seed_is_the_low_32_bits_of_the_63_bit_seed_runs_were_trained_with():
    """derived_seed = ((s0 << 31) ^ s1) mod 2**32 with (s0, s1) NumPy's SeedSequence([seed,
    stream, step]).generate_state(2, uint32), i.e. in [0, 2**32); and derived_generator draws
    exactly what torch's generator seeded with the full 63-bit seed draws (the triples cover s0
    with bit 0 set and clear, and with bit 1 set, where a wrong mask or shift shows)."""
    from mi_krr.train.seeding import derived_generator, derived_seed

    low_bits = set()
    for triple in SEED_TRIPLES:
        s0, s1 = (int(v) for v in np.random.SeedSequence(list(triple)).generate_state(2, dtype=np.uint32))
        full = (s0 << 31) ^ s1
        low_bits.add(s0 & 3)
        assert derived_seed(*triple) == full % 2**32
        expected = torch.rand(5, generator=torch.Generator().manual_seed(full))
        assert torch.equal(torch.rand(5, generator=derived_generator(*triple)), expected)
    assert {0, 1, 2, 3} <= low_bits


# ----- construct/transformer.py: the feature fingerprint --------------------------------------
def _projected_cg(seed: int, width: int = 4):
    from mi_krr.construct import cg_transformer
    from mi_krr.feature_maps import ProjectedKernelFeatures

    feature_map = ProjectedKernelFeatures("exp", 2, width, projection="gaussian", temperature=1.0, seed=seed)
    return cg_transformer(2, 0.1, dim=2, kernel="exp", feature_map=feature_map)


def test_a_prompt_feature_map_of_another_seed_is_refused_too():
    """A Gaussian-sketch head (a PromptFeatureMap: features computed jointly over a prompt's
    points, auxiliary tokens 0) drawn with seed 1 predicts otherwise than seed 0's (checked on a
    prompt), so seed 0's state dict must be refused by the seed-1 build as for pointwise maps."""
    from mi_krr.tasks import LinearRegressionSampler

    saved, other = _projected_cg(0), _projected_cg(1)
    task = LinearRegressionSampler(2).sample(1, 5, 2, seed=3, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(saved.predict(task), other.predict(task))
    with pytest.raises(ValueError, match="other embedding features"):
        other.load_state_dict(saved.state_dict())
    _projected_cg(0).load_state_dict(saved.state_dict())  # the same build loads


def test_a_state_dict_of_another_head_width_is_refused_by_name_not_a_shape_error():
    """head_width 8 weights into a head_width 16 build: the fingerprints differ in shape; the
    refusal is the ValueError naming the rebuild, not torch's size-mismatch RuntimeError."""
    from mi_krr.construct import cg_transformer

    narrow = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=0)
    wide = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=16, seed=0)
    with pytest.raises(ValueError, match="other embedding features .* rebuild it with the saved arguments"):
        wide.load_state_dict(narrow.state_dict())


def test_a_state_dict_saved_before_the_fingerprint_still_loads_non_strictly():
    """A state dict without feature_fingerprint (written before it existed) loads with
    strict=False, reporting only that key missing, and the model predicts bit for bit what
    the saved one does."""
    from mi_krr.tasks import LinearRegressionSampler

    saved = _projected_cg(0)
    older = {name: value.clone() for name, value in saved.state_dict().items() if name != "feature_fingerprint"}
    fresh = _projected_cg(0)
    result = fresh.load_state_dict(older, strict=False)
    assert result.missing_keys == ["feature_fingerprint"] and result.unexpected_keys == []
    task = LinearRegressionSampler(2).sample(2, 5, 2, seed=4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh.predict(task), saved.predict(task))


def test_a_build_with_a_slightly_other_temperature_is_refused():
    """Positive random features of the same seed at temperature 1.0 and 1.01 differ by ~1%, and
    so do the models' predictions (checked): the fingerprint compares at rtol 1e-5, so the
    1.01 build refuses the 1.0 weights."""
    from mi_krr.construct import cg_transformer
    from mi_krr.tasks import LinearRegressionSampler

    saved = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, temperature=1.0, seed=0)
    other = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, temperature=1.01, seed=0)
    task = LinearRegressionSampler(2).sample(2, 5, 2, seed=3, dtype=torch.float64)
    with torch.no_grad():
        gap = (saved.predict(task) - other.predict(task)).abs().max() / saved.predict(task).abs().max()
    assert 1e-4 < gap < 0.5
    with pytest.raises(ValueError, match="other embedding features"):
        other.load_state_dict(saved.state_dict())



def test_float64_weights_load_into_the_same_build_moved_to_float32():
    """A float64 build's state dict into the same build moved to float32 (fingerprints of two
    dtypes, equal to float32 rounding): loaded, every tensor the float64 one rounded; and the
    model predicts within float32 rounding of the float64 one."""
    from mi_krr.construct import cg_transformer
    from mi_krr.tasks import LinearRegressionSampler

    saved = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=0)
    low = cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=0).to(torch.float32)
    low.load_state_dict(saved.state_dict())
    for name, value in saved.state_dict().items():
        assert torch.equal(low.state_dict()[name], value.to(torch.float32)), name
    task = LinearRegressionSampler(2).sample(2, 5, 2, seed=3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(low.predict(task.to(dtype=torch.float32)).double().numpy(), saved.predict(task).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_a_construction_inside_another_module_refuses_other_features_too():
    """A construction held by a parent module (state-dict names prefixed "cg."): loading the
    seed-0 parent's state dict into a seed-1 parent is refused as for the bare construction."""
    from mi_krr.construct import cg_transformer

    def parent(seed):
        return torch.nn.ModuleDict({"cg": cg_transformer(2, 0.1, dim=2, kernel="exp", head_width=8, seed=seed)})

    with pytest.raises(ValueError, match="other embedding features"):
        parent(1).load_state_dict(parent(0).state_dict())
    parent(0).load_state_dict(parent(0).state_dict())

# ----- construct/studies.py: derived seeds, the width figure's title ----------------------------
def test_conditioned_linear_task_draws_queries_from_the_next_seed_wrapping_at_2_32():
    """x_query = randn(B, m, n; generator seeded seed + 1 mod 2**32) / sqrt(n) in float64 (torch's
    own generator as the reference): seed 7 uses 8, the last seed 2**32 - 1 wraps to 0."""
    import math

    from mi_krr.construct.studies import conditioned_linear_task

    for seed, query_seed in ((7, 8), (2**32 - 1, 0)):
        task = conditioned_linear_task(batch_size=2, n_support=4, kappa=10.0, lam=0.01, n_query=3, seed=seed)
        generator = torch.Generator().manual_seed(query_seed)
        expected = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64) / math.sqrt(4)
        assert torch.equal(task.x_query, expected)


def test_width_study_draws_heads_from_consecutive_seeds_wrapping_and_titles_one_ridge_singular(monkeypatch):
    """width_study(seed=2**32 - 1, n_seeds=2): the random heads are drawn with seeds 2**32 - 1
    and 0 (recorded by a spy on width_head; seed + 1 would be out of range); the collapse
    panel at the single ridge says "at 1 ridge", at two ridges "at 2 ridges"."""
    import mi_krr.construct.studies as studies

    seen = []
    original = studies.width_head

    def spy(head, kernel, dim, width, temperature, seed):
        seen.append((head, seed))
        return original(head, kernel, dim, width, temperature, seed)

    monkeypatch.setattr(studies, "width_head", spy)
    kwargs = dict(widths=(2,), kernels=("linear",), dim=2, n_support=4, n_query=2, n_steps=2, batch_size=2,
                  heads=("random_features", "gaussian_sketch"), n_seeds=2, seed=2**32 - 1)
    study = studies.width_study(**kwargs)
    assert [seed for head, seed in seen if head == "random_features"] == [2**32 - 1, 0]
    import matplotlib.pyplot as plt

    figure = study.plot()
    assert figure.axes[1].get_title().endswith("at 1 ridge")
    plt.close(figure)
    figure = studies.width_study(**kwargs, lams=(0.01,)).plot()
    assert figure.axes[1].get_title().endswith("at 2 ridges")
    plt.close(figure)


# ----- reproductions/richardson_profile.py ---------------------------------------------------------
PROFILES = {"richardson_rowsum": [0.0, -0.5, -1.0], "richardson_jacobi": [0.0, -0.4, -0.8], "gd": [0.0, -0.3, -0.6],
            "cg": [0.0, -1.0, -2.0], "heavy_ball": [0.0, -0.7, -1.1], "chebyshev": [0.0, -0.9, -1.6], "jacobi_cg": [0.0, -1.1, -2.2]}


def _lens(best):
    from mi_krr.reproductions.richardson_profile import LensResult

    scores = {name: 0.5 for name in PROFILES}
    return LensResult(scores=scores, score_ci={name: (0.4, 0.6) for name in PROFILES}, profile_distance={name: 0.0 for name in PROFILES},
                      aligned_steps={name: [1, 2] for name in PROFILES}, model_profile=[-0.5, -0.9], algorithm_profiles=PROFILES,
                      best=best, identified=False, runner_up=None, gap=None, gap_ci=None, equivalent=[], message="")


@pytest.mark.parametrize("bests, extra", [({"readout": "heavy_ball", "ridge": "chebyshev"}, ["heavy_ball", "chebyshev"]),
                                          ({"readout": "cg", "ridge": "cg"}, [])], ids=["two_bests", "best_already_drawn"])
def test_richardson_profile_draws_the_four_solvers_then_each_lens_best_once(bests, extra):
    """The profile panel's solver curves (hand-written profiles) are richardson_rowsum,
    richardson_jacobi, gd, cg (always), then each lens's best not among them, once each; jacobi_cg,
    nobody's best, is not drawn. Each curve's y values are its profile."""
    import matplotlib.pyplot as plt

    from mi_krr.reproductions.richardson_profile import RichardsonProfileResult

    result = RichardsonProfileResult(checkpoint="ckpt", lenses={lens: _lens(best) for lens, best in bests.items()}, layers=[1, 2],
                                     n_steps=2, lam=0.04, kernel="gaussian", batch_size=4, train_batch_size=8, step_sizes="fitted")
    figure = result.plot()
    lines = [line for line in figure.axes[1].get_lines() if not line.get_label().startswith("model layers")]
    assert [line.get_label() for line in lines] == ["richardson_rowsum", "richardson_jacobi", "gd", "cg", *extra]
    for line in lines:
        np.testing.assert_array_equal(line.get_ydata(), PROFILES[line.get_label()])
    plt.close(figure)


def _record_task_sets(monkeypatch) -> list:
    """Replace mi_krr.checkpoints.task_sets by a spy recording (batch_size, seed) and returning
    the real sets."""
    import mi_krr.checkpoints as checkpoints

    calls, real = [], checkpoints.task_sets

    def spy(sampler, batch_size, n_support, n_query, seed, **kwargs):
        sets = real(sampler, batch_size, n_support, n_query, seed, **kwargs)
        calls.append((batch_size, seed, sets))
        return sets

    monkeypatch.setattr(checkpoints, "task_sets", spy)
    return calls


def test_richardson_profile_trains_probes_on_the_seed_10000_places_on_and_diagnoses_with_the_seed(monkeypatch):
    """richardson_profile(seed=2**32 - 1): evaluation prompts from that seed, the ridge probes'
    training prompts from (seed + 10000) mod 2**32 = 9999 (not the evaluation prompts), and the
    ridge lens diagnosed with the user's seed on those training prompts (spies; the readout lens
    runs for real, the ridge call is stopped)."""
    import importlib

    from mi_krr.reproductions.richardson_profile import richardson_profile

    module = importlib.import_module("probes.diagnose")  # the module (probes.diagnose is also the function)
    calls = _record_task_sets(monkeypatch)
    real, seen = module.diagnose, []

    def spy(model, sets, **kwargs):
        seen.append(kwargs)
        if kwargs["method"] == "ridge":
            raise Stop
        return real(model, sets, **kwargs)

    monkeypatch.setattr(module, "diagnose", spy)
    with pytest.raises(Stop):
        richardson_profile(batch_size=2, train_batch_size=3, bootstrap=0, n_steps=2, seed=2**32 - 1)
    assert [(batch, seed) for batch, seed, _ in calls] == [(2, 2**32 - 1), (3, 9999)]
    assert [kwargs["seed"] for kwargs in seen] == [2**32 - 1, 2**32 - 1]
    assert seen[-1]["train_task"] is calls[1][2][0]["in_distribution"]


def test_diagnose_ridge_trains_probes_on_the_seed_10000_places_on_and_passes_the_seed(monkeypatch, tmp_path):
    """`mi-krr diagnose checkpoints/linear_lr --method ridge --seed 2**32-1 --batch 2`: the
    evaluation prompts come from the seed, the probes' 4 x 2 training prompts from
    (seed + 10000) mod 2**32 = 9999, and diagnose_task_sets gets the user's seed and those
    training prompts (spies; stopped before any diagnosis runs)."""
    import mi_krr.commands.diagnose as command
    from mi_krr.checkpoints import shipped_checkpoint

    calls, seen = _record_task_sets(monkeypatch), []

    def stop(model, sets, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(command, "diagnose_task_sets", stop)
    with pytest.raises(Stop):
        main(["diagnose", str(shipped_checkpoint("linear_lr")), "--method", "ridge", "--no-shifts", "--batch", "2", "--seed",
              str(2**32 - 1), "--no-progress", "--out", str(tmp_path)])
    assert [(batch, seed) for batch, seed, _ in calls] == [(2, 2**32 - 1), (8, 9999)]
    assert seen[0]["seed"] == 2**32 - 1 and seen[0]["method"] == "ridge"
    assert seen[0]["train_task"] is calls[1][2][0]["in_distribution"]


# ----- device checks before the path: load_checkpoint, load_garg_checkpoint, GargICLModel ---------
def _garg_run(folder):
    """A random one-layer Garg et al. run folder (config.yaml, state.pt of a GPT-2 TransformerModel)."""
    import yaml
    from transformers import GPT2Config, GPT2Model

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    config = GPT2Config(n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    state = {f"_backbone.{key}": value for key, value in GPT2Model(config).state_dict().items()}
    state.update({f"_read_in.{key}": value for key, value in torch.nn.Linear(2, 8).state_dict().items()})
    state.update({f"_read_out.{key}": value for key, value in torch.nn.Linear(8, 1).state_dict().items()})
    torch.save({"model_state_dict": state, "train_step": 3}, folder / "state.pt")
    model = {"family": "gpt2", "n_dims": 2, "n_positions": 4, "n_embd": 8, "n_layer": 1, "n_head": 2}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model, "training": {"task": "linear_regression"}}))
    return folder


def test_loading_a_garg_checkpoint_leaves_the_global_torch_generator_alone(tmp_path):
    """torch.manual_seed(0); load_garg_checkpoint(run); torch.rand(4) draws what torch.rand(4)
    draws right after torch.manual_seed(0) (the random init the weights replace is forked off)."""
    from mi_krr.models.garg import load_garg_checkpoint

    run = _garg_run(tmp_path / "garg")
    torch.manual_seed(0)
    load_garg_checkpoint(run)
    after_load = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(4))


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_garg_checkpoint"])
def test_loaders_refuse_an_unknown_device_before_reading_the_path(loader, tmp_path):
    """device="gpu" with a path that does not exist: the device is refused first (the one line
    names device 'gpu'), before any file is looked at."""
    from mi_krr.checkpoints import load_checkpoint
    from mi_krr.models.garg import load_garg_checkpoint

    load = {"load_checkpoint": load_checkpoint, "load_garg_checkpoint": load_garg_checkpoint}[loader]
    with pytest.raises(ValueError, match="^device 'gpu' cannot be used here"):
        load(tmp_path / "nowhere", device="gpu")


def test_garg_model_refuses_an_unknown_device_naming_it(tmp_path):
    """GargICLModel(config, weights, device="gpu") is the ValueError naming device 'gpu', as the
    other model classes give, not torch's RuntimeError from .to("gpu")."""
    from mi_krr.models.garg import GargICLModel, read_garg_config

    run = _garg_run(tmp_path / "garg")
    state = torch.load(run / "state.pt", weights_only=True)["model_state_dict"]
    with pytest.raises(ValueError, match="^device 'gpu' cannot be used here"):
        GargICLModel(read_garg_config(run / "config.yaml"), state, device="gpu")
