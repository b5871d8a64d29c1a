"""Test doubles shared by the suite."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A monotonic clock that moves only when a test says so, and timers on it.

    As the breakers' clock it is called (`clock()`); as the sidecar's `Timers`
    (`Sidecar(timers=...)`) it also sets timers, which `advance` fires in the
    order they fall due, each at its own time, as if that time had passed.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> list[float]:
        """When the timers still set fall due, earliest first."""
        return sorted(t.when for _, _, t in self._timers if not t.cancelled)

    def set_for(self, seconds: float) -> bool:
        """Whether a timer is set to fall due `seconds` from now (to a nanosecond)."""
        return any(abs(when - self.now - seconds) < 1e-9 for when in self.pending)

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        timers = self._timers
        # Due within a nanosecond counts as due: 0.999 + 0.001 may add up to a hair less
        # than 1.0, and a test that moves time in steps means the sum.
        while timers and timers[0][0] <= target + 1e-9:
            when, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.callback()
        # (Never back: a timer due a hair after `target` may have set the time to its own.)
        self.now = max(self.now, target)

    async def sleep(self, seconds: float) -> None:
        """An `asyncio.sleep` stand-in: time passes at once, other tasks still get a turn."""
        self.advance(seconds)
        await asyncio.sleep(0)
