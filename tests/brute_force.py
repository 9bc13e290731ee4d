"""Brute-force references for the probes: plain NumPy sums and alignments found by enumerating
every non-decreasing layer -> step map (small sizes only), and central finite differences of a
solver's predictions, or of a model's read-out lens, in the labels."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch


def monotone_path(cost: np.ndarray) -> tuple[int, ...]:
    """The cheapest non-decreasing step per row of cost `[L', T+1]` (ties: the earliest steps from
    the last row back, as `probes.scoring.monotone_alignment` documents)."""
    paths = list(itertools.combinations_with_replacement(range(cost.shape[1]), cost.shape[0]))
    totals = [sum(cost[row, step] for row, step in enumerate(path)) for path in paths]
    return min((path for path, total in zip(paths, totals) if total == min(totals)), key=lambda path: path[::-1])


def pooled_sums(layers: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """SSE `[L', T+1]` and SST `[T+1]` (about each step's all-prompt mean) pooled over prompts and
    values of layers `[B, L', ...]` and steps `[B, T+1, ...]`, and the values per step."""
    sse = np.array([[np.sum((layers[:, l] - steps[:, t]) ** 2) for t in range(steps.shape[1])] for l in range(layers.shape[1])])
    sst = np.array([np.sum((steps[:, t] - steps[:, t].mean()) ** 2) for t in range(steps.shape[1])])
    return sse, sst, steps[:, 0].size


def path_r2(layers: np.ndarray, candidates: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Path R2 `[G]` of candidate trajectories `[G, B, T+1, m]` against `layers` `[B, L', m]`:
    SSE per (layer, step) over prompts and queries, SST of each step about its all-prompt mean, at
    the non-decreasing layer -> step map of least total SSE (every row aligned, rows `scored`
    counted), found by enumerating every such map."""
    n_layers, n_times = layers.shape[1], candidates.shape[2]
    sse = ((layers[None, :, :, None] - candidates[:, :, None]) ** 2).sum(axis=(1, 4))  # [G, L', T+1]
    sst = ((candidates - candidates.mean(axis=(1, 3), keepdims=True)) ** 2).sum(axis=(1, 3))  # [G, T+1]
    maps = np.array(list(itertools.combinations_with_replacement(range(n_times), n_layers)))  # [P, L'], non-decreasing
    best = maps[np.argmin(sse[:, np.arange(n_layers), maps].sum(-1), axis=1)]  # [G, L']
    rows = np.arange(len(candidates))[:, None]
    with np.errstate(divide="ignore"):
        return 1.0 - sse[rows, scored, best[:, scored]].sum(1) / sst[rows, best[:, scored]].sum(1)


def solver_finite_differences(solve, K: torch.Tensor, K_query: torch.Tensor, y: torch.Tensor, lam: float, steps: int,
                              eps: float = 1e-6) -> torch.Tensor:
    """d pred_t / d y_i of `solve(K, y, lam, steps, K_query=K_query).pred` by central differences
    in each label: y `[B, n]` -> `[B, T+1, m, n]`."""
    columns = []
    for i in range(y.shape[-1]):
        shift = torch.zeros(y.shape[-1], dtype=y.dtype)
        shift[i] = eps
        up = solve(K, y + shift, lam, steps, K_query=K_query).pred
        down = solve(K, y - shift, lam, steps, K_query=K_query).pred
        columns.append((up - down) / (2 * eps))
    return torch.stack(columns, dim=-1)


def lens_finite_differences(model, task, layers=None, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the read-out lens (`probes.layer_predictions`) in each support label
    of `task` -> `[B, L', m, n]` (layers=None: all L + 1)."""
    from probes import layer_predictions

    columns = []
    for i in range(task.n_support):
        shift = torch.zeros(task.n_support, dtype=task.y_support.dtype)
        shift[i] = eps
        up = layer_predictions(model, dataclasses.replace(task, y_support=task.y_support + shift), layers=layers)
        down = layer_predictions(model, dataclasses.replace(task, y_support=task.y_support - shift), layers=layers)
        columns.append((up - down) / (2 * eps))
    return torch.stack(columns, dim=-1)


def flat_heads(alignment, kernel: str) -> np.ndarray:
    """The documented uniform-head rule, `[layer, head]`: a fitted scale of inf, or a reference
    whose rows deviate from uniform by less than 0.05 on average (`reference_spread`)."""
    flat = np.isinf(alignment.scale[kernel].double().numpy())
    if alignment.reference_spread is not None:
        flat |= alignment.reference_spread[kernel].double().numpy() < 0.05
    return flat


def best_head_choices(alignment, kernel: str) -> list[tuple[int, float, bool]]:
    """Per layer with a finite operator distance, by enumeration: (head, distance, uniform) of the
    closest head among those not `flat_heads`, or among all where every finite one is flat."""
    distance = alignment.metrics[kernel]["operator_distance"].double().numpy()  # [layer, head]
    flat = flat_heads(alignment, kernel)
    choices = []
    for row, flats in zip(distance, flat):
        finite = [head for head in range(len(row)) if np.isfinite(row[head])]
        if not finite:
            continue
        ranking = [head for head in finite if not flats[head]] or finite
        head = min(ranking, key=lambda h: row[h])
        choices.append((head, float(row[head]), bool(flats[head])))
    return choices


def uniform_best_head(alignment, kernel: str) -> bool:
    """Whether some layer's best head for `kernel` (`best_head_choices`) is uniform; False without
    an alignment for that kernel."""
    if alignment is None or kernel not in alignment.metrics:
        return False
    return any(uniform for _, _, uniform in best_head_choices(alignment, kernel))