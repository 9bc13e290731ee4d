"""Finite-width feature maps phi: R^d -> R^m whose inner products estimate (or equal) a kernel.

A head of width m can only compute phi(x) . phi(z) for some m-dimensional phi; these maps say
which phi, and how well phi(x) phi(z)^T approximates the kernel as m grows.

Every pointwise map is a frozen dataclass with `in_dim` (d), `out_dim` (m) and `__call__(x [..., d])
-> [..., m]` that keeps x's dtype and device. Random weights are drawn once, on the CPU in float64
from `seed`, so the same seed gives the same map on every device.

`ProjectedKernelFeatures` is a `PromptFeatureMap`: its features are computed jointly over one
prompt's points (a rank-m projection of the kernel's exact feature space on that prompt), so it
has `prompt_features(points [..., N, d]) -> [..., N, m]` instead of a pointwise `__call__`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from mi_krr._repr import compact_repr
from mi_krr._validation import check_choice, check_positive, check_seed, store_count
from mi_krr.kernels import KERNEL_NAMES, _as_points, _point_pair, kernel_matrix, kernel_parameters

__all__ = [
    "FeatureMap",
    "PromptFeatureMap",
    "ProjectedKernelFeatures",
    "RandomProjection",
    "PositiveRandomFeatures",
    "LinearFeatures",
    "exact_feature_map",
    "approximate_kernel",
    "random_orthogonal",
]


@runtime_checkable
class FeatureMap(Protocol):
    """Anything mapping `[..., in_dim]` to `[..., out_dim]`, with the kernel its features give."""

    @property
    def in_dim(self) -> int: ...

    @property
    def out_dim(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def kernel(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class PromptFeatureMap(Protocol):
    """Features computed jointly over one prompt's N points (support and query together): a
    point's features depend on the other points of its prompt, so there is no pointwise call.

    `prompt_features(points [..., N, in_dim]) -> [..., N, out_dim]`; `gram(points)` is
    features @ features^T `[..., N, N]`, the kernel a head of width out_dim computes on the prompt.
    """

    @property
    def in_dim(self) -> int: ...

    @property
    def out_dim(self) -> int: ...

    def prompt_features(self, points: torch.Tensor) -> torch.Tensor: ...

    def gram(self, points: torch.Tensor) -> torch.Tensor: ...


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix `[dim, dim]` (float64, CPU) drawn from `generator`.

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q, so the law is exactly
    uniform over the orthogonal group.
    """
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _gaussian_directions(d: int, m: int, seed: int, orthogonal: bool) -> torch.Tensor:
    """Columns w_1..w_m `[d, m]`, each marginally N(0, I_d).

    With `orthogonal`, columns come in blocks of d that are exactly orthogonal (Haar directions,
    lengths drawn independently from the chi_d law), which lowers the estimator's variance while
    keeping every column N(0, I_d), hence keeping E[W W^T] = m I.
    """
    generator = torch.Generator().manual_seed(seed)
    if not orthogonal:
        return torch.randn(d, m, generator=generator, dtype=torch.float64)
    blocks = []
    for start in range(0, m, d):
        width = min(d, m - start)
        directions = random_orthogonal(d, generator)[:, :width]
        lengths = torch.randn(d, width, generator=generator, dtype=torch.float64).norm(dim=0)
        blocks.append(directions * lengths)
    return torch.cat(blocks, dim=1)


def _check_map_input(x: torch.Tensor, in_dim: int) -> torch.Tensor:
    x = _as_points("x", x, min_dim=1)
    if x.shape[-1] != in_dim:
        raise ValueError(f"x must have feature dimension in_dim={in_dim}, got {x.shape[-1]}")
    return x


