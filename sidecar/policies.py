"""The traffic policies beside the breaker: a rate limit and a bulkhead per route.

Each is a small object with an injected clock, like the breaker, and knows
nothing of HTTP: the proxy asks it, in the contract's order (rate limit,
breaker, recovery ramp, bulkhead, breaker permit), and answers the request.
The recovery ramp lives in the breaker (`Breaker.recovery_share`), whose
transitions start and end it; the fallback answers live with the route's other
sidecar-made answers (`sidecar.exchange.Target`).

Standard library only; validation lives in `sidecar.config`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

__all__ = [
    "FALLBACK_REASONS",
    "QUEUE_WAIT_BUCKETS",
    "REJECT_REASONS",
    "RETRY_DENIALS",
    "RETRY_KINDS",
    "Bulkhead",
    "BulkheadSettings",
    "FallbackSettings",
    "RateLimitSettings",
    "RecoverySettings",
    "RetryBudget",
    "RetrySettings",
    "TokenBucket",
    "Waiter",
]

REJECT_REASONS = (
    "circuit_open",
    "circuit_half_open",
    "circuit_forced_open",
    "circuit_recovering",
    "rate_limited",
    "bulkhead_full",
    "websocket_sessions_full",
)
"""Why a request was answered without contacting the upstream:
`sidecar_rejected_requests_total`'s reasons."""
FALLBACK_REASONS = (
    *REJECT_REASONS,
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_tls_error",
)
"""The sidecar-made answers a fallback may stand in for: rejections and the sidecar's
own upstream errors, never an answer the upstream gave."""

RETRY_KINDS = ("connect", "timeout", "tls")
"""The failures before response headers that `retry.retry_on` may name (besides statuses)."""
RETRY_DENIALS = ("budget", "breaker", "body", "method", "retry_after", "deadline")
"""Why a retryable try was not retried: `sidecar_retries_denied_total`'s reasons."""

QUEUE_WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    count: int
    """Tokens added per `period`."""
    period: float
    """Seconds."""
    burst: int
    """The bucket's size; it starts full."""
    mode: Literal["enforce", "shadow"] = "enforce"

    @property
    def rate(self) -> str:
        """As written: "100/60s"."""
        return f"{self.count}/{self.period:g}s"


@dataclass(frozen=True, slots=True)
class BulkheadSettings:
    max_concurrent: int
    max_queued: int = 0
    queue_timeout: float = 1.0
    """Seconds a request waits in the queue at most (only with `max_queued` > 0)."""


@dataclass(frozen=True, slots=True)
class FallbackSettings:
    reasons: frozenset[str]
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    body_file: str | None = None
    """Where `body` was read from (resolved), for messages; None when inline."""


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    ramp: float
    """Seconds from `min_share` to every request, after HALF_OPEN -> CLOSED."""
    min_share: Fraction
    """The share of requests admitted as the ramp starts, 0 <= share < 1."""


@dataclass(frozen=True, slots=True)
class RetrySettings:
    attempts: int
    """Tries in all, the first included."""
    retry_on_kinds: frozenset[str]
    """Failures before response headers that are retried: of `RETRY_KINDS`."""
    retry_on_statuses: frozenset[int]
    methods: frozenset[bytes]
    """Methods retried (upper case); any with an `Idempotency-Key` header is too."""
    per_try_timeout: float | None
    """Each try's limit to its response headers; None: the route's `timeouts.request`."""
    deadline: float | None
    """The whole call, tries and waits included; None: no limit but each try's."""
    backoff_base: float
    backoff_max: float
    budget_ratio: Fraction
    budget_min_per_second: float
    replay_max_body: int
    """Request body bytes kept for a replay; a larger body (or a chunked one) is never
    retried."""


