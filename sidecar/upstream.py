"""The boundary to upstreams: a request goes out; its answer's events, or our own error, come back.

The proxy talks to upstreams through `send` only. This is the one module where
what the wire reports (a socket's `OSError`, a name that does not resolve, a
TLS failure, a connection that breaks, nonsense where a response should be)
becomes the project's own errors; nothing above it sees a dependency's
exception:

    UpstreamError               the upstream exchange failed; `kind` is the failure label
     +-- UpstreamUnreachable    refused, unresolvable, or reset before response headers (502)
     +-- UpstreamTimeout        connect or response deadline passed (504)
     +-- UpstreamTlsError       the TLS handshake failed, or a TLS alert came before
                                response headers (502)
     +-- UpstreamReset          broke off after its response headers (client aborted)
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

from sidecar.tls import TlsSettings
from sidecar.upstream_pool import Connection, Disconnected, Pool

__all__ = [
    "CHUNKED",
    "IDEMPOTENT_METHODS",
    "Call",
    "Receiver",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamReset",
    "UpstreamTimeout",
    "UpstreamTlsError",
    "UpstreamUnreachable",
    "send",
    "translate",
]

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Sent again, once, after a stale connection, even on a route without a retry policy
(RFC 9112 9.3.1.1); see `sidecar.exchange`."""
_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
"""Methods that get no `Content-Length: 0` when they have no body."""
CHUNKED = -1
"""`UpstreamRequest.body` for a body of unknown length: sent chunked."""


class UpstreamError(Exception):
    kind = "connect"
    """The `kind` label of `sidecar_upstream_failures_total`."""
    status = 502
    error = "upstream_unreachable"
    """The client's answer, when it comes before response headers: status and error."""
    stale = False
    """A reused pooled connection closed before any answer: the upstream was closing it as
    the request went out, and may never have read it (RFC 9112 9.3.1.1)."""


