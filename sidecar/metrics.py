"""Prometheus metrics: the contract's series, in a registry the app owns.

The request path only adds to plain integers in each route's `RouteMetrics`;
a collector turns them into series at scrape time. (prometheus-client's own
Counter and Histogram take a lock and check exemplars on every update, which
cost the proxy more than its routing and its breaker together.) Every route has
all of its series from start-up, before any traffic. Breaker state is read at
scrape time too, so that an OPEN route whose period has passed shows HALF_OPEN
with no traffic at all.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.breaker import MODES, Breaker, State
from sidecar.policies import (
    QUEUE_WAIT_BUCKETS,
    REJECT_REASONS,
    RETRY_DENIALS,
    Bulkhead,
    FallbackSettings,
    RetrySettings,
    TokenBucket,
)
from sidecar.tls import TlsSettings

__all__ = ["FAILURE_KINDS", "REJECT_REASONS", "Metrics", "RouteMetrics", "Sessions"]

FAILURE_KINDS = ("status", "connect", "timeout", "tls", "reset")
TRANSITIONS = (
    (State.CLOSED, State.OPEN),
    (State.OPEN, State.HALF_OPEN),
    (State.HALF_OPEN, State.OPEN),
    (State.HALF_OPEN, State.CLOSED),
)
PRECREATED_CODES = (429, 502, 503, 504)
"""The statuses the sidecar answers itself, so that alerts on them see a 0 before the first."""
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BUCKET_LABELS = (*(repr(float(bound)) for bound in DURATION_BUCKETS), "+Inf")
_WAIT_LABELS = (*(repr(float(bound)) for bound in QUEUE_WAIT_BUCKETS), "+Inf")


class Sessions:
    """A route's long-lived relays: WebSocket sessions and CONNECT tunnels."""

    __slots__ = ("admitted", "tunnels", "websocket")

    def __init__(self) -> None:
        self.admitted = 0
        """Admitted and not ended, handshakes and connects in progress too: the count
        `max_websocket_sessions` caps."""
        self.websocket = 0
        """WebSocket sessions open (after their 101)."""
        self.tunnels = 0
        """CONNECT tunnels open (after their 200)."""


