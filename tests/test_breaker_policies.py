"""The breaker's rate rules, slow calls, backoff, jitter, upstream Retry-After and shadow mode.

Every test drives a fake clock, and a scripted or seeded random source.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.breaker import (
    Breaker,
    BreakerSettings,
    Permit,
    Rejection,
    State,
    WindowSettings,
    format_percent,
)
from tests.fakes import FakeClock

BASE: dict[str, Any] = {
    "failure_threshold": None,
    "open_duration": 10.0,
    "half_open_requests": 1,
    "success_threshold": 1,
    "failure_status": frozenset({500}),
}


def make(
    rand: Callable[[], float] = lambda: 0.0, **settings: Any
) -> tuple[Breaker, FakeClock, list[str]]:
    """A breaker from `BASE` and `settings`; the list collects "from->to: reason"."""
    clock = FakeClock()
    breaker = Breaker("r", BreakerSettings(**{**BASE, **settings}), clock, rand)
    log: list[str] = []
    breaker.add_listener(lambda b, a, z: log.append(f"{a.value}->{z.value}: {b.reason}"))
    return breaker, clock, log


def window(
    requests: int | None = None, duration: float | None = None, min_requests: int = 1
) -> WindowSettings:
    return WindowSettings(duration=duration, requests=requests, min_requests=min_requests)


def permit(breaker: Breaker) -> Permit:
    p = breaker.acquire()
    assert isinstance(p, Permit), f"expected a permit in {breaker.state}"
    return p


def outcomes(breaker: Breaker, pattern: str, elapsed: float = 0.0) -> None:
    """Report one outcome per letter: F failed, S succeeded."""
    for letter in pattern:
        p = permit(breaker)
        p.failed(elapsed) if letter == "F" else p.succeeded(elapsed)


def reopen_from_half_open(breaker: Breaker, clock: FakeClock) -> float:
    """Wait out the period, fail the probe; the new period in force."""
    left = breaker.retry_after()
    assert left is not None
    clock.advance(breaker.open_period or 0)
    permit(breaker).failed()
    assert breaker.state is State.OPEN
    return breaker.open_period or 0


# -- the window's floor and the rate rules ----------------------------------------


@pytest.mark.parametrize("min_requests", [1, 2, 5, 20])
def test_min_requests_is_a_floor_even_at_100_percent_failures(min_requests: int) -> None:
    breaker, _, log = make(
        window=window(requests=50, min_requests=min_requests), failure_rate=Fraction(1, 2)
    )
    outcomes(breaker, "F" * (min_requests - 1))
    assert breaker.state is State.CLOSED
    assert breaker.rates() is None  # below the floor, there is no rate to speak of
    outcomes(breaker, "F")
    assert breaker.state is State.OPEN
    assert log == [f"closed->open: failure rate 100 % >= 50 % over {min_requests} requests"]


@pytest.mark.parametrize(
    ("rate", "pattern", "trips"),
    [
        (Fraction(3, 10), "SSSSSSSFFF", True),  # exactly 30 %: inclusive, and exact
        (Fraction(3, 10), "SSSSSSSSFF", False),  # 20 %
        (Fraction(1, 2), "SFSFSFSFSF", True),  # 50 % at the 10th outcome
        (Fraction(1, 2), "SSSSSSFFFF", False),  # 40 %
        (Fraction(1), "FFFFFFFFFS", False),  # 100 % means every one
        (Fraction(1), "FFFFFFFFFF", True),
        (Fraction(1, 3), "SSSSSSFFFF", True),  # 40 % >= 33.3 %
    ],
)
def test_failure_rate_is_inclusive_and_exact(rate: Fraction, pattern: str, trips: bool) -> None:
    breaker, _, _ = make(window=window(requests=10, min_requests=10), failure_rate=rate)
    outcomes(breaker, pattern)
    assert (breaker.state is State.OPEN) is trips


def test_the_count_window_forgets_the_oldest_outcome() -> None:
    breaker, _, _ = make(window=window(requests=4, min_requests=4), failure_rate=Fraction(3, 4))
    outcomes(breaker, "FFSSFS")  # the window now holds S S F S: 25 %
    assert breaker.window_counts() == (4, 1, 0)
    outcomes(breaker, "FF")  # F S F F: 75 %
    assert breaker.state is State.OPEN


def test_the_time_window_forgets_by_time_even_with_no_traffic() -> None:
    breaker, clock, _ = make(
        window=window(duration=10.0, min_requests=3), failure_rate=Fraction(1, 2)
    )
    outcomes(breaker, "FF")
    assert breaker.window_counts() == (2, 2, 0)
    clock.advance(10.5)
    assert breaker.window_counts() == (0, 0, 0)  # read, not written: still evicted
    outcomes(breaker, "F")  # one failure in a fresh window: below the floor of 3
    assert breaker.state is State.CLOSED
    outcomes(breaker, "SF")  # 2 of 3
    assert breaker.state is State.OPEN


def test_slow_call_rate_trips_on_slow_successes() -> None:
    breaker, _, log = make(
        window=window(requests=10, min_requests=4),
        slow_call_duration=2.0,
        slow_call_rate=Fraction(3, 4),
    )
    outcomes(breaker, "SS", elapsed=2.0)  # 2.0 s is not *longer* than 2 s
    outcomes(breaker, "SS", elapsed=0.1)
    assert breaker.window_counts() == (4, 0, 0)
    outcomes(breaker, "SSSSS", elapsed=2.5)  # 5 of 9 slow: 56 %
    assert breaker.state is State.CLOSED
    outcomes(breaker, "SSS", elapsed=2.5)  # of the last 10, 8 slow
    assert breaker.state is State.OPEN
    assert log == ["closed->open: slow-call rate 80 % >= 75 % over 10 requests"]


def test_a_slow_failure_is_both_slow_and_a_failure() -> None:
    breaker, _, _ = make(
        window=window(requests=10, min_requests=10),
        failure_rate=Fraction(1),
        slow_call_duration=1.0,
        slow_call_rate=Fraction(1, 2),
    )
    outcomes(breaker, "F", elapsed=5.0)
    outcomes(breaker, "S", elapsed=5.0)
    outcomes(breaker, "F", elapsed=0.5)
    assert breaker.window_counts() == (3, 2, 2)


def test_whichever_rule_trips_first_opens() -> None:
    breaker, _, log = make(
        failure_threshold=3,
        window=window(requests=100, min_requests=50),
        failure_rate=Fraction(1, 10),
    )
    outcomes(breaker, "FFF")
    assert log == ["closed->open: 3 consecutive failures"]

    breaker, _, log = make(
        failure_threshold=5, window=window(requests=4, min_requests=4), failure_rate=Fraction(1, 2)
    )
    outcomes(breaker, "SFSF")
    assert log == ["closed->open: failure rate 50 % >= 50 % over 4 requests"]


def test_failure_threshold_null_leaves_only_the_rates() -> None:
    breaker, _, _ = make(window=window(requests=1000, min_requests=1000), failure_rate=Fraction(1))
    outcomes(breaker, "F" * 999)
    assert breaker.state is State.CLOSED
    assert breaker.consecutive_failures == 999  # still counted, for /breakers and metrics


def test_closing_starts_a_fresh_window_and_probes_never_enter_it() -> None:
    breaker, clock, _ = make(
        window=window(requests=10, min_requests=4),
        failure_rate=Fraction(1, 2),
        half_open_requests=3,
        success_threshold=3,
    )
    outcomes(breaker, "SFFF")
    assert breaker.state is State.OPEN
    clock.advance(10)
    probes = [permit(breaker) for _ in range(3)]
    for p in probes:
        p.succeeded()
    assert breaker.state is State.CLOSED
    assert breaker.window_counts() == (0, 0, 0)  # not the 4 before, nor the 3 probes
    outcomes(breaker, "FFF")  # 3 failures: below the floor of a fresh window
    assert breaker.state is State.CLOSED


def test_outcomes_of_requests_admitted_before_a_close_stay_out_of_the_new_window() -> None:
    breaker, clock, _ = make(
        window=window(requests=10, min_requests=2), failure_rate=Fraction(1, 2)
    )
    early = permit(breaker)
    outcomes(breaker, "FF")
    clock.advance(10)
    permit(breaker).succeeded()
    assert breaker.state is State.CLOSED
    early.failed()
    assert breaker.window_counts() == (0, 0, 0)


# -- slow probes -----------------------------------------------------------------


def test_a_slow_probe_reopens_when_the_slow_call_rule_is_on() -> None:
    breaker, clock, log = make(
        window=window(requests=2, min_requests=2),
        slow_call_duration=1.0,
        slow_call_rate=Fraction(1),
    )
    outcomes(breaker, "SS", elapsed=3.0)
    clock.advance(10)
    permit(breaker).succeeded(3.0)
    assert breaker.state is State.OPEN
    assert log[-1] == "half_open->open: probe slow (3 s > 1 s)"
    clock.advance(10)
    permit(breaker).succeeded(0.2)
    assert breaker.state is State.CLOSED


def test_a_slow_probe_is_a_success_when_only_failures_count() -> None:
    breaker, clock, _ = make(failure_threshold=1, slow_call_duration=1.0)
    outcomes(breaker, "F")
    clock.advance(10)
    permit(breaker).succeeded(30.0)
    assert breaker.state is State.CLOSED


# -- backoff and jitter ------------------------------------------------------------


def test_backoff_grows_each_reopen_from_half_open_up_to_the_cap_and_closing_resets() -> None:
    breaker, clock, log = make(failure_threshold=1, backoff_multiplier=2.0, max_open_duration=60.0)
    outcomes(breaker, "F")
    assert breaker.open_period == 10
    assert breaker.retry_after() == 10
    periods = [reopen_from_half_open(breaker, clock) for _ in range(4)]
    assert periods == [20, 40, 60, 60]
    assert breaker.retry_after() == 60  # Retry-After tells the period in force
    clock.advance(60)
    permit(breaker).succeeded()
    assert breaker.state is State.CLOSED
    outcomes(breaker, "F")
    assert breaker.open_period == 10  # closing reset the backoff
    assert log[:2] == [
        "closed->open: 1 consecutive failures",
        "open->half_open: open period of 10 s over",
    ]
    assert log[2] == "half_open->open: probe failed"


def test_without_max_open_duration_there_is_no_growth() -> None:
    breaker, clock, _ = make(failure_threshold=1, backoff_multiplier=3.0)
    outcomes(breaker, "F")
    assert reopen_from_half_open(breaker, clock) == 10


def test_backoff_never_overflows() -> None:
    breaker, clock, _ = make(
        failure_threshold=1, backoff_multiplier=100.0, max_open_duration=3600.0
    )
    outcomes(breaker, "F")
    for _ in range(400):  # 100 ** 400 would be an OverflowError as a float
        period = reopen_from_half_open(breaker, clock)
    assert period == 3600


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 10.0), (0.5, 10.5), (0.999, 10.999)])
def test_jitter_stretches_the_period_by_the_drawn_fraction(draw: float, expected: float) -> None:
    breaker, clock, _ = make(rand=lambda: draw, failure_threshold=1, jitter=0.1)
    outcomes(breaker, "F")
    assert breaker.open_period == pytest.approx(expected)
    assert breaker.retry_after() == (11 if draw else 10)
    clock.advance(expected - 0.001)
    assert breaker.state is State.OPEN
    clock.advance(0.001)
    assert breaker.state is State.HALF_OPEN


@given(seed=st.integers(min_value=0, max_value=2**32))
def test_jitter_stays_within_bounds_after_backoff_and_cap(seed: int) -> None:
    rng = random.Random(seed)
    breaker, clock, _ = make(
        rand=rng.random,
        failure_threshold=1,
        backoff_multiplier=2.0,
        max_open_duration=40.0,
        jitter=0.25,
    )
    outcomes(breaker, "F")
    periods = [breaker.open_period or 0]
    periods += [reopen_from_half_open(breaker, clock) for _ in range(5)]
    for period, base in zip(periods, [10, 20, 40, 40, 40, 40], strict=True):
        assert base <= period < base * 1.25
    assert len(set(periods[2:])) > 1  # at the cap, still spread: no fleet in lockstep


# -- the upstream's Retry-After ----------------------------------------------------------


def test_an_upstream_retry_after_opens_for_that_long() -> None:
    breaker, clock, log = make(failure_threshold=5, max_open_duration=300.0)
    permit(breaker).failed(0.1, retry_after=42.0)
    assert breaker.state is State.OPEN
    assert breaker.retry_after() == 42
    assert log == ["closed->open: upstream asked to retry after 42 s"]
    clock.advance(42)
    assert breaker.state is State.HALF_OPEN


def test_an_upstream_retry_after_is_capped_by_max_open_duration() -> None:
    breaker, _, _ = make(failure_threshold=5, max_open_duration=120.0)
    permit(breaker).failed(retry_after=86400.0)
    assert breaker.retry_after() == 120


def test_an_upstream_retry_after_on_a_probe_reopens_for_that_long() -> None:
    breaker, clock, log = make(failure_threshold=1, max_open_duration=300.0)
    outcomes(breaker, "F")
    clock.advance(10)
    permit(breaker).failed(retry_after=90.0)
    assert breaker.retry_after() == 90
    assert log[-1] == "half_open->open: probe failed; upstream asked to retry after 90 s"


def test_a_stale_retry_after_does_not_move_the_period() -> None:
    breaker, _, _ = make(failure_threshold=5, max_open_duration=300.0)
    early = permit(breaker)
    permit(breaker).failed(retry_after=30.0)
    early.failed(retry_after=200.0)
    assert breaker.retry_after() == 30


def test_a_zero_retry_after_is_an_ordinary_failure() -> None:
    breaker, _, _ = make(failure_threshold=2, max_open_duration=300.0)
    permit(breaker).failed(retry_after=0.0)
    assert breaker.state is State.CLOSED
    assert breaker.consecutive_failures == 1


# -- shadow mode -----------------------------------------------------------------------


def test_shadow_mode_admits_everything_and_counts_what_it_would_have_rejected() -> None:
    breaker, clock, log = make(failure_threshold=2, mode="shadow")
    outcomes(breaker, "FF")
    assert breaker.state is State.OPEN
    assert breaker.retry_after() == 10
    for _ in range(3):
        p = permit(breaker)  # would have been a 503
        p.succeeded()  # and changes nothing
    assert breaker.state is State.OPEN
    assert breaker.shadow_rejections == 3
    clock.advance(10)
    probe = permit(breaker)
    assert probe.state is State.HALF_OPEN
    extra = permit(breaker)  # HALF_OPEN with its only slot taken: would have been a 503
    assert breaker.shadow_rejections == 4
    extra.failed()  # ignored
    probe.succeeded()
    assert breaker.state is State.CLOSED
    assert log == [
        "closed->open: 2 consecutive failures",
        "open->half_open: open period of 10 s over",
        "half_open->closed: 1 probe succeeded",
    ]


@given(
    script=st.lists(
        st.tuples(st.sampled_from("FSR"), st.floats(min_value=0, max_value=30)), max_size=60
    )
)
def test_shadow_mode_goes_through_the_same_states_as_enforcing(
    script: list[tuple[str, float]],
) -> None:
    """Fed the same traffic, a shadow breaker's state is what an enforcing one's would be."""
    settings = {
        "failure_threshold": 3,
        "window": window(requests=8, min_requests=4),
        "failure_rate": Fraction(1, 2),
        "backoff_multiplier": 2.0,
        "max_open_duration": 40.0,
    }
    enforcing, clock_e, log_e = make(**settings)
    shadow, clock_s, log_s = make(mode="shadow", **settings)
    for letter, dt in script:
        for breaker, clock in ((enforcing, clock_e), (shadow, clock_s)):
            clock.advance(dt)
            p = breaker.acquire()
            if isinstance(p, Rejection):
                continue
            if letter == "F":
                p.failed()
            elif letter == "S":
                p.succeeded()
            else:
                p.released()
        assert shadow.state is enforcing.state
    assert log_s == log_e


@pytest.mark.parametrize("start", [1000.0, 123456.789, 9876543.21, 1e9 + 0.1])
def test_retry_after_right_after_opening_is_the_whole_period(start: float) -> None:
    for step in range(200):
        breaker, clock, _ = make(failure_threshold=1, open_duration=30.0)
        clock.now = start + step * 0.0137
        outcomes(breaker, "F")
        assert breaker.retry_after() == 30, clock.now


def test_reading_the_open_period_never_moves_the_breaker_on() -> None:
    breaker, clock, log = make(failure_threshold=1)
    outcomes(breaker, "F")
    clock.advance(60)
    assert breaker.open_period == 10  # a listener told of OPEN may read it at any time
    assert log == ["closed->open: 1 consecutive failures"]
    assert breaker.state is State.HALF_OPEN
    assert breaker.open_period is None


@pytest.mark.parametrize(
    ("rate", "text"),
    [(Fraction(5, 8), "62.5 %"), (Fraction(1, 2), "50 %"), (Fraction(2, 3), "66.7 %"),
     (0.0004, "0.04 %"), (0.9996, "99.96 %"), (0, "0 %"), (1, "100 %")],
)  # fmt: skip
def test_percentages_are_shown_without_misleading_rounding(rate: Fraction, text: str) -> None:
    assert format_percent(rate) == text