class UpstreamUnreachable(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504
    error = "upstream_timeout"


class UpstreamTlsError(UpstreamError):
    kind = "tls"
    error = "upstream_tls_error"


class UpstreamReset(UpstreamError):
    kind = "reset"


def translate(error: BaseException, *, after_headers: bool) -> UpstreamError:
    """What the wire reported, as the project's own error."""
    if isinstance(error, UpstreamError):
        return error
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(str(error) or "timed out")
    message = str(error) or type(error).__name__
    if after_headers:
        return UpstreamReset(message)
    if isinstance(error, ssl.SSLError):
        return UpstreamTlsError(message)
    return UpstreamUnreachable(message)


class UpstreamRequest:
    """What to send, and where: the proxy's request as the upstream will see it."""

    __slots__ = (
        "body",
        "connect_timeout",
        "header_lines",
        "method",
        "origin",
        "target",
        "tls",
        "upgrade",
    )

    def __init__(
        self,
        origin: str,
        method: bytes,
        target: bytes,
        header_lines: bytes,
        body: int | None,
        connect_timeout: float | None,
        tls: TlsSettings | None = None,
        upgrade: bool = False,
    ) -> None:
        self.origin = origin
        """"scheme://host:port" (and which TLS settings: see `Pool.origin`)."""
        self.tls = tls
        self.upgrade = upgrade
        """A WebSocket handshake: sent with its upgrade headers, and a 101 is an answer."""
        self.method = method
        self.target = target
        """Origin form: the path and query."""
        self.header_lines = header_lines
        """`Name: value\\r\\n` each, neither `Host` nor framing among them."""
        self.body = body
        """None: no body; N: `Content-Length: N`; `CHUNKED`: a body of unknown length."""
        self.connect_timeout = connect_timeout


class Receiver(Protocol):
    """Who hears what becomes of a request `send` sent."""

    def upstream_head(self, status: int, reason: bytes, block: bytes) -> None:
        """The response head: a status in 200-599, its reason phrase, and its header lines
        as the upstream sent them, each ending in CRLF."""

    def upstream_body(self, chunk: bytes) -> None: ...

    def upstream_end(self) -> None:
        """The response is whole (the connection is the pool's again)."""

    def upstream_failed(self, error: UpstreamError) -> None:
        """The exchange failed; no more events follow."""

    def upstream_writable(self, writable: bool) -> None:
        """The upstream cannot take more of the request body for now (False), or can again."""

    def crashed(self, error: Exception) -> None:
        """One of the methods above raised (a bug): called in its `except` block."""


def send(pool: Pool, request: UpstreamRequest, receiver: Receiver, fresh: bool = False) -> Call:
    """Send `request`: on an idle pooled connection at once, or on a new one (always, when
    `fresh`). Everything that follows reaches `receiver`, perhaps before this returns (a
    failure may)."""
    call = Call(pool, request, receiver)
    call.start(fresh)
    return call


class Call:
    """One request to an upstream, from its send to the end of its answer (one try).

    A reused pooled connection that closes before any answer fails the call with an
    error marked `stale`: the upstream was closing it as the request went out. Whether
    to send the request again (on a new connection) is the exchange's to decide, as a
    try like any other.
    """

    # (No `__slots__`: most calls keep the class-level defaults below.)
    _connection: Connection | None = None
    _task: asyncio.Task[None] | None = None
    _pending: list[bytes] | None = None
    """Request body bytes written before there was a connection to take them."""
    _chunked = False
    _left = 0
    """Bytes of a body of known length not written yet."""
    _body_done = True
    _reused = False
    answered = False
    """The response head is in: no byte of any other answer can come now."""
    done = False
    """The answer ended, failed, or was let go: no more events."""
    writable = True

    def __init__(self, pool: Pool, request: UpstreamRequest, receiver: Receiver) -> None:
        self._pool = pool
        self._request = request
        self._receiver = receiver
        origin = self._origin = pool.origin(request.origin, request.tls)
        body = request.body
        method = request.method
        if body is None:
            framing = b"" if method in _NO_BODY_METHODS else b"Content-Length: 0\r\n"
        else:
            self._body_done = False
            if body == CHUNKED:
                self._chunked = True
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                self._left = body
                framing = b"Content-Length: %d\r\n" % body
        if request.upgrade:
            framing += b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        self._head = b"%b %b HTTP/1.1\r\nHost: %b\r\n%b%b\r\n" % (
            method,
            request.target,
            origin.host_header,
            request.header_lines,
            framing,
        )

    def start(self, fresh: bool = False) -> None:
        connection = None if fresh else self._pool.idle(self._origin)
        if connection is None or not self._send_on(connection):
            self._connect()
            return
        # Sent on a reused connection, which the upstream may have been closing as it went
        # out (see the class docstring).
        self._reused = True

    # -- for the proxy -----------------------------------------------------------------

    def write(self, chunk: bytes) -> None:
        """Part of the request body (framed here as its head said)."""
        if self.done or not chunk:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        elif self._left:
            self._left -= len(chunk)
        connection = self._connection
        if connection is not None:
            connection.write(chunk)
        elif self._pending is None:
            self._pending = [chunk]
        else:
            self._pending.append(chunk)

    def end_body(self) -> None:
        """The request body is whole."""
        self._body_done = True
        if self._chunked:
            self._chunked = False
            self.write(b"0\r\n\r\n")  # (not framed again: `_chunked` is off)

    def pause_reading(self) -> None:
        if self._connection is not None:
            self._connection.pause_reading()

    def resume_reading(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def detach(self) -> Connection | None:
        """Let go, keeping the connection open for the caller (after a 101): no more
        events."""
        self.done = True
        connection, self._connection = self._connection, None
        return connection

    def abort(self) -> None:
        """Let go: no more events. The connection is closed: the upstream never sees a
        request broken off as if it were whole, nor is a half-read answer reused."""
        self.done = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()

    # -- sending -----------------------------------------------------------------------

    def _send_on(self, connection: Connection) -> bool:
        try:
            connection.request(self._head, self, self._request.method == b"HEAD")
        except Disconnected:
            connection.close()
            return False
        self._connection = connection
        pending = self._pending
        if pending is not None:
            self._pending = None
            for chunk in pending:
                connection.write(chunk)
        return True

    def _connect(self) -> None:
        self.writable = False
        self._task = asyncio.get_running_loop().create_task(self._connecting())

    async def _connecting(self) -> None:
        try:
            connection = await self._pool.connect(self._origin, self._request.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # OSError, TLS, TimeoutError, a closed pool
            self._task = None
            self._fail(translate(e, after_headers=False))
            return
        self._task = None
        if self.done:
            connection.close()
            return
        if not self._send_on(connection):
            self._fail(UpstreamUnreachable("the upstream closed the connection at once"))
            return
        if not connection.writing_paused:
            self.writable = True
            self._tell(self._receiver.upstream_writable, True)

    def _fail(self, error: UpstreamError) -> None:
        if self.done:
            return
        self.abort()
        try:
            self._receiver.upstream_failed(error)
        except Exception as e:
            self._receiver.crashed(e)

    def _tell(self, event: object, *args: object) -> None:
        try:
            event(*args)  # type: ignore[operator]
        except Exception as e:
            self.abort()
            self._receiver.crashed(e)

    # -- the wire's events ---------------------------------------------------------------
    # (`wire_head` and `wire_body` write `_tell`'s guard out: they run for every request,
    # and the call through `_tell` costs about 0.1 us each, measured.)

    def wire_head(self, status: int, reason: bytes, block: bytes) -> None:
        if self.done:
            return
        if not 200 <= status <= 599 and not (status == 101 and self._request.upgrade):
            # 1xx were skipped; a 101 nobody asked for, or a status out of range, is not
            # an answer a client can use.
            self._fail(UpstreamUnreachable(f"unusable status {status}"))
            return
        self.answered = True
        try:
            self._receiver.upstream_head(status, reason, block)
        except Exception as e:
            self.abort()
            self._receiver.crashed(e)

    def wire_body(self, chunk: bytes) -> None:
        if not self.done:
            try:
                self._receiver.upstream_body(chunk)
            except Exception as e:
                self.abort()
                self._receiver.crashed(e)

    def wire_end(self) -> None:
        if self.done:
            return
        self.done = True
        connection, self._connection = self._connection, None
        if connection is not None:
            if self._body_done and not self._left:
                self._pool.release(connection)
            else:
                # Answered before the upload's end (or the body sent was not the length
                # the head said): the connection cannot carry another request.
                connection.abort()
        try:
            self._receiver.upstream_end()
        except Exception as e:
            self._receiver.crashed(e)

    def wire_lost(self, error: BaseException) -> None:
        if self.done:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
        failure = translate(error, after_headers=self.answered)
        if not self.answered and isinstance(error, Disconnected):
            if self._reused:
                failure.stale = True
            elif getattr(self._origin.ssl, "presents_certificate", False):
                # A new mTLS connection closed before any answer: under TLS 1.3 the
                # upstream judges our certificate only after the handshake, and a
                # refusal without an alert (asyncio's servers send none) looks so.
                failure = UpstreamTlsError(
                    f"the upstream closed a new TLS connection before answering (our "
                    f"client certificate refused?): {error}"
                )
        self._fail(failure)

    def wire_writable(self, writable: bool) -> None:
        if not self.done:
            self.writable = writable
            self._tell(self._receiver.upstream_writable, writable)
