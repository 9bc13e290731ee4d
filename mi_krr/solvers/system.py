"""The validated linear system (K + lam I) alpha = y that every solver works on.

Solvers see one flat batch: leading dimensions `...` are folded into `batch` on the way in and
restored on the way out, so each solver is written once for `[batch, n, n]`.

Vectors are kept as row vectors `[batch, k, n]`: since K is symmetric, A v = (v^T A)^T, so
`v @ K` applies A to k vectors at once in one batched product (on the 2-core CPU used here,
within ~20% of the column form `K @ v.mT` for k = 1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import SYMMETRY_RTOL, as_float64, check_count, check_positive, symmetry_rtol
from mi_krr.solvers.trajectory import Trajectory


TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class KRRSystem:
    """(K + lam I) alpha = y, leading dimensions `...` folded into one `batch` dimension.

    Attributes:
        K: kernel matrices `[batch, n, n]`, symmetric, float64.
        y: labels as row vectors `[batch, 1, n]`.
        lam: the ridge parameter (> 0).
        K_query: query-support kernel `[batch, m, n]`, or None.
        batch_shape: the caller's leading dimensions `...`.
    """

    __repr__ = compact_repr

    K: torch.Tensor
    y: torch.Tensor
    lam: float
    K_query: torch.Tensor | None
    batch_shape: torch.Size

    @property
    def n(self) -> int:
        return self.K.shape[-1]

    @property
    def diagonal(self) -> torch.Tensor:
        """diag(K + lam I) as row vectors `[batch, 1, n]`."""
        return (torch.diagonal(self.K, dim1=-2, dim2=-1) + self.lam).unsqueeze(-2)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """(K + lam I) applied to row vectors `v` `[batch, k, n]` -> `[batch, k, n]`."""
        return torch.baddbmm(v, v, self.K, beta=self.lam)

    def residual_norms(self, alpha: torch.Tensor) -> torch.Tensor:
        """||y - (K + lam I) alpha_t|| for iterates `alpha` `[batch, T+1, n]` -> `[batch, T+1]`."""
        return residual_norm(self.y - self.apply(alpha))

    def predictions(self, alpha: torch.Tensor) -> torch.Tensor | None:
        """K_query @ alpha_t for iterates `[batch, T+1, n]` -> `[batch, T+1, m]` (None without K_query)."""
        if self.K_query is None:
            return None
        return torch.bmm(alpha, self.K_query.mT)

    def unflatten(self, value: torch.Tensor) -> torch.Tensor:
        """Restore the caller's leading dimensions: `[batch, *rest]` -> `[..., *rest]`."""
        return value.reshape((*self.batch_shape, *value.shape[1:]))

    def per_prompt(self, name: str, value: Any, positive: bool = True) -> torch.Tensor:
        """A per-prompt parameter (number, or array broadcastable to `...`) as `[batch, 1, 1]`.

        Raises ValueError naming `name` when it is not finite, not > 0 (if `positive`), or does
        not broadcast to `...`.
        """
        tensor = as_float64(name, value).to(self.K.device)
        try:
            tensor = tensor.expand(self.batch_shape)
        except RuntimeError as exc:
            raise ValueError(
                f"{name} must be a number or broadcast to the batch shape {tuple(self.batch_shape)}, "
                f"got shape {tuple(tensor.shape)}"
            ) from exc
        if positive and not (tensor.detach() > 0).all():
            raise ValueError(f"{name} must be > 0, got {value!r}")
        return tensor.reshape(-1, 1, 1)

    def recorded(self, given: Any, per_prompt: torch.Tensor) -> float | torch.Tensor:
        """How a parameter is recorded in the Trajectory: a user's plain number as given, anything
        else as the per-prompt tensor `[...]`."""
        if isinstance(given, numbers.Real) and not isinstance(given, bool):  # NumPy scalars too
            return float(given)
        return self.unflatten(per_prompt.reshape(-1))

    def trajectory(
        self,
        alpha: torch.Tensor,
        residual_norm: torch.Tensor,
        method: str,
        step: float | torch.Tensor | None = None,
        preconditioner: str | None = None,
        params: dict[str, Any] | None = None,
        pred: torch.Tensor | None = None,
    ) -> Trajectory:
        """Package flat `[batch, T+1, n]` iterates and `[batch, T+1]` residual norms with the
        caller's leading dimensions restored; predictions `[batch, T+1, m]` are computed here
        unless given."""
        pred = self.predictions(alpha) if pred is None else pred
        return Trajectory(
            alpha=self.unflatten(alpha),
            residual_norm=self.unflatten(residual_norm),
            pred=None if pred is None else self.unflatten(pred),
            method=method,
            lam=self.lam,
            step=step,
            preconditioner=preconditioner,
            params=params or {},
        )


SAFE_EXPONENT_RANGE = 200
"""Values whose largest |value| lies within [2^-200, 2^200] (~6e-61 to ~1.6e60) are squared and
summed as they are (their squares stay far inside float64's range); `power_of_two_scale` (and
`probes.scoring.common_scale`) rescale the others."""


