"""Studies of the constructions: what limits them, measured against their solvers and oracle KRR.

- `width_study`: the CG transformer with an m-wide head against oracle KRR on the true kernel as
  m grows, beside d_eff(lam) (MetaRepICL's second finding, made exact: the model equals KRR on
  the head's kernel Phi Phi^T, so its error is the head's). Heads: random features, and rank-m
  projections (Gaussian sketch, top-m eigenprojection) of the kernel's exact feature space on
  each prompt; the projections are also swept over ridges to plot error against m / d_eff.
- `cg_rate_study`: per-step A-norm error of the CG transformer against the classical bound
  2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^t on tasks with a chosen kappa.
- `relu_width_study`: relu-mode error against the exact construction as the MLP widens.

Each returns a dataclass with `.to_dict()` (JSON-able) and `.plot()` (a matplotlib Figure).
`conditioned_linear_task` builds the linear-kernel tasks with an exact condition number.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mi_krr._validation import as_tuple, check_choice, check_count, check_device, check_positive, offset_seed
from mi_krr.construct.cg import cg_transformer, kernel_feature_map
from mi_krr.construct.primitives import ReluRangeError
from mi_krr.construct.richardson import richardson_transformer
from mi_krr.feature_maps import FeatureMap, ProjectedKernelFeatures, PromptFeatureMap
from mi_krr.kernels import effective_dimension, kernel_matrix
from mi_krr.solvers import cg, cg_error_bound, krr
from mi_krr.tasks import GPRegressionSampler, ICLTask, LinearRegressionSampler, sample_spd_system


def conditioned_linear_task(
    batch_size: int, n_support: int, kappa: float, lam: float, n_query: int = 8, seed: int = 0,
    device: torch.device | str = "cpu",
) -> ICLTask:
    """Linear-kernel prompts whose K + lam I has condition number exactly `kappa` (d = n).

    K = U diag(mu) U^T comes from `sample_spd_system` with cond(K) = kappa_0 chosen so that
    (1 + lam) / (1 / kappa_0 + lam) = kappa; the support inputs are the rows of K's Cholesky
    factor (so x x^T = K exactly, d = n), the labels y ~ N(0, I) from the same draw (every
    eigen-direction excited: the regime the CG bound describes), queries x_* ~ N(0, I / n).
    y_query is 0 (no ground truth: compare with oracle KRR instead).

    Requires lam < 1 / (kappa - 1) (else no kappa_0 exists). Drawn in float64 on the CPU from
    `seed` (the same prompts on every device), then moved to `device`.
    """
    check_count("n_support", n_support, minimum=2)
    device = check_device("device", device)
    kappa = check_positive("kappa", kappa)
    lam = check_positive("lam", lam)
    inverse_kappa0 = (1.0 + lam) / kappa - lam
    if kappa <= 1 or inverse_kappa0 <= 0:
        raise ValueError(f"kappa must be > 1 and lam < 1 / (kappa - 1) = {1 / max(kappa - 1, 1e-300):.3g}, got kappa={kappa}, lam={lam}")
    system = sample_spd_system(batch_size, n_support, 1.0 / inverse_kappa0, seed=seed)
    x_support = torch.linalg.cholesky(system.matrix)
    generator = torch.Generator().manual_seed(offset_seed(seed, 1))
    x_query = torch.randn(batch_size, n_query, n_support, generator=generator, dtype=torch.float64) / math.sqrt(n_support)
    return ICLTask(
        x_support=x_support,
        y_support=system.rhs,
        x_query=x_query,
        y_query=torch.zeros(batch_size, n_query, dtype=torch.float64),
        info={"sampler": "conditioned_linear", "kappa": kappa, "lam": lam, "seed": seed, "y_query": "zeros"},
    ).to(device=device)


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target|| / ||target|| over the last dimension, `[..., m]` -> `[...]`."""
    return (pred - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-300)


