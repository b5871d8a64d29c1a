"""The wire to upstreams: keep-alive HTTP/1.1 connections, pooled per origin.

A `Connection` sends one request at a time and parses its response as it
arrives (httptools, the parser uvicorn uses), handing each event to the
`Events` of the request in hand: the head, each piece of body, the end, or the
connection's loss. Nothing here knows of routes, breakers or error kinds: what
an event means for the proxy is `sidecar.upstream`'s business, the one module
that turns what happens here into the project's own errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httptools

from sidecar.routing import authority
from sidecar.timers import Timer, Timers
from sidecar.tls import TlsContext, TlsSettings

if TYPE_CHECKING:
    from sidecar.listener import Relay

__all__ = [
    "DNS_TTL",
    "KEEPALIVE_TIMEOUT",
    "MAX_HEADER_SIZE",
    "BadResponse",
    "Connection",
    "Disconnected",
    "Events",
    "Origin",
    "Pool",
]

MAX_HEADER_SIZE = 65536
"""Bytes in an upstream's status line, and in one header value (the name not counted)."""
MAX_HEAD_SIZE = 2**20
"""Bytes of a response head in all: past this, the upstream is not speaking HTTP to us."""
KEEPALIVE_TIMEOUT = 30.0
"""Seconds an idle upstream connection is kept for reuse."""
DNS_TTL = 10.0
"""Seconds a host name's addresses are kept."""
_NO_BODY_STATUSES = frozenset({204, 304})


class Disconnected(ConnectionError):
    """The connection closed or broke before the response was whole."""


class BadResponse(Exception):
    """What the upstream sent is not an HTTP/1.x response (or passes a limit)."""


class Events(Protocol):
    """What a `Connection` tells about the response to the request in hand."""

    def wire_head(self, status: int, reason: bytes, block: bytes) -> None:
        """The response head (1xx interim answers skipped; a 101 is passed on): its
        reason phrase, and its header lines as they came, each ending in CRLF."""

    def wire_body(self, chunk: bytes) -> None: ...

    def wire_end(self) -> None:
        """The response is whole."""

    def wire_lost(self, error: BaseException) -> None:
        """The connection broke (or the upstream spoke nonsense) before the response
        was whole; `Disconnected` or `BadResponse`, or an `OSError` from the socket."""

    def wire_writable(self, writable: bool) -> None:
        """The socket's send buffer passed its high-water mark (False), or drained (True)."""


def _ends_with_the_connection(block: bytes) -> bool:
    """Whether a body is framed by the connection's end: no length, not chunked."""
    low = b"\r\n" + block.lower()
    if b"\r\ncontent-length:" in low:
        return False
    at = low.find(b"\r\ntransfer-encoding:")
    if at < 0:
        return True
    return not low[at : low.index(b"\r\n", at + 2)].rstrip().endswith(b"chunked")


