"""The circuit breaker: a pure CLOSED / OPEN / HALF_OPEN state machine.

The breaker speaks in two steps, as a proxy needs. `Breaker.acquire()` is asked
before forwarding: it returns a `Permit`, or a `Rejection` that says why and for
how long. When the upstream has answered, the outcome is reported on the
permit (`succeeded`, `failed`, or `released` when the client went away and
there is no outcome to speak of).

Every state change bumps a generation; a permit remembers the generation it
was issued in, and an outcome reported on a permit from an older generation is
ignored. That is what keeps a slow request admitted while CLOSED from
re-opening, or extending, a period that began after it was admitted.

Standard library only: time comes from an injected clock, and the outside
world (metrics, logs) subscribes to state changes through listeners.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Breaker",
    "BreakerSettings",
    "Clock",
    "Permit",
    "Rejection",
    "State",
    "StateListener",
]

Clock = Callable[[], float]
"""Monotonic seconds; `time.monotonic` in production, a fake in tests."""


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[["Breaker", State, State], None]
"""Called as `listener(breaker, from_state, to_state)` after every transition."""


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """The breaker's thresholds; validation lives in `sidecar.config`."""

    failure_threshold: int
    """Consecutive failures (CLOSED, or a failed probe) that open the circuit."""
    open_duration: float
    """Seconds the circuit stays OPEN before it admits probes."""
    half_open_requests: int
    """Probes in flight at once while HALF_OPEN."""
    success_threshold: int
    """Probe successes that close the circuit again."""
    failure_status: frozenset[int]
    """Upstream statuses that the proxy reports as failures; the breaker never reads it."""


class Rejection:
    """Why a request was not admitted, and how long until it could be."""

    __slots__ = ("retry_after", "state")

    def __init__(self, state: State, retry_after: int) -> None:
        self.state = state
        self.retry_after = retry_after
        """Whole seconds, at least 1: what a `Retry-After` header should say."""


class Permit:
    """Leave to forward one request; report its outcome exactly once."""

    __slots__ = ("_breaker", "_done", "generation", "state")

    def __init__(self, breaker: Breaker, generation: int, state: State) -> None:
        self._breaker = breaker
        self._done = False
        self.generation = generation
        self.state = state
        """The state the request was admitted in: CLOSED, or HALF_OPEN for a probe."""

    def succeeded(self) -> None:
        """Report that the upstream answered well."""
        if not self._done:
            self._done = True
            self._breaker._on_success(self)

    def failed(self) -> None:
        """Report that the upstream failed."""
        if not self._done:
            self._done = True
            self._breaker._on_failure(self)

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

    def __init__(self, name: str, settings: BreakerSettings, clock: Clock) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._listeners: list[StateListener] = []
        self._state = State.CLOSED
        self._generation = 0
        self._consecutive_failures = 0
        self._open_until = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    # -- reading -------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state; OPEN turns HALF_OPEN here once its period is over."""
        if self._state is State.OPEN and self._clock() >= self._open_until:
            self._transition(State.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def probes_in_flight(self) -> int:
        return self._probes_in_flight if self.state is State.HALF_OPEN else 0

    def retry_after(self) -> int | None:
        """Whole seconds until a probe is admitted while OPEN, else None."""
        if self.state is not State.OPEN:
            return None
        return _whole_seconds(self._open_until - self._clock())

    # -- the two steps ---------------------------------------------------------

    def acquire(self) -> Permit | Rejection:
        """Admit one request, or say why not."""
        state = self._state
        if state is State.CLOSED:  # the common case, kept to one comparison
            return Permit(self, self._generation, state)
        if state is State.OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                return Rejection(state, _whole_seconds(left))
            self._transition(State.HALF_OPEN)
        if self._probes_in_flight >= self.settings.half_open_requests:
            return Rejection(State.HALF_OPEN, 1)
        self._probes_in_flight += 1
        return Permit(self, self._generation, State.HALF_OPEN)

    def _on_success(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        self._consecutive_failures = 0
        if permit.state is State.HALF_OPEN:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.settings.success_threshold:
                self._transition(State.CLOSED)

    def _on_failure(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        self._consecutive_failures += 1
        if permit.state is State.HALF_OPEN:
            # Any failed probe re-opens at once, whatever the threshold says.
            self._transition(State.OPEN)
        elif self._consecutive_failures >= self.settings.failure_threshold:
            self._transition(State.OPEN)

    def _on_release(self, permit: Permit) -> None:
        if permit.generation == self._generation and permit.state is State.HALF_OPEN:
            self._probes_in_flight -= 1

    # -- transitions -----------------------------------------------------------

    def _transition(self, to_state: State) -> None:
        from_state = self._state
        self._state = to_state
        self._generation += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        if to_state is State.OPEN:
            self._open_until = self._clock() + self.settings.open_duration
        elif to_state is State.CLOSED:
            self._consecutive_failures = 0
        for listener in self._listeners:
            listener(self, from_state, to_state)


def _whole_seconds(left: float) -> int:
    """What `Retry-After` says for `left` seconds: rounded up, never 0."""
    return max(1, math.ceil(left))
