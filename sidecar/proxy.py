"""The proxy handler: route, ask the breaker, forward and stream, report the outcome.

What a client sees in each situation is the contract's table "What a client
sees"; the responses the sidecar makes itself are built by `error_response`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import HttpVersion11, web
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.breaker import Breaker, Clock, Permit, Rejection, State, StateListener
from sidecar.client import Answer, Disconnected, Pool, request_head
from sidecar.config import Route
from sidecar.listener import COALESCE_BELOW, FastResponse, Request, Response, SimpleRequest
from sidecar.metrics import Metrics, RouteMetrics
from sidecar.routing import Router, upstream_target
from sidecar.upstream import (
    Arming,
    BodyTooLarge,
    ClientBodyTimeout,
    ClientWriteTimeout,
    InvalidRequest,
    Sent,
    UpstreamError,
    send,
)

__all__ = ["HOP_BY_HOP", "Proxy", "RouteChanges", "Target", "error_response", "retry_after_seconds"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy",  # not hop-by-hop, but never meant for an upstream (httpoxy)
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Never forwarded either way (RFC 9110 7.6.1); nor is the `Proxy-*` family."""

_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "expect"}
"""Host is rewritten to the upstream's; the handler itself answers `Expect: 100-continue`."""

REJECTION_CACHE_SIZE = 1024
"""Finished 503s kept per route: one per second of `Retry-After` counting down."""

_REJECT_REASONS = {
    State.OPEN: "circuit_open",
    State.HALF_OPEN: "circuit_half_open",
    State.FORCED_OPEN: "circuit_forced_open",
}

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Upstream answers whose `Retry-After` opens the route under `respect_retry_after`."""


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


@dataclass(slots=True)
class Target:
    """Everything the handler needs for one route, built once at start-up."""

    route: Route
    breaker: Breaker
    metrics: RouteMetrics
    origin: str
    """The upstream's "scheme://host:port"."""
    slow_after: float
    """The route's `BreakerSettings.slow_after`, kept at hand for the request path."""
    retry_after_statuses: frozenset[int]
    """Statuses whose `Retry-After` the breaker hears: none unless `respect_retry_after`."""
    max_body_size: int | None
    rejections: dict[int, tuple[str, bytes, CIMultiDict[str]]] = field(default_factory=dict)
    """Finished 503s by `Retry-After` (0 for HALF_OPEN's), so that rejecting formats nothing."""


def error_response(
    status: int, error: str, route: str | None = None, retry_after: int | None = None
) -> web.Response:
    """A response the sidecar makes itself: JSON, with `Retry-After` when there is one."""
    # Formatted by hand: every value is a constant, a route name ([a-z0-9_-]+) or a
    # number, so nothing needs escaping, and this is the OPEN route's whole hot path.
    body = f'{{"error":"{error}"'
    if route is not None:
        body += f',"route":"{route}"'
    headers = None
    if retry_after is not None:
        body += f',"retry_after":{retry_after}'
        headers = {"Retry-After": str(retry_after)}
    return web.Response(
        status=status, body=(body + "}").encode(), content_type="application/json", headers=headers
    )


