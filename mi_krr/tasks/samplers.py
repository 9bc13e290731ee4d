"""Seeded samplers of in-context regression prompts (`ICLTask`).

A sampler is a frozen dataclass holding the prompt distribution; `sample(...)` draws a batch and
`to_config()` / `sampler_from_config(...)` store and rebuild it (checkpoints keep sampler configs).

Inputs (shared by every sampler): x = input_mean + input_std * U diag(sqrt(s)) g with g ~ N(0, I_d),
s_i = condition_number ** (-i / (d - 1)) for i = 0..d-1 (a geometric spectrum from 1 down to
1 / condition_number) and U a Haar rotation drawn from `rotation_seed`. So
Cov(x) = input_std^2 U diag(s) U^T, whose condition number is exactly `condition_number`
(U is skipped when condition_number == 1).

Randomness: everything is drawn on the CPU in float64 from one `torch.Generator`, then cast to
`dtype` and moved to `device`, so a seed gives bit-identical prompts on every device.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, MISSING, dataclass, fields
from typing import Any, ClassVar

import torch

from mi_krr._validation import (
    SEED_LIMIT, check_choice, check_condition_number, check_count, check_device, check_finite, check_float_dtype, check_non_negative, check_positive, check_seed, store_count,
)
from mi_krr.feature_maps import random_orthogonal
from mi_krr.kernels import kernel_matrix
from mi_krr.tasks.spd import geometric_spectrum
from mi_krr.tasks.task import ICLTask

__all__ = ["LinearRegressionSampler", "GPRegressionSampler", "Sampler", "SAMPLERS", "sampler_from_config"]


def _resolve_generator(seed: int | None, generator: torch.Generator | None) -> tuple[torch.Generator, int | None]:
    """The CPU generator to draw from, and the seed to record (None when the caller's generator is used)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}: pass an int seed as seed=")
        if seed is not None:
            raise ValueError("pass seed or generator, not both")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (draws happen on the CPU), got {generator.device}")
        return generator, None
    if seed is None:
        seed = int(torch.randint(0, SEED_LIMIT, (1,)).item())  # from the global RNG, recorded so the draw can be replayed
    seed = check_seed("seed", seed)
    return torch.Generator().manual_seed(seed), seed


@dataclass(frozen=True)
class _PromptSampler(ABC):
    """Fields shared by every sampler: the input distribution, label noise and prompt length.

    Attributes:
        dim: input dimension d.
        noise_std: std of Gaussian noise added to support labels (query targets stay noise-free).
        input_std: per-coordinate input std before the anisotropic spectrum (None: the sampler's
            default, recorded after construction).
        condition_number: kappa >= 1, the ratio of the largest to the smallest eigenvalue of the
            input covariance (spectrum geometric from 1 down to 1 / kappa, times input_std^2).
        rotation_seed: seed of the Haar rotation U of the covariance eigenbasis.
        input_mean: the mean of x: a float (every coordinate) or a tuple of d floats.
        n_support_factor: `sample(n_support=n)` draws round(n * n_support_factor) support pairs
            (1.0 unless a "longer_prompts" shift is applied).
    """

    name: ClassVar[str]

    dim: int
    _: KW_ONLY
    noise_std: float = 0.0
    input_std: float | None = None
    condition_number: float = 1.0
    rotation_seed: int = 0
    input_mean: float | tuple[float, ...] = 0.0
    n_support_factor: float = 1.0

    def __post_init__(self) -> None:
        store_count(self, "dim", minimum=1)
        self._set("noise_std", check_non_negative("noise_std", self.noise_std))
        input_std = self._default_input_std() if self.input_std is None else self.input_std
        self._set("input_std", check_positive("input_std", input_std))
        kappa = 1.0 if self.condition_number is None else check_condition_number("condition_number", self.condition_number)
        if kappa > 1 and self.dim == 1:
            raise ValueError("condition_number must be 1 when dim == 1: one variance has no ratio")
        self._set("condition_number", kappa)
        store_count(self, "rotation_seed", check=check_seed)
        self._set("input_mean", self._checked_mean(self.input_mean))
        self._set("n_support_factor", check_positive("n_support_factor", self.n_support_factor))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _default_input_std(self) -> float:
        return 1.0

    def _checked_mean(self, mean: Any) -> float | tuple[float, ...]:
        if getattr(mean, "ndim", None) == 0:  # a 0-d tensor or array, e.g. x.mean()
            mean = mean.item()
        wrong_type = f"input_mean must be a float or a sequence of dim={self.dim} floats, got {mean!r}"
        if isinstance(mean, str):  # '1e-1': PyYAML reads 1e-1 as a string
            try:
                mean = float(mean)
            except ValueError:
                raise ValueError(wrong_type) from None
        if isinstance(mean, numbers.Real) and not isinstance(mean, bool):
            return check_finite("input_mean", mean)
        try:
            values = tuple(float(v) for v in mean)
        except (TypeError, ValueError) as exc:
            raise ValueError(wrong_type) from exc
        if len(values) != self.dim or not all(math.isfinite(v) for v in values):
            raise ValueError(f"input_mean must hold dim={self.dim} finite floats, got {len(values)} values")
        return values

    # ----- input distribution -------------------------------------------------------------
    def input_spectrum(self) -> torch.Tensor:
        """Eigenvalues of Cov(x), descending, `[d]` float64: input_std^2 * kappa^(-i/(d-1))."""
        assert self.input_std is not None  # __post_init__ replaces None by the sampler's default
        return self.input_std**2 * geometric_spectrum(self.dim, self.condition_number)

    def input_basis(self) -> torch.Tensor:
        """The eigenbasis U `[d, d]` of Cov(x) (columns, float64): Haar from `rotation_seed`, or I
        when condition_number == 1."""
        if self.condition_number == 1.0:
            return torch.eye(self.dim, dtype=torch.float64)
        return random_orthogonal(self.dim, torch.Generator().manual_seed(self.rotation_seed))

    def input_covariance(self) -> torch.Tensor:
        """Cov(x) = U diag(spectrum) U^T `[d, d]`, float64."""
        basis = self.input_basis()
        return (basis * self.input_spectrum()) @ basis.T

    def input_mean_vector(self) -> torch.Tensor:
        """E[x] `[d]`, float64."""
        return torch.as_tensor(self.input_mean, dtype=torch.float64).expand(self.dim).clone()

    def sample_inputs(self, batch_size: int, n_points: int, generator: torch.Generator) -> torch.Tensor:
        """Inputs `[batch_size, n_points, d]` (float64, CPU) from the input distribution."""
        gaussian = torch.randn(batch_size, n_points, self.dim, generator=generator, dtype=torch.float64)
        scaled = gaussian * self.input_spectrum().sqrt()
        if self.condition_number != 1.0:
            scaled = scaled @ self.input_basis().T
        return scaled + self.input_mean_vector()

    # ----- sampling -----------------------------------------------------------------------
    def sample(
        self,
        batch_size: int,
        n_support: int,
        n_query: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        active_dim: int | None = None,
    ) -> ICLTask:
        """A batch of prompts.

        Args:
            batch_size, n_support, n_query: B, n (scaled by `n_support_factor`), m.
            seed: makes the draw reproducible (bit-identical); None draws a seed from torch's
                global RNG and records it in `info["seed"]`.
            generator: a CPU generator to draw from instead of `seed` (then `info["seed"]` is None).
            device, dtype: where and how the returned tensors live (draws are float64 on the CPU).
            active_dim: dimension curriculum: coordinates >= active_dim of x are set to 0 (after
                the mean and rotation), so labels depend on the first active_dim coordinates only.

        Returns:
            ICLTask with x_support `[B, n, d]`, y_support `[B, n]` (noisy), x_query `[B, m, d]`,
            y_query `[B, m]` (noise-free); info = to_config() plus "seed", "active_dim".
        """
        batch_size = check_count("batch_size", batch_size, minimum=1)
        n_support = check_count("n_support", n_support, minimum=1)
        n_query = check_count("n_query", n_query, minimum=0)
        device = check_device("device", device)
        dtype = check_float_dtype("dtype", dtype)
        if active_dim is not None:
            active_dim = check_count("active_dim", active_dim, minimum=1)
            if active_dim > self.dim:
                raise ValueError(f"active_dim must be <= dim={self.dim}, got {active_dim}")
        generator, recorded_seed = _resolve_generator(seed, generator)
        n_drawn = max(1, round(n_support * self.n_support_factor))

        x = self.sample_inputs(batch_size, n_drawn + n_query, generator)
        if active_dim is not None:
            x[..., active_dim:] = 0.0
        values = self._function_values(x, generator)
        noise = self.noise_std * torch.randn(batch_size, n_drawn, generator=generator, dtype=torch.float64)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        info = {**self.to_config(), "seed": recorded_seed, "active_dim": active_dim}
        return ICLTask(
            x_support=cast(x[:, :n_drawn]),
            y_support=cast(values[:, :n_drawn] + noise),
            x_query=cast(x[:, n_drawn:]),
            y_query=cast(values[:, n_drawn:]),
            info=info,
        )

    @abstractmethod
    def _function_values(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-free labels f(x) `[B, N]` of one random function per prompt, x `[B, N, d]`."""

    # ----- configuration ------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description: {"sampler": name, <every field>}."""
        config: dict[str, Any] = {"sampler": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
        return config


@dataclass(frozen=True)
class LinearRegressionSampler(_PromptSampler):
    """Noisy linear regression: w ~ N(0, I_d / d) per prompt, y = x . w (+ noise on support).

    Inputs default to N(0, I_d) (input_std=1.0), so Var(x . w) = 1 when isotropic. The weights are
    not stored in the task: with n_query >= d they are recovered exactly from the query pairs.
    """

    name: ClassVar[str] = "linear_regression"

    def _function_values(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch_size = x.shape[0]
        weights = torch.randn(batch_size, self.dim, generator=generator, dtype=torch.float64) / math.sqrt(self.dim)
        return torch.einsum("bnd,bd->bn", x, weights)


@dataclass(frozen=True)
class GPRegressionSampler(_PromptSampler):
    """Gaussian-process regression: f ~ GP(0, k) drawn jointly on support and query points.

    Inputs default to N(0, I_d / d) (input_std = 1/sqrt(d)), so |x| ~ 1 and the default kernels
    (Gaussian with bandwidth 1, or exp with temperature 1) vary on the scale of the data.

    Attributes (beyond the shared ones):
        kernel: "gaussian" (exp(-|x - z|^2 / (2 bandwidth^2))) or "exp" (exp(x . z / temperature)).
        bandwidth: Gaussian length scale (used by kernel="gaussian").
        temperature: exp-kernel temperature (used by kernel="exp").
        noise_std: default 0.1.
        jitter: relative diagonal jitter: the Cholesky factor is that of
            K + jitter * mean(diag K) * I, computed in float64 (default 1e-8).
    """

    name: ClassVar[str] = "gp_regression"

    noise_std: float = 0.1
    kernel: str = "gaussian"
    bandwidth: float = 1.0
    temperature: float = 1.0
    jitter: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("kernel", self.kernel, ("gaussian", "exp"))
        self._set("bandwidth", check_positive("bandwidth", self.bandwidth))
        self._set("temperature", check_positive("temperature", self.temperature))
        self._set("jitter", check_non_negative("jitter", self.jitter))

    def _default_input_std(self) -> float:
        return 1.0 / math.sqrt(self.dim)

    def kernel_params(self) -> dict[str, float]:
        """The keyword parameters of `kernel` for `mi_krr.kernels.kernel_matrix`."""
        return {"bandwidth": self.bandwidth} if self.kernel == "gaussian" else {"temperature": self.temperature}

    def covariance(self, x: torch.Tensor) -> torch.Tensor:
        """The prior covariance of f at `x [..., N, d]`: kernel matrix + jitter, `[..., N, N]` float64."""
        gram = kernel_matrix(self.kernel, self._checked_inputs(x).to(torch.float64), None, **self.kernel_params())
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
        return gram + (self.jitter * scale)[..., None, None] * eye

    def sample_functions(
        self, x: torch.Tensor, seed: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One GP draw per leading index at fixed inputs `x [..., N, d]` -> f `[..., N]` float64.

        f = L g with L the Cholesky factor of `covariance(x)` and g ~ N(0, I) from the generator.
        """
        generator, _ = _resolve_generator(seed, generator)
        return self._function_values(self._checked_inputs(x), generator)

    def _checked_inputs(self, x: Any) -> torch.Tensor:
        """`x` as a tensor, after checking it is `[..., N, d]` with this sampler's d."""
        x = torch.as_tensor(x)
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., N, d={self.dim}] (this sampler's dim), got shape {tuple(x.shape)}")
        return x

    def _function_values(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        covariance = self.covariance(x)  # an exp kernel that overflows is refused by exp_kernel, naming temperature
        factor, info = torch.linalg.cholesky_ex(covariance)
        if (info != 0).any():
            (scale,) = self.kernel_params()
            raise ValueError(
                f"the {self.kernel} kernel matrix is not numerically positive definite at jitter={self.jitter}: "
                f"raise jitter, or lower {scale} (at a large {scale} every entry of K tends to 1)"
            )
        gaussian = torch.randn(factor.shape[:-1], generator=generator, dtype=torch.float64)
        return (factor @ gaussian.to(factor.device).unsqueeze(-1)).squeeze(-1)


Sampler = LinearRegressionSampler | GPRegressionSampler

SAMPLERS: dict[str, type[Sampler]] = {
    LinearRegressionSampler.name: LinearRegressionSampler,
    GPRegressionSampler.name: GPRegressionSampler,
}


def sampler_from_config(config: dict[str, Any]) -> Sampler:
    """Rebuild a sampler from `to_config()` output (e.g. read back from a checkpoint's JSON)."""
    if not isinstance(config, dict) or "sampler" not in config:
        raise ValueError("config must be a dict with a 'sampler' key, as written by sampler.to_config()")
    kwargs = dict(config)
    cls = SAMPLERS[check_choice("config['sampler']", kwargs.pop("sampler"), tuple(SAMPLERS))]
    unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"config has keys {cls.__name__} does not take: {', '.join(unknown)}")
    missing = sorted(f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs)
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}, which {cls.__name__} needs: rebuild it from sampler.to_config()")
    return cls(**kwargs)
