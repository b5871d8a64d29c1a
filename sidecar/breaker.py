"""The circuit breaker: a pure CLOSED / OPEN / HALF_OPEN state machine.

The breaker speaks in two steps, as a proxy needs. `Breaker.acquire()` is asked
before forwarding: it returns a `Permit`, or a `Rejection` that says why and for
how long. When the upstream has answered, the outcome is reported on the
permit (`succeeded`, `failed`, or `released` when the client went away and
there is no outcome to speak of), with the time the upstream took to answer.

Every state change bumps a generation; a permit remembers the generation it
was issued in, and an outcome reported on a permit from an older generation is
ignored. That is what keeps a slow request admitted while CLOSED from
re-opening, or extending, a period that began after it was admitted, and what
keeps probe outcomes out of the window that closing starts afresh.

Three rules open a CLOSED circuit, whichever trips first: consecutive failures,
and the failure and slow-call rates over a sliding window (`sidecar.window`).
An upstream's own `Retry-After` may open it too. Each re-open straight from
HALF_OPEN multiplies the open period (backoff), and jitter stretches every
period by a random fraction, so that a fleet of sidecars does not probe in step.
In shadow mode the breaker keeps its state as usual but admits everything,
counting what it would have rejected.

With a recovery ramp (`RecoverySettings`), closing from HALF_OPEN admits only a
share of requests at first, rising linearly to all over the ramp; the others are
rejected as CLOSED (`circuit_recovering`). The share is kept exactly, as credit in
millionths of a request. A relapse during the ramp re-opens with the backoff
carried on; the backoff resets when the ramp completes. `check()` answers as
`acquire()` would, taking nothing: for a request about to wait for a bulkhead
slot, whose permit `acquire(ramp=False)` takes once it has one.

An operator may override the rules (`force`): FORCED_OPEN rejects everything,
FORCED_CLOSED admits everything and counts nothing, until the override's ttl
runs out or it is lifted; either way the breaker then starts afresh in CLOSED,
as `reset` does. An override applies in shadow mode too: it is an order.

Standard library only: time comes from an injected clock, randomness from an
injected source, and the outside world (metrics, logs) subscribes to state
changes through listeners.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from sidecar.policies import RecoverySettings
from sidecar.window import Counts, CountWindow, TimeWindow, Window

__all__ = [
    "FORCED",
    "MODES",
    "Breaker",
    "BreakerSettings",
    "Clock",
    "Mode",
    "Permit",
    "Rejection",
    "State",
    "StateListener",
    "WindowSettings",
    "format_percent",
]

Clock = Callable[[], float]
"""Monotonic seconds; `time.monotonic` in production, a fake in tests."""

Mode = Literal["enforce", "shadow"]
MODES: tuple[Mode, ...] = ("enforce", "shadow")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    """Set by an operator: every request rejected until the override ends."""
    FORCED_CLOSED = "forced_closed"
    """Set by an operator: every request forwarded, no outcome counted, until it ends."""


FORCED = frozenset({State.FORCED_OPEN, State.FORCED_CLOSED})


StateListener = Callable[["Breaker", State, State], None]
"""Called as `listener(breaker, from_state, to_state)` after every transition;
`breaker.reason` then says why it happened."""


@dataclass(frozen=True, slots=True)
class WindowSettings:
    """A sliding window of recent outcomes: exactly one of `duration` and `requests`."""

    duration: float | None
    """Seconds of outcomes kept (time-based), or None."""
    requests: int | None
    """Outcomes kept (count-based), or None."""
    min_requests: int | None
    """Outcomes the window must hold before a rate rule may trip (the config always
    sets it; None, only seen between config layers, means 1)."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """The breaker's thresholds; validation lives in `sidecar.config`.

    The fields after `failure_status` default to "off": no window, no rate
    rules, no backoff, no jitter, Retry-After ignored, enforcing.
    """

    failure_threshold: int | None
    """Consecutive failures that open the circuit; None disables the rule."""
    open_duration: float
    """Seconds the circuit stays OPEN before it admits probes (before backoff and jitter)."""
    half_open_requests: int
    """Probes in flight at once while HALF_OPEN."""
    success_threshold: int
    """Probe successes that close the circuit again."""
    failure_status: frozenset[int]
    """Upstream statuses that the proxy reports as failures; the breaker never reads it."""
    window: WindowSettings | None = None
    failure_rate: Fraction | None = None
    """Open when failures / outcomes in the window reach this (0 < rate <= 1)."""
    slow_call_duration: float | None = None
    """A call whose answer took longer than this many seconds is slow; None: none is."""
    slow_call_rate: Fraction | None = None
    """Open when slow calls / outcomes in the window reach this (0 < rate <= 1)."""
    backoff_multiplier: float = 1.0
    """Each re-open straight from HALF_OPEN multiplies the open period by this."""
    max_open_duration: float | None = None
    """The longest open period, before jitter; None: `open_duration` (no backoff)."""
    jitter: float = 0.0
    """Each open period is stretched by a random fraction from 0 up to this."""
    respect_retry_after: bool = False
    """The proxy passes an upstream's 503/429 `Retry-After` to the breaker."""
    mode: Mode = "enforce"
    """"shadow": keep state as usual, but admit every request."""

    @property
    def slow_after(self) -> float:
        """Seconds after which a call is slow: `slow_call_duration`, or never (infinity)."""
        return math.inf if self.slow_call_duration is None else self.slow_call_duration

    @property
    def open_duration_cap(self) -> float:
        """The longest open period before jitter: `max_open_duration` or `open_duration`."""
        return self.open_duration if self.max_open_duration is None else self.max_open_duration


