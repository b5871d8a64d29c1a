"""One admitted request, from the breaker's permit to its outcome: `Exchange`.

An exchange owns, from admission to the end, the breaker permit, the route's
in-flight count, the upstream call (and its connection) and the deadline, and
it ends in exactly one `close`: that returns the permit (with its outcome, if
the breaker has not heard one yet), lowers the count and lets the connection
go. No other code releases a permit or touches the count.

It runs on events, not in a task: the client's connection hands it the request
body as it comes and says when the client falls behind or goes away; the
upstream call hands it the answer's head, body and end, or an error. Whole and
streamed answers are relayed by the same code; back-pressure runs both ways
(the upload waits for the upstream, the answer for the client). A task is
started only where there is something to wait for: connecting to an upstream.

Whose fault a failure is decides what the breaker hears (the contract's "What a
client sees"): the upstream's failures are outcomes; a client that goes away,
stops sending its body, sends one too large or malformed, or stops reading, is
no outcome at all.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.breaker import Breaker, Clock, Permit, State
from sidecar.config import Route
from sidecar.listener import CONNECTION, Request, date_line
from sidecar.metrics import RouteMetrics
from sidecar.policies import Bulkhead, RetryBudget, RetrySettings, TokenBucket
from sidecar.responses import Answer, error_answer, fallback_answer
from sidecar.routing import authority
from sidecar.timers import Ticker, Timer, Timers
from sidecar.tunnel import Tunnel
from sidecar.upstream import (
    CHUNKED,
    IDEMPOTENT_METHODS,
    Call,
    UpstreamError,
    UpstreamRequest,
    UpstreamTimeout,
    send,
    translate,
)
from sidecar.upstream_pool import Pool

__all__ = [
    "HOP_BY_HOP",
    "Connect",
    "Env",
    "Exchange",
    "Target",
    "client_lines",
    "header_value",
    "is_websocket",
    "retry_after_seconds",
    "upstream_lines",
]

log = logging.getLogger("sidecar")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy",  # not hop-by-hop, but never meant for an upstream (httpoxy)
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Never forwarded either way (RFC 9110 7.6.1); nor is the `Proxy-*` family."""

_TIMER_RESOLUTION = 0.001
"""uvloop's timers tick in whole milliseconds: re-arming for less would spin until the tick."""


@dataclass(slots=True)
class Target:
    """Everything the request path needs for one route, built when the config loads."""

    route: Route
    breaker: Breaker
    metrics: RouteMetrics
    origin: str
    """The upstream's "scheme://host:port"."""
    slow_after: float
    """The route's `BreakerSettings.slow_after`, kept at hand for the request path."""
    retry_after_statuses: frozenset[int]
    """Statuses whose `Retry-After` the breaker hears: none unless `respect_retry_after`."""
    verbatim: bool
    """The upstream's path is the client's, as sent (no prefix stripped, no base path)."""
    judged: frozenset[int] = frozenset()
    """Statuses that tell the breaker more than success: `failure_status` and
    `retry_after_statuses` (set in `__post_init__`)."""

    bucket: TokenBucket | None = None
    """The route's rate limit."""
    bulkhead: Bulkhead | None = None
    budget: RetryBudget | None = None
    """The route's retry budget (with its `retry` policy)."""
    policed: bool = False
    """A rate limit or a bulkhead stands before the breaker (set in `__post_init__`)."""
    retry: RetrySettings | None = None
    """The route's retry policy (set in `__post_init__`)."""
    retry_statuses: frozenset[int] = frozenset()
    retry_timed: bool = False
    """The retry policy sets `per_try_timeout` or `deadline`."""

    answers: dict[object, Answer] = field(default_factory=dict)
    """Sidecar-made answers for this route, made once: rejections by their `Retry-After`
    (so that rejecting formats nothing), errors by name."""

    def __post_init__(self) -> None:
        retry = self.retry = self.route.retry
        if retry is not None:
            self.retry_statuses = retry.retry_on_statuses
            self.retry_timed = retry.per_try_timeout is not None or retry.deadline is not None
        self.judged = (
            self.route.breaker.failure_status | self.retry_after_statuses | self.retry_statuses
        )
        self.policed = self.bucket is not None or self.bulkhead is not None

    def error(self, status: int, error: str) -> Answer:
        answer = self.answers.get(error)
        if answer is None:
            answer = self.answers[error] = self.make_answer(status, error)
        return answer

    def make_answer(self, status: int, error: str, retry_after: int | None = None) -> Answer:
        """The sidecar's answer `error`, or the route's fallback for it."""
        fallback = self.route.fallback
        if fallback is not None and error in fallback.reasons:
            return fallback_answer(
                fallback.status, fallback.headers, fallback.body, error, retry_after
            )
        return error_answer(status, error, self.route.name, retry_after)

    def count_answer(self, answer: Answer, error: str) -> None:
        """Count a sidecar-made answer sent for `error` (a fallback's too)."""
        metrics = self.metrics
        metrics.count_response(answer[0])
        fallback = self.route.fallback
        if fallback is not None and error in fallback.reasons:
            metrics.fallbacks[error] = metrics.fallbacks.get(error, 0) + 1


