"""Per-token scalar arithmetic for the constructed MLPs, written once and compiled two ways.

A construction writes each MLP as a list of scalar operations on affine read-outs of the
residual stream (`Readout`): `Linear` (c u), `Product` (c u v) and `Reciprocal` (c / u on the
tokens of one type, exactly 0 on the others). `compile_mlp(ops, d_model, arithmetic)` turns the
list into a module with a TransformerLens-style `hook_pre` / `hook_post`:

- `ExactMLP` ("exact"): idealised gated units, hidden_k = a_k(h) * g_k(b_k(h)), with g_k the
  identity (a bilinear, GLU-like unit: a product, or a linear term when b_k = 1) or the
  reciprocal 1/s. These are IDEALISED: no standard activation computes u v or 1/s exactly; they
  stand for arithmetic that a wide enough ReLU network approximates to any accuracy on a bounded
  range, which `ReluMLP` makes concrete. 1/s returns 0, with derivative 0, where
  |s| <= `RECIPROCAL_FLOOR` (~1.5e-154, the square root of the smallest normal float64), so that
  its derivative -1/s^2 stays finite: below the floor the backward pass would overflow to inf and
  NaN (CG's squared norms get there when a construction runs many steps past convergence).
  (mi_krr.solvers' CG divides num / den directly, with no 1/den^2 factor of its own, and guards
  at the smallest normal float.)
- `ReluMLP` ("relu"): a standard one-hidden-layer ReLU MLP, out = W_out relu(W_in h + b_in) + b_out.
  Linear terms are exact (u = relu(u) - relu(-u)). A product is u v = ((u + v)^2 - (u - v)^2) / 4
  with s^2 replaced by its piecewise-linear interpolant on `width` ReLU units (uniform knots on
  [-bound, bound]); a reciprocal is the piecewise-linear interpolant of 1/s on `width` units
  (geometric knots on [low, high]). Both interpolants are constant outside their range. The
  interpolation error is at most (2 bound / (width - 1))^2 / 4 for s^2 and about
  (ln(high / low) / (width - 1))^2 / 4 relative for 1/s, so it falls as width^-2; on [low, high]
  the interpolant of 1/s lies between 1/s and (r + 1)^2 / (4 r) times it, r = (high / low)^(1 /
  (width - 1)) the knot ratio (`ReluArithmetic.reciprocal_overshoot`).
  Outside [-bound, bound] the square is off by O(s^2), so a product's value there is wrong by
  O(1) and more: the forward pass raises a ValueError naming mlp_bound when a product's input
  u + v or u - v leaves [-bound, bound]. Likewise above `high` the interpolant of 1/s stays at
  1/high, too large by s / high: the forward pass raises a ValueError naming recip_range when a
  reciprocal's input exceeds `high`. Below `low` it is not checked: CG's squared norms fall
  below `low` once it has converged, where the capped reciprocal multiplies a vanishing residual.

`Reciprocal(..., off=o)` computes 1/u on the tokens where the readout o is 0 and exactly 0 where
o is 1 (o is a sum of token-type flags, so it is exactly 0 or 1; u must be 0 where o is 1): the
unit reads s = u + o (s = 1 there) and a linear term subtracts g(1) o, g being the unit's own
reciprocal. Writing o as the other types' flags (not 1 - flag) keeps s = u exactly where the
reciprocal applies: no (u - 1) + 1 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mi_krr._validation import check_choice, check_count, check_positive

ARITHMETICS = ("exact", "relu")
RECIPROCAL_FLOOR = torch.finfo(torch.float64).tiny ** 0.5
"""|s| at or below which `ExactMLP`'s 1/s is 0 (module docstring)."""