class Rejection:
    """Why a request was not admitted, and how long until it could be."""

    __slots__ = ("retry_after", "state")

    def __init__(self, state: State, retry_after: int) -> None:
        self.state = state
        self.retry_after = retry_after
        """Whole seconds, at least 1: what a `Retry-After` header should say."""


_SHADOW_GENERATION = -1
"""The generation of a shadow-mode permit for a request that enforcing would have
rejected: no breaker generation matches it, so its outcome changes nothing."""


class Permit:
    """Leave to forward one request; report its outcome exactly once."""

    __slots__ = ("_breaker", "_done", "generation", "state")

    def __init__(self, breaker: Breaker, generation: int, state: State) -> None:
        self._breaker = breaker
        self._done = False
        self.generation = generation
        self.state = state
        """The state the request was admitted in: CLOSED, or HALF_OPEN for a probe
        (or, in shadow mode, OPEN for a request that enforcing would have rejected)."""

    def succeeded(self, elapsed: float = 0.0) -> None:
        """Report that the upstream answered well, after `elapsed` seconds."""
        if not self._done:
            self._done = True
            self._breaker._on_success(self, elapsed)

    def failed(self, elapsed: float = 0.0, retry_after: float | None = None) -> None:
        """Report that the upstream failed after `elapsed` seconds.

        `retry_after`: the upstream asked, with a `Retry-After` of that many
        seconds, not to be called again before then; the circuit opens for that long.
        """
        if not self._done:
            self._done = True
            self._breaker._on_failure(self, elapsed, retry_after)

    def released(self) -> None:
        """Give the permit back with no outcome (the client went away)."""
        if not self._done:
            self._done = True
            self._breaker._on_release(self)

    @property
    def done(self) -> bool:
        return self._done