def _krr_predictions(K: torch.Tensor, y: torch.Tensor, lam: float, K_query: torch.Tensor) -> torch.Tensor:
    """Oracle KRR predictions K_query (K + lam I)^-1 y `[..., m]`."""
    return (K_query @ krr(K, y, lam).unsqueeze(-1)).squeeze(-1)


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), dpi=90, squeeze=False)
    return fig, list(axes[0])


WIDTH_HEADS: tuple[str, ...] = ("random_features", "gaussian_sketch", "top_eigen")
WIDTH_STUDY_KERNELS: tuple[str, ...] = ("linear", "exp")

_HEAD_LABELS = {
    "random_features": "random features",
    "gaussian_sketch": "Gaussian sketch of $K^{1/2}$",
    "top_eigen": "top-m eigenprojection",
}
_HEAD_STYLES = {"random_features": ("o", "-"), "gaussian_sketch": ("s", "--"), "top_eigen": ("^", "-.")}
_LAM_MARKERS = ("o", "s", "^", "D", "v", "P")


def width_head(head: str, kernel: str, dim: int, width: int, temperature: float, seed: int) -> FeatureMap | PromptFeatureMap:
    """The m-wide head `width_study` calls `head`, for `kernel` ("linear" or "exp") on R^dim.

    "random_features": `kernel_feature_map` (linear: x W / sqrt(m); exp: positive random features).
    "gaussian_sketch": `ProjectedKernelFeatures(projection="gaussian")`, K^(1/2) R / sqrt(m) per prompt.
    "top_eigen": `ProjectedKernelFeatures(projection="top")`, per prompt the head whose kernel is the
    best rank-m approximation of the joint (support + query) kernel matrix (Eckart-Young): the
    closest rank-m kernel, which need not be the rank-m head with the smallest prediction error.
    """
    check_choice("head", head, WIDTH_HEADS)
    check_choice("kernel", kernel, WIDTH_STUDY_KERNELS)
    if head == "random_features":
        return kernel_feature_map(kernel, dim, width, temperature, 1.0, seed)
    projection = "gaussian" if head == "gaussian_sketch" else "top"
    temperature_or_none = temperature if kernel == "exp" else None
    return ProjectedKernelFeatures(kernel, dim, width, projection, temperature=temperature_or_none, seed=seed)


