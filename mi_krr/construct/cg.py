"""A linear-attention transformer that runs conjugate gradient on (K + lam I) alpha = y exactly.

Kernel: K = Phi Phi^T with Phi = phi(x_support) `[n, m]`, phi the feature map the embedding
applies (identity for the exact linear kernel; `RandomProjection` (linear) or
`PositiveRandomFeatures` (exp, gaussian) of width m = the head width otherwise). The model runs
CG on that K exactly; with a random feature map, on an approximation of the named kernel. A
`PromptFeatureMap` (e.g. `ProjectedKernelFeatures`, a rank-m projection of the kernel's exact
feature space) is instead applied jointly to each prompt's support and query points (its
`prompt_features`), so K and k_* are blocks of the one Gram matrix it gives on the prompt.

Tokens: n support tokens, m query tokens, one aggregator token (see `ConstructedTransformer`).

Residual coordinates (`model.state_coordinates`; fixed order, d_model = 20 + dim + 2 m):
    0 is_support, 1 is_query, 2 is_aux (the aggregator's flag)
    x [dim], y, feat_support [m] (phi(x_i) on support tokens), feat_query [m] (phi(x_*) on queries)
    support states: alpha, r, p, Kp = (K p)_i, and scratch Kr, bp, bKp
    query states:   pred = k_*^T alpha, kq = k_*^T p, and scratch kr, bkq
    aggregator:     rr = r^T r, rr_new, inv_rr, pAp, inv_pAp (scratch)
Scratch coordinates are 0 at every step boundary.

The embedding sets alpha = 0, r = y, p = Kp = kq = 0, pred = 0 and rr = 1 on the aggregator.
One CG step is `layers_per_step = 4` blocks (the same weights for every step); every product is
done by linear attention (a score times a value is a product of two token's coordinates), so
the MLPs only copy, clear and take reciprocals:
    1. heads: Kr_i = sum_j phi_i . phi_j r_j (support queries, support keys); kr_* = k_*^T r
       (query tokens); rr_new = sum_j r_j r_j (the aggregator: score r_j, value r_j).
       MLP (aggregator): inv_rr = 1 / rr.
    2. heads, keys = the aggregator, score = coordinate * rr_new, value inv_rr, so each output is
       b * coordinate with b = rr_new / rr: bp = b p, bKp = b Kp (support), bkq = b kq (queries).
       MLP: p <- r + bp, Kp <- Kr + bKp, kq <- kr + bkq, scratch cleared.
    3. head: pAp = sum_j p_j (Kp_j + lam p_j) (the aggregator). MLP: inv_pAp = 1 / pAp.
    4. heads, keys = the aggregator, score = coordinate * rr_new, value inv_pAp (a = rr_new / pAp):
       alpha += a p, r -= a (Kp + lam p) (support), pred += a kq (queries). MLP clears inv_pAp,
       rr <- rr_new.
Both step lengths read r^T r from rr_new, which attention wrote into a zeroed coordinate, not
from rr: an MLP overwrites rr by adding rr_new - rr, which rounds away the part of rr_new below
half an ulp of the old rr. Once CG has converged (r^T r ~ 1e-32 of its start) that is all of it:
rr is exactly 0 while its derivative in y keeps a rounding remainder, which a = rr / pAp would
multiply by 1 / pAp ~ 1e32 (autograd label sensitivities off by O(1)). rr only serves as the
next step's old r^T r, where 0 gives inv_rr = 0, so b = 0. Past convergence the steps move along
directions made of rounding errors, as `mi_krr.solvers.cg` does: predictions and their
derivatives in y stay the KRR ones to rounding, and the steps stop (the reciprocals give 0) once
the squared norms fall below the exact reciprocal's floor (`mi_krr.construct.primitives`).
Step t therefore forms the direction p_{t-1} = r_{t-1} + beta p_{t-2} first (beta multiplies
p = 0 at t = 1) and then moves along it: after step t's blocks the residual holds alpha_t, r_t,
pred_t = k_*^T alpha_t, rr = r_{t-1}^T r_{t-1}, and p = p_{t-1}, the direction of step t
(0-indexed CG: alpha_t = alpha_{t-1} + a_{t-1} p_{t-1}), Kp = K p_{t-1}.

Arithmetic: mlp="exact" uses an idealised reciprocal unit; mlp="relu" replaces 1/s by a ReLU
interpolant on [recip_range] (CG's only approximated operation), whose error falls with mlp_width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mi_krr._validation import check_choice, check_count, check_positive
from mi_krr.construct.primitives import Linear, Reciprocal, ReluArithmetic, const, coord, reciprocal_range
from mi_krr.construct.transformer import BlockSpec, ConstructedTransformer, FeatureSlot, HeadSpec, ResidualLayout
from mi_krr.feature_maps import FeatureMap, LinearFeatures, PositiveRandomFeatures, PromptFeatureMap, RandomProjection
from mi_krr.kernels import KERNEL_NAMES

CG_SUPPORT_STATES = ("alpha", "r", "p", "Kp", "y")
CG_QUERY_STATES = ("pred", "kq")
CG_AGGREGATOR_STATES = ("rr",)


def kernel_feature_map(
    kernel: str,
    dim: int,
    head_width: int | None,
    temperature: float,
    bandwidth: float,
    seed: int,
) -> FeatureMap:
    """The head's feature map: exact for the linear kernel without `head_width`, else rank-m
    `RandomProjection` (linear) or `PositiveRandomFeatures` (exp, gaussian)."""
    check_choice("kernel", kernel, KERNEL_NAMES)
    if kernel == "linear":
        if head_width is None:
            return LinearFeatures(dim)
        return RandomProjection(dim, check_count("head_width", head_width, minimum=1), seed=seed)
    if head_width is None:
        raise ValueError(f"head_width is required for kernel {kernel!r} (no finite exact feature map): pass e.g. head_width=256 (mi-krr construct: --head-width 256)")
    head_width = check_count("head_width", head_width, minimum=1)
    if kernel == "exp":
        return PositiveRandomFeatures(dim, head_width, kind="exp", temperature=check_positive("temperature", temperature), seed=seed)
    return PositiveRandomFeatures(dim, head_width, kind="gaussian", bandwidth=check_positive("bandwidth", bandwidth), seed=seed)


def _kernel_parameters(kernel: str, temperature: float | None, bandwidth: float | None) -> dict[str, float]:
    """The parameter `kernel` reads ({} for linear, temperature for exp, bandwidth for gaussian;
    None: 1.0); ValueError naming a parameter given for a kernel that does not read it."""
    readers = {"temperature": ("exp", temperature), "bandwidth": ("gaussian", bandwidth)}
    for name, (reader, value) in readers.items():
        if value is not None and kernel != reader:
            raise ValueError(f"{name} is the {reader} kernel's parameter; kernel {kernel!r} does not read it: drop {name}")
    return {name: check_positive(name, 1.0 if value is None else value) for name, (reader, value) in readers.items() if kernel == reader}


@dataclass(frozen=True)
class JointOverPrompt:
    """A `PromptFeatureMap` as the per-token function the embedding applies, x `[batch, seq, dim]`
    -> `[batch, seq, m]`: applied jointly to each prompt's points, every token but the trailing
    `n_aux` auxiliary ones (tokens are support, query, then auxiliary; see
    `ConstructedTransformer.encode`); auxiliary tokens get 0. A class, not a closure, so that a
    model holding it pickles (torch.save)."""

    feature_map: PromptFeatureMap
    n_aux: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        features = self.feature_map.prompt_features(x[..., : x.shape[-2] - self.n_aux, :])
        return torch.nn.functional.pad(features, (0, 0, 0, self.n_aux))


def _embedding_features(feature_map: FeatureMap | PromptFeatureMap, n_aux: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-token function the embedding applies: a pointwise `FeatureMap` itself, a
    `PromptFeatureMap` through `JointOverPrompt`."""
    return JointOverPrompt(feature_map, n_aux) if isinstance(feature_map, PromptFeatureMap) else feature_map


