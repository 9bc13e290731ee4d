"""Mutation review (21b) of the serialization round (10e1f80..HEAD in mi_krr/ and probes/): the
pickling of bridge-backed models (mi_krr/models/bridge.py: BridgeBackedMixin.__reduce__,
__deepcopy__, _rebuild_arguments, _rebuilt_bridge_backed_model; mi_krr/models/garg.py's
_rebuild_arguments), save_model's new refusals (mi_krr/train/checkpoint.py), load_construction's
error handling (mi_krr/commands/construct.py) and ICLTask.to (mi_krr/tasks/task.py).

Counts: 30 mutants planted one at a time in a copy of the repository (run against
tests/test_usage_serialization.py and the bridge, checkpoint, garg, tasks and constructions test
files): 20 killed by the existing tests, 10 survived, 9 of them killed by the tests below, 1
equivalent here: BridgeICLModel._rebuild_arguments passing device=<the parameters' device> (the
rebuild then happens on that device, but the pickled parameters replace the fresh ones, so on this
CPU-only machine nothing changes; on a GPU it would build on CUDA and draw from the CUDA generator,
which fork_rng(devices=[]) does not fork). Survivors: named_parameters / named_buffers with
remove_duplicate=True (the shipped models' duplicate names are module aliases, so only a parameter
or buffer shared by two modules, as in a user's subclass, breaks); __deepcopy__ without its memo
entry, or deep-copying the attributes with a fresh memo (a hook that is the model's own method is
then bound to a second copy, or recurses); save_model's folder refusal suggesting "<folder>.safetensors"
beside the folder instead of a file in it; ValueError (a circular run_config) not caught as
"run_config must be JSON-able"; UnicodeDecodeError, TypeError (a JSON list or string) and OSError
(a read error) left out of load_construction's caught errors. No real bug found.

References, independent of the code under test: the in-memory original (its parameter objects,
the sharing of a tied parameter and a tied buffer in a user's subclass, its predictions), what
`load_model` reads back from the path the error message suggests, and the documented messages
("run_config must be JSON-able").
"""

from __future__ import annotations

import copy
import pickle
import re
import shutil

import pytest
import torch
from torch import nn

import probes
from mi_krr.models import BridgeICLModel, ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import GPRegressionSampler
from mi_krr.train import load_model, save_model

TINY = dict(n_dims=2, d_model=16, n_layers=2, n_heads=2)
GP = GPRegressionSampler(2, noise_std=0.1)


class TiedBridge(BridgeICLModel):
    """A user's subclass (module level, so pickle can name it) with a second read-in that shares the
    first one's weight, and a buffer registered on two modules."""

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device=device)
        self.shadow = nn.Linear(cfg.n_dims, cfg.d_model)
        self.shadow.weight = self.read_in.weight
        self.scale_a, self.scale_b = nn.Module(), nn.Module()
        scale = torch.ones(3)
        self.scale_a.register_buffer("scale", scale)
        self.scale_b.register_buffer("scale", scale)


def test_a_pickled_subclass_keeps_a_tied_parameter_and_a_tied_buffer_shared_with_the_pickled_values():
    """__reduce__ promises parameters keep their identity: a weight shared by two modules must come
    back as one object holding the original's values (not the fresh constructor's), same for a
    buffer registered on two modules."""
    torch.manual_seed(0)
    model = TiedBridge(ICLTransformerConfig(**TINY))
    with torch.no_grad():
        model.read_in.weight.add_(1.0)
        model.scale_a.scale.mul_(3.0)
    torch.manual_seed(123)  # the rebuild must not matter: the pickled values are what come back
    back = pickle.loads(pickle.dumps(model))
    assert back.shadow.weight is back.read_in.weight
    assert torch.equal(back.shadow.weight, model.read_in.weight)
    assert back.scale_a.scale is back.scale_b.scale
    assert torch.equal(back.scale_b.scale, torch.full((3,), 3.0))


def test_save_model_into_a_folder_suggests_a_path_that_load_model_of_that_folder_reads_back(tmp_path):
    """The folder refusal suggests a file name; saving there must give a folder `load_model(folder)`
    reads (the suggestion is inside the folder, not beside it)."""
    model = ICLTransformer(ICLTransformerConfig(**TINY)).eval()
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ValueError) as error:
        save_model(folder, model)
    suggested = re.search(r"pass e\.g\. '([^']+)'", str(error.value)).group(1)
    save_model(suggested, model)
    task = GP.sample(2, 5, 2, seed=0)
    assert torch.equal(probes.layer_predictions(load_model(folder), task), probes.layer_predictions(model, task))


def test_save_model_with_a_circular_run_config_names_run_config_and_writes_nothing(tmp_path):
    """json.dumps raises ValueError (not TypeError) for a circular dict: still the documented
    "run_config must be JSON-able" refusal."""
    model = ICLTransformer(ICLTransformerConfig(**TINY))
    run_config = {"lr": 0.1}
    run_config["self"] = run_config
    with pytest.raises(ValueError, match="run_config must be JSON-able"):
        save_model(tmp_path / "model.safetensors", model, run_config=run_config)
    assert list(tmp_path.iterdir()) == []


class RecordingBridge(BridgeICLModel):
    """A user's subclass whose forward hook is one of its own methods (the hook refers back to the
    model: a cycle deepcopy must close on the copy)."""

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device=device)
        self.calls = 0
        self.register_forward_hook(self.count)

    def count(self, module, inputs, output):
        self.calls += 1


def test_deepcopy_of_a_model_whose_hook_is_its_own_method_binds_the_hook_to_the_copy():
    model = RecordingBridge(ICLTransformerConfig(**TINY)).eval()
    clone = copy.deepcopy(model)
    probes.layer_predictions(clone, GP.sample(2, 5, 2, seed=0))
    assert clone.calls > 0 and model.calls == 0


@pytest.fixture(scope="module")
def saved_construction(tmp_path_factory):
    from mi_krr.cli import main

    out = tmp_path_factory.mktemp("construction") / "gd"
    assert main(["construct", "gd", "--steps", "2", "--dim", "2", "--n-support", "5", "--batch", "2", "--save", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b'"arguments"'], ids=["not_utf8", "json_list", "json_string"])
def test_load_construction_of_a_record_that_is_not_a_utf8_json_object_is_a_value_error_naming_it(content, saved_construction, tmp_path, capsys):
    from mi_krr.commands.construct import load_construction

    out = shutil.copytree(saved_construction, tmp_path / "gd")
    capsys.readouterr()
    (out / "construction.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"construction\.json is not a construction record"):
        load_construction(out)


def test_load_construction_reports_a_read_error_of_the_weights_naming_the_file(saved_construction, tmp_path, monkeypatch):
    """An OSError while reading model.safetensors (an I/O error on a network drive; simulated, as
    root reads any file) is the documented ValueError naming the file."""
    import safetensors.torch

    from mi_krr.commands.construct import load_construction

    out = shutil.copytree(saved_construction, tmp_path / "gd")

    def failing_read(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "load_file", failing_read)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_construction(out)
