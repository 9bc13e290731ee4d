"""mi_krr.checkpoints claims pinned against their documented rules: where a shipped run is looked
for, which task family, label scale, sizes and ridge a loaded run comes with, and which task sets
are drawn or left out (with closed-form prompt lengths)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import mi_krr
from mi_krr.checkpoints import NOISELESS_LAM, load_checkpoint, shipped_checkpoint, task_sets
from mi_krr.models import ICLTransformer, ICLTransformerConfig
from mi_krr.tasks import DEFAULT_SHIFTS, LinearRegressionSampler
from mi_krr.tasks.samplers import GPRegressionSampler
from mi_krr.train.checkpoint import save_model


def _run_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").touch()
    return path


def test_shipped_checkpoint_takes_the_nearest_parent_that_has_the_run(tmp_path, monkeypatch):
    _run_folder(tmp_path / "checkpoints" / "linear_lr")
    nearer = _run_folder(tmp_path / "a" / "checkpoints" / "linear_lr")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b" / "c")  # ./checkpoints absent: parents b, a, tmp_path in that order
    assert shipped_checkpoint("linear_lr").resolve() == nearer.resolve()


def test_shipped_checkpoint_skips_a_file_with_the_runs_name(tmp_path, monkeypatch):
    expected = _run_folder(tmp_path / "checkpoints" / "softmax_gp")
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "softmax_gp").write_text("not a run folder")
    monkeypatch.chdir(tmp_path / "a")
    assert shipped_checkpoint("softmax_gp").resolve() == expected.resolve()


def test_shipped_checkpoint_falls_back_to_the_checkouts_checkpoints_beside_the_package(tmp_path, monkeypatch):
    beside = Path(mi_krr.__file__).resolve().parent.parent / "checkpoints" / "softmax_gp"
    if not beside.is_dir() or any((parent / "checkpoints" / "softmax_gp").is_dir() for parent in tmp_path.parents):
        pytest.skip("needs the shipped softmax_gp beside the package and none above the temporary folder")
    monkeypatch.chdir(tmp_path)
    assert shipped_checkpoint("softmax_gp").resolve() == beside


def _garg_run(folder: Path, n_dims: int = 3, n_positions: int = 8) -> Path:
    """A Garg et al. run folder (config.yaml + model_10.pt) of a one-layer GPT-2."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    conf = GPT2Config(n_positions=2 * n_positions, n_embd=8, n_layer=1, n_head=2, vocab_size=3)
    state = {f"_backbone.{k}": v for k, v in GPT2Model(conf).state_dict().items()}
    state.update({f"_read_in.{k}": v for k, v in torch.nn.Linear(n_dims, 8).state_dict().items()})
    state.update({f"_read_out.{k}": v for k, v in torch.nn.Linear(8, 1).state_dict().items()})
    model = {"family": "gpt2", "n_dims": n_dims, "n_positions": n_positions, "n_embd": 8, "n_layer": 1, "n_head": 2}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    torch.save(state, folder / "model_10.pt")
    return folder


@pytest.fixture(scope="module")
def garg_run(tmp_path_factory):
    return _garg_run(tmp_path_factory.mktemp("garg"))


def test_asking_for_a_garg_runs_own_family_keeps_its_label_scale_and_ridge(garg_run):
    loaded = load_checkpoint(garg_run, task="linear_regression")
    assert loaded.label_scale == math.sqrt(3) and loaded.lam == NOISELESS_LAM
    assert not any("replaced" in note for note in loaded.notes)


def test_another_family_takes_its_defaults_unscaled_labels_and_its_noise_ridge(garg_run):
    loaded = load_checkpoint(garg_run, task="gp_regression")
    assert loaded.sampler == GPRegressionSampler(3)  # the family's defaults at the model's n_dims
    assert loaded.label_scale == 1.0  # sqrt(d) matched Garg's N(0, I) weights, not GP draws
    assert loaded.sampler.noise_std > 0 and loaded.lam is None  # noisy labels: the ridge is the noise variance
    assert any("replaced by gp_regression" in note for note in loaded.notes)


def test_an_explicit_ridge_and_sizes_override_a_garg_runs_defaults(garg_run):
    loaded = load_checkpoint(garg_run, lam=0.3, n_support=2, n_query=5)
    assert (loaded.lam, loaded.n_support, loaded.n_query) == (0.3, 2, 5)
    assert not any("KRR ridge" in note for note in loaded.notes)  # the noiseless-default note
    with pytest.raises(ValueError, match="n_support"):
        load_checkpoint(garg_run, n_support=0)


@pytest.mark.parametrize("noise_std, lam", [(0.2, None), (0.0, NOISELESS_LAM)])
def test_an_mi_krr_run_without_n_query_diagnoses_8_queries_and_a_ridge_only_for_noiseless_labels(tmp_path, noise_std, lam):
    torch.manual_seed(0)
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=2))
    sampler = LinearRegressionSampler(2, noise_std=noise_std)
    save_model(tmp_path / "model.safetensors", model)
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config_dict(), "sampler": sampler.to_config(), "train": {"n_support": 5}}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.format == "mi-krr" and loaded.sampler == sampler
    assert (loaded.n_support, loaded.n_query, loaded.lam, loaded.label_scale) == (5, 8, lam, 1.0)


def test_task_sets_leave_out_shifts_that_do_not_apply_naming_each_one():
    # linear regression has no kernel (no bandwidth shifts) and isotropic inputs (no rotation)
    sets, notes = task_sets(LinearRegressionSampler(2), batch_size=2, n_support=3, n_query=1, seed=0)
    left_out = {"bandwidth_x0.5", "bandwidth_x2", "covariance_rotation"}
    assert set(sets) == ({"in_distribution"} | set(DEFAULT_SHIFTS)) - left_out
    assert sorted(note.split()[1] for note in notes) == sorted(left_out)
    reasons = {note.split()[1]: note for note in notes}
    assert all(note.startswith("shift ") for note in notes)
    assert "needs a GP sampler" in reasons["bandwidth_x0.5"] and "needs a GP sampler" in reasons["bandwidth_x2"]
    assert "needs anisotropic inputs" in reasons["covariance_rotation"]


def test_task_sets_leave_out_prompts_longer_than_the_models_positions():
    # interleaved prompts take 2 n + 1 tokens: n = 4 fits in 12 positions, the doubled n = 8 (17) does not
    model = ICLTransformer(ICLTransformerConfig(n_dims=2, d_model=8, n_layers=1, n_heads=2, layout="interleaved", max_seq_len=12))
    sampler = LinearRegressionSampler(2)
    unrestricted, _ = task_sets(sampler, batch_size=2, n_support=4, n_query=1, seed=0)
    sets, notes = task_sets(sampler, batch_size=2, n_support=4, n_query=1, seed=0, model=model)
    assert unrestricted["longer_prompts_x2"].n_support == 8
    assert set(sets) == set(unrestricted) - {"longer_prompts_x2"}
    assert all(2 * task.n_support + 1 <= 12 for task in sets.values())
    assert [note for note in notes if note.startswith("longer_prompts_x2 left out")]