def _head_grams(feature_map: FeatureMap | PromptFeatureMap, task: ICLTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's kernel on `task`: support block `[B, n, n]` and query block `[B, m, n]`."""
    if isinstance(feature_map, PromptFeatureMap):
        gram = feature_map.gram(torch.cat([task.x_support, task.x_query], dim=-2))
        n = task.n_support
        return gram[..., :n, :n], gram[..., n:, :n]
    phi, phi_query = feature_map(task.x_support), feature_map(task.x_query)
    return phi @ phi.mT, phi_query @ phi.mT


@dataclass
class WidthCurve:
    """One head's error against oracle KRR on the true kernel, per head width.

    A prompt's error is its relative prediction error on the queries, averaged over the head's
    `n_seeds` random draws (one draw for the deterministic "top_eigen"); `error` is the mean of
    that over the prompts and `error_sem` its standard error over the prompts.

    Attributes:
        kernel, head, lam: the kernel, the head (`WIDTH_HEADS`) and the ridge.
        d_eff: mean over prompts of d_eff(lam) = tr K (K + lam I)^-1 of the true support K.
        error: the CG transformer's mean error per width.
        error_sem: its standard error over prompts.
        feature_krr_error: the same mean for exact KRR on the head's own kernel (the value the
            model's error converges to as its CG steps grow).
    """

    kernel: str
    head: str
    lam: float
    d_eff: float
    error: list[float]
    error_sem: list[float]
    feature_krr_error: list[float]


@dataclass
class WidthStudy:
    """Prediction error of the m-wide CG transformer against oracle KRR on the true kernel.

    Attributes:
        widths: head widths m.
        kernels, heads: kernels and heads (`WIDTH_HEADS`) studied.
        lams: ridges; `lams[0]` is `lam`, where every head is measured; the projection heads
            ("gaussian_sketch", "top_eigen") are measured at every ridge (the m / d_eff panels).
        curves: one `WidthCurve` per (kernel, head, ridge) measured.
        n_support, n_query, n_steps, lam, temperature, n_seeds, batch_size: the setting (exp
            kernel: exp(x . z / temperature)); prompts have N = n_support + n_query points.
    """

    widths: list[int]
    kernels: list[str]
    heads: list[str]
    lams: list[float]
    curves: list[WidthCurve]
    n_support: int
    n_query: int
    n_steps: int
    lam: float
    temperature: float
    n_seeds: int
    batch_size: int

    def curve(self, kernel: str, head: str, lam: float | None = None) -> WidthCurve:
        """The curve of `kernel` and `head` at ridge `lam` (None: the main ridge `self.lam`)."""
        lam = self.lam if lam is None else lam
        for curve in self.curves:
            if (curve.kernel, curve.head, curve.lam) == (kernel, head, lam):
                return curve
        measured = ", ".join(f"({c.kernel!r}, {c.head!r}, {c.lam:g})" for c in self.curves)
        raise ValueError(f"no curve for kernel={kernel!r}, head={head!r}, lam={lam:g}: measured {measured}")

    @property
    def model_error(self) -> dict[str, list[float]]:
        """kernel -> the random-features head's mean error per width at `lam`."""
        return {kernel: self.curve(kernel, "random_features").error for kernel in self.kernels}

    @property
    def feature_krr_error(self) -> dict[str, list[float]]:
        """kernel -> KRR on the random features' kernel: mean error per width at `lam`."""
        return {kernel: self.curve(kernel, "random_features").feature_krr_error for kernel in self.kernels}

    @property
    def d_eff(self) -> dict[str, float]:
        """kernel -> mean d_eff(lam) of the true support K at `lam`."""
        return {kernel: self.curve(kernel, self.heads[0]).d_eff for kernel in self.kernels}

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self):
        """Error vs m at `lam` (every head, d_eff marked); then, per projection head, error vs
        m / d_eff at every ridge (curves that collapse say the head's error tracks d_eff)."""
        from matplotlib import colormaps
        from matplotlib.lines import Line2D

        collapse_heads = [head for head in ("top_eigen", "gaussian_sketch") if head in self.heads]
        fig, axes = _figure(1 + len(collapse_heads), width=4.8, height=4.4)
        n_points = self.n_support + self.n_query
        ax = axes[0]
        handles = []
        for k, kernel in enumerate(self.kernels):
            color = f"C{k}"
            for head in self.heads:
                curve = self.curve(kernel, head)
                marker, style = _HEAD_STYLES[head]
                ax.errorbar(self.widths, curve.error, yerr=curve.error_sem, fmt=marker + style, ms=4, capsize=2, color=color)
            ax.axvline(self.d_eff[kernel], color=color, ls=":", lw=1.5)
            handles.append(Line2D([], [], color=color, lw=2, label=f"{kernel} (dotted: $d_{{eff}}$ = {self.d_eff[kernel]:.1f})"))
        for head in self.heads:
            marker, style = _HEAD_STYLES[head]
            handles.append(Line2D([], [], color="0.2", marker=marker, ls=style, ms=4, label=_HEAD_LABELS[head]))
        if "top_eigen" in self.heads:
            ax.axvline(n_points, color="0.55", lw=1)
            handles.append(Line2D([], [], color="0.55", lw=1, label=f"N = n + queries = {n_points}"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(bottom=_visible_floor(c.error for c in self.curves if c.lam == self.lam), top=1.6)
        ax.set_xlabel("head width m")
        ax.set_ylabel("rel. error vs oracle KRR on the true kernel")
        ax.set_title(f"CG transformer with an m-wide head ($\\lambda$={self.lam:g}, n={self.n_support},\n"
                     f"{self.n_steps} CG steps; mean $\\pm$ s.e. over {self.batch_size} prompts x {self.n_seeds} head draws)", fontsize=9)
        ax.legend(handles=handles, fontsize=6.5, loc="lower left", framealpha=0.9)
        ordered_lams = sorted(self.lams)
        for ax, head in zip(axes[1:], collapse_heads):
            for k, kernel in enumerate(self.kernels):
                shades = colormaps[("Blues", "Oranges", "Greens", "Purples")[k % 4]]
                for j, lam in enumerate(ordered_lams):
                    curve = self.curve(kernel, head, lam)
                    ax.errorbar(np.asarray(self.widths) / curve.d_eff, curve.error, yerr=curve.error_sem,
                                fmt=_LAM_MARKERS[j % len(_LAM_MARKERS)] + "-", ms=4, capsize=2,
                                color=shades(0.45 + 0.45 * j / max(1, len(ordered_lams) - 1)),
                                label=f"{kernel}, $\\lambda$={lam:g}: $d_{{eff}}$={curve.d_eff:.1f}")
            ax.axvline(1.0, color="0.3", ls=":", lw=1.2)
            if head == "gaussian_sketch":
                ratios = np.geomspace(1.0, max(self.widths) / min(c.d_eff for c in self.curves), 20)
                ax.plot(ratios, ratios**-0.5, "k--", lw=1, label="$(m / d_{eff})^{-1/2}$")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-3, _visible_floor(c.error for c in self.curves if c.head == head)), top=1.6)
            ax.set_xlabel("m / $d_{eff}(\\lambda)$")
            ax.set_ylabel("rel. error vs oracle KRR on the true kernel")
            exact = " (exact for m $\\geq$ rank K: off the axis)" if head == "top_eigen" else ""
            ax.set_title(f"{_HEAD_LABELS[head]}{exact}\nerror vs m / $d_{{eff}}(\\lambda)$ at {len(ordered_lams)} ridge{'s' if len(ordered_lams) > 1 else ''}", fontsize=9)
            ax.legend(fontsize=6.5, loc="lower left", framealpha=0.9)
        for ax in axes:
            ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        return fig


