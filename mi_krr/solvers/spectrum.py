"""Diagonal preconditioners and the spectra that set default step sizes (used by the solvers and by
`probes.step_sizes`)."""

from __future__ import annotations

import torch

from mi_krr._validation import check_choice
from mi_krr.solvers.system import KRRSystem, check_positive_definite

PRECONDITIONERS = ("none", "jacobi", "rowsum")


def preconditioner_diagonal(system: KRRSystem, kind: str) -> torch.Tensor | None:
    """The diagonal of P as row vectors `[batch, 1, n]` (None for "none").

    "jacobi": P = diag(K + lam I)^-1. "rowsum": P = D^-1 with D = diag(K 1), the row
    normalisation softmax attention applies to its kernel.
    """
    kind = check_choice("precond", kind, PRECONDITIONERS)
    if kind == "none":
        return None
    if kind == "jacobi":
        diagonal = system.diagonal
        if not (diagonal.detach() > 0).all():
            raise ValueError("K has a diagonal entry <= -lam, so the Jacobi preconditioner is undefined: K must be PSD")
        return 1.0 / diagonal
    row_sums = system.K.sum(-1).unsqueeze(-2)
    if not (row_sums.detach() > 0).all():
        raise ValueError(
            "K has a row sum <= 0, so the rowsum preconditioner D^-1 is undefined: use a positive kernel "
            "(e.g. Gaussian) or precond='jacobi'"
        )
    return 1.0 / row_sums


def preconditioned_eigenvalues(system: KRRSystem, diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending eigenvalues of P (K + lam I) `[batch, n]`, P = diag(`diagonal`) (identity if None).

    P A is similar to the symmetric P^1/2 A P^1/2 (P SPD diagonal), so its eigenvalues are real
    and positive (else ValueError: K + lam I is not positive definite) and come from one batched
    eigvalsh.
    """
    A = system.K + system.lam * torch.eye(system.n, dtype=system.K.dtype, device=system.K.device)
    if diagonal is not None:
        root = diagonal.sqrt()
        A = root.mT * A * root
    eigenvalues = torch.linalg.eigvalsh(A)
    check_positive_definite(eigenvalues.numel() > 0 and bool((eigenvalues[:, 0].detach() <= 0).any()))
    return eigenvalues


def spectrum_bounds(system: KRRSystem, diagonal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu_min, mu_max) of P (K + lam I), each `[batch]`; see `preconditioned_eigenvalues`."""
    eigenvalues = preconditioned_eigenvalues(system, diagonal)
    return eigenvalues[:, 0], eigenvalues[:, -1]


def richardson_optimal_step(mu_min: torch.Tensor, mu_max: torch.Tensor) -> torch.Tensor:
    """Richardson's optimal step 2 / (mu_min + mu_max) for spectrum bounds of P (K + lam I)."""
    return 2.0 / (mu_min + mu_max)


def polyak_parameters(mu_min: torch.Tensor, mu_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polyak's optimal heavy-ball (step, momentum) for spectrum bounds of K + lam I:
    4 / (sqrt(mu_max) + sqrt(mu_min))^2 and ((sqrt(mu_max) - sqrt(mu_min)) / (sqrt(mu_max) + sqrt(mu_min)))^2."""
    root_min, root_max = mu_min.sqrt(), mu_max.sqrt()
    return 4.0 / (root_max + root_min) ** 2, ((root_max - root_min) / (root_max + root_min)) ** 2
