"""One-line reprs of the result dataclasses (`mi_krr._repr.compact_repr`): what a notebook shows
when a cell ends with a task, a trajectory or a probe result. Checked against the shapes, dtypes and
field names of hand-built objects, and on the objects a real diagnosis returns."""

import dataclasses

import numpy as np
import pytest
import torch

import probes
from mi_krr._repr import MAX_ITEMS, MAX_TEXT, compact, compact_repr
from mi_krr.construct import gd_transformer
from mi_krr.kernels import linear_kernel
from mi_krr.solvers import cg
from mi_krr.tasks import LinearRegressionSampler


@pytest.mark.parametrize(
    "value, text",
    [
        (torch.zeros(3, 0, 2, dtype=torch.float64), "tensor[3, 0, 2] float64"),
        (torch.zeros((), dtype=torch.int64), "tensor[] int64"),
        (torch.zeros(4, device="meta"), "tensor[4] float32 meta"),
        (np.zeros((2, 5), dtype=np.float32), "array[2, 5] float32"),
        (torch.nn.Linear(2, 3), "Linear(...)"),
        (0.123456789, "0.1235"),
        (np.float64(2.5e-7), "2.5e-07"),
        (3, "3"),
        (None, "None"),
        ({"a": torch.zeros(2), "b": [1.0, 2]}, "{'a': tensor[2] float32, 'b': [1, 2]}"),
        ((torch.zeros(1),), "(tensor[1] float32,)"),
        ((1, 2), "(1, 2)"),
    ],
)
def test_compact_writes_shapes_dtypes_and_short_numbers(value, text):
    assert compact(value) == text


def test_compact_counts_what_it_leaves_out_of_long_containers_and_cuts_long_text():
    many = {f"k{i}": i for i in range(MAX_ITEMS + 2)}
    assert compact(many) == "{" + ", ".join(f"'k{i}': {i}" for i in range(MAX_ITEMS)) + ", ... (2 more)}"
    assert compact(list(range(MAX_ITEMS + 5))) == "[" + ", ".join(map(str, range(MAX_ITEMS))) + ", ... (5 more)]"
    text = compact("x" * 200)
    assert len(text) == MAX_TEXT and text == repr("x" * 200)[: MAX_TEXT - 3] + "..."


def test_compact_repr_lists_every_shown_field_in_order_and_nested_results_by_class_name():
    @dataclasses.dataclass
    class Inner:
        values: torch.Tensor

    @dataclasses.dataclass
    class Outer:
        __repr__ = compact_repr

        name: str
        inner: Inner
        hidden: torch.Tensor = dataclasses.field(repr=False, default=None)

    outer = Outer("run", Inner(torch.ones(5)), torch.ones(2))
    assert repr(outer) == "Outer(name='run', inner=Inner(...))"


def fields_in_order(value) -> list[str]:
    return [field.name for field in dataclasses.fields(value) if field.repr]


@pytest.fixture(scope="module")
def results():
    """A task, a CG trajectory, and the pieces of a small diagnosis (softmax-free GD construction)."""
    task = LinearRegressionSampler(2, noise_std=0.1).sample(24, 5, 3, seed=0, dtype=torch.float64)
    K, K_query = linear_kernel(task.x_support), linear_kernel(task.x_query, task.x_support)
    trajectory = cg(K, task.y_support, 0.1, 3, K_query=K_query)
    model = gd_transformer(2, 0.05, dim=2)
    diagnosis = probes.diagnose(model, task, lam=0.1, n_steps=4, kernels=(), bootstrap=100, progress=False,
                                algorithms=("gd", "cg"))
    result = diagnosis["tasks"]
    return {"task": task, "trajectory": trajectory, "task_set": result, "score": result.scores["gd"],
            "verdict": result.verdict, "fitted_step": result.fitted_steps["gd"], "stratum": result.scores["gd"].strata[0],
            "attached": probes.attach(model)}


@pytest.mark.parametrize("name", ["task", "trajectory", "task_set", "score", "verdict", "fitted_step", "stratum", "attached"])
def test_result_objects_print_on_one_line_with_their_shapes(results, name):
    """Each result's repr is one line, names every field in order, and writes its tensors and
    arrays as their own shapes and dtypes (never their values)."""
    value = results[name]
    text = repr(value)
    assert "\n" not in text and text.startswith(type(value).__name__ + "(")
    positions = [text.index(f"{field}=") for field in fields_in_order(value)]
    assert positions == sorted(positions)
    for field in fields_in_order(value):
        item = getattr(value, field)
        if isinstance(item, torch.Tensor):
            assert f"{field}=tensor{list(item.shape)} {str(item.dtype).removeprefix('torch.')}" in text
        elif isinstance(item, np.ndarray):
            assert f"{field}=array{list(item.shape)} {item.dtype}" in text
    assert len(text) < 2500
