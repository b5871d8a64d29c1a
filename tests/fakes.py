"""Test doubles shared by the suite."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An `asyncio.sleep` stand-in: time passes at once, other tasks still get a turn."""
        self.now += seconds
        await asyncio.sleep(0)
