"""The breaker's state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from sidecar.breaker import Breaker, BreakerSettings, Permit, Rejection, State
from tests.fakes import FakeClock


def make(
    failure_threshold: int = 3,
    open_duration: float = 10.0,
    half_open_requests: int = 1,
    success_threshold: int = 1,
) -> tuple[Breaker, FakeClock, list[tuple[State, State]]]:
    clock = FakeClock()
    breaker = Breaker(
        "r",
        BreakerSettings(
            failure_threshold=failure_threshold,
            open_duration=open_duration,
            half_open_requests=half_open_requests,
            success_threshold=success_threshold,
            failure_status=frozenset({500}),
        ),
        clock,
    )
    seen: list[tuple[State, State]] = []
    breaker.add_listener(lambda _b, a, b: seen.append((a, b)))
    return breaker, clock, seen


def permit(breaker: Breaker) -> Permit:
    p = breaker.acquire()
    assert isinstance(p, Permit), f"expected a permit, got a rejection in {breaker.state}"
    return p


def rejection(breaker: Breaker) -> Rejection:
    r = breaker.acquire()
    assert isinstance(r, Rejection), "expected a rejection, got a permit"
    return r


def trip(breaker: Breaker) -> None:
    for _ in range(breaker.settings.failure_threshold):
        permit(breaker).failed()
    assert breaker.state is State.OPEN


def test_starts_closed_and_forwards() -> None:
    breaker, _, seen = make()
    assert breaker.state is State.CLOSED
    p = permit(breaker)
    assert p.state is State.CLOSED
    p.succeeded()
    assert seen == []


def test_consecutive_failures_open_at_threshold() -> None:
    breaker, _, seen = make(failure_threshold=3)
    permit(breaker).failed()
    permit(breaker).failed()
    assert breaker.state is State.CLOSED
    assert breaker.consecutive_failures == 2
    permit(breaker).failed()
    assert breaker.state is State.OPEN
    assert seen == [(State.CLOSED, State.OPEN)]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _, _ = make(failure_threshold=3)
    permit(breaker).failed()
    permit(breaker).failed()
    permit(breaker).succeeded()
    assert breaker.consecutive_failures == 0
    permit(breaker).failed()
    permit(breaker).failed()
    assert breaker.state is State.CLOSED


def test_open_rejects_with_retry_after_rounded_up() -> None:
    breaker, clock, _ = make(open_duration=10.0)
    trip(breaker)
    r = rejection(breaker)
    assert r.state is State.OPEN
    assert r.retry_after == 10
    clock.advance(0.5)
    assert rejection(breaker).retry_after == 10  # 9.5 s left rounds up
    assert breaker.retry_after() == 10
    clock.advance(9.0)
    assert rejection(breaker).retry_after == 1  # 0.5 s left: never 0


def test_sub_second_open_duration_still_says_at_least_one() -> None:
    breaker, _, _ = make(open_duration=0.2)
    trip(breaker)
    assert rejection(breaker).retry_after == 1


def test_open_becomes_half_open_for_readers_without_traffic() -> None:
    breaker, clock, seen = make(open_duration=10.0)
    trip(breaker)
    clock.advance(9.999)
    assert breaker.state is State.OPEN
    clock.advance(0.001)
    assert breaker.state is State.HALF_OPEN
    assert breaker.retry_after() is None
    assert seen == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]


def test_half_open_caps_probes_in_flight() -> None:
    breaker, clock, _ = make(half_open_requests=2, success_threshold=5)
    trip(breaker)
    clock.advance(10)
    first, second = permit(breaker), permit(breaker)
    assert first.state is second.state is State.HALF_OPEN
    full = rejection(breaker)
    assert (full.state, full.retry_after) == (State.HALF_OPEN, 1)
    first.succeeded()  # a slot is free again, the route is not closed yet (5 needed)
    third = permit(breaker)
    assert breaker.probes_in_flight == 2
    rejection(breaker)
    second.succeeded()
    third.succeeded()
    assert breaker.state is State.HALF_OPEN


def test_success_threshold_probe_successes_close() -> None:
    breaker, clock, seen = make(success_threshold=2)
    trip(breaker)
    clock.advance(10)
    permit(breaker).succeeded()
    assert breaker.state is State.HALF_OPEN
    permit(breaker).succeeded()
    assert breaker.state is State.CLOSED
    assert breaker.consecutive_failures == 0
    assert seen[-1] == (State.HALF_OPEN, State.CLOSED)


def test_a_failed_probe_reopens_for_a_whole_new_period() -> None:
    breaker, clock, seen = make(open_duration=10.0, success_threshold=3)
    trip(breaker)
    clock.advance(10)
    permit(breaker).succeeded()
    permit(breaker).failed()  # one failure is enough, whatever the threshold
    assert breaker.state is State.OPEN
    assert rejection(breaker).retry_after == 10
    assert seen[-1] == (State.HALF_OPEN, State.OPEN)
    clock.advance(10)
    assert breaker.state is State.HALF_OPEN


def test_a_released_probe_frees_its_slot_and_counts_nothing() -> None:
    breaker, clock, seen = make()
    trip(breaker)
    clock.advance(10)
    probe = permit(breaker)
    rejection(breaker)
    probe.released()
    assert breaker.state is State.HALF_OPEN
    assert breaker.probes_in_flight == 0
    permit(breaker).succeeded()
    assert breaker.state is State.CLOSED
    assert (State.HALF_OPEN, State.OPEN) not in seen


def test_a_released_closed_permit_counts_nothing() -> None:
    breaker, _, _ = make(failure_threshold=2)
    permit(breaker).failed()
    permit(breaker).released()
    assert breaker.consecutive_failures == 1
    permit(breaker).failed()
    assert breaker.state is State.OPEN


def test_an_outcome_is_reported_once() -> None:
    breaker, _, _ = make(failure_threshold=2)
    p = permit(breaker)
    p.failed()
    p.failed()
    p.released()
    p.succeeded()
    assert breaker.consecutive_failures == 1
    assert p.done


# -- stale outcomes: only applied to the state they were admitted in -----------------


def test_stale_closed_failure_does_not_extend_the_open_period() -> None:
    breaker, clock, seen = make(failure_threshold=2, open_duration=10.0)
    slow = permit(breaker)
    trip(breaker)
    clock.advance(6)
    slow.failed()
    assert breaker.retry_after() == 4
    assert seen == [(State.CLOSED, State.OPEN)]


def test_stale_closed_outcome_does_not_count_as_a_probe() -> None:
    breaker, clock, _ = make(failure_threshold=2)
    slow_ok, slow_bad = permit(breaker), permit(breaker)
    trip(breaker)
    clock.advance(10)
    assert breaker.state is State.HALF_OPEN
    slow_ok.succeeded()
    assert breaker.state is State.HALF_OPEN  # not closed by a request that was no probe
    slow_bad.failed()
    assert breaker.state is State.HALF_OPEN  # nor re-opened
    assert breaker.probes_in_flight == 0


def test_stale_release_does_not_free_a_probe_slot() -> None:
    breaker, clock, _ = make(failure_threshold=1)
    slow = permit(breaker)
    trip(breaker)
    clock.advance(10)
    probe = permit(breaker)
    slow.released()
    assert breaker.probes_in_flight == 1
    rejection(breaker)
    probe.succeeded()


def test_stale_probe_from_an_earlier_half_open_is_ignored() -> None:
    breaker, clock, _ = make(half_open_requests=2, success_threshold=1)
    trip(breaker)
    clock.advance(10)
    old_probe = permit(breaker)
    permit(breaker).failed()  # re-opens: a new generation
    clock.advance(10)
    assert breaker.state is State.HALF_OPEN
    old_probe.succeeded()
    assert breaker.state is State.HALF_OPEN
    assert breaker.probes_in_flight == 0


def test_stale_failure_after_close_does_not_count() -> None:
    breaker, clock, _ = make(failure_threshold=1)
    trip(breaker)
    clock.advance(10)
    probe_a = permit(breaker)
    probe_a.succeeded()
    assert breaker.state is State.CLOSED
    probe_a.failed()  # a second report on the same permit
    assert breaker.consecutive_failures == 0


def test_every_transition_bumps_the_generation() -> None:
    breaker, clock, _ = make(failure_threshold=1)
    g0 = breaker.generation
    trip(breaker)
    clock.advance(10)
    _ = breaker.state
    permit(breaker).succeeded()
    assert breaker.generation == g0 + 3


@pytest.mark.parametrize("threshold", [1, 2, 7])
def test_full_cycle_for_thresholds(threshold: int) -> None:
    breaker, clock, seen = make(failure_threshold=threshold, open_duration=30)
    for _ in range(threshold - 1):
        permit(breaker).failed()
    assert breaker.state is State.CLOSED
    permit(breaker).failed()
    clock.advance(30)
    permit(breaker).succeeded()
    assert seen == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
