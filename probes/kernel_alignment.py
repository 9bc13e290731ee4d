"""How close is an attention head's similarity to a classical kernel?

Softmax attention applies the row-normalised kernel D^-1 K of K = exp(q . k / sqrt(d_head)), so a
head is compared with a reference kernel only after the same normalisation: both matrices are
restricted to the keys the head actually sees (its nonzero pattern entries among the support
keys) and each row is scaled to sum to one. References: the exponential kernel
exp(x . x' / tau) and the Gaussian kernel exp(-|x - x'|^2 / (2 sigma^2)) (`mi_krr.kernels`
conventions), on the raw inputs or a given representation, with tau / sigma fitted per layer and
head (one value pooled over prompts).

Metrics (`alignment_metrics`, usable on any matrices): relative operator-norm distance, CKA of the
centred matrices, and Spearman rank correlation of the entries, overall and per row. Report the
rank correlations beside the distances: a smoother can have small distances (and plausible
prediction error) while ranking neighbours almost at random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from mi_krr._validation import as_float64, check_choice
from mi_krr.models.adapter import ICLModel
from mi_krr.tasks import ICLTask
from probes.attention_kernels import AttentionKernels, attention_kernels

REFERENCE_KERNELS = ("exp", "gaussian")
BLOCKS = ("query", "support")
FITS = ("distance", "log_lstsq")
METRICS = ("operator_distance", "cka", "spearman", "row_spearman")


@dataclass
class KernelAlignment:
    """Alignment of every layer's and head's attention with reference kernels.

    Attributes:
        block: "query" (query x support rows) or "support" (support x support).
        scale: per kernel, the fitted parameter `[layer, head]`: temperature tau for "exp",
            bandwidth sigma for "gaussian" (inf: the best reference is uniform over the keys;
            NaN: fit="log_lstsq" found the head anti-aligned with the kernel, beta < 0).
        metrics: per kernel, per metric (`METRICS`), the mean over prompts `[layer, head]`
            (NaN-ignoring: row Spearman is undefined on rows that see one key).
        per_prompt: the same per prompt `[batch, layer, head]`.
    """

    block: str
    scale: dict[str, torch.Tensor]
    metrics: dict[str, dict[str, torch.Tensor]]
    per_prompt: dict[str, dict[str, torch.Tensor]]

    @property
    def tau(self) -> torch.Tensor:
        """Fitted exp-kernel temperature `[layer, head]`."""
        return self.scale["exp"]

    @property
    def bandwidth(self) -> torch.Tensor:
        """Fitted Gaussian bandwidth `[layer, head]`."""
        return self.scale["gaussian"]

    def to_dict(self) -> dict[str, Any]:
        """Nested lists of floats (inf / NaN stay floats here: pass it through
        `probes.diagnose.strict_json` before `json.dumps(..., allow_nan=False)`, as
        `Diagnosis.to_json` does, to write them as null)."""
        return {
            "block": self.block,
            "scale": {kernel: value.tolist() for kernel, value in self.scale.items()},
            "metrics": {k: {name: v.tolist() for name, v in ms.items()} for k, ms in self.metrics.items()},
            "per_prompt": {k: {name: v.tolist() for name, v in ms.items()} for k, ms in self.per_prompt.items()},
        }


def kernel_alignment(
    model: ICLModel,
    task: ICLTask,
    kernels: Sequence[str] = REFERENCE_KERNELS,
    representation: tuple[torch.Tensor, torch.Tensor] | None = None,
    block: str = "query",
    fit: str = "distance",
    attention: AttentionKernels | None = None,
) -> KernelAlignment:
    """Compare each head's attention pattern with row-normalised reference kernels.

    Args:
        kernels: any of "exp", "gaussian".
        representation: None (the raw inputs x) or (support features `[batch, n_support, p]`,
            query features `[batch, n_query, p]`) to evaluate the reference kernels on.
        block: "query" compares query x support rows, "support" support x support rows.
        fit: "distance" (1-d bounded minimisation of the squared Frobenius distance, in log
            scale) or "log_lstsq" (least squares on row-centred log-similarities; exact when the
            attention is exactly a row-normalised kernel).
        attention: the model's `attention_kernels(model, task)` (source "pattern") when already
            read, e.g. by `diagnose`'s single streaming pass; None reads it here (one forward).
            Only the block compared is needed (the other may be None).
    """
    kernels = tuple(kernels)
    if not kernels:
        raise ValueError(f"kernels must name at least one of {REFERENCE_KERNELS}")
    for kernel in kernels:
        check_choice("kernels entry", kernel, REFERENCE_KERNELS)
    check_choice("block", block, BLOCKS)
    check_choice("fit", fit, FITS)
    if attention is None:
        attention = attention_kernels(model, task, source="pattern")
    elif not isinstance(attention, AttentionKernels) or attention.source != "pattern":
        raise ValueError("attention must be the AttentionKernels of attention_kernels(model, task, source='pattern'), or None")
    pattern = attention.query if block == "query" else attention.support
    if pattern is None:
        raise ValueError(f"attention lacks the {block!r} block that block={block!r} compares: read it with that block")
    pattern = as_float64("attention pattern", pattern)
    if (pattern < 0).any():
        raise ValueError(
            "this model's attention pattern has negative entries (not softmax-normalised): compare "
            "attention_kernels(model, task) with a kernel through alignment_metrics instead"
        )
    support_x, query_x = _representation(task, representation)
    rows_x = query_x if block == "query" else support_x
    keys = pattern > 0  # [B, L, H, r, n]
    attn = pattern / pattern.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    scale, metrics, per_prompt = {}, {}, {}
    for kernel in kernels:
        similarity = log_similarity(kernel, rows_x.to(attn.device), support_x.to(attn.device))[:, None, None]
        beta = fit_inverse_scale(attn, similarity, keys, fit)  # [L, H]
        reference = row_normalised_kernel(beta[:, :, None, None] * similarity, keys)
        values = alignment_metrics(attn, reference, mask=keys)
        per_prompt[kernel] = values
        metrics[kernel] = {name: torch.nanmean(value, dim=0) for name, value in values.items()}
        positive = torch.where(beta >= 0, beta, torch.nan)
        scale[kernel] = positive.reciprocal() if kernel == "exp" else positive.rsqrt()
    return KernelAlignment(block=block, scale=scale, metrics=metrics, per_prompt=per_prompt)


def _representation(task: ICLTask, representation: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(support `[B, n, p]`, query `[B, m, p]`) float64 points for the reference kernels."""
    if representation is None:
        return task.x_support.detach().to(torch.float64), task.x_query.detach().to(torch.float64)
    if not isinstance(representation, (tuple, list)) or len(representation) != 2:
        raise ValueError("representation must be None or a pair (support features [batch, n, p], query features [batch, m, p])")
    support = as_float64("representation[0]", representation[0]).detach()
    query = as_float64("representation[1]", representation[1]).detach()
    expected = [(task.batch_size, task.n_support), (task.batch_size, task.n_query)]
    for name, value, (batch, count) in zip(("representation[0]", "representation[1]"), (support, query), expected):
        if value.dim() != 3 or tuple(value.shape[:2]) != (batch, count):
            raise ValueError(f"{name} must be [batch={batch}, {count}, p], got shape {tuple(value.shape)}")
    if support.shape[-1] != query.shape[-1]:
        raise ValueError("representation's support and query features must have the same width p")
    return support, query