def _without_hop_by_hop(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy of `headers` without `drop`, the `Proxy-*` family, and what `Connection` names.

    Written for the common case, where there is little or nothing to drop: the
    copy and the look-ups run in multidict's C code, not a Python loop per header.
    """
    out = CIMultiDict(headers)
    for name in drop:
        if name in out:
            del out[name]
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            out.popall(token.strip(), None)
    if "\nproxy" in "\n" + "\n".join(out.keys()).lower():
        for name in [k for k in out if k.lower().startswith("proxy-")]:
            out.popall(name, None)
    return out


class _CoalescedResponse(web.StreamResponse):
    """A streamed response whose headers wait for its first body bytes, to share a write.

    Only for a short body of known length, which follows its headers at once: one
    syscall a response instead of two (a write to a socket costs more here than
    most of the proxy's Python). A long or chunked body gets its headers at once.
    """

    _send_headers_immediately = False


class Proxy:
    """The proxy listener's request handler."""

    def __init__(
        self,
        routes: Sequence[Route],
        metrics: Metrics,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
        write_timeout: float | None = None,
    ) -> None:
        self._session: Pool  # given by `attach` once a loop runs
        self._arming: Arming  # the same
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self.write_timeout = write_timeout
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
                    max_body_size=route.max_body_size,
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

    def attach(self, session: Pool) -> None:
        """Forward through `session` from now on (called with the loop running)."""
        self._session = session
        self._arming = Arming.of(asyncio.get_running_loop())

    @property
    def breakers(self) -> list[Breaker]:
        return [t.breaker for t in self.targets]

    def match(self, request: Request) -> tuple[Target | None, str, str | None]:
        """The request's route (None: none matches), its target path, and the host it
        is routed by."""
        raw_path = request.raw_path
        host = request.headers.get("Host")
        if raw_path[:1] != "/":
            # Absolute form (`GET http://host/x`): matched, as RFC 9112 3.2.2 says, by
            # the host it names rather than the Host header, and by its path; then
            # sent to the route's upstream like any other request, never to that host.
            assert isinstance(request, web.BaseRequest)  # a SimpleRequest's is a path
            raw_path = request.rel_url.raw_path_qs
            host = request.url.host_port_subcomponent
        return self._router.match(host, raw_path.partition("?")[0]), raw_path, host

    async def handle(
        self, request: Request, matched: tuple[Target | None, str, str | None] | None = None
    ) -> Response:
        """Answer `request`; `matched`: what `match(request)` said, if it was asked already."""
        target, raw_path, host = matched or self.match(request)
        if target is None:
            self._metrics.unrouted += 1
            return error_response(404, "no_route")

        limit = target.max_body_size
        if limit is not None and (request.content_length or 0) > limit:
            # Said up front: refused before the breaker or the upstream hear of it (and,
            # with `Expect: 100-continue`, before the client sends a byte of it).
            response = self._too_large(target)
            if "Expect" in request.headers:
                assert isinstance(request, web.BaseRequest)  # a SimpleRequest has no body
                # No body is coming: close at once rather than wait for one to drop.
                await response.prepare(request)
                await response.write_eof()
                request.protocol.force_close()
            return response

        permit = target.breaker.acquire()
        if isinstance(permit, Rejection):
            return self._reject(target, permit)
        return await self._admitted(request, target, permit, raw_path, host)

    def begin(self, request: SimpleRequest) -> bool:
        """Answer a simple request without a task, if it can be; False: `handle` it.

        Taken: a rejection, answered at once; and a request that can go out at once
        on a pooled connection, answered from that connection's callback if its
        whole response is in by then (as good as every one, for a small answer).
        Whatever needs waiting on (a new connection, a long or slow answer, an
        error, or a shutdown) goes on in a task through `_admitted`, as in `handle`.
        """
        target, raw_path, host = self.match(request)
        # The deadline runs in a task's watchdog once a tick finds the request still
        # waiting (`_Forwarding.arm`): a shorter one could pass before that.
        if target is None or target.route.timeouts.request <= 2 * Arming.INTERVAL:
            return False
        permit = target.breaker.acquire()
        if isinstance(permit, Rejection):
            request.answer_now(self._reject(target, permit))
            return True
        try:
            sent = self._send_now(request, target, raw_path, host)
        except BaseException:
            permit.released()  # a bug (answered 500): nothing else has the permit yet
            raise
        if sent is None:
            self._in_a_task(request, target, permit, raw_path, host)
            return True
        target.metrics.in_flight += 1
        forwarding = _Forwarding(self, request, target, permit, raw_path, host, sent)
        request.hold(forwarding)
        sent.answer.add_done_callback(forwarding.answered)
        self._arming.add(forwarding)
        return True

    def _send_now(
        self, request: SimpleRequest, target: Target, raw_path: str, host: str | None
    ) -> Sent | None:
        """Send `request` at once on an idle pooled connection; None: none is idle, or
        the head cannot be written (`send` will say why, and the client get its 400)."""
        session = self._session
        origin = session.origin(target.origin)
        headers = _without_hop_by_hop(request.headers, _NOT_FORWARDED_UP)
        self._add_forwarded(request, headers, host)
        try:
            target_path = upstream_target(target.route, raw_path)
            head = request_head(request.method, target_path, origin, headers, False)[0]
        except ValueError:
            return None
        connection = session.idle(origin)
        if connection is None:
            return None
        try:
            answer = connection.request(head, with_body=True)
        except BaseException as e:
            connection.close()
            if isinstance(e, Disconnected):
                return None
            raise
        return Sent(connection, answer, self._clock(), asyncio.get_running_loop().time())

    def _in_a_task(
        self,
        request: SimpleRequest,
        target: Target,
        permit: Permit,
        raw_path: str,
        host: str | None,
        sent: Sent | None = None,
    ) -> None:
        """Go on with an admitted simple request in a task, through `_admitted`."""
        task = request.adopt(self._admitted(request, target, permit, raw_path, host, sent))

        def let_go(_: object) -> None:
            # A task cancelled before its first step (its client gone at once) never ran
            # `_admitted`, which gives the permit back and takes over `sent`: done here.
            # (After `_admitted`, the permit has its outcome or is released already.)
            permit.released()
            if sent is not None and not sent.taken:
                sent.connection.close()

        task.add_done_callback(let_go)

    async def _admitted(
        self,
        request: Request,
        target: Target,
        permit: Permit,
        raw_path: str,
        host: str | None,
        sent: Sent | None = None,
    ) -> Response:
        """Answer a request the breaker let through; `sent`: already sent by `begin`."""
        if sent is not None:
            sent.taken = True
        metrics = target.metrics
        metrics.in_flight += 1
        try:
            if "Expect" in request.headers:
                assert isinstance(request, web.BaseRequest)  # a SimpleRequest has no Expect
                # Only now, admitted, may the client send its body: an OPEN route has
                # refused above before a single byte of the upload was asked for.
                if request.headers["Expect"].lower() != "100-continue":
                    return error_response(417, "expectation_failed")
                if request.version >= HttpVersion11:
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return await self._forward(request, target, permit, raw_path, host, sent)
        finally:
            metrics.in_flight -= 1
            # Still open here only if the client went away (cancellation) before an
            # outcome was known: that is neither success nor failure, and frees a probe slot.
            permit.released()

    @staticmethod
    def _reject(target: Target, rejection: Rejection) -> web.Response:
        # Keyed by an int, not by (State, int): an Enum hashes in Python, not C.
        # OPEN's are keyed by Retry-After, HALF_OPEN's by 0, FORCED_OPEN's below 0.
        state = rejection.state
        key = rejection.retry_after
        if state is not State.OPEN:
            key = 0 if state is State.HALF_OPEN else -key
        cached = target.rejections.get(key)
        if cached is None:
            reason = _REJECT_REASONS[state]
            made = error_response(503, reason, target.route.name, rejection.retry_after)
            assert isinstance(made.body, bytes)
            cached = (reason, made.body, CIMultiDict(made.headers))
            if len(target.rejections) < REJECTION_CACHE_SIZE:
                target.rejections[key] = cached
        reason, body, headers = cached
        metrics = target.metrics
        metrics.rejected[reason] += 1
        metrics.requests[503] += 1
        return web.Response(status=503, body=body, headers=headers)

    @staticmethod
    def _too_large(target: Target) -> web.Response:
        target.metrics.count_response(413)
        response = error_response(413, "body_too_large", target.route.name)
        response.force_close()  # what is left of the body is read and dropped, then we close
        return response

    async def _forward(
        self,
        request: Request,
        target: Target,
        permit: Permit,
        raw_path: str,
        host: str | None,
        sent: Sent | None = None,
    ) -> Response:
        route = target.route
        metrics = target.metrics
        headers = _without_hop_by_hop(request.headers, _NOT_FORWARDED_UP)
        self._add_forwarded(request, headers, host)
        body = request.content if request.body_exists else None

        try:
            exchange = await send(
                self._session,
                request.method,
                target.origin,
                upstream_target(route, raw_path),
                headers,
                body,
                route.timeouts.connect,
                route.timeouts.request,
                self._clock,
                target.max_body_size,
                self.write_timeout,
                sent,
            )
        except UpstreamError as e:
            if e.elapsed > target.slow_after:
                metrics.slow_calls += 1
            permit.failed(e.elapsed)
            metrics.failures[e.kind] += 1
            timeout = e.kind == "timeout"
            status, error = (504, "upstream_timeout") if timeout else (502, "upstream_unreachable")
            metrics.count_response(status)
            return error_response(status, error, route.name)
        except ClientBodyTimeout:
            # The client's fault, not the upstream's: no outcome (the permit is released).
            metrics.count_response(408)
            return error_response(408, "client_timeout", route.name)
        except InvalidRequest:
            metrics.count_response(400)
            refused = error_response(400, "bad_request", route.name)
            refused.force_close()  # the request's framing may be lost: no next request
            return refused
        except BodyTooLarge:
            # A chunked body that passed the limit on its way: the upstream saw the upload
            # break off. The client's fault: no outcome (the permit is released).
            return self._too_large(target)

        upstream = exchange.response
        elapsed = exchange.elapsed
        try:
            status = upstream.status
            self._judge(target, permit, status, upstream.headers, elapsed)
            length = upstream.content_length
            headers = _without_hop_by_hop(upstream.headers, HOP_BY_HOP)
            response: Response
            prepared: Awaitable[object]
            if isinstance(request, SimpleRequest):
                response = request.response(status, upstream.reason, headers)
                prepared = response.prepare(request)
            else:
                response = (
                    _CoalescedResponse
                    if length is not None and length < COALESCE_BELOW
                    else web.StreamResponse
                )(status=status, reason=upstream.reason, headers=headers)
                prepared = response.prepare(request)
            try:
                await prepared
                metrics.count_response(status)
                async for chunk in exchange.body():
                    await response.write(chunk)
                permit.succeeded(elapsed)
                await response.write_eof()
            except ConnectionResetError:
                # The client went away mid-response: no outcome (the permit is released).
                return response
            except asyncio.CancelledError:
                if not exchange.client_stalled():
                    raise
                # The client stopped reading for the write timeout: its fault, no outcome.
                # Cut it off, which lets the upstream connection go too.
                if request.transport is not None:
                    request.transport.abort()
            except (ClientBodyTimeout, BodyTooLarge, InvalidRequest, ClientWriteTimeout):
                # The upstream answered early, and the upload the client goes on with
                # stalled, passed max_body_size or broke: the client's fault, no outcome.
                # The response cannot end whole: abort it.
                if request.transport is not None:
                    request.transport.abort()
            except UpstreamError as e:
                if not permit.done:
                    permit.failed(elapsed)
                    metrics.failures[e.kind] += 1
                # Never end the response as if it were whole: abort the client's connection.
                if request.transport is not None:
                    request.transport.abort()
            return response
        finally:
            exchange.close()

    @staticmethod
    def _judge(
        target: Target, permit: Permit, status: int, headers: CIMultiDictProxy[str], elapsed: float
    ) -> None:
        """Count an answer's time, and tell the breaker what its status says."""
        metrics = target.metrics
        metrics.observe_duration(elapsed)
        if elapsed > target.slow_after:
            metrics.slow_calls += 1
        asked = None
        if status in target.retry_after_statuses:
            asked = retry_after_seconds(headers.get("Retry-After"), time.time())
        if asked is not None or status in target.route.breaker.failure_status:
            permit.failed(elapsed, asked)
            metrics.failures["status"] += 1
        elif permit.state is State.HALF_OPEN:
            # A probe is judged by its answer: its slot must not wait on a long body,
            # nor on a client that reads slowly (or not at all).
            permit.succeeded(elapsed)

    def _finish(self, forwarding: _Forwarding, message: RawResponseMessage, body: bytes) -> None:
        """Relay a whole answer to `begin`'s request, as `_forward` would have."""
        request, target, permit = forwarding.request, forwarding.target, forwarding.permit
        metrics = target.metrics
        keep = False
        try:
            elapsed = self._clock() - forwarding.sent.at
            status = message.code
            self._judge(target, permit, status, message.headers, elapsed)
            response = request.response(
                status, message.reason, _without_hop_by_hop(message.headers, HOP_BY_HOP)
            )
            response.start()
            metrics.count_response(status)
            if body:
                response.write_now(body)
            permit.succeeded(elapsed)
            response.end_now()
            keep = response.keep_alive
        except ConnectionResetError:
            pass  # the client went away mid-response: no outcome (the permit is released)
        finally:
            self._session.release(forwarding.sent.connection)
            metrics.in_flight -= 1
            permit.released()
        if keep and response.needs_drain:
            request.adopt(self._drained(request, response))
        else:
            request.finish(keep)

    async def _drained(self, request: SimpleRequest, response: FastResponse) -> FastResponse:
        """Wait, as `write_eof` would have, for a client that is behind to take the
        response; one that does not within the write timeout is cut off."""
        try:
            async with asyncio.timeout(self.write_timeout):
                await response.drain()
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
        return response

    @staticmethod
    def _add_forwarded(request: Request, headers: CIMultiDict[str], host: str | None) -> None:
        """`host`: the host the request was routed by (its Host header, or what an
        absolute-form target names)."""
        client = request.remote
        if client:
            prior = ", ".join(headers.popall("X-Forwarded-For", ()))
            headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
        headers["X-Forwarded-Proto"] = request.scheme
        if host:
            headers["X-Forwarded-Host"] = host
        else:  # never pass on a client's own claim as if it were ours
            headers.popall("X-Forwarded-Host", None)


class _Forwarding:
    """A simple request `Proxy.begin` sent upstream without a task, until it ends.

    It ends in the connection's callback with the whole answer (`Proxy._finish`),
    or goes on in a task (`escalate`): when the answer is an error or not whole
    yet, when the `Arming` tick finds it still waiting (the task's watchdog then
    keeps the request timeout, counted from the send), or when the server shuts
    down. A client that goes away aborts it.
    """

    __slots__ = ("_over", "host", "permit", "proxy", "raw_path", "request", "sent", "target")

    def __init__(
        self,
        proxy: Proxy,
        request: SimpleRequest,
        target: Target,
        permit: Permit,
        raw_path: str,
        host: str | None,
        sent: Sent,
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.target = target
        self.permit = permit
        self.raw_path = raw_path
        self.host = host
        self.sent = sent
        self._over = False

    def answered(self, answer: asyncio.Future[Answer]) -> None:
        """The connection's callback: the answer's head is in, or the exchange failed."""
        if self._over:
            return
        if answer.cancelled() or answer.exception() is not None:
            self.escalate()
            return
        message, payload = answer.result()
        body = _whole(payload)
        if body is None or not 200 <= message.code <= 599:
            self.escalate()
            return
        self._end()
        try:
            self.proxy._finish(self, message, body)
        except Exception:
            self.request.fail()  # as a task's handler that raised: a bug, logged

    def arm(self) -> None:
        """The `Arming` tick: still no answer. Into a task if it was sent half a tick
        ago or more (a task costs more than waiting for the next tick)."""
        if self._over:
            return
        if self.sent.loop_at > asyncio.get_running_loop().time() - Arming.INTERVAL / 2:
            self.proxy._arming.add(self)
        else:
            self.escalate()

    def escalate(self) -> None:
        if self._over:
            return
        self._end()
        self.target.metrics.in_flight -= 1  # `_admitted` counts it from here
        self.proxy._in_a_task(
            self.request, self.target, self.permit, self.raw_path, self.host, self.sent
        )

    def abort(self) -> None:
        """The client went away: no outcome, and the connection cannot be reused."""
        if self._over:
            return
        self._end()
        self.sent.connection.close()
        self.target.metrics.in_flight -= 1
        self.permit.released()

    def _end(self) -> None:
        self._over = True
        self.proxy._arming.discard(self)


def _whole(payload: StreamReader) -> bytes | None:
    """The body, if all of it is in (and it did not break off); else None."""
    if not payload.is_eof() or payload.exception() is not None:
        return None
    return payload.read_nowait()


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), if > 0.

    `now` is wall-clock time (`time.time()`), against which a date is read. A
    value that is neither form, or that asks for no wait at all, is None.
    """
    if not value:
        return None
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
