"""The proxy handler: route, admit, and hand each admitted request to an `Exchange`.

A request's life, in order: the listener parses its head and calls `handle`;
the router picks its route; the checks that need no upstream answer at once
(no route 404, a declared body over `max_body_size` 413, an `Expect` other than
`100-continue` 417, a target that is not a path 400); the breaker admits it
or rejects it (503, from a cache of finished answers); and an admitted request
becomes an `Exchange` (`sidecar.exchange`), which forwards it and relays the
answer. What a client sees in each case is the contract's table "What a client
sees"; the answers the sidecar makes itself come from `sidecar.responses`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sidecar.breaker import Breaker, Clock, Rejection, State, StateListener
from sidecar.config import Route
from sidecar.exchange import HOP_BY_HOP, Exchange, Target, retry_after_seconds
from sidecar.listener import Request
from sidecar.metrics import Metrics
from sidecar.responses import Answer, error_answer
from sidecar.routing import Router, upstream_target
from sidecar.timers import Ticker, Timers
from sidecar.upstream import CHUNKED, UpstreamRequest
from sidecar.upstream_pool import Pool

__all__ = ["Proxy", "RouteChanges", "Target", "retry_after_seconds", "upstream_lines"]

REJECTION_CACHE_SIZE = 1024
"""Finished 503s kept per route: one per second of `Retry-After` counting down."""

_REJECT_REASONS = {
    State.OPEN: "circuit_open",
    State.HALF_OPEN: "circuit_half_open",
    State.FORCED_OPEN: "circuit_forced_open",
}

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Upstream answers whose `Retry-After` opens the route under `respect_retry_after`."""

_NOT_FORWARDED_UP = HOP_BY_HOP | {
    b"host",  # the upstream's own
    b"expect",  # the sidecar answers `100-continue` itself
    b"content-length",  # framing: the upstream request's own (`UpstreamRequest.body`)
    b"x-forwarded-for",  # appended to
    b"x-forwarded-proto",  # set
    b"x-forwarded-host",  # set, or dropped: never a client's own claim passed on as ours
}

_NO_ROUTE = error_answer(404, "no_route")


