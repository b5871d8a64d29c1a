"""The proxy listener: aiohttp's low-level server, plus the client checks it lacks.

aiohttp closes a connection that waits too long for its next request (its
keep-alive timeout, which also runs from accept), but has no deadline for a
request whose headers trickle in: a slowloris client sending a header byte now
and then would hold its connection as long as the keep-alive timeout allows,
and thousands of them hold thousands of sockets. Here the first byte of every
request starts a header timer; the request reaching the handler stops it; if
it fires first, the client gets a 408 and its connection is closed.

Two more gaps in what aiohttp's parser lets through are closed here, before any
request reaches the proxy: request lines without HTTP/1.0 or HTTP/1.1 (no
version, HTTP/0.9, HTTP/2.0 as text) are refused with 505, CONNECT and
transfer codings other than chunked with 501; and a chunked body
that turns out malformed after the request was forwarded fails the upload at
once (a 400), instead of leaving the handler waiting for bytes that will never
be valid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, StreamReader, web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler

__all__ = ["ProxyServer"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _closing_response(status: str, error: str) -> bytes:
    """A whole response written straight to the socket, for clients aiohttp cannot answer."""
    body = f'{{"error":"{error}"}}'.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_HEADER_TIMEOUT_RESPONSE = _closing_response("408 Request Timeout", "header_timeout")
_VERSION_RESPONSE = _closing_response(
    "505 HTTP Version Not Supported", "http_version_not_supported"
)
_NOT_IMPLEMENTED_RESPONSE = _closing_response("501 Not Implemented", "not_implemented")
_HTTP_1 = (HttpVersion11, HttpVersion10)


class ProxyServer(web.Server):
    """`web.Server` whose connections enforce `header_timeout` on every request."""

    def __init__(self, handler: Handler, *, header_timeout: float, **kwargs: Any) -> None:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            connection = request.protocol
            if not isinstance(connection, _Connection):  # never: __call__ makes them
                return await handler(request)
            connection.headers_received(request)
            try:
                if request.version not in _HTTP_1:
                    # aiohttp would answer in the client's "version" (`HTTP/0.9 200`),
                    # and forward the request as HTTP/1.1: refuse it on the wire.
                    return connection.refuse(_VERSION_RESPONSE)
                if request.method == "CONNECT" or not _chunked_only(request):
                    # A tunnel is no reverse proxy's business; and a body in a transfer
                    # coding other than chunked would reach the upstream undecoded, as
                    # if it were plain (the coding is hop-by-hop): RFC 9112 6.1's 501.
                    return connection.refuse(_NOT_IMPLEMENTED_RESPONSE)
                response = await handler(request)
                if connection.must_finish:
                    # Send the answer now, before `request_done` may close the connection
                    # (a malformed body, or a next request's head out of time).
                    await response.prepare(request)
                    await response.write_eof()
                return response
            finally:
                connection.request_done()

        super().__init__(handle, **kwargs)
        self._header_timeout = header_timeout

    def set_client_timeouts(self, header_timeout: float, keepalive_timeout: float) -> None:
        """Apply to connections accepted from now on (a reload); open ones keep theirs."""
        self._header_timeout = header_timeout
        self._kwargs["keepalive_timeout"] = keepalive_timeout

    def __call__(self) -> RequestHandler:
        # `_kwargs` is what web.Server itself passes to each RequestHandler.
        return _Connection(self, header_timeout=self._header_timeout, **self._kwargs)


def _chunked_only(request: web.BaseRequest) -> bool:
    """No Transfer-Encoding, or exactly `chunked` (any case, any spacing)."""
    if "Transfer-Encoding" not in request.headers:
        return True
    codings = ",".join(request.headers.getall("Transfer-Encoding")).split(",")
    return [c.strip().lower() for c in codings if c.strip()] == ["chunked"]


class _Connection(RequestHandler):
    """One client connection; times the arrival of each request's headers."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        """The body of the latest request: bytes are the next head once it is complete."""
        self._handling = False
        self._overdue = False
        """The next request's head ran out of time while this one was being handled."""
        self.body_failed = False
        """The body being handled was found malformed: the connection must close."""

    def data_received(self, data: bytes) -> None:
        # Bytes after the whole of the latest request's body are the next request's
        # head; until then they are body (the handler's, or what aiohttp reads and
        # drops after a handler that did not want it).
        body = self._body
        head = body is None or body.is_eof()
        super().data_received(data)
        if head and data and self._header_timer is None and not self._queued():
            # Timed only if the head did not arrive whole with these bytes, as most do.
            self._header_timer = asyncio.get_running_loop().call_later(
                self._header_timeout, self._header_timed_out
            )
        if self._handling and body is not None and not body.is_eof() and self._parse_failed():
            # The parser gave up on this request's body (a broken chunk): aiohttp queues
            # a 400 for after the handler, but the handler would wait for the rest of
            # the body until its timeout. Fail the body now; the proxy answers 400.
            body.set_exception(BadHttpMessage("the request body is malformed"))
            self.body_failed = True

    # aiohttp keeps the requests it parsed ahead in `_messages` (a parse error as an
    # `_ErrInfo`), from 3.8 to 3.14 at least; tests/test_client_limits.py checks it.

    def _queued(self) -> bool:
        return bool(getattr(self, "_messages", ()))

    def _parse_failed(self) -> bool:
        queued = getattr(self, "_messages", ())
        return any(type(message).__name__ == "_ErrInfo" for message, _ in queued)

    def headers_received(self, request: web.BaseRequest) -> None:
        self._body = request.content
        self._handling = True
        self._overdue = False
        self.body_failed = False
        self._stop_timer()

    @property
    def must_finish(self) -> bool:
        """Whether `request_done` may close the connection, or a timer run out meanwhile."""
        return self.body_failed or self._overdue or self._header_timer is not None

    def request_done(self) -> None:
        self._handling = False
        if self.body_failed:
            # aiohttp would go on to read the rest of a body that can no longer be read.
            self.force_close()
        elif self._overdue and not self._queued():
            self.refuse(_HEADER_TIMEOUT_RESPONSE)

    def refuse(self, response: bytes) -> web.StreamResponse:
        """Answer with `response` on the wire and close (a request aiohttp cannot answer)."""
        if self.transport is not None:
            self.transport.write(response)
        self.force_close()
        return web.Response()  # never sent: the connection is closed

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._queued():
            return  # the head came whole meanwhile: its request waits for its turn
        if self._handling:
            self._overdue = True  # answered once the request in hand is
        else:
            self.refuse(_HEADER_TIMEOUT_RESPONSE)
