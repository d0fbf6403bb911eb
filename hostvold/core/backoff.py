"""Pauses between retries of something that failed (never a poll for something to happen)."""

from __future__ import annotations

from collections.abc import Iterator


def backoff(first: float, limit: float, factor: float = 2.0) -> Iterator[float]:
    """``first``, then each pause ``factor`` times the last, never more than ``limit``."""
    pause = first
    while True:
        yield pause
        pause = min(pause * factor, limit)
