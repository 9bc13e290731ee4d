"""Iterative Newton (Newton–Schulz) for the inverse of K + lam I, as in Fu et al. (2024)."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from mi_krr.solvers.spectrum import preconditioned_eigenvalues
from mi_krr.solvers.system import KRRSystem, check_steps, krr_system
from mi_krr.solvers.trajectory import Trajectory

SCALE_MARGIN_PER_DIMENSION = 4.0
"""delta = SCALE_MARGIN_PER_DIMENSION * n * eps in `newton_schulz_scale` (see there)."""


def newton_schulz_scale(eigenvalues: torch.Tensor) -> torch.Tensor:
    """The start scale c = 2 / ((1 + delta) mu_max^2 + mu_min^2), delta = 4 n eps (float64 eps),
    from the ascending eigenvalues `[batch, n]` of A = K + lam I -> `[batch]`.

    With delta = 0 this c minimises the spectral radius of I - c A^2, but the mode at mu_max,
    -(kappa^2 - 1) / (kappa^2 + 1), is then -1 to rounding once kappa^2 > ~1/eps: eigvalsh's
    error or the rounding of the first product pushes it below -1, and as each step squares
    I - M_s A, the overshoot doubles in the exponent every step (inf/NaN after ~60 steps at
    kappa ~ 1e9). delta keeps 2 - c mu_max^2 >= 2 delta / (1 + delta) above both errors
    (eigvalsh: ~n eps on mu_max, so ~2 n eps on mu_max^2; first product: ~2 n eps); delta = n eps
    still overflowed on random kappa ~ 1e9 systems, 2 n eps never did. Its cost is nil: the
    spectral radius of I - c A^2 becomes ((1 + delta) kappa^2 - 1) / ((1 + delta) kappa^2 + 1).
    """
    n = eigenvalues.shape[-1]
    delta = SCALE_MARGIN_PER_DIMENSION * n * torch.finfo(eigenvalues.dtype).eps
    return 2.0 / ((1.0 + delta) * eigenvalues[:, -1] ** 2 + eigenvalues[:, 0] ** 2)


def newton_schulz(K: Any, y: Any, lam: float, n_steps: int, K_query: Any = None) -> Trajectory:
    """Newton–Schulz iteration M_{s+1} = 2 M_s - M_s A M_s on A = K + lam I from M_0 = c A,
    c = 2 / ((1 + delta) mu_max^2 + mu_min^2), delta = 4 n eps (per prompt, from batched eigvalsh):
    the margin delta keeps every mode of I - c A^2 strictly inside (-1, 1) despite rounding, where
    delta = 0 overflows once kappa^2 > ~1/eps (see `newton_schulz_scale`).

    Then I - M_s A = (I - c A^2)^(2^s), whose spectral radius
    rho = ((1 + delta) kappa^2 - 1) / ((1 + delta) kappa^2 + 1) < 1 (kappa = mu_max / mu_min), so
    ||y - A alpha_t|| <= rho^(2^(t-1)) ||y|| for t >= 1 in exact arithmetic: quadratic
    convergence after about log2(kappa^2) steps. In float64 the iterates follow this closed form
    to ~n eps kappa relative error, the accuracy of a direct solve. Each step costs two batched
    n x n matrix products.

    Indexing: alpha[0] = 0 (the common start of every Trajectory) and alpha[t] = M_{t-1} y for
    t >= 1, so alpha[1] = c A y and T steps use M_0 .. M_{T-1}.

    Args: as in `cg`.

    Returns:
        Trajectory (method "newton", preconditioner "none"), params {"scale": c `[...]`, the
        margin-shrunk c above}; residual_norm = ||y - A alpha_t||.
    """
    system = krr_system(K, y, lam, K_query)
    scale, inverses = newton_schulz_inverses(system, check_steps(n_steps))
    alpha = torch.cat([torch.zeros_like(system.y)] + [torch.bmm(system.y, inverse) for inverse in inverses], dim=-2)
    return system.trajectory(
        alpha,
        system.residual_norms(alpha),
        "newton",
        preconditioner="none",
        params={"scale": system.recorded(None, scale)},
    )


def newton_schulz_inverses(system: KRRSystem, n_steps: int) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The start scale c `[batch, 1, 1]` and the approximate inverses M_0, ..., M_{T-1} of
    A = K + lam I (each `[batch, n, n]`, symmetric), produced one at a time so that only two are
    held at once (`newton_schulz`; also the label sensitivities K_query M_{t-1})."""
    scale = newton_schulz_scale(preconditioned_eigenvalues(system)).reshape(-1, 1, 1)

    def inverses() -> Iterator[torch.Tensor]:
        A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
        inverse = scale * A  # M_0, symmetric like every M_s (a polynomial in A)
        for step in range(n_steps):
            yield inverse
            if step + 1 < n_steps:
                inverse = torch.baddbmm(inverse, inverse, torch.bmm(A, inverse), beta=2.0, alpha=-1.0)

    return scale, inverses()


iterative_newton = newton_schulz
"""Alias: the name Fu et al. (2024) use for this iteration."""
