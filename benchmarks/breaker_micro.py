"""Issue 3's micro-benchmark: one breaker decision, ours against pybreaker's, in one process.

    python benchmarks/breaker_micro.py [--rounds 9] [--calls 200000]

Each setup is timed around a no-op "upstream call", and its cost per call is
reported after subtracting the bare loop:

    sidecar-time-window    acquire() + permit.succeeded(), time window and both rate
                           rules on (the configuration the issue names)
    sidecar-count-window   the same with a count window
    sidecar-consecutive    acquire() + succeeded() with only the consecutive rule
    pybreaker              CircuitBreaker.call(noop), its default in-memory storage

The setups run interleaved, in an order that rotates each round, and the
report gives the median ns per call and the ratio of each to pybreaker's
(lower is better; the issue's bar is < 1 for the time window). Needs
`pip install pybreaker` (the `test` extra has it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from fractions import Fraction

import pybreaker

from sidecar.breaker import Breaker, BreakerSettings, WindowSettings


def noop() -> None:
    pass


def ours(window: WindowSettings | None) -> Callable[[int], None]:
    settings = BreakerSettings(
        failure_threshold=5,
        open_duration=30.0,
        half_open_requests=1,
        success_threshold=1,
        failure_status=frozenset({500, 502, 503, 504}),
        window=window,
        failure_rate=Fraction(1, 2) if window else None,
        slow_call_duration=2.0 if window else None,
        slow_call_rate=Fraction(4, 5) if window else None,
    )
    breaker = Breaker("bench", settings, time.monotonic)

    def run(n: int) -> None:
        acquire = breaker.acquire
        for _ in range(n):
            permit = acquire()
            noop()
            permit.succeeded(0.001)  # type: ignore[union-attr]  # always CLOSED here

    return run


def theirs() -> Callable[[int], None]:
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    def run(n: int) -> None:
        call = breaker.call
        for _ in range(n):
            call(noop)

    return run


def bare() -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            noop()

    return run


SETUPS: dict[str, Callable[[], Callable[[int], None]]] = {
    "sidecar-time-window": lambda: ours(
        WindowSettings(duration=30.0, requests=None, min_requests=20)
    ),
    "sidecar-count-window": lambda: ours(
        WindowSettings(duration=None, requests=100, min_requests=20)
    ),
    "sidecar-consecutive": lambda: ours(None),
    "pybreaker": theirs,
}


def measure(run: Callable[[int], None], calls: int) -> float:
    """Seconds for `calls` calls of `run`'s body."""
    started = time.perf_counter()
    run(calls)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()

    runs = {name: make() for name, make in SETUPS.items()}
    loop = bare()
    for run in (*runs.values(), loop):
        run(10_000)  # warm up
    per_call: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            overhead = measure(loop, args.calls)
            per_call[name].append((measure(runs[name], args.calls) - overhead) / args.calls)

    base = statistics.median(per_call["pybreaker"])
    print(f"{args.rounds} rounds x {args.calls} calls; ns per call, the bare loop subtracted")
    print(f"{'setup':<22} {'median':>8} {'min':>8} {'max':>8} {'/ pybreaker':>12}")
    for name in names:
        times = per_call[name]
        median = statistics.median(times)
        print(
            f"{name:<22} {median * 1e9:8.0f} {min(times) * 1e9:8.0f} {max(times) * 1e9:8.0f}"
            f" {median / base:12.2f}"
        )


if __name__ == "__main__":
    main()
