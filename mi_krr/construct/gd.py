"""One linear self-attention layer per gradient-descent step on in-context linear regression
(the von Oswald et al. 2023 mechanism), exact:

    w_{t+1} = w_t + lr (X^T y - (X^T X + lam I) w_t),  w_0 = 0,  prediction x_*^T w_t,

the iteration of `mi_krr.solvers.feature_gd(X, y, lam, T, step=lr)`.

Tokens: support (x_j, y_j), queries (x_*, 0), no auxiliary token. Each token carries a slot s
(the "y slot"): s_j = y_j - x_j^T w_t on support tokens, s_* = -x_*^T w_t on queries (s starts at
y_j and 0). GD then reads, for every token i with input x_i,
    s_i <- s_i - lr sum_j (x_i . x_j) s_j + lr lam (y_i - s_i),
since x_i^T (w_{t+1} - w_t) = lr x_i^T X^T (y - X w_t) - lr lam x_i^T w_t and x_i^T w_t = y_i - s_i
(y_* = 0 on queries). The sum is one linear-attention head (q = k = x, value s, keys = support tokens, output scaled
by -lr), written straight into s when lam = 0. With lam > 0 the head writes into a scratch
coordinate g instead, and a linear (exact) MLP adds s <- s + g + lr lam (y - s), g <- 0 (the MLP
must see the slot from before the head's update).
The prediction is read negated from the query's slot: yhat_* = -s_*. `layers_per_step = 1`.

Residual coordinates (d_model = 5 + dim, + 1 with lam > 0): 0 is_support, 1 is_query, 2 is_aux
(unused), x [dim], y, s, and g when lam > 0.
"""

from __future__ import annotations

import torch

from mi_krr._validation import check_count, check_positive
from mi_krr.construct.primitives import Linear, coord
from mi_krr.construct.transformer import BlockSpec, ConstructedTransformer, HeadSpec, ResidualLayout
from mi_krr._validation import check_non_negative


def gd_transformer(
    n_steps: int,
    lr: float,
    lam: float = 0.0,
    dim: int = 8,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> ConstructedTransformer:
    """`n_steps` linear self-attention blocks running GD with learning rate `lr` and ridge
    `lam >= 0` on tasks of dimension <= `dim` (module docstring). Its MLPs are linear, so the
    model is exact in either arithmetic. At lam > 0 it runs `mi_krr.solvers.feature_gd`'s
    iteration; the default lam = 0 is plain least-squares GD, which that ridge solver refuses."""
    n_steps = check_count("n_steps", n_steps, minimum=1)
    lr = check_positive("lr", lr)
    lam = check_non_negative("lam", lam)
    dim = check_count("dim", dim, minimum=1)
    layout = ResidualLayout([("x", dim), ("y", 1), ("s", 1)] + ([("g", 1)] if lam > 0 else []))
    i = layout.scalars()
    xs = tuple(coord(j) for j in layout.span("x"))
    s, y = coord(i["s"]), coord(i["y"])
    ridge: tuple[Linear, ...]
    if lam > 0:
        head_target = i["g"]
        ridge = (Linear(i["s"], coord(i["g"]) + lr * lam * (y - s)), Linear(i["g"], -coord(i["g"])))
    else:
        head_target, ridge = i["s"], ()
    block = BlockSpec(
        heads=(HeadSpec(("support", "query"), ("support",), xs, xs, s, ((head_target, -lr),)),),
        mlp=ridge,
    )
    x_span = layout.span("x")
    return ConstructedTransformer(
        construction="gd",
        layout=layout,
        step_blocks=[block],
        n_steps=n_steps,
        dim=dim,
        n_aux=0,
        attention="linear",
        placement=[(j, x_span[j], 1.0) for j in range(dim)] + [(dim, i["y"], 1.0), (dim, i["s"], 1.0)],
        constants=[],
        features=[],
        readout_coordinate=i["s"],
        readout_sign=-1.0,
        state_tokens={"s": "support", "y": "support"},
        arithmetic="exact",
        relu=None,
        params={"lr": lr, "lam": lam, "kernel": "linear"},
        dtype=dtype,
        device=device,
    )