@dataclass(frozen=True)
class RandomProjection:
    """phi(x) = x W / sqrt(m) with W `[d, m]` standard Gaussian, so E[phi(x) . phi(z)] = x . z.

    The rank-m projection of the linear kernel: `kernel(x, z)` = x W W^T z^T / m.

    Attributes:
        d: input dimension. m: output width (the head width). seed: draws W.
        orthogonal: draw W's columns in blocks of d exactly orthogonal ones (still each
            N(0, I_d), so still unbiased; see `_gaussian_directions`).
        weights: W `[d, m]`, float64 on the CPU.
    """

    __repr__ = compact_repr

    d: int
    m: int
    seed: int = 0
    orthogonal: bool = False
    weights: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        store_count(self, "d", minimum=1)
        store_count(self, "m", minimum=1)
        store_count(self, "seed", check=check_seed)
        object.__setattr__(self, "weights", _gaussian_directions(self.d, self.m, self.seed, self.orthogonal))

    @property
    def in_dim(self) -> int:
        return self.d

    @property
    def out_dim(self) -> int:
        return self.m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., d]` -> `[..., m]`."""
        x = _check_map_input(x, self.d)
        features = x @ self.weights.to(device=x.device, dtype=x.dtype) / math.sqrt(self.m)
        return features

    def kernel(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The projected linear kernel phi(x) phi(z)^T, `[..., n, d]`, `[..., k, d]` -> `[..., n, k]`."""
        return approximate_kernel(x, z, self)


@dataclass(frozen=True)
class PositiveRandomFeatures:
    """Positive random features whose inner products are unbiased for the exp or Gaussian kernel.

    kind="exp": phi(x) = exp(w . x' - |x'|^2 / 2) / sqrt(m) per column w of W, x' = x / sqrt(tau),
    so E[phi(x) . phi(z)] = exp(x . z / tau) (E exp(w . u) = exp(|u|^2 / 2) for w ~ N(0, I)).

    kind="gaussian": the same with tau = bandwidth^2 and an extra exp(-|x|^2 / (2 bandwidth^2)) on
    each side, i.e. phi(x) = exp(w . x' - |x'|^2) / sqrt(m) with x' = x / bandwidth, so
    E[phi(x) . phi(z)] = exp(-|x - z|^2 / (2 bandwidth^2)).

    Attributes:
        d, m, seed: input dimension, number of features, seed of W `[d, m]`.
        kind: "exp" or "gaussian".
        temperature: tau for kind="exp" (default 1.0); must be None for "gaussian".
        bandwidth: sigma for kind="gaussian" (default 1.0); must be None for "exp".
        orthogonal: orthogonal random features (blocks of exactly orthogonal w's), still unbiased.
        weights: W `[d, m]`, float64 on the CPU.
    """

    __repr__ = compact_repr

    d: int
    m: int
    kind: str = "exp"
    temperature: float | None = None
    bandwidth: float | None = None
    seed: int = 0
    orthogonal: bool = False
    weights: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        store_count(self, "d", minimum=1)
        store_count(self, "m", minimum=1)
        store_count(self, "seed", check=check_seed)
        check_choice("kind", self.kind, ("exp", "gaussian"))
        if self.kind == "exp":
            if self.bandwidth is not None:
                raise ValueError("bandwidth applies to kind='gaussian' only: set temperature for kind='exp'")
            temperature = 1.0 if self.temperature is None else self.temperature
            object.__setattr__(self, "temperature", check_positive("temperature", temperature))
        else:
            if self.temperature is not None:
                raise ValueError("temperature applies to kind='exp' only: set bandwidth for kind='gaussian'")
            bandwidth = 1.0 if self.bandwidth is None else self.bandwidth
            object.__setattr__(self, "bandwidth", check_positive("bandwidth", bandwidth))
        object.__setattr__(self, "weights", _gaussian_directions(self.d, self.m, self.seed, self.orthogonal))

    @property
    def in_dim(self) -> int:
        return self.d

    @property
    def out_dim(self) -> int:
        return self.m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., d]` -> positive features `[..., m]`."""
        x = _check_map_input(x, self.d)
        if self.kind == "exp":
            assert self.temperature is not None  # __post_init__ sets it for kind="exp"
            scaled, norm_weight = x / math.sqrt(self.temperature), 0.5
        else:
            assert self.bandwidth is not None  # __post_init__ sets it for kind="gaussian"
            scaled, norm_weight = x / self.bandwidth, 1.0
        projections = scaled @ self.weights.to(device=x.device, dtype=x.dtype)
        log_features = projections - norm_weight * (scaled * scaled).sum(-1, keepdim=True)
        features = torch.exp(log_features) / math.sqrt(self.m)
        return features

    def kernel(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The estimate phi(x) phi(z)^T `[..., n, k]` of `target_kernel(x, z)`."""
        return approximate_kernel(x, z, self)

    def target_kernel(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The exact kernel these features estimate, `[..., n, d]`, `[..., k, d]` -> `[..., n, k]`."""
        if self.kind == "exp":
            assert self.temperature is not None  # __post_init__ sets it for kind="exp"
            return kernel_matrix("exp", x, z, temperature=self.temperature)
        assert self.bandwidth is not None  # __post_init__ sets it for kind="gaussian"
        return kernel_matrix("gaussian", x, z, bandwidth=self.bandwidth)


@dataclass(frozen=True)
class LinearFeatures:
    """The exact feature map of the linear kernel: phi(x) = x, width m = d."""

    d: int

    def __post_init__(self) -> None:
        store_count(self, "d", minimum=1)

    @property
    def in_dim(self) -> int:
        return self.d

    @property
    def out_dim(self) -> int:
        return self.d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., d]` -> `x [..., d]` (checked)."""
        x = _check_map_input(x, self.d)
        return x

    def kernel(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """phi(x) phi(z)^T, equal to the linear kernel."""
        return approximate_kernel(x, z, self)


PROJECTIONS: tuple[str, ...] = ("gaussian", "top")


@dataclass(frozen=True)
class ProjectedKernelFeatures:
    """A rank-m projection of a kernel's own feature space on each prompt (a `PromptFeatureMap`).

    On a prompt's N points, Phi = K^(1/2) `[N, N]` (the symmetric square root of the joint kernel
    matrix K, from a float64 eigendecomposition with rounding-negative eigenvalues clipped to 0)
    is an exact feature map: Phi Phi^T = K. The head sees m columns of it:

    projection="gaussian": Phi R / sqrt(m) with R `[N, m]` standard Gaussian, one independent R
        per prompt of a batch (`sketch`), so E[gram] = K: an unbiased random rank-m head, whose
        error at m >= N is still the sketch's variance (R R^T / m != I).
    projection="top": U_m diag(mu_m)^(1/2) over the m largest eigenpairs (mu, U) of K, so gram is
        K's best rank-m approximation (Eckart-Young: its Frobenius error is the root of the sum
        of the squared discarded eigenvalues). That is the closest rank-m kernel, not the rank-m
        head with the smallest KRR prediction error (which can rise with m at a small ridge).
        For m >= N it is exact (columns beyond N are 0).

    Attributes:
        kernel: "linear", "exp" or "gaussian" (`mi_krr.kernels.kernel_matrix`).
        d: input dimension. m: width (the head width).
        projection: "gaussian" or "top".
        temperature, bandwidth: the kernel's parameter (default 1.0 where the kernel takes it;
            must be None where it does not).
        seed: draws the sketches.
    """

    kernel: str
    d: int
    m: int
    projection: str = "gaussian"
    temperature: float | None = None
    bandwidth: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("kernel", self.kernel, KERNEL_NAMES)
        store_count(self, "d", minimum=1)
        store_count(self, "m", minimum=1)
        check_choice("projection", self.projection, PROJECTIONS)
        store_count(self, "seed", check=check_seed)
        takes = kernel_parameters(self.kernel)
        for name in ("temperature", "bandwidth"):
            value = getattr(self, name)
            if name in takes:
                object.__setattr__(self, name, check_positive(name, 1.0 if value is None else value))
            elif value is not None:
                raise ValueError(f"{name} does not apply to kernel {self.kernel!r}: leave it None")

    @property
    def in_dim(self) -> int:
        return self.d

    @property
    def out_dim(self) -> int:
        return self.m

    @property
    def kernel_params(self) -> dict[str, float]:
        """The kernel's keyword parameters for `kernel_matrix`."""
        return {name: getattr(self, name) for name in kernel_parameters(self.kernel)}

    def sketch(self, batch_shape: tuple[int, ...], n_points: int) -> torch.Tensor:
        """The standard Gaussian R `[*batch_shape, n_points, m]` (float64, CPU) that
        projection="gaussian" uses on a batch of prompts of `n_points` points (one per prompt)."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(*batch_shape, n_points, self.m, generator=generator, dtype=torch.float64)

    def prompt_features(self, points: torch.Tensor) -> torch.Tensor:
        """Features of every point of each prompt, `points [..., N, d]` -> `[..., N, m]` (points'
        dtype and device; computed in float64)."""
        points = _as_points("points", points)
        if points.shape[-1] != self.d:
            raise ValueError(f"points must have feature dimension in_dim={self.d}, got {points.shape[-1]}")
        K = kernel_matrix(self.kernel, points.to(torch.float64), None, **self.kernel_params)
        eigenvalues, eigenvectors = torch.linalg.eigh((K + K.mT) / 2)  # ascending
        scaled = eigenvectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(-2)  # U diag(mu)^(1/2)
        n_points = points.shape[-2]
        if self.projection == "top":
            kept = scaled.flip(-1)[..., : self.m]  # largest eigenvalue first
            features = torch.nn.functional.pad(kept, (0, self.m - kept.shape[-1]))
        else:
            root = scaled @ eigenvectors.mT  # K^(1/2), free of eigenvector sign conventions
            R = self.sketch(tuple(points.shape[:-2]), n_points).to(points.device)
            features = root @ R / math.sqrt(self.m)
        return features.to(points.dtype)

    def gram(self, points: torch.Tensor) -> torch.Tensor:
        """The head's kernel on each prompt, `points [..., N, d]` -> `[..., N, N]`."""
        features = self.prompt_features(points)
        return features @ features.mT


def exact_feature_map(kernel: str, d: int) -> LinearFeatures:
    """The finite exact feature map of `kernel` on R^d: `LinearFeatures(d)` for "linear".

    "exp" and "gaussian" have no finite-dimensional exact map; the error names the random-feature
    approximation to use instead.
    """
    check_choice("kernel", kernel, KERNEL_NAMES)
    if kernel != "linear":
        raise ValueError(
            f"kernel {kernel!r} has no finite exact feature map: use PositiveRandomFeatures(d, m, kind={kernel!r})"
        )
    return LinearFeatures(d)


def approximate_kernel(x: torch.Tensor, z: torch.Tensor | None, feature_map: FeatureMap) -> torch.Tensor:
    """phi(x) phi(z)^T for `x [..., n, d]`, `z [..., k, d]` (None: z = x) -> `[..., n, k]`."""
    x, z = _point_pair(x, z)
    phi_x = feature_map(x)
    phi_z = phi_x if z is x else feature_map(z)
    return phi_x @ phi_z.mT
