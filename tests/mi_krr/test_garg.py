"""load_garg_checkpoint: a checkpoint written here in Garg et al.'s format reproduces the plain HF
GPT-2 computation, and broken checkpoints fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2Model

from mi_krr.models import adapter_for, load_garg_checkpoint
from mi_krr.models.encoding import interleave_pairs
from mi_krr.tasks import ICLTask
from prompts import random_task

D, N_POSITIONS, N_EMBD, N_LAYER, N_HEAD = 3, 8, 16, 2, 2
MODEL_SECTION = {"family": "gpt2", "n_dims": D, "n_positions": N_POSITIONS, "n_embd": N_EMBD, "n_layer": N_LAYER, "n_head": N_HEAD}


class GargReference(torch.nn.Module):
    """Garg's TransformerModel, rebuilt with plain HF modules (default vocabulary, old buffers)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        conf = GPT2Config(n_positions=2 * N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        self._read_in = torch.nn.Linear(D, N_EMBD)
        self._backbone = GPT2Model(conf)
        self._read_out = torch.nn.Linear(N_EMBD, 1)
        self.eval()

    def garg_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        for layer in range(N_LAYER):  # buffers old transformers saved with each attention layer
            state[f"_backbone.h.{layer}.attn.bias"] = torch.tril(torch.ones(2 * N_POSITIONS, 2 * N_POSITIONS)).view(1, 1, 2 * N_POSITIONS, 2 * N_POSITIONS)
            state[f"_backbone.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
        return state

    @torch.no_grad()
    def predictions(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Garg's forward: `prediction[:, ::2, 0]` over x_1, y_1, ..., x_k, y_k."""
        hidden = self._backbone(inputs_embeds=self._read_in(interleave_pairs(xs, ys))).last_hidden_state
        return self._read_out(hidden)[:, ::2, 0]


def write_run(folder: Path, model_section: dict = MODEL_SECTION) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model_section, "training": {"task": "linear_regression"}}))
    return folder


def make_task() -> ICLTask:
    return random_task(2, 5, 3, D, seed=1, dtype=torch.float32)


def assert_matches_reference(model, reference: GargReference, task: ICLTask) -> None:
    torch.testing.assert_close(model.prefix_predictions(task), reference.predictions(task.x_support, task.y_support), rtol=1e-5, atol=1e-5)
    pred = model.predict(task)
    for j in range(task.n_query):
        xs = torch.cat([task.x_support, task.x_query[:, j : j + 1]], dim=1)
        ys = torch.cat([task.y_support, torch.zeros_like(task.y_query[:, j : j + 1])], dim=1)
        torch.testing.assert_close(pred[:, j], reference.predictions(xs, ys)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference() -> GargReference:
    return GargReference(seed=0)


@pytest.fixture(scope="module")
def state_run(tmp_path_factory, reference) -> Path:
    folder = write_run(tmp_path_factory.mktemp("garg") / "run")
    torch.save({"model_state_dict": reference.garg_state_dict(), "optimizer_state_dict": {}, "train_step": 1234}, folder / "state.pt")
    return folder


def test_loader_reproduces_plain_hf_gpt2_predictions_from_state_pt(state_run, reference):
    model = load_garg_checkpoint(state_run)
    assert model.source["train_step"] == 1234
    assert_matches_reference(model, reference, make_task())
    adapter_for(model)


def test_garg_allowed_attention_is_gpt2s_causal_mask(state_run):
    """A Garg model's allowed_attention is lower-triangular over each sequence, and equals where
    GPT-2's applied weights are nonzero."""
    model = load_garg_checkpoint(state_run)
    prompt = model.encode(make_task())
    allowed, seq = model.allowed_attention(prompt), prompt.tokens.shape[1]
    assert torch.equal(allowed, torch.tril(torch.ones(seq, seq, dtype=torch.bool)))
    _, cache = model.run_with_cache(prompt.tokens)
    for hooks in model.attention_hook_names():
        assert ((cache[hooks.pattern] > 0) == allowed).all()


def test_loader_picks_newest_model_step_file_or_the_one_asked_for(tmp_path):
    folder = write_run(tmp_path / "run")
    older, newer = GargReference(seed=1), GargReference(seed=2)
    torch.save(older.garg_state_dict(), folder / "model_900.pt")
    torch.save(newer.garg_state_dict(), folder / "model_10000.pt")
    task = make_task()
    assert_matches_reference(load_garg_checkpoint(folder), newer, task)
    assert_matches_reference(load_garg_checkpoint(folder, step=900), older, task)
    assert_matches_reference(load_garg_checkpoint(folder / "model_900.pt"), older, task)


def test_garg_hooks_give_pre_softmax_scores_and_residuals_that_read_out_to_predictions(state_run):
    model = load_garg_checkpoint(state_run)
    prompt = model.encode(make_task())
    out, cache = model.run_with_cache(prompt.tokens)
    for hooks in model.attention_hook_names():
        torch.testing.assert_close(torch.softmax(cache[hooks.scores], dim=-1), cache[hooks.pattern], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.readout(cache[model.residual_hook_names()[-1]]), out, rtol=1e-5, atol=1e-6)


def test_truncated_weights_file_raises_clear_error(state_run, tmp_path):
    folder = write_run(tmp_path / "run")
    data = (state_run / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"state\.pt \(\w+\): the file is truncated, corrupt or not a torch checkpoint"):
        load_garg_checkpoint(folder)


def test_missing_config_key_raises_clear_error(tmp_path, reference):
    section = {key: value for key, value in MODEL_SECTION.items() if key != "n_head"}
    folder = write_run(tmp_path / "run", section)
    torch.save(reference.garg_state_dict(), folder / "model_1.pt")
    with pytest.raises(ValueError, match=r"lacks model\.n_head"):
        load_garg_checkpoint(folder)


def test_config_that_does_not_match_weight_shapes_raises_clear_error(tmp_path, reference):
    folder = write_run(tmp_path / "run", {**MODEL_SECTION, "n_dims": D + 2})
    torch.save(reference.garg_state_dict(), folder / "model_1.pt")
    with pytest.raises(ValueError, match=r"weight '_read_in.weight' has shape \(16, 3\) but config.yaml .* implies \(16, 5\)"):
        load_garg_checkpoint(folder)


def test_missing_checkpoint_and_missing_weights_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no Garg checkpoint at"):
        load_garg_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no weights in"):
        load_garg_checkpoint(write_run(tmp_path / "empty"))


def test_task_of_wrong_dimension_raises_clear_error(state_run):
    model = load_garg_checkpoint(state_run)
    wrong = ICLTask(torch.randn(1, 4, D + 1), torch.randn(1, 4), torch.randn(1, 1, D + 1), torch.randn(1, 1))
    with pytest.raises(ValueError, match=r"task dimension d=4 does not fit this model \(n_dims=3\)"):
        model.predict(wrong)
    too_long = ICLTask(torch.randn(1, N_POSITIONS, D), torch.randn(1, N_POSITIONS), torch.randn(1, 1, D), torch.randn(1, 1))
    with pytest.raises(ValueError, match="more than this model's max_seq_len=16"):
        model.predict(too_long)
