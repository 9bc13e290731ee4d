"""Kernel matrices and their spectral summaries, batched over leading dimensions.

Every kernel maps points `x [..., n, d]` and `z [..., m, d]` (leading dimensions broadcast) to
`[..., n, m]`; `z=None` means `z = x`. Inputs stay on their device and in their dtype; pass
float64 where the result is a reference.

Finite-width feature maps (`RandomProjection`, `PositiveRandomFeatures`, `LinearFeatures`,
`exact_feature_map`, `approximate_kernel`, `random_orthogonal`) live in `mi_krr.feature_maps` and
are re-exported here.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np
import torch

from mi_krr._validation import as_float64, check_choice, check_positive, symmetry_rtol

KERNEL_NAMES: tuple[str, ...] = ("linear", "exp", "gaussian")

_FEATURE_MAP_NAMES = (
    "RandomProjection",
    "PositiveRandomFeatures",
    "LinearFeatures",
    "exact_feature_map",
    "approximate_kernel",
    "random_orthogonal",
    "PromptFeatureMap",
    "ProjectedKernelFeatures",
)

__all__ = [
    "KERNEL_NAMES",
    "linear_kernel",
    "exp_kernel",
    "gaussian_kernel",
    "kernel_matrix",
    "kernel_parameters",
    "effective_dimension",
    "condition_number",
    *_FEATURE_MAP_NAMES,
]


def _as_points(name: str, value: Any, min_dim: int = 2) -> torch.Tensor:
    """`value` as a floating tensor of points `[..., n, d]` (at least `min_dim` dimensions), checked
    finite; dtype and device kept."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{name} must be numeric points [..., n, d] (a tensor, or an array / nested list of numbers with equal-length rows), "
                f"got a {type(value).__name__} NumPy cannot read as one: {exc}"
            ) from exc
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}: call .double() first")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions [..., d], got shape {tuple(value.shape)}")
    if not torch.isfinite(value.detach()).all():
        raise ValueError(f"{name} contains NaN or inf: drop those points or replace them with finite values before computing a kernel (every point is read)")
    return value


