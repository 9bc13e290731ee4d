"""width: head width limits how well the CG transformer computes K p.

The CG transformer with an m-wide head runs CG exactly on the head's kernel Phi Phi^T, so after
enough steps its error to oracle KRR on the true kernel is the head's approximation error. This
reports that error against m beside d_eff(lam) = tr K (K + lam I)^-1 of the true K (MetaRepICL's
width finding) for every head of `WIDTH_HEADS`: random features (random projections for the
linear kernel, positive random features for the exp kernel), a Gaussian sketch of the kernel's
own feature space, and the top-m eigenprojection (whose kernel is the best rank-m approximation
of the prompt's joint kernel matrix, Eckart-Young; not the head with the smallest prediction
error). Runs `mi_krr.construct.studies.width_study` and adds the headline numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mi_krr.reproductions._format import key_numbers_text

QUICK: dict[str, Any] = {"widths": (4, 16, 64), "kernels": ("linear",), "dim": 8, "n_support": 24, "n_steps": 24, "batch_size": 4,
                         "heads": ("random_features",), "n_seeds": 1}


@dataclass
class WidthResult:
    """`study` (`WidthStudy`: per kernel, head and width, the model's and feature-KRR's mean
    relative error to oracle KRR over the prompts, and d_eff) and, per kernel:

    Attributes:
        width_for_tolerance: the smallest studied width whose model error with the head `head`
            is < `tolerance` (None: none is).
        floor_gap: max over the heads measured at `study.lam` and the widths of |model error -
            feature-KRR error| (0 when the model has converged to KRR on its head's features, so
            the head alone sets its error).
        tolerance: 0.1 (10% relative error).
        head: the head `width_for_tolerance` reads: "random_features" where it was measured,
            else the first of `study.heads`.
    """

    study: Any
    width_for_tolerance: dict[str, int | None]
    floor_gap: dict[str, float]
    tolerance: float
    head: str

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study.to_dict(), "width_for_tolerance": self.width_for_tolerance, "floor_gap": self.floor_gap,
                "tolerance": self.tolerance, "head": self.head}

    def plot(self):
        return self.study.plot()

    def key_numbers(self) -> dict[str, Any]:
        numbers = {}
        for kernel in self.study.kernels:
            numbers[f"{kernel}: d_eff(lam={self.study.lam:g})"] = self.study.d_eff[kernel]
            for head in self.study.heads:
                curve = self.study.curve(kernel, head, self.study.lam)
                errors = ", ".join(f"m={w}: {e:.3g}" for w, e in zip(self.study.widths, curve.error))
                numbers[f"{kernel}, {head} head: rel. error to oracle KRR"] = errors
            read_head = self.head.replace("_", " ")
            numbers[f"{kernel}: smallest width with error < {self.tolerance:g} ({read_head})"] = self.width_for_tolerance[kernel]
            numbers[f"{kernel}: max |model - KRR on features| (error units)"] = self.floor_gap[kernel]
        return numbers

    def summary(self) -> str:
        return key_numbers_text(self.key_numbers())


def width(
    widths: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128),
    kernels: tuple[str, ...] = ("linear", "exp"),
    dim: int = 16,
    n_support: int = 64,
    n_query: int = 16,
    lam: float = 1.0,
    n_steps: int = 48,
    batch_size: int = 8,
    seed: int = 0,
    tolerance: float = 0.1,
    heads: tuple[str, ...] | None = None,
    n_seeds: int = 1,
    device: str = "cpu",
) -> WidthResult:
    """Run the width study (module docstring) on `device` and summarise it. Widths stop at 128 (> n + m
    points, where the top-m head is exact): the construction's cost grows with m (d_model =
    23 + d + 2 m). `heads` (default: every head of `WIDTH_HEADS`; any of them, an unknown name refused
    before anything runs), `n_seeds` and `device` go to `width_study`; `scripts/construction_figures.py` runs the larger study behind
    docs/figures/construct_width.png."""
    from mi_krr._validation import as_tuple, check_positive
    from mi_krr.construct.studies import WIDTH_HEADS, width_study

    tolerance = check_positive("tolerance", tolerance)
    heads = WIDTH_HEADS if heads is None else as_tuple("heads", heads, "('random_features',)")
    study = width_study(widths=as_tuple("widths", widths, "(8, 32)"), kernels=as_tuple("kernels", kernels, "('linear', 'exp')"), dim=dim, n_support=n_support, n_query=n_query, lam=lam,
                        n_steps=n_steps, batch_size=batch_size, seed=seed, n_seeds=n_seeds, device=device, heads=heads)
    head = "random_features" if "random_features" in study.heads else study.heads[0]
    first, gap = {}, {}
    for kernel in study.kernels:
        model = np.asarray(study.curve(kernel, head).error)
        below = np.flatnonzero(model < tolerance)
        first[kernel] = int(study.widths[below[0]]) if below.size else None
        curves = [study.curve(kernel, measured) for measured in study.heads]
        gap[kernel] = float(max(np.max(np.abs(np.subtract(curve.error, curve.feature_krr_error))) for curve in curves))
    return WidthResult(study, first, gap, tolerance, head)
