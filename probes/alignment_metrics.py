"""Metrics comparing two matrices, e.g. an attention block with a reference kernel: relative
operator-norm distance, CKA of the double-centred matrices, and Spearman rank correlation of the
entries, overall and per row (`alignment_metrics`, usable on any matrices; `probes.kernel_alignment`
applies them per layer and head). Report the rank correlations beside the distances: a smoother can
have small distances (and plausible prediction error) while ranking neighbours almost at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mi_krr._validation import as_float64

CENTRED_RESIDUE = 1e-12
"""Centring removed everything when what is left has a norm of at most this fraction of the
uncentred norm: the rest is rounding residue, which grows with the entries a mean runs over
(measured: ~1e-16 for a [1, n] block, ~2e-14 for 1000 identical rows), while a real spread
(e.g. float32 attention that is not exactly uniform, ~1e-7) lies far above. Used for the
double-centred matrices CKA compares (`alignment_metrics`), for the row-centred similarity a
scale is fitted to (`fit_inverse_scale`), and for the product of row-centred log attention and
similarity that log_lstsq's slope divides (uniform attention: residue, so beta = 0)."""


def alignment_metrics(K_attn: Any, K_ref: Any, mask: Any = None) -> dict[str, torch.Tensor]:
    """Compare matrices `[..., r, c]` (batched over leading dimensions) -> dict of `[...]`
    float64 tensors:

    - operator_distance: ||K_attn - K_ref||_2 / ||K_ref||_2 (spectral norm);
    - cka: <H_r K_attn H_c, H_r K_ref H_c>_F / (||H_r K_attn H_c||_F ||H_r K_ref H_c||_F), H the
      centring matrices (for square Gram matrices, the usual kernel CKA); NaN where centring
      removes either matrix (0/0: one row or column, identical rows or columns, M_ij = a_i + b_j),
      i.e. leaves at most `CENTRED_RESIDUE` of its Frobenius norm, rounding residue;
    - spearman: Spearman rank correlation of all entries (ties get average ranks);
    - row_spearman: mean over rows of the per-row Spearman correlation (rows with fewer than two
      entries, or constant ones, are skipped; NaN if none is left).

    `mask` (bool, broadcastable to `[..., r, c]`, e.g. the `[r, c]` structural mask of
    `AttentionKernels`; optional) restricts the rank correlations to its entries; the two
    matrices should agree (e.g. both zero) off the mask, which the norms see.
    """
    attn = as_float64("K_attn", K_attn, min_dim=2).detach()
    ref = as_float64("K_ref", K_ref, min_dim=2).detach().to(attn.device)
    if attn.shape != ref.shape:
        raise ValueError(f"K_attn and K_ref must have the same shape, got {tuple(attn.shape)} and {tuple(ref.shape)}")
    if mask is None:
        mask = torch.ones_like(attn, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=attn.device)
        broadcasts = mask.dim() <= attn.dim() and all(size in (1, full) for size, full in zip(reversed(mask.shape), reversed(attn.shape)))
        if mask.dtype != torch.bool or not broadcasts:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(attn.shape)} or one that broadcasts to it, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.expand_as(attn)
    return compare_terms(ComparisonTerms.of(attn, mask), ComparisonTerms.of(ref, mask))


@dataclass
class ComparisonTerms:
    """What `alignment_metrics` needs of one side: the matrices `[..., r, c]`, their double-centred
    form and its Frobenius norm `[...]` (NaN where centring removed them, `_centred_norm`), and
    their ranks over the mask centred on their mean (0 off the mask), over all entries
    `[..., r * c]` and per row `[..., r, c]`."""

    matrices: torch.Tensor
    centred: torch.Tensor
    centred_norm: torch.Tensor
    ranks: torch.Tensor
    row_ranks: torch.Tensor

    @classmethod
    def of(cls, matrices: torch.Tensor, mask: torch.Tensor, row_order: torch.Tensor | None = None) -> "ComparisonTerms":
        """row_order: a permutation likely to sort each row (int64, broadcastable to matrices)."""
        unit = matrices / _largest_entry(matrices)  # CKA is scale-free: keep its squares finite
        centred = _double_centre(unit)
        return cls(
            matrices=matrices,
            centred=centred,
            centred_norm=_centred_norm(unit, centred),
            ranks=_centred_ranks(matrices.flatten(-2), mask.flatten(-2)),
            row_ranks=_centred_ranks(matrices, mask, row_order),
        )


def compare_terms(attn: ComparisonTerms, ref: ComparisonTerms) -> dict[str, torch.Tensor]:
    """`alignment_metrics` from both sides' terms."""
    operator = _spectral_norm(attn.matrices - ref.matrices) / _spectral_norm(ref.matrices)
    cka = torch.linalg.vecdot(attn.centred.flatten(-2), ref.centred.flatten(-2)) / (attn.centred_norm * ref.centred_norm)
    return {
        "operator_distance": operator,
        "cka": cka,
        "spearman": _rank_correlation(attn.ranks, ref.ranks),
        "row_spearman": torch.nanmean(_rank_correlation(attn.row_ranks, ref.row_ranks), dim=-1),
    }