class Breaker:
    """One route's circuit breaker."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Clock,
        rand: Callable[[], float] = random.random,
        recovery: RecoverySettings | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.recovery = recovery
        """The recovery ramp after HALF_OPEN -> CLOSED, if any (a reload may change it)."""
        self._ramp_from: float | None = None
        """While ramping: when the ramp began (clock time); None when not ramping."""
        self._credit = 0
        """The ramp's admissions owed, in millionths of a request: each request adds the
        share, and one is admitted per whole request's worth (exact, no float drift)."""
        self._clock = clock
        self._random = rand
        self._listeners: list[StateListener] = []
        self._state = State.CLOSED
        self._generation = 0
        self._consecutive_failures = 0
        self._open_until = 0.0
        self._period = settings.open_duration
        """The open period before jitter: grows by backoff, reset when closing."""
        self._open_period = 0.0
        """The period in force (jitter included) of the current or last OPEN."""
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._override_until = math.inf
        """While FORCED_*: when the override ends (clock time; inf without a ttl)."""
        self._shadow = settings.mode == "shadow"
        self.shadow_rejections = 0
        """Requests a shadow-mode breaker admitted that enforcing would have rejected."""
        self.reason = ""
        """Why the last transition happened, for logs: "3 consecutive failures"."""
        self._slow_after = settings.slow_after
        self._window = _make_window(settings.window)
        self._min_requests = (settings.window.min_requests or 1) if settings.window else 0
        self._failure_rate = _ratio(settings.failure_rate)
        self._slow_call_rate = _ratio(settings.slow_call_rate)

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    # -- reading -------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state; OPEN turns HALF_OPEN here once its period is over, and
        an override whose ttl has run out ends here."""
        state = self._state
        if state is State.OPEN:
            if self._clock() >= self._open_until:
                self._to_half_open()
        elif state in FORCED and self._clock() >= self._override_until:
            self._end_override()
        return self._state

    @property
    def override_left(self) -> float | None:
        """Seconds until the override ends (inf without a ttl); None when not overridden."""
        if self.state not in FORCED:
            return None
        return self._override_until - self._clock()

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight if self.state is State.HALF_OPEN else 0

    @property
    def open_period(self) -> float | None:
        """Seconds of the open period in force (backoff and jitter included) while OPEN.

        Unlike `state`, this never moves the breaker on: a listener may read it while
        the OPEN it is told about is still being entered.
        """
        return self._open_period if self._state is State.OPEN else None

    def retry_after(self) -> int | None:
        """Whole seconds until a request could be admitted while (FORCED_)OPEN, else None."""
        state = self.state
        if state is State.OPEN:
            return _whole_seconds(self._open_until - self._clock())
        if state is State.FORCED_OPEN:
            return self._forced_retry_after()
        return None

    def _forced_retry_after(self) -> int:
        # The ttl left; without a ttl nobody knows, and open_duration is an honest guess.
        left = self._override_until - self._clock()
        return _whole_seconds(self.settings.open_duration if left == math.inf else left)

    def window_counts(self) -> Counts | None:
        """Outcomes, failures and slow calls in the window now; None without a window."""
        return self._window.counts(self._clock()) if self._window is not None else None

    def rates(self, counts: Counts | None = None) -> tuple[float, float] | None:
        """(failure rate, slow-call rate) over the window (or over `counts` read from it
        before), or None below `min_requests` or without a window."""
        if counts is None:
            counts = self.window_counts()
        if counts is None or counts.total == 0 or counts.total < self._min_requests:
            return None
        return counts.failures / counts.total, counts.slow / counts.total

    # -- the two steps ---------------------------------------------------------

    def acquire(self, ramp: bool = True) -> Permit | Rejection:
        """Admit one request, or say why not. `ramp` False: the recovery ramp has already
        let it through (`check`, before it queued)."""
        state = self._state
        if state is State.CLOSED:  # the common case, kept to two comparisons
            if self._ramp_from is None or not ramp:
                return Permit(self, self._generation, state)
            shed = self._shed()
            return shed if shed is not None else Permit(self, self._generation, state)
        if state is State.OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                return self._refuse(Rejection(state, _whole_seconds(left)))
            self._to_half_open()
        elif state is not State.HALF_OPEN:  # an override
            if self._clock() >= self._override_until:
                self._end_override()
                return Permit(self, self._generation, State.CLOSED)
            if state is State.FORCED_OPEN:
                return Rejection(state, self._forced_retry_after())
            # No generation matches: its outcome is counted nowhere.
            return Permit(self, _SHADOW_GENERATION, state)
        if self._probes_in_flight >= self.settings.half_open_requests:
            return self._refuse(Rejection(State.HALF_OPEN, 1))
        self._probes_in_flight += 1
        return Permit(self, self._generation, State.HALF_OPEN)

    def check(self) -> Rejection | None:
        """What `acquire` would say now, taking nothing (no probe slot, no permit): asked
        before a request queues for a bulkhead slot, whose permit `acquire(ramp=False)`
        takes once the slot is granted. The recovery ramp decides here, once."""
        state = self.state
        if state is State.CLOSED:
            return None if self._ramp_from is None else self._shed()
        if state is State.FORCED_CLOSED or (self._shadow and state not in FORCED):
            return None
        if state is State.OPEN:
            return Rejection(state, _whole_seconds(self._open_until - self._clock()))
        if state is State.FORCED_OPEN:
            return Rejection(state, self._forced_retry_after())
        if self._probes_in_flight >= self.settings.half_open_requests:
            return Rejection(State.HALF_OPEN, 1)
        return None

    # -- the recovery ramp ---------------------------------------------------------

    @property
    def recovery_share(self) -> float:
        """The share of requests the recovery ramp admits now: 1.0 when not ramping.
        A ramp whose time is over (or whose settings a reload removed) ends here."""
        start = self._ramp_from
        if start is None:
            return 1.0
        recovery = self.recovery
        now = self._clock()
        if recovery is None or now >= start + recovery.ramp:
            self._end_ramp()
            return 1.0
        low = float(recovery.min_share)
        return low + (1.0 - low) * max(now - start, 0.0) / recovery.ramp

    @property
    def recovering(self) -> bool:
        return self.recovery_share < 1.0

    def _shed(self) -> Rejection | None:
        """The ramp's verdict on one request: a rejection (CLOSED, recovering), or None."""
        share = self.recovery_share
        if share >= 1.0:
            return None
        credit = self._credit + int(share * _MILLION)
        if credit >= _MILLION:
            self._credit = credit - _MILLION
            return None
        self._credit = credit
        if self._shadow:
            self.shadow_rejections += 1
            return None
        return Rejection(State.CLOSED, 1)

    def _end_ramp(self) -> None:
        """The ramp is over: the backoff, kept through it, starts afresh now."""
        self._ramp_from = None
        self._credit = 0
        self._period = self.settings.open_duration

    def _refuse(self, rejection: Rejection) -> Permit | Rejection:
        if not self._shadow:
            return rejection
        self.shadow_rejections += 1
        return Permit(self, _SHADOW_GENERATION, rejection.state)

    def _on_success(self, permit: Permit, elapsed: float) -> None:
        if permit.generation != self._generation:
            return
        if permit.state is State.HALF_OPEN:
            self._on_probe_success(elapsed)
            return
        self._consecutive_failures = 0
        window = self._window
        if window is not None:
            window.add(self._clock(), False, elapsed > self._slow_after)
            if window.total >= self._min_requests:
                self._check_rates(window)

    def _on_probe_success(self, elapsed: float) -> None:
        self._probes_in_flight -= 1
        if elapsed > self._slow_after and self._slow_call_rate is not None:
            # The slow-call rule is what opened it, most likely: a slow answer is no recovery.
            self._open(f"probe slow ({elapsed:.3g} s > {self._slow_after:g} s)")
            return
        self._consecutive_failures = 0
        self._probe_successes += 1
        if self._probe_successes >= self.settings.success_threshold:
            n = self._probe_successes
            reason = f"{n} probe{'s' * (n != 1)} succeeded"
            recovery = self.recovery
            if recovery is None:
                self._transition(State.CLOSED, reason)
                return
            # Recovering: the share admitted rises over the ramp; the backoff holds until
            # the ramp is over, so a relapse during it opens for longer still.
            period = self._period
            self._transition(
                State.CLOSED,
                f"{reason}; recovering from {format_percent(recovery.min_share)} "
                f"over {recovery.ramp:g} s",
            )
            self._period = period
            self._ramp_from = self._clock()

    def _on_failure(self, permit: Permit, elapsed: float, retry_after: float | None) -> None:
        if permit.generation != self._generation:
            return
        self._consecutive_failures += 1
        asked = retry_after is not None and retry_after > 0
        if permit.state is State.HALF_OPEN:
            # Any failed probe re-opens at once, whatever the thresholds say.
            if asked:
                self._open(
                    f"probe failed; upstream asked to retry after {retry_after:g} s", retry_after
                )
            else:
                self._open("probe failed")
            return
        window = self._window
        if window is not None:
            window.add(self._clock(), True, elapsed > self._slow_after)
        threshold = self.settings.failure_threshold
        if asked:
            self._open(f"upstream asked to retry after {retry_after:g} s", retry_after)
        elif threshold is not None and self._consecutive_failures >= threshold:
            self._open(f"{self._consecutive_failures} consecutive failures")
        elif window is not None and window.total >= self._min_requests:
            self._check_rates(window)

    def _on_release(self, permit: Permit) -> None:
        if permit.generation == self._generation and permit.state is State.HALF_OPEN:
            self._probes_in_flight -= 1

    def _check_rates(self, window: Window) -> None:
        """Open if a rate rule trips; the window holds at least `min_requests` outcomes."""
        # Exact: a rate of 30 % trips at 3 of 10, whatever 0.3 is in binary.
        total = window.total
        rate = self._failure_rate
        if rate is not None and window.failures * rate[1] >= rate[0] * total:
            self._open(_rate_reason("failure rate", window.failures, total, rate))
            return
        rate = self._slow_call_rate
        if rate is not None and window.slow * rate[1] >= rate[0] * total:
            self._open(_rate_reason("slow-call rate", window.slow, total, rate))

    # -- operators ---------------------------------------------------------------

    def force(self, state: State | None, ttl: float | None = None, reason: str = "") -> None:
        """Override the rules with FORCED_OPEN or FORCED_CLOSED, for `ttl` seconds
        (None: until lifted); `state` None lifts an override (back to CLOSED, afresh)."""
        if state is None:
            if self.state in FORCED:
                self._end_override(reason or "override lifted")
            elif self.recovering:
                self._end_ramp()  # back to the rules at once: full traffic
                self.reason = reason or "recovery ramp skipped"
            return
        if state not in FORCED:
            raise ValueError(f"cannot force {state.value}")
        self._override_until = math.inf if ttl is None else self._clock() + ttl
        if self._state is not state:
            self._transition(state, reason or "forced")
        else:  # a new ttl for the same override: outstanding permits stay as they were
            self.reason = reason or self.reason

    def reset(self, reason: str = "reset") -> None:
        """Back to CLOSED with clean counts, whatever the state (an override ends too)."""
        if self._state is State.CLOSED:
            # No transition to report; still, outcomes of requests admitted before the
            # reset must not count against the clean slate.
            self._generation += 1
            self._clean_slate()
            self.reason = reason
            return
        self._override_until = math.inf
        self._transition(State.CLOSED, reason)

    def _end_override(self, reason: str | None = None) -> None:
        if reason is None:
            reason = f"{self._state.value} override ended (ttl over)"
        self._override_until = math.inf
        self._transition(State.CLOSED, reason)

    # -- transitions -----------------------------------------------------------

    def _open(self, reason: str, requested: float | None = None) -> None:
        """Open for the period in force: backed off, or as the upstream asked; jittered."""
        settings = self.settings
        cap = settings.open_duration_cap
        if self._state is State.HALF_OPEN or self.recovering:
            self._period = min(self._period * settings.backoff_multiplier, cap)
        else:
            self._period = settings.open_duration
        period = self._period if requested is None else min(requested, cap)
        if settings.jitter:
            period *= 1 + self._random() * settings.jitter
        self._open_period = period
        self._open_until = self._clock() + period
        self._transition(State.OPEN, reason)

    def _to_half_open(self) -> None:
        self._transition(State.HALF_OPEN, f"open period of {self._open_period:.3g} s over")

    def _transition(self, to_state: State, reason: str) -> None:
        from_state = self._state
        self._state = to_state
        self._ramp_from = None  # (a relapse ends the ramp; closing may start one anew)
        self._generation += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.reason = reason
        if to_state is State.CLOSED:
            self._clean_slate()
        for listener in self._listeners:
            listener(self, from_state, to_state)

    def _clean_slate(self) -> None:
        """What CLOSED starts with: no failures, the base open period, an empty window."""
        self._consecutive_failures = 0
        self._ramp_from = None
        self._credit = 0
        self._period = self.settings.open_duration
        if self._window is not None:
            self._window.clear()


