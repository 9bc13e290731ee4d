"""Branches of models, train, commands, reproductions and the CLI that the rest of the suite leaves
unexecuted: user-reachable errors (one clear line naming the argument and the fix), options and
result methods checked against NumPy, hand-built inputs or matplotlib artists read back."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat

import matplotlib.pyplot as plt
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from transformer_lens import ActivationCache

from construct_references import random_projection_width_errors
from optimizer_steps import assert_same_next_step
from mi_krr.cli import COMMANDS, main
from mi_krr.models import (
    BridgeICLModel,
    ICLTransformer,
    ICLTransformerConfig,
    adapter_for,
    allowed_attention,
    encode,
    load_garg_checkpoint,
    model_from_config,
)
from mi_krr.reproductions import RichardsonProfileResult, reproduction, width
from mi_krr.reproductions.richardson_profile import LensResult
from mi_krr.tasks import LinearRegressionSampler
from mi_krr.train import (
    PRESETS,
    CheckpointError,
    TrainConfig,
    TrainingState,
    atomic_write_bytes,
    latest_checkpoint,
    load_model,
    load_training_state,
    preset_config,
    read_run_config,
    save_training_state,
    train,
)
from mi_krr.train.checkpoint import STATE_FORMAT, RNGState
from mi_krr.train.cli import add_train_parser, run_description
from prompts import random_task

D = 2


def tiny_config(**overrides) -> ICLTransformerConfig:
    settings = dict(n_dims=D, d_model=8, n_layers=2, n_heads=2, max_seq_len=8, dtype="float64")
    settings.update(overrides)
    return ICLTransformerConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> ICLTransformer:
    torch.manual_seed(seed)
    return ICLTransformer(tiny_config(**overrides)).eval()


def tiny_bridge(**overrides) -> BridgeICLModel:
    torch.manual_seed(0)
    return BridgeICLModel(tiny_config(**overrides)).eval()


# ---- mi_krr.models: the lazy package ------------------------------------------------------------


def test_models_package_lists_and_resolves_its_lazy_exports_and_refuses_unknown_names():
    """dir(mi_krr.models) holds the names its docstring promises, each resolves to an object of a
    mi_krr.models submodule, and a misspelt name is an AttributeError naming it."""
    import mi_krr.models as models

    promised = {"ICLTransformer", "ICLTransformerConfig", "BridgeICLModel", "load_garg_checkpoint", "model_from_config",
                "check_task_fits", "ICLModel", "adapter_for"}
    names = dir(models)
    assert promised <= set(names) and names == sorted(names)
    for name in names:
        assert getattr(models, name).__module__.startswith("mi_krr.models."), name
    with pytest.raises(AttributeError, match="module 'mi_krr.models' has no attribute 'ICLTransformr'"):
        models.ICLTransformr  # noqa: B018


# ---- mi_krr.models: clear errors ----------------------------------------------------------------


@pytest.mark.parametrize("model_class", [ICLTransformer, BridgeICLModel])
def test_model_built_from_a_plain_dict_instead_of_a_config_is_refused(model_class):
    """Both model classes name `cfg` and the class it must be when handed `to_dict()` output."""
    with pytest.raises(ValueError, match=r"cfg must be an ICLTransformerConfig, got dict: pass ICLTransformerConfig\.from_dict\(cfg\)"):
        model_class(tiny_config().to_dict())
    with pytest.raises(ValueError, match=r"got int: pass ICLTransformerConfig\(n_dims="):
        model_class(3)


@pytest.mark.parametrize("make", [tiny_model, tiny_bridge], ids=["ICLTransformer", "BridgeICLModel"])
@pytest.mark.parametrize(
    "layout, shape, message",
    [
        ("concat", (1, 5, D), r"tokens must have width d_token=3 \(concat layout.*got 2: build them with model.encode\(task\)"),
        ("interleaved", (1, 9, D), r"sequence of 9 tokens is longer than max_seq_len=8: shorten the prompt"),
    ],
)
def test_forward_on_tokens_of_the_wrong_width_or_length_is_refused(make, layout, shape, message):
    """Hand-made token tensors: a width other than d_token, or more positions than max_seq_len."""
    model = make(layout=layout)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(*shape, dtype=torch.float64), n_support=3 if layout == "concat" else None)


def test_bridge_concat_tokens_longer_than_its_positions_are_refused():
    """A bridge has a position limit even in the concat layout (ICLTransformer's concat has none)."""
    model = tiny_bridge(layout="concat")
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than max_seq_len=8: shorten the prompt"):
        model(torch.zeros(1, 9, D + 1, dtype=torch.float64), n_support=3)


def test_tokens_without_a_batch_axis_are_refused_with_the_expected_shape():
    """A 2-d token tensor (no batch axis) is refused, naming the [batch, seq, d_token] shape it needs."""
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq, d_token\], got shape \(5, 3\)"):
        tiny_model()(torch.zeros(5, D + 1, dtype=torch.float64))


def test_predict_on_something_other_than_a_task_names_the_task_type():
    """predict() on a dict of tensors names ICLTask, the type it needs."""
    with pytest.raises(ValueError, match=r"task must be an mi_krr.tasks.ICLTask, got dict"):
        tiny_model().predict({"x_support": torch.zeros(1, 3, D)})


