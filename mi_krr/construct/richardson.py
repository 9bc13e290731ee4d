"""A softmax transformer that runs row-sum preconditioned Richardson on a Gaussian kernel exactly:

    alpha <- alpha + w D^-1 (y - (K + lam I) alpha),   D = diag(K 1),
    K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)),

the iteration of `mi_krr.solvers.richardson(K, y, lam, T, step=w, precond="rowsum")`.

Derivation. Give query i the vector (x_i, 1, |x_i|^2) and key j the vector
(x_j / sigma^2, -|x_j|^2 / (2 sigma^2), [j is the sink] / (2 sigma^2)). For a support key the
score is x_i . x_j / sigma^2 - |x_j|^2 / (2 sigma^2), so
    exp(score_ij) = K_ij exp(|x_i|^2 / (2 sigma^2)):
the |x_i|^2 factor is common to the row and cancels in the softmax, which therefore applies
exactly D^-1 K over the support keys. D_i itself is normalised away; to recover it, one constant
"sink" token (x = 0, value 1) is added as a key with score |x_i|^2 / (2 sigma^2), i.e. the same
common factor times 1. Its weight is then exactly z_i = 1 / (1 + D_i), and the MLP forms
D_i^-1 = 1 / (1 - z_i) - 1 (1 - z_i = D_i / (1 + D_i) lies in [1/2, 1) since K_ii = 1). For a query
x_*, the head over support keys and the sink with values alpha gives
o_* = k_*^T alpha / (1 + D_*) and the sink weight z_* = 1 / (1 + D_*), so k_*^T alpha = o_* / z_*.

Tokens: n support tokens, m queries, one sink token (flag is_aux). Residual coordinates
(`model.state_coordinates`; fixed order, d_model = 13 + dim):
    0 is_support, 1 is_query, 2 is_aux (the sink)
    x [dim], y, sqnorm = |x|^2 (computed by the embedding, a nonlinear read-in)
    support: alpha, u = (D^-1 K alpha)_i, z_s = 1 / (1 + D_i), dinv = 1 / D_i
    query:   pred = k_*^T alpha, z_q = 1 / (1 + D_*), izq = 1 + D_*, o = k_*^T alpha / (1 + D_*)
u, z_s, z_q, o are scratch (0 at step boundaries); dinv and izq are recomputed every step.

One step is `layers_per_step = 3` blocks (the same weights every step):
    1. heads: z_s (support queries; keys support + sink; value = sink flag), z_q (query tokens).
       MLP: dinv = 1 / (1 - z_s) - 1 (support), izq = 1 / z_q (queries).
    2. head: u = softmax-weighted alpha over support keys = (D^-1 K alpha)_i.
       MLP: alpha += w (dinv (y - lam alpha) - u).
    3. head: o (query tokens; keys support + sink; value alpha). MLP: pred = o * izq.
After step t's blocks, alpha = alpha_t and pred = k_*^T alpha_t.

Arithmetic: mlp="exact" uses idealised product and reciprocal units; mlp="relu" uses ReLU
interpolants (products accurate while |u +- v| <= mlp_bound, reciprocals on recip_range; the
reciprocal arguments here lie in [1/2, 1] and [1 / (1 + n), 1]).

The ReLU product bound follows from the row sums. The Gaussian kernel is at most 1, so a prompt
of n <= max_support support points has 1 + D_* <= 1 + max_support, and izq, the interpolant of
1 / z_q, is at most (1 + max_support) times the interpolant's overshoot c
(`ReluArithmetic.reciprocal_overshoot`; 1.0002 at width 256). The product pred = o * izq reads
|o +- izq| <= |o| + izq with |o| = |pred_t| / (1 + D_*), which over row sums in
[1, 1 + max_support] peaks at an end; so the default mlp_bound = 2 + c (1 + max_support) covers
every prompt of at most max_support points whose |pred_t| and |y_i - lam alpha_i| stay within
max_support + 2 (the other product, dinv * (y - lam alpha), has 0 < dinv <= 2 c - 1).
recip_range must contain [1 / mlp_bound, 1]: then a row sum beyond the reciprocal's range gives
izq = 1 / low >= mlp_bound, so |o +- izq| > mlp_bound (unless o = 0, where pred = 0 is right).
Whatever the prompts, the forward pass raises (naming mlp_bound) as soon as a product's input
leaves [-mlp_bound, mlp_bound], so relu mode is never silently wrong there.
"""

