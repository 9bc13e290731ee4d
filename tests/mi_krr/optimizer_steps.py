"""A check shared by the checkpoint tests: a restored optimizer continues exactly as the original."""

import torch


def assert_same_next_step(original, restored, batch: torch.Tensor) -> None:
    """One optimizer step of each (model, optimizer) pair on the squared output of `batch` leaves
    bit-identical parameters."""
    for model, optimizer in (original, restored):
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
    for a, b in zip(original[0].parameters(), restored[0].parameters(), strict=True):
        assert torch.equal(a, b)
