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
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiohttp import HttpVersion10, HttpVersion11, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from aiohttp.log import server_logger
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "COALESCE_BELOW",
    "Begin",
    "FastResponse",
    "Forwarding",
    "Handler",
    "ProxyServer",
    "Request",
    "Response",
    "SimpleRequest",
]


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
_HEAD_END = b"\r\n\r\n"
_PENDING_LIMIT = 2**16
"""Bytes kept from a client while its request is in hand, before reading pauses."""
_NOT_SIMPLE = ("Connection", "Content-Length", "Expect", "Transfer-Encoding", "Upgrade")
"""Headers that take a request off the fast path (any framing, or connection management)."""


Handler = Callable[["Request"], Coroutine[Any, Any, "Response"]]
Begin = Callable[["SimpleRequest"], bool]


class Forwarding(Protocol):
    """A simple request being answered without a task (see `SimpleRequest.hold`)."""

    def abort(self) -> None:
        """The client went away: stop, with no answer."""

    def escalate(self) -> None:
        """Go on in a task (`SimpleRequest.adopt`): the server waits for tasks."""


class ProxyServer(web.Server):
    """`web.Server` whose connections enforce `header_timeout` on every request.

    A connection starts on the fast path (`_FastConnection`), and moves to
    aiohttp's `RequestHandler` (`_Connection`) for good at its first request
    that is not a simple one.
    """

    def __init__(self, handler: Handler, *, header_timeout: float, **kwargs: Any) -> None:
        self.proxy_handler = handler
        """The handler itself, without the checks `handle` adds (simple requests pass them).
        May be replaced while serving: every request reads it afresh."""
        self.begin: Begin | None = None
        """Offered each simple request first: True if it took it (and answers it without
        a task, or hands it to one itself), False to leave it to `proxy_handler`. None:
        every request goes to `proxy_handler`. May be replaced while serving."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            connection = request.protocol
            if not isinstance(connection, _Connection):  # never: handler() makes them
                raise TypeError("not a proxy connection")
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
                response = await self.proxy_handler(request)
                assert isinstance(response, web.StreamResponse)  # for an aiohttp request
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
        # The protocol factory of the listening socket. Not a RequestHandler: the fast
        # path makes one (`handler()`) when the connection needs it.
        return _FastConnection(self)  # type: ignore[return-value]

    def handler(self) -> _Connection:
        # `_kwargs` is what web.Server itself passes to each RequestHandler.
        return _Connection(self, header_timeout=self._header_timeout, **self._kwargs)

    @property
    def keepalive_timeout(self) -> float:
        return float(self._kwargs.get("keepalive_timeout", 3630.0))


class SimpleRequest:
    """A request on the fast path: a GET of HTTP/1.1, no body, no connection headers.

    It has what the proxy reads of an aiohttp `BaseRequest`, under the same names.
    """

    __slots__ = ("_message", "headers", "method", "protocol", "raw_path", "remote")

    scheme = "http"
    version = HttpVersion11
    content = EMPTY_PAYLOAD
    content_length = None
    body_exists = False

    def __init__(self, protocol: _FastConnection, message: RawRequestMessage) -> None:
        self._message = message
        self.protocol = protocol
        self.method: str = message.method
        self.raw_path: str = message.path
        self.headers: CIMultiDictProxy[str] = message.headers
        self.remote = protocol.remote

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    def response(self, status: int, reason: str, headers: CIMultiDict[str]) -> FastResponse:
        return FastResponse(self.protocol, status, reason, headers)

    # For `ProxyServer.begin`, which answers without a task; each ends with one of
    # `finish`, `answer_now` or `adopt`, and once `hold` is called, no later.

    def hold(self, forwarding: Forwarding) -> None:
        """The answer comes from `forwarding`'s callbacks; a client that goes away aborts
        it, and a shutdown has it `escalate`."""
        self.protocol._forwarding = forwarding

    def adopt(self, handling: Coroutine[Any, Any, Response]) -> asyncio.Task[None]:
        """Answer with what `handling` returns, in a task, as `proxy_handler`'s would be.

        A client that goes away cancels the task, which may be before `handling` ever
        ran: whatever it was to let go of, the task's done callbacks must then."""
        return self.protocol.adopt(self, handling)

    def finish(self, keep: bool) -> None:
        """The response is whole on the wire; `keep`: the connection may take another."""
        self.protocol.finish(keep)

    def answer_now(self, response: web.Response) -> None:
        """Write a response the handler made whole (a rejection), and finish."""
        self.protocol.answer_now(response)

    def fail(self) -> None:
        """The handler raised (a bug): log it, answer 500 if nothing was sent, and close."""
        self.protocol.fail()


Request = web.BaseRequest | SimpleRequest