@dataclass(frozen=True)
class Readout:
    """An affine function of one token's residual vector h: sum_c weights[c] h[c] + bias.

    Readouts add, subtract, negate and scale by numbers, so specs read like the algebra:
    `coord(p) * lam + coord(kp)` is (K + lam I) p's entry on a support token.
    """

    weights: tuple[tuple[int, float], ...] = ()
    bias: float = 0.0

    def __add__(self, other: "Readout") -> "Readout":
        merged: dict[int, float] = dict(self.weights)
        for index, weight in other.weights:
            merged[index] = merged.get(index, 0.0) + weight
        return Readout(tuple(sorted(merged.items())), self.bias + other.bias)

    def __mul__(self, scale: float) -> "Readout":
        return Readout(tuple((index, weight * scale) for index, weight in self.weights), self.bias * scale)

    __rmul__ = __mul__

    def __neg__(self) -> "Readout":
        return self * -1.0

    def __sub__(self, other: "Readout") -> "Readout":
        return self + (-other)

    def vector(self, d_model: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weights as a dense vector `[d_model]`."""
        dense = torch.zeros(d_model, dtype=dtype)
        for index, weight in self.weights:
            dense[index] += weight
        return dense


def coord(index: int) -> Readout:
    """The readout h[index]."""
    return Readout(((index, 1.0),))


def const(value: float) -> Readout:
    """The constant readout `value`."""
    return Readout((), float(value))


@dataclass(frozen=True)
class Linear:
    """Adds coef * u(h) to coordinate `target`."""

    target: int
    u: Readout
    coef: float = 1.0


@dataclass(frozen=True)
class Product:
    """Adds coef * u(h) v(h) to coordinate `target`."""

    target: int
    u: Readout
    v: Readout
    coef: float = 1.0


@dataclass(frozen=True)
class Reciprocal:
    """Adds coef / u(h) to coordinate `target` on tokens where the 0/1 readout `off` is 0, and
    exactly 0 on tokens where it is 1 (u must be 0 there)."""

    target: int
    u: Readout
    off: Readout
    coef: float = 1.0


Op = Linear | Product | Reciprocal


class ReluRangeError(ValueError):
    """A relu-mode MLP's input left the range its interpolants cover (`ReluMLP.check_inputs`)."""


@dataclass(frozen=True)
class ReluArithmetic:
    """Ranges and width of the ReLU approximations (see the module docstring).

    Attributes:
        width: ReLU units per nonlinear scalar function (one square, or one reciprocal); >= 2.
        bound: products u v are accurate while |u + v| and |u - v| stay within [-bound, bound].
        low, high: reciprocals 1/s are accurate for s in [low, high].
    """

    width: int = 256
    bound: float = 10.0
    low: float = 1e-6
    high: float = 1e4

    def __post_init__(self) -> None:
        check_count("mlp_width", self.width, minimum=2)
        check_positive("mlp_bound", self.bound)
        check_positive("recip_range[0]", self.low)
        if not self.high > self.low:
            raise ValueError(f"recip_range must be (low, high) with 0 < low < high, got ({self.low}, {self.high})")

    def square_knots(self) -> torch.Tensor:
        return torch.linspace(-self.bound, self.bound, self.width, dtype=torch.float64)

    def reciprocal_knots(self) -> torch.Tensor:
        return torch.logspace(math.log10(self.low), math.log10(self.high), self.width, dtype=torch.float64)

    def reciprocal_overshoot(self) -> float:
        """The largest ratio of the interpolant of 1/s to 1/s on [low, high]: (r + 1)^2 / (4 r), r the
        ratio of neighbouring knots (on [a, r a] the chord times s peaks at s = (r + 1) a / 2)."""
        ratio = (self.high / self.low) ** (1.0 / (self.width - 1))
        return (ratio + 1.0) ** 2 / (4.0 * ratio)


def reciprocal_range(recip_range: Any) -> tuple[float, float]:
    """`recip_range` as a (low, high) pair of floats (`ReluArithmetic` checks 0 < low < high), or
    one ValueError naming it."""
    try:
        low, high = (float(value) for value in recip_range)
    except (TypeError, ValueError) as error:
        raise ValueError(f"recip_range must be a pair (low, high) with 0 < low < high, e.g. (1e-6, 1e4), got {recip_range!r}") from error
    return low, high


@dataclass
class _Units:
    """Hidden units under construction: per unit an input readout (and, for gated units, a gate
    readout), and the output coefficients per residual coordinate."""

    first: list[Readout] = field(default_factory=list)
    second: list[Readout] = field(default_factory=list)
    outputs: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, first: Readout, outputs: list[tuple[int, float]], second: Readout | None = None) -> None:
        self.first.append(first)
        self.second.append(second if second is not None else const(1.0))
        self.outputs.append(outputs)

    def matrices(self, d_model: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_first `[d_model, H]`, b_first `[H]`, W_second, b_second, W_out `[H, d_model]`)."""
        hidden = len(self.first)
        w_first = torch.zeros(d_model, hidden, dtype=torch.float64)
        w_second = torch.zeros(d_model, hidden, dtype=torch.float64)
        w_out = torch.zeros(hidden, d_model, dtype=torch.float64)
        for unit, (first, second, outputs) in enumerate(zip(self.first, self.second, self.outputs)):
            w_first[:, unit] = first.vector(d_model)
            w_second[:, unit] = second.vector(d_model)
            for target, coef in outputs:
                w_out[unit, target] += coef
        b_first = torch.tensor([r.bias for r in self.first], dtype=torch.float64).reshape(hidden)
        b_second = torch.tensor([r.bias for r in self.second], dtype=torch.float64).reshape(hidden)
        return w_first, b_first, w_second, b_second, w_out


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class ExactMLP(nn.Module):
    """Idealised gated MLP: out = W_out [a * b ; c / d] with a, b, c, d affine in h.

    Hooks: `hook_pre` the gate inputs [b ; d] `[batch, pos, hidden]`, `hook_post` the units.
    """

    def __init__(self, ops: list[Op], d_model: int):
        super().__init__()
        bilinear, reciprocal = _Units(), _Units()
        for op in ops:
            if isinstance(op, Linear):
                bilinear.add(op.u, [(op.target, op.coef)])
            elif isinstance(op, Product):
                bilinear.add(op.u, [(op.target, op.coef)], op.v)
            else:
                reciprocal.add(const(1.0), [(op.target, op.coef)], op.u + op.off)
                bilinear.add(op.off, [(op.target, -op.coef)])  # g(1) = 1 where off = 1
        w_a, b_a, w_b, b_b, out_bilinear = bilinear.matrices(d_model)
        w_c, b_c, w_d, b_d, out_reciprocal = reciprocal.matrices(d_model)
        self.W_a, self.b_a, self.W_b, self.b_b = map(_frozen, (w_a, b_a, w_b, b_b))
        self.W_c, self.b_c, self.W_d, self.b_d = map(_frozen, (w_c, b_c, w_d, b_d))
        self.W_out = _frozen(torch.cat([out_bilinear, out_reciprocal]))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h `[batch, pos, d_model]` -> update `[batch, pos, d_model]`."""
        gates = self.hook_pre(torch.cat([h @ self.W_b + self.b_b, h @ self.W_d + self.b_d], dim=-1))
        n_bilinear = self.W_b.shape[1]
        gate_bilinear, gate_reciprocal = gates[..., :n_bilinear], gates[..., n_bilinear:]
        nonzero = gate_reciprocal.abs() > RECIPROCAL_FLOOR
        inverse = torch.where(nonzero, 1.0 / torch.where(nonzero, gate_reciprocal, 1.0), 0.0)
        units = torch.cat([(h @ self.W_a + self.b_a) * gate_bilinear, (h @ self.W_c + self.b_c) * inverse], dim=-1)
        return self.hook_post(units) @ self.W_out