def test_prefix_predictions_of_a_concat_model_point_to_predict():
    """prefix_predictions() of a concat model names the layout it needs and the methods to use instead."""
    with pytest.raises(ValueError, match=r"needs the causal interleaved layout.*use predict\(task\) or training_predictions\(task\)"):
        tiny_model(layout="concat").prefix_predictions(random_task(1, 3, 2, D))


@pytest.mark.parametrize("call", [lambda: encode(random_task(1, 3, 2, D), "ring"), lambda: allowed_attention("ring", 4, 2)],
                         ids=["encode", "allowed_attention"])
def test_unknown_layout_names_the_allowed_layouts(call):
    """An unknown layout name lists the two layouts (encode and the mask builder alike)."""
    with pytest.raises(ValueError, match=r"layout must be one of \('concat', 'interleaved'\), got 'ring'"):
        call()


@pytest.mark.parametrize("description", [{}, "ICLTransformer", {"n_dims": 2, "d_model": 8}])
def test_model_description_without_model_type_is_refused(description):
    """A description that is not a dict, or lacks model_type, points to model.config_dict()."""
    with pytest.raises(ValueError, match=r"model description must be a dict with a 'model_type' key, as written by model.config_dict\(\)"):
        model_from_config(description)


@pytest.mark.parametrize("causal", ["yes", 1])
def test_causal_other_than_a_bool_or_none_is_refused(causal):
    """causal='yes' or causal=1 is refused, naming the three accepted values."""
    with pytest.raises(ValueError, match=f"causal must be True, False or None, got {causal!r}"):
        tiny_config(causal=causal)


def test_adapter_refuses_a_model_without_hook_dict():
    """Every ICLModel method present, but no TransformerLens hook_dict."""

    class NoHooks:
        n_layers, n_heads = 1, 1

        def encode(self, task): ...
        def forward(self, tokens): ...
        def residual_hook_names(self): ...
        def attention_hook_names(self): ...
        def allowed_attention(self, prompt): ...
        def readout(self, resid): ...
        def predict(self, task): ...

    with pytest.raises(ValueError, match="NoHooks has no hook_dict: it must be a TransformerLens HookedRootModule or bridge"):
        adapter_for(NoHooks())


# ---- mi_krr.models: normal paths ----------------------------------------------------------------


@pytest.mark.parametrize("mlp", [False, True])
def test_activation_cache_decomposes_the_residual_into_the_blocks_the_model_has(mlp):
    """ActivationCache reads cfg.attn_only: attention-only models decompose into embed + attn_out
    per layer (no mlp_out), and the components sum to the final residual stream."""
    model = tiny_model(mlp=mlp)
    _, raw = model.run_with_cache(model.encode(random_task(2, 4, 2, D)).tokens)
    components, labels = ActivationCache(raw, model).decompose_resid(return_labels=True)
    parts = ("attn_out", "mlp_out") if mlp else ("attn_out",)
    assert labels == ["embed"] + [f"{layer}_{part}" for layer in range(2) for part in parts]
    torch.testing.assert_close(components.sum(0), raw["blocks.1.hook_resid_post"], rtol=1e-12, atol=1e-12)


def test_bridge_run_with_hooks_ablating_every_block_leaves_the_readout_of_the_read_in():
    """Zeroing every attn_out and mlp_out leaves resid = read_in(tokens) (the concat positional
    embedding is zero), so the output is NumPy LayerNorm -> unembed -> + read_out_bias of it."""
    model = tiny_bridge(layout="concat")
    prompt = model.encode(random_task(2, 4, 2, D))

    def zero(activation, hook):
        return torch.zeros_like(activation)

    hooks = [(f"blocks.{layer}.hook_{part}_out", zero) for layer in range(2) for part in ("attn", "mlp")]
    ablated = model.run_with_hooks(prompt.tokens, fwd_hooks=hooks).detach().numpy()
    weights = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    resid = prompt.tokens.numpy() @ weights["read_in.weight"].T + weights["read_in.bias"]
    normed = (resid - resid.mean(-1, keepdims=True)) / np.sqrt(resid.var(-1, keepdims=True) + 1e-5)
    normed = normed * weights["bridge.ln_final._original_component.weight"] + weights["bridge.ln_final._original_component.bias"]
    expected = (normed @ weights["bridge.unembed._original_component.weight"].T)[..., 0]
    expected = expected + weights["bridge.unembed._original_component.bias"][0] + weights["read_out_bias"]
    np.testing.assert_allclose(ablated, expected, rtol=1e-6, atol=1e-6)


def test_bridge_reset_hooks_removes_a_hook_added_through_hook_dict():
    """A permanent hook changes the output; after reset_hooks() the output is the unhooked one."""
    model = tiny_bridge(layout="concat")
    prompt = model.encode(random_task(2, 4, 2, D))
    clean = model(prompt.tokens).detach()
    model.hook_dict["blocks.0.hook_attn_out"].add_hook(lambda activation, hook: activation * 0.0)
    assert not torch.allclose(model(prompt.tokens), clean)
    model.reset_hooks()
    assert torch.equal(model(prompt.tokens).detach(), clean)