class FastResponse:
    """A response to a `SimpleRequest`, written with `StreamResponse`'s interface.

    Its head is what aiohttp's would be (Date, Server, Content-Type defaults;
    chunked when the length is unknown), serialized by aiohttp's C helper. A
    short body of known length goes out in one write with its head.
    """

    __slots__ = (
        "_chunked",
        "_eof",
        "_head",
        "_headers",
        "_protocol",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        protocol: _FastConnection,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
    ) -> None:
        self._protocol = protocol
        self.status = status
        self.reason = reason
        self._headers = headers
        self._head: bytes | None = None
        """The serialized head, until written."""
        self._chunked = False
        self._eof = False
        self.keep_alive = True

    def force_close(self) -> None:
        self.keep_alive = False

    @property
    def prepared(self) -> bool:
        return self._head is not None or self._eof

    @property
    def needs_drain(self) -> bool:
        """Whether the client is behind: `write` and `write_eof` would wait for it."""
        return self._protocol._paused

    async def drain(self) -> None:
        if self._protocol._paused:
            await self._protocol._drain_helper()

    async def prepare(self, request: Request) -> None:
        self.start()

    def start(self) -> None:
        """`prepare`, which never waits."""
        headers = self._headers
        status = self.status
        length: int | None = None
        if must_be_empty_body("GET", status):
            if should_remove_content_length("GET", status):
                headers.popall("Content-Length", None)
            headers.popall("Transfer-Encoding", None)
        else:
            value = headers.get("Content-Length")
            if value is None:
                self._chunked = True
                headers["Transfer-Encoding"] = "chunked"
            else:
                length = int(value)
            if length != 0:
                headers.setdefault("Content-Type", "application/octet-stream")
        _finish_head(headers, self.keep_alive)
        head = _serialize_headers(f"HTTP/1.1 {status} {self.reason}", headers)
        if length is not None and length < COALESCE_BELOW:
            self._head = head  # sent with the first bytes of the body
        else:
            self._head = b""
            self._send(head)

    def _send(self, data: bytes) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(data)

    async def write(self, data: bytes) -> None:
        self.write_now(data)
        await self.drain()

    def write_now(self, data: bytes) -> None:
        """`write`, without waiting for a client that is behind."""
        head = self._head
        if head:
            self._head = b""
            data = head + data if not self._chunked else head + _chunk(data)
        elif self._chunked:
            data = _chunk(data)
        self._send(data)

    async def write_eof(self) -> None:
        if self._eof:
            return
        self.end_now()
        await self.drain()

    def end_now(self) -> None:
        """`write_eof`, without waiting for a client that is behind."""
        if self._eof:
            return
        self._eof = True
        data = self._head or b""
        self._head = b""
        if self._chunked:
            data += b"0\r\n\r\n"
        if data:
            self._send(data)


COALESCE_BELOW = 65536
"""A body of known length shorter than this goes out in one write with its head, on
either path (`FastResponse`, and the proxy's `_CoalescedResponse` for aiohttp's)."""

Response = web.StreamResponse | FastResponse


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def _finish_head(headers: CIMultiDict[str], keep_alive: bool) -> None:
    """What aiohttp's `StreamResponse` adds to every head (the request is HTTP/1.1)."""
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time()
    headers.setdefault("Server", SERVER_SOFTWARE)
    if not keep_alive and "Connection" not in headers:
        headers["Connection"] = "close"