def _piecewise_linear_units(
    units: _Units,
    readout: Readout,
    knots: torch.Tensor,
    values: torch.Tensor,
    target: int,
    coef: float,
    anchor: str = "left",
) -> float:
    """Add ReLU units computing coef * (the interpolant of `values` at `knots`, constant outside)
    minus its constant term; returns that constant (for the output bias).

    anchor "left":  g(s) = values[0]  + sum_k change_k relu(s - knot_k);
    anchor "right": g(s) = values[-1] + sum_k change_k relu(knot_k - s);
    with change = (slope_0, slope_1 - slope_0, ..., -slope_last) in both cases. Anchor where the
    function is small (the right end for 1/s): the active terms are then of the size of the
    value, so no large terms cancel.
    """
    slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
    changes = torch.cat([slopes[:1], slopes[1:] - slopes[:-1], -slopes[-1:]])
    sign = 1.0 if anchor == "left" else -1.0
    for knot, change in zip(knots.tolist(), changes.tolist()):
        units.add(sign * (readout - const(knot)), [(target, coef * change)])
    return coef * float(values[0] if anchor == "left" else values[-1])


def _interpolate(knots: torch.Tensor, values: torch.Tensor, s: float) -> float:
    """The clamped piecewise-linear interpolant of (knots, values) at s."""
    s = min(max(s, float(knots[0])), float(knots[-1]))
    right = int(torch.searchsorted(knots, torch.tensor(s, dtype=knots.dtype)).clamp(1, len(knots) - 1))
    t0, t1 = float(knots[right - 1]), float(knots[right])
    v0, v1 = float(values[right - 1]), float(values[right])
    return v0 + (v1 - v0) * (s - t0) / (t1 - t0)


