"""A stand-in for `mi_krr.reproductions.reproduction(name)`: the CLI tests check what `mi-krr
reproduce` hands a reproduction function without running it."""

from __future__ import annotations

import mi_krr.reproductions as reproductions


class RecordedResult:
    """The result interface `mi-krr reproduce` reads: a figure, key numbers, a dict, a summary."""

    def plot(self):
        import matplotlib.pyplot as plt

        return plt.figure()

    def key_numbers(self):
        return {}

    def to_dict(self):
        return {}

    def summary(self):
        return ""


def record_reproduction_calls(monkeypatch) -> dict:
    """Make every reproduction a recorder with no QUICK settings; returns the dict its keyword
    arguments are written into."""
    seen: dict = {}

    def recorder(**kwargs):
        seen.update(kwargs)
        return RecordedResult()

    monkeypatch.setattr(reproductions, "reproduction", lambda _: (recorder, {}))
    return seen