# ---- mi_krr.models.garg: broken run folders ------------------------------------------------------

GARG_SECTION = {"family": "gpt2", "n_dims": D, "n_positions": 4, "n_embd": 8, "n_layer": 1, "n_head": 2}


def garg_state_dict() -> dict[str, torch.Tensor]:
    """Weights of Garg's TransformerModel for GARG_SECTION, built from plain HF modules."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    conf = GPT2Config(n_positions=8, n_embd=8, n_layer=1, n_head=2, vocab_size=1, use_cache=False)
    state = {f"_backbone.{name}": value for name, value in GPT2Model(conf).state_dict().items()}
    state.update({f"_read_in.{name}": value for name, value in torch.nn.Linear(D, 8).state_dict().items()})
    state.update({f"_read_out.{name}": value for name, value in torch.nn.Linear(8, 1).state_dict().items()})
    return state


def garg_run(folder, config_text: str | None = None, weights=None, weights_name: str = "state.pt"):
    folder.mkdir(parents=True, exist_ok=True)
    if config_text is not None:
        (folder / "config.yaml").write_text(config_text)
    if weights is not None:
        torch.save(weights, folder / weights_name)
    return folder


VALID_YAML = yaml.safe_dump({"model": GARG_SECTION})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: {**s, "extra.weight": torch.zeros(1)}, r"unexpected weight 'extra.weight': a Garg checkpoint holds only _read_in"),
        (lambda s: {k: v for k, v in s.items() if k != "_read_out.bias"}, r"checkpoint lacks weight '_read_out.bias' \(1 missing\).*n_layer=1"),
        (lambda s: {**s, "_backbone.h.1.ln_1.weight": torch.ones(8)}, r"unexpected weight '_backbone.h.1.ln_1.weight' \(1 unexpected\): check model.n_layer"),
        (lambda s: torch.zeros(3), r"holds a Tensor, not a state dict: expected state.pt or model_<step>.pt"),
    ],
    ids=["foreign-prefix", "missing", "extra-layer", "not-a-dict"],
)
def test_garg_weights_that_do_not_fit_the_config_are_refused(tmp_path, edit, message):
    """Hand-edited Garg state dicts (a foreign key, a missing weight, an extra layer, a bare tensor): one line naming the weight and the fix."""
    folder = garg_run(tmp_path / "run", VALID_YAML, edit(garg_state_dict()))
    with pytest.raises(ValueError, match=message):
        load_garg_checkpoint(folder)


@pytest.mark.parametrize(
    "config_text, message",
    [
        (None, r"no config.yaml at .*: a Garg run folder needs the config.yaml its training wrote"),
        ("model: [unclosed", r"could not parse .* as YAML \(\w+\): repair or re-copy the file"),
        (yaml.safe_dump({"training": {"task": "linear_regression"}}), r"has no 'model' section: it must hold model.family, model.n_dims"),
        (yaml.safe_dump({"model": {**GARG_SECTION, "family": "lstm"}}), r"model.family is 'lstm'; only Garg's 'gpt2' family is supported"),
    ],
    ids=["no-config", "bad-yaml", "no-model-section", "other-family"],
)
def test_garg_config_yaml_problems_are_refused(tmp_path, config_text, message):
    """A Garg run folder whose config.yaml is absent, not YAML, without a model section or of another family: one line naming what to fix."""
    folder = garg_run(tmp_path / "run", config_text, {"_read_in.weight": torch.zeros(8, D)})
    with pytest.raises(ValueError, match=message):
        load_garg_checkpoint(folder)


def test_garg_step_without_its_file_is_refused(tmp_path):
    """step=7 where only model_5.pt exists names the missing file and the step that exists."""
    folder = garg_run(tmp_path / "run", VALID_YAML, garg_state_dict(), weights_name="model_5.pt")
    with pytest.raises(ValueError, match=r"no model_7.pt in .*: pick a step whose file exists \(5\)"):
        load_garg_checkpoint(folder, step=7)


# ---- mi_krr.train.checkpoint --------------------------------------------------------------------


def test_atomic_write_survives_a_platform_without_directory_handles(tmp_path, monkeypatch):
    """Windows cannot open a folder: the folder fsync is skipped and the file is still written."""
    real_open = os.open

    def no_directory_handles(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "directories cannot be opened here", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_directory_handles)
    assert atomic_write_bytes(tmp_path / "a.bin", b"payload") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"payload"


def test_atomic_write_survives_a_filesystem_that_cannot_fsync_folders(tmp_path, monkeypatch):
    """fsync of the folder raising OSError (EINVAL on some filesystems) is ignored and the folder
    handle is still closed."""
    real_fsync, real_close, closed = os.fsync, os.close, []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return real_fsync(fd)

    def close(fd):
        closed.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_close(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    atomic_write_bytes(tmp_path / "b.bin", b"data")
    monkeypatch.undo()
    assert (tmp_path / "b.bin").read_bytes() == b"data"
    assert True in closed  # the folder's descriptor was closed after the failed fsync


def _stepped_adamw():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
    return net, optimizer


def _state(net, optimizer_state, step=2):
    return TrainingState(step=step, run_config={"model": {}, "sampler": {}, "train": {}}, model_state=net.state_dict(),
                         optimizer_state=optimizer_state, rng=RNGState.capture(), history=[])


def test_optimizer_state_with_plain_number_entries_round_trips_and_continues_identically(tmp_path):
    """Per-parameter scalars that are not tensors (AdamW's `step` as the float older torch wrote)
    come back equal, and an optimizer loaded from them takes the same next step as the original."""
    net, optimizer = _stepped_adamw()
    state = optimizer.state_dict()
    state["state"] = {index: {**entry, "step": float(entry["step"])} for index, entry in state["state"].items()}
    loaded = load_training_state(save_training_state(tmp_path / "s.safetensors", _state(net, state))).optimizer_state
    for index, entry in state["state"].items():
        assert loaded["state"][index]["step"] == entry["step"] == 2.0 and isinstance(loaded["state"][index]["step"], float)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded["state"][index][key], entry[key])
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(net.state_dict())
    clone_optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    clone_optimizer.load_state_dict(loaded)
    assert_same_next_step((net, optimizer), (clone, clone_optimizer), torch.randn(4, 3))


def test_file_claiming_the_state_format_without_its_entries_is_refused(tmp_path):
    """A safetensors file whose metadata claims the training-state format but has no 'step' etc.: CheckpointError naming the entry."""
    path = tmp_path / "fake.safetensors"
    safetensors.torch.save_file({"model/w": torch.zeros(2)}, str(path), metadata={"format": json.dumps(STATE_FORMAT)})
    with pytest.raises(CheckpointError, match=r"is missing training-state entry 'step': it was not written by mi_krr.train.save_training_state"):
        load_training_state(path)


def test_load_model_refuses_a_safetensors_file_of_another_format(tmp_path):
    """A plain safetensors file (no mi-krr metadata) is refused, naming its format."""
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"has format None: pass a file written by mi_krr.train"):
        load_model(path)


def test_load_model_of_a_missing_path_is_file_not_found(tmp_path):
    """A path that does not exist: FileNotFoundError naming it and what to pass."""
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere.safetensors: pass a run folder or a .safetensors file"):
        load_model(tmp_path / "nowhere.safetensors")


def test_load_model_of_a_run_folder_without_model_file_takes_its_newest_training_state(tmp_path):
    """A run folder holding only state/step_*.safetensors: the newest state's weights are loaded."""
    model_a, model_b = tiny_model(1), tiny_model(2)
    run_config = {"model": model_a.config_dict(), "sampler": {}, "train": {}}
    for step, model in ((1, model_a), (2, model_b)):
        state = TrainingState(step=step, run_config=run_config, model_state=model.state_dict(),
                              optimizer_state={"state": {}, "param_groups": []}, rng=RNGState.capture(), history=[])
        save_training_state(tmp_path / "state" / f"step_{step:08d}.safetensors", state)
    loaded = load_model(tmp_path)
    for name, value in model_b.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_load_model_reads_a_pt_file_wrapping_its_weights_in_model_state_dict(tmp_path):
    """{"model_state_dict": ...} (Garg-style wrapper) beside a config.json: same predictions."""
    model = tiny_model(3)
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config_dict()}))
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    task = random_task(2, 4, 2, D)
    assert torch.equal(load_model(tmp_path / "wrapped.pt").predict(task), model.predict(task))


