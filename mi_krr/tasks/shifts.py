"""Distribution shifts for out-of-distribution prompts.

`apply_shift(sampler, shift)` returns a new sampler of the same class with changed fields, so a
shifted sampler is an ordinary sampler: it samples, prints and round-trips through
`to_config()` / `sampler_from_config()` like any other, and its config says what changed.

Shift kinds (`Shift.kind`, and the keys of `Shift.params` each takes):
    input_scale (factor): x -> factor * x (input_std and input_mean are multiplied).
    mean_shift (offset): x -> x + mu with mu = offset * input_std on every coordinate (offset in
        units of the sampler's per-coordinate input std, so |mu| = offset * input_std * sqrt(d)).
    anisotropy (condition_number): input covariance spectrum geometric from 1 to 1/kappa.
    covariance_rotation (rotation_seed): the same spectrum in a different Haar eigenbasis; needs an
        anisotropic sampler (condition_number > 1) and a rotation_seed different from its own.
    longer_prompts (factor): n_support_factor *= factor, so sample(n_support=n) draws
        round(factor * n) support pairs.
    bandwidth (factor): GP samplers only: the kernel's length scale times factor (bandwidth *=
        factor for "gaussian"; temperature *= factor^2 for "exp", the same rescaling x -> x/factor).
    label_noise (noise_std): support-label noise std set to noise_std.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

from mi_krr._validation import check_choice, check_count, check_positive
from mi_krr._validation import check_condition_number, check_finite, check_non_negative
from mi_krr.tasks.samplers import GPRegressionSampler, Sampler

__all__ = [
    "SHIFT_KINDS", "Shift", "apply_shift", "shift_applies", "why_shift_does_not_apply", "applicable_shifts", "DEFAULT_SHIFTS",
]

# kind -> (its one parameter, the check that parameter gets)
_SHIFT_PARAMS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "input_scale": ("factor", check_positive),
    "mean_shift": ("offset", check_finite),
    "anisotropy": ("condition_number", check_condition_number),
    "covariance_rotation": ("rotation_seed", check_count),
    "longer_prompts": ("factor", check_positive),
    "bandwidth": ("factor", check_positive),
    "label_noise": ("noise_std", check_non_negative),
}
SHIFT_KINDS: tuple[str, ...] = tuple(_SHIFT_PARAMS)


@dataclass(frozen=True)
class Shift:
    """One distribution shift: `kind` (see module docstring) and its single parameter in `params`,
    e.g. Shift("input_scale", {"factor": 2.0})."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, SHIFT_KINDS)
        expected, check = _SHIFT_PARAMS[self.kind]
        if not isinstance(self.params, Mapping) or set(self.params) != {expected}:
            raise ValueError(f"Shift {self.kind!r} takes params {{{expected!r}: ...}}, got {self.params!r}")
        object.__setattr__(self, "params", MappingProxyType({expected: check(expected, self.params[expected])}))

    def __hash__(self) -> int:
        """Equal shifts (same kind and value) hash alike; the `params` view itself has no hash."""
        return hash((self.kind, self.value))

    def __reduce__(self) -> tuple[type["Shift"], tuple[str, dict[str, Any]]]:
        """Pickle and deep-copy through the constructor: the read-only `params` view cannot be
        pickled itself."""
        return type(self), (self.kind, dict(self.params))

    @property
    def value(self) -> Any:
        """The shift's one parameter."""
        return self.params[_SHIFT_PARAMS[self.kind][0]]

    def to_config(self) -> dict[str, Any]:
        """{"kind": ..., "params": {...}}, JSON-serialisable."""
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Shift":
        """Rebuild a shift from `to_config()` output."""
        if not isinstance(config, Mapping) or set(config) != {"kind", "params"}:
            raise ValueError(f"config must be {{'kind': ..., 'params': {{...}}}} as written by Shift.to_config(), got {config!r}")
        return cls(kind=config["kind"], params=config["params"])


def _check_sampler(sampler: Any) -> None:
    """ValueError naming `sampler` unless it is a sampler instance (not its config dict, nor its class)."""
    if not isinstance(sampler, Sampler):
        given = f"the class {sampler.__name__}" if isinstance(sampler, type) else type(sampler).__name__
        raise ValueError(
            f"sampler must be a LinearRegressionSampler or GPRegressionSampler instance, got {given}: "
            "rebuild one from its config dict with sampler_from_config(config)"
        )


