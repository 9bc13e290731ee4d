"""Conjugate gradient on (K + lam I) alpha = y, plain and Jacobi-preconditioned, with every iterate.

Two schedules of the same recurrence (`backend`), agreeing to rounding:
- "torch": the batch is cut into blocks of `block_size` prompts; each block runs all T steps
  before the next starts. One step is a handful of batched torch ops (no Python per prompt, no
  data-dependent control flow), written out-of-place so that autograd runs through every step
  (label sensitivities d pred_t / d y); any device.
- "fused": `mi_krr.solvers.fused_cg`, a compiled CPU loop running all T steps of one prompt while
  its K stays in cache (no gradients). At B=256, n=64, T=30 it takes a fraction of the torch
  schedule's time (`benchmarks/bench_solvers.py`).
"auto" (the default) takes "fused" for CPU systems when no input needs gradients, else "torch".
The fused schedule computes each prompt's predictions K_query alpha_t in its loop, the torch
schedule in one batched product.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from mi_krr._validation import check_choice, check_count
from mi_krr.solvers.fused_cg import fused_pcg
from mi_krr.solvers.spectrum import preconditioner_diagonal
from mi_krr.solvers.system import KRRSystem, check_positive_definite, check_steps, krr_system, power_of_two_scale, ratio, safe_sqrt
from mi_krr.solvers.trajectory import Trajectory

CG_BACKENDS = ("auto", "fused", "torch")
"""`cg` / `jacobi_cg` schedules (module docstring)."""

CG_BLOCK_BYTES = 8 * 2**20
"""Default cache budget of the torch schedule for one block's kernels K `[block, n, n]` (float64), see `cg_block_size`.