def _point_pair(x: Any, z: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_points("x", x)
    if z is None:
        return x, x
    z = _as_points("z", z)
    if z.shape[-1] != x.shape[-1]:
        raise ValueError(f"z must have the feature dimension of x ({x.shape[-1]}), got {z.shape[-1]}")
    if z.dtype != x.dtype:
        raise ValueError(f"z must have the dtype of x ({x.dtype}), got {z.dtype}: cast one of them")
    if z.device != x.device:
        raise ValueError(f"z must be on the device of x ({x.device}), got {z.device}")
    try:
        torch.broadcast_shapes(x.shape[:-2], z.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"z's leading (batch) shape {tuple(z.shape[:-2])} does not broadcast with x's {tuple(x.shape[:-2])}: "
            "give z the batch shape of x, or none (one set of points for every batch)"
        ) from exc
    return x, z


def linear_kernel(x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """k(x, z) = x . z for `x [..., n, d]`, `z [..., m, d]` -> `[..., n, m]`."""
    x, z = _point_pair(x, z)
    return x @ z.mT


def exp_kernel(x: torch.Tensor, z: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """k(x, z) = exp(x . z / temperature) -> `[..., n, m]`: the similarity softmax attention induces.

    x . z / temperature above log(largest float) overflows: 88.7 in float32, 709.8 in float64.
    Such inputs raise a ValueError naming temperature (use float64, a larger temperature, or
    smaller inputs).
    """
    temperature = check_positive("temperature", temperature)
    x, z = _point_pair(x, z)
    exponent = (x @ z.mT) / temperature
    kernel = torch.exp(exponent)
    if not bool(torch.isfinite(kernel.detach()).all()):
        raise ValueError(
            f"exp_kernel overflows {x.dtype}: x . z / temperature reaches {float(exponent.detach().max()):.4g}, "
            f"above log(largest {x.dtype}) = {math.log(torch.finfo(x.dtype).max):.4g}: raise temperature, "
            "shrink the inputs, or pass float64 points"
        )
    return kernel


def gaussian_kernel(x: torch.Tensor, z: torch.Tensor | None = None, bandwidth: float = 1.0) -> torch.Tensor:
    """k(x, z) = exp(-|x - z|^2 / (2 bandwidth^2)) -> `[..., n, m]`.

    Squared distances are formed as |x|^2 + |z|^2 - 2 x.z after centring both point sets on the
    mean of x (which removes the cancellation that a common offset would cause) and clamped at 0;
    with `z=None` the diagonal is exactly 1.
    """
    bandwidth = check_positive("bandwidth", bandwidth)
    same_points = z is None
    x, z = _point_pair(x, z)
    centre = x.mean(dim=-2, keepdim=True)
    x_c, z_c = x - centre, (x - centre) if same_points else (z - centre)
    sq_dist = (x_c * x_c).sum(-1).unsqueeze(-1) + (z_c * z_c).sum(-1).unsqueeze(-2) - 2.0 * (x_c @ z_c.mT)
    sq_dist = sq_dist.clamp_min(0.0)
    if same_points:
        n = x.shape[-2]
        sq_dist = sq_dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)
    return torch.exp(-sq_dist / (2.0 * bandwidth**2))


_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "linear": (linear_kernel, ()),
    "exp": (exp_kernel, ("temperature",)),
    "gaussian": (gaussian_kernel, ("bandwidth",)),
}


def kernel_parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters kernel `name` takes, e.g. ("bandwidth",) for "gaussian"."""
    return _KERNELS[check_choice("kernel", name, KERNEL_NAMES)][1]


def kernel_defaults(name: str) -> dict[str, float]:
    """The default value of each keyword parameter of kernel `name`, e.g. {"bandwidth": 1.0}."""
    function, allowed = _KERNELS[check_choice("kernel", name, KERNEL_NAMES)]
    signature = inspect.signature(function)
    return {parameter: float(signature.parameters[parameter].default) for parameter in allowed}


def kernel_matrix(name: str, x: torch.Tensor, z: torch.Tensor | None = None, **params: float) -> torch.Tensor:
    """The kernel called `name` ("linear" | "exp" | "gaussian") between `x [..., n, d]` and
    `z [..., m, d]` -> `[..., n, m]`; `params` are that kernel's keywords (temperature, bandwidth).
    """
    function, allowed = _KERNELS[check_choice("kernel", name, KERNEL_NAMES)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise ValueError(f"kernel {name!r} takes {takes}; got unexpected {', '.join(unknown)}")
    return function(x, z, **params)


def _symmetric_float64(K: Any) -> torch.Tensor:
    rtol = symmetry_rtol(K)
    K = as_float64("K", K, min_dim=2)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square [..., n, n], got shape {tuple(K.shape)}")
    scale = K.abs().amax((-2, -1)).clamp_min(1e-300)  # each matrix at its own scale
    if ((K - K.mT).abs().amax((-2, -1)) > rtol * scale).any():
        raise ValueError("K must be symmetric: pass (K + K.mT) / 2 if the asymmetry is rounding")
    return (K + K.mT) / 2


PSD_RTOL = 1e-6
"""`effective_dimension` treats eigenvalues down to -PSD_RTOL x the largest as rounding of a PSD K
(a float32 kernel's included) and refuses K below that."""


def _ridge(lam: Any, K: torch.Tensor) -> torch.Tensor:
    """lam as float64 on K's device, after checking it broadcasts against K's batch `K.shape[:-2]`."""
    lam = as_float64("lam", lam).to(K.device)
    try:
        torch.broadcast_shapes(K.shape[:-2], lam.shape)
    except RuntimeError:
        raise ValueError(
            f"lam of shape {tuple(lam.shape)} does not broadcast against K's batch {tuple(K.shape[:-2])}: "
            "pass one number, or a tensor broadcasting against it (e.g. lam[:, None] for a sweep)"
        ) from None
    return lam


def effective_dimension(K: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """d_eff(lam) = tr K (K + lam I)^-1 = sum_i mu_i / (mu_i + lam) over the eigenvalues mu_i of K.

    Args:
        K: symmetric PSD matrices `[..., n, n]` (eigenvalues below 0 from rounding, down to
            -`PSD_RTOL` times the largest, are clamped to 0; below that K is refused).
        lam: ridge > 0, a float or a float64-castable tensor broadcasting against `K.shape[:-2]`
            (e.g. `lam[:, None]` against a batch `[B]` gives a sweep `[L, B]`).

    Returns:
        float64 tensor `broadcast(K.shape[:-2], lam.shape)`, between 0 and rank(K).
    """
    K = _symmetric_float64(K)
    lam = _ridge(lam, K)
    if (lam <= 0).any():
        raise ValueError("lam must be > 0: d_eff is defined for a positive ridge")
    eigenvalues = torch.linalg.eigvalsh(K)
    relative = eigenvalues / eigenvalues.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    if (relative < -PSD_RTOL).any():
        smallest = float(relative.min())
        raise ValueError(f"K must be positive semi-definite (a kernel matrix); its smallest eigenvalue is {smallest:.3g} x its largest")
    eigenvalues = eigenvalues.clamp_min(0.0)
    return (eigenvalues / (eigenvalues + lam.unsqueeze(-1))).sum(-1)


def condition_number(K: torch.Tensor, lam: float | torch.Tensor = 0.0) -> torch.Tensor:
    """2-norm condition number of K + lam I for symmetric `K [..., n, n]` -> float64 `[...]`.

    Computed from eigenvalues as max |mu_i + lam| / min |mu_i + lam| (inf for a singular matrix);
    `lam >= 0`, a float or a tensor broadcasting against `K.shape[:-2]`.
    """
    K = _symmetric_float64(K)
    lam = _ridge(lam, K)
    if (lam < 0).any():
        raise ValueError(f"lam must be >= 0 (a ridge), got {float(lam.min())}")
    moduli = (torch.linalg.eigvalsh(K) + lam.unsqueeze(-1)).abs()
    smallest = moduli.amin(-1)
    return torch.where(smallest > 0, moduli.amax(-1) / smallest, torch.inf)


def __getattr__(name: str) -> Any:
    # Feature maps are re-exported lazily: mi_krr.feature_maps imports this module.
    if name in _FEATURE_MAP_NAMES:
        from mi_krr import feature_maps

        return getattr(feature_maps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