def why_shift_does_not_apply(sampler: Sampler, shift: Shift | str) -> str | None:
    """Why `apply_shift(sampler, shift)` would raise (e.g. "the bandwidth shift needs a GP
    sampler ..."), or None when the shift applies."""
    _check_sampler(sampler)
    shift = _as_shift(shift)
    if shift.kind == "anisotropy" and sampler.dim == 1 and shift.value != 1.0:
        return "the anisotropy shift needs inputs of dim >= 2 (one coordinate has no covariance spectrum to stretch)"
    if shift.kind == "bandwidth" and not isinstance(sampler, GPRegressionSampler):
        return f"the bandwidth shift needs a GP sampler (a kernel), got {type(sampler).__name__}"
    if shift.kind == "covariance_rotation":
        if sampler.condition_number == 1.0:
            return "covariance_rotation needs anisotropic inputs: apply an 'anisotropy' shift or set condition_number > 1"
        if shift.value == sampler.rotation_seed:
            return f"covariance_rotation's rotation_seed equals the sampler's ({sampler.rotation_seed}): pick another"
    return None


def shift_applies(sampler: Sampler, shift: Shift | str) -> bool:
    """Whether `apply_shift(sampler, shift)` is defined (e.g. bandwidth needs a GP sampler)."""
    return why_shift_does_not_apply(sampler, shift) is None


def apply_shift(sampler: Sampler, shift: Shift | str) -> Sampler:
    """A new sampler of the same class drawing the shifted distribution (see module docstring).
    `shift`: a `Shift`, or the label of one of `DEFAULT_SHIFTS` (e.g. "input_scale_x2")."""
    shift = _as_shift(shift)
    reason = why_shift_does_not_apply(sampler, shift)
    if reason is not None:
        raise ValueError(reason)
    value = shift.value
    if shift.kind == "input_scale":
        mean = sampler.input_mean
        scaled_mean = tuple(value * m for m in mean) if isinstance(mean, tuple) else value * mean
        return replace(sampler, input_std=value * sampler.input_std, input_mean=scaled_mean)
    if shift.kind == "mean_shift":
        step = value * sampler.input_std
        mean = sampler.input_mean
        return replace(sampler, input_mean=tuple(m + step for m in mean) if isinstance(mean, tuple) else mean + step)
    if shift.kind == "anisotropy":
        return replace(sampler, condition_number=value)
    if shift.kind == "covariance_rotation":
        return replace(sampler, rotation_seed=value)
    if shift.kind == "longer_prompts":
        return replace(sampler, n_support_factor=value * sampler.n_support_factor)
    if shift.kind == "bandwidth":
        assert isinstance(sampler, GPRegressionSampler)  # why_shift_does_not_apply refuses any other
        if sampler.kernel == "gaussian":
            return replace(sampler, bandwidth=value * sampler.bandwidth)
        return replace(sampler, temperature=value**2 * sampler.temperature)
    return replace(sampler, noise_std=value)


DEFAULT_SHIFTS: Mapping[str, Shift] = MappingProxyType(
    {
        "input_scale_x2": Shift("input_scale", {"factor": 2.0}),
        "input_scale_x0.5": Shift("input_scale", {"factor": 0.5}),
        "mean_shift_1std": Shift("mean_shift", {"offset": 1.0}),
        "anisotropy_kappa10": Shift("anisotropy", {"condition_number": 10.0}),
        "covariance_rotation": Shift("covariance_rotation", {"rotation_seed": 1_000_003}),
        "longer_prompts_x2": Shift("longer_prompts", {"factor": 2.0}),
        "bandwidth_x0.5": Shift("bandwidth", {"factor": 0.5}),
        "bandwidth_x2": Shift("bandwidth", {"factor": 2.0}),
        "label_noise_0.5": Shift("label_noise", {"noise_std": 0.5}),
    }
)


def _as_shift(shift: Any) -> Shift:
    """`shift` itself, or the `DEFAULT_SHIFTS` entry it labels."""
    if isinstance(shift, str):
        check_choice("shift", shift, tuple(DEFAULT_SHIFTS))
        return DEFAULT_SHIFTS[shift]
    if not isinstance(shift, Shift):
        raise ValueError(f"shift must be a Shift (e.g. Shift('input_scale', {{'factor': 2.0}})) or a DEFAULT_SHIFTS label, got {shift!r}")
    return shift


def applicable_shifts(sampler: Sampler, shifts: Mapping[str, Shift] = DEFAULT_SHIFTS) -> dict[str, Shift]:
    """The entries of `shifts` (label -> Shift) that apply to `sampler` (the rest would raise in
    `apply_shift`)."""
    if not isinstance(shifts, Mapping):
        raise ValueError(f"shifts must be a mapping of label -> Shift such as DEFAULT_SHIFTS, got {type(shifts).__name__}")
    return {label: shift for label, shift in shifts.items() if shift_applies(sampler, shift)}