class _FastConnection(BaseProtocol):
    """A client connection on the fast path, until it sends something else.

    It handles requests that come whole, one per read, with nothing after
    them: GETs of HTTP/1.1 without a body or connection headers (as good as
    every request of a keep-alive client), parsed by aiohttp's C parser, and
    answered with `FastResponse`. At the first read that is anything else (a
    head in pieces, pipelining, a body, another method or version, a malformed
    request), it hands the connection, with those bytes, to aiohttp's
    `RequestHandler` (`_Connection`) for good. Bytes that come while a request
    is in hand wait for its end (they are decided on then: responses keep
    their order). It has what `Sidecar.stop` and `web.Server.shutdown` use of a
    RequestHandler: `transport`, `close()` and `shutdown()`.
    """

    def __init__(self, server: ProxyServer) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop)
        self._server = server
        self._keepalive = server.keepalive_timeout
        self._request_parser = HttpRequestParser(
            self, loop, 2**16, max_line_size=8190, max_field_size=8190, max_headers=128
        )
        self._parser = self._request_parser  # what BaseProtocol's flow control reaches
        self._task: asyncio.Task[None] | None = None
        self._forwarding: Forwarding | None = None
        """The request in hand when it is answered without a task (`ProxyServer.begin`)."""
        self._pending = b""
        self._held = False
        self._closing = False
        self._idle_until = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.remote: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        tcp_keepalive(self.transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)):
            self.remote = str(peer[0])
        elif peer is not None:
            self.remote = str(peer)
        self._server._connections[self] = self.transport  # type: ignore[index]
        # As aiohttp's: the keep-alive timeout also runs from accept.
        self._idle_until = self._loop.time() + self._keepalive
        self._idle_timer = self._loop.call_at(self._idle_until, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self._task is not None or self._forwarding is not None or self._pending:
            self._pending += data
            if len(self._pending) > _PENDING_LIMIT and not self._held:
                self._held = True  # until the request in hand is done
                self._pause_transport_reading()
            return
        self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        if not self._closing and data.find(_HEAD_END) == len(data) - 4:
            try:
                messages, upgraded, _tail = self._request_parser.feed_data(data)
            except Exception:
                messages, upgraded = [], True
            if len(messages) == 1 and not upgraded:
                message, payload = messages[0]
                if (
                    payload is EMPTY_PAYLOAD
                    and message.method == "GET"
                    and message.version == HttpVersion11
                    and not message.should_close
                    and message.path[:1] == "/"
                ):
                    headers = message.headers
                    for name in _NOT_SIMPLE:
                        if name in headers:
                            break
                    else:
                        self._begin(SimpleRequest(self, message))
                        return
        self._switch(data)

    def _switch(self, data: bytes) -> None:
        """Hand the connection to aiohttp's RequestHandler, with `data`, for good."""
        transport = self.transport
        self._server._connections.pop(self, None)  # type: ignore[call-overload]
        self._stop_timer()
        if transport is None:
            return
        connection = self._server.handler()
        connection._paused = self._paused
        transport.set_protocol(connection)
        connection.connection_made(transport)
        # Whatever held reading here (too much pipelined, or the parser's buffer for a
        # body it began) is the new handler's to decide now.
        self._resume_transport_reading()
        if self._closing:
            connection.close()
        if data:
            connection.data_received(data)

    def _begin(self, request: SimpleRequest) -> None:
        begin = self._server.begin
        try:
            if begin is not None and begin(request):
                return
        except Exception:
            self.fail()
            return
        self.adopt(request, self._server.proxy_handler(request))

    def adopt(
        self, request: SimpleRequest, handling: Coroutine[Any, Any, Response]
    ) -> asyncio.Task[None]:
        self._forwarding = None
        task = self._task = self._loop.create_task(self._run(request, handling))
        # Cancelled before its first step (its client gone at once), `_run` never awaits
        # `handling`: closed here, or it would warn that it never was.
        task.add_done_callback(lambda _: handling.close())
        return task

    def finish(self, keep: bool) -> None:
        self._forwarding = None
        self._done(keep)

    def answer_now(self, response: web.Response) -> None:
        keep = response.keep_alive is not False
        self._send_whole(response, keep)
        self._done(keep)

    async def _run(self, request: SimpleRequest, handling: Coroutine[Any, Any, Response]) -> None:
        keep = False
        try:
            response = await handling
            if isinstance(response, FastResponse):
                if not response.prepared:
                    await response.prepare(request)
                await response.write_eof()
                keep = response.keep_alive
            else:
                keep = response.keep_alive is not False
                self._send_whole(response, keep)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            pass
        except Exception:
            self.fail()  # which closes: the task in hand no longer matters
            return
        finally:
            self._task = None
        self._done(keep)

    def fail(self) -> None:
        """Called in the `except` block of a handler's bug."""
        server_logger.exception("Error handling request")
        if self.transport is not None and not self.transport.is_closing():
            self._send_whole(web.Response(status=500, text="500 Internal Server Error"), False)
        self._done(False)

    def _done(self, keep: bool) -> None:
        """The request in hand is answered: close, or wait for the next one."""
        transport = self.transport
        if transport is None:
            return
        if not keep or self._closing or transport.is_closing():
            transport.close()
            return
        self._idle_until = self._loop.time() + self._keepalive
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(self._idle_until, self._idle_check)
        if self._held:
            self._held = False
            self._resume_transport_reading()
        if self._pending:
            data, self._pending = self._pending, b""
            self._dispatch(data)

    def _send_whole(self, response: web.StreamResponse, keep: bool) -> None:
        """A response the handler made whole (`web.Response`): head and body in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        assert isinstance(response, web.Response)
        body = response.body
        assert body is None or isinstance(body, bytes)
        body = body or b""
        headers = CIMultiDict(response.headers)
        headers["Content-Length"] = str(len(body))
        _finish_head(headers, keep)
        head = _serialize_headers(f"HTTP/1.1 {response.status} {response.reason}", headers)
        transport.write(head + body)

    def _idle_check(self) -> None:
        self._idle_timer = None
        transport = self.transport
        if transport is None or self._task is not None or self._forwarding is not None:
            return  # re-armed when the request in hand is done
        now = self._loop.time()
        if now < self._idle_until:
            self._idle_timer = self._loop.call_at(self._idle_until, self._idle_check)
            return
        transport.close()

    def _stop_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        """Stop taking requests: close now if idle, else after the request in hand."""
        self._closing = True
        if self._task is None and self._forwarding is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Let the request in hand finish within `timeout`, then cancel it; and close."""
        self._closing = True
        self._stop_timer()
        if self._forwarding is not None:
            self._forwarding.escalate()  # into a task, to be waited for like any other
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait([task], timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait([task])
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._stop_timer()
        forwarding = self._forwarding
        if forwarding is not None:
            self._forwarding = None
            forwarding.abort()
        task = self._task
        connections = self._server._connections
        if task is not None:
            task.cancel()  # the client went away: its handler is cancelled, as aiohttp's
            task.add_done_callback(lambda _: connections.pop(self, None))  # type: ignore[call-overload]
        else:
            connections.pop(self, None)  # type: ignore[call-overload]


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
