"""Symmetric positive-definite systems with an exactly chosen condition number, for testing
solvers and hand-built transformers where the answer must be known to rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_condition_number, check_count, check_device, check_float_dtype, check_seed
from mi_krr.feature_maps import random_orthogonal

__all__ = ["SPDSystem", "geometric_spectrum", "sample_spd_system"]


def geometric_spectrum(n: int, kappa: float) -> torch.Tensor:
    """`[n]` float64, descending: kappa^(-i/(n-1)) for i = 0..n-1, from 1 down to 1/kappa
    (just [1.0] when n == 1)."""
    n = check_count("n", n, minimum=1)
    kappa = check_condition_number("kappa", kappa)
    return kappa ** (-torch.arange(n, dtype=torch.float64) / max(n - 1, 1))


@dataclass
class SPDSystem:
    """A batch of systems K a = y.

    Attributes:
        matrix: K `[batch, n, n]`, symmetric positive definite, cond(K) = kappa.
        rhs: y `[batch, n]`, standard Gaussian.
        eigenvalues: K's eigenvalues `[n]`, descending: kappa^(-i/(n-1)), from 1 down to 1/kappa
            (the same spectrum for every prompt; the eigenbases differ).
    """

    __repr__ = compact_repr

    matrix: torch.Tensor
    rhs: torch.Tensor
    eigenvalues: torch.Tensor


def sample_spd_system(
    batch_size: int,
    n: int,
    kappa: float,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> SPDSystem:
    """K = U diag(kappa^(-i/(n-1))) U^T with U Haar-random per prompt, and y ~ N(0, I).

    cond(K) = kappa exactly (to float64 rounding). A ridge shifts it: cond(K + lam I) =
    (1 + lam) / (1 / kappa + lam), close to kappa (1 - lam kappa) for lam << 1 / kappa (solvers
    need lam > 0: a small lam tests at nearly kappa).
    Drawn in float64 on the CPU from `seed`, then cast to `dtype` and moved to `device`.
    """
    batch_size = check_count("batch_size", batch_size, minimum=1)
    n = check_count("n", n, minimum=1)
    kappa = check_condition_number("kappa", kappa)
    if n == 1 and kappa != 1:
        raise ValueError("kappa must be 1 when n == 1: a 1x1 matrix has condition number 1")
    seed = check_seed("seed", seed)
    dtype = check_float_dtype("dtype", dtype)
    device = check_device("device", device)
    generator = torch.Generator().manual_seed(seed)
    eigenvalues = geometric_spectrum(n, kappa)
    bases = torch.stack([random_orthogonal(n, generator) for _ in range(batch_size)])
    matrix = (bases * eigenvalues) @ bases.mT
    matrix = (matrix + matrix.mT) / 2
    rhs = torch.randn(batch_size, n, generator=generator, dtype=torch.float64)
    return SPDSystem(
        matrix=matrix.to(device=device, dtype=dtype),
        rhs=rhs.to(device=device, dtype=dtype),
        eigenvalues=eigenvalues.to(device=device, dtype=dtype),
    )