def log_similarity(kernel: str, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """log k(row, key) at unit scale: x . x' for "exp" (so exp kernel = exp(S / tau)), and
    -|x - x'|^2 / 2 for "gaussian" (so Gaussian kernel = exp(S / sigma^2)).

    rows `[..., r, p]`, keys `[..., n, p]` -> `[..., r, n]`."""
    check_choice("kernel", kernel, REFERENCE_KERNELS)
    dots = rows @ keys.mT
    if kernel == "exp":
        return dots
    sq_dist = rows.square().sum(-1, keepdim=True) + keys.square().sum(-1).unsqueeze(-2) - 2.0 * dots
    return -0.5 * sq_dist.clamp_min(0.0)


def row_normalised_kernel(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """exp(logits) restricted to `keys` (bool, same shape) with each row summing to one: the
    softmax over the visible keys. Rows with no visible key are all zero."""
    masked = logits.masked_fill(~keys, float("-inf"))
    weights = torch.softmax(masked, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def fit_inverse_scale(attn: torch.Tensor, similarity: torch.Tensor, keys: torch.Tensor, fit: str = "distance") -> torch.Tensor:
    """Fit beta per layer and head so row-normalised exp(beta * similarity) matches `attn`.

    attn `[B, L, H, r, n]` (rows sum to one over `keys`), similarity broadcastable to it, keys
    bool like attn -> beta `[L, H]` (pooled over prompts and rows). "log_lstsq": least squares of
    row-centred log attn on row-centred similarity (through the origin). "distance": bounded
    Brent search over log beta of the mean squared Frobenius distance, centred on the log_lstsq
    value, then beta = 0 (uniform over the keys) if that is at least as close. The log_lstsq
    beta may be < 0 (attention anti-aligned with the kernel); "distance" gives beta >= 0.
    """
    similarity = similarity.expand_as(attn)
    weight = keys.to(attn.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    log_attn = torch.where(keys, attn.clamp_min(1e-300).log(), torch.zeros_like(attn))
    centred_log = (log_attn - (log_attn * weight).sum(-1, keepdim=True) / count) * weight
    centred_sim = (similarity - (similarity * weight).sum(-1, keepdim=True) / count) * weight
    pooled = (0, 3, 4)
    beta = (centred_log * centred_sim).sum(pooled) / centred_sim.square().sum(pooled).clamp_min(1e-300)
    if fit == "log_lstsq":
        return beta
    spread = centred_sim.square().sum(pooled).div(weight.sum(pooled).clamp_min(1.0)).sqrt().clamp_min(1e-12)
    centre = torch.where(beta > 0, beta.clamp_min(1e-300).log(), -spread.log())  # [L, H]

    def loss(log_beta: torch.Tensor) -> torch.Tensor:  # [..., L, H] -> mean squared distance [..., L, H]
        scale = log_beta.exp()[..., None, None]
        reference = row_normalised_kernel(scale.unsqueeze(-5) * similarity, keys)  # [..., B, L, H, r, n]
        return (reference - attn).square().sum((-2, -1)).mean(-3)

    log_beta = _minimise_per_head(loss, centre - LOG_SCALE_HALF_WIDTH, centre + LOG_SCALE_HALF_WIDTH, attn.numel())
    uniform_loss = (row_normalised_kernel(torch.zeros_like(similarity), keys) - attn).square().sum((-2, -1)).mean(0)
    return torch.where(uniform_loss <= loss(log_beta), 0.0, log_beta.exp())


LOG_SCALE_HALF_WIDTH = 7.0
"""The distance fit searches log beta within +-7 of the log_lstsq start (a factor e^7 ~ 1100)."""

GRID_CHUNK_VALUES = 2**22
"""Numbers of reference kernels built at once during the distance fit's grid (bounds its memory)."""


def _minimise_per_head(
    loss, low: torch.Tensor, high: torch.Tensor, values_per_point: int, n_grid: int = 29, xtol: float = 1e-8
) -> torch.Tensor:
    """Minimise `loss` (`[..., L, H]` -> `[..., L, H]`, evaluated for every layer and head at once)
    over log beta in [low, high] per head: a grid of `n_grid` points (all in one batched call),
    then golden-section search in the bracket around each head's best grid point down to `xtol`.
    Grid points are evaluated in chunks of about `GRID_CHUNK_VALUES / values_per_point` (the
    reference kernels of one point hold `values_per_point` numbers). Returns the minimiser `[L, H]`."""
    grid = torch.linspace(0.0, 1.0, n_grid, dtype=low.dtype, device=low.device)[:, None, None]
    points = low + grid * (high - low)  # [G, L, H]
    chunk = max(1, GRID_CHUNK_VALUES // max(values_per_point, 1))
    best = torch.cat([loss(points[start : start + chunk]) for start in range(0, n_grid, chunk)]).argmin(0, keepdim=True)
    spacing = (high - low) / (n_grid - 1)
    a = torch.maximum(points.gather(0, best)[0] - spacing, low)
    b = torch.minimum(points.gather(0, best)[0] + spacing, high)
    ratio = (5.0**0.5 - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    while float((b - a).max()) > xtol:
        left = loss_c <= loss_d  # the minimum lies in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c_new = torch.where(left, b - ratio * (b - a), d)
        d_new = torch.where(left, c, a + ratio * (b - a))
        moved = torch.where(left, c_new, d_new)  # the one new point per head
        loss_moved = loss(moved)
        loss_c, loss_d = torch.where(left, loss_moved, loss_d), torch.where(left, loss_c, loss_moved)
        c, d = c_new, d_new
    return (a + b) / 2


def alignment_metrics(K_attn: Any, K_ref: Any, mask: Any = None) -> dict[str, torch.Tensor]:
    """Compare matrices `[..., r, c]` (batched over leading dimensions) -> dict of `[...]`
    float64 tensors:

    - operator_distance: ||K_attn - K_ref||_2 / ||K_ref||_2 (spectral norm);
    - cka: <H_r K_attn H_c, H_r K_ref H_c>_F / (||H_r K_attn H_c||_F ||H_r K_ref H_c||_F), H the
      centring matrices (for square Gram matrices, the usual kernel CKA);
    - spearman: Spearman rank correlation of all entries (ties get average ranks);
    - row_spearman: mean over rows of the per-row Spearman correlation (rows with fewer than two
      entries, or constant ones, are skipped; NaN if none is left).

    `mask` (bool `[..., r, c]`, optional) restricts the rank correlations to its entries; the two
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
        if mask.dtype != torch.bool or mask.shape != attn.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(attn.shape)}")
    ref_norm = torch.linalg.matrix_norm(ref, ord=2)
    operator = torch.linalg.matrix_norm(attn - ref, ord=2) / ref_norm
    attn_c, ref_c = _double_centre(attn), _double_centre(ref)
    cka = (attn_c * ref_c).sum((-2, -1)) / (
        torch.linalg.matrix_norm(attn_c) * torch.linalg.matrix_norm(ref_c)
    )
    overall = _masked_spearman(attn.flatten(-2), ref.flatten(-2), mask.flatten(-2))
    per_row = _masked_spearman(attn, ref, mask)
    return {
        "operator_distance": operator,
        "cka": cka,
        "spearman": overall,
        "row_spearman": torch.nanmean(per_row, dim=-1),
    }


def _double_centre(matrix: torch.Tensor) -> torch.Tensor:
    """H_r M H_c: subtract row and column means, add back the grand mean."""
    return (
        matrix
        - matrix.mean(-1, keepdim=True)
        - matrix.mean(-2, keepdim=True)
        + matrix.mean((-2, -1), keepdim=True)
    )


def _masked_spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last axis over `mask`ed entries -> `[...]` (NaN where
    fewer than two entries or a constant vector)."""
    keep = mask.cpu().numpy()
    ranks_a = stats.rankdata(np.where(keep, a.cpu().numpy(), np.nan), axis=-1, nan_policy="omit")
    ranks_b = stats.rankdata(np.where(keep, b.cpu().numpy(), np.nan), axis=-1, nan_policy="omit")
    ranks_a, ranks_b = (torch.as_tensor(r, dtype=torch.float64, device=a.device) for r in (ranks_a, ranks_b))
    weight = mask.to(torch.float64)
    count = weight.sum(-1)
    ranks_a = torch.where(mask, ranks_a, 0.0)
    ranks_b = torch.where(mask, ranks_b, 0.0)
    da = (ranks_a - ranks_a.sum(-1, keepdim=True) / count.clamp_min(1.0).unsqueeze(-1)) * weight
    db = (ranks_b - ranks_b.sum(-1, keepdim=True) / count.clamp_min(1.0).unsqueeze(-1)) * weight
    denominator = (da.square().sum(-1) * db.square().sum(-1)).sqrt()
    correlation = (da * db).sum(-1) / denominator
    return torch.where((count >= 2) & (denominator > 0), correlation, torch.full_like(correlation, float("nan")))

