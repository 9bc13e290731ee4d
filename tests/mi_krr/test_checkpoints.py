"""Finding and recognising checkpoints, and the prompts drawn for them: formats from the files a
run folder holds, the shipped runs found from a nested working directory, task sets with the
requested shapes, and labels scaled by exactly the factor asked for."""

from __future__ import annotations

import pytest
import torch

from mi_krr.checkpoints import checkpoint_format, scaled_labels, shipped_checkpoint, task_sets
from mi_krr.tasks import LinearRegressionSampler


def make_run(folder, *files):
    """`folder` created with the empty `files` (relative paths) in it; returns `folder`."""
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


@pytest.mark.parametrize(
    ("files", "target", "expected"),
    [
        (["config.json"], ".", "mi-krr"),
        (["config.json", "model.safetensors"], "model.safetensors", "mi-krr"),
        (["config.json", "state/step_10.pt"], "state/step_10.pt", "mi-krr"),
        (["config.yaml"], ".", "garg"),
        (["config.yaml", "state.pt"], "state.pt", "garg"),
    ],
)
def test_checkpoint_format_follows_the_config_file_beside_the_weights(tmp_path, files, target, expected):
    run = make_run(tmp_path / "run", *files)
    assert checkpoint_format(run / target) == expected


def test_checkpoint_format_rejects_other_files_naming_what_is_supported(tmp_path):
    run = make_run(tmp_path / "run", "config.json", "notes.txt")
    with pytest.raises(ValueError, match=r"\.safetensors or \.pt") as error:
        checkpoint_format(run / "notes.txt")
    assert "config.json" in str(error.value) and "config.yaml" in str(error.value)


def test_checkpoint_format_rejects_a_folder_without_a_config(tmp_path):
    run = make_run(tmp_path / "run", "weights.pt")
    with pytest.raises(ValueError, match="no config.json or config.yaml"):
        checkpoint_format(run)


def test_checkpoint_format_of_a_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint_format(tmp_path / "absent")


def test_shipped_checkpoint_is_found_from_a_nested_working_directory(tmp_path, monkeypatch):
    expected = make_run(tmp_path / "checkpoints" / "softmax_gp", "config.json")
    nested = tmp_path / "examples" / "deeper"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert shipped_checkpoint("softmax_gp").resolve() == expected.resolve()


def test_shipped_checkpoint_prefers_the_nearest_checkpoints_folder(tmp_path, monkeypatch):
    make_run(tmp_path / "checkpoints" / "linear_lr", "config.json")
    nearest = make_run(tmp_path / "examples" / "checkpoints" / "linear_lr", "config.json")
    monkeypatch.chdir(tmp_path / "examples")
    assert shipped_checkpoint("linear_lr").resolve() == nearest.resolve()


def test_shipped_checkpoint_in_a_given_folder_only(tmp_path):
    expected = make_run(tmp_path / "elsewhere" / "softmax_gp", "config.json")
    assert shipped_checkpoint("softmax_gp", tmp_path / "elsewhere") == expected
    with pytest.raises(FileNotFoundError, match="--checkpoints") as error:
        shipped_checkpoint("softmax_gp", tmp_path)
    assert "mi-krr train --preset softmax_gp" in str(error.value)


def test_shipped_checkpoint_absent_names_the_fix_and_an_unknown_name_lists_the_shipped_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="run inside the repository") as error:
        shipped_checkpoint("linear_lr", folder=tmp_path)
    assert f"mi-krr train --preset linear_lr --out {tmp_path / 'linear_lr'}" in str(error.value)
    with pytest.raises(ValueError, match="name must be a shipped run, one of 'softmax_gp', 'linear_lr', got 'no_such_run'"):
        shipped_checkpoint("no_such_run")


def test_task_sets_without_shifts_is_one_in_distribution_set_of_the_requested_shapes():
    sampler = LinearRegressionSampler(3)
    sets, notes = task_sets(sampler, batch_size=5, n_support=7, n_query=2, seed=11, shifts=False)
    assert list(sets) == ["in_distribution"] and notes == []
    task = sets["in_distribution"]
    assert tuple(task.x_support.shape) == (5, 7, 3) and tuple(task.y_support.shape) == (5, 7)
    assert tuple(task.x_query.shape) == (5, 2, 3) and tuple(task.y_query.shape) == (5, 2)
    drawn = sampler.sample(5, 7, 2, seed=11, dtype=torch.float32)  # "drawn with seed"
    assert torch.equal(task.x_support, drawn.x_support) and torch.equal(task.y_query, drawn.y_query)


@pytest.mark.parametrize("factor", [0.5, 3.0, -2.0])
def test_scaled_labels_multiplies_both_label_tensors_exactly(factor):
    task = LinearRegressionSampler(2).sample(4, 6, 3, seed=0, dtype=torch.float64)
    scaled = scaled_labels(task, factor)
    assert torch.equal(scaled.y_support, task.y_support * factor)
    assert torch.equal(scaled.y_query, task.y_query * factor)
    assert torch.equal(scaled.x_support, task.x_support) and torch.equal(scaled.x_query, task.x_query)
    assert scaled.info["label_scale"] == factor


def test_task_sets_scale_the_labels_by_label_scale():
    sampler = LinearRegressionSampler(2)
    plain, _ = task_sets(sampler, 4, 6, 3, seed=2, shifts=False)
    scaled, _ = task_sets(sampler, 4, 6, 3, seed=2, shifts=False, label_scale=4.0)
    assert torch.equal(scaled["in_distribution"].y_support, 4.0 * plain["in_distribution"].y_support)
    assert torch.equal(scaled["in_distribution"].y_query, 4.0 * plain["in_distribution"].y_query)
