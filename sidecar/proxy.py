"""The proxy handler: route, admit, and hand each admitted request to an `Exchange`.

A request's life, in order: the listener parses its head and calls `handle`;
the router picks its route; the checks that need no upstream answer at once
(no route 404, a declared body over `max_body_size` 413, an `Expect` other than
`100-continue` 417, a target that is not a path 400); the route's policies and
its breaker admit it or turn it away, in the contract's order: rate limit (429),
breaker state (503), recovery ramp (503), bulkhead (a slot now, or a wait in its
queue: `Queued`; 503 when full), breaker permit. Rejections come from a cache of
finished answers (or are the route's fallback). An admitted request becomes an
`Exchange` (`sidecar.exchange`), which forwards it and relays the answer, and
gives back its bulkhead slot at its end. What a client sees in each case is the
contract's table "What a client sees"; the answers the sidecar makes itself come
from `sidecar.responses`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from sidecar.breaker import Breaker, Clock, Rejection, State, StateListener
from sidecar.config import Route
from sidecar.exchange import Connect, Env, Exchange, Target, is_websocket, retry_after_seconds
from sidecar.listener import CONTENT_LENGTH, EXPECT, Request
from sidecar.logs import event
from sidecar.metrics import Metrics
from sidecar.policies import Bulkhead, RetryBudget, TokenBucket, retry_after
from sidecar.responses import Answer, error_answer
from sidecar.routing import Router, authority, upstream_target
from sidecar.timers import Ticker, Timer, Timers
from sidecar.upstream_pool import Pool

__all__ = ["Proxy", "Queued", "RouteChanges", "Target", "retry_after_seconds"]

log = logging.getLogger("sidecar")

REJECTION_CACHE_SIZE = 1024
"""Finished 503s kept per route: one per second of `Retry-After` counting down."""

_REJECT_REASONS = {
    State.OPEN: "circuit_open",
    State.HALF_OPEN: "circuit_half_open",
    State.FORCED_OPEN: "circuit_forced_open",
    State.CLOSED: "circuit_recovering",  # (shed by the recovery ramp)
}
_RECOVERING_KEY = -(2**62)
"""The cache key of the ramp's 503 (see `_rejection`), beyond any other."""

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Upstream answers whose `Retry-After` opens the route under `respect_retry_after`."""

_NO_ROUTE = error_answer(404, "no_route")
_status, _phrase, _lines, _body = error_answer(405, "connect_not_allowed")
_CONNECT_NOT_ALLOWED = (
    _status,
    _phrase,
    b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" + _lines,
    _body,
)
"""A CONNECT no route tunnels: the methods a route does take."""
_UNUSUAL = CONTENT_LENGTH | EXPECT
"""Headers that call for `Proxy._refusal`'s checks."""


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