def _spectral_norm(matrices: torch.Tensor) -> torch.Tensor:
    """Largest singular value of matrices `[..., r, c]` -> `[...]`: the root of the largest
    eigenvalue of the Gram matrix on the smaller side (several times cheaper than an SVD), formed
    from the matrices divided by their largest |entry| so that it neither overflows nor
    underflows (unnormalised exp kernels reach 1e160)."""
    scale = _largest_entry(matrices)
    unit = matrices / scale
    gram = unit @ unit.mT if unit.shape[-2] <= unit.shape[-1] else unit.mT @ unit
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt() * scale[..., 0, 0]


def _largest_entry(matrices: torch.Tensor) -> torch.Tensor:
    """max |entry| of each matrix `[..., r, c]` -> `[..., 1, 1]` (1 for a zero matrix)."""
    largest = matrices.abs().amax((-2, -1), keepdim=True)
    return torch.where(largest > 0, largest, 1.0)


def _centred_norm(matrices: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the double-centred matrices `[..., r, c]` -> `[...]`, NaN where it is at
    most `CENTRED_RESIDUE` of the matrices' own norm (centring removed them; so CKA is NaN)."""
    norm = torch.linalg.matrix_norm(centred)
    return torch.where(norm > CENTRED_RESIDUE * torch.linalg.matrix_norm(matrices), norm, torch.nan)


def _double_centre(matrix: torch.Tensor) -> torch.Tensor:
    """H_r M H_c: subtract row and column means, add back the grand mean."""
    return (
        matrix
        - matrix.mean(-1, keepdim=True)
        - matrix.mean(-2, keepdim=True)
        + matrix.mean((-2, -1), keepdim=True)
    )


def _centred_ranks(values: torch.Tensor, mask: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks along the last axis among the `mask`ed entries (ties share their average rank, as in
    scipy.stats.rankdata), minus their mean; 0 off the mask. `[..., m]` -> `[..., m]`. hint: a
    permutation likely to sort the values (see `sort_with_hint`)."""
    order, ordered = sort_with_hint(values.masked_fill(~mask, math.inf), hint)  # entries off the mask sort last
    position = torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device).expand_as(ordered)
    count = mask.sum(-1, keepdim=True)
    tied = (ordered[..., 1:] == ordered[..., :-1]) & (position[..., 1:] <= count)
    sorted_ranks = _tie_averaged(position, tied) if bool(tied.any()) else position
    ranks = torch.empty_like(ordered).scatter_(-1, order, sorted_ranks)
    return torch.where(mask, ranks - (count + 1) / 2, 0.0)  # the mean of ranks 1..count is (count + 1) / 2


def sort_with_hint(values: torch.Tensor, hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, values in that order): the permutation sorting values `[..., m]` (no NaN) along the
    last axis. Tried first: `hint` (int64, broadcastable to values) if given, else the order of one
    fast sort of packed keys (`_packed_key_order`); rows these leave unsorted are argsorted."""
    order = hint.expand_as(values) if hint is not None else _packed_key_order(values)
    ordered = values.gather(-1, order)
    unsorted = (ordered[..., 1:] < ordered[..., :-1]).any(-1)
    if bool(unsorted.any()):
        order = order.clone()
        order[unsorted] = torch.from_numpy(np.argsort(values[unsorted].cpu().numpy(), axis=-1)).to(values.device)
        ordered[unsorted] = values[unsorted].gather(-1, order[unsorted])
    return order, ordered


def _packed_key_order(values: torch.Tensor) -> torch.Tensor:
    """A permutation sorting float64 values `[..., m]` along the last axis up to values within
    2^k ulp of each other (k = bits of m - 1): one sort of int64 keys, each value's
    order-preserving bit pattern with its lowest k bits replaced by its position (NumPy sorts
    plain numbers several times faster than it argsorts)."""
    bits = values.detach().cpu().contiguous().numpy().view(np.int64)
    monotone = bits ^ ((bits >> 63) & np.int64(0x7FFF_FFFF_FFFF_FFFF))  # signed order = float order
    low = np.int64((1 << max(1, (values.shape[-1] - 1).bit_length())) - 1)
    keys = (monotone & ~low) | np.arange(values.shape[-1], dtype=np.int64)
    return torch.from_numpy(np.sort(keys, axis=-1) & low).to(values.device)


def _tie_averaged(position: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """Positions 1..m `[..., m]` of sorted values with each run of ties (tied `[..., m - 1]`: entry
    i equals entry i + 1) replaced by the run's mean position (`position` must hold 1..m; it sets
    the shape and dtype), computed as last - (size - 1) / 2: each entry's
    run index by a cumulative sum, run sizes by one scatter-add, run ends by a cumulative sum of
    the sizes (cheaper than scans of running maxima and minima, which torch pairs with
    indices)."""
    run = torch.cat([torch.zeros_like(tied[..., :1]), ~tied], -1).cumsum(-1)  # run index from 0 [..., m]
    size = torch.zeros_like(position).scatter_add_(-1, run, torch.ones_like(position))  # 0 past the last run
    return size.cumsum(-1).gather(-1, run) - (size.gather(-1, run) - 1) / 2


def _rank_correlation(ranks_a: torch.Tensor, ranks_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of centred ranks `[..., m]` -> `[...]` (NaN where fewer than two
    entries or a constant vector: a zero norm)."""
    denominator = (torch.linalg.vecdot(ranks_a, ranks_a) * torch.linalg.vecdot(ranks_b, ranks_b)).sqrt()
    correlation = torch.linalg.vecdot(ranks_a, ranks_b) / denominator
    return torch.where(denominator > 0, correlation, torch.nan)