class Origin:
    """Where requests go: parsed once, with its idle connections."""

    __slots__ = (
        "addresses",
        "host",
        "host_header",
        "idle",
        "key",
        "port",
        "retired",
        "server_name",
        "ssl",
    )

    def __init__(
        self,
        text: str,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None = None,
        key: str | None = None,
    ) -> None:
        self.retired = False
        """No route uses it any more (`Pool.retain`): its connections are not kept."""
        self.key = text if key is None else key
        """The pool's key for it: its text, and which TLS settings it is reached with."""
        parts = urlsplit(text)
        host = parts.hostname
        if not host or parts.scheme not in ("http", "https"):
            raise ValueError(f"not an upstream origin: {text!r}")
        secure = parts.scheme == "https"
        default = 443 if secure else 80
        self.host = host
        self.port = parts.port or default
        self.ssl = ssl_context if secure else None
        self.server_name = server_name or host
        """The name the upstream's certificate must have (and SNI's)."""
        self.host_header = authority(host, None if self.port == default else self.port).encode()
        """The port only when it is not the scheme's default."""
        self.idle: list[Connection] = []
        self.addresses: tuple[float, list[tuple[Any, ...]]] | None = None
        """A host name's resolved addresses and until when; None also for an IP address."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self.addresses = (float("inf"), [(socket.AF_UNSPEC, 0, 0, "", (host, self.port))])


class Connection(asyncio.Protocol):
    """One upstream connection: one request at a time, its response parsed as it comes."""

    __slots__ = (
        "_awaiting",
        "_block",
        "_head_only",
        "_in_body",
        "_interim",
        "_parser",
        "_pool",
        "_raw",
        "_stale",
        "closed",
        "events",
        "feeding",
        "idle_since",
        "keep",
        "origin",
        "reading_paused",
        "relay",
        "released",
        "session_kept",
        "transport",
        "writing_paused",
    )

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self.events: Events | None = None
        """Who hears of the response to the request in hand; None while idle."""
        self.keep = True
        """False once anything says this connection must not carry another request."""
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self.writing_paused = False
        self._head_only = False
        self._awaiting = False
        """A request went out and its answer's head is not whole yet."""
        self._raw = b""
        """What came since the request went out, while `_awaiting`: the head's bytes."""
        self._block = b""
        """The answer's header lines, while its body comes."""
        self._in_body = False
        self._interim = 0
        """Interim heads (1xx) before the answer's."""
        self._stale = False
        self.feeding = False
        """The parser is in the middle of a read (its callbacks are running)."""
        self.released = False
        """Handed back to the pool while `feeding`: it goes back once the read is parsed."""
        self.relay: Relay | None = None
        """Who takes the connection's bytes, both ways, after `take_over`."""
        self.session_kept = False
        """Its TLS session was offered to the next connections."""

    # -- the request side ----------------------------------------------------------------

    def request(self, head: bytes, events: Events, head_only: bool) -> None:
        """Send a request head; `events` hears of its response. `head_only`: the
        response has no body whatever its head says (a HEAD request)."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise Disconnected("the upstream closed the connection")
        if self._parser is None or self._stale:
            self._parser = httptools.HttpResponseParser(self)
            self._stale = False
        self.events = events
        self._head_only = head_only
        self._awaiting = True
        self._in_body = False
        self._interim = 0
        transport.write(head)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def reusable(self) -> bool:
        """Whether the response was read whole and nothing forbids another request."""
        return (
            self.keep
            and not self.closed
            and not self._awaiting
            and not self._in_body
            and not self.reading_paused
        )

    def close(self) -> None:
        """Close once what was written is out, telling nobody."""
        self.keep = False
        self.events = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Close now, unsent bytes dropped, telling nobody: whoever had the request in hand
        let it go (an upstream that stopped reading never lets a close flush)."""
        self.keep = False
        self.events = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)

    def take_over(self, relay: Relay) -> None:
        """No more HTTP: from now on the connection's bytes go to `relay` (a WebSocket
        session after a 101, a CONNECT tunnel). It is closed with the pool still."""
        self.relay = relay
        self.events = None
        self.keep = False
        self._in_body = False

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.relay_data(data)
            return
        if self.events is None:
            if data:  # idle: an upstream may not speak unasked
                self.close()
            return
        if self._awaiting:
            self._raw = self._raw + data if self._raw else data
            if len(self._raw) > MAX_HEAD_SIZE:
                self._fail(BadResponse("the response head is too large"))
                return
        parser = self._parser
        assert parser is not None
        self.feeding = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # A 101: its head went to `events` already, which took the connection over
            # (what came after the head is the relay's), or refused it. No HTTP follows.
            relay = self.relay
            if relay is None:
                self.close()
            elif len(data) > e.args[0]:
                relay.relay_data(data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, BadResponse) else BadResponse(str(e)))
        except httptools.HttpParserError as e:
            self._fail(BadResponse(str(e) or type(e).__name__))
        finally:
            self.feeding = False
        if self.released:
            # Back to the pool only now: what else came with this read is parsed (an
            # answer nobody asked for closes it), and no request goes out mid-parse.
            self.released = False
            self._pool.release(self)

    def eof_received(self) -> bool | None:
        relay = self.relay
        if relay is not None and relay.relay_eof():
            return True  # a tunnel passes the half-close on
        return None  # close the transport: connection_lost follows

    def write_eof(self) -> bool:
        """Half-close (a tunnel's): send no more, keep reading. False if the transport
        cannot (TLS)."""
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.keep = False
        self._pool.lost(self)
        self._parser = None  # (it refers back to this object: no cycle left behind)
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.relay_closed()
            return
        events = self.events
        if events is None:
            return
        self.events = None
        if exc is None and self._in_body and _ends_with_the_connection(self._block):
            # A body that ends with the connection (no length, not chunked): this is its end.
            self._in_body = False
            events.wire_end()
        elif isinstance(exc, ssl.SSLError):
            events.wire_lost(exc)  # (a TLS alert: the upstream refused us, say)
        elif exc is not None:
            events.wire_lost(Disconnected(f"the upstream broke the connection: {exc}"))
        else:
            events.wire_lost(Disconnected("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.relay is not None:
            self.relay.relay_writable(False)
        elif self.events is not None:
            self.events.wire_writable(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.relay is not None:
            self.relay.relay_writable(True)
        elif self.events is not None:
            self.events.wire_writable(True)

    # -- the parser's callbacks ----------------------------------------------------------
    # (No `on_header`: llhttp checks the head, and the head's header lines are taken
    # whole from the bytes that carried them, so no header costs a Python call.)

    def on_message_begin(self) -> None:
        if self.events is None:  # a second answer, behind the first: nobody asked for it
            self.close()
            raise BadResponse("an answer nobody asked for")

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim += 1  # 100 Continue, 103 Early Hints: not the answer
            return
        if not parser.should_keep_alive():
            self.keep = False
        reason, block = self._final_head()
        events = self.events
        if events is None:
            return
        self._block = block
        if self._head_only or status in _NO_BODY_STATUSES:
            # No body follows, whatever the head says (llhttp knows this of 204 and 304,
            # not of a HEAD's answer): the response is whole, and this parser is done.
            self._stale = True
            events.wire_head(status, reason, block)
            if self.events is events:
                events.wire_end()
            return
        self._in_body = True
        events.wire_head(status, reason, block)

    def _final_head(self) -> tuple[bytes, bytes]:
        """The answer's reason phrase and header lines (each ending in CRLF), from the
        bytes received since the request went out: past the interim heads, if any."""
        raw = self._raw
        self._raw = b""
        self._awaiting = False
        start = 0
        for _ in range(self._interim + 1):
            while raw.startswith(b"\r\n", start):
                start += 2  # empty lines before a status line: llhttp skips them too
            if _ < self._interim:
                start = raw.index(b"\r\n\r\n", start) + 4
        line_end = raw.index(b"\r\n", start)
        end = raw.index(b"\r\n\r\n", start)
        if line_end - start > MAX_HEADER_SIZE:
            raise BadResponse("the status line is too long")
        block = raw[line_end + 2 : end + 2]
        if len(block) > MAX_HEADER_SIZE:
            for line in block.split(b"\r\n"):
                if len(line.partition(b":")[2].strip()) > MAX_HEADER_SIZE:
                    raise BadResponse("a header is too long")
        return raw[start + 13 : line_end], block  # after "HTTP/1.1 200 "

    def on_body(self, body: bytes) -> None:
        events = self.events
        if events is None or not self._in_body:
            self.keep = False  # bytes where none belong (after a HEAD's answer, say)
            return
        events.wire_body(body)

    def on_message_complete(self) -> None:
        if self._awaiting:
            return  # an interim answer's end
        if not self._in_body:
            return  # ended at its head already
        self._in_body = False
        events = self.events
        if events is not None:
            events.wire_end()

    def _fail(self, error: BaseException) -> None:
        events = self.events
        self.close()
        if events is not None:
            events.wire_lost(error)


class Pool:
    """Keep-alive connections per origin, for every route."""

    def __init__(
        self,
        timers: Timers,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timers = timers
        self._keepalive = keepalive_timeout
        self._origins: dict[str, Origin] = {}
        self._connections: set[Connection] = set()
        self._ssl = ssl_context
        """For https upstreams; by default (made on first use) the system's trusted CAs."""
        self._sweeper: Timer | None = None
        self._closed = False

    def origin(self, key: str, tls: TlsSettings | None = None) -> Origin:
        """The `Origin` of `key` ("scheme://host:port", and for an https origin with
        `tls` settings, `#` and which: see `origin_key`), parsed the first time only."""
        origin = self._origins.get(key)
        if origin is None:
            text = key.partition("#")[0]
            context: ssl.SSLContext | None = None
            if text.startswith("https:"):
                if tls is not None and tls.context is not None:
                    context = tls.context
                else:
                    if self._ssl is None:
                        self._ssl = ssl.create_default_context()
                    context = self._ssl
            server_name = tls.server_name if tls is not None else None
            origin = self._origins[key] = Origin(text, context, server_name, key)
        return origin

    def retain(self, keys: set[str]) -> None:
        """Forget every origin but those of `keys` (a reload dropped or changed the
        others): their idle connections close now, and those in use when they are done."""
        for key in [key for key in self._origins if key not in keys]:
            origin = self._origins.pop(key)
            origin.retired = True
            for connection in origin.idle:
                connection.close()
            origin.idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def idle(self, origin: Origin) -> Connection | None:
        """A pooled connection to `origin`, the most recently used first."""
        idle = origin.idle
        if not idle:
            return None
        stale_before = self._timers.time() - self._keepalive
        while idle:
            connection = idle.pop()
            if connection.keep and not connection.closed and connection.idle_since > stale_before:
                return connection
            connection.close()
        return None

    async def connect(
        self, origin: Origin, timeout: float | None, relay: Relay | None = None
    ) -> Connection:
        """A new connection, within `timeout` seconds (resolving the name not counted);
        with `relay`, one whose bytes are `relay`'s from the start (a CONNECT tunnel).

        Raises `TimeoutError` when the time runs out, `OSError` (and `ssl.SSLError`)
        when the connection cannot be made.
        """
        if self._closed:
            raise Disconnected("the pool is closed")
        addresses = await self._resolve(origin)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = (
            None if timeout is None else self._timers.call_at(self._timers.time() + timeout, expire)
        )
        error: OSError | None = None
        try:
            for family, _type, proto, _name, address in addresses:
                try:
                    _transport, connection = await loop.create_connection(
                        lambda: self._new_connection(origin, relay),
                        address[0],
                        address[1],
                        ssl=origin.ssl,
                        family=family,
                        proto=proto,
                        server_hostname=origin.server_name if origin.ssl is not None else None,
                    )
                except OSError as e:
                    error = e
                    if origin.ssl is not None and isinstance(
                        e, (ConnectionResetError, ConnectionAbortedError)
                    ):
                        # Connected, then cut off in the TLS handshake: the upstream
                        # refused it without an alert (as asyncio's servers do).
                        error = ssl.SSLError(f"reset during the TLS handshake: {e}")
                    if isinstance(error, ssl.SSLError):
                        break  # (the TLS handshake failed: no other address would pass it)
                    continue
                if isinstance(origin.ssl, TlsContext) and connection.transport is not None:
                    origin.ssl.connected(
                        connection.transport.get_extra_info("ssl_object"), origin.server_name
                    )
                if self._closed:
                    connection.close()
                    raise Disconnected("the pool is closed")
                self._connections.add(connection)
                return connection
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:
                raise TimeoutError("connect timed out") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        assert error is not None
        raise error

    def _new_connection(self, origin: Origin, relay: Relay | None) -> Connection:
        connection = Connection(self, origin)
        if relay is not None:
            connection.take_over(relay)
        return connection

    async def _resolve(self, origin: Origin) -> list[tuple[Any, ...]]:
        cached = origin.addresses
        now = self._timers.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.get_running_loop().getaddrinfo(
            origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        if not found:
            raise OSError(f"no address for {origin.host}")
        origin.addresses = (now + DNS_TTL, list(found))
        return origin.addresses[1]

    def release(self, connection: Connection) -> None:
        """Back to the pool if its response was read whole, else closed."""
        if connection.feeding:
            connection.events = None
            connection.released = True  # see `Connection.data_received`
            return
        connection.resume_reading()  # (paused for a client that was behind: the answer is in)
        origin = connection.origin
        if origin.ssl is not None and not connection.session_kept:
            connection.session_kept = True
            if connection.transport is not None and isinstance(origin.ssl, TlsContext):
                origin.ssl.used(
                    connection.transport.get_extra_info("ssl_object"), origin.server_name
                )
        if self._closed or not connection.reusable() or origin.retired:
            connection.close()
            return
        connection.events = None
        connection.idle_since = self._timers.time()
        origin.idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._timers.call_at(
                connection.idle_since + self._keepalive, self._sweep
            )

    def lost(self, connection: Connection) -> None:
        """The connection is gone (either side closed it): forget it."""
        self._connections.discard(connection)
        idle = connection.origin.idle
        if connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle for the keep-alive timeout."""
        self._sweeper = None
        now = self._timers.time()
        oldest: float | None = None
        for origin in self._origins.values():
            for connection in list(origin.idle):
                if connection.idle_since + self._keepalive <= now:
                    origin.idle.remove(connection)
                    connection.close()
                elif oldest is None or connection.idle_since < oldest:
                    oldest = connection.idle_since
        if oldest is not None:
            self._sweeper = self._timers.call_at(oldest + self._keepalive, self._sweep)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            origin.idle.clear()
        for connection in list(self._connections):
            events = connection.events
            connection.close()
            if events is not None:
                events.wire_lost(Disconnected("the sidecar is stopping"))
        self._connections.clear()
        await asyncio.sleep(0)  # let the transports finish closing