class RouteMetrics:
    """One route's numbers, updated by the proxy without locks or label look-ups."""

    __slots__ = (
        "bucket",
        "bulkhead",
        "duration_buckets",
        "duration_count",
        "duration_sum",
        "failures",
        "fallbacks",
        "in_flight",
        "name",
        "rejected",
        "requests",
        "retries",
        "retries_denied",
        "sessions",
        "slow_calls",
        "tls",
        "tls_server",
        "transitions",
        "tries",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = dict.fromkeys(PRECREATED_CODES, 0)
        """Responses sent to clients, by status code."""
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.transitions = dict.fromkeys(TRANSITIONS, 0)
        self.in_flight = 0
        self.slow_calls = 0
        """Upstream exchanges that took longer than `slow_call_duration`."""
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.duration_count = 0
        self.fallbacks: dict[str, int] = {}
        """Fallbacks served, by the reason they stood in for."""
        self.bucket: TokenBucket | None = None
        self.bulkhead: Bulkhead | None = None
        self.tries = {"success": 0, "failure": 0}
        """Tries sent upstream, by what the breaker heard of them."""
        self.retries = {"connect": 0}
        """Retries sent, by the failure kind or status that caused them."""
        self.retries_denied = dict.fromkeys(RETRY_DENIALS, 0)
        self.sessions = Sessions()
        """Handed on to the route's next metrics when a reload resets them: the sessions
        open carry on."""
        self.tls: TlsSettings | None = None
        self.tls_server = ""
        """The name the upstream's certificate is checked against."""

    def track(
        self,
        bucket: TokenBucket | None,
        bulkhead: Bulkhead | None,
        fallback: FallbackSettings | None,
        retry: RetrySettings | None,
        tls: TlsSettings | None = None,
        tls_server: str = "",
    ) -> None:
        """Export the route's policies' figures (from start-up, and after each reload)."""
        self.tls = tls
        self.tls_server = tls_server
        self.bucket = bucket
        self.bulkhead = bulkhead
        for reason in fallback.reasons if fallback is not None else ():
            self.fallbacks.setdefault(reason, 0)
        if retry is not None:
            for kind in retry.retry_on_kinds:
                self.retries.setdefault(kind, 0)
            for status in sorted(retry.retry_on_statuses):
                self.retries.setdefault(str(status), 0)

    def count_response(self, status: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1

    def observe_duration(self, seconds: float) -> None:
        self.duration_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        self.duration_count += 1


class Metrics:
    """All of the sidecar's series, exported through `registry`."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        self.registry = registry
        self.version = version
        self.unrouted = 0
        """Requests that no route matched."""
        self.routes: list[RouteMetrics] = []
        """The routes whose series are exported: replaced whole when the config is."""
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = 0.0
        """Unix time of the last successful load of the config, at start-up or reload."""
        self._breakers: Callable[[], Iterable[Breaker]] = list
        registry.register(_Collector(self))

    def watch(self, breakers: Callable[[], Iterable[Breaker]]) -> None:
        """Read breaker state from `breakers()` at every scrape."""
        self._breakers = breakers

    def new_route(self, breaker: Breaker) -> RouteMetrics:
        """A route's numbers, following its breaker's transitions; exported once it is
        in `routes`."""
        route = RouteMetrics(breaker.name)
        transitions = route.transitions

        def count(_breaker: Breaker, from_state: State, to_state: State) -> None:
            # Overrides add pairs beyond the precreated four (closed -> forced_open, ...).
            key = (from_state, to_state)
            transitions[key] = transitions.get(key, 0) + 1

        breaker.add_listener(count)
        return route

    def breakers(self) -> Iterable[Breaker]:
        return self._breakers()


class _Collector(Collector):
    """Every series, made from the numbers at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the names depend on nothing but this module: nothing to check early

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        # States first: a period that ended since the last request turns HALF_OPEN
        # here, so its transition is counted in this very scrape.
        state = GaugeMetricFamily(
            "sidecar_breaker_state",
            "1 for the route's current circuit state, 0 for the others.",
            labels=["route", "state"],
        )
        consecutive = GaugeMetricFamily(
            "sidecar_breaker_consecutive_failures",
            "The route's current count of consecutive upstream failures.",
            labels=["route"],
        )
        mode = GaugeMetricFamily(
            "sidecar_breaker_mode",
            "1 for the route's breaker mode (enforce, shadow), 0 for the other; a shadow "
            "route's state is reported, never acted on.",
            labels=["route", "mode"],
        )
        failure_rate = GaugeMetricFamily(
            "sidecar_breaker_failure_rate",
            "Failures / outcomes in the route's window, 0..1; -1 below min_requests "
            "or without a window.",
            labels=["route"],
        )
        slow_call_rate = GaugeMetricFamily(
            "sidecar_breaker_slow_call_rate",
            "Slow calls / outcomes in the route's window, 0..1; -1 below min_requests "
            "or without a window.",
            labels=["route"],
        )
        shadow = CounterMetricFamily(
            "sidecar_breaker_shadow_rejections",
            "Requests a shadow-mode route forwarded that enforcing would have rejected.",
            labels=["route"],
        )
        recovery = GaugeMetricFamily(
            "sidecar_recovery_share",
            "The share of requests the route's recovery ramp admits now, 0..1; 1 when not "
            "recovering.",
            labels=["route"],
        )
        for breaker in metrics.breakers():
            name = breaker.name
            recovery.add_metric([name], breaker.recovery_share)
            current = breaker.state
            for s in State:
                state.add_metric([name, s.value], 1.0 if s is current else 0.0)
            consecutive.add_metric([name], float(breaker.consecutive_failures))
            for m in MODES:
                mode.add_metric([name, m], 1.0 if m == breaker.settings.mode else 0.0)
            rates = breaker.rates()
            failure_rate.add_metric([name], -1.0 if rates is None else rates[0])
            slow_call_rate.add_metric([name], -1.0 if rates is None else rates[1])
            shadow.add_metric([name], breaker.shadow_rejections)

        transitions = CounterMetricFamily(
            "sidecar_breaker_transitions",
            "Circuit breaker state changes.",
            labels=["route", "from_state", "to_state"],
        )
        requests = CounterMetricFamily(
            "sidecar_requests",
            "Responses sent to clients, by route and status code, rejections included.",
            labels=["route", "code"],
        )
        rejected = CounterMetricFamily(
            "sidecar_rejected_requests",
            "Requests answered without contacting the upstream.",
            labels=["route", "reason"],
        )
        failures = CounterMetricFamily(
            "sidecar_upstream_failures",
            "Upstream exchanges that counted as breaker failures, by kind.",
            labels=["route", "kind"],
        )
        duration = HistogramMetricFamily(
            "sidecar_upstream_request_duration_seconds",
            "Time from the end of the request body sent upstream to the response headers.",
            labels=["route"],
        )
        in_flight = GaugeMetricFamily(
            "sidecar_in_flight_requests",
            "Requests being forwarded to the upstream now.",
            labels=["route"],
        )
        slow_calls = CounterMetricFamily(
            "sidecar_upstream_slow_calls",
            "Upstream exchanges that took longer than the route's slow_call_duration.",
            labels=["route"],
        )
        fallbacks = CounterMetricFamily(
            "sidecar_fallback_responses",
            "Fallback answers served in place of the sidecar's own, by the reason replaced.",
            labels=["route", "reason"],
        )
        shadow_limited = CounterMetricFamily(
            "sidecar_rate_limit_shadow_limited",
            "Requests a shadow-mode rate limit forwarded that enforcing would have limited.",
            labels=["route"],
        )
        tokens = GaugeMetricFamily(
            "sidecar_rate_limit_tokens",
            "Tokens in the route's rate-limit bucket now.",
            labels=["route"],
        )
        bulkhead_in_flight = GaugeMetricFamily(
            "sidecar_bulkhead_in_flight_requests",
            "Bulkhead slots taken now (requests in flight to the upstream).",
            labels=["route"],
        )
        bulkhead_queued = GaugeMetricFamily(
            "sidecar_bulkhead_queued_requests",
            "Requests waiting in the route's bulkhead queue now.",
            labels=["route"],
        )
        queue_wait = HistogramMetricFamily(
            "sidecar_bulkhead_queue_wait_seconds",
            "Time requests spent in the bulkhead queue, however they left it.",
            labels=["route"],
        )
        tries = CounterMetricFamily(
            "sidecar_upstream_tries",
            "Tries sent upstream (first tries and retries), by the breaker's verdict.",
            labels=["route", "result"],
        )
        retries = CounterMetricFamily(
            "sidecar_retries",
            "Retries sent, by the failure kind or status of the try they followed.",
            labels=["route", "reason"],
        )
        retries_denied = CounterMetricFamily(
            "sidecar_retries_denied",
            "Tries that failed in a way the route retries, not retried, by why not.",
            labels=["route", "reason"],
        )
        websocket_sessions = GaugeMetricFamily(
            "sidecar_websocket_sessions",
            "WebSocket sessions open now (after their 101).",
            labels=["route"],
        )
        connect_tunnels = GaugeMetricFamily(
            "sidecar_connect_tunnels",
            "CONNECT tunnels open now.",
            labels=["route"],
        )
        client_cert_expiry = GaugeMetricFamily(
            "sidecar_tls_client_cert_expiry_timestamp_seconds",
            "Unix time the route's configured client certificate expires.",
            labels=["route"],
        )
        upstream_cert_expiry = GaugeMetricFamily(
            "sidecar_upstream_tls_cert_expiry_timestamp_seconds",
            "Unix time the upstream's certificate expires, as last seen on a new connection.",
            labels=["route"],
        )
        for route in metrics.routes:
            name = route.name
            websocket_sessions.add_metric([name], route.sessions.websocket)
            connect_tunnels.add_metric([name], route.sessions.tunnels)
            tls = route.tls
            if tls is not None:
                if tls.client_cert_expiry is not None:
                    client_cert_expiry.add_metric([name], tls.client_cert_expiry)
                seen = tls.context.not_after.get(route.tls_server) if tls.context else None
                if seen is not None:
                    upstream_cert_expiry.add_metric([name], seen)
            for result, n in route.tries.items():
                tries.add_metric([name, result], n)
            for reason, n in route.retries.items():
                retries.add_metric([name, reason], n)
            for reason, n in route.retries_denied.items():
                retries_denied.add_metric([name, reason], n)
            for reason, n in route.fallbacks.items():
                fallbacks.add_metric([name, reason], n)
            bucket = route.bucket
            if bucket is not None:
                shadow_limited.add_metric([name], bucket.shadow_limited)
                tokens.add_metric([name], bucket.tokens)
            bulkhead = route.bulkhead
            if bulkhead is not None:
                bulkhead_in_flight.add_metric([name], bulkhead.in_flight)
                bulkhead_queued.add_metric([name], bulkhead.queued)
                waits = _cumulative(_WAIT_LABELS, bulkhead.wait_buckets)
                queue_wait.add_metric([name], waits, bulkhead.wait_sum)
            for (a, b), n in route.transitions.items():
                transitions.add_metric([name, a.value, b.value], n)
            for code, n in sorted(route.requests.items()):
                requests.add_metric([name, str(code)], n)
            for reason, n in route.rejected.items():
                rejected.add_metric([name, reason], n)
            for kind, n in route.failures.items():
                failures.add_metric([name, kind], n)
            buckets = _cumulative(_BUCKET_LABELS, route.duration_buckets)
            duration.add_metric([name], buckets, route.duration_sum)
            in_flight.add_metric([name], route.in_flight)
            slow_calls.add_metric([name], route.slow_calls)

        reloads = CounterMetricFamily(
            "sidecar_config_reloads",
            "Config reloads (SIGHUP or POST /reload), by result.",
            labels=["result"],
        )
        for result, n in metrics.reloads.items():
            reloads.add_metric([result], n)
        last_reload = GaugeMetricFamily(
            "sidecar_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load, at start-up or by reload.",
        )
        last_reload.add_metric([], metrics.last_reload_success)
        unrouted = CounterMetricFamily(
            "sidecar_unrouted_requests", "Requests that no route matched (answered 404)."
        )
        unrouted.add_metric([], metrics.unrouted)
        build_info = GaugeMetricFamily(
            "sidecar_build_info", "The running sidecar's version.", labels=["version"]
        )
        build_info.add_metric([metrics.version], 1)
        yield from (state, mode, consecutive, failure_rate, slow_call_rate, shadow, transitions)
        yield from (requests, rejected, failures, duration, in_flight, slow_calls)
        yield from (recovery, fallbacks, shadow_limited, tokens)
        yield from (bulkhead_in_flight, bulkhead_queued, queue_wait)
        yield from (tries, retries, retries_denied)
        yield from (websocket_sessions, connect_tunnels, client_cert_expiry, upstream_cert_expiry)
        yield from (unrouted, reloads, last_reload, build_info)


def _cumulative(labels: Sequence[str], counts: Sequence[int]) -> list[tuple[str, float]]:
    """A histogram's buckets as Prometheus has them: `le` labels, counts added up."""
    total = 0
    buckets: list[tuple[str, float]] = []
    for label, n in zip(labels, counts, strict=True):
        total += n
        buckets.append((label, total))
    return buckets
