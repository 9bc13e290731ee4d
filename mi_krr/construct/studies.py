"""Studies of the constructions: what limits them, measured against their solvers and oracle KRR.

- `width_study`: the CG transformer with a rank-m head (random features) against oracle KRR on
  the true kernel as m grows, beside d_eff(lam) (MetaRepICL's second finding, made exact: the
  model equals KRR on Phi Phi^T, so its error is the feature approximation's).
- `cg_rate_study`: per-step A-norm error of the CG transformer against the classical bound
  2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^t on tasks with a chosen kappa.
- `relu_width_study`: relu-mode error against the exact construction as the MLP widens.

Each returns a dataclass with `.to_dict()` (JSON-able) and `.plot()` (a matplotlib Figure).
`conditioned_linear_task` builds the linear-kernel tasks with an exact condition number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mi_krr._validation import check_count, check_positive
from mi_krr.construct.cg import cg_transformer
from mi_krr.construct.richardson import richardson_transformer
from mi_krr.kernels import effective_dimension, kernel_matrix
from mi_krr.solvers import cg, cg_error_bound, krr
from mi_krr.tasks import GPRegressionSampler, ICLTask, LinearRegressionSampler, sample_spd_system


def conditioned_linear_task(
    batch_size: int, n_support: int, kappa: float, lam: float, n_query: int = 8, seed: int = 0
) -> ICLTask:
    """Linear-kernel prompts whose K + lam I has condition number exactly `kappa` (d = n).

    K = U diag(mu) U^T comes from `sample_spd_system` with cond(K) = kappa_0 chosen so that
    (1 + lam) / (1 / kappa_0 + lam) = kappa; the support inputs are the rows of K's Cholesky
    factor (so x x^T = K exactly, d = n), the labels y ~ N(0, I) from the same draw (every
    eigen-direction excited: the regime the CG bound describes), queries x_* ~ N(0, I / n).
    y_query is 0 (no ground truth: compare with oracle KRR instead).

    Requires lam < 1 / (kappa - 1) (else no kappa_0 exists).
    """
    check_count("n_support", n_support, minimum=2)
    kappa = check_positive("kappa", kappa)
    lam = check_positive("lam", lam)
    inverse_kappa0 = (1.0 + lam) / kappa - lam
    if kappa <= 1 or inverse_kappa0 <= 0:
        raise ValueError(f"kappa must be > 1 and lam < 1 / (kappa - 1) = {1 / max(kappa - 1, 1e-300):.3g}, got kappa={kappa}, lam={lam}")
    system = sample_spd_system(batch_size, n_support, 1.0 / inverse_kappa0, seed=seed)
    x_support = torch.linalg.cholesky(system.matrix)
    generator = torch.Generator().manual_seed(seed + 1)
    x_query = torch.randn(batch_size, n_query, n_support, generator=generator, dtype=torch.float64) / math.sqrt(n_support)
    return ICLTask(
        x_support=x_support,
        y_support=system.rhs,
        x_query=x_query,
        y_query=torch.zeros(batch_size, n_query, dtype=torch.float64),
        info={"sampler": "conditioned_linear", "kappa": kappa, "lam": lam, "seed": seed, "y_query": "zeros"},
    )


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target|| / ||target|| over the last dimension, `[..., m]` -> `[...]`."""
    return (pred - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-300)


def _krr_predictions(K: torch.Tensor, y: torch.Tensor, lam: float, K_query: torch.Tensor) -> torch.Tensor:
    """Oracle KRR predictions K_query (K + lam I)^-1 y `[..., m]`."""
    return (K_query @ krr(K, y, lam).unsqueeze(-1)).squeeze(-1)


def _figure(n_panels: int, width: float = 4.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, 3.4), dpi=90, squeeze=False)
    return fig, list(axes[0])


