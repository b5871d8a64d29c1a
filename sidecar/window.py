"""Sliding windows of recent outcomes, for the breaker's rate rules.

Two kinds, one interface: `add(now, failed, slow)` records an outcome, after
which the attributes `total`, `failures` and `slow` are the window's counts;
`counts(now)` brings them up to `now` and returns them; `clear()` starts afresh.
Both cost O(1) per call and hold a fixed amount of memory, whatever the
request rate. (`add` returns nothing and the counts are plain attributes
because this runs once per proxied request: a tuple per call costs more than
the window itself.)

- `CountWindow`: the last N outcomes, in a ring of N bytes.
- `TimeWindow`: the outcomes of the last D seconds, in `TIME_WINDOW_BUCKETS`
  buckets of D / buckets seconds each. The bucket holding `now` is the newest;
  at time t the window holds the buckets whose index `floor(t / width)` is one
  of the last `buckets`, so it spans between D - width and D seconds. Buckets
  are evicted as time passes, on reads as well as on writes, so a window read
  after a quiet minute is empty, and a gap longer than the whole window is
  skipped in one step.

Standard library only, like the breaker.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

__all__ = ["TIME_WINDOW_BUCKETS", "CountWindow", "Counts", "TimeWindow", "Window"]

TIME_WINDOW_BUCKETS = 20
"""Buckets per time window: a 30 s window forgets in steps of 1.5 s."""

_FAILED = 1
_SLOW = 2
_NEVER = -(1 << 62)
"""A bucket number older than any clock reading."""


class Counts(NamedTuple):
    total: int
    failures: int
    slow: int


class Window(Protocol):
    total: int
    failures: int
    slow: int

    def add(self, now: float, failed: bool, slow: bool) -> None: ...

    def counts(self, now: float) -> Counts: ...

    def clear(self) -> None: ...


class CountWindow:
    """The last `size` outcomes."""

    __slots__ = ("_filled", "_next", "_ring", "failures", "size", "slow", "total")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a window holds at least one outcome")
        self.size = size
        self._ring = bytearray(size)
        self.clear()

    def clear(self) -> None:
        self._next = 0
        self.total = 0
        self.failures = 0
        self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        """Record one outcome, evicting the oldest once full."""
        ring = self._ring
        i = self._next
        if self.total == self.size:
            old = ring[i]
            self.failures += failed - (old & _FAILED)
            self.slow += slow - (old >> 1)
        else:
            self.total += 1
            self.failures += failed
            self.slow += slow
        ring[i] = failed | (slow << 1)
        i += 1
        self._next = i if i < self.size else 0

    def counts(self, now: float) -> Counts:
        return Counts(self.total, self.failures, self.slow)


class TimeWindow:
    """The outcomes of the last `duration` seconds, in fixed buckets."""

    __slots__ = (
        "_bucket_failures",
        "_bucket_slow",
        "_bucket_total",
        "_epoch",
        "_head",
        "_width",
        "buckets",
        "duration",
        "failures",
        "slow",
        "total",
    )

    def __init__(self, duration: float, buckets: int = TIME_WINDOW_BUCKETS) -> None:
        if not (duration > 0 and math.isfinite(duration)) or buckets < 1:
            raise ValueError("a time window needs a positive duration and at least one bucket")
        self.duration = duration
        self.buckets = buckets
        self._width = duration / buckets
        # Slot i holds bucket number _epoch[i] (i == _epoch[i] % buckets). A slot whose
        # number is not among the live ones is stale: read as empty, reset when reused.
        # That is what lets a long gap clear the window without touching every slot.
        self._bucket_total = [0] * buckets
        self._bucket_failures = [0] * buckets
        self._bucket_slow = [0] * buckets
        self.clear()

    def clear(self) -> None:
        self._epoch = [_NEVER] * self.buckets
        self._head = _NEVER
        """The newest bucket number seen; buckets up to `buckets - 1` older are live."""
        self.total = self.failures = self.slow = 0

    def _advance(self, current: int) -> None:
        """Evict the buckets that bucket number `current` leaves behind."""
        head = self._head
        n = self.buckets
        if current - head >= n:
            # Every live bucket is now too old: drop them all at once, O(1).
            self.total = self.failures = self.slow = 0
        else:
            epoch = self._epoch
            for number in range(head - n + 1, current - n + 1):
                slot = number % n
                if epoch[slot] == number:
                    self.total -= self._bucket_total[slot]
                    self.failures -= self._bucket_failures[slot]
                    self.slow -= self._bucket_slow[slot]
                    epoch[slot] = _NEVER
        self._head = current

    def add(self, now: float, failed: bool, slow: bool) -> None:
        """Record one outcome at `now`."""
        current = math.floor(now / self._width)
        if current > self._head:  # (a clock that went back stays in the newest bucket)
            self._advance(current)
        else:
            current = self._head
        slot = current % self.buckets
        if self._epoch[slot] != current:
            self._epoch[slot] = current
            self._bucket_total[slot] = 0
            self._bucket_failures[slot] = 0
            self._bucket_slow[slot] = 0
        self._bucket_total[slot] += 1
        self.total += 1
        if failed:
            self._bucket_failures[slot] += 1
            self.failures += 1
        if slow:
            self._bucket_slow[slot] += 1
            self.slow += 1

    def counts(self, now: float) -> Counts:
        current = math.floor(now / self._width)
        if current > self._head:
            self._advance(current)
        return Counts(self.total, self.failures, self.slow)
