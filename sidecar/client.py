"""A lean HTTP/1.1 client for upstreams: a keep-alive pool of asyncio Protocols.

aiohttp's ClientSession does much a proxy never asks for (redirects, cookies,
auth, tracing, middlewares, one timer per phase), and costs about twice the CPU
of writing a request head by hand and parsing the answer with aiohttp's own C
response parser. This is that: `Pool` keeps idle connections per origin;
a `Connection` sends one request at a time and hands back the response head
and a `StreamReader` for its body, with aiohttp's flow control both ways.

What the proxy sees of an exchange (deadlines, errors, the upload) is
`sidecar.upstream`'s business; here is only the wire.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientPayloadError
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "IDEMPOTENT_METHODS",
    "KEEPALIVE_TIMEOUT",
    "MAX_HEADER_SIZE",
    "Answer",
    "BadResponse",
    "Connection",
    "Disconnected",
    "Origin",
    "Pool",
    "Response",
    "request_head",
]

MAX_HEADER_SIZE = 65536
"""Bytes in an upstream's status line, and in one header value (the name not counted)."""
KEEPALIVE_TIMEOUT = 30.0
"""Seconds an idle upstream connection is kept for reuse."""
DNS_TTL = 10.0
"""Seconds a host name's addresses are kept."""
READ_LIMIT = 2**16
"""A response body's buffer: reading from the upstream pauses past twice this."""
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Sent again, once, when the connection closes before any response (RFC 9112 9.3.1.1)."""
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods that get no `Content-Length: 0` when they have no body (as aiohttp's client)."""
_EMPTY_BODY_STATUSES = frozenset({204, 304})


class Disconnected(ConnectionError):
    """The connection closed or broke before a whole response head arrived."""


class BadResponse(Exception):
    """What the upstream sent is not an HTTP/1.x response (or passes a limit)."""


class Origin:
    """Where requests go: parsed once, with its idle connections."""

    __slots__ = ("addresses", "host", "host_header", "idle", "port", "ssl")

    def __init__(self, text: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(text)
        host = parts.hostname
        if not host or parts.scheme not in ("http", "https"):
            raise ValueError(f"not an upstream origin: {text!r}")
        secure = parts.scheme == "https"
        default = 443 if secure else 80
        self.host = host
        self.port = parts.port or default
        self.ssl = ssl_context if secure else None
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if self.port == default else f"{name}:{self.port}"
        """As aiohttp writes it: the port only when it is not the scheme's default."""
        self.idle: list[Connection] = []
        self.addresses: tuple[float, list[tuple[Any, ...]]] | None = None
        """A host name's resolved addresses and until when; None also for an IP address."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self.addresses = (float("inf"), [(socket.AF_UNSPEC, 0, 0, "", (host, self.port))])


def request_head(
    method: str, target: str, origin: Origin, headers: CIMultiDict[str], body: bool
) -> tuple[bytes, bool]:
    """The request's head as bytes, and whether its body goes chunked.

    Headers go as given, after `Host`; a body of unknown length is chunked; a
    body-less request of a method that has bodies says `Content-Length: 0`.
    Raises ValueError for what cannot go on the wire (control characters, or a
    target that is not a path, such as `*`).
    """
    if target[:1] != "/":
        raise ValueError(f"not an origin-form request target: {target!r}")
    buf = _serialize_headers(f"{method} {target} HTTP/1.1", headers)
    chunked = False
    extra = b""
    if "Content-Length" not in headers:
        if body:
            chunked = True
            extra = b"Transfer-Encoding: chunked\r\n"
        elif method not in _NO_BODY_METHODS:
            extra = b"Content-Length: 0\r\n"
    line_end = buf.index(b"\r\n") + 2
    host = b"Host: " + origin.host_header.encode() + b"\r\n"
    return buf[:line_end] + host + buf[line_end:-2] + extra + b"\r\n", chunked


class Response:
    """An upstream's response head, and its body as it arrives."""

    __slots__ = ("content", "headers", "reason", "status", "version")

    def __init__(self, message: RawResponseMessage, content: StreamReader) -> None:
        self.status = message.code
        self.reason = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.version = message.version
        self.content = content

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return None if value is None else int(value)


Answer = tuple[RawResponseMessage, StreamReader]


class Connection(BaseProtocol):
    """One upstream connection: one request at a time, its response parsed as it comes."""

    __slots__ = ("_answer", "_payload", "_pool", "closed", "idle_since", "keep", "origin")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Pool, origin: Origin) -> None:
        super().__init__(loop)
        self._pool = pool
        self.origin = origin
        self._answer: asyncio.Future[Answer] | None = None
        self._payload: StreamReader | None = None
        """The current response's body as the parser fills it."""
        self.keep = True
        """False once anything says this connection must not carry another request."""
        self.closed = False
        self.idle_since = 0.0

    def request(self, head: bytes, with_body: bool) -> asyncio.Future[Answer]:
        """Send a request head; the future is the response head and body (1xx skipped)."""
        transport = self.transport
        if transport is None or self.closed:
            raise Disconnected("the upstream closed the connection")
        self._parser = HttpResponseParser(
            self,
            self._loop,
            READ_LIMIT,
            max_line_size=MAX_HEADER_SIZE,
            max_field_size=MAX_HEADER_SIZE,
            payload_exception=ClientPayloadError,
            response_with_body=with_body,
            read_until_eof=True,
            auto_decompress=False,
        )
        self._payload = None
        answer = self._answer = self._loop.create_future()
        transport.write(head)
        return answer

    def reusable(self) -> bool:
        """Whether the response was read whole and nothing forbids another request."""
        payload = self._payload
        return (
            self.keep
            and not self.closed
            and payload is not None
            and payload.is_eof()
            and payload.exception() is None
            and not self._reading_paused
        )

    def close(self) -> None:
        """Close now. A response body still coming ends as broken off, never as whole."""
        self.keep = False
        payload = self._payload
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(ClientPayloadError("the connection was closed mid-body"))
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(Disconnected("the connection was closed"))
            answer.exception()  # retrieved: whoever waited for it is gone
        if self.transport is not None and not self.closed:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:  # idle: an upstream may not speak unasked
                self.close()
            return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except Exception as e:
            error = BadResponse(str(e) or type(e).__name__)
            answer = self._answer
            if answer is not None and not answer.done():
                answer.set_exception(error)
            self.close()
            return
        answer = self._answer
        for message, payload in messages:
            code = message.code
            if 100 <= code < 200 and code != 101:
                continue  # 100 Continue, 103 Early Hints: not the answer
            if answer is None or answer.done():
                self.keep = False  # more than one answer to one request
                continue
            if message.should_close or upgraded:
                self.keep = False
            self._payload = payload
            answer.set_result((message, EMPTY_PAYLOAD if code in _EMPTY_BODY_STATUSES else payload))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.keep = False
        self._pool.lost(self)
        answer = self._answer
        if answer is not None and not answer.done():
            reason = f"the upstream broke the connection: {exc}" if exc else "the upstream closed"
            answer.set_exception(Disconnected(reason))
        else:
            payload = self._payload
            parser = self._parser
            if payload is not None and not payload.is_eof() and payload.exception() is None:
                if exc is not None:
                    # Also for a body that was to end with the connection: a reset is no end.
                    payload.set_exception(ClientPayloadError(f"the upstream reset: {exc}"))
                elif parser is not None:
                    try:
                        parser.feed_eof()  # the end of a read-until-close body
                    except Exception as e:
                        payload.set_exception(ClientPayloadError(f"the body broke off: {e}"))
        super().connection_lost(exc)

    async def upload(self, chunks: AsyncIterator[bytes], chunked: bool) -> None:
        """Write a request body; on any failure, close: the upstream never sees it whole."""
        try:
            async for chunk in chunks:
                transport = self.transport
                if transport is None:
                    raise ConnectionResetError("the upstream closed the connection")
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._paused:
                    await self._drain_helper()
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except BaseException:
            self.close()
            raise