def _make_window(settings: WindowSettings | None) -> Window | None:
    if settings is None:
        return None
    if settings.requests is not None:
        return CountWindow(settings.requests)
    assert settings.duration is not None
    return TimeWindow(settings.duration)


def _rate_reason(what: str, count: int, total: int, rate: tuple[int, int]) -> str:
    limit = format_percent(Fraction(*rate))
    return f"{what} {format_percent(Fraction(count, total))} >= {limit} over {total} requests"


def _ratio(rate: Fraction | None) -> tuple[int, int] | None:
    return None if rate is None else (rate.numerator, rate.denominator)


_MILLION = 1_000_000

_ROUNDING_SLACK = 1e-6
"""`open_until - now` read at once after opening for 30 s can be 30.000000000004:
that is still 30 whole seconds, not 31."""


def _whole_seconds(left: float) -> int:
    """What `Retry-After` says for `left` seconds: rounded up, never 0."""
    return max(1, math.ceil(left - _ROUNDING_SLACK))


def format_percent(rate: Fraction | float) -> str:
    """`Fraction(5, 8)` as "62.5 %": one decimal at most, none when whole, and never
    a rounded "0 %" or "100 %" for a rate that is not exactly that."""
    percent = float(rate) * 100
    text = f"{percent:.1f}".removesuffix(".0")
    if text in ("0", "100") and percent not in (0.0, 100.0):
        text = f"{percent:.4g}" if percent < 1 else f"{percent:.6g}"
    return f"{text} %"