def _visible_floor(errors, threshold: float = 1e-9) -> float:
    """A log-axis floor under every error above `threshold` (smaller, rounding-level errors fall
    below it, off the axis)."""
    visible = [e for curve in errors for e in curve if e > threshold]
    return 0.3 * min(visible) if visible else threshold


def width_study(
    widths: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512),
    kernels: tuple[str, ...] = ("linear", "exp"),
    dim: int = 16,
    n_support: int = 64,
    n_query: int = 16,
    lam: float = 0.1,
    n_steps: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    *,
    heads: tuple[str, ...] = WIDTH_HEADS,
    lams: tuple[float, ...] = (),
    temperature: float = 1.0,
    n_seeds: int = 2,
    device: torch.device | str = "cpu",
) -> WidthStudy:
    """The CG transformer with an m-wide head against oracle KRR on the true kernel, per m.

    Prompts: linear kernel: `LinearRegressionSampler` (input condition number 100); exp kernel
    exp(x . z / temperature): `GPRegressionSampler` inputs (|x| ~ 1). Heads (`width_head`):
    "random_features" (x W / sqrt(m) for linear; positive random features for exp, whose large
    variance, not the head's rank, then sets the error), and two rank-m projections of the
    kernel's exact feature space on each prompt: "gaussian_sketch" (unbiased) and "top_eigen"
    (the best rank-m approximation of the joint kernel matrix, Eckart-Young; its error to oracle
    KRR need not fall as m grows: on the exp kernel at lam = 0.1 it rises from m = 16 to m = 32,
    docs/reproductions.md). The model runs `n_steps` CG steps on the head's kernel; the oracle is
    `mi_krr.solvers.krr` with the true kernel. Every head is measured at `lam`, the projection
    heads also at each ridge in `lams`. `batch_size` prompts are drawn from `seed` (d_eff is
    their mean); random heads from seeds seed, ..., seed + n_seeds - 1 (the Gaussian sketch
    independently per prompt); errors are averaged over draws, then over prompts (`WidthCurve`).
    Prompts, kernels, models and errors live on `device` (prompts and head weights are drawn on
    the CPU, so a seed gives the same study on every device); the curves are Python floats.
    """
    widths = tuple(check_count("widths", w, minimum=1) for w in as_tuple("widths", widths, "(8, 16, 32)"))
    kernels = tuple(check_choice("kernels", kernel, WIDTH_STUDY_KERNELS) for kernel in as_tuple("kernels", kernels, "('linear', 'exp')"))
    heads = tuple(check_choice("heads", head, WIDTH_HEADS) for head in as_tuple("heads", heads, "('top_eigen',)"))
    check_count("n_query", n_query, minimum=1)  # the errors are read at the queries
    if not widths or not kernels or not heads:
        raise ValueError("widths, kernels and heads must each name at least one value")
    lam = check_positive("lam", lam)
    ridges = [lam] + [check_positive("lams", ridge) for ridge in dict.fromkeys(lams) if ridge != lam]
    temperature = check_positive("temperature", temperature)
    n_seeds = check_count("n_seeds", n_seeds, minimum=1)
    batch_size = check_count("batch_size", batch_size, minimum=2)  # error bars need two prompts
    device = check_device("device", device)
    samplers = {
        "linear": LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1),
        "exp": GPRegressionSampler(dim, kernel="exp", temperature=temperature),
    }
    study = WidthStudy(list(widths), list(kernels), list(heads), ridges, [], n_support, n_query, n_steps, lam, temperature,
                       n_seeds, batch_size)
    for kernel in kernels:
        params = {"temperature": temperature} if kernel == "exp" else {}
        task = samplers[kernel].sample(batch_size, n_support, n_query, seed=seed, dtype=torch.float64, device=device)
        K = kernel_matrix(kernel, task.x_support, None, **params)
        K_query = kernel_matrix(kernel, task.x_query, task.x_support, **params)
        for ridge in ridges:
            oracle = _krr_predictions(K, task.y_support, ridge, K_query)
            d_eff = float(effective_dimension(K, ridge).mean())
            for head in heads:
                if head == "random_features" and ridge != lam:
                    continue
                draws = 1 if head == "top_eigen" else n_seeds
                model_errors = torch.zeros(len(widths), draws, batch_size, dtype=torch.float64, device=device)
                floor_errors = torch.zeros_like(model_errors)
                for w, width in enumerate(widths):
                    for s in range(draws):
                        feature_map = width_head(head, kernel, dim, width, temperature, offset_seed(seed, s))
                        model = cg_transformer(n_steps, ridge, kernel=kernel, dim=dim, feature_map=feature_map, device=device)
                        with torch.no_grad():
                            pred = model.predict(task)
                        K_head, K_head_query = _head_grams(feature_map, task)
                        model_errors[w, s] = _relative_error(pred, oracle)
                        floor_errors[w, s] = _relative_error(_krr_predictions(K_head, task.y_support, ridge, K_head_query), oracle)
                per_prompt = model_errors.mean(1)  # [widths, batch]: mean over the head's draws
                study.curves.append(WidthCurve(
                    kernel, head, ridge, d_eff,
                    error=per_prompt.mean(1).tolist(),
                    error_sem=(per_prompt.std(1) / math.sqrt(batch_size)).tolist(),
                    feature_krr_error=floor_errors.mean((1, 2)).tolist(),
                ))
    return study


