"""The README's quick-start snippet runs exactly as written (a newcomer pastes it first)."""

import re
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    """The first ```python block under the "## Quick start" heading."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README's Quick start section has no ```python block"
    return blocks[0]


def test_quick_start_snippet_runs_and_returns_what_its_comments_promise(capsys, monkeypatch):
    import matplotlib.pyplot as plt

    import probes

    monkeypatch.chdir(README.parent / "examples")  # shipped_checkpoint must find checkpoints/ from inside the repository
    namespace: dict = {}
    exec(compile(quick_start_code(), str(README), "exec"), namespace)
    model, task, lens, diagnosis = (namespace[name] for name in ("model", "task", "lens", "diagnosis"))
    assert tuple(task.x_support.shape) == (128, 24, 2)  # the comment's shape
    assert tuple(lens.shape) == (128, model.n_layers + 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(lens[:, -1].float(), model.predict(task), rtol=1e-5, atol=1e-6)  # the lens's last layer is the model's output
    assert isinstance(diagnosis, probes.Diagnosis) and capsys.readouterr().out.startswith("== tasks: 128 prompts")
    plt.close("all")
