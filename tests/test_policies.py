"""The policies as pure objects: the token bucket, the bulkhead, the breaker's recovery ramp.

Time is a fake clock the tests move; counts are exact.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.breaker import Breaker, BreakerSettings, Permit, Rejection, State
from sidecar.policies import (
    Bulkhead,
    BulkheadSettings,
    RateLimitSettings,
    RecoverySettings,
    RetryBudget,
    RetrySettings,
    TokenBucket,
    retry_after,
)
from tests.fakes import FakeClock

# -- the token bucket ----------------------------------------------------------------


def bucket(
    rate: str = "10/1", burst: int | None = None, mode: str = "enforce"
) -> tuple[TokenBucket, FakeClock]:
    count, period = rate.split("/")
    clock = FakeClock()
    settings = RateLimitSettings(int(count), float(period), burst or int(count), mode)  # type: ignore[arg-type]
    return TokenBucket(settings, clock), clock


def admitted(b: TokenBucket, n: int) -> int:
    return sum(1 for _ in range(n) if b.take() == 0.0)


def test_a_full_bucket_admits_its_burst_then_its_rate() -> None:
    b, clock = bucket("10/1")
    assert admitted(b, 100) == 10
    assert b.tokens == 0
    clock.advance(1)
    assert admitted(b, 100) == 10
    clock.advance(0.5)
    assert admitted(b, 100) == 5


def test_a_slow_rate_refills_without_drift() -> None:
    b, clock = bucket("100/60")  # a token every 0.6 s
    assert admitted(b, 1000) == 100
    for _ in range(100):
        clock.advance(0.6)
        assert admitted(b, 3) == 1
    clock.advance(60)
    assert admitted(b, 1000) == 100


def test_the_wait_is_the_time_to_the_next_token() -> None:
    b, clock = bucket("100/60")
    admitted(b, 100)
    assert b.take() == pytest.approx(0.6)
    clock.advance(0.5)
    assert b.take() == pytest.approx(0.1)
    assert retry_after(b.take()) == 1  # never 0
    b2, _ = bucket("1/3600")
    b2.take()
    assert retry_after(b2.take()) == 3600


def test_burst_caps_what_an_idle_bucket_saves() -> None:
    b, clock = bucket("10/1", burst=3)
    assert admitted(b, 10) == 3
    clock.advance(3600)
    assert admitted(b, 10) == 3
    assert b.tokens == 0


def test_a_shadow_bucket_admits_all_and_counts_what_it_would_limit() -> None:
    b, clock = bucket("10/1", mode="shadow")
    assert admitted(b, 25) == 25
    assert b.shadow_limited == 15
    clock.advance(1)
    assert admitted(b, 12) == 12
    assert b.shadow_limited == 17


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 50),
    period=st.sampled_from([0.1, 0.6, 1.0, 7.0, 60.0]),
    burst=st.integers(1, 80),
    steps=st.lists(
        st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 30)), min_size=1, max_size=60
    ),
)
def test_never_more_than_burst_plus_rate_times_t(
    count: int, period: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    """Over any span of time t, at most burst + rate * t requests pass."""
    clock = FakeClock()
    b = TokenBucket(RateLimitSettings(count, period, burst), clock)
    passed: list[float] = []  # when each admitted request passed
    for gap, asks in steps:
        clock.advance(gap)
        passed += [clock.now] * admitted(b, asks)
    rate = count / period
    for i, start in enumerate(passed):
        for j in range(i, len(passed)):
            span = passed[j] - start
            assert j - i + 1 <= burst + rate * span + 1e-6


# -- the bulkhead ----------------------------------------------------------------------


class Waiting:
    def __init__(self, log: list[str], name: str, wants: bool = True) -> None:
        self.log, self.name, self.wants = log, name, wants

    def grant(self) -> bool:
        self.log.append(self.name)
        return self.wants


def test_a_bulkhead_grants_freed_slots_in_arrival_order() -> None:
    log: list[str] = []
    b = Bulkhead(BulkheadSettings(2, max_queued=2))
    assert b.try_enter()
    assert b.try_enter()
    assert not b.try_enter()
    first, second, third = Waiting(log, "1"), Waiting(log, "2"), Waiting(log, "3")
    assert b.queue(first) and b.queue(second)
    assert not b.queue(third)  # the queue is full
    assert (b.in_flight, b.queued) == (2, 2)
    b.release()
    assert log == ["1"] and (b.in_flight, b.queued) == (2, 1)
    b.release()
    assert log == ["1", "2"] and (b.in_flight, b.queued) == (2, 0)
    b.release()
    b.release()
    assert (b.in_flight, b.queued) == (0, 0) and b.try_enter()


def test_a_waiter_that_leaves_takes_no_slot_and_one_that_declines_passes_it_on() -> None:
    log: list[str] = []
    b = Bulkhead(BulkheadSettings(1, max_queued=3))
    assert b.try_enter()
    gone, declines, takes = (
        Waiting(log, "gone"),
        Waiting(log, "declines", False),
        Waiting(log, "takes"),
    )
    for w in (gone, declines, takes):
        assert b.queue(w)
    b.leave(gone, 0.25)
    assert b.queued == 2 and b.wait_count == 1 and b.wait_sum == 0.25
    b.release()
    assert log == ["declines", "takes"] and (b.in_flight, b.queued) == (1, 0)


def test_a_grant_whose_request_ends_at_once_lets_the_next_one_in_without_recursing() -> None:
    b = Bulkhead(BulkheadSettings(1, max_queued=1000))
    granted = []

    class EndsAtOnce:
        def grant(self) -> bool:
            granted.append(self)
            b.release()  # its exchange failed at once and gave the slot back
            return True

    assert b.try_enter()
    for _ in range(1000):
        b.queue(EndsAtOnce())
    b.release()
    assert len(granted) == 1000 and (b.in_flight, b.queued) == (0, 0)


def test_a_bigger_bulkhead_after_a_reload_lets_waiters_in() -> None:
    log: list[str] = []
    b = Bulkhead(BulkheadSettings(1, max_queued=2))
    assert b.try_enter()
    b.queue(Waiting(log, "a"))
    b.queue(Waiting(log, "b"))
    b.resize(BulkheadSettings(3, max_queued=2))
    assert log == ["a", "b"] and b.in_flight == 3


# -- the recovery ramp -----------------------------------------------------------------


def ramped(
    clock: FakeClock, ramp: float = 10.0, min_share: str = "1/10", **breaker: object
) -> Breaker:
    settings = BreakerSettings(
        **{  # type: ignore[arg-type]
            "failure_threshold": 1,
            "open_duration": 30.0,
            "half_open_requests": 1,
            "success_threshold": 1,
            "failure_status": frozenset({500}),
            **breaker,
        }
    )
    return Breaker("api", settings, clock, lambda: 0.0, RecoverySettings(ramp, Fraction(min_share)))


def trip_and_recover(b: Breaker, clock: FakeClock) -> None:
    permit = b.acquire()
    assert isinstance(permit, Permit)
    permit.failed()
    assert b.state is State.OPEN
    clock.advance(b.open_period or 0)
    probe = b.acquire()
    assert isinstance(probe, Permit) and probe.state is State.HALF_OPEN
    probe.succeeded()
    assert b.state is State.CLOSED


def outcomes(b: Breaker, n: int) -> tuple[int, int]:
    """(admitted, shed) of `n` requests now; the admitted ones succeed."""
    ok = 0
    for _ in range(n):
        permit = b.acquire()
        if isinstance(permit, Permit):
            ok += 1
            permit.succeeded()
        else:
            assert (permit.state, permit.retry_after) == (State.CLOSED, 1)
    return ok, n - ok


def test_the_ramp_admits_a_share_rising_linearly_to_all() -> None:
    clock = FakeClock()
    b = ramped(clock)
    assert b.recovery_share == 1.0
    trip_and_recover(b, clock)
    assert b.recovering and b.recovery_share == pytest.approx(0.1)
    assert outcomes(b, 100) == (10, 90)
    clock.advance(5)  # half way: 10 % + 90 % / 2
    assert b.recovery_share == pytest.approx(0.55)
    assert outcomes(b, 100) == (55, 45)
    clock.advance(5)
    assert b.recovery_share == 1.0 and not b.recovering
    assert outcomes(b, 100) == (100, 0)


def test_a_relapse_during_the_ramp_reopens_with_the_backoff_carried_on() -> None:
    clock = FakeClock()
    b = ramped(clock, backoff_multiplier=2.0, max_open_duration=300.0)
    trip_and_recover(b, clock)
    clock.advance(1)
    while True:  # the first request the ramp admits fails
        permit = b.acquire()
        if isinstance(permit, Permit):
            break
    permit.failed()
    assert b.state is State.OPEN and b.open_period == 60.0  # backed off, not reset to 30
    assert not b.recovering
    clock.advance(60)
    probe = b.acquire()
    assert isinstance(probe, Permit)
    probe.succeeded()
    clock.advance(10)  # the ramp completes: the backoff starts afresh
    assert b.recovery_share == 1.0
    b.acquire().failed()  # type: ignore[union-attr]
    assert b.open_period == 30.0


def test_reset_and_auto_skip_the_ramp_and_shadow_sheds_nothing() -> None:
    clock = FakeClock()
    b = ramped(clock)
    trip_and_recover(b, clock)
    b.force(None)  # an operator's `auto` during the ramp: full traffic
    assert not b.recovering and outcomes(b, 10) == (10, 0)
    trip_and_recover(b, clock)
    b.reset()
    assert not b.recovering and outcomes(b, 10) == (10, 0)
    b.force(State.FORCED_OPEN)
    b.force(None)  # FORCED_OPEN -> CLOSED: no ramp either
    assert not b.recovering

    shadow = ramped(clock, mode="shadow")
    trip_and_recover(shadow, clock)
    assert shadow.recovering and outcomes(shadow, 100) == (100, 0)
    assert shadow.shadow_rejections == 90


def test_check_takes_nothing_and_the_ramp_decides_once() -> None:
    clock = FakeClock()
    b = ramped(clock, half_open_requests=1)
    b.acquire().failed()  # type: ignore[union-attr]
    assert isinstance(b.check(), Rejection)
    clock.advance(30)
    assert b.check() is None and b.check() is None  # HALF_OPEN: no probe slot taken
    probe = b.acquire()
    assert isinstance(probe, Permit)
    refused = b.check()
    assert isinstance(refused, Rejection) and refused.state is State.HALF_OPEN
    probe.succeeded()
    verdicts = [b.check() for _ in range(10)]  # 10 % admitted
    assert sum(v is None for v in verdicts) == 1
    # Granted after queueing: the ramp let it in already.
    assert isinstance(b.acquire(ramp=False), Permit)


# -- the retry budget ------------------------------------------------------------------


def budget(ratio: str = "1/5", floor: float = 1.0) -> tuple[RetryBudget, FakeClock]:
    clock = FakeClock()
    settings = RetrySettings(
        attempts=3,
        retry_on_kinds=frozenset({"connect"}),
        retry_on_statuses=frozenset(),
        methods=frozenset({b"GET"}),
        per_try_timeout=None,
        deadline=None,
        backoff_base=0.025,
        backoff_max=0.25,
        budget_ratio=Fraction(ratio),
        budget_min_per_second=floor,
        replay_max_body=0,
    )
    return RetryBudget(settings, clock), clock


def retries_admitted(b: RetryBudget, most: int = 10_000) -> int:
    n = 0
    while n < most and b.admits():
        b.withdraw()
        n += 1
    return n


def test_the_budget_admits_ratio_times_requests_plus_the_floor_over_ten_seconds() -> None:
    b, clock = budget()
    for _ in range(100):
        b.deposit(clock.now)
    assert retries_admitted(b) == 20 + 10  # 20 % of 100, and 1/s x 10 s
    assert b.figures() == (100, 30, 0)
    clock.advance(9)  # the same window still
    assert retries_admitted(b) == 0
    clock.advance(1)  # 10 s on: its requests no longer count, its retries still do
    assert b.figures() == (0, 30, 0)
    assert retries_admitted(b) == 0
    clock.advance(1)  # gone whole
    assert b.figures() == (0, 0, 10)
    assert retries_admitted(b) == 10


def test_no_ten_seconds_see_more_retries_than_the_budget_allows() -> None:
    """The floor alone (ratio 0, 1/s): 10 retries in any 10 s, never 20 across a bucket's
    edge."""
    b, clock = budget(ratio="0", floor=1.0)
    clock.advance(0.99)
    assert retries_admitted(b) == 10
    clock.advance(9.01)  # t = 10.0: 9.01 s after those ten
    assert retries_admitted(b) == 0
    clock.advance(1)
    assert retries_admitted(b) == 10


def test_an_idle_budget_forgets_in_constant_time() -> None:
    b, clock = budget(floor=0)
    for _ in range(50):
        b.deposit(clock.now)
    clock.advance(1e9)
    assert b.figures() == (0, 0, 0)
    assert retries_admitted(b) == 0
