"""The sliding windows, against a brute-force model of what they should hold."""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.window import TIME_WINDOW_BUCKETS, Counts, CountWindow, TimeWindow

# One step: move the clock on by `dt`, then either record an outcome or only read.
Step = tuple[float, bool, bool, bool]  # dt, record?, failed, slow
steps = st.lists(
    st.tuples(
        st.one_of(
            st.just(0.0),
            st.floats(min_value=0, max_value=5, allow_nan=False),
            st.floats(min_value=0, max_value=500, allow_nan=False),  # gaps past the window
        ),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    max_size=300,
)


def model_counts(outcomes: list[tuple[float, bool, bool]]) -> Counts:
    return Counts(
        len(outcomes),
        sum(failed for _, failed, _ in outcomes),
        sum(slow for _, _, slow in outcomes),
    )


def after_add(window: CountWindow | TimeWindow) -> Counts:
    """The counts as the breaker reads them right after `add`, without a read's eviction."""
    return Counts(window.total, window.failures, window.slow)


@given(size=st.integers(min_value=1, max_value=40), script=steps)
def test_count_window_holds_exactly_the_last_n_outcomes(size: int, script: list[Step]) -> None:
    window = CountWindow(size)
    seen: list[tuple[float, bool, bool]] = []
    now = 0.0
    for dt, record, failed, slow in script:
        now += dt
        if record:
            seen.append((now, failed, slow))
            window.add(now, failed, slow)
            assert after_add(window) == model_counts(seen[-size:])
        assert window.counts(now) == model_counts(seen[-size:])


@given(
    duration=st.sampled_from([0.05, 1.0, 7.5, 30.0, 300.0]),
    start=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    script=steps,
)
@settings(max_examples=300)
def test_time_window_holds_exactly_the_outcomes_of_its_live_buckets(
    duration: float, start: float, script: list[Step]
) -> None:
    window = TimeWindow(duration)
    width = duration / TIME_WINDOW_BUCKETS
    seen: list[tuple[float, bool, bool]] = []
    now = start
    for dt, record, failed, slow in script:
        now += dt
        if record:
            seen.append((now, failed, slow))
        # The model: every outcome whose bucket is one of the newest TIME_WINDOW_BUCKETS.
        newest = math.floor(now / width)
        live = [o for o in seen if math.floor(o[0] / width) > newest - TIME_WINDOW_BUCKETS]
        if record:
            window.add(now, failed, slow)
            assert after_add(window) == model_counts(live)
        assert window.counts(now) == model_counts(live)
        # ... which means the last `duration` seconds, less at most one bucket.
        assert all(now - t < duration + width for t, _, _ in live)
        assert len(live) >= sum(now - t < duration - width for t, _, _ in seen)


def test_time_window_forgets_with_no_traffic_at_all() -> None:
    window = TimeWindow(30.0)
    for _ in range(5):
        window.add(100.0, True, True)
    assert window.counts(100.0) == Counts(5, 5, 5)
    assert window.counts(128.0) == Counts(5, 5, 5)  # 28 s later: still in the window
    assert window.counts(131.5) == Counts(0, 0, 0)  # no write since: evicted on the read


def test_a_gap_of_any_length_is_one_step() -> None:
    window = TimeWindow(1.0)
    window.add(0.0, True, False)
    # 10^15 buckets later: a bucket-by-bucket eviction would never return.
    window.add(5e13, False, False)
    assert after_add(window) == Counts(1, 0, 0)
    assert window.counts(5e13 + 0.5) == Counts(1, 0, 0)


def test_clear_starts_afresh() -> None:
    for window in (CountWindow(5), TimeWindow(10.0)):
        window.add(1.0, True, True)
        window.clear()
        assert window.counts(1.0) == Counts(0, 0, 0)
        window.add(1.0, False, False)
        assert after_add(window) == Counts(1, 0, 0)


@pytest.mark.parametrize("make", [lambda: CountWindow(100), lambda: TimeWindow(30.0)])
def test_memory_does_not_grow_with_the_request_rate(make: object) -> None:
    assert callable(make)
    window = make()
    window.add(0.0, True, False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        now = 0.0
        for i in range(100_000):
            now += 0.001
            window.add(now, i % 3 == 0, i % 5 == 0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096  # a few ints, not one object per outcome


def test_windows_refuse_sizes_that_hold_nothing() -> None:
    with pytest.raises(ValueError):
        CountWindow(0)
    with pytest.raises(ValueError):
        TimeWindow(0.0)
    with pytest.raises(ValueError):
        TimeWindow(math.inf)