@dataclass(slots=True)
class RouteChanges:
    """What `Proxy.reconfigure` did, by route name."""

    kept: list[str] = field(default_factory=list)
    """Unchanged."""
    updated: list[str] = field(default_factory=list)
    """Changed, but not their breaker settings: state and counts kept."""
    reset: list[str] = field(default_factory=list)
    """Breaker settings changed: a fresh breaker, CLOSED, and fresh counts."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def upstream_lines(request: Request, routed_host: bytes | None) -> bytes:
    """The request's header lines as they go upstream: without hop-by-hop headers, `Host`,
    `Expect` and framing, with `X-Forwarded-For` (appended), `-Proto` and `-Host` set.

    `routed_host`: the host the request was routed by (its Host header, or what an
    absolute-form target names).
    """
    out = []
    forwarded_for: bytes | None = None
    named: list[bytes] | None = None
    for name, value in request.headers:
        lower = name.lower()
        if lower in _NOT_FORWARDED_UP or lower[:6] == b"proxy-":
            if lower == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif lower == b"connection":
                for token in value.split(b","):
                    token = token.strip().lower()
                    if token and token not in (b"keep-alive", b"close"):
                        named = (named or []) + [token]
            continue
        out.append(b"%b: %b\r\n" % (name, value))
    if named:
        out = [line for line in out if line.split(b":", 1)[0].lower() not in named]
    client = request.remote
    if client:
        address = client.encode()
        forwarded_for = address if forwarded_for is None else forwarded_for + b", " + address
    if forwarded_for is not None:
        out.append(b"X-Forwarded-For: %b\r\n" % forwarded_for)
    out.append(b"X-Forwarded-Proto: http\r\n")
    if routed_host:
        out.append(b"X-Forwarded-Host: %b\r\n" % routed_host)
    return b"".join(out)


class Proxy:
    """The proxy listener's request handler (`handle`), and the routes it serves."""

    def __init__(
        self,
        routes: Sequence[Route],
        metrics: Metrics,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._pool: Pool  # given by `attach` once a loop runs
        self._timers: Timers  # the same
        self._ticker: Ticker  # the same
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._listeners: list[StateListener] = []
        self.targets: list[Target] = []
        self._router: Router[Target] = Router([])
        self.reconfigure(routes)
        metrics.watch(lambda: [t.breaker for t in self.targets])

    def reconfigure(self, routes: Sequence[Route]) -> RouteChanges:
        """Serve `routes` from now on; a route whose name and breaker settings are
        unchanged keeps its breaker (state, counts, override) and its metrics.

        Requests already in hand finish with the route they were matched to.
        """
        previous = {t.route.name: t for t in self.targets}
        changes = RouteChanges()
        targets = []
        for route in routes:
            settings = route.breaker
            old = previous.pop(route.name, None)
            if old is not None and old.route.breaker == settings:
                breaker, route_metrics = old.breaker, old.metrics
                same = old.route == dataclasses.replace(route, line=old.route.line)
                (changes.kept if same else changes.updated).append(route.name)
            else:
                breaker = Breaker(route.name, settings, self._clock, self._rand)
                route_metrics = self._metrics.new_route(breaker)
                for listener in self._listeners:
                    breaker.add_listener(listener)
                (changes.added if old is None else changes.reset).append(route.name)
            targets.append(
                Target(
                    route=route,
                    breaker=breaker,
                    metrics=route_metrics,
                    origin=route.upstream.origin,
                    slow_after=settings.slow_after,
                    retry_after_statuses=(
                        RETRY_AFTER_STATUSES if settings.respect_retry_after else frozenset()
                    ),
                )
            )
        changes.removed = list(previous)
        router = Router([(t.route, t) for t in targets])
        # The swap: no await in between, so every request sees the old set or the new.
        self.targets, self._router = targets, router
        self._metrics.routes = [t.metrics for t in targets]
        return changes

    def add_transition_listener(self, listener: StateListener) -> None:
        """Call `listener` on every state change of every route's breaker, now and after
        any reconfiguration."""
        self._listeners.append(listener)
        for target in self.targets:
            target.breaker.add_listener(listener)

    def attach(self, pool: Pool, timers: Timers) -> None:
        """Forward through `pool`, with deadlines on `timers`, from now on."""
        self._pool = pool
        self._timers = timers
        self._ticker = Ticker(timers)

    def detach(self) -> None:
        """Stop the deadline ticker (the sidecar is stopping)."""
        self._ticker.close()

    @property
    def breakers(self) -> list[Breaker]:
        return [t.breaker for t in self.targets]

    def match(self, request: Request) -> tuple[Target | None, str, bytes | None]:
        """The request's route (None: none matches), its path and query, and the host
        it is routed by."""
        raw_path = request.target.decode("latin-1")
        host = request.host
        if raw_path[:1] != "/" and raw_path != "*":
            # Absolute form (`GET http://host/x`): matched, as RFC 9112 3.2.2 says, by
            # the host it names rather than the Host header, and by its path; then
            # sent to the route's upstream like any other request, never to that host.
            raw_path, host = _absolute_form(raw_path)
        return (
            self._router.match(
                None if host is None else host.decode("latin-1"), raw_path.partition("?")[0]
            ),
            raw_path,
            host,
        )

    def handle(self, request: Request) -> None:
        """Answer `request` (the listener's handler): at once, or through an `Exchange`."""
        target, raw_path, host = self.match(request)
        if target is None:
            self._metrics.unrouted += 1
            request.answer(*_NO_ROUTE)
            return
        request.route = target.route.name
        metrics = target.metrics
        limit = target.route.max_body_size
        if limit is not None and (request.content_length or 0) > limit:
            # Said up front: refused before the breaker or the upstream hear of it (and,
            # with `Expect: 100-continue`, before the client sends a byte of it).
            metrics.count_response(413)
            request.answer(*target.error(413, "body_too_large"), close=True)
            return
        expect = request.expect
        if expect is not None and expect.lower() != b"100-continue":
            metrics.count_response(417)
            request.answer(*target.error(417, "expectation_failed"), close=True)
            return
        path = upstream_target(target.route, raw_path)
        if path[:1] != "/":
            # `OPTIONS *`: no origin-form target to send (the upstream has its own `*`).
            metrics.count_response(400)
            request.answer(*target.error(400, "bad_request"), close=True)
            return
        permit = target.breaker.acquire()
        if isinstance(permit, Rejection):
            request.answer(*self._rejection(target, permit))
            return
        if request.chunked:
            body: int | None = CHUNKED
        elif request.content_length is not None:
            body = request.content_length
        else:
            body = None
        exchange = Exchange(request, target, permit, self._clock, self._timers, self._ticker)
        try:
            upstream = UpstreamRequest(
                target.origin,
                request.method,
                path.encode("latin-1"),
                upstream_lines(request, host),
                body,
                target.route.timeouts.connect,
            )
        except BaseException:
            permit.released()  # a bug: nothing else holds the permit yet
            raise
        exchange.start(self._pool, upstream)

    @staticmethod
    def _rejection(target: Target, rejection: Rejection) -> Answer:
        # Keyed by an int, not by (State, int): an Enum hashes in Python, not C.
        # OPEN's are keyed by Retry-After, HALF_OPEN's by 0, FORCED_OPEN's below 0.
        state = rejection.state
        key = rejection.retry_after
        if state is not State.OPEN:
            key = 0 if state is State.HALF_OPEN else -key
        reason = _REJECT_REASONS[state]
        answers = target.answers
        answer = answers.get(key)
        if answer is None:
            answer = error_answer(503, reason, target.route.name, rejection.retry_after)
            if len(answers) < REJECTION_CACHE_SIZE:
                answers[key] = answer
        metrics = target.metrics
        metrics.rejected[reason] += 1
        metrics.requests[503] += 1
        return answer


def _absolute_form(target: str) -> tuple[str, bytes | None]:
    """An absolute-form target's path and query, and the host (and port, unless the
    scheme's default) it names: `http://a.example:8080/x?q` -> `/x?q`, `a.example:8080`."""
    try:
        parts = urlsplit(target)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return target, None
    if not host:
        return target, None
    name = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}.get(parts.scheme):
        name = f"{name}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return path, name.encode()