class ReluMLP(nn.Module):
    """One-hidden-layer ReLU MLP approximating the ops (see the module docstring). Its forward pass
    raises a ValueError when a product's input leaves [-bound, bound] or a reciprocal's exceeds
    `high` (`check_inputs`).

    Hooks: `hook_pre` the pre-activations `[batch, pos, hidden]`, `hook_post` after the ReLU.
    """

    # buffers registered by name in __init__: the input maps of the product and reciprocal units
    W_product: torch.Tensor
    b_product: torch.Tensor
    W_reciprocal: torch.Tensor
    b_reciprocal: torch.Tensor

    def __init__(self, ops: list[Op], d_model: int, arithmetic: ReluArithmetic):
        super().__init__()
        self.arithmetic = arithmetic
        product_inputs, reciprocal_inputs = _Units(), _Units()
        for op in ops:
            if isinstance(op, Product):
                product_inputs.add(op.u + op.v, [])
                product_inputs.add(op.u - op.v, [])
            elif isinstance(op, Reciprocal):
                reciprocal_inputs.add(op.u, [])  # u + off on the tokens it applies to (off = 0); 0 elsewhere, where the output is 0
        # buffers, not in the state dict: a saved model holds the ReLU network's weights only
        for name, inputs in (("product", product_inputs), ("reciprocal", reciprocal_inputs)):
            weight, bias, _, _, _ = inputs.matrices(d_model)
            self.register_buffer(f"W_{name}", weight, persistent=False)
            self.register_buffer(f"b_{name}", bias, persistent=False)
        units = _Units()
        bias = torch.zeros(d_model, dtype=torch.float64)
        square_knots = arithmetic.square_knots()
        square_values = square_knots**2
        recip_knots = arithmetic.reciprocal_knots()
        recip_values = 1.0 / recip_knots
        for op in ops:
            if isinstance(op, Linear):
                units.add(op.u, [(op.target, op.coef)])
                units.add(-op.u, [(op.target, -op.coef)])
            elif isinstance(op, Product):
                for sign, argument in ((0.25, op.u + op.v), (-0.25, op.u - op.v)):
                    bias[op.target] += _piecewise_linear_units(
                        units, argument, square_knots, square_values, op.target, sign * op.coef
                    )
            else:
                bias[op.target] += _piecewise_linear_units(
                    units, op.u + op.off, recip_knots, recip_values, op.target, op.coef, anchor="right"
                )
                at_one = _interpolate(recip_knots, recip_values, 1.0)
                units.add(op.off, [(op.target, -op.coef * at_one)])  # off is 0 or 1: relu(off) = off
        w_in, b_in, _, _, w_out = units.matrices(d_model)
        self.W_in, self.b_in, self.W_out, self.b_out = map(_frozen, (w_in, b_in, w_out, bias))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @property
    def bound(self) -> float:
        """Products are accurate while their inputs stay within [-bound, bound]."""
        return self.arithmetic.bound

    def check_inputs(self, h: torch.Tensor) -> None:
        """`ReluRangeError` (a ValueError) if, on any token of h `[batch, pos, d_model]`, a product's
        input u + v or u - v lies outside [-bound, bound] (naming mlp_bound) or a reciprocal's input
        above `high` (naming recip_range): there the interpolants end and the result would be wrong."""
        h = h.detach()
        relu = self.arithmetic
        if self.W_product.shape[1]:
            largest = float((h @ self.W_product + self.b_product).abs().amax())
            if largest > relu.bound:
                raise ReluRangeError(
                    f"mlp='relu': a product's input |u +- v| reached {largest:.4g}, beyond mlp_bound={relu.bound:.4g} where its "
                    f"ReLU interpolant of s^2 ends (the product would be wrong): rebuild the model with mlp_bound >= {largest:.4g} "
                    "(richardson_transformer: or with max_support >= the prompts' n_support)"
                )
        if self.W_reciprocal.shape[1]:
            largest = float((h @ self.W_reciprocal + self.b_reciprocal).amax())
            if largest > relu.high:
                raise ReluRangeError(
                    f"mlp='relu': a reciprocal's input reached {largest:.4g}, beyond recip_range's high end {relu.high:.4g} where "
                    f"its ReLU interpolant of 1/s ends (1/s would be {largest / relu.high:.3g}x too large): rebuild the model with "
                    f"recip_range=({relu.low:g}, >= {largest:.4g}) and mlp_width large enough for the wider range, or, if the "
                    f"inputs grew step by step, with a larger mlp_width (now {relu.width}: 1/s overshot by up to "
                    f"{relu.reciprocal_overshoot():.4g}x)"
                )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h `[batch, pos, d_model]` -> update `[batch, pos, d_model]`."""
        self.check_inputs(h)
        hidden = self.hook_post(torch.relu(self.hook_pre(h @ self.W_in + self.b_in)))
        return hidden @ self.W_out + self.b_out


def compile_mlp(ops: list[Op], d_model: int, arithmetic: str, relu: ReluArithmetic | None = None) -> nn.Module:
    """The MLP computing `ops`: `ExactMLP` for arithmetic "exact", `ReluMLP(relu)` for "relu"."""
    check_choice("mlp", arithmetic, ARITHMETICS)
    if arithmetic == "exact":
        return ExactMLP(ops, d_model)
    return ReluMLP(ops, d_model, relu if relu is not None else ReluArithmetic())