class Env:
    """What every exchange of a proxy shares: the pool, the clocks, the deadline ticker."""

    __slots__ = ("clock", "pool", "rand", "ticker", "timers")

    def __init__(
        self,
        pool: Pool,
        clock: Clock,
        timers: Timers,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.rand = rand
        """Uniform in [0, 1): the retries' jitter."""
        """The breakers' clock, which times the upstream for them (and the metrics)."""
        self.timers = timers
        """The deadlines'."""
        self.ticker = Ticker(timers)


def upstream_lines(request: Request, routed_host: bytes | None) -> bytes:
    """The request's header lines as they go upstream: those the listener passes on (no
    hop-by-hop headers, `Host`, `Expect` or framing), less any a `Connection` header
    names, with `X-Forwarded-For` (appended to), `-Proto` and `-Host` set.

    `routed_host`: the host the request was routed by (its Host header, or what an
    absolute-form target names).
    """
    lines = request.lines
    if request.noted & CONNECTION and request.connection is not None:
        named = _named_by_connection(request.connection)
        if named:
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in named]
    forwarded_for = request.forwarded_for
    client = request.remote
    if client:
        address = client.encode()
        forwarded_for = address if forwarded_for is None else forwarded_for + b", " + address
    own = b"" if forwarded_for is None else b"X-Forwarded-For: %b\r\n" % forwarded_for
    own += b"X-Forwarded-Proto: http\r\n"
    if routed_host:
        own += b"X-Forwarded-Host: %b\r\n" % routed_host
    return b"".join(lines) + own


def _named_by_connection(value: bytes) -> set[bytes]:
    """The header names a `Connection` header's value lists (lower case): hop-by-hop for
    this message. Its `keep-alive` and `close` options name none."""
    return {t.strip() for t in value.lower().split(b",")} - {b"keep-alive", b"close", b""}


def client_lines(block: bytes) -> tuple[bytes, int | None, bool]:
    """An upstream's header lines as they go to the client: without hop-by-hop headers;
    and its `Content-Length`, and whether it has a `Date`.

    Written for the common case, where nothing is to be dropped: a few scans of the
    bytes in C, and the lines go on as they came.
    """
    low = b"\r\n" + block.lower()
    if (
        b"\r\nconnection" in low
        or b"\r\ntransfer-encoding" in low
        or b"\r\nkeep-alive" in low
        or b"\r\nproxy" in low
        or b"\r\nupgrade" in low
        or b"\r\ntrailer" in low
        or b"\r\nte" in low
    ):
        block = _without_hop_by_hop(block)
        low = b"\r\n" + block.lower()
    length = None
    at = low.find(b"\r\ncontent-length:")
    if at >= 0:
        length = int(low[at + 17 : low.index(b"\r\n", at + 2)])  # llhttp checked: digits
    return block, length, b"\r\ndate:" in low


def _without_hop_by_hop(block: bytes) -> bytes:
    """`block`'s lines without the hop-by-hop headers, the `Proxy-*` family, and those a
    `Connection` header names."""
    lines = block.split(b"\r\n")[:-1]
    names = [line.partition(b":")[0].strip().lower() for line in lines]
    named: set[bytes] = set()
    for name, line in zip(names, lines, strict=True):
        if name == b"connection":
            named |= _named_by_connection(line.partition(b":")[2])
    kept = [
        line + b"\r\n"
        for name, line in zip(names, lines, strict=True)
        if name not in HOP_BY_HOP and name[:6] != b"proxy-" and name not in named
    ]
    return b"".join(kept)