@dataclass
class WidthStudy:
    """Prediction error of the rank-m CG transformer against oracle KRR on the true kernel.

    Attributes:
        widths: head widths m.
        kernels: kernel names studied.
        model_error: kernel -> median relative error per width (`len(widths)` floats).
        feature_krr_error: kernel -> median relative error of exact KRR on Phi Phi^T (the floor
            the model reaches once converged).
        d_eff: kernel -> mean d_eff(lam) of the true K.
        n_support, n_steps, lam: the setting.
    """

    widths: list[int]
    kernels: list[str]
    model_error: dict[str, list[float]]
    feature_krr_error: dict[str, list[float]]
    d_eff: dict[str, float]
    n_support: int
    n_steps: int
    lam: float

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self):
        fig, (ax,) = _figure(1, width=5.6)
        for index, kernel in enumerate(self.kernels):
            color = f"C{index}"
            ax.loglog(self.widths, self.model_error[kernel], "o-", color=color, label=f"{kernel}: CG transformer")
            ax.loglog(self.widths, self.feature_krr_error[kernel], "x:", color=color, label=f"{kernel}: KRR on $\\Phi\\Phi^T$")
            ax.axvline(self.d_eff[kernel], color=color, ls="--", lw=1, label=f"{kernel}: $d_{{eff}}(\\lambda)$ = {self.d_eff[kernel]:.1f}")
        ax.set_xlabel("head width m (random features)")
        ax.set_ylabel("rel. error vs oracle KRR (true kernel)")
        ax.set_title(f"Head width limits the CG transformer (n={self.n_support}, {self.n_steps} steps)")
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        return fig


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
) -> WidthStudy:
    """Linear kernel: anisotropic inputs (`LinearRegressionSampler`, input condition number 100)
    with m-wide Gaussian projections; exp kernel (temperature = 1): `GPRegressionSampler` inputs
    (|x| ~ 1) with m positive random features. The model runs `n_steps` CG steps (enough to
    converge here), so its error is KRR-on-features' error; the oracle is `mi_krr.solvers.krr`
    with the true kernel."""
    samplers = {
        "linear": LinearRegressionSampler(dim, condition_number=100.0, noise_std=0.1),
        "exp": GPRegressionSampler(dim, kernel="exp", temperature=1.0),
    }
    result = WidthStudy(list(widths), list(kernels), {}, {}, {}, n_support, n_steps, lam)
    for kernel in kernels:
        task = samplers[kernel].sample(batch_size, n_support, n_query, seed=seed, dtype=torch.float64)
        params = {} if kernel == "linear" else {"temperature": 1.0}
        K = kernel_matrix(kernel, task.x_support, **params)
        oracle = _krr_predictions(K, task.y_support, lam, kernel_matrix(kernel, task.x_query, task.x_support, **params))
        result.d_eff[kernel] = float(effective_dimension(K, lam).mean())
        result.model_error[kernel], result.feature_krr_error[kernel] = [], []
        for width in widths:
            model = cg_transformer(n_steps, lam, kernel=kernel, dim=dim, head_width=width, temperature=1.0, seed=seed)
            pred = model.predict(task)
            phi, phi_query = model.feature_map(task.x_support), model.feature_map(task.x_query)
            feature_pred = _krr_predictions(phi @ phi.mT, task.y_support, lam, phi_query @ phi.mT)
            result.model_error[kernel].append(float(_relative_error(pred, oracle).median()))
            result.feature_krr_error[kernel].append(float(_relative_error(feature_pred, oracle).median()))
    return result


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
        left.set_ylim(bottom=1e-12, top=3)
        left.set_xlabel("CG step t (= blocks / 4)")
        left.set_ylabel("$\\|\\alpha_t-\\alpha^*\\|_A / \\|\\alpha^*\\|_A$")
        left.set_title("A-norm error vs the CG bound")
        left.legend(fontsize=7)
        right.set_xlabel("CG step t")
        right.set_ylabel("rel. prediction error vs KRR")
        right.set_title(f"Query predictions (n={self.n_support})")
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
) -> CGRateStudy:
    """Tasks from `conditioned_linear_task` (cond(K + lam I) = kappa exactly, y ~ N(0, I))."""
    steps = list(range(n_steps + 1))
    result = CGRateStudy(list(kappas), steps, {}, {}, {}, {}, n_support, lam)
    for kappa in kappas:
        task = conditioned_linear_task(batch_size, n_support, kappa, lam, n_query=16, seed=seed)
        K = task.x_support @ task.x_support.mT
        K_query = task.x_query @ task.x_support.mT
        alpha_star = krr(K, task.y_support, lam)
        oracle = _krr_predictions(K, task.y_support, lam, K_query)
        states = cg_transformer(n_steps, lam, dim=task.dim).step_states(task)
        solver = cg(K, task.y_support, lam, n_steps)
        A = K + lam * torch.eye(n_support, dtype=K.dtype)

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
            |pred_relu - pred_exact| / max |pred_exact|.
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
        for index, (name, errors) in enumerate(self.error.items()):
            ax.loglog(self.widths, errors, "o-", color=f"C{index}", label=f"{name} transformer")
        anchor = self.error[next(iter(self.error))]
        reference = [anchor[0] * (self.widths[0] / w) ** 2 for w in self.widths]
        ax.loglog(self.widths, reference, "k--", lw=1, label="$\\propto$ width$^{-2}$")
        ax.set_xlabel("MLP width (ReLU units per scalar op)")
        ax.set_ylabel("max rel. error vs exact construction")
        ax.set_title(f"ReLU MLP arithmetic ({self.n_steps} steps, n={self.n_support})")
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        return fig


def relu_width_study(
    widths: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024),
    n_steps: int = 10,
    n_support: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> ReluWidthStudy:
    """CG: `conditioned_linear_task` (kappa = 50, lam = 1e-2), reciprocals on [1e-4, 1e4].
    Richardson: Gaussian-kernel GP prompts in d = 2 (bandwidth 0.5, lam = 0.1, step 1),
    products bounded by 2 + max(1 + D_*) over the batch, reciprocals on [1e-3, 2]."""
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
            relu = build(mlp="relu", mlp_width=width).step_states(task).pred
            result.error[name].append(float((relu - exact).abs().max() / exact.abs().max()))
    return result
