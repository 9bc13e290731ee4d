"""Fixtures the probe tests share."""

from __future__ import annotations

import pytest

import probes.streaming


@pytest.fixture
def retained_reductions(monkeypatch) -> list:
    """Every value `probes.streaming.run_with_reductions` returns during the test (what outlives a
    forward pass), recorded in order; the list fills as the probes run."""
    retained = []
    original = probes.streaming.run_with_reductions

    def recording(*args, **kwargs):
        results = original(*args, **kwargs)
        retained.extend(results)
        return results

    monkeypatch.setattr(probes.streaming, "run_with_reductions", recording)
    return retained
