"""What each layer predicts: the model's own read-out applied to every layer's residual stream
(the read-out lens), or ridge probes fitted per layer on other prompts."""

from __future__ import annotations

from typing import Sequence

import torch

from mi_krr._validation import check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task
from probes.fitted_probes import DEFAULT_LAM_GRID, fit_layer_probes
from probes.streaming import encode_for_probe, probe_model, query_readouts, resolve_layers

METHODS = ("readout", "ridge")


def layer_predictions(
    model: ICLModel,
    task: ICLTask,
    method: str = "readout",
    layers: Sequence[int] | None = None,
    train_task: ICLTask | None = None,
    val_fraction: float = 0.25,
    lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
    seed: int = 0,
) -> torch.Tensor:
    """Per-layer query predictions `[batch, len(layers), n_query]` (float64); with `layers=None`
    `[batch, L + 1, n_query]`, index 0 = embeddings (residual entering block 0), l = after block l.

    method "readout": `model.readout` applied to each layer's residual stream at the query
        positions. The read-out includes the model's final norm, applied exactly as in training
        and `predict`, so the last index equals `model.predict(task)`. (Reading intermediate
        layers without the norm the read-out was trained behind, or fitting a read-out without
        it and applying it with it, is a known pitfall of per-layer lenses.)
    method "ridge": closed-form ridge probes per layer, fitted on `train_task` (prompts disjoint
        from `task`: a shared prompt raises) with the penalty picked on a validation split; see
        `fit_layer_probes`, whose `LayerProbes` also carries the shuffled-target control
        (`.control.val_r2`, `.predict_control`) to report beside these predictions.
    """
    model = probe_model(model)
    check_choice("method", method, METHODS)
    layers = resolve_layers(model, layers)
    check_train_task(method, train_task)
    if method == "readout":
        return query_readouts(model, encode_for_probe(model, task), layers).to(torch.float64)
    assert train_task is not None  # check_train_task: method "ridge" needs one
    probes = fit_layer_probes(model, train_task, layers=layers, val_fraction=val_fraction, lam_grid=lam_grid, seed=seed)
    return probes.predict(model, task)


def check_train_task(method: str, train_task: ICLTask | None) -> None:
    """ValueError unless `train_task` goes with `method`: an `ICLTask` for "ridge" (the prompts
    its probes are fitted on), None for "readout" (which fits nothing, so it would be ignored)."""
    if method == "ridge" and train_task is None:
        raise ValueError("method='ridge' needs train_task: prompts (disjoint from the probed ones) to fit the probes on")
    if method == "readout" and train_task is not None:
        raise ValueError("train_task is only read by method='ridge' (fitted probes): pass method='ridge' or drop train_task")
    if train_task is not None:
        check_task("train_task", train_task)
