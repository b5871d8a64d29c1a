"""Prometheus metrics: the contract's series, in a registry the app owns.

Every route gets all of its series at start-up, before any traffic, and the
proxy holds each route's label children (`RouteMetrics`) so that a request
never looks a label set up by name. Breaker state is read at scrape time by a
collector, so that an OPEN route whose period has passed shows HALF_OPEN with
no traffic at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.breaker import Breaker, State

__all__ = ["FAILURE_KINDS", "REJECT_REASONS", "Metrics", "RouteMetrics"]

FAILURE_KINDS = ("status", "connect", "timeout", "reset")
REJECT_REASONS = ("circuit_open", "circuit_half_open")
TRANSITIONS = (
    (State.CLOSED, State.OPEN),
    (State.OPEN, State.HALF_OPEN),
    (State.HALF_OPEN, State.OPEN),
    (State.HALF_OPEN, State.CLOSED),
)
PRECREATED_CODES = (502, 503, 504)
"""The statuses the sidecar answers itself, so that alerts on them see a 0 before the first."""
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class RouteMetrics:
    """One route's label children, bound once."""

    __slots__ = (
        "_requests",
        "_requests_by_code",
        "duration",
        "failures",
        "in_flight",
        "name",
        "rejected",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._requests = metrics.requests
        self._requests_by_code = {
            code: metrics.requests.labels(name, str(code)) for code in PRECREATED_CODES
        }
        self.rejected = {r: metrics.rejected.labels(name, r) for r in REJECT_REASONS}
        self.failures = {k: metrics.upstream_failures.labels(name, k) for k in FAILURE_KINDS}
        self.duration = metrics.upstream_duration.labels(name)
        self.in_flight = metrics.in_flight.labels(name)

    def count_response(self, status: int) -> None:
        child = self._requests_by_code.get(status)
        if child is None:
            child = self._requests_by_code[status] = self._requests.labels(self.name, str(status))
        child.inc()


class Metrics:
    """All of the sidecar's series, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        # `*_created` series double the exposition and no dashboard of ours reads them.
        # (prometheus-client only offers this switch process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self._breakers: Callable[[], Iterable[Breaker]] = list
        self.transitions = Counter(
            "sidecar_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["route", "from_state", "to_state"],
            registry=registry,
        )
        self.requests = Counter(
            "sidecar_requests_total",
            "Responses sent to clients, by route and status code, rejections included.",
            ["route", "code"],
            registry=registry,
        )
        self.rejected = Counter(
            "sidecar_rejected_requests_total",
            "Requests answered without contacting the upstream.",
            ["route", "reason"],
            registry=registry,
        )
        self.upstream_failures = Counter(
            "sidecar_upstream_failures_total",
            "Upstream exchanges that counted as breaker failures, by kind.",
            ["route", "kind"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests",
            "Requests being forwarded to the upstream now.",
            ["route"],
            registry=registry,
        )
        self.unrouted = Counter(
            "sidecar_unrouted_requests_total",
            "Requests that no route matched (answered 404).",
            registry=registry,
        )
        build_info = Gauge(
            "sidecar_build_info", "The running sidecar's version.", ["version"], registry=registry
        )
        build_info.labels(version).set(1)
        registry.register(_BreakerCollector(self))

    def watch(self, breakers: Callable[[], Iterable[Breaker]]) -> None:
        """Read breaker state from `breakers()` at every scrape."""
        self._breakers = breakers

    def add_route(self, breaker: Breaker) -> RouteMetrics:
        """Create every series of a route and follow its breaker's transitions."""
        name = breaker.name
        edges = {(a, b): self.transitions.labels(name, a.value, b.value) for a, b in TRANSITIONS}
        breaker.add_listener(lambda _b, from_state, to_state: edges[from_state, to_state].inc())
        return RouteMetrics(self, name)

    def breakers(self) -> Iterable[Breaker]:
        return self._breakers()


class _BreakerCollector(Collector):
    """`sidecar_breaker_state` and `sidecar_breaker_consecutive_failures`, read live."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield from self._families([])

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._metrics.breakers())

    @staticmethod
    def _families(breakers: Iterable[Breaker]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "sidecar_breaker_state",
            "1 for the route's current circuit state, 0 for the others.",
            labels=["route", "state"],
        )
        failures = GaugeMetricFamily(
            "sidecar_breaker_consecutive_failures",
            "The route's current count of consecutive upstream failures.",
            labels=["route"],
        )
        for breaker in breakers:
            current = breaker.state
            for s in State:
                state.add_metric([breaker.name, s.value], 1.0 if s is current else 0.0)
            failures.add_metric([breaker.name], float(breaker.consecutive_failures))
        yield state
        yield failures
