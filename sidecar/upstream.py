"""The boundary to upstreams: one pooled client (`sidecar.client`), and its errors made ours.

The client's exceptions are translated into the project's own in exactly one
place, this module; the proxy handler never catches them itself.

    UpstreamError               the upstream exchange failed; `kind` is the failure label
     +-- UpstreamUnreachable    refused, unresolvable, or reset before response headers (502)
     +-- UpstreamTimeout        connect or response-headers deadline passed (504)
     +-- UpstreamReset          broke off after its response headers (client aborted)
    ClientBodyTimeout           the client stopped sending its body (408, no outcome)
    InvalidRequest              what the client sent cannot go on the wire (400, no outcome)
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import aiohttp
from multidict import CIMultiDict

from sidecar.breaker import Clock
from sidecar.client import (
    IDEMPOTENT_METHODS,
    KEEPALIVE_TIMEOUT,
    MAX_HEADER_SIZE,
    Answer,
    BadResponse,
    Connection,
    Disconnected,
    Origin,
    Pool,
    Response,
    request_head,
)

__all__ = [
    "KEEPALIVE_TIMEOUT",
    "MAX_HEADER_SIZE",
    "Armable",
    "Arming",
    "BodyTooLarge",
    "ClientBodyTimeout",
    "ClientWriteTimeout",
    "Exchange",
    "InvalidRequest",
    "Sent",
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "new_client_session",
    "send",
    "translate",
]


class ClientBodyTimeout(Exception):
    """The client stopped sending its request body: its fault, not the upstream's."""


class ClientWriteTimeout(Exception):
    """The client stopped reading its response for the write timeout: its fault."""


class BodyTooLarge(Exception):
    """The client's request body is longer than the route accepts: its fault."""


class InvalidRequest(Exception):
    """The client's request cannot be sent upstream as it is."""


class UpstreamError(Exception):
    kind = "connect"
    """The `kind` label of `sidecar_upstream_failures_total`."""
    elapsed = 0.0
    """Seconds the upstream had had when the exchange failed (see `Exchange.elapsed`)."""