Each CG step reads every kernel of its block once; a block whose kernels stay in cache runs all
T steps without going back to main memory, while every extra block pays the per-step torch op
overhead (about a dozen small ops) once more. On the 2-core AMD EPYC this was tuned on (1 MiB
L2 per core, 32 MiB L3), 30 steps at B=256, n=64 (8 MiB of kernels) took, idle machine, 2
threads, interleaved medians: blocks of 128 -> 11.0 ms, 256 (one block) -> 10.3 ms; at B=64,
n=128: 32 -> 8.0 ms, 64 (one block) -> 6.9 ms. Mat-vecs on L3-resident kernels ran at the same
speed as on L2-sized blocks, so op overhead decides. Scale the budget with the cache per
prompt batch on other machines.
"""


def cg_block_size(n: int, budget_bytes: int = CG_BLOCK_BYTES) -> int:
    """Prompts per CG block so that one block's float64 kernels `[block, n, n]` fill at most
    `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (8 * n * n))


def cg(
    K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None, block_size: int | None = None, backend: str = "auto"
) -> Trajectory:
    """Hestenes–Stiefel CG on (K + lam I) alpha = y from alpha_0 = 0, every iterate kept.

    Args:
        K: kernel matrices `[..., n, n]` (symmetric PSD).
        y: labels `[..., n]`.
        lam: ridge parameter > 0.
        n_steps: T, the number of CG steps (0 returns the start).
        K_query: query-support kernel `[..., m, n]`; gives `pred` `[..., T+1, m]`.
        block_size: prompts per block of the torch schedule (default `cg_block_size(n)`).
        backend: "auto" (default), "fused" or "torch" (module docstring; "fused" needs CPU
            inputs that need no gradients).

    Returns:
        Trajectory with alpha `[..., T+1, n]`, residual_norm `[..., T+1]`, pred, method "cg".
        residual_norm is CG's recursively updated residual (what SciPy's and most CG codes
        track): equal to ||y - (K + lam I) alpha_t|| to rounding until that reaches float64's
        attainable accuracy (~1e-16 ||K + lam I|| ||alpha_t||); past convergence it keeps
        falling geometrically, many orders of magnitude lower, while the true residual of
        alpha_t stalls there. Computing the true one would cost a second mat-vec per step; where it is wanted:
        `torch.linalg.vector_norm(y[..., None, :] - alpha @ (K + lam I), dim=-1)`.
    """
    system = krr_system(K, y, lam, K_query)
    return _conjugate_gradient(system, check_steps(n_steps), None, block_size, backend, "cg")


def jacobi_cg(
    K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None, block_size: int | None = None, backend: str = "auto"
) -> Trajectory:
    """CG preconditioned with P = diag(K + lam I)^-1 (PCG), alpha_0 = 0; arguments as `cg`.

    residual_norm is the unpreconditioned residual's norm (recursively updated: see `cg`);
    method "jacobi_cg", preconditioner "jacobi".
    """
    system = krr_system(K, y, lam, K_query)
    inverse_diagonal = preconditioner_diagonal(system, "jacobi")
    return _conjugate_gradient(system, check_steps(n_steps), inverse_diagonal, block_size, backend, "jacobi_cg")


def _conjugate_gradient(
    system: KRRSystem,
    n_steps: int,
    inverse_diagonal: torch.Tensor | None,
    block_size: int | None,
    backend: str,
    method: str,
) -> Trajectory:
    block = cg_block_size(system.n) if block_size is None else check_count("block_size", block_size, minimum=1)
    scale = power_of_two_scale(system.y)  # CG's step lengths are ratios of squared norms of y's size
    rescaled = bool((scale != 1).any())
    unit = dataclasses.replace(system, y=system.y / scale) if rescaled else system
    if _use_fused(unit, inverse_diagonal, check_choice("backend", backend, CG_BACKENDS)):
        alpha, squared_norms, pred = fused_pcg(unit.K, unit.y, unit.lam, n_steps, inverse_diagonal, unit.K_query)
        residual_norm = squared_norms.sqrt()
    else:
        alpha, residual_norm = _torch_schedule(unit, n_steps, inverse_diagonal, block)
        pred = unit.predictions(alpha)
    if rescaled:
        alpha, residual_norm = alpha * scale, residual_norm * scale.squeeze(-1)
        pred = None if pred is None else pred * scale
    return system.trajectory(
        alpha, residual_norm, method, preconditioner="none" if inverse_diagonal is None else "jacobi", pred=pred
    )


def _use_fused(system: KRRSystem, inverse_diagonal: torch.Tensor | None, backend: str) -> bool:
    """Whether `backend` runs the fused schedule on `system`; "fused" where it cannot is an error."""
    if backend == "torch":
        return False
    on_cpu = system.K.device.type == "cpu"
    needs_gradients = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (system.K, system.y, system.K_query, inverse_diagonal)
    )
    if backend == "fused" and not on_cpu:
        raise ValueError(f"backend='fused' runs on the CPU, not {system.K.device}: move K and y to the CPU or pass backend='torch'")
    if backend == "fused" and needs_gradients:
        raise ValueError("backend='fused' records no gradients, and K, y or K_query requires grad: pass backend='torch' (or 'auto') to differentiate through CG")
    return on_cpu and not needs_gradients


def _torch_schedule(
    system: KRRSystem, n_steps: int, inverse_diagonal: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked torch schedule: iterates `[B, T+1, n]` and residual norms `[B, T+1]`."""
    batch = system.K.shape[0]
    blocks = [
        _pcg_block(
            system.K[start : start + block],
            system.y[start : start + block],
            system.lam,
            n_steps,
            None if inverse_diagonal is None else inverse_diagonal[start : start + block],
        )
        for start in range(0, max(batch, 1), block)  # one (empty) block for an empty batch
    ]
    check_positive_definite(any(indefinite for _, _, indefinite in blocks))
    alpha = torch.cat([a for a, _, _ in blocks]) if len(blocks) > 1 else blocks[0][0]
    residual_norm = torch.cat([r for _, r, _ in blocks]) if len(blocks) > 1 else blocks[0][1]
    return alpha, residual_norm


def _pcg_block(
    K: torch.Tensor, y: torch.Tensor, lam: float, n_steps: int, inverse_diagonal: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """PCG on one block: K `[b, n, n]`, y `[b, 1, n]`, P's diagonal `[b, 1, n]` or None (P = I).

    Returns iterates `[b, T+1, n]`, residual norms `[b, T+1]`, and whether any curvature
    p^T (K + lam I) p was < 0 (K + lam I not positive definite).
    """
    residual = y
    preconditioned = residual if inverse_diagonal is None else residual * inverse_diagonal
    direction = preconditioned
    rho = _dot(residual, preconditioned)  # r^T P r, [b, 1, 1]
    alpha = torch.zeros_like(y)
    iterates = [alpha]
    squared_norms = [rho if inverse_diagonal is None else _dot(residual, residual)]
    curvatures = []  # p^T (K + lam I) p per step, checked for < 0 once after the loop
    for _ in range(n_steps):
        image = torch.baddbmm(direction, direction, K, beta=lam)  # (K + lam I) p, K symmetric
        curvatures.append(_dot(direction, image))
        step = ratio(rho, curvatures[-1])
        alpha = torch.addcmul(alpha, step, direction)
        residual = torch.addcmul(residual, step, image, value=-1.0)
        preconditioned = residual if inverse_diagonal is None else residual * inverse_diagonal
        rho_next = _dot(residual, preconditioned)
        direction = torch.addcmul(preconditioned, ratio(rho_next, rho), direction)
        rho = rho_next
        iterates.append(alpha)
        squared_norms.append(rho if inverse_diagonal is None else _dot(residual, residual))
    indefinite = bool(curvatures) and bool((torch.cat(curvatures, dim=-1).detach() < 0).any())
    return torch.cat(iterates, dim=-2), safe_sqrt(torch.cat(squared_norms, dim=-1).squeeze(-2)), indefinite


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of row vectors `[b, 1, n]` -> `[b, 1, 1]` (`vecdot`: the same
    products and sum as `(u * v).sum(-1)`, bit for bit, in one call)."""
    return torch.linalg.vecdot(u, v).unsqueeze(-1)


def cg_error_bound(kappa: Any, t: Any) -> Any:
    """The classical bound on CG's A-norm error ratio ||e_t||_A / ||e_0||_A after t steps:
    2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^t, kappa = cond(K + lam I) >= 1.

    Vectorised: kappa and t may be floats, NumPy arrays or torch tensors (broadcast together);
    returns a tensor if either is a tensor, else a NumPy array (a float for scalar inputs).
    """
    if isinstance(kappa, torch.Tensor) or isinstance(t, torch.Tensor):
        kappa_t = torch.as_tensor(kappa, dtype=torch.float64)
        t_t = torch.as_tensor(t, dtype=torch.float64, device=kappa_t.device)
        _check_bound_arguments(kappa_t.detach().cpu().numpy(), t_t.detach().cpu().numpy())
        root = kappa_t.sqrt()
        return 2.0 * ((root - 1.0) / (root + 1.0)) ** t_t
    kappa_a = np.asarray(kappa, dtype=np.float64)
    t_a = np.asarray(t, dtype=np.float64)
    _check_bound_arguments(kappa_a, t_a)
    root_a = np.sqrt(kappa_a)
    bound = 2.0 * ((root_a - 1.0) / (root_a + 1.0)) ** t_a
    return float(bound) if bound.ndim == 0 else bound


def _check_bound_arguments(kappa: np.ndarray, t: np.ndarray) -> None:
    if not (np.isfinite(kappa).all() and (kappa >= 1).all()):
        raise ValueError("kappa must be a finite condition number >= 1 (mu_max / mu_min of K + lam I)")
    if not (np.isfinite(t).all() and (t >= 0).all()):
        raise ValueError("t must be a finite step count >= 0")