from __future__ import annotations

import dataclasses

import torch

from mi_krr._validation import check_choice, check_count, check_positive
from mi_krr.construct.primitives import Linear, Product, Reciprocal, ReluArithmetic, const, coord, reciprocal_range
from mi_krr.construct.transformer import BlockSpec, ConstructedTransformer, FeatureSlot, HeadSpec, ResidualLayout

RICHARDSON_SUPPORT_STATES = ("alpha", "dinv", "y")
RICHARDSON_QUERY_STATES = ("pred", "izq")
PREDICTION_ROOM = 2.0
"""What the default mlp_bound adds to the largest row sum: room for |o| = |pred_t| / (1 + D_*)."""


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 `[..., 1]` for `x [..., d]`."""
    return (x * x).sum(-1, keepdim=True)


def relu_arithmetic(
    width: int, bound: float | None, max_support: int, recip_range: tuple[float, float]
) -> ReluArithmetic:
    """The ReLU arithmetic of the relu-mode construction: `bound` None gives the default
    2 + c (1 + max_support), c the reciprocal's overshoot (module docstring). ValueError if
    recip_range does not contain [1 / bound, 1]."""
    max_support = check_count("max_support", max_support, minimum=1)
    low, high = reciprocal_range(recip_range)
    arithmetic = ReluArithmetic(width, low=low, high=high)
    derived = bound is None
    if bound is None:
        bound = PREDICTION_ROOM + arithmetic.reciprocal_overshoot() * (1 + max_support)
    arithmetic = dataclasses.replace(arithmetic, bound=bound)
    if arithmetic.low * arithmetic.bound > 1.0 or arithmetic.high < 1.0:
        fix = (
            f"the default mlp_bound {bound:.4g} = {PREDICTION_ROOM:g} + (1 + max_support={max_support}) x "
            f"{arithmetic.reciprocal_overshoot():.4g} (the reciprocal's overshoot at mlp_width={width}) is too large: raise "
            "mlp_width (mi-krr construct: --mlp-width)"
            if derived else "widen recip_range or lower mlp_bound"
        )
        raise ValueError(
            f"recip_range={(low, high)} must contain [1 / mlp_bound, 1] = [{1.0 / arithmetic.bound:.4g}, 1] (the sink "
            f"weights 1 / (1 + D) and 1 - z_s it inverts): {fix}"
        )
    return arithmetic


def richardson_transformer(
    n_steps: int,
    lam: float,
    bandwidth: float,
    step: float,
    dim: int = 8,
    mlp: str = "exact",
    mlp_width: int = 256,
    mlp_bound: float | None = None,
    max_support: int = 32,
    recip_range: tuple[float, float] = (1e-3, 2.0),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> ConstructedTransformer:
    """A softmax transformer of `3 * n_steps` blocks running row-sum preconditioned Richardson
    with step `w = step` on the Gaussian kernel of `bandwidth` (module docstring).

    Args:
        n_steps: iterations T >= 1.
        lam: ridge > 0.
        bandwidth: sigma > 0 of the Gaussian kernel.
        step: w > 0 (converges for w < 2 / mu_max(D^-1 (K + lam I))).
        dim: largest task dimension accepted (smaller tasks are zero-padded).
        mlp: "exact" or "relu"; mlp_width, mlp_bound, recip_range: the ReLU approximation.
        max_support: with mlp="relu" and mlp_bound None, the most support points a prompt may
            have: mlp_bound is then derived from it (module docstring). Prompts that need a larger
            bound raise a ValueError in the forward pass.
        dtype, device: of the weights.
    """
    n_steps = check_count("n_steps", n_steps, minimum=1)
    lam = check_positive("lam", lam)
    sigma = check_positive("bandwidth", bandwidth)
    step = check_positive("step", step)
    dim = check_count("dim", dim, minimum=1)
    check_choice("mlp", mlp, ("exact", "relu"))
    layout = ResidualLayout(
        [("x", dim), ("y", 1), ("sqnorm", 1)]
        + [(name, 1) for name in ("alpha", "u", "z_s", "dinv")]
        + [(name, 1) for name in ("pred", "z_q", "izq", "o")]
    )
    c = {name: coord(index) for name, index in layout.scalars().items()}
    i = layout.scalars()
    xs = [coord(j) for j in layout.span("x")]
    query = (*xs, const(1.0), c["sqnorm"])
    key = (*(x * (1.0 / sigma**2) for x in xs), c["sqnorm"] * (-0.5 / sigma**2), c["is_aux"] * (0.5 / sigma**2))
    with_sink = ("support", "aux")

    blocks = [
        BlockSpec(
            heads=(
                HeadSpec(("support",), with_sink, query, key, c["is_aux"], ((i["z_s"], 1.0),)),
                HeadSpec(("query",), with_sink, query, key, c["is_aux"], ((i["z_q"], 1.0),)),
            ),
            mlp=(
                Reciprocal(i["dinv"], c["is_support"] - c["z_s"], off=layout.other_types("support")),
                Linear(i["dinv"], -c["is_support"] - c["dinv"]),
                Reciprocal(i["izq"], c["z_q"], off=layout.other_types("query")),
                Linear(i["izq"], -c["izq"]),
                Linear(i["z_s"], -c["z_s"]),
                Linear(i["z_q"], -c["z_q"]),
            ),
        ),
        BlockSpec(
            heads=(HeadSpec(("support",), ("support",), query, key, c["alpha"], ((i["u"], 1.0),)),),
            mlp=(
                Product(i["alpha"], c["dinv"], c["y"] - lam * c["alpha"], coef=step),
                Linear(i["alpha"], -c["u"], coef=step),
                Linear(i["u"], -c["u"]),
            ),
        ),
        BlockSpec(
            heads=(HeadSpec(("query",), with_sink, query, key, c["alpha"], ((i["o"], 1.0),)),),
            mlp=(
                Product(i["pred"], c["o"], c["izq"]),
                Linear(i["pred"], -c["pred"]),
                Linear(i["o"], -c["o"]),
            ),
        ),
    ]
    x_span = layout.span("x")
    return ConstructedTransformer(
        construction="richardson",
        layout=layout,
        step_blocks=blocks,
        n_steps=n_steps,
        dim=dim,
        n_aux=1,
        attention="softmax",
        placement=[(j, x_span[j], 1.0) for j in range(dim)] + [(dim, i["y"], 1.0)],
        constants=[],
        features=[
            FeatureSlot(squared_norm, "support", layout.span("sqnorm")),
            FeatureSlot(squared_norm, "query", layout.span("sqnorm")),
        ],
        readout_coordinate=i["pred"],
        readout_sign=1.0,
        state_tokens={
            **{name: "support" for name in RICHARDSON_SUPPORT_STATES},
            **{name: "query" for name in RICHARDSON_QUERY_STATES},
        },
        arithmetic=mlp,
        relu=relu_arithmetic(mlp_width, mlp_bound, max_support, recip_range) if mlp == "relu" else None,
        params={"lam": lam, "bandwidth": sigma, "step": step, "kernel": "gaussian", "preconditioner": "rowsum"},
        dtype=dtype,
        device=device,
    )