def header_value(block: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in `block`'s lines, if it has one."""
    low = b"\r\n" + block.lower()
    at = low.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    return (b"\r\n" + block)[start : low.index(b"\r\n", start)].strip()


class Exchange:
    """One admitted request until its `close`: see the module's docstring."""

    # (No `__slots__`: the state below keeps its class-level default for most
    # exchanges, so an exchange sets only what changes.)
    _call: Call | None = None
    _deadline = 0.0
    """When (the timers' time) the upstream's time is up, unless it makes progress."""
    _call_deadline = math.inf
    """When (the timers' time) the whole call is up, retries included (`retry.deadline`)."""
    _timer: Timer | None = None
    _started = 0.0
    _body_done_at: float | None = None
    """`clock()` when the client's last body byte went upstream."""
    _body_left: int | None = None
    """Body bytes the client may still send, once it has sent some; None: not counted."""
    _elapsed = 0.0
    """Seconds the upstream took to its response head."""
    _answered = False
    _client_behind = False
    _closed = False
    _verdict: str | None = None
    """What the breaker heard of the try in hand: "success", "failure", or None yet."""
    _tries = 1
    _kept: list[bytes] | None = None
    """The request body as sent so far, kept for a retry (only up to `replay_max_body`)."""
    _backoff: Timer | None = None
    """While waiting to send the next try."""
    _fresh = False
    """The next try goes on a new connection, not an idle pooled one."""
    _resent = False
    """The request went again after a stale connection (which happens once at most)."""
    _upgrade = False
    """A WebSocket handshake, holding a place among the route's sessions until its 101
    (or its end)."""

    def __init__(
        self,
        request: Request,
        target: Target,
        permit: Permit,
        env: Env,
        slot: Bulkhead | None = None,
    ) -> None:
        """`slot`: the bulkhead whose slot the exchange holds, if any."""
        self._request = request
        self._target = target
        self._permit = permit
        self._env = env
        self._slot = slot
        self._timeout = self._head_timeout = target.route.timeouts.request

    def start(self, path: bytes, routed_host: bytes | None) -> None:
        """Send the request upstream for `path` (its target there, origin form);
        `routed_host`: the host it was routed by."""
        request = self._request
        target = self._target
        env = self._env
        metrics = target.metrics
        metrics.in_flight += 1
        self._started = env.clock()
        request.listener = self
        if request.upgrade_tail is not None and is_websocket(request):
            self._upgrade = True
            metrics.sessions.admitted += 1
        try:
            upstream = self._upstream = UpstreamRequest(
                target.origin,
                request.method,
                path,
                upstream_lines(request, routed_host),
                CHUNKED if request.chunked else request.content_length,
                target.route.timeouts.connect,
                target.route.tls,
                self._upgrade,
            )
            now = env.timers.time()
            retry = target.retry
            if retry is not None:
                target.budget.deposit(self._started)  # type: ignore[union-attr]
                if request.has_body or target.retry_timed:
                    self._with_retries(retry, now)
            call = send(env.pool, upstream, self)
            if self._closed:
                return  # failed at once
            if self._tries == 1:
                self._call = call
            # (Else it failed at once and was retried already: the retry's call, or its
            # wait, is in hand.)
            if request.has_body:
                request.read_body(self)
                if self._closed:
                    return
            if self._tries > 1:
                return  # the retry has its own deadline
            self._deadline = deadline = min(now + self._head_timeout, self._call_deadline)
            if deadline - now > Ticker.INTERVAL:
                env.ticker.add(self)
            else:
                self._timer = env.timers.call_at(deadline, self._check)
        except Exception as e:
            self.crashed(e)

    def _with_retries(self, retry: RetrySettings, now: float) -> None:
        """Set up for a retry policy: the deadlines; the body kept for a replay if it may
        be."""
        if retry.per_try_timeout is not None:
            self._head_timeout = retry.per_try_timeout
        if retry.deadline is not None:
            self._call_deadline = now + retry.deadline
        request = self._request
        if (
            request.has_body
            and not request.chunked
            and (request.content_length or 0) <= retry.replay_max_body
            and (request.method in retry.methods or _idempotency_key(request))
        ):
            self._kept = []

    # -- the end -----------------------------------------------------------------------

    def _close(self, outcome: UpstreamError | bool | None) -> None:
        """The one end: `outcome` True (success), an `UpstreamError` (a failure), or None
        (none: the client's doing). The breaker hears it only if it has heard nothing yet."""
        if self._closed:
            return
        self._closed = True
        timer = self._timer
        if timer is not None:
            timer.cancel()
        else:
            self._env.ticker.discard(self)
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        target = self._target
        metrics = target.metrics
        metrics.in_flight -= 1
        if self._upgrade:
            self._upgrade = False
            metrics.sessions.admitted -= 1  # (no 101: no session)
        permit = self._permit
        if not permit.done:
            if outcome is True:
                permit.succeeded(self._elapsed)
                self._verdict = "success"
            elif isinstance(outcome, UpstreamError):
                metrics.failures[outcome.kind] += 1
                permit.failed(self._elapsed)
                self._verdict = "failure"
            else:
                permit.released()
        if self._verdict is not None:
            metrics.tries[self._verdict] += 1
        call = self._call
        if call is not None:
            self._call = None  # (the call holds this exchange too: no cycle left behind)
            if not call.done:
                call.abort()
        self._request.listener = None
        slot = self._slot
        if slot is not None:
            # Last: the slot may go to a queued request, whose exchange starts here.
            self._slot = None
            slot.release()

    def crashed(self, error: Exception) -> None:
        """A bug raised while handling an event: logged; the client gets a 500 if nothing
        was sent, else its connection is cut; the breaker hears nothing."""
        log.exception("error handling a request", exc_info=error)
        self._close(None)
        self._request.fail()

    # -- retries -------------------------------------------------------------------------

    def _retry(self, reason: str, stale: bool, asked: float | None) -> bool:
        """Send the request again after the try in hand failed in a way its route retries
        (`reason`: the failure kind, or the status), if everything allows it; True if so.

        The breaker hears the failed try first (it may open the route, which then denies
        the retry its permit). Then, in order: tries left, the method, the body, the
        upstream's `Retry-After`, the deadline, the budget, the breaker's permit. A
        denial is counted by its reason; the caller then answers as without retries.
        """
        target = self._target
        metrics = target.metrics
        permit = self._permit
        if not permit.done:
            if reason.isdigit():  # a status the breaker judged no failure
                permit.succeeded(self._elapsed)
                self._verdict = "success"
            else:
                metrics.failures[reason] += 1
                permit.failed(self._elapsed)
                self._verdict = "failure"
        retry = target.retry
        request = self._request
        wait = 0.0
        denial = None
        if (
            stale
            and not self._resent
            and (
                retry is None
                or self._tries >= retry.attempts
                or request.method not in retry.methods
            )
        ):
            # The one resend after a stale connection that every route makes, policy or
            # not (RFC 9112 9.3.1.1): a GET, HEAD, OPTIONS, TRACE, PUT or DELETE, whose
            # body (if any) was kept.
            if request.method not in IDEMPOTENT_METHODS:
                denial = "method"
            elif request.has_body and self._kept is None:
                denial = "body"
        elif retry is None or self._tries >= retry.attempts:
            return False
        elif request.method not in retry.methods and not _idempotency_key(request):
            denial = "method"
        elif request.has_body and self._kept is None:
            denial = "body"
        elif asked is not None and asked > retry.backoff_max:
            denial = "retry_after"
        elif not stale:
            if asked is not None:
                wait = asked
            else:  # full jitter: uniform(0, min(max, base x 2^n)) before try n + 1
                cap = min(retry.backoff_max, retry.backoff_base * 2**self._tries)
                wait = self._env.rand() * cap
        now = self._env.timers.time()
        if denial is None and now + wait + _TIMER_RESOLUTION >= self._call_deadline:
            denial = "deadline"
        budget = target.budget
        if denial is None and budget is not None and not budget.admits():
            denial = "budget"
        if denial is None:
            granted = target.breaker.acquire(ramp=False)
            if isinstance(granted, Permit):
                permit = granted
            else:
                denial = "breaker"
        if denial is not None:
            metrics.retries_denied[denial] += 1
            return False
        # The retry: the try in hand is over.
        metrics.tries[self._verdict or "failure"] += 1
        metrics.retries[reason] = metrics.retries.get(reason, 0) + 1
        if budget is not None:
            budget.withdraw()
        self._permit = permit
        self._verdict = None
        self._tries += 1
        request.tries = self._tries
        call, self._call = self._call, None
        if call is not None and not call.done:
            call.abort()
        self._fresh = stale
        if stale:
            self._resent = True
        if wait > 0:
            self._deadline = now + wait + self._head_timeout
            self._backoff = self._env.timers.call_at(now + wait, self._next_try)
        else:
            self._next_try()
        return True

    def _next_try(self) -> None:
        self._backoff = None
        if self._closed:
            return
        env = self._env
        try:
            self._started = env.clock()
            self._body_done_at = None
            call = send(env.pool, self._upstream, self, self._fresh)
            if self._closed or self._call is not None or call.done:
                return  # failed at once (and perhaps retried already)
            self._call = call
            for chunk in self._kept or ():
                call.write(chunk)
            request = self._request
            if request.body_complete or not request.has_body:
                if request.has_body:
                    call.end_body()
                self._body_done_at = self._started
            elif call.writable:
                request.resume_body()  # (the try before may have paused it)
            else:
                request.pause_body()
            now = env.timers.time()
            self._deadline = min(now + self._head_timeout, self._call_deadline)
            # A timer of its own, at this try's deadline (a retry is rare enough).
            env.ticker.discard(self)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = env.timers.call_at(self._deadline, self._check)
        except Exception as e:
            self.crashed(e)

    # -- the answer ----------------------------------------------------------------------

    def upstream_head(self, status: int, reason: bytes, block: bytes) -> None:
        if self._closed:
            return
        elapsed = self._upstream_time()
        target = self._target
        metrics = target.metrics
        metrics.observe_duration(elapsed)
        permit = self._permit
        judged = False
        if status in target.judged:
            judged = self._judge(status, block)
            if status in target.retry_statuses:
                asked = retry_after_seconds(header_value(block, b"retry-after"), time.time())
                if self._retry(str(status), False, asked):
                    return
        if status == 101:
            self._switch(reason, block)
            return
        if not judged and permit.state is State.HALF_OPEN:
            # A probe is judged by its answer: its slot must not wait on a long body,
            # nor on a client that reads slowly (or not at all).
            permit.succeeded(elapsed)
            self._verdict = "success"
        self._answered = True
        self._kept = None  # no try follows an answer
        lines, length, dated = client_lines(block)
        if not dated:
            lines += date_line()
        metrics.count_response(status)
        self._request.respond(status, reason, lines, length)
        self._deadline = self._env.timers.time() + self._timeout

    def _switch(self, reason: bytes, block: bytes) -> None:
        """The upstream took the WebSocket handshake (101): a success; the exchange ends,
        and a `Tunnel` relays the session's bytes from now on, on both connections."""
        target = self._target
        metrics = target.metrics
        sessions = metrics.sessions
        call = self._call
        connection = None if call is None else call.detach()
        self._upgrade = False  # the session keeps its place: the tunnel gives it back
        self._close(True)
        if connection is None:  # (cannot be: a 101 comes on a connection)
            sessions.admitted -= 1
            self._request.abort()
            return

        def ended() -> None:
            sessions.admitted -= 1
            sessions.websocket -= 1

        tunnel = Tunnel(self._env.timers, target.route.timeouts.websocket_idle, ended)
        tunnel.upstream = connection
        connection.take_over(tunnel.upstream_side)
        sessions.websocket += 1
        metrics.count_response(101)
        lines, _length, _dated = client_lines(block)
        head = b"HTTP/1.1 101 %b\r\n%bUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" % (
            reason,
            lines,
        )
        self._request.upgrade(head, tunnel.client_side)

    def _upstream_time(self) -> float:
        """Seconds the upstream took, to its answer's head or its failure, counted from the
        client's last body byte if there was a body: kept for the breaker, and counted as
        a slow call past `slow_after`."""
        done = self._body_done_at
        self._elapsed = elapsed = self._env.clock() - (self._started if done is None else done)
        if elapsed > self._target.slow_after:
            self._target.metrics.slow_calls += 1
        return elapsed

    def _judge(self, status: int, block: bytes) -> bool:
        """Tell the breaker of a failure status, or of a `Retry-After` it heeds; True if so."""
        target = self._target
        asked = None
        if status in target.retry_after_statuses:
            asked = retry_after_seconds(header_value(block, b"retry-after"), time.time())
        if asked is None and status not in target.route.breaker.failure_status:
            return False
        self._permit.failed(self._elapsed, asked)
        self._verdict = "failure"
        target.metrics.failures["status"] += 1
        return True

    def upstream_body(self, chunk: bytes) -> None:
        if self._request.write(chunk):
            self._client_behind = True  # the upstream waits for the client now
            if self._call is not None:
                self._call.pause_reading()
        else:
            self._deadline = self._env.timers.time() + self._timeout

    def upstream_end(self) -> None:
        self._close(True)
        self._request.end()

    def upstream_failed(self, error: UpstreamError) -> None:
        if self._closed:
            return
        request = self._request
        if not self._answered:
            self._upstream_time()
            retry = self._target.retry
            if (error.stale or (retry is not None and error.kind in retry.retry_on_kinds)) and (
                self._retry(error.kind, error.stale, None)
            ):
                return
            self._close(error)
            self._answer(error.status, error.error)
        else:
            self._close(error)
            request.abort()  # never end an answer as if it were whole

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self._request.resume_body()
        else:
            self._request.pause_body()

    def client_writable(self, writable: bool) -> None:
        if writable and self._client_behind:
            self._client_behind = False
            self._deadline = self._env.timers.time() + self._timeout
            if self._call is not None:
                self._call.resume_reading()

    # -- the client's side ---------------------------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        if self._closed:
            return
        left = self._body_left
        if left is None:
            left = self._target.route.max_body_size
        if left is not None:
            left = self._body_left = left - len(chunk)
            if left < 0:
                # Stop here: the upstream sees the upload break off, never a body that
                # looks whole. The client's fault: no outcome.
                self._client_failed(413, "body_too_large")
                return
        kept = self._kept
        if kept is not None:
            kept.append(chunk)  # (bounded: the body's length is at most replay_max_body)
        call = self._call
        if call is None:
            return  # between tries: the next one sends what is kept
        call.write(chunk)
        if not self._answered:
            # Every chunk that moves pushes the deadline out, so it runs for real once
            # the body is whole, as Envoy's route timeout does: a slow uploader is not an
            # upstream timeout.
            self._deadline = min(self._env.timers.time() + self._head_timeout, self._call_deadline)
        if not call.writable:
            self._request.pause_body()

    def request_body_end(self) -> None:
        if self._closed:
            return
        call = self._call
        if call is None:
            return  # between tries: the next one ends the body
        call.end_body()
        self._body_done_at = self._env.clock()
        if not self._answered:
            self._deadline = min(self._env.timers.time() + self._head_timeout, self._call_deadline)

    def request_body_failed(self, reason: str) -> None:
        self._client_failed(400, "bad_request")

    def client_gone(self) -> None:
        self._close(None)

    def _client_failed(self, status: int, error: str) -> None:
        """The client broke its request (no outcome): answered if nothing was sent yet,
        else cut off; the connection cannot take another request either way."""
        self._close(None)
        request = self._request
        request.stop_body()
        if request.status is None:
            self._answer(status, error, close=True)
        else:
            request.abort()

    def _answer(self, status: int, error: str, close: bool = False) -> None:
        target = self._target
        answer = target.error(status, error)
        target.count_answer(answer, error)
        self._request.answer(*answer, close=close)

    # -- the deadline --------------------------------------------------------------------

    def arm(self) -> None:
        """The ticker's call: the exchange outlived a tick, so its deadline gets a timer."""
        self._timer = self._env.timers.call_at(self._deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._call is None:
            return  # between tries: the next one sets its own deadline
        now = self._env.timers.time()
        if self._client_behind:
            # The sidecar waits on its client (whose write timeout the listener keeps):
            # the upstream's time does not run.
            self._deadline = now + self._timeout
        if self._deadline - now > _TIMER_RESOLUTION:
            self._timer = self._env.timers.call_at(self._deadline, self._check)
            return
        request = self._request
        call = self._call
        if request.has_body and not request.body_complete and call is not None and call.writable:
            # Waiting on the client's body, not on the upstream: the client's fault.
            self._client_failed(408, "client_timeout")
            return
        if self._answered:
            self.upstream_failed(UpstreamTimeout("the response body stalled"))
        else:
            self.upstream_failed(UpstreamTimeout("no response head in time"))


def is_websocket(request: Request) -> bool:
    """Whether an upgrade request asks for WebSocket (a GET whose `Upgrade` names it)."""
    protocols = request.upgrade_protocols
    return (
        request.method == b"GET"
        and protocols is not None
        and b"websocket" in (p.strip() for p in protocols.lower().split(b","))
    )


class Connect:
    """An admitted CONNECT, until its tunnel is open or it failed: the TCP connect to the
    route's upstream address is the breaker's outcome (the tunnel's bytes are opaque)."""

    __slots__ = (
        "_env",
        "_opened",
        "_permit",
        "_request",
        "_sessions",
        "_slot",
        "_target",
        "_task",
        "_tunnel",
    )

    def __init__(
        self, request: Request, target: Target, permit: Permit, env: Env, slot: Bulkhead | None
    ) -> None:
        self._request = request
        self._target = target
        self._permit = permit
        self._env = env
        self._slot = slot
        self._opened = False
        self._sessions = target.metrics.sessions
        self._task: asyncio.Task[None] | None = None
        self._tunnel = Tunnel(env.timers, target.route.timeouts.websocket_idle, self._ended)

    def start(self) -> None:
        self._target.metrics.in_flight += 1
        self._sessions.admitted += 1
        self._request.listener = self
        self._task = asyncio.get_running_loop().create_task(self._connecting())

    async def _connecting(self) -> None:
        target = self._target
        env = self._env
        started = env.clock()
        pool = env.pool
        upstream = target.route.upstream
        origin = pool.origin(f"http://{authority(upstream.host, upstream.port)}")
        try:
            connection = await pool.connect(
                origin, target.route.timeouts.connect, self._tunnel.upstream_side
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # OSError, TimeoutError, a closed pool
            self._task = None
            self._failed(translate(e, after_headers=False), env.clock() - started)
            return
        self._task = None
        request = self._request
        self._done()
        elapsed = env.clock() - started
        if elapsed > target.slow_after:  # (a connect that slow is a slow call to the breaker)
            target.metrics.slow_calls += 1
        self._permit.succeeded(elapsed)
        target.metrics.tries["success"] += 1
        if not request.connected:  # gone while connecting
            connection.close()
            self._tunnel.close()
            return
        tunnel = self._tunnel
        tunnel.upstream = connection
        if not tunnel.ended:  # (the upstream may have closed already: the client hears it)
            self._opened = True
            self._sessions.tunnels += 1
        target.metrics.count_response(200)
        request.upgrade(b"HTTP/1.1 200 Connection Established\r\n\r\n", tunnel.client_side)

    def _failed(self, error: UpstreamError, elapsed: float) -> None:
        target = self._target
        self._done()
        target.metrics.failures[error.kind] += 1
        target.metrics.tries["failure"] += 1
        self._permit.failed(elapsed)
        self._tunnel.close()
        answer = target.error(error.status, error.error)
        target.count_answer(answer, error.error)
        self._request.answer(*answer, close=True)

    def _done(self) -> None:
        """The connect is over, however it went: the in-flight count and the slot go back."""
        self._target.metrics.in_flight -= 1
        self._request.listener = None
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    def _ended(self) -> None:
        sessions = self._sessions
        sessions.admitted -= 1
        if self._opened:
            sessions.tunnels -= 1

    # -- the client's side (while connecting) ------------------------------------------

    def client_gone(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            self._done()
            self._permit.released()
            self._tunnel.close()

    def client_writable(self, writable: bool) -> None:
        pass

    def crashed(self, error: Exception) -> None:
        log.exception("error handling a CONNECT", exc_info=error)
        self.client_gone()
        self._request.fail()


def _idempotency_key(request: Request) -> bool:
    """Whether the request carries an `Idempotency-Key` header (so may be sent again)."""
    return any(line[:16].lower() == b"idempotency-key:" for line in request.lines)


def retry_after_seconds(value: bytes | str | None, now: float) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), if > 0.

    `now` is wall-clock time (`time.time()`), against which a date is read. A
    value that is neither form, or that asks for no wait at all, is None.
    """
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Beyond 10^12 s (31,000 years) the breaker's cap applies anyway.
        seconds = float(value) if len(value) <= 12 else 1e12
    else:
        try:
            date = email.utils.parsedate_to_datetime(value)
            if date.tzinfo is None:  # "-0000": RFC 5322's "no zone given", read as UTC
                date = date.replace(tzinfo=datetime.UTC)
            seconds = date.timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            # The upstream wrote it: any oddity in it means "no usable Retry-After".
            return None
    return seconds if seconds > 0 else None