@dataclass
class CGRateStudy:
    """Per-step error of the CG transformer against the CG bound, per condition number.

    Attributes:
        kappas: condition numbers of K + lam I.
        steps: 0..T.
        a_norm_ratio: kappa (as str) -> median ||alpha_t - alpha*||_A / ||alpha*||_A of the model.
        solver_a_norm_ratio: the same for `mi_krr.solvers.cg`.
        pred_error: kappa -> median relative prediction error against oracle KRR.
        bound: kappa -> cg_error_bound(kappa, t).
        n_support, lam: the setting.
    """

    kappas: list[float]
    steps: list[int]
    a_norm_ratio: dict[str, list[float]]
    solver_a_norm_ratio: dict[str, list[float]]
    pred_error: dict[str, list[float]]
    bound: dict[str, list[float]]
    n_support: int
    lam: float

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self):
        fig, (left, right) = _figure(2)
        for index, kappa in enumerate(self.kappas):
            key, color = str(kappa), f"C{index}"
            left.semilogy(self.steps, self.a_norm_ratio[key], "-", color=color, label=f"model, $\\kappa$={kappa:g}")
            left.semilogy(self.steps, self.solver_a_norm_ratio[key], "o", ms=3, mfc="none", color=color)
            left.semilogy(self.steps, self.bound[key], "--", color=color, lw=1)
            right.semilogy(self.steps, self.pred_error[key], "-", color=color, label=f"$\\kappa$={kappa:g}")
        left.plot([], [], "ko", ms=3, mfc="none", label="solvers.cg")
        left.plot([], [], "k--", lw=1, label="CG bound")
        ratios = [*self.a_norm_ratio.values(), *self.solver_a_norm_ratio.values(), *self.bound.values()]
        left.set_ylim(bottom=_visible_floor(ratios, threshold=1e-13), top=3)  # float64 rounding below 1e-13
        left.set_xlabel("CG step t (= blocks / 4)")
        left.set_ylabel("$\\|\\alpha_t-\\alpha^*\\|_A / \\|\\alpha^*\\|_A$")
        left.set_title("A-norm error vs the CG bound\n(model and solver: median over prompts)", fontsize=10)
        left.legend(fontsize=7)
        right.set_xlabel("CG step t")
        right.set_ylabel("rel. prediction error vs KRR")
        right.set_title(f"Query predictions (n={self.n_support})\n(median over prompts)", fontsize=10)
        right.legend(fontsize=7)
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        return fig