def power_of_two_scale(values: torch.Tensor) -> torch.Tensor:
    """Per vector along the last dimension of `values` `[..., n]`, the power of two to divide it by
    before its squares are formed -> `[..., 1]`, detached: 1 for values of ordinary size (largest
    |value| within 2^+-`SAFE_EXPONENT_RANGE`), else about the largest |value|.

    Squares of entries beyond ~1e+-154 overflow or underflow in float64: CG's step lengths
    (ratios of squared norms) become NaN or 0, a plain vector norm inf or 0. A power of two divides
    and multiplies back exactly, so every quantity 1-homogeneous in the values (CG's iterates in y,
    a norm) is unchanged by the round trip, and d alpha_t / d y too.
    """
    _, exponent = torch.frexp(values.detach().abs().amax(-1, keepdim=True))
    exponent = torch.where(exponent.abs() > SAFE_EXPONENT_RANGE, exponent, 0)
    return torch.ldexp(torch.ones_like(exponent, dtype=values.dtype), exponent)


def residual_norm(residual: torch.Tensor) -> torch.Tensor:
    """||r|| over the last dimension `[..., n]` -> `[...]`, for residuals of any magnitude (a
    plain vector norm of a residual ~1e170 is inf, of one ~1e-170 is 0): computed on r divided by
    `power_of_two_scale(r)` and multiplied back, so ordinary residuals get the very bits of
    `torch.linalg.vector_norm`."""
    scale = power_of_two_scale(residual)
    return torch.linalg.vector_norm(residual / scale, dim=-1) * scale.squeeze(-1)


def krr_system(K: Any, y: Any, lam: float, K_query: Any = None) -> KRRSystem:
    """Validate solver inputs and fold leading dimensions.

    Args:
        K: kernel matrices `[..., n, n]` (symmetric; tensor or array).
        y: labels `[..., n]`.
        lam: ridge parameter, finite and > 0.
        K_query: query-support kernel `[..., m, n]`, or None.

    Raises ValueError (one line, naming the argument and the fix) on any bad input.
    """
    lam = check_positive("lam", lam)
    rtol = symmetry_rtol(K)
    K = as_float64("K", K, min_dim=2)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square [..., n, n], got shape {tuple(K.shape)}")
    n = K.shape[-1]
    if n < 1:
        raise ValueError("K must hold at least one support point (n >= 1), got n = 0")
    batch_shape = K.shape[:-2]
    if not _is_symmetric(K.detach().reshape(math.prod(batch_shape), n, n), rtol):
        raise ValueError("K must be symmetric (a kernel matrix): symmetrise it with (K + K.mT) / 2")
    if rtol > SYMMETRY_RTOL:  # given in lower precision: symmetric to its rounding, made exactly so
        K = (K + K.mT) / 2
    y = as_float64("y", y).to(K.device)
    if y.shape != K.shape[:-1]:
        raise ValueError(f"y must have shape [..., n] = {tuple(K.shape[:-1])} to match K, got {tuple(y.shape)}")
    if K_query is not None:
        K_query = as_float64("K_query", K_query, min_dim=2).to(K.device)
        if K_query.shape[-1] != n or K_query.shape[:-2] != batch_shape:
            raise ValueError(
                f"K_query must have shape [..., m, n] = {(*batch_shape, 'm', n)} to match K, got {tuple(K_query.shape)}"
            )
        K_query = K_query.reshape(math.prod(batch_shape), K_query.shape[-2], n)
    return KRRSystem(
        K=K.reshape(math.prod(batch_shape), n, n),
        y=y.reshape(math.prod(batch_shape), 1, n),
        lam=lam,
        K_query=K_query,
        batch_shape=batch_shape,
    )


def _is_symmetric(K: torch.Tensor, rtol: float) -> bool:
    """Whether |(K - K^T) v| <= rtol |K v| (max norms, each prompt of K `[batch, n, n]` at its own
    scale) for a fixed probe vector v with entries in [1, 2): two fast batched mat-vecs instead of
    a transposed copy of K. An asymmetric K passes only if K - K^T annihilates that v."""
    if K.numel() == 0:
        return True
    generator = torch.Generator().manual_seed(0)
    probe = (1.0 + torch.rand(K.shape[-1], generator=generator, dtype=K.dtype)).to(K.device)
    probe = probe.expand(K.shape[0], 1, -1).contiguous()
    columns = torch.bmm(K, probe.mT).mT  # K v, [batch, 1, n]
    rows = torch.bmm(probe, K)  # v^T K = (K^T v)^T
    return bool(((columns - rows).abs().amax(-1) <= rtol * columns.abs().amax(-1)).all())


def check_positive_definite(indefinite: bool) -> None:
    """Raise the one error every solver gives when it finds K + lam I not positive definite (a
    non-positive eigenvalue, or CG's curvature p^T (K + lam I) p < 0)."""
    if indefinite:
        raise ValueError(
            "K + lam I is not positive definite, so it is no KRR system: K must be a PSD kernel matrix "
            "(if it is PSD only up to rounding, raise lam)"
        )


def check_steps(n_steps: Any) -> int:
    """n_steps as an int >= 0 (ValueError otherwise)."""
    return check_count("n_steps", n_steps)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / max(denominator, TINY), for CG's step lengths rho / p^T A p and rho' / rho.

    Their denominators vanish only on exact convergence, where numerator and every vector they
    multiply are exactly 0: the step is then 0 and, since its upstream gradient is exactly 0 too,
    the backward pass stays finite. (The clamp changes nothing else unless squared residual
    norms fall below ~1e-308.)
    """
    return numerator / denominator.clamp_min(TINY)


def safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt for values >= 0 whose gradient is 0 (not inf) at 0."""
    positive = value > 0
    return torch.where(positive, torch.where(positive, value, 1.0).sqrt(), 0.0)