def test_load_model_of_a_pt_file_without_config_json_names_the_missing_file(tmp_path):
    """A .pt state dict with no config.json beside it: FileNotFoundError naming config.json and where it belongs."""
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match=r"weights.pt needs a config.json beside it \(or above its state/ folder\)"):
        load_model(tmp_path / "weights.pt")


@pytest.mark.parametrize("text", ["{not json", json.dumps({"train": {}}), json.dumps(["model"])], ids=["not-json", "no-model", "a-list"])
def test_load_model_of_a_pt_file_with_a_broken_config_json_is_refused(tmp_path, text):
    """config.json that is not JSON, lacks 'model', or is a list: CheckpointError saying what it must hold."""
    torch.save(tiny_model().state_dict(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config.json must be JSON with a 'model' entry \(as written by mi_krr.train\)"):
        load_model(tmp_path / "weights.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_restore_rewinds_the_cuda_generators():
    """With CUDA, restore() puts the CUDA generators back: the same draws come out again."""
    state = RNGState.capture()
    first = torch.rand(4, device="cuda")
    state.restore()
    assert torch.equal(torch.rand(4, device="cuda"), first)


# ---- mi_krr.train: config, runs, loop -----------------------------------------------------------


def test_train_config_stores_a_path_out_dir_and_a_torch_device_as_strings(tmp_path):
    """Path and torch.device are accepted and stored as the strings JSON needs."""
    cfg = TrainConfig(steps=2, warmup_steps=0, out_dir=tmp_path / "run", device=torch.device("cpu"))
    assert cfg.out_dir == str(tmp_path / "run") and cfg.device == "cpu"
    assert json.loads(json.dumps(cfg.to_dict()))["out_dir"] == str(tmp_path / "run")


def test_preset_config_is_a_private_copy_and_unknown_presets_are_named():
    """The copy equals PRESETS' entry (linear attention on 4-d linear regression) and editing it
    leaves PRESETS untouched; an unknown name lists the presets."""
    copy = preset_config("linear_lr")
    assert copy == PRESETS["linear_lr"]
    assert copy["model"]["attention"] == "linear" and copy["sampler"] == {"sampler": "linear_regression", "dim": 4, "noise_std": 0.4}
    copy["train"]["steps"] = 1
    copy["model"]["n_layers"] = 99
    assert PRESETS["linear_lr"]["train"]["steps"] == 2500 and PRESETS["linear_lr"]["model"]["n_layers"] == 4
    with pytest.raises(ValueError, match=r"preset must be one of \['linear_lr', 'softmax_gp'\], got 'gp'"):
        preset_config("gp")


def test_read_run_config_of_a_missing_file_or_folder_names_the_path(tmp_path):
    """A missing file, or a folder without config.json: FileNotFoundError naming the path and the sections needed."""
    for path in (tmp_path / "run.yaml", tmp_path):
        with pytest.raises(FileNotFoundError, match="no run config at .*: pass a .json/.yaml file with model, sampler and train sections"):
            read_run_config(path)


@pytest.mark.parametrize("document", [["model", "sampler", "train"], {"model": {}, "sampler": {}}], ids=["a-list", "no-train"])
def test_read_run_config_without_the_three_sections_is_refused(tmp_path, document):
    """A YAML list, or a mapping without 'train': ValueError naming the three sections."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=r"run.yaml must be a mapping with 'model', 'sampler' and 'train' sections"):
        read_run_config(path)


SAMPLER = LinearRegressionSampler(D, noise_std=0.2)


def loop_config(out_dir=None, **overrides) -> TrainConfig:
    values = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, n_support=4, n_query=2, eval_every=3, eval_prompts=8,
                  checkpoint_every=1, out_dir=None if out_dir is None else str(out_dir), seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def loop_model() -> ICLTransformer:
    return tiny_model(0, dtype="float32", n_layers=1)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: (loop_model(), SAMPLER, {"steps": 3}), r"cfg must be a mi_krr.train.TrainConfig, got dict"),
        (lambda: (torch.nn.Linear(2, 1), SAMPLER, loop_config()), r"model has no config_dict\(\): train an mi_krr model"),
        (lambda: (loop_model(), object(), loop_config()), r"sampler has no sample\(\): pass an mi_krr.tasks sampler"),
        (lambda: (loop_model(), SAMPLER, loop_config(active_dim_start=3)), r"active_dim_start must be <= the sampler's dim=2, got 3"),
    ],
    ids=["cfg-dict", "foreign-model", "foreign-sampler", "active-dim"],
)
def test_train_refuses_inputs_it_cannot_train(inputs, message):
    """cfg as a dict, a model or sampler lacking the needed methods, active_dim_start above the sampler's dim: one ValueError each."""
    model, sampler, cfg = inputs()
    with pytest.raises(ValueError, match=message):
        train(model, sampler, cfg, progress=False)


@pytest.mark.parametrize("until_step", [0, 4, True, 1.5])
def test_until_step_outside_one_to_steps_is_refused(until_step):
    """until_step 0, above steps, a bool or a float: ValueError naming the range [1, steps]."""
    with pytest.raises(ValueError, match=rf"until_step must be an integer in \[1, steps=3\] or None, got {until_step!r}"):
        train(loop_model(), SAMPLER, loop_config(), progress=False, until_step=until_step)


def test_resume_without_out_dir_is_refused():
    """resume=True with cfg.out_dir None asks for the run folder."""
    with pytest.raises(ValueError, match=r"resume=True needs cfg.out_dir: set it to the folder of the run to continue"):
        train(loop_model(), SAMPLER, loop_config(), resume=True, progress=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 3-step run stopped after step 2 (checkpoints at steps 1 and 2)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(loop_model(), SAMPLER, loop_config(out), progress=False, until_step=2)
    return out


def test_resume_with_an_until_step_before_the_checkpoint_is_refused(stopped_run, tmp_path):
    """Resuming a run checkpointed at step 2 with until_step=1 names both steps and the fix."""
    run = shutil.copytree(stopped_run, tmp_path / "run")
    with pytest.raises(ValueError, match=r"until_step=1 is before the checkpoint's step 2: pass a later until_step or None"):
        train(loop_model(), SAMPLER, loop_config(run), resume=True, progress=False, until_step=1)


def test_resume_from_a_checkpoint_beyond_the_runs_steps_is_refused(stopped_run, tmp_path):
    """A hand-edited training state claiming step 5 of a 3-step run."""
    run = shutil.copytree(stopped_run, tmp_path / "run")
    path = latest_checkpoint(run)
    state = load_training_state(path)
    state.step = 5
    save_training_state(path, state)
    with pytest.raises(CheckpointError, match=r"is at step 5, beyond cfg.steps=3"):
        train(loop_model(), SAMPLER, loop_config(run), resume=True, progress=False)


def test_a_loss_that_overflows_stops_training_with_the_step_and_the_fix():
    """lr = 1e30 makes AdamW's first update ~1e30 per weight: the float32 loss of step 1 is inf."""
    with pytest.raises(FloatingPointError, match=r"training loss became (inf|nan) at step 1: lower lr or set grad_clip"):
        train(loop_model(), SAMPLER, loop_config(lr=1e30, min_lr=0.0, grad_clip=None), progress=False)


# ---- mi-krr train (CLI) -------------------------------------------------------------------------

TRAIN_SECTION = {"steps": 5, "batch_size": 4, "warmup_steps": 0, "n_support": 5, "n_query": 2, "eval_every": 5, "eval_prompts": 8,
                 "checkpoint_every": 5}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`mi-krr train --config FILE` with every override flag, --seed and --device."""
    folder = tmp_path_factory.mktemp("cli")
    description = {"model": tiny_config(dtype="float32", n_layers=1).to_dict() | {"model_type": "ICLTransformer"},
                   "sampler": SAMPLER.to_config(), "train": dict(TRAIN_SECTION)}
    (folder / "run.yaml").write_text(yaml.safe_dump(description))
    flags = ["--steps", "2", "--batch-size", "3", "--lr", "0.002", "--n-support", "4", "--eval-every", "1", "--checkpoint-every", "1"]
    code = main(["train", "--config", str(folder / "run.yaml"), *flags, "--seed", "5", "--device", "cpu", "--out", str(folder / "run"),
                 "--no-progress"])
    return code, folder / "run"


def test_train_flags_override_the_config_file(cli_run):
    """config.json of the run = the YAML's train section with each flag's value put in by hand."""
    code, run = cli_run
    assert code == 0
    expected = {**TRAIN_SECTION, "steps": 2, "batch_size": 3, "lr": 0.002, "n_support": 4, "eval_every": 1, "checkpoint_every": 1,
                "seed": 5, "device": "cpu", "out_dir": str(run)}
    written = json.loads((run / "config.json").read_text())["train"]
    assert {key: written[key] for key in expected} == expected
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [record["step"] for record in history] == [0, 1, 2]  # eval_every=1 over steps=2


def test_train_warmup_and_curriculum_flags_shorten_the_schedule_to_fit_a_short_run(tmp_path):
    """A config with a 10-step warm-up and curriculum, run for --steps 4 --warmup-steps 2
    --curriculum-steps 0: the flags reach config.json, and the recorded learning rates are the
    closed-form schedule's (lr 1e-3, min_lr 1e-5): step 0 warms up to lr / 2, step 3 is half-way
    down the cosine, min_lr + (lr - min_lr) / 2."""
    description = {"model": tiny_config(dtype="float32", n_layers=1).to_dict() | {"model_type": "ICLTransformer"},
                   "sampler": SAMPLER.to_config(), "train": {**TRAIN_SECTION, "steps": 20, "warmup_steps": 10, "curriculum_steps": 10}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(description))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "4", "--warmup-steps", "2", "--curriculum-steps", "0",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    written = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (written["steps"], written["warmup_steps"], written["curriculum_steps"]) == (4, 2, 0)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [record["step"] for record in history] == [0, 4]
    assert history[0]["lr"] == pytest.approx(1e-3 / 2, rel=1e-12)
    assert history[1]["lr"] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-12)


def test_train_resume_refuses_an_override_flag(cli_run, capsys):
    """`mi-krr train --resume --steps 9` exits 2 asking to drop --steps."""
    _, run = cli_run
    assert main(["train", "--resume", "--steps", "9", "--out", str(run)]) == 2
    assert "--resume keeps the run's own settings: drop --steps" in capsys.readouterr().err


def test_train_resume_refuses_a_seed_it_would_ignore(cli_run, tmp_path, capsys):
    """`--resume --seed 9` is refused like the other trajectory flags (it used to be silently ignored)."""
    run = shutil.copytree(cli_run[1], tmp_path / "run")
    assert main(["train", "--resume", "--seed", "9", "--out", str(run), "--no-progress"]) == 2
    assert "drop --seed" in capsys.readouterr().err


def test_train_parser_embedded_without_out_option_runs_in_runs_train(tmp_path, monkeypatch):
    """add_train_parser on a user's own parser (no --out): a fresh run goes to runs/train, and
    --resume reads the run there (none in an empty working directory: FileNotFoundError naming it)."""
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    assert run_description(parser.parse_args(["train", "--preset", "linear_lr"]))["train"]["out_dir"] == "runs/train"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no run config at runs/train"):
        run_description(parser.parse_args(["train", "--resume"]))


# ---- mi-krr (top level), construct, reproduce ---------------------------------------------------


def test_mi_krr_without_a_command_prints_the_command_list_and_exits_2(capsys):
    """`mi-krr` alone prints the usage with every command listed and returns 2."""
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mi-krr")
    for command in COMMANDS:
        assert f"    {command}" in out


def test_unknown_top_level_option_is_one_line_pointing_to_mi_krr_help(capsys):
    """`mi-krr --verbose` (no command): exit 2 with exactly one line pointing to `mi-krr --help`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--verbose"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "mi-krr: error: unrecognized arguments: --verbose (see mi-krr --help)\n"


def test_construct_gd_with_a_kernel_is_a_one_line_error(capsys):
    """`mi-krr construct gd --kernel exp`: exit 2, one line saying to drop --kernel (or use cg)."""
    assert main(["construct", "gd", "--kernel", "exp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the gd construction runs on linear regression: drop --kernel exp (or use cg with --head-width)" in err[0]


def test_unknown_reproduction_lists_the_reproductions():
    """reproduction('depth') lists the four reproduction names."""
    with pytest.raises(ValueError, match=r"reproduction must be one of cg-rate, width, softmax-ood, richardson-profile, got 'depth'"):
        reproduction("depth")


def test_reproduce_without_out_writes_to_reports_reproduce_name(tmp_path, monkeypatch, capsys):
    """Default --out: reports/reproduce/width/ under the working folder; the JSON's d_eff is the
    NumPy mean of tr K (K + lam I)^-1 over the quick configuration's prompts."""
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "width", "--quick", "--no-progress"]) == 0
    folder = tmp_path / "reports" / "reproduce" / "width"
    assert (folder / "width.png").read_bytes().startswith(b"\x89PNG")
    document = json.loads((folder / "width.json").read_text())
    _, quick = reproduction("width")
    task = LinearRegressionSampler(quick["dim"], condition_number=100.0, noise_std=0.1).sample(
        quick["batch_size"], quick["n_support"], 16, seed=0, dtype=torch.float64)
    x = task.x_support.numpy()
    d_eff = np.mean([np.sum(mu / (mu + 1.0)) for mu in (np.linalg.eigvalsh(x[b] @ x[b].T) for b in range(len(x)))])
    assert document["key_numbers"]["linear: d_eff(lam=1)"] == pytest.approx(d_eff, rel=1e-8)
    assert f"wrote {os.path.join('reports', 'reproduce', 'width', 'width.png')}" in capsys.readouterr().out


# ---- reproductions: result methods -------------------------------------------------------------


@pytest.fixture(scope="module")
def width_reference():
    """A 2-step (unconverged) width study and its NumPy reference: CG on x W / sqrt(m)."""
    widths, dim, n, m, lam, steps, batch, seed = (2, 6), 4, 10, 4, 0.1, 2, 3, 5
    task = LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1).sample(batch, n, m, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support.numpy(), task.x_query.numpy(), task.y_support.numpy()
    model_error, krr_error = random_projection_width_errors(x, xq, y, lam, widths, steps, seed)
    d_eff = np.mean([np.sum(mu / (mu + lam)) for mu in (np.linalg.eigvalsh(x[b] @ x[b].T) for b in range(batch))])
    tolerance = 0.5 * (model_error[0] + model_error[1])  # only the wider head is below it
    assert model_error[1] < tolerance < model_error[0]
    result = width(widths=widths, kernels=("linear",), dim=dim, n_support=n, n_query=m, lam=lam, n_steps=steps, batch_size=batch,
                   seed=seed, tolerance=tolerance, heads=("random_features",), n_seeds=1)
    return result, {"widths": widths, "model_error": model_error, "krr_error": krr_error, "d_eff": d_eff,
                    "tolerance": tolerance}


def test_width_key_numbers_and_summary_are_the_numpy_reference_numbers(width_reference):
    """key_numbers(): d_eff, per-width errors, the tolerance width (6) and the floor gap from NumPy CG; summary() formats them to 4 digits."""
    result, ref = width_reference
    numbers = result.key_numbers()
    assert list(numbers) == ["linear: d_eff(lam=0.1)", "linear, random_features head: rel. error to oracle KRR",
                             f"linear: smallest width with error < {ref['tolerance']:g} (random features)",
                             "linear: max |model - KRR on features| (error units)"]
    assert numbers["linear: d_eff(lam=0.1)"] == pytest.approx(ref["d_eff"], rel=1e-8)
    assert numbers["linear, random_features head: rel. error to oracle KRR"] == ", ".join(
        f"m={w}: {e:.3g}" for w, e in zip(ref["widths"], ref["model_error"]))
    assert numbers[f"linear: smallest width with error < {ref['tolerance']:g} (random features)"] == 6
    gap = float(np.max(np.abs(ref["model_error"] - ref["krr_error"])))
    assert numbers["linear: max |model - KRR on features| (error units)"] == pytest.approx(gap, rel=1e-6)
    lines = result.summary().splitlines()
    assert lines[0] == f"linear: d_eff(lam=0.1): {ref['d_eff']:.4g}"
    assert lines[2].endswith(": 6") and lines[3] == f"linear: max |model - KRR on features| (error units): {gap:.4g}"


def test_width_to_dict_is_json_and_carries_the_study_and_headline_numbers(width_reference):
    """to_dict() survives JSON and holds the NumPy errors, the tolerance width and the tolerance."""
    result, ref = width_reference
    document = json.loads(json.dumps(result.to_dict()))
    assert document["width_for_tolerance"] == {"linear": 6} and document["tolerance"] == pytest.approx(ref["tolerance"])
    assert document["study"]["widths"] == list(ref["widths"])
    (curve,) = document["study"]["curves"]
    np.testing.assert_allclose(curve["error"], ref["model_error"], rtol=1e-8)
    np.testing.assert_allclose(curve["feature_krr_error"], ref["krr_error"], rtol=1e-8)


def test_width_plot_draws_the_numpy_errors_against_width_and_marks_d_eff(width_reference):
    """Read back from the figure: an error curve at x = widths, y = NumPy errors, and a vertical
    line at the NumPy d_eff; log-log axes."""
    result, ref = width_reference
    figure = result.plot()
    try:
        ax = figure.axes[0]
        curves = [line for line in ax.lines if len(line.get_xdata()) == len(ref["widths"])
                  and np.allclose(np.asarray(line.get_xdata(), float), ref["widths"])]
        assert any(np.allclose(np.asarray(line.get_ydata(), float), ref["model_error"], rtol=1e-8) for line in curves)
        verticals = [line for line in ax.lines if np.ptp(np.asarray(line.get_xdata(), float)) == 0 and len(line.get_xdata()) == 2]
        assert any(np.asarray(line.get_xdata(), float)[0] == pytest.approx(ref["d_eff"], rel=1e-8) for line in verticals)
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    finally:
        plt.close(figure)


def _lens(scores, ci, distance, best, identified, runner_up, gap, gap_ci, equivalent):
    return LensResult(scores=scores, score_ci=ci, profile_distance=distance, aligned_steps={name: [1, 2] for name in scores},
                      model_profile=[-1.0, -2.0], algorithm_profiles={name: [0.0, -1.0, -2.0] for name in scores}, best=best,
                      identified=identified, runner_up=runner_up, gap=gap, gap_ci=gap_ci, equivalent=equivalent, message="hand-built")


@pytest.fixture
def hand_built_profile():
    names = ("cg", "gd", "richardson_rowsum", "richardson_jacobi", "chebyshev")
    readout = _lens(dict(zip(names, (0.9, 0.5, 0.95, 0.7, 0.1))), {name: (0.1, 0.99) for name in names},
                    dict(zip(names, (0.3, 0.5, 0.1, 0.2, 0.9))), "richardson_rowsum", True, "cg", 0.05, (0.01, 0.09), [])
    ridge = _lens(dict(zip(names, (0.6, 0.8, 0.4, 0.2, 0.0))), {name: (0.0, 1.0) for name in names},
                  dict(zip(names, (0.4, 0.2, 0.6, 0.7, 0.8))), "gd", False, None, None, None, ["cg"])
    return RichardsonProfileResult(checkpoint="ckpt", lenses={"readout": readout, "ridge": ridge}, layers=[1, 2], n_steps=2, lam=0.04,
                                   kernel="gaussian", batch_size=4, train_batch_size=8, step_sizes="fitted")


def test_richardson_profile_summary_is_the_hand_ranked_key_numbers(hand_built_profile):
    """Hand-built lenses: rankings, Richardson ranks, closest profiles and verdict lines by hand."""
    assert hand_built_profile.summary().splitlines() == [
        "readout: path R2, top 4: richardson_rowsum 0.950 [0.100, 0.990], cg 0.900 [0.100, 0.990], "
        "richardson_jacobi 0.700 [0.100, 0.990], gd 0.500 [0.100, 0.990]",
        "readout: rank of preconditioned Richardson by path R2: richardson_rowsum #1, richardson_jacobi #3",
        "readout: closest error profile (Yan et al.'s comparison): richardson_rowsum 0.100, richardson_jacobi 0.200, cg 0.300",
        "readout: verdict: identified; best richardson_rowsum, runner-up cg gap +0.0500 [+0.0100, +0.0900]",
        "ridge: path R2, top 4: gd 0.800 [0.000, 1.000], cg 0.600 [0.000, 1.000], richardson_rowsum 0.400 [0.000, 1.000], "
        "richardson_jacobi 0.200 [0.000, 1.000]",
        "ridge: rank of preconditioned Richardson by path R2: richardson_rowsum #3, richardson_jacobi #4",
        "ridge: closest error profile (Yan et al.'s comparison): gd 0.200, cg 0.400, richardson_rowsum 0.600",
        "ridge: verdict: not identified; best gd; inseparable: cg",
    ]


def test_richardson_profile_to_dict_is_plain_json_of_every_field(hand_built_profile):
    """to_dict() of the hand-built result: JSON with every field as built (tuples as lists, None kept)."""
    document = json.loads(json.dumps(hand_built_profile.to_dict()))
    assert {key: document[key] for key in ("checkpoint", "layers", "n_steps", "lam", "kernel", "batch_size", "train_batch_size",
                                            "step_sizes")} == {"checkpoint": "ckpt", "layers": [1, 2], "n_steps": 2, "lam": 0.04,
                                                               "kernel": "gaussian", "batch_size": 4, "train_batch_size": 8,
                                                               "step_sizes": "fitted"}
    assert document["lenses"]["readout"]["scores"]["richardson_rowsum"] == 0.95
    assert document["lenses"]["readout"]["gap_ci"] == [0.01, 0.09]
    assert document["lenses"]["ridge"]["runner_up"] is None and document["lenses"]["ridge"]["equivalent"] == ["cg"]
