"""Time for the request path: the clock it reads and the timers it sets, injected.

The listener, the upstream pool and each exchange read the time and set their
deadlines through a `Timers` (the running loop's, in production). A test hands
in a fake one instead and moves time itself, so no test sleeps to let a
keep-alive or a timeout run out.

Most deadlines are never reached: an exchange ends in a millisecond, long before
its request timeout. `Ticker` keeps those from costing a timer each: a deadline
waits in it, and only the ones still waiting at its next tick get a real timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar, Protocol

__all__ = ["Armable", "LoopTimers", "Ticker", "Timer", "Timers"]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """A monotonic clock, and timers on it."""

    def time(self) -> float:
        """Seconds, monotonic."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Call `callback` once `time()` reaches `when` (at once if it has)."""
        ...


class LoopTimers:
    """The running loop's clock and timers: what production uses."""

    __slots__ = ("_loop", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.time: Callable[[], float] = loop.time

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        return self._loop.call_at(when, callback)


class Armable(Protocol):
    def arm(self) -> None:
        """Called by the tick that follows `Ticker.add`, unless discarded before."""


class Ticker:
    """Sets the timers of what is still waiting after a tick.

    Whatever needs a deadline more than `INTERVAL` away adds itself here
    instead of setting a timer; the next tick (within `INTERVAL`, so before the
    deadline) calls its `arm()`, which sets the timer for the very time it would
    have had. What ends before the tick (nearly everything) discards itself and
    never had a timer. One tick timer runs while anything waits.
    """

    INTERVAL: ClassVar[float] = 0.25

    __slots__ = ("_tick", "_timers", "_waiting")

    def __init__(self, timers: Timers) -> None:
        self._timers = timers
        self._waiting: set[Armable] = set()
        self._tick: Timer | None = None

    def add(self, waiting: Armable) -> None:
        self._waiting.add(waiting)
        if self._tick is None:
            self._tick = self._timers.call_at(self._timers.time() + self.INTERVAL, self._arm)

    def discard(self, waiting: Armable) -> None:
        self._waiting.discard(waiting)

    def __contains__(self, waiting: object) -> bool:
        return waiting in self._waiting

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._waiting.clear()

    def _arm(self) -> None:
        self._tick = None
        waiting, self._waiting = self._waiting, set()
        for item in waiting:
            try:
                item.arm()
            except Exception as e:  # a bug in one must not leave the others without a deadline
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "arm() failed", "exception": e}
                )