def cg_rate_study(
    kappas: tuple[float, ...] = (10.0, 100.0, 1000.0),
    n_support: int = 64,
    n_steps: int = 40,
    lam: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> CGRateStudy:
    """Tasks from `conditioned_linear_task` (cond(K + lam I) = kappa exactly, y ~ N(0, I)).
    Prompts, kernels, the model and the solver run on `device`; the ratios are Python floats."""
    device = check_device("device", device)
    kappas = as_tuple("kappas", kappas, "(10.0, 100.0)")
    if not kappas:
        raise ValueError("kappas must name at least one condition number, e.g. (10.0, 100.0), got ()")
    n_steps = check_count("n_steps", n_steps, minimum=1)
    steps = list(range(n_steps + 1))
    result = CGRateStudy(list(kappas), steps, {}, {}, {}, {}, n_support, lam)
    for kappa in kappas:
        task = conditioned_linear_task(batch_size, n_support, kappa, lam, n_query=16, seed=seed, device=device)
        K = task.x_support @ task.x_support.mT
        K_query = task.x_query @ task.x_support.mT
        alpha_star = krr(K, task.y_support, lam)
        oracle = _krr_predictions(K, task.y_support, lam, K_query)
        states = cg_transformer(n_steps, lam, dim=task.dim, device=device).step_states(task)
        solver = cg(K, task.y_support, lam, n_steps)
        A = K + lam * torch.eye(n_support, dtype=K.dtype, device=K.device)

        def a_norm_ratio(alpha: torch.Tensor) -> list[float]:
            error = alpha - alpha_star[:, None]
            squared = torch.einsum("bti,bij,btj->bt", error, A, error)
            start = torch.einsum("bi,bij,bj->b", alpha_star, A, alpha_star)
            return (squared / start[:, None]).clamp_min(0).sqrt().median(dim=0).values.tolist()

        key = str(kappa)
        result.a_norm_ratio[key] = a_norm_ratio(states.support["alpha"])
        result.solver_a_norm_ratio[key] = a_norm_ratio(solver.alpha)
        result.pred_error[key] = _relative_error(states.pred, oracle[:, None]).median(dim=0).values.tolist()
        result.bound[key] = [float(b) for b in cg_error_bound(kappa, np.array(steps))]
    return result


@dataclass
class ReluWidthStudy:
    """Relu-mode error against the exact construction, per MLP width.

    Attributes:
        widths: ReLU units per scalar nonlinearity.
        error: construction ("cg", "richardson") -> max over prompts, steps and queries of
            |pred_relu - pred_exact| / max |pred_exact|; inf where the relu construction
            failed (too few units for the steps: see `cg_transformer`'s mlp_width).
        n_steps, n_support: the setting.
    """

    widths: list[int]
    error: dict[str, list[float]]
    n_steps: int
    n_support: int

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self):
        fig, (ax,) = _figure(1, width=5.2)
        widths = np.asarray(self.widths, dtype=float)
        for index, (name, errors) in enumerate(self.error.items()):
            finite = np.isfinite(errors)
            failed = "" if finite.all() else f" (failed at width {', '.join(str(w) for w in widths[~finite].astype(int))})"
            ax.loglog(widths[finite], np.asarray(errors)[finite], "o-", color=f"C{index}", label=f"{name} transformer{failed}")
        anchor = next(((w, e) for errors in self.error.values() for w, e in zip(widths, errors) if np.isfinite(e)), (widths[0], 1.0))
        reference = anchor[1] * (anchor[0] / widths) ** 2
        ax.loglog(widths, reference, "k--", lw=1, label="$\\propto$ width$^{-2}$")
        ax.set_xlabel("MLP width (ReLU units per scalar op)")
        ax.set_ylabel("max rel. error vs exact construction")
        ax.set_title(f"ReLU MLP arithmetic ({self.n_steps} steps, n={self.n_support})")
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        return fig


