"""Which tensors a computation places on the device it was asked for, on a machine with only a CPU.

"cpu:0" is a device name distinct from the "cpu" that CPU tensors report as their device, so a
computation asked to run on "cpu:0" shows where it uses that name. `PlacementRecorder` is a torch
function mode that follows placement the way a second device would:

- *placed*: made by a factory or `.to(...)` naming the requested device (`device=` or the
  device argument of `.to`), or computed from a placed tensor;
- *as given*: made by a factory or `.to(...)` naming some other device, e.g. `device=x.device`
  (on a second device that follows x; a CPU cannot say where x is, so it goes with its operands);
- *unplaced*: everything else, on the default device, the CPU (seeded draws, factories without
  a device, `.cpu()`).

An operation combining a placed tensor with an unplaced one of >= 1 dimension is recorded in
`mixed`: on a GPU it raises ("Expected all tensors to be on the same device") or quietly computes
on the CPU. On a CPU the CG solver's fused NumPy schedule returns CPU tensors by design; every
other device takes the torch schedule, which `emulate_a_second_device` makes the CPU take too.
"""

from __future__ import annotations

import importlib
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REQUESTED = torch.device("cpu", 0)
PLACED, AS_GIVEN, UNPLACED = "placed", "as given", "unplaced"
METADATA_QUERIES = {"_has_compatible_shallow_copy_type"}  # nn.Module.to asks it of tensor pairs on any devices


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _named_device(func, args: tuple, kwargs: dict) -> torch.device | None:
    """The device a call puts its result on by name: `device=`, or `.to`'s device argument."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    if getattr(func, "__name__", "") == "to":
        for arg in args[1:]:
            if isinstance(arg, (torch.device, str)):
                return torch.device(arg)
    return None


class PlacementRecorder(TorchFunctionMode):
    """Follows placement on `REQUESTED` (module docstring). `mixed`: names of the operations that
    combined a placed tensor with an unplaced one of >= 1 dimension."""

    def __init__(self) -> None:
        super().__init__()
        self._states: dict[int, tuple[weakref.ref, str]] = {}
        self.mixed: list[str] = []

    def state(self, tensor: torch.Tensor) -> str:
        ref, state = self._states.get(id(tensor), (None, UNPLACED))
        return state if ref is not None and ref() is tensor else UNPLACED

    def placed(self, tensor: torch.Tensor) -> bool:
        return self.state(tensor) == PLACED

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        device = _named_device(func, args, kwargs)
        if name == "__set__":  # `tensor.data = other` (nn.Module.to): tensor now holds other
            self._label([args[0]], self.state(args[1]))
        elif name == "cpu":
            self._label(_tensors(result), UNPLACED)
        elif device == REQUESTED:
            self._label(_tensors(result), PLACED)
        elif device is not None:  # `y.to(x.device)` on a placed y (returned as it is) keeps y placed
            self._label([tensor for tensor in _tensors(result) if not self.placed(tensor)], AS_GIVEN)
        elif name not in METADATA_QUERIES:
            self._label(_tensors(result), self._combined(name, _tensors((args, kwargs))))
        return result

    def _label(self, tensors: list[torch.Tensor], state: str) -> None:
        for tensor in tensors:
            self._states[id(tensor)] = (weakref.ref(tensor), state)

    def _combined(self, name: str, inputs: list[torch.Tensor]) -> str:
        """Where an operation on `inputs` computes (CPU scalars go with any device)."""
        states = {self.state(tensor) for tensor in inputs if tensor.dim() > 0 or self.state(tensor) != UNPLACED}
        if {PLACED, UNPLACED} <= states:
            self.mixed.append(name)
        if PLACED in states:
            return PLACED
        return AS_GIVEN if states == {AS_GIVEN} else UNPLACED


def emulate_a_second_device(monkeypatch) -> None:
    """CG takes its torch schedule, as on every device but the CPU (`mi_krr.solvers.cg._use_fused`)."""
    cg_module = importlib.import_module("mi_krr.solvers.cg")  # the package's `cg` attribute is the function
    monkeypatch.setattr(cg_module, "_use_fused", lambda *args: False)
