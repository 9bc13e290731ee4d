"""Checkpoints of Garg et al.'s in-context-learning code (GPT-2 backbone), loaded offline and
wrapped with TransformerLens hooks.

A run folder holds `config.yaml` (`model.{family, n_dims, n_positions, n_embd, n_layer,
n_head}`) and weights: `state.pt` (`{"model_state_dict": ..., "train_step": ...}`) and/or plain
state dicts `model_{step}.pt`. The model is x -> `_read_in` Linear(n_dims, n_embd) -> HF
`GPT2Model(inputs_embeds=...)` (final `ln_f` included) -> `_read_out` Linear(n_embd, 1) on the
interleaved sequence x_1, y_1, ..., x_n, y_n, x_*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mi_krr._validation import check_device
from mi_krr.models.adapter import AttentionHooks
from mi_krr.models.bridge import BridgeBackedMixin
from mi_krr.models.hook_names import attention_hook_names, residual_hook_names
from mi_krr.models.prompting import PromptedModelMixin

GARG_MODEL_KEYS = ("n_dims", "n_positions", "n_embd", "n_layer", "n_head")
_STEP_FILE = re.compile(r"model_(\d+)\.pt")
# Buffers old transformers versions saved with every GPT-2 attention layer (the causal mask), and
# the token embedding, unused when the backbone is fed inputs_embeds (Garg's has 50257 rows).
_DROPPED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|^wte\.weight)$")


@dataclass(frozen=True)
class GargConfig:
    """`model` section of a Garg run's config.yaml (family gpt2). n_positions counts (x, y) pairs:
    the GPT-2 backbone has 2 * n_positions positions."""

    n_dims: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int

    def gpt2_config(self):
        """The HF `GPT2Config` Garg's code builds (dropout 0), with a 1-token vocabulary and an
        untied head so no hub access or tokenizer is involved."""
        from transformers import GPT2Config

        return GPT2Config(
            n_positions=2 * self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            vocab_size=1,
            tie_word_embeddings=False,
        )


class GargICLModel(BridgeBackedMixin, PromptedModelMixin, nn.Module):
    """A Garg-format model on a TransformerBridge: `read_in` -> bridge over HF GPT-2 (hooks
    `blocks.{l}.*`, `ln_final.*`; `unembed` is Garg's `_read_out`). Interleaved layout, one
    sequence per query, read at the last x; `hook_attn_scores` holds true pre-softmax scores.

    Attributes:
        garg_config: the checkpoint's `GargConfig`.
        source: where the weights came from (file, train_step) for reports.
    """

    layout = "interleaved"
    causal = True

    def __init__(self, garg_config: GargConfig, state_dict: dict[str, torch.Tensor] | None = None,
                 device: torch.device | str | None = None, source: dict[str, Any] | None = None):
        super().__init__()
        device = check_device("device", device)
        from transformers import GPT2LMHeadModel, GPT2Model
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        self.garg_config = garg_config
        self.source = dict(source or {})
        hf_config = garg_config.gpt2_config()
        backbone = GPT2Model(hf_config)
        self.read_in = nn.Linear(garg_config.n_dims, garg_config.n_embd)
        read_out = nn.Linear(garg_config.n_embd, 1)
        if state_dict is not None:
            _load_garg_weights(garg_config, state_dict, self.read_in, backbone, read_out)
        # The bridge wraps (and edits) the module in place, so weights are loaded first. The
        # LM-head shell's head is Garg's read-out, so the bridge's output is the prediction.
        shell = GPT2LMHeadModel(hf_config)
        shell.transformer = backbone
        shell.lm_head = read_out
        shell.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types `to` as the unbound method
        self.read_in.to(device)
        self.bridge = build_bridge_from_module(shell, "GPT2LMHeadModel", hf_config=hf_config)
        self.eval()

    n_layers = property(lambda self: self.garg_config.n_layer)
    n_heads = property(lambda self: self.garg_config.n_head)
    n_dims = property(lambda self: self.garg_config.n_dims)
    max_seq_len = property(lambda self: 2 * self.garg_config.n_positions)

    def _bridge_mask(self, tokens: torch.Tensor, n_support: int | None) -> None:
        return None  # GPT-2's own causal mask

    def _outputs(self, bridge_output: torch.Tensor) -> torch.Tensor:
        return bridge_output[..., 0]

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """GPT-2's final `ln_f` and Garg's `_read_out`: `[..., n_embd]` -> `[...]`."""
        return self.bridge.unembed(self.bridge.ln_final(resid))[..., 0]

    def residual_hook_names(self) -> list[str]:
        return residual_hook_names(self.n_layers)

    def _rebuild_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.garg_config,), {"source": self.source}

    def attention_hook_names(self) -> list[AttentionHooks]:
        return attention_hook_names(self.n_layers, with_scores=True)


def _load_garg_weights(config: GargConfig, state_dict: dict[str, torch.Tensor], read_in: nn.Linear,
                       backbone: nn.Module, read_out: nn.Linear) -> None:
    """Copy Garg's `_read_in.*`, `_backbone.*`, `_read_out.*` entries into the three modules,
    raising one-line ValueErrors for missing, unexpected or mis-shaped weights."""
    parts = {"_read_in.": read_in, "_backbone.": backbone, "_read_out.": read_out}
    grouped: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in parts}
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected weight {key!r}: a Garg checkpoint holds only _read_in.*, _backbone.* and _read_out.* entries")
        name = key[len(prefix):]
        if prefix == "_backbone." and _DROPPED.search(name):
            continue
        grouped[prefix][name] = value
    for prefix, module in parts.items():
        expected = {name: value for name, value in module.state_dict().items() if not (prefix == "_backbone." and _DROPPED.search(name))}
        missing = [prefix + name for name in expected if name not in grouped[prefix]]
        if missing:
            raise ValueError(f"checkpoint lacks weight {missing[0]!r} ({len(missing)} missing): is it a Garg TransformerModel with n_layer={config.n_layer}?")
        unexpected = [prefix + name for name in grouped[prefix] if name not in expected]
        if unexpected:
            raise ValueError(f"unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected): check model.n_layer in config.yaml")
        for name, tensor in grouped[prefix].items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"weight {prefix + name!r} has shape {tuple(tensor.shape)} but config.yaml "
                    f"(n_dims={config.n_dims}, n_positions={config.n_positions}, n_embd={config.n_embd}, n_head={config.n_head}) "
                    f"implies {tuple(expected[name].shape)}: fix config.yaml's model section to match the weights"
                )
        module.load_state_dict(grouped[prefix], strict=False)  # completeness checked above; wte stays unused


def read_garg_config(path: str | Path) -> GargConfig:
    """The `model` section of a Garg run's config.yaml, validated (family gpt2, positive integer
    sizes, n_embd divisible by n_head)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no config.yaml at {path}: a Garg run folder needs the config.yaml its training wrote")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"could not parse {path} as YAML ({type(exc).__name__}): repair or re-copy the file") from exc
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{path} has no 'model' section: it must hold model.family, {', '.join('model.' + k for k in GARG_MODEL_KEYS)}")
    family = model.get("family", "gpt2")
    if family != "gpt2":
        raise ValueError(f"{path}: model.family is {family!r}; only Garg's 'gpt2' family is supported")
    missing = [key for key in GARG_MODEL_KEYS if key not in model]
    if missing:
        raise ValueError(f"{path} lacks model.{missing[0]} (missing: {', '.join(missing)}): add it to the model section")
    for key in GARG_MODEL_KEYS:
        value = model[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: model.{key} must be a positive integer, got {value!r}")
    if model["n_embd"] % model["n_head"]:
        raise ValueError(
            f"{path}: model.n_embd={model['n_embd']} is not divisible by model.n_head={model['n_head']} "
            "(GPT-2 splits n_embd evenly across heads): set model.n_head to the head count the run was trained with"
        )
    return GargConfig(**{key: model[key] for key in GARG_MODEL_KEYS})


def _saved_steps(folder: Path) -> dict[int, Path]:
    """step -> `model_{step}.pt` for every such file in `folder`, in increasing step order."""
    found = ((int(match.group(1)), file) for file in folder.iterdir() if (match := _STEP_FILE.fullmatch(file.name)))
    return dict(sorted(found))


def _weights_file(path: Path, step: int | None) -> Path:
    """The weights file `load_garg_checkpoint` reads for `path` (a run folder or a .pt file in one)
    and `step` (see its docstring)."""
    if path.is_file():
        if step is not None and path.name != f"model_{step}.pt":
            raise ValueError(
                f"step={step} and the weights file {path.name} name different weights: pass the run folder {path.parent} "
                f"with step={step}, or the file without step"
            )
        return path
    if step is not None:
        chosen = path / f"model_{step}.pt"
        if not chosen.is_file():
            listed = ", ".join(str(saved_step) for saved_step in _saved_steps(path))
            fix = f"pick a step whose file exists ({listed})" if listed else "it holds no model_<step>.pt at all; omit step to load state.pt"
            raise ValueError(f"no model_{step}.pt in {path}: {fix}")
        return chosen
    if (path / "state.pt").is_file():
        return path / "state.pt"
    saved = _saved_steps(path)
    if not saved:
        raise ValueError(f"no weights in {path}: expected state.pt or model_<step>.pt")
    return saved[max(saved)]


def load_garg_checkpoint(path: str | Path, step: int | None = None, device: torch.device | str | None = None) -> GargICLModel:
    """Load a Garg et al. run folder (or one of its .pt files) as a hooked `GargICLModel`.

    Weights: an explicit file; else `model_{step}.pt` when `step` is given; else `state.pt`;
    else the newest `model_{step}.pt`. `step` picks a file in a folder: with an explicit file it
    must be that file's own step (`model_{step}.pt`), else the two name different weights and it
    is a ValueError. config.yaml is read from the folder (a file's parent).
    Files are read with `torch.load(weights_only=True)`; nothing is fetched from the hub.

    Raises ValueError (one line) for a missing folder/file/config key, a `step` with no
    `model_{step}.pt` (naming the saved steps) or that contradicts an explicit file, a config whose
    n_embd is not divisible by n_head or that does not match the weights' shapes, or a
    truncated/corrupt weights file.
    """
    path = Path(path)
    device = check_device("device", device)
    if not path.exists():
        raise ValueError(f"no Garg checkpoint at {path}: pass a run folder (config.yaml + state.pt or model_<step>.pt) or a .pt file in one")
    folder = path.parent if path.is_file() else path
    config = read_garg_config(folder / "config.yaml")
    weights = _weights_file(path, step)
    try:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"could not read {weights} ({type(exc).__name__}): the file is truncated, corrupt or not a torch checkpoint; re-copy it"
        ) from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{weights} holds a {type(loaded).__name__}, not a state dict: expected state.pt or model_<step>.pt from Garg's training")
    source: dict[str, Any] = {"file": str(weights)}
    if "model_state_dict" in loaded:
        source["train_step"] = loaded.get("train_step")
        loaded = loaded["model_state_dict"]
    elif (match := _STEP_FILE.fullmatch(weights.name)) is not None:
        source["train_step"] = int(match.group(1))
    with torch.random.fork_rng(devices=[]):  # the random init the weights replace leaves the global generator alone
        return GargICLModel(config, loaded, device=device, source=source)