def cg_transformer(
    n_steps: int,
    lam: float,
    kernel: str = "linear",
    dim: int = 8,
    feature_map: FeatureMap | PromptFeatureMap | None = None,
    head_width: int | None = None,
    temperature: float | None = None,
    bandwidth: float | None = None,
    mlp: str = "exact",
    mlp_width: int = 256,
    recip_range: tuple[float, float] = (1e-6, 1e4),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> ConstructedTransformer:
    """A linear-attention transformer of `4 * n_steps` blocks running CG (module docstring).

    Args:
        n_steps: CG steps T >= 1.
        lam: ridge > 0.
        kernel: "linear", "exp" or "gaussian" (the latter two through random features).
        dim: largest task dimension d accepted (smaller tasks are zero-padded).
        feature_map: an explicit map phi (`in_dim == dim`); overrides kernel/head_width. A
            `PromptFeatureMap` (e.g. `ProjectedKernelFeatures`) is applied jointly to each
            prompt's support and query points.
        head_width: m, the width of phi (None: exact linear features, m = dim).
        temperature, bandwidth: the "exp" kernel's temperature, the "gaussian" kernel's bandwidth
            (None: 1.0); refused for a kernel that does not read them, or with a feature_map.
        mlp: "exact" (idealised reciprocal units) or "relu".
        mlp_width, recip_range: ReLU units per reciprocal and the range it is accurate on. The
            interpolant overshoots 1/s by up to `ReluArithmetic.reciprocal_overshoot()` (1.03x at
            64 units on the default 10 decades, 1.71x at 16) and CG compounds it step by step until
            a reciprocal's input leaves recip_range: the forward then raises a `ReluRangeError`
            naming recip_range and mlp_width (at 16 units a d=4 linear-regression task with
            lam=0.1 did within 10 steps).
        dtype, device: of the weights; float64 for exactness.
        seed: seed of the random feature map.

    `model.params` records what the model was built from: lam, the kernel and the parameter it
    reads (or the class of an explicit feature_map), the head width, the random features' seed
    where phi is random, and mlp_width / recip_range in relu mode.

    The model's `feature_map` attribute is the phi used: compare with
    `mi_krr.solvers.cg(feature_map.kernel(x), ...)`, or for a `PromptFeatureMap` with the support
    block of `feature_map.gram(torch.cat([x_support, x_query], -2))`.
    """
    n_steps = check_count("n_steps", n_steps, minimum=1)
    lam = check_positive("lam", lam)
    dim = check_count("dim", dim, minimum=1)
    check_choice("kernel", kernel, KERNEL_NAMES)
    check_choice("mlp", mlp, ("exact", "relu"))
    if mlp == "relu":
        low, high = reciprocal_range(recip_range)
    if feature_map is None:
        kernel_params = _kernel_parameters(kernel, temperature, bandwidth)
        feature_map = kernel_feature_map(kernel, dim, head_width, kernel_params.get("temperature", 1.0), kernel_params.get("bandwidth", 1.0), seed)
        params = {"kernel": kernel, **kernel_params}
        if kernel != "linear" or head_width is not None:
            params["seed"] = seed
    else:
        if not isinstance(feature_map, (FeatureMap, PromptFeatureMap)):
            raise ValueError(
                "feature_map must be an mi_krr.feature_maps.FeatureMap or PromptFeatureMap (e.g. PositiveRandomFeatures), got "
                f"{type(feature_map).__name__}: for a kernel by name pass kernel= and head_width="
            )
        if (temperature, bandwidth) != (None, None):
            raise ValueError("temperature / bandwidth are the feature_map's own with an explicit feature_map: drop them here")
        if feature_map.in_dim != dim:
            raise ValueError(f"feature_map must have in_dim == dim ({dim}), got {feature_map.in_dim}")
        params = {"feature_map": type(feature_map).__name__}
    width = feature_map.out_dim
    layout = ResidualLayout(
        [("x", dim), ("y", 1), ("feat_support", width), ("feat_query", width)]
        + [(name, 1) for name in ("alpha", "r", "p", "Kp", "Kr", "bp", "bKp")]
        + [(name, 1) for name in ("pred", "kq", "kr", "bkq")]
        + [(name, 1) for name in ("rr", "rr_new", "inv_rr", "pAp", "inv_pAp")]
    )
    c = {name: coord(index) for name, index in layout.scalars().items()}
    i = layout.scalars()
    feat_s = tuple(coord(j) for j in layout.span("feat_support"))
    feat_q = tuple(coord(j) for j in layout.span("feat_query"))
    one = (const(1.0),)

    def from_aggregator(query_type: str, factor, value: str, target: str, coef: float) -> HeadSpec:
        """Token coordinate `factor` times rr_new times the aggregator's `value`, added to `target`."""
        return HeadSpec((query_type,), ("aux",), (factor,), (c["rr_new"],), c[value], ((i[target], coef),))

    Ap = c["Kp"] + lam * c["p"]
    blocks = [
        BlockSpec(
            heads=(
                HeadSpec(("support",), ("support",), feat_s, feat_s, c["r"], ((i["Kr"], 1.0),)),
                HeadSpec(("query",), ("support",), feat_q, feat_s, c["r"], ((i["kr"], 1.0),)),
                HeadSpec(("aux",), ("support",), one, (c["r"],), c["r"], ((i["rr_new"], 1.0),)),
            ),
            mlp=(Reciprocal(i["inv_rr"], c["rr"], off=layout.other_types("aux")),),
        ),
        BlockSpec(
            heads=(
                from_aggregator("support", c["p"], "inv_rr", "bp", 1.0),
                from_aggregator("support", c["Kp"], "inv_rr", "bKp", 1.0),
                from_aggregator("query", c["kq"], "inv_rr", "bkq", 1.0),
            ),
            mlp=(
                Linear(i["p"], c["r"] + c["bp"] - c["p"]),
                Linear(i["Kp"], c["Kr"] + c["bKp"] - c["Kp"]),
                Linear(i["kq"], c["kr"] + c["bkq"] - c["kq"]),
                *(Linear(i[name], -c[name]) for name in ("bp", "bKp", "bkq", "Kr", "kr", "inv_rr")),
            ),
        ),
        BlockSpec(
            heads=(HeadSpec(("aux",), ("support",), one, (c["p"],), Ap, ((i["pAp"], 1.0),)),),
            mlp=(
                Reciprocal(i["inv_pAp"], c["pAp"], off=layout.other_types("aux")),
                Linear(i["pAp"], -c["pAp"]),
            ),
        ),
        BlockSpec(
            heads=(
                from_aggregator("support", c["p"], "inv_pAp", "alpha", 1.0),
                from_aggregator("support", Ap, "inv_pAp", "r", -1.0),
                from_aggregator("query", c["kq"], "inv_pAp", "pred", 1.0),
            ),
            mlp=(
                Linear(i["inv_pAp"], -c["inv_pAp"]),
                Linear(i["rr"], c["rr_new"] - c["rr"]),
                Linear(i["rr_new"], -c["rr_new"]),
            ),
        ),
    ]
    x_span = layout.span("x")
    n_aux = 1  # the aggregator token
    features = _embedding_features(feature_map, n_aux)
    model = ConstructedTransformer(
        construction="cg",
        layout=layout,
        step_blocks=blocks,
        n_steps=n_steps,
        dim=dim,
        n_aux=n_aux,
        attention="linear",
        placement=[(j, x_span[j], 1.0) for j in range(dim)] + [(dim, i["y"], 1.0), (dim, i["r"], 1.0)],
        constants=[("aux", i["rr"], 1.0)],
        features=[
            FeatureSlot(features, "support", layout.span("feat_support")),
            FeatureSlot(features, "query", layout.span("feat_query")),
        ],
        readout_coordinate=i["pred"],
        readout_sign=1.0,
        state_tokens={
            **{name: "support" for name in CG_SUPPORT_STATES},
            **{name: "query" for name in CG_QUERY_STATES},
            **{name: "aux" for name in CG_AGGREGATOR_STATES},
        },
        arithmetic=mlp,
        relu=ReluArithmetic(mlp_width, low=low, high=high) if mlp == "relu" else None,
        params={"lam": lam, **params, "head_width": width, **({"mlp_width": mlp_width, "recip_range": (low, high)} if mlp == "relu" else {})},
        dtype=dtype,
        device=device,
    )
    model.feature_map = feature_map
    return model
