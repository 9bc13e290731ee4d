"""Label sensitivities: how each layer's (or each solver step's) query prediction moves with each
support label, d yhat(query j) / d y_i.

For KRR every predictor is linear in y, yhat = k_*^T (K + lam I)^-1 y, so the sensitivity matrix
`[n_query, n_support]` is the whole predictor on a prompt: comparing a layer's matrix with a solver
step's compares the maps themselves, not only their outputs on one y.

The labels enter a model only through `model.encode(task)`, so the derivative is taken with
respect to `task.y_support` through the model's own encoder: no knowledge of which token or
coordinate carries y is needed, for any layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import einops
import torch
from tqdm import tqdm

from mi_krr._validation import as_float64, check_choice, check_count, check_positive
from mi_krr.models.adapter import ICLModel
from mi_krr.solvers.newton import newton_schulz_inverses
from mi_krr.solvers.system import krr_system
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task
from probes.streaming import encode_for_probe, model_device_dtype, probe_model, query_readouts, resolve_layers

LINEAR_IN_Y: frozenset[str] = frozenset(
    {"gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball", "newton"}
)
"""`ALGORITHMS` entries whose step-t prediction is a fixed linear map of y (step sizes, momenta
and Newton's scale depend on K and lam only). Any other solver (CG, Jacobi-CG, and any solver
added later until listed here) is differentiated by autograd at a given y."""

BACKWARD_CHUNK = 4
"""Jacobian rows per vmapped backward pass through a model. Larger batches of rows were slower on
CPU (2 threads, 256 prompts, the shipped softmax model's 40 rows; rows per pass -> seconds):
4 -> 3.3-4.5, 8 -> 4.8-5.7, 16 -> 6.1-7.9, 32 -> 7.4-7.8."""

SENSITIVITY_COLUMN_BYTES = 64 * 2**20
"""`solver_sensitivities` runs a linear-in-y solver on the n identity label columns as one batch,
and the solvers hold K once per column: columns are run in blocks whose copies of K take at most
this many bytes (at least one column per block)."""

SOLVER_BACKWARD_CHUNK = 8
"""The same for backward passes through a solver (CG's 168 rows at T = 20, same prompts):
4 -> 1.19 s, 8 -> 0.72-0.87, 16 -> 0.74-0.88, 32 -> 2.3, 64 -> 2.3."""


def label_sensitivities(
    model: ICLModel,
    task: ICLTask,
    layers: Sequence[int] | None = None,
    chunk_size: int = BACKWARD_CHUNK,
    prompts_per_pass: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """d yhat_l(query j) / d y_i of the read-out lens, by autograd through the model.

    Returns `[batch, len(layers), n_query, n_support]` (float64; layers=None: all L + 1, index 0 =
    embeddings). Prompts are independent, so one backward pass of the batch-summed prediction
    gives every prompt's row at once (this needs a model that treats prompts independently, as
    every mi-krr model does: no batch-coupled layers); the `len(layers) * n_query` rows are taken
    `chunk_size` at a time as vmapped backward passes. Use a float64 model for reference-grade
    numbers.

    prompts_per_pass: differentiate this many prompts at a time (None: the whole batch in one
        pass). The autograd graph of a pass holds every layer's activations for its prompts, so
        memory grows with it (`benchmarks/bench_scale.py`: 8 prompts of 128 support points on a
        12-layer, width-256 model grow RSS by ~600 MB in one pass, ~100 MB one at a time, in
        about the same time); the result is the same.
    progress: show a tqdm bar over the passes.
    """
    model = probe_model(model)
    layers = resolve_layers(model, layers)
    check_count("chunk_size", chunk_size, minimum=1)
    device, dtype = model_device_dtype(model)
    task = check_task("task", task).to(device=device, dtype=dtype)  # differentiate in the model's precision, not the task's
    per_pass = max(task.batch_size, 1) if prompts_per_pass is None else check_count("prompts_per_pass", prompts_per_pass, minimum=1)
    starts = range(0, max(task.batch_size, 1), per_pass)  # one (empty) pass for an empty batch
    parts = [
        _label_sensitivity_pass(model, task.select(slice(start, start + per_pass)), layers, chunk_size)
        for start in tqdm(starts, desc="label sensitivities", unit="pass", disable=not progress, leave=False)
    ]
    jacobian = torch.cat(parts) if len(parts) > 1 else parts[0]
    return einops.rearrange(jacobian, "batch (layer query) n -> batch layer query n", layer=len(layers)).to(torch.float64)


def _label_sensitivity_pass(model: ICLModel, task: ICLTask, layers: list[int], chunk_size: int) -> torch.Tensor:
    """One differentiable forward of `task`'s prompts and the Jacobian of their read-outs at
    `layers` w.r.t. their labels -> `[batch, len(layers) * n_query, n_support]`."""
    with torch.inference_mode(False), torch.enable_grad():  # also under a caller's no_grad() or inference_mode()
        labels = task.y_support.detach().clone().requires_grad_(True)
        prompt = encode_for_probe(model, dataclasses.replace(task, y_support=labels))
        pred = query_readouts(model, prompt, layers, grad=True)  # [B, L', m]
        if not _in_graph(labels, pred):
            raise ValueError(
                "the model's predictions do not depend differentiably on task.y_support: its encode() must build "
                "tokens from the labels with torch operations (no detach / numpy round trip)"
            )
        return batch_jacobian(pred.flatten(1), labels, chunk_size)


def _in_graph(leaf: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether the leaf tensor `leaf` (requires_grad) is in `output`'s autograd graph: a walk over
    its nodes (checking `output.requires_grad` is not enough: the model's parameters give it a
    graph even when the labels were cut out of it)."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:  # the leaf's AccumulateGrad node
            return True
        stack.extend(parent for parent, _ in node.next_functions)
    return False


def batch_jacobian(outputs: torch.Tensor, inputs: torch.Tensor, chunk_size: int = BACKWARD_CHUNK) -> torch.Tensor:
    """Per-sample Jacobian d outputs[b, k] / d inputs[b, i] -> `[batch, k, n]`, for outputs
    `[batch, k]` where sample b depends only on inputs[b] `[batch, n]` (no cross-sample terms).

    Row k of every sample comes from one backward pass of outputs[:, k].sum(); rows are batched
    `chunk_size` at a time with `is_grads_batched`.
    """
    n_outputs = outputs.shape[1]
    basis = torch.eye(n_outputs, dtype=outputs.dtype, device=outputs.device)
    rows = []
    for start in range(0, n_outputs, chunk_size):
        directions = einops.repeat(basis[start : start + chunk_size], "k out -> k batch out", batch=outputs.shape[0])
        (grad,) = torch.autograd.grad(
            outputs, inputs, grad_outputs=directions, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
        if grad is None:
            grad = torch.zeros(directions.shape[0], *inputs.shape, dtype=inputs.dtype, device=inputs.device)
        rows.append(grad)
    return einops.rearrange(torch.cat(rows), "k batch n -> batch k n")


def solver_sensitivities(
    algorithm: str | Callable[..., Any],
    K: torch.Tensor,
    K_query: torch.Tensor,
    lam: float,
    n_steps: int,
    y: torch.Tensor | None = None,
    chunk_size: int = SOLVER_BACKWARD_CHUNK,
    linear_in_y: bool | None = None,
) -> torch.Tensor:
    """d pred_t(query j) / d y_i along a solver's trajectory -> `[..., T+1, n_query, n_support]`
    (float64).

    algorithm: a name in `mi_krr.solvers.ALGORITHMS`, or a solver callable with the registry
    signature `(K, y, lam, n_steps, K_query=None) -> Trajectory` (e.g.
    `functools.partial(mi_krr.solvers.richardson, step=0.04)`).
    K `[..., n, n]`, K_query `[..., m, n]` (leading dimensions broadcast).

    linear_in_y (default: True for the names in `LINEAR_IN_Y`, False for callables): the solver's
    step-t prediction is a fixed linear map of y, so its sensitivity matrix is computed exactly,
    whatever y is, by running the solver once on the n identity label columns (`y` is not needed).
    For a registry name the spectrum-derived parameters (step, momentum, eigenvalue bounds) are
    computed once per prompt and passed explicitly, not recomputed per column. Otherwise (CG,
    Jacobi-CG, any solver whose steps depend on y) `y` `[..., n]` is required and the
    sensitivity at that y is computed by autograd through the solver; a prompt whose labels are
    all 0 is refused (CG is not differentiable there).
    """
    from mi_krr.solvers import ALGORITHMS

    if isinstance(algorithm, str):
        check_choice("algorithm", algorithm, tuple(ALGORITHMS))
        solve = ALGORITHMS[algorithm]
        linear = algorithm in LINEAR_IN_Y if linear_in_y is None else bool(linear_in_y)
    elif callable(algorithm):
        solve, linear = algorithm, bool(linear_in_y)
    else:
        raise ValueError(f"algorithm must be a name in mi_krr.solvers.ALGORITHMS or a solver callable, got {algorithm!r}")
    K = as_float64("K", K, min_dim=2)
    K_query = as_float64("K_query", K_query, min_dim=2)
    n, m = K.shape[-1], K_query.shape[-2]
    if K.shape[-2] != n or K_query.shape[-1] != n:
        raise ValueError(f"K must be [..., n, n] and K_query [..., m, n]; got shapes {tuple(K.shape)} and {tuple(K_query.shape)}")
    check_positive("lam", lam)
    check_count("n_steps", n_steps)
    check_count("chunk_size", chunk_size, minimum=1)
    batch_shape = torch.broadcast_shapes(K.shape[:-2], K_query.shape[:-2])
    K, K_query = K.expand(*batch_shape, n, n), K_query.expand(*batch_shape, m, n)
    if linear and algorithm == "newton":
        return _newton_sensitivities(K, K_query, lam, n_steps)
    if linear:
        if isinstance(algorithm, str):
            solve = solver_with_explicit_parameters(algorithm, K, lam)
        identity = torch.eye(n, dtype=K.dtype, device=K.device).reshape(n, *(1,) * len(batch_shape), n)
        per_run = max(1, SENSITIVITY_COLUMN_BYTES // (K.element_size() * max(math.prod(batch_shape), 1) * n * n))
        parts = []
        for start in range(0, n, per_run):  # the solvers copy K once per column: a bounded block of columns at a time
            columns = identity[start : start + per_run].expand(-1, *batch_shape, n)
            count = columns.shape[0]
            per_column = (K.expand(count, *batch_shape, n, n), K_query.expand(count, *batch_shape, m, n))  # column first
            column_pred = solve(per_column[0], columns, lam, n_steps, K_query=per_column[1]).pred  # parameters [...] broadcast
            assert column_pred is not None  # K_query was given
            parts.append(column_pred)
        pred = torch.cat(parts) if len(parts) > 1 else parts[0]  # [column, ..., T+1, m]
        return einops.rearrange(pred, "column ... step query -> ... step query column")
    if y is None:
        name = algorithm if isinstance(algorithm, str) else "this solver"
        raise ValueError(f"algorithm {name!r} is nonlinear in y: pass the labels y [..., n] to take its sensitivity at")
    y = as_float64("y", y, min_dim=1).detach()
    try:
        fits = torch.broadcast_shapes(y.shape, (*batch_shape, n)) == (*batch_shape, n)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"y must be [..., n={n}] broadcasting to the prompts {tuple(batch_shape)}, got shape {tuple(y.shape)}")
    zero_prompts = torch.nonzero((y.expand(*batch_shape, n).reshape(-1, n) == 0).all(-1)).flatten().tolist()
    if zero_prompts:
        name = algorithm if isinstance(algorithm, str) else "this solver"
        raise ValueError(
            f"y is all zero in {len(zero_prompts)} prompt(s) (flat indices {zero_prompts[:5]}): {name!r} is nonlinear in y "
            "(CG's iterates are 1-homogeneous, not linear), so it has no derivative there: drop those prompts or give them labels"
        )
    with torch.inference_mode(False), torch.enable_grad():  # also under a caller's no_grad() or inference_mode()
        labels = y.expand(*batch_shape, n).reshape(-1, n).clone().requires_grad_(True)
        K, K_query = (tensor.clone() if tensor.is_inference() else tensor for tensor in (K, K_query))  # autograd saves them
        step_pred = solve(K, labels.reshape(*batch_shape, n), lam, n_steps, K_query=K_query).pred  # [..., T+1, m]
        assert step_pred is not None  # K_query was given
        jacobian = batch_jacobian(step_pred.reshape(labels.shape[0], -1), labels, chunk_size)  # [B, (T+1) m, n]
    return jacobian.reshape(*batch_shape, n_steps + 1, m, n)


def _newton_sensitivities(K: torch.Tensor, K_query: torch.Tensor, lam: float, n_steps: int) -> torch.Tensor:
    """Newton-Schulz's step-t map is K_query M_{t-1} (alpha_t = M_{t-1} y; 0 at t = 0): one run
    of the matrix iteration gives every step's sensitivity `[..., T+1, m, n]` (not one run per
    label column)."""
    system = krr_system(K, torch.zeros(K.shape[:-1], dtype=K.dtype, device=K.device), lam, K_query)
    assert system.K_query is not None  # built with K_query
    _, inverses = newton_schulz_inverses(system, n_steps)
    maps = [torch.zeros_like(system.K_query)] + [torch.bmm(system.K_query, inverse) for inverse in inverses]
    return system.unflatten(torch.stack(maps, dim=1))


RICHARDSON_PRECONDITIONERS: dict[str, str] = {"gd": "none", "richardson_jacobi": "jacobi", "richardson_rowsum": "rowsum"}
"""`ALGORITHMS` entries that are `mi_krr.solvers.richardson` with a preconditioner."""


def solver_with_explicit_parameters(algorithm: str, K: torch.Tensor, lam: float) -> Callable[..., Any]:
    """`ALGORITHMS[algorithm]` with its spectrum-optimal per-prompt parameters computed once on K
    `[..., n, n]` (a zero-step run records them) and bound explicitly, as a solver whose
    parameters `[...]` broadcast over any extra LEADING dimensions of K and y. Any other name is
    returned as is (Newton-Schulz's sensitivities come from `_newton_sensitivities` instead)."""
    from mi_krr.solvers import ALGORITHMS, chebyshev, heavy_ball, richardson

    zero_step = ALGORITHMS[algorithm](K, torch.zeros(K.shape[:-1], dtype=K.dtype, device=K.device), lam, 0)
    if algorithm in RICHARDSON_PRECONDITIONERS:
        return functools.partial(richardson, step=zero_step.step, precond=RICHARDSON_PRECONDITIONERS[algorithm])
    if algorithm == "heavy_ball":
        return functools.partial(heavy_ball, step=zero_step.step, momentum=zero_step.params["momentum"])
    if algorithm == "chebyshev":
        return functools.partial(chebyshev, eig_bounds=zero_step.params["eig_bounds"])
    return ALGORITHMS[algorithm]
