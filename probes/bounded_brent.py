"""SciPy's bounded Brent minimisation (`scipy.optimize.minimize_scalar(method="bounded")`),
vectorised over many independent searches that advance in lockstep: each iteration asks for the
next point of every unconverged search in ONE call, so an expensive loss can score them as one
batch (`probes.step_sizes` scores step-size candidates this way)."""

from __future__ import annotations

from typing import Callable

import numpy as np

_GOLDEN_MEAN = 0.5 * (3.0 - np.sqrt(5.0))
_SQRT_EPS = np.sqrt(2.2e-16)
_MAX_EVALUATIONS = 500
"""SciPy's bounded-Brent constants (`scipy.optimize._optimize._minimize_scalar_bounded`)."""


def bounded_brent(loss: Callable[[np.ndarray, np.ndarray], np.ndarray], low: np.ndarray, high: np.ndarray, xatol: float) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's `minimize_scalar(loss_i, bounds=(low[i], high[i]), method="bounded",
    options={"xatol": xatol})` for N functions at once, step for step (golden section with
    parabolic steps; same points, same stopping rule).

    Args:
        loss: `loss(index, x)`: the values of functions `index` `[k]` at `x` `[k]` (one batch
            per iteration holding the next point of every unconverged search).
        low, high: the bounds `[N]`.
        xatol: absolute tolerance on x.

    Returns:
        (x, loss) of each search's minimum, `[N]` each.
    """
    a, b = np.array(low, dtype=np.float64), np.array(high, dtype=np.float64)
    xf = a + _GOLDEN_MEAN * (b - a)
    fx = np.asarray(loss(np.arange(len(a)), xf), dtype=np.float64)
    nfc, fulc, fnfc, ffulc = xf.copy(), xf.copy(), fx.copy(), fx.copy()
    rat, e = np.zeros_like(a), np.zeros_like(a)
    for _ in range(_MAX_EVALUATIONS - 1):
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * np.abs(xf) + xatol / 3.0
        live = np.flatnonzero(np.abs(xf - xm) > 2.0 * tol1 - 0.5 * (b - a))
        if not len(live):
            break
        state = (a, b, xf, fx, nfc, fnfc, fulc, ffulc, rat, e)
        x, rat[live], e[live] = _brent_point(*(value[live] for value in (*state, xm, tol1)))
        fu = np.asarray(loss(live, x), dtype=np.float64)
        updated = _brent_update(x, fu, *(value[live] for value in state[:8]))
        for value, new in zip(state[:8], updated):
            value[live] = new
    return xf, fx


def _brent_point(a, b, xf, fx, nfc, fnfc, fulc, ffulc, rat, e, xm, tol1):
    """The next point of bounded Brent searches (arrays `[k]`, SciPy's names): a parabolic step
    through (xf, nfc, fulc) where acceptable, else golden section. Returns (x, rat, e)."""
    tol2 = 2.0 * tol1
    r = (xf - nfc) * (fx - ffulc)
    q = (xf - fulc) * (fx - fnfc)
    p = (xf - fulc) * q - (xf - nfc) * r
    q = 2.0 * (q - r)
    p = np.where(q > 0.0, -p, p)
    q = np.abs(q)
    parabolic = (np.abs(e) > tol1) & (np.abs(p) < np.abs(0.5 * q * e)) & (p > q * (a - xf)) & (p < q * (b - xf))
    step = np.divide(p, q, out=np.zeros_like(p), where=parabolic)
    near_bound = ((xf + step - a) < tol2) | ((b - (xf + step)) < tol2)
    toward_middle = np.sign(xm - xf) + ((xm - xf) == 0)
    e = np.where(parabolic, rat, np.where(xf >= xm, a - xf, b - xf))
    rat = np.where(parabolic, np.where(near_bound, tol1 * toward_middle, step), _GOLDEN_MEAN * e)
    x = xf + (np.sign(rat) + (rat == 0)) * np.maximum(np.abs(rat), tol1)
    return x, rat, e


def _brent_update(x, fu, a, b, xf, fx, nfc, fnfc, fulc, ffulc):
    """Bounded Brent's bookkeeping after evaluating fu = f(x) (arrays `[k]`, SciPy's names):
    the new (a, b, xf, fx, nfc, fnfc, fulc, ffulc)."""
    better = fu <= fx
    a_new = np.where(better, np.where(x >= xf, xf, a), np.where(x < xf, x, a))
    b_new = np.where(better, np.where(x >= xf, b, xf), np.where(x < xf, b, x))
    second = ~better & ((fu <= fnfc) | (nfc == xf))  # x becomes the second-best point
    third = ~better & ~second & ((fu <= ffulc) | (fulc == xf) | (fulc == nfc))  # x becomes the third
    shift = better | second
    fulc_new = np.where(shift, nfc, np.where(third, x, fulc))
    ffulc_new = np.where(shift, fnfc, np.where(third, fu, ffulc))
    nfc_new = np.where(better, xf, np.where(second, x, nfc))
    fnfc_new = np.where(better, fx, np.where(second, fu, fnfc))
    return a_new, b_new, np.where(better, x, xf), np.where(better, fu, fx), nfc_new, fnfc_new, fulc_new, ffulc_new
