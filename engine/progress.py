"""Progress of long work: library code reports `(stage, done, total)` through a callback; the CLI draws it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def silent(stage: str, done: int, total: int) -> None:
    """The callback used when the caller passes none."""