def relu_width_study(
    widths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048),
    n_steps: int = 10,
    n_support: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> ReluWidthStudy:
    """CG: `conditioned_linear_task` (kappa = 50, lam = 1e-2), reciprocals on [1e-4, 1e4].
    Richardson: Gaussian-kernel GP prompts in d = 2 (bandwidth 0.5, lam = 0.1, step 1),
    products bounded by 2 + max(1 + D_*) over the batch, reciprocals on [1e-3, 2]. A width at which
    the relu construction fails gets error inf, without the forward's error or warning (the study's
    point is how the error depends on the width): its arithmetic, too coarse, drives an MLP input
    out of its interpolant's range (`ReluRangeError`; CG at 16 units, 10 steps) or overflows."""
    cg_task = conditioned_linear_task(batch_size, n_support, 50.0, 1e-2, n_query=8, seed=seed)
    gp_task = GPRegressionSampler(2, kernel="gaussian", bandwidth=0.5).sample(batch_size, n_support, 8, seed=seed, dtype=torch.float64)
    row_sums = kernel_matrix("gaussian", gp_task.x_query, gp_task.x_support, bandwidth=0.5).sum(-1)
    bound = 2.0 + float((1.0 + row_sums).max())

    def cg_model(**kwargs):
        return cg_transformer(n_steps, 1e-2, dim=cg_task.dim, recip_range=(1e-4, 1e4), **kwargs)

    def richardson_model(**kwargs):
        return richardson_transformer(n_steps, 0.1, bandwidth=0.5, step=1.0, dim=2, mlp_bound=bound, **kwargs)

    result = ReluWidthStudy(list(widths), {"cg": [], "richardson": []}, n_steps, n_support)
    for name, build, task in (("cg", cg_model, cg_task), ("richardson", richardson_model, gp_task)):
        exact = build().step_states(task).pred
        for width in widths:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*the read-out holds inf/NaN", RuntimeWarning)
                try:
                    relu = build(mlp="relu", mlp_width=width).step_states(task).pred
                except ReluRangeError:
                    relu = None
            failed = relu is None or not torch.isfinite(relu).all()
            result.error[name].append(math.inf if failed else float((relu - exact).abs().max() / exact.abs().max()))
    return result