class RetryBudget:
    """Retries in any `WINDOW` seconds <= ratio x the requests in them + min_per_second x
    `WINDOW` (Finagle's and Linkerd's budget), counted in one-second buckets: memory and
    time O(1) at any rate. Erring on the safe side: a retry is weighed against the retries
    of the last 10 to 11 seconds (every second that overlaps the last 10) and the requests
    of the last 9 to 10 (only the seconds inside them).
    """

    WINDOW = 10
    _BUCKETS = WINDOW + 1

    __slots__ = (
        "_bucket",
        "_clock",
        "_den",
        "_floor",
        "_now",
        "_num",
        "_requests",
        "_retries",
        "_until",
        "settings",
    )

    def __init__(self, settings: RetrySettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        ratio = settings.budget_ratio
        self._num = ratio.numerator
        self._den = ratio.denominator
        # In the same units as requests x num: min_per_second x WINDOW retries' worth.
        self._floor = Fraction(settings.budget_min_per_second * self.WINDOW) * ratio.denominator
        self._requests = [0] * self._BUCKETS
        self._retries = [0] * self._BUCKETS
        self._now = math.floor(clock())
        """The second whose bucket counts now."""
        self._bucket = self._now % self._BUCKETS
        self._until = self._now + 1.0
        """When the current second ends (the clock's time)."""

    def _roll(self, now: float) -> int:
        second = math.floor(now)
        if second != self._now:
            gone = min(second - self._now, self._BUCKETS)
            for i in range(1, gone + 1):
                bucket = (self._now + i) % self._BUCKETS
                self._requests[bucket] = 0
                self._retries[bucket] = 0
            self._now = second
            self._bucket = second % self._BUCKETS
            self._until = second + 1.0
        return self._bucket

    def deposit(self, now: float) -> None:
        """A client request (its first try) at `now` (the clock's time)."""
        if self._now <= now < self._until:  # the same second: the common case
            self._requests[self._bucket] += 1
        else:
            self._requests[self._roll(now)] += 1

    def _counts(self) -> tuple[int, int]:
        """(requests, retries) to weigh a retry against now."""
        oldest = (self._roll(self._clock()) + 1) % self._BUCKETS
        return sum(self._requests) - self._requests[oldest], sum(self._retries)

    def admits(self) -> bool:
        """Whether one more retry now stays within the budget."""
        requests, retries = self._counts()
        return (retries + 1) * self._den <= self._num * requests + self._floor

    def withdraw(self) -> None:
        self._retries[self._roll(self._clock())] += 1

    def figures(self) -> tuple[int, int, int]:
        """(requests, retries, retries still admitted) in the window now."""
        requests, retries = self._counts()
        allowed = math.floor((self._num * requests + self._floor) / self._den)
        return requests, retries, max(allowed - retries, 0)


class TokenBucket:
    """A token bucket: `count` tokens every `period` seconds, at most `burst` held.

    Exact: tokens are kept in units of 1/`count` of a token-period (a token is
    `period` units, time adds `elapsed * count`), so `rate: 100/60s` adds a whole
    token every 0.6 s with no rounding drift, and `burst + rate * t` bounds what
    passes in any span `t`.
    """

    __slots__ = (
        "_clock",
        "_enough",
        "_full",
        "_level",
        "_rate",
        "_shadow",
        "_stamp",
        "_unit",
        "settings",
        "shadow_limited",
    )

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self._rate = settings.count
        self._unit = settings.period
        self._full = settings.burst * settings.period
        self._enough = settings.period * (1 - 1e-9)
        """A token's worth, less float dust (0.1 * 3 is 0.30000000000000004)."""
        self._shadow = settings.mode == "shadow"
        self._level = self._full
        self._stamp = clock()
        self.shadow_limited = 0
        """Requests a shadow-mode bucket would have limited."""

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until the next one (more
        than 0). A shadow-mode bucket counts the refusal and returns 0.0."""
        # (The refill is written out here, not called: this runs for every request.)
        now = self._clock()
        level = self._level + (now - self._stamp) * self._rate
        self._stamp = now
        if level > self._full:
            level = self._full
        unit = self._unit
        if level >= self._enough:
            self._level = level - unit if level > unit else 0.0
            return 0.0
        self._level = level
        if self._shadow:
            self.shadow_limited += 1
            return 0.0
        return max((unit - level) / self._rate, 1e-9)

    def _refill(self) -> float:
        now = self._clock()
        level = self._level + (now - self._stamp) * self._rate
        self._stamp = now
        self._level = level = min(level, self._full)
        return level

    @property
    def tokens(self) -> float:
        """Tokens in the bucket now."""
        return self._refill() / self._unit


def retry_after(seconds: float) -> int:
    """What `Retry-After` says for `seconds`: rounded up, never 0."""
    return max(1, math.ceil(seconds - 1e-6))


class Waiter(Protocol):
    """A request waiting in a bulkhead's queue."""

    def grant(self) -> bool:
        """A slot is this request's: True if it took it, False if it has no use for it
        (the breaker rejected it meanwhile, or its client is gone)."""
        ...

    def turn_away(self) -> None:
        """No slot will come (the sidecar is stopping): answer, and wait no more."""
        ...


class Bulkhead:
    """At most `max_concurrent` requests in flight; up to `max_queued` more wait, FIFO.

    A slot is held from `enter` (or a `grant` that took it) to `release`. A waiter
    that gives up (`leave`: its client went away, or its time ran out) leaves the
    queue at once and takes no slot.
    """

    __slots__ = (
        "__weakref__",
        "_granting",
        "_limit",
        "_queue",
        "in_flight",
        "settings",
        "wait_buckets",
        "wait_count",
        "wait_sum",
    )

    def __init__(self, settings: BulkheadSettings) -> None:
        self.settings = settings
        self._limit = settings.max_concurrent
        self.in_flight = 0
        self._queue: OrderedDict[Waiter, None] = OrderedDict()
        self._granting = False
        self.wait_buckets = [0] * (len(QUEUE_WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.wait_count = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self.in_flight < self._limit and not self._queue:
            self.in_flight += 1
            return True
        return False

    def queue(self, waiter: Waiter) -> bool:
        """Wait for a slot; False if the queue is full."""
        if len(self._queue) >= self.settings.max_queued:
            return False
        self._queue[waiter] = None
        return True

    def leave(self, waiter: Waiter, waited: float) -> None:
        """`waiter` gives up its place, after `waited` seconds."""
        if self._queue.pop(waiter, False) is None:
            self.observe_wait(waited)

    def release(self) -> None:
        """Give a slot back: the first waiter that wants it gets it."""
        self.in_flight -= 1
        if self._queue:
            self.grant_waiting()

    def resize(self, settings: BulkheadSettings) -> None:
        """New limits (a reload); slots held and waiters stay. A waiter beyond a smaller
        queue keeps its place."""
        self.settings = settings
        self._limit = settings.max_concurrent
        self.grant_waiting()

    def grant_waiting(self) -> None:
        if self._granting:
            # A grant's request ended at once and gave its slot back: the loop below,
            # already running, goes on to the next waiter.
            return
        self._granting = True
        try:
            queue = self._queue
            while queue and self.in_flight < self._limit:
                waiter, _ = queue.popitem(last=False)
                self.in_flight += 1
                if not waiter.grant():
                    self.in_flight -= 1
        finally:
            self._granting = False

    def turn_away_queued(self) -> None:
        """Every waiter is turned away (the sidecar is stopping), first come first."""
        queue, self._queue = self._queue, OrderedDict()
        for waiter in queue:
            waiter.turn_away()

    def observe_wait(self, seconds: float) -> None:
        self.wait_buckets[bisect_left(QUEUE_WAIT_BUCKETS, seconds)] += 1
        self.wait_sum += seconds
        self.wait_count += 1
