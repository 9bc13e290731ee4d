"""Fitted per-layer probes: closed-form ridge regression from each layer's residual stream at the
query positions to a per-query target, with a shuffled-target control.

Probes are trained on one set of prompts and applied to different prompts (prompts are
fingerprinted by their support inputs; predicting on a training prompt raises). The penalty is
picked per layer on a validation split of the training prompts from a grid relative to the mean
eigenvalue of the feature covariance, so one grid serves layers of any scale. The control refits
the same probe on targets shuffled across prompts: a probe that only finds signal because it is
flexible scores as well on the control; a real read-out scores far above it (validation R^2 near 0
for the control).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import as_float64, check_count, check_seed
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task
from probes.scoring import SST_ROUNDING
from probes.streaming import encode_for_probe, model_device_dtype, probe_model, query_residuals, resolve_layers

DEFAULT_LAM_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-8, 2, 21))


@dataclass
class RidgeFit:
    """One ridge probe per layer.

    Attributes:
        weight: `[layer, d_model]` float64.
        bias: `[layer]` float64.
        lam: chosen penalty per layer `[layer]` (absolute, on the mean-squared-error scale:
            minimises mean (x.w + b - t)^2 + lam |w|^2).
        val_r2: validation R^2 at the chosen penalty `[layer]` (NaN where the validation
            targets are one constant: R^2 is undefined).
    """

    __repr__ = compact_repr

    weight: torch.Tensor
    bias: torch.Tensor
    lam: torch.Tensor
    val_r2: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """features `[batch, layer, n_query, d_model]` -> predictions `[batch, layer, n_query]`."""
        features = features.to(self.weight.dtype)
        return torch.einsum("blqd,ld->blq", features, self.weight.to(features.device)) + self.bias.to(features.device)[:, None]


@dataclass
class LayerProbes:
    """Ridge probes for residual indices `layers` (0 = embeddings, l = after block l), and their
    shuffled-target control.

    Attributes:
        layers: residual indices probed.
        fit: the probes trained on the real targets (`RidgeFit`).
        control: the same probes trained on targets shuffled across prompts (every prompt gets
            another prompt's targets).
        targets: what was predicted ("y_query", or "custom" for a given tensor).
        train_prompts: fingerprints of the training prompts' support inputs as the model saw them
            (`prompt_fingerprints` at the model's dtype).
    """

    __repr__ = compact_repr

    layers: list[int]
    fit: RidgeFit
    control: RidgeFit
    targets: str
    train_prompts: frozenset[str]

    @property
    def weight(self) -> torch.Tensor:
        return self.fit.weight

    @property
    def lam(self) -> torch.Tensor:
        return self.fit.lam

    @property
    def val_r2(self) -> torch.Tensor:
        return self.fit.val_r2

    def predict(self, model: ICLModel, task: ICLTask) -> torch.Tensor:
        """Probe predictions on held-out prompts `[batch, len(layers), n_query]` (float64)."""
        return self.fit.apply(self._features(model, task))

    def predict_control(self, model: ICLModel, task: ICLTask) -> torch.Tensor:
        """The shuffled-target control's predictions `[batch, len(layers), n_query]` (float64)."""
        return self.control.apply(self._features(model, task))

    def _features(self, model: ICLModel, task: ICLTask) -> torch.Tensor:
        model = probe_model(model)
        layers = resolve_layers(model, self.layers)  # a shallower model: "layers entry ... out of range"
        shared = self.train_prompts & set(prompt_fingerprints(check_task("task", task), model_device_dtype(model)[1]))
        if shared:
            raise ValueError(
                f"task shares {len(shared)} prompt(s) with the probes' training prompts: evaluate probes on "
                "prompts they were not fitted on (sample a fresh task)"
            )
        features = query_residuals(model, encode_for_probe(model, task), layers)
        if features.shape[-1] != self.fit.weight.shape[-1]:
            raise ValueError(
                f"model residual width {features.shape[-1]} does not match the probes' d_model={self.fit.weight.shape[-1]}"
            )
        return features


def prompt_fingerprints(task: ICLTask, dtype: torch.dtype = torch.float64) -> list[str]:
    """One fingerprint per prompt of its support inputs as a model of `dtype` sees them (rounded
    to `dtype`, then float64 bytes): identical inputs to the model, identical fingerprint, so a
    float64 task and its float32 copy are the same prompts to a float32 model."""
    x = task.x_support.detach().to("cpu", dtype).to(torch.float64).numpy()
    return [hashlib.blake2b(np.ascontiguousarray(prompt).tobytes(), digest_size=16).hexdigest() for prompt in x]


def fit_layer_probes(
    model: ICLModel,
    train_task: ICLTask,
    targets: str | torch.Tensor = "y_query",
    layers: Sequence[int] | None = None,
    val_fraction: float = 0.25,
    lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
    seed: int = 0,
) -> LayerProbes:
    """Fit one ridge probe per layer from the residual stream at the query positions to `targets`.

    Args:
        model: an `ICLModel`.
        train_task: training prompts (at least 2; probes must later be evaluated on others).
        targets: "y_query" (the task's query targets) or a tensor `[batch, n_query]`, e.g. a
            solver's step-t predictions.
        layers: residual indices (None: all L + 1).
        val_fraction: share of training prompts held out to pick the penalty (split by prompt).
        lam_grid: penalties relative to the mean eigenvalue of each layer's feature covariance.
        seed: seeds the split and the control's shuffle.

    The penalty with the best validation R^2 is kept and the probe refitted on all training prompts.
    """
    model = probe_model(model)
    layers = resolve_layers(model, layers)
    prompt = encode_for_probe(model, train_task)
    batch = train_task.batch_size
    check_count("train_task batch size", batch, minimum=2)
    seed = check_seed("seed", seed)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    penalties = as_float64("lam_grid", lam_grid, min_dim=1)
    if penalties.numel() == 0 or (penalties <= 0).any():
        raise ValueError("lam_grid must be a non-empty list of positive penalties, e.g. numpy.logspace(-8, 2, 21)")
    if isinstance(targets, str):
        if targets != "y_query":
            raise ValueError(f"targets must be 'y_query' or a tensor [batch, n_query], got {targets!r}")
        target = train_task.y_query
        target_name = "y_query"
    else:
        target = as_float64("targets", targets)
        if tuple(target.shape) != (batch, train_task.n_query):
            raise ValueError(f"targets must be [batch={batch}, n_query={train_task.n_query}], got shape {tuple(target.shape)}")
        target_name = "custom"
    target = target.detach().to("cpu", torch.float64)

    features = query_residuals(model, prompt, layers).detach().to("cpu", torch.float64)  # [B, L', m, d]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch, generator=generator)
    n_val = min(max(1, round(batch * float(val_fraction))), batch - 1)
    val, train = order[:n_val], order[n_val:]
    shuffled = target[random_derangement(batch, generator)]
    return LayerProbes(
        layers=layers,
        fit=_fit_ridge(features, target, train, val, penalties),
        control=_fit_ridge(features, shuffled, train, val, penalties),
        targets=target_name,
        train_prompts=frozenset(prompt_fingerprints(train_task, model_device_dtype(model)[1])),
    )


def random_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of 0..n-1 (n >= 2) that moves every index: one n-cycle through a
    uniformly shuffled order (a plain shuffle may leave prompts, or all of them, in place, and
    a control fitted on unmoved targets is no control)."""
    order = torch.randperm(n, generator=generator)
    successor = torch.empty_like(order)
    successor[order] = order.roll(-1)
    return successor


def _fit_ridge(
    features: torch.Tensor, target: torch.Tensor, train: torch.Tensor, val: torch.Tensor, lam_grid: torch.Tensor
) -> RidgeFit:
    """Per-layer ridge: pick lam on (train, val) prompts, refit on both.

    features `[B, L', m, d]`, target `[B, m]` (float64, CPU) -> `RidgeFit`."""
    weights, biases, lams, r2s = [], [], [], []
    for layer in range(features.shape[1]):
        x, t = features[:, layer], target
        x_train, t_train = x[train].reshape(-1, x.shape[-1]), t[train].reshape(-1)
        x_val, t_val = x[val].reshape(-1, x.shape[-1]), t[val].reshape(-1)
        penalties = lam_grid * _mean_eigenvalue(x_train)
        path_weights, path_biases = _ridge_path(x_train, t_train, penalties)  # [n_lam, d], [n_lam]
        val_pred = x_val @ path_weights.T + path_biases  # [N_val, n_lam]
        best = int(torch.argmin((val_pred - t_val[:, None]).square().sum(dim=0)))  # = argmax R2, defined for constant targets too
        x_all, t_all = torch.cat([x_train, x_val]), torch.cat([t_train, t_val])
        lam = float(lam_grid[best]) * _mean_eigenvalue(x_all)
        weight, bias = (value[0] for value in _ridge_path(x_all, t_all, torch.tensor([lam], dtype=torch.float64)))
        weights.append(weight)
        biases.append(bias)
        lams.append(lam)
        r2s.append(_r2(val_pred[:, best], t_val))
    return RidgeFit(
        weight=torch.stack(weights),
        bias=torch.stack(biases),
        lam=torch.tensor(lams, dtype=torch.float64),
        val_r2=torch.stack(r2s),
    )


def _mean_eigenvalue(x: torch.Tensor) -> float:
    """Mean eigenvalue of the centred covariance of rows `x [N, d]` (floored so constant features
    still get a positive penalty)."""
    centred = x - x.mean(dim=0)
    return max(float(centred.square().sum() / (x.shape[0] * x.shape[1])), 1e-12)


def _ridge_path(x: torch.Tensor, t: torch.Tensor, lams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{w, b} mean (x w + b - t)^2 + lam |w|^2 (intercept unpenalised) for every lam,
    closed form from one eigendecomposition of the centred covariance.

    x `[N, d]`, t `[N]`, lams `[k]` -> weights `[k, d]`, biases `[k]`."""
    x_mean, t_mean = x.mean(dim=0), t.mean()
    xc = x - x_mean
    eigenvalues, eigenvectors = torch.linalg.eigh(xc.T @ xc / x.shape[0])
    projected = eigenvectors.T @ (xc.T @ (t - t_mean) / x.shape[0])  # [d]
    weights = (projected / (eigenvalues + lams[:, None])) @ eigenvectors.T
    return weights, t_mean - weights @ x_mean


def _r2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination 1 - SSE / SST along dim 0 (SST about the target's own mean);
    pred `[N, ...]`, target broadcastable -> `[...]`; NaN where the target has no variance (SST at
    most `SST_ROUNDING` of its squares: a constant up to the rounding of its mean)."""
    target = target.expand_as(pred)
    total = (target - target.mean(dim=0)).square().sum(dim=0)
    defined = total > SST_ROUNDING * target.square().sum(dim=0)
    return torch.where(defined, 1.0 - (pred - target).square().sum(dim=0) / total, torch.nan)