class UpstreamUnreachable(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamReset(UpstreamError):
    kind = "reset"


def new_client_session() -> Pool:
    """One pool for every route (made with a running loop): keep-alive, bytes untouched.

    No limit on connections, as a sidecar's caller already bounds its concurrency.
    """
    return Pool(KEEPALIVE_TIMEOUT)


def translate(exc: BaseException, *, after_headers: bool) -> UpstreamError:
    """Map an exception from the upstream exchange to the project's own error."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(str(exc) or "timed out")
    if after_headers:
        return UpstreamReset(str(exc) or type(exc).__name__)
    return UpstreamUnreachable(str(exc) or type(exc).__name__)


_TIMER_RESOLUTION = 0.001
"""uvloop's timers tick in whole milliseconds: re-arming for less would spin until the tick."""


class Armable(Protocol):
    def arm(self) -> None:
        """Called by the tick that follows `Arming.add`, unless discarded before."""


class Arming:
    """Sets the timers of the watchdogs that are still running after a tick.

    (Anything `Armable` may wait here: the proxy's task-less exchanges do, to be
    handed to a task with a watchdog if they outlive a tick.)

    A watchdog whose first check is more than `INTERVAL` away does not set its
    timer: it waits here, and the next tick (within `INTERVAL`, so before that
    check is due) sets it, at exactly the time it would have had. An exchange
    that ends first (nearly all of them) leaves the set and never had a timer.
    One tick timer per loop runs while anything waits.
    """

    INTERVAL: ClassVar[float] = 0.25
    _loops: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Arming]] = (
        weakref.WeakKeyDictionary()
    )

    __slots__ = ("_loop", "_tick", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: set[Armable] = set()
        self._tick: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Arming:
        arming = cls._loops.get(loop)
        if arming is None:
            arming = cls._loops[loop] = cls(loop)
        return arming

    def add(self, watchdog: Armable) -> None:
        self._waiting.add(watchdog)
        if self._tick is None:
            self._tick = self._loop.call_later(self.INTERVAL, self._arm_waiting)

    def discard(self, watchdog: Armable) -> None:
        self._waiting.discard(watchdog)

    def _arm_waiting(self) -> None:
        self._tick = None
        waiting, self._waiting = self._waiting, set()
        for watchdog in waiting:
            try:
                watchdog.arm()
            except Exception as e:  # a bug in one must not leave the others without a deadline
                self._loop.call_exception_handler({"message": "arm() failed", "exception": e})


class _Watchdog:
    """One timer for a whole upstream exchange, instead of one per await.

    Progress (a chunk of the upload, each wait for the response body) moves the
    deadline without touching the timer. When the timer fires, it re-arms at the
    moved deadline, or at a fresh one while `paused` (the sidecar is writing to
    its client, which is not the upstream's time), or else cancels the task;
    `expired()` then tells that cancellation from any other. A pause longer than
    `write_timeout` (a client that stopped reading) also cancels the task, with
    `client_stalled` set.
    """

    __slots__ = (
        "_deadline",
        "_fired",
        "_first",
        "_handle",
        "_loop",
        "_paused_at",
        "_task",
        "_timeout",
        "_write_timeout",
        "client_stalled",
        "paused",
    )

    def __init__(
        self, timeout: float, write_timeout: float | None = None, since: float | None = None
    ) -> None:
        """`since`: when the exchange began, in the loop's time, if before now."""
        loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._timeout = timeout
        self._write_timeout = write_timeout
        now = loop.time()
        self._deadline = (now if since is None else since) + timeout
        self._fired = False
        self._paused_at = 0.0
        self.paused = False
        self.client_stalled = False
        first = self._next_check(self._deadline)
        self._handle: asyncio.TimerHandle | None = None
        if first - now > Arming.INTERVAL:
            # Armed later, and only if the exchange lasts that long (most end in a
            # millisecond): a timer per request costs more than the rest of this module.
            self._first = first
            Arming.of(loop).add(self)
        else:
            self._handle = loop.call_at(first, self._fire)

    def arm(self) -> None:
        """Set the timer for the first check, as `__init__` would have (see `Arming`)."""
        self._handle = self._loop.call_at(self._first, self._fire)

    def progress(self) -> None:
        self._deadline = self._loop.time() + self._timeout

    def pause(self) -> None:
        """The sidecar writes to its client now: the upstream's clock stops, the client's runs."""
        self.paused = True
        self._paused_at = self._loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        else:
            Arming.of(self._loop).discard(self)

    def expired(self) -> bool:
        """After a CancelledError: was it this deadline alone (then it is swallowed)?"""
        return self._fired and self._task.uncancel() == 0

    def _next_check(self, deadline: float) -> float:
        # A pause is only noticed when the timer fires: with a write timeout it fires
        # at least every half of it, so a client is cut off after 1 to 1.5 times it.
        if self._write_timeout is None:
            return deadline
        return min(deadline, self._loop.time() + self._write_timeout / 2)

    def _fire(self) -> None:
        now = self._loop.time()
        if self.paused:
            self._deadline = now + self._timeout
            write_timeout = self._write_timeout
            if write_timeout is not None and now - self._paused_at >= write_timeout:
                self.client_stalled = True
                self._fired = True
                self._task.cancel()
                return
        if self._deadline - now > _TIMER_RESOLUTION:
            self._handle = self._loop.call_at(self._next_check(self._deadline), self._fire)
            return
        self._fired = True
        self._task.cancel()


class _Upload:
    """The client's request body on its way upstream.

    Every chunk that moves pushes the request deadline out again, so the
    deadline only runs for real once the body is whole, as Envoy's route timeout
    does: a slow uploader is not an upstream timeout. `waiting_on_client` says
    whose turn it was when the deadline passed. It is written by its own task
    (an early answer can come while it goes on), which closes the upstream
    connection if the upload cannot go on: the upstream may not wait for the rest.
    """

    __slots__ = (
        "_clock",
        "_left",
        "_source",
        "client_failed",
        "finished_at",
        "too_large",
        "waiting_on_client",
        "watchdog",
    )

    def __init__(
        self,
        source: aiohttp.StreamReader,
        watchdog: _Watchdog,
        clock: Clock,
        max_size: int | None,
    ) -> None:
        self._source = source
        self._clock = clock
        self._left = max_size
        """Bytes the client may still send; None: no limit."""
        self.too_large = False
        self.finished_at: float | None = None
        """When the client's last byte went upstream: the upstream's time starts there."""
        self.watchdog: _Watchdog | None = watchdog
        """Set to None once the response headers are in: from then on only the
        response body's progress may move the deadline, or an endless upload
        would hide a stalled response."""
        self.waiting_on_client = False
        self.client_failed = False

    def raise_if_failed(self) -> None:
        """An exchange that broke because of the client's upload is the client's fault."""
        if self.too_large:
            raise BodyTooLarge("the request body is longer than max_body_size")
        if self.client_failed:
            raise InvalidRequest("the client's request body broke off")

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            self.waiting_on_client = True
            try:
                chunk = await self._source.readany()
            except asyncio.CancelledError:
                # Put into the body by the server (shutdown, client gone), unless this
                # task itself is being cancelled.
                task = asyncio.current_task()
                self.client_failed = task is not None and task.cancelling() == 0
                raise
            except Exception:
                self.client_failed = True  # e.g. broken chunked framing from the client
                raise
            self.waiting_on_client = False
            if self.watchdog is not None:
                self.watchdog.progress()
            if not chunk:
                self.finished_at = self._clock()
                return
            if self._left is not None:
                self._left -= len(chunk)
                if self._left < 0:
                    # Stop here: the upstream sees the upload break off, never a body
                    # that looks whole.
                    self.too_large = True
                    raise BodyTooLarge("the request body is longer than max_body_size")
            yield chunk


class Exchange:
    """One request to an upstream, from its response headers to the end of its body."""

    __slots__ = ("_connection", "_pool", "_upload", "_watchdog", "_writer", "elapsed", "response")

    def __init__(
        self,
        response: Response,
        pool: Pool,
        connection: Connection,
        writer: asyncio.Task[None] | None,
        watchdog: _Watchdog,
        upload: _Upload | None,
        elapsed: float,
    ) -> None:
        self.response = response
        self.elapsed = elapsed
        """Seconds the upstream took to answer: from the end of the request body (or the
        start, if it answered before the body was whole) to the response headers."""
        self._pool = pool
        self._connection = connection
        self._writer = writer
        """The upload's task, while it may still run."""
        self._watchdog = watchdog
        watchdog.pause()  # the body's clock starts when the proxy asks for it
        self._upload = upload
        if upload is not None:
            upload.watchdog = None

    async def body(self) -> AsyncIterator[bytes]:
        """The response body as it arrives.

        Raises `UpstreamTimeout` when nothing arrives for the request timeout (or
        `ClientBodyTimeout` if the upstream was waiting for the rest of a stalled
        upload), `UpstreamReset` when the upstream breaks off, including a reset
        of a body that was to end with the connection, and `BodyTooLarge` or
        `InvalidRequest` when the client's upload, still going on, passed its
        limit or broke: the client's fault.
        """
        watchdog = self._watchdog
        content = self.response.content
        try:
            while True:
                watchdog.paused = False
                watchdog.progress()
                chunk = await content.readany()
                watchdog.pause()
                if not chunk:
                    break
                yield chunk
        except asyncio.CancelledError:
            if not watchdog.expired():
                raise
            if watchdog.client_stalled:  # the client's write timeout ran out just now
                raise ClientWriteTimeout("the client stopped reading its response") from None
            self._raise_if_client_failed()
            if self._upload is not None and self._upload.waiting_on_client:
                raise ClientBodyTimeout("the client stopped sending its request body") from None
            raise UpstreamTimeout("the response body stalled") from None
        except (aiohttp.ClientError, OSError) as e:
            self._raise_if_client_failed()
            raise translate(e, after_headers=True) from e

    def client_stalled(self) -> bool:
        """After a CancelledError while writing to the client: was it the write timeout?

        (Then the cancellation is swallowed: the caller cuts the client off.)
        """
        watchdog = self._watchdog
        return watchdog.client_stalled and watchdog.expired()

    def _raise_if_client_failed(self) -> None:
        if self._upload is not None:
            self._upload.raise_if_failed()

    def close(self) -> None:
        """Let the connection go: back to the pool if the exchange ended whole, else closed."""
        self._watchdog.stop()
        writer = self._writer
        if writer is not None and not writer.done():
            # The answer came before the upload's end: the connection cannot be reused.
            writer.cancel()
            self._connection.close()
            return
        self._pool.release(self._connection)


@dataclass(slots=True)
class Sent:
    """A body-less request the caller already sent on a pooled connection (see
    `Proxy.begin`), for `send` to carry on with as if it had sent it itself."""

    connection: Connection
    answer: asyncio.Future[Answer]
    at: float
    """`clock()` when it was sent."""
    loop_at: float
    """The loop's time when it was sent: the request timeout runs from there."""
    taken: bool = False
    """Set by whoever carries on with it: until then, the connection is the sender's."""


async def send(
    session: Pool,
    method: str,
    origin: str,
    target: str,
    headers: CIMultiDict[str],
    body: aiohttp.StreamReader | None,
    connect_timeout: float | None,
    request_timeout: float,
    clock: Clock,
    max_body_size: int | None = None,
    write_timeout: float | None = None,
    sent: Sent | None = None,
) -> Exchange:
    """Send a request to `origin` ("scheme://host:port") for `target` (path and query),
    and return once its response headers are in; or, given `sent`, wait for that one.

    Raises `UpstreamError` (with the time the upstream had in `elapsed`),
    `ClientBodyTimeout` (the client stopped sending its body), `BodyTooLarge`
    (the body passed `max_body_size` bytes), or `InvalidRequest` (what the client
    sent cannot go on the wire). `clock` measures the upstream's time;
    `write_timeout` bounds each wait for the client to take part of the response
    (see `Exchange.client_stalled`). The caller must `close()` the exchange.
    """
    started = clock() if sent is None else sent.at
    where = session.origin(origin)
    try:
        head, chunked = request_head(method, target, where, headers, body is not None)
    except ValueError as e:  # e.g. a header value that cannot go on the wire
        raise InvalidRequest(str(e)) from e
    # Given `sent`, the response headers are due `request_timeout` after it was sent.
    watchdog = _Watchdog(request_timeout, write_timeout, None if sent is None else sent.loop_at)
    upload = _Upload(body, watchdog, clock, max_body_size) if body is not None else None

    def elapsed() -> float:
        now = clock()
        finished = upload.finished_at if upload is not None else None
        return now - (finished if finished is not None else started)

    try:
        try:
            connection, writer, response = await _exchange(
                session, where, method, head, upload, chunked, connect_timeout, sent
            )
        except asyncio.CancelledError:
            watchdog.stop()
            if not watchdog.expired():
                raise
            if upload is not None and upload.waiting_on_client:
                raise ClientBodyTimeout("the client stopped sending its request body") from None
            raise UpstreamTimeout("no response headers in time") from None
        except (OSError, BadResponse, aiohttp.ClientError, BodyTooLarge, InvalidRequest) as e:
            watchdog.stop()
            if upload is not None:
                upload.raise_if_failed()
            raise translate(e, after_headers=False) from e
        except BaseException:
            watchdog.stop()  # never leave a cancellation armed against the task
            raise
        if not 200 <= response.status <= 599:
            # 1xx were skipped; a 101 nobody asked for, or a status out of range, is not
            # an answer a client can use.
            watchdog.stop()
            if writer is not None:
                writer.cancel()
            connection.close()
            raise UpstreamUnreachable(f"unusable status {response.status}")
    except UpstreamError as e:
        e.elapsed = elapsed()
        raise
    return Exchange(response, session, connection, writer, watchdog, upload, elapsed())


async def _exchange(
    pool: Pool,
    origin: Origin,
    method: str,
    head: bytes,
    upload: _Upload | None,
    chunked: bool,
    connect_timeout: float | None,
    sent: Sent | None = None,
) -> tuple[Connection, asyncio.Task[None] | None, Response]:
    """One request on a pooled or new connection (or `sent` already), until its
    response head is in.

    A request without a body whose method is idempotent is sent again, once, on
    another connection, if the first closes before any answer (a pooled one the
    upstream was closing, say), as aiohttp's client did (RFC 9112 9.3.1.1).
    """
    retry = upload is None and method in IDEMPOTENT_METHODS
    while True:
        answer: asyncio.Future[Answer] | None = None
        if sent is not None:
            connection, answer, sent = sent.connection, sent.answer, None
        else:
            connection = pool.idle(origin) or await pool.connect(origin, connect_timeout)
        writer: asyncio.Task[None] | None = None
        try:
            if answer is None:
                answer = connection.request(head, with_body=method != "HEAD")
            if upload is not None:
                writer = asyncio.create_task(connection.upload(upload.chunks(), chunked))
                writer.add_done_callback(_retrieve)
            message, payload = await answer
        except Disconnected:
            connection.close()
            if writer is not None:
                writer.cancel()
            if not retry:
                raise
            retry = False
            continue
        except BaseException:
            connection.close()
            if writer is not None:
                writer.cancel()
            raise
        if writer is not None and writer.done():
            writer = None
        return connection, writer, Response(message, payload)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: an upload's failure is reported by the exchange