class Pool:
    """Keep-alive connections per origin, for every route; made with a running loop."""

    def __init__(
        self,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._keepalive = keepalive_timeout
        self._origins: dict[str, Origin] = {}
        self._connections: set[Connection] = set()
        self._ssl = ssl_context
        """For https upstreams; by default (made on first use) the system's trusted CAs."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def origin(self, text: str) -> Origin:
        """The `Origin` of "scheme://host:port", parsed the first time only."""
        origin = self._origins.get(text)
        if origin is None:
            secure = text.startswith("https:")
            if secure and self._ssl is None:
                self._ssl = ssl.create_default_context()
            origin = self._origins[text] = Origin(text, self._ssl if secure else None)
        return origin

    def idle(self, origin: Origin) -> Connection | None:
        """A pooled connection to `origin`, the most recently used first."""
        idle = origin.idle
        if not idle:
            return None
        stale_before = self._loop.time() - self._keepalive
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > stale_before:
                return connection
            connection.close()
        return None

    async def connect(self, origin: Origin, timeout: float | None) -> Connection:
        """A new connection, within `timeout` seconds (resolving the name not counted)."""
        if self._closed:
            raise Disconnected("the client is closed")
        addresses = await self._resolve(origin)
        loop = self._loop
        error: OSError | None = None
        async with asyncio.timeout(timeout):
            for family, _type, proto, _name, address in addresses:
                try:
                    _transport, connection = await loop.create_connection(
                        lambda: Connection(loop, self, origin),
                        address[0],
                        address[1],
                        ssl=origin.ssl,
                        family=family,
                        proto=proto,
                        server_hostname=origin.host if origin.ssl is not None else None,
                    )
                except OSError as e:
                    error = e
                    continue
                self._connections.add(connection)
                return connection
        assert error is not None
        raise error

    async def _resolve(self, origin: Origin) -> list[tuple[Any, ...]]:
        cached = origin.addresses
        now = self._loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._loop.getaddrinfo(
            origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        if not found:
            raise OSError(f"no address for {origin.host}")
        origin.addresses = (now + DNS_TTL, list(found))
        return origin.addresses[1]

    def release(self, connection: Connection) -> None:
        """Back to the pool if its response was read whole, else closed."""
        if self._closed or not connection.reusable():
            connection.close()
            return
        connection._parser = None
        connection._answer = None
        connection._payload = None
        connection.idle_since = self._loop.time()
        connection.origin.idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._keepalive, self._sweep)

    def lost(self, connection: Connection) -> None:
        """The connection is gone (either side closed it): forget it."""
        self._connections.discard(connection)
        idle = connection.origin.idle
        if connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle for the keep-alive timeout."""
        self._sweeper = None
        now = self._loop.time()
        oldest: float | None = None
        for origin in self._origins.values():
            for connection in list(origin.idle):
                if connection.idle_since + self._keepalive <= now:
                    origin.idle.remove(connection)
                    connection.close()
                elif oldest is None or connection.idle_since < oldest:
                    oldest = connection.idle_since
        if oldest is not None:
            delay = max(oldest + self._keepalive - now, 0.01)
            self._sweeper = self._loop.call_later(delay, self._sweep)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            origin.idle.clear()
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        await asyncio.sleep(0)  # let the transports finish closing