class Proxy:
    """The proxy listener's request handler (`handle`), and the routes it serves."""

    def __init__(
        self,
        routes: Sequence[Route],
        metrics: Metrics,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._env: Env  # given by `attach` once a loop runs
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._listeners: list[StateListener] = []
        self._bulkheads: weakref.WeakSet[Bulkhead] = weakref.WeakSet()
        """Every bulkhead still in use, a reload's old ones too (their requests queue on)."""
        self.targets: list[Target] = []
        self._router: Router[Target] = Router([])
        self._tunnels: dict[tuple[str, int], Target] = {}
        """The routes that CONNECT may open a tunnel for, by (host, port)."""
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
            if old is not None and route.tls is not None and old.route.tls == route.tls:
                # The same settings and files: the same context, so its TLS sessions, the
                # pooled connections (the same pool key) and the certificate last seen.
                route = dataclasses.replace(route, tls=old.route.tls)
            if old is not None and old.route.breaker == settings:
                breaker, route_metrics = old.breaker, old.metrics
                same = old.route == dataclasses.replace(route, line=old.route.line)
                (changes.kept if same else changes.updated).append(route.name)
            else:
                breaker = Breaker(route.name, settings, self._clock, self._rand, route.recovery)
                route_metrics = self._metrics.new_route(breaker)
                if old is not None:  # the sessions open carry on, counted
                    route_metrics.sessions = old.metrics.sessions
                for listener in self._listeners:
                    breaker.add_listener(listener)
                (changes.added if old is None else changes.reset).append(route.name)
            breaker.recovery = route.recovery
            # Unchanged settings keep their bucket (its tokens) and budget (its counts).
            bucket = _kept_or_new(
                old.bucket if old else None, route.rate_limit, TokenBucket, self._clock
            )
            bulkhead = None
            if route.bulkhead is not None:
                bulkhead = old.bulkhead if old is not None else None
                if bulkhead is None:
                    bulkhead = Bulkhead(route.bulkhead)
                    self._bulkheads.add(bulkhead)
                else:  # the slots held and the queue carry on, within the new limits
                    bulkhead.resize(route.bulkhead)
            budget = _kept_or_new(
                old.budget if old else None, route.retry, RetryBudget, self._clock
            )
            tls = route.tls
            route_metrics.track(
                bucket,
                bulkhead,
                route.fallback,
                route.retry,
                tls,
                (tls.server_name if tls is not None else None) or route.upstream.host,
            )
            targets.append(
                Target(
                    route=route,
                    breaker=breaker,
                    metrics=route_metrics,
                    origin=origin_key(route),
                    slow_after=settings.slow_after,
                    retry_after_statuses=(
                        RETRY_AFTER_STATUSES if settings.respect_retry_after else frozenset()
                    ),
                    verbatim=not route.upstream.base_path
                    and (not route.strip_prefix or route.path_prefix in (None, "/")),
                    bucket=bucket,
                    bulkhead=bulkhead,
                    budget=budget,
                )
            )
        changes.removed = list(previous)
        router = Router([(t.route, t) for t in targets])
        tunnels: dict[tuple[str, int], Target] = {}
        for target in targets:
            route = target.route
            if route.connect and route.host is not None:
                # No fallback ever answers a CONNECT: a client reads any 2xx as the tunnel
                # open. The same breaker, policies and counts; its own answers.
                tunnels.setdefault(
                    (route.host, route.upstream.port),
                    dataclasses.replace(
                        target, route=dataclasses.replace(route, fallback=None), answers={}
                    ),
                )
        # The swap: no await in between, so every request sees the old set or the new.
        self.targets, self._router, self._tunnels = targets, router, tunnels
        self._metrics.routes = [t.metrics for t in targets]
        env = getattr(self, "_env", None)
        if env is not None:  # connections to what no route names any more, or by old TLS
            env.pool.retain(
                {t.origin for t in targets} | {tunnel_origin(t.route) for t in tunnels.values()}
            )
        return changes

    def add_transition_listener(self, listener: StateListener) -> None:
        """Call `listener` on every state change of every route's breaker, now and after
        any reconfiguration."""
        self._listeners.append(listener)
        for target in self.targets:
            target.breaker.add_listener(listener)

    def attach(self, pool: Pool, timers: Timers) -> None:
        """Forward through `pool`, with deadlines on `timers`, from now on."""
        self._env = Env(pool, self._clock, timers, self._rand)

    @property
    def ticker(self) -> Ticker:
        return self._env.ticker

    def detach(self) -> None:
        """Stop the deadline ticker (the sidecar is stopping)."""
        self._env.ticker.close()

    @property
    def breakers(self) -> list[Breaker]:
        return [t.breaker for t in self.targets]

    def match(self, request: Request) -> tuple[Target | None, str, bytes | None]:
        """The request's route (None: none matches), its path and query, and the host
        it is routed by."""
        path = request.target.decode("latin-1")
        host = request.host
        if path[:1] != "/" and path != "*":
            # Absolute form (`GET http://host/x`): matched, as RFC 9112 3.2.2 says, by
            # the host it names rather than the Host header, and by its path; then
            # sent to the route's upstream like any other request, never to that host.
            path, host = _absolute_form(path)
        return self._router.match(host, path.partition("?")[0]), path, host

    def handle(self, request: Request) -> None:
        """Answer `request` (the listener's handler): at once, or through an `Exchange`."""
        upgrade = request.upgrade_tail is not None  # an upgrade request, or CONNECT
        if upgrade and request.method == b"CONNECT":
            self._connect(request)
            return
        target, path, host = self.match(request)
        if target is None:
            self._metrics.unrouted += 1
            request.answer(*_NO_ROUTE)
            return
        request.route = target.route.name
        if upgrade and _sessions_at_cap(target, request):
            request.answer(*_full(target, "websocket_sessions_full"))
            return
        if request.noted & _UNUSUAL:  # a body, `Expect`: checks most requests need not make
            refused = self._refusal(request, target)
            if refused is not None:
                target.metrics.count_response(refused[0])
                request.answer(*refused, close=True)
                return
        if target.verbatim and path[:1] == "/" and request.target[:1] == b"/":
            upstream_path = request.target
        else:
            upstream_path = upstream_target(target.route, path).encode("latin-1")
            if upstream_path[:1] != b"/":
                # `OPTIONS *`: no origin-form target to send (the upstream has its own `*`).
                target.metrics.count_response(400)
                request.answer(*target.error(400, "bad_request"), close=True)
                return
        bulkhead = None
        if target.policed:  # the route's policies before its breaker, in the contract's order
            bucket = target.bucket
            if bucket is not None:
                wait = bucket.take()
                if wait:
                    request.answer(*_rate_limited(target, retry_after(wait)))
                    return
            bulkhead = target.bulkhead
            if bulkhead is not None and not bulkhead.try_enter():
                self._wait(request, target, upstream_path, host, bulkhead)
                return
        permit = target.breaker.acquire()  # state, ramp and permit at once
        if isinstance(permit, Rejection):
            if bulkhead is not None:
                bulkhead.in_flight -= 1  # the slot just taken (nobody waits for it)
            request.answer(*_rejection(target, permit))
            return
        # From here the exchange owns the permit (and the slot): every end of the request
        # is its to make.
        Exchange(request, target, permit, self._env, bulkhead).start(upstream_path, host)

    def _connect(self, request: Request) -> None:
        """CONNECT host:port: a tunnel to the route's own upstream address, for a route
        with `connect: true` whose host and upstream port those are; else 405. Admitted
        as any request is (the rate limit, the breaker, a bulkhead slot while it
        connects, but no queue), then `Connect` opens it."""
        where = _authority(request.target)
        target = self._tunnels.get(where) if where is not None else None
        if target is None:
            self._metrics.unrouted += 1  # (no route tunnels it: as good as no route)
            request.answer(*_CONNECT_NOT_ALLOWED, close=True)
            return
        request.route = target.route.name
        if target.metrics.sessions.admitted >= target.route.max_websocket_sessions:
            request.answer(*_full(target, "websocket_sessions_full"), close=True)
            return
        bucket = target.bucket
        if bucket is not None:
            wait = bucket.take()
            if wait:
                request.answer(*_rate_limited(target, retry_after(wait)), close=True)
                return
        bulkhead = target.bulkhead
        if bulkhead is not None and not bulkhead.try_enter():
            request.answer(*_full(target, "bulkhead_full"), close=True)
            return
        permit = target.breaker.acquire()
        if isinstance(permit, Rejection):
            if bulkhead is not None:
                bulkhead.in_flight -= 1
            request.answer(*_rejection(target, permit), close=True)
            return
        Connect(request, target, permit, self._env, bulkhead).start()

    def turn_away_queued(self) -> None:
        """Answer every request waiting for a bulkhead slot (the sidecar is stopping): 503
        `bulkhead_full`, which a client may retry elsewhere, for nothing went upstream."""
        for bulkhead in list(self._bulkheads):
            bulkhead.turn_away_queued()

    def _wait(
        self, request: Request, target: Target, path: bytes, host: bytes | None, bulkhead: Bulkhead
    ) -> None:
        """No slot free: the breaker is asked first, taking nothing (a rejection never
        waits, and a probe slot is never held while waiting); then the queue, if there is
        room in it."""
        rejection = target.breaker.check()
        if rejection is not None:
            request.answer(*_rejection(target, rejection))
            return
        queued = Queued(request, target, path, host, self._env, bulkhead)
        if not bulkhead.queue(queued):
            request.answer(*_full(target, "bulkhead_full"))
            return
        queued.wait()

    @staticmethod
    def _refusal(request: Request, target: Target) -> Answer | None:
        """What refuses a request before the breaker or the upstream hear of it."""
        limit = target.route.max_body_size
        if limit is not None and (request.content_length or 0) > limit:
            # Said up front (and, with `Expect: 100-continue`, before the client sends a
            # byte of it).
            return target.error(413, "body_too_large")
        expect = request.expect
        if expect is not None and expect.lower() != b"100-continue":
            return target.error(417, "expectation_failed")
        return None


_Settings = TypeVar("_Settings")
_Counter = TypeVar("_Counter", TokenBucket, RetryBudget)


def _kept_or_new(
    old: _Counter | None,
    settings: _Settings | None,
    new: Callable[[_Settings, Clock], _Counter],
    clock: Clock,
) -> _Counter | None:
    """`old` if its settings are `settings`, else one made anew; None without settings."""
    if settings is None:
        return None
    if old is not None and old.settings == settings:
        return old
    return new(settings, clock)


def _rejection(target: Target, rejection: Rejection) -> Answer:
    """The breaker's 503 (or the route's fallback for it), counted."""
    # Keyed by an int, not by (State, int): an Enum hashes in Python, not C.
    # OPEN's are keyed by Retry-After, HALF_OPEN's by 0, FORCED_OPEN's below 0.
    state = rejection.state
    key = rejection.retry_after
    if state is not State.OPEN:
        if state is State.HALF_OPEN:
            key = 0
        elif state is State.CLOSED:
            key = _RECOVERING_KEY
        else:
            key = -key
    reason = _REJECT_REASONS[state]
    answers = target.answers
    answer = answers.get(key)
    if answer is None:
        answer = target.make_answer(503, reason, rejection.retry_after)
        if len(answers) < REJECTION_CACHE_SIZE:
            answers[key] = answer
    return _rejected(target, reason, answer)


def _rejected(target: Target, reason: str, answer: Answer) -> Answer:
    """Count a rejection for `reason`, answered with `answer`; logged at debug level."""
    metrics = target.metrics
    metrics.rejected[reason] += 1
    if target.route.fallback is None:
        metrics.requests[answer[0]] += 1  # (429 and 503 are there from the start)
    else:
        target.count_answer(answer, reason)
    if log.isEnabledFor(logging.DEBUG):
        event(
            log,
            logging.DEBUG,
            "rejected",
            f"route {target.route.name}: {reason}",
            route=target.route.name,
            reason=reason,
        )
    return answer


def _rate_limited(target: Target, seconds: int) -> Answer:
    """429, `Retry-After` the seconds until the next token (or the route's fallback)."""
    key = ("rate_limited", seconds)
    answers = target.answers
    answer = answers.get(key)
    if answer is None:
        answer = target.make_answer(429, "rate_limited", seconds)
        settings = target.bucket.settings if target.bucket is not None else None
        window = 0.0 if settings is None else settings.period * settings.burst / settings.count
        if answer[0] == 429 and window.is_integer() and window >= 1:
            # The IETF draft's headers (draft-ietf-httpapi-ratelimit-headers): the quota
            # (a full bucket, refilled in `w` seconds), and none of it left for `t`.
            assert settings is not None
            name = target.route.name.encode()
            status, phrase, lines, body = answer
            lines += b'RateLimit-Policy: "%s";q=%d;w=%d\r\n' % (name, settings.burst, window)
            lines += b'RateLimit: "%s";r=0;t=%d\r\n' % (name, seconds)
            answer = status, phrase, lines, body
        if len(answers) < REJECTION_CACHE_SIZE:
            answers[key] = answer
    return _rejected(target, "rate_limited", answer)


def _sessions_at_cap(target: Target, request: Request) -> bool:
    """Whether `request` is a WebSocket handshake its route has no room for."""
    return target.metrics.sessions.admitted >= target.route.max_websocket_sessions and is_websocket(
        request
    )


def _full(target: Target, reason: str) -> Answer:
    """503 `reason` (`bulkhead_full`, `websocket_sessions_full`), `Retry-After: 1` (or
    the route's fallback), made once."""
    answers = target.answers
    answer = answers.get(reason)
    if answer is None:
        answer = answers[reason] = target.make_answer(503, reason, 1)
    return _rejected(target, reason, answer)


class Queued:
    """A request waiting in its route's bulkhead queue: for a slot, for `queue_timeout`
    at most, or until its client goes away (it then leaves the queue at once). It holds
    no probe slot and no permit: the breaker is asked again when the slot comes."""

    __slots__ = (
        "_bulkhead",
        "_env",
        "_generation",
        "_host",
        "_path",
        "_request",
        "_since",
        "_target",
        "_timer",
    )

    def __init__(
        self,
        request: Request,
        target: Target,
        path: bytes,
        host: bytes | None,
        env: Env,
        bulkhead: Bulkhead,
    ) -> None:
        self._request = request
        self._target = target
        self._path = path
        self._host = host
        self._env = env
        self._bulkhead = bulkhead
        self._since = env.timers.time()
        self._timer: Timer | None = None
        self._generation = target.breaker.generation
        """The breaker's when the recovery ramp let it through (`check`, on arrival)."""

    def wait(self) -> None:
        self._request.listener = self
        timeout = self._bulkhead.settings.queue_timeout
        self._timer = self._env.timers.call_at(self._since + timeout, self._timed_out)

    def _waited(self) -> float:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._request.listener = None
        return self._env.timers.time() - self._since

    def grant(self) -> bool:
        self._bulkhead.observe_wait(self._waited())
        request = self._request
        if not request.connected:
            return False  # gone (it is being cut off): nothing to forward for it
        target = self._target
        if request.upgrade_tail is not None and _sessions_at_cap(target, request):
            request.answer(*_full(target, "websocket_sessions_full"))  # filled while it waited
            return False
        breaker = target.breaker
        try:
            # The ramp let it through on arrival, unless the route has opened and closed
            # into a new ramp since.
            permit = breaker.acquire(ramp=breaker.generation != self._generation)
            if isinstance(permit, Rejection):
                request.answer(*_rejection(target, permit))  # the route opened meanwhile
                return False
        except Exception as e:  # a bug: the slot must not be lost with it
            self.crashed(e)
            return False
        Exchange(request, target, permit, self._env, self._bulkhead).start(self._path, self._host)
        return True

    def turn_away(self) -> None:
        self._bulkhead.observe_wait(self._waited())
        self._request.answer(*_full(self._target, "bulkhead_full"), close=True)

    def _timed_out(self) -> None:
        self._timer = None
        self._bulkhead.leave(self, self._waited())
        self._request.answer(*_full(self._target, "bulkhead_full"))

    def client_gone(self) -> None:
        self._bulkhead.leave(self, self._waited())

    def client_writable(self, writable: bool) -> None:
        pass

    def crashed(self, error: Exception) -> None:
        log.exception("error handling a queued request", exc_info=error)
        self._bulkhead.leave(self, self._waited())  # (if it is still in the queue)
        self._request.fail()


def origin_key(route: Route) -> str:
    """The pool's key for a route's upstream: its origin, and for https, which TLS
    settings (a reload's new certificates make new connections)."""
    tls = route.tls
    origin = route.upstream.origin
    return origin if tls is None or tls.context is None else f"{origin}#{id(tls.context)}"


def tunnel_origin(route: Route) -> str:
    """Where a CONNECT for `route` goes: its upstream's address, as plain TCP."""
    return f"http://{authority(route.upstream.host, route.upstream.port)}"


def _authority(target: bytes) -> tuple[str, int] | None:
    """A CONNECT's `host:port` (the host lower case, without brackets), if it is one."""
    text = target.decode("latin-1").strip().lower()
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    return host.rstrip("."), int(port)


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
    if port == {"http": 80, "https": 443}.get(parts.scheme):
        port = None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return path, authority(host, port).encode()
