"""softmax-ood: is a trained softmax model's attention an exponential kernel, in distribution and
out of it?

For the shipped softmax model trained on Gaussian-kernel GP regression (checkpoints/softmax_gp),
every head's query x support attention is compared with the row-normalised exp kernel
exp(x . x' / tau) on the raw inputs (`probes.kernel_alignment`), on in-distribution prompts and
under every shift of `DEFAULT_SHIFTS` that applies to its sampler. tau is fitted per block and
head by the squared Frobenius distance (probes' scale fit), and the relative operator-norm
distance is reported at that tau: an upper bound on the head's operator-norm distance minimised
over tau, which can be lower (the last block of checkpoints/softmax_gp: 0.990 at the fitted tau,
0.897 at the best one; docs/reproductions.md). Per block the best head (smallest such distance)
is reported, with its Spearman row correlation and tau, and the mean over heads; beside it the
best head's distance to the row-normalised Gaussian kernel exp(-|x - x'|^2 / 2 sigma^2) (sigma
fitted per head in the same way), which differs from the exp kernel by the key norms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mi_krr.reproductions._format import key_numbers_text

QUICK: dict[str, Any] = {"batch_size": 8, "shifts": ("input_scale_x2", "bandwidth_x2")}


@dataclass
class SoftmaxOODResult:
    """Attention vs the exp kernel per task set and block (TransformerLens block index 0..L-1, as in
    `probes.diagnose`'s kernel-alignment table).

    Attributes:
        checkpoint: the model's path.
        task_sets: "in_distribution" then the shifts.
        blocks: block indices 0..L-1.
        best_distance: set -> per block, min over heads of the relative operator distance at
            each head's Frobenius-fitted tau (module docstring).
        mean_distance: set -> per block, mean over heads.
        best_row_spearman: set -> per block, Spearman row correlation of the best head.
        best_tau: set -> per block, fitted temperature of the best head.
        best_gaussian_distance: set -> per block, min over heads of the distance to the Gaussian
            kernel at each head's Frobenius-fitted sigma (its own best head).
        best_bandwidth: set -> per block, fitted sigma of that head.
        batch_size, n_support, n_query: the prompts.
        best_uniform: set -> per block, whether the exp best head is fitted as uniform attention
            (`KernelAlignment.uniform_best_heads`: tau inf, or a reference within 5% of uniform);
            None: read from best_tau (inf) alone.
    """

    checkpoint: str
    task_sets: list[str]
    blocks: list[int]
    best_distance: dict[str, list[float]]
    mean_distance: dict[str, list[float]]
    best_row_spearman: dict[str, list[float]]
    best_tau: dict[str, list[float]]
    best_gaussian_distance: dict[str, list[float]]
    best_bandwidth: dict[str, list[float]]
    batch_size: int
    n_support: int
    n_query: int
    best_uniform: dict[str, list[bool]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def overall(self, task_set: str, kernel: str = "exp") -> float:
        """Best-head distance to `kernel` ("exp" or "gaussian") averaged over the layers that have
        one (a layer with no finite distance is skipped, as `probes.compare` does; NaN if none)."""
        distances = np.asarray({"exp": self.best_distance, "gaussian": self.best_gaussian_distance}[kernel][task_set], dtype=np.float64)
        finite = distances[np.isfinite(distances)]
        return float(finite.mean()) if finite.size else math.nan

    def key_numbers(self) -> dict[str, Any]:
        from probes.report import UNIFORM_MARK

        base = self.overall("in_distribution")
        numbers: dict[str, Any] = {"in_distribution: exp-kernel distance (best head, mean over layers)": base}
        uniform = (self.best_uniform or {}).get("in_distribution") or [math.isinf(tau) for tau in self.best_tau["in_distribution"]]
        per_block = zip(self.blocks, self.best_distance["in_distribution"], uniform)
        numbers["in_distribution: per block"] = ", ".join(
            f"block {block}: {value:.3f}{UNIFORM_MARK if flat else ''}" for block, value, flat in per_block
        )
        if any(uniform):
            numbers[UNIFORM_MARK] = (
                "the block's heads are all fitted as uniform attention (tau = inf, or within 5% of it): its distance is to mean pooling, "
                "not to a kernel that ranks the keys"
            )
        for name in self.task_sets[1:]:
            value = self.overall(name)
            numbers[f"{name}: distance (ratio to in-distribution)"] = f"{value:.4f} ({value / base:.3f}x)"
        numbers["gaussian-kernel distance (best head, mean over layers)"] = ", ".join(
            f"{name} {self.overall(name, 'gaussian'):.3f}" for name in self.task_sets
        )
        return numbers

    def summary(self) -> str:
        return key_numbers_text(self.key_numbers())

    def plot(self):
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.6), dpi=90)
        for index, name in enumerate(self.task_sets):
            style = dict(lw=2.2, color="k") if name == "in_distribution" else dict(lw=1, color=f"C{index}")
            left.plot(self.blocks, self.best_distance[name], "o-", ms=3, label=name, **style)
        left.set_xlabel("block")
        left.set_ylabel("rel. operator distance to exp kernel")
        left.set_title("exp(x.x'/tau), tau fitted by Frobenius distance: best head per block", fontsize=9)
        left.set_xticks(self.blocks)
        left.legend(fontsize=7)
        positions = np.arange(len(self.task_sets))
        colours = ["k"] + [f"C{i}" for i in range(1, len(self.task_sets))]
        for offset, kernel, hatch in ((-0.2, "exp", None), (0.2, "gaussian", "//")):
            values = [self.overall(name, kernel) for name in self.task_sets]
            right.bar(positions + offset, values, width=0.4, color=colours, hatch=hatch, edgecolor="w")
        right.set_xticks(positions, self.task_sets, rotation=40, ha="right", fontsize=7)
        right.set_ylabel("mean over layers")
        right.set_title("exp kernel (plain) vs Gaussian kernel (hatched), per task set", fontsize=9)
        for ax in (left, right):
            ax.grid(alpha=0.3)
        figure.suptitle(f"Softmax attention vs row-normalised kernels of x: {Path(self.checkpoint).name}", fontsize=10)
        figure.tight_layout()
        return figure


def softmax_ood(
    checkpoint: str | Path | None = None,
    batch_size: int = 64,
    shifts: tuple[str, ...] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> SoftmaxOODResult:
    """Measure attention vs the exp and Gaussian kernels (module docstring). `checkpoint` defaults to the
    shipped checkpoints/softmax_gp; `shifts` (names in DEFAULT_SHIFTS) limits the shifts; `seed`
    (in [0, 2**32)) draws the prompts."""
    from tqdm.auto import tqdm

    from mi_krr._validation import as_tuple, check_seed
    from mi_krr.checkpoints import load_checkpoint, shipped_checkpoint, task_sets
    from probes.kernel_alignment import kernel_alignment

    seed = check_seed("seed", seed)
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint("softmax_gp")
    loaded = load_checkpoint(path, device=device)
    sets, _ = task_sets(loaded.sampler, batch_size, loaded.n_support, loaded.n_query, seed=seed, label_scale=loaded.label_scale,
                        model=loaded.model)
    if shifts is not None:
        shifts = as_tuple("shifts", shifts, "('input_scale_x2',)")
        unknown = [name for name in shifts if name not in sets or name == "in_distribution"]
        if unknown:
            known = [name for name in sets if name != "in_distribution"]
            raise ValueError(f"shifts names {unknown}, which are not shifts of this checkpoint's task: choose from {known}")
        sets = {name: task for name, task in sets.items() if name == "in_distribution" or name in shifts}
    best, mean, spearman, tau, gaussian, bandwidth, uniform = {}, {}, {}, {}, {}, {}, {}
    for name, task in tqdm(sets.items(), desc="softmax-ood", disable=not progress):
        alignment = kernel_alignment(loaded.model, task, kernels=("exp", "gaussian"))
        head, exp_distance = alignment.best_heads("exp")
        gaussian_head, gaussian_distance = alignment.best_heads("gaussian")
        best[name], gaussian[name] = exp_distance.tolist(), gaussian_distance.tolist()
        mean[name] = np.nanmean(np.asarray(alignment.metrics["exp"]["operator_distance"].cpu(), dtype=np.float64), axis=1).tolist()
        spearman[name] = _at_heads(alignment.metrics["exp"]["row_spearman"], head)
        tau[name] = _at_heads(alignment.scale["exp"], head)
        bandwidth[name] = _at_heads(alignment.scale["gaussian"], gaussian_head)
        uniform[name] = alignment.uniform_best_heads("exp").tolist()
    return SoftmaxOODResult(
        checkpoint=str(path),
        task_sets=list(sets),
        blocks=list(range(loaded.model.n_layers)),
        best_distance=best,
        mean_distance=mean,
        best_row_spearman=spearman,
        best_tau=tau,
        best_gaussian_distance=gaussian,
        best_bandwidth=bandwidth,
        batch_size=batch_size,
        n_support=loaded.n_support,
        n_query=loaded.n_query,
        best_uniform=uniform,
    )


def applicable_quick_shifts(checkpoint: str | Path) -> tuple[str, ...]:
    """The shifts of QUICK that apply to `checkpoint`'s task: QUICK is chosen for the shipped
    softmax_gp, and another checkpoint's task may lack some (a linear-regression task has no
    bandwidth to shift), which a quick run on it leaves out rather than refuses."""
    from mi_krr.checkpoints import load_checkpoint
    from mi_krr.tasks import shift_applies

    sampler = load_checkpoint(checkpoint).sampler
    return tuple(name for name in QUICK["shifts"] if shift_applies(sampler, name))


def _at_heads(values: Any, head: np.ndarray) -> list[float]:
    """values `[layer, head]` at each layer's `head` `[layer]` (NaN where head is -1)."""
    values = np.asarray(values.cpu(), dtype=np.float64)
    picked = values[np.arange(len(head)), head]
    return np.where(head >= 0, picked, np.nan).tolist()
