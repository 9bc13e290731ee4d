"""The example notebooks are committed clean, match their generator, and run top to bottom on a
real Jupyter kernel of this interpreter.

The kernel is launched from a kernelspec written to a temporary folder with argv[0] =
`sys.executable`, so the test runs the venv's Python whether or not a "python3" kernelspec is
registered. Kernel environment: MPLBACKEND=Agg (no display); OMP_NUM_THREADS=1 unless set (the
notebooks' models are tiny, and on a shared 2-core runner torch's default thread pool
oversubscribes the CPU and runs several times slower).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KERNEL_NAME = "mi-krr-test-python"
CELL_TIMEOUT_S = 300  # a hang guard, not a speed check (see the notebook times in examples/README.md)


def _generator():
    spec = importlib.util.spec_from_file_location("build_notebooks", EXAMPLES / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
NOTEBOOKS = sorted(GENERATOR.NOTEBOOKS)


def test_every_notebook_in_examples_has_a_generator_entry():
    assert sorted(path.stem for path in EXAMPLES.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_matches_build_notebooks(name):
    path = EXAMPLES / f"{name}.ipynb"
    assert path.read_text() == GENERATOR.render(name), f"{path.name} is stale: run examples/build_notebooks.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    for cell in code_cells:
        assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {cell.id} was saved with outputs"


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec folder holding one kernel: this interpreter running ipykernel."""
    folder = tmp_path_factory.mktemp("kernels")
    spec = folder / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "mi-krr test", "language": "python"})
    )
    return KernelSpecManager(kernel_dirs=[str(folder)])


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_errors(name, kernel_spec_manager, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)", id="kernel-check"))
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(EXAMPLES)}})
    started = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on the first failing cell
    finally:
        if manager.has_kernel:  # nbclient leaves a kernel manager it was handed running
            manager.shutdown_kernel(now=True)
    elapsed = time.perf_counter() - started
    print(f"{name}: {elapsed:.1f} s")
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable
