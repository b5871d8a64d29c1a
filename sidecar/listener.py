"""The proxy listener: one protocol object owns each client connection, first byte to close.

`ClientConnection` parses requests (httptools, the parser uvicorn uses) and
owns everything HTTP/1.1 asks of a server's side of a connection: keep-alive
and its idle timeout, the header timeout (slowloris), pipelining (requests
parsed ahead wait in line; answers keep their order), `Expect: 100-continue`,
request bodies with back-pressure, the write timeout for a client that stops
reading, and after an upgrade, a plain byte relay. Every request goes through
it; no connection changes implementation half-way. It knows nothing of routes
or breakers: each request head goes to one handler (`Listener.handler`), which
answers through the `Request` it is given, at once or later.

What the listener refuses itself, it answers as the sidecar answers anything:
JSON, an `HTTP/1.1` status line, `Connection: close`, and never the client's
bytes or a dependency's message echoed back (the reason goes to the log):
malformed requests 400 `bad_request`, versions other than 1.0 and 1.1 505,
a head that does not arrive within the header timeout 408. An upgrade request
(WebSocket) and CONNECT go to the handler like any other, which may answer
them with `Request.upgrade`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import httptools

from sidecar.config import ClientTimeouts
from sidecar.logs import event
from sidecar.responses import error_answer
from sidecar.timers import Timer, Timers

__all__ = [
    "COALESCE_BELOW",
    "UPGRADE",
    "BodySink",
    "ClientConnection",
    "Handler",
    "Listener",
    "Relay",
    "Request",
    "date_line",
]

log = logging.getLogger("sidecar")

COALESCE_BELOW = 65536
"""A response body of known length shorter than this goes out in one write with its head."""
MAX_REQUEST_LINE = 8190
"""Bytes in a request target (400 beyond)."""
MAX_FIELD_SIZE = 8190
"""Bytes in a header's name, and in its value (400 beyond)."""
MAX_HEADERS = 128
"""Headers in a request (400 beyond)."""
MAX_HEAD_SIZE = 2**21
"""Bytes a request head may take in all before it is refused: what the limits above allow."""
LINGER = 2.0
"""Seconds a connection closed while its client may still be sending reads and drops
what comes, before it really closes (the client's EOF ends it sooner)."""
BODY_BUFFER = 2**16
"""Request body bytes kept while nobody reads them yet, before reading from the client pauses."""
DISCARD_LIMIT = 2**16
"""Bytes of an unread request body read and dropped after its answer to keep the connection;
a longer rest closes it instead."""
HOST, CONTENT_LENGTH, TRANSFER_ENCODING, EXPECT, CONNECTION, X_FORWARDED_FOR = (
    1 << bit for bit in range(6)
)
"""Bits of `Request.noted`: the headers the request path asks about."""
UPGRADE = 1 << 14
"""`Request.noted`'s bit for an `Upgrade` header (hop-by-hop: never passed on)."""
_FORWARD = 1 << 30
"""A header whose line goes on in `Request.lines`."""
_DROPPED = 0
"""A header that neither goes on nor is asked about."""
_ONCE_ONLY_PASSED_ON = (
    b"content-type", b"content-location", b"content-range", b"etag", b"max-forwards",
    b"user-agent", b"server",
)  # fmt: skip
"""Headers a request may carry once only (as aiohttp's parser had it), and passed on."""
_NOTABLE = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"expect": EXPECT,
    b"connection": CONNECTION,
    b"x-forwarded-for": X_FORWARDED_FOR,
    b"upgrade": UPGRADE,
    # Hop-by-hop (RFC 9110 7.6.1; `Proxy-*` too, in `on_header`), or an intermediary's
    # own to set:
    **dict.fromkeys(
        (b"keep-alive", b"te", b"trailer", b"proxy", b"x-forwarded-proto",
         b"x-forwarded-host"),
        _DROPPED,
    ),
    **{name: 1 << bit | _FORWARD for bit, name in enumerate(_ONCE_ONLY_PASSED_ON, start=6)},
}  # fmt: skip
"""Every header that is not simply passed on, by its `Request.noted` bits."""
_ONCE_ONLY = (
    HOST
    | CONTENT_LENGTH
    | TRANSFER_ENCODING
    | sum(_NOTABLE[n] & ~_FORWARD for n in _ONCE_ONLY_PASSED_ON)
)
"""The headers a request may carry once only: two Hosts, say, could route one way here
and another way upstream."""
_NO_BODY_STATUSES = frozenset({204, 304})

# Why reading from the client is paused: any of these holds it.
_PAUSE_PIPELINED = 1
"""A request waits in line behind the one being answered."""
_PAUSE_BUFFERED = 2
"""Body bytes that nobody reads yet passed `BODY_BUFFER`."""
_PAUSE_SINK = 4
"""Whoever reads the body asked (the upstream cannot take more yet)."""


def date_line() -> bytes:
    """`Date: <now>\\r\\n`, formatted once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


_date_second = 0
_date_line = b""


class Refusal(Exception):
    """A request the listener answers itself and closes after; the message is the reason,
    for the log only."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error

    def answer(self) -> bytes:
        """The whole answer, on the wire."""
        status, phrase, lines, body = error_answer(self.status, self.error)
        return b"HTTP/1.1 %d %b\r\n%b%bConnection: close\r\n\r\n%b" % (
            status,
            phrase,
            lines,
            date_line(),
            body,
        )


def _bad(reason: str) -> Refusal:
    return Refusal(400, "bad_request", reason)


class BodySink(Protocol):
    """Who reads a request's body (`Request.read_body`)."""

    def request_body(self, chunk: bytes) -> None: ...

    def request_body_end(self) -> None: ...

    def request_body_failed(self, reason: str) -> None:
        """The body broke (malformed chunked framing): the client's fault."""

    def crashed(self, error: Exception) -> None:
        """One of the methods above raised (a bug): called in its `except` block. (The
        listener must not take a bug of its handler's for the client's bad bytes.)"""


class RequestListener(Protocol):
    """Who hears what the client does while its request is answered (`Request.listener`)."""

    def client_gone(self) -> None:
        """The client's connection closed before the answer ended."""

    def client_writable(self, writable: bool) -> None:
        """The client fell behind (False: its socket's buffer is full) or caught up."""

    def crashed(self, error: Exception) -> None:
        """One of the methods above raised (a bug): called in its `except` block."""


class Relay(Protocol):
    """Who takes a connection's bytes after an upgrade (`Request.upgrade`)."""

    def relay_open(self, channel: Channel) -> None:
        """The upgrade's answer is out: bytes go to the client through `channel` from now
        on, and come from it through `relay_data`."""

    def relay_data(self, data: bytes) -> None: ...

    def relay_eof(self) -> bool:
        """The client will send no more (a half-close); True: the connection stays open
        for what goes the other way (False: it closes, and `relay_closed` follows)."""

    def relay_closed(self) -> None:
        """The client closed (or the listener stopped) the connection."""

    def relay_writable(self, writable: bool) -> None: ...


Handler = Callable[["Request"], None]
"""Called with each request head; answers through the request, now or later."""


class Request:
    """One request on a client connection: its head, its body as it comes, its answer.

    The handler answers with `answer` (a whole answer the sidecar made) or
    `respond`, then `write` and `end` (an answer relayed as it arrives); or
    `abort`s, when an answer cannot end whole.

    (No `__slots__`: most attributes keep their class-level default for most
    requests, so a request sets only what it has.)
    """

    method: bytes = b""
    target: bytes = b""
    """The request target as sent (origin form, or absolute form)."""
    lines: list[bytes]
    """The header lines an intermediary passes on as they came (`Name: value\\r\\n`, in
    order): every header but hop-by-hop ones (RFC 9110 7.6.1) and the `Proxy-*` family,
    `Host`, `Expect`, the framing headers, and `X-Forwarded-*` (an intermediary's own)."""
    header_count: int = 0
    connection: bytes | None = None
    """The `Connection` headers' values, comma-joined: the headers they name are hop-by-hop."""
    forwarded_for: bytes | None = None
    """The `X-Forwarded-For` headers' values, comma-joined."""
    noted: int = 0
    """Which of the headers the request path asks about it has: the bits `HOST`,
    `CONTENT_LENGTH`, `TRANSFER_ENCODING`, `EXPECT`, `CONNECTION`, `X_FORWARDED_FOR`."""
    host: bytes | None = None
    """The Host header's value, as sent."""
    upgrade_protocols: bytes | None = None
    """The `Upgrade` headers' values, comma-joined (the protocols the client asks for)."""
    expect: bytes | None = None
    content_length: int | None = None
    chunked: bool = False
    has_body: bool = False
    """A body follows the head (chunked, or a Content-Length above 0)."""
    http10: bool = False
    keep_alive: bool = True
    upgrade_tail: bytes | None = None
    """For an upgrade the parser took (an `Upgrade` request, CONNECT): the bytes that
    followed its head. None for any other request."""
    listener: RequestListener | None = None
    refused: Refusal | None = None
    """Why the listener refuses it, when its turn comes (a check left to llhttp first)."""
    route: str | None = None
    """The route it was matched to, for the access log."""
    tries: int = 1
    """Tries sent upstream for it (the access log's `tries`)."""
    status: int | None = None
    """The status it was answered with, once its head went out."""
    started: float = 0.0
    ended: bool = False
    body_complete: bool = False
    _body: list[bytes] | None = None
    """Body bytes that came before anybody read them."""
    _body_size: int = 0
    _sink: BodySink | None = None
    _continued: bool = False
    _held: bytes | None = None
    """A response head waiting to share a write with its body."""
    _out: int = 0
    """How the response body is framed: see `_OUT_*`."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self.lines = []

    # -- what the handler reads -------------------------------------------------------

    @property
    def remote(self) -> str | None:
        return self._conn.remote

    @property
    def connected(self) -> bool:
        """The client's connection is open (as far as the listener has read it)."""
        transport = self._conn.transport
        return transport is not None and not transport.is_closing()

    def read_body(self, sink: BodySink) -> None:
        """Hand the body to `sink` from now on (what came already first); a client waiting
        on `Expect: 100-continue` is told to go on."""
        self._sink = sink
        conn = self._conn
        if self.expect is not None and not self._continued and not self._body_size:
            self._continued = True
            if not self.http10 and conn.transport is not None:
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, self._body = self._body, None
        conn.resume(_PAUSE_BUFFERED)
        for chunk in body or ():
            sink.request_body(chunk)
            if self._sink is not sink:
                return
        if self.body_complete:
            sink.request_body_end()

    def pause_body(self) -> None:
        """Stop reading the body from the client for now (its sink cannot take more)."""
        self._conn.pause(_PAUSE_SINK)

    def resume_body(self) -> None:
        self._conn.resume(_PAUSE_SINK)

    def stop_body(self) -> None:
        """Hand no more of the body to its sink: whatever follows is dropped."""
        self._sink = None
        self._body = None
        self._conn.resume(_PAUSE_SINK | _PAUSE_BUFFERED)

    # -- answering --------------------------------------------------------------------

    def answer(
        self, status: int, reason: bytes, lines: bytes, body: bytes, close: bool = False
    ) -> None:
        """A whole answer the sidecar made: `lines` are its header lines, framing included
        (`Content-Length`); `Date` and `Connection` are added here."""
        if self.status is not None or self.ended:
            return
        self.status = status
        conn = self._conn
        keep = conn.keeps(self, close)
        head = _status_line(self.http10, status, reason) + lines + date_line()
        head += _CONNECTION_LINES[self.http10, keep]
        conn.send(head if self.method == b"HEAD" else head + body)
        self.ended = True
        conn.finished(self, keep)

    def respond(self, status: int, reason: bytes, lines: bytes, length: int | None) -> None:
        """Start an answer relayed as it arrives: `lines` are its header lines (with its
        `Content-Length` if `length` is known); framing and `Connection` are added here."""
        if self.status is not None or self.ended:
            return
        self.status = status
        close = False
        if self.method == b"HEAD" or status in _NO_BODY_STATUSES or status < 200:
            out = _OUT_NONE
        elif length is not None:
            out = _OUT_LENGTH
        elif self.http10:
            out = _OUT_UNTIL_CLOSE  # no chunked framing for HTTP/1.0: the close ends it
            close = True
        else:
            out = _OUT_CHUNKED
            lines += b"Transfer-Encoding: chunked\r\n"
        self._out = out
        conn = self._conn
        keep = self.keep_alive = conn.keeps(self, close)
        head = _status_line(self.http10, status, reason) + lines
        head += _CONNECTION_LINES[self.http10, keep]
        if out == _OUT_LENGTH and length < COALESCE_BELOW:  # type: ignore[operator]
            self._held = head  # goes out with the body's first bytes
        else:
            conn.send(head)

    def write(self, chunk: bytes) -> bool:
        """Part of the body of the answer `respond` began; True if the client is behind
        (its socket's buffer is full: wait for `client_writable`)."""
        out = self._out
        conn = self._conn
        if out == _OUT_NONE or not chunk or self.ended:
            return conn.writing_paused
        if out == _OUT_CHUNKED:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        held = self._held
        if held is not None:
            self._held = None
            chunk = held + chunk
        conn.send(chunk)
        return conn.writing_paused

    def end(self) -> None:
        """The answer `respond` began is whole."""
        if self.ended:
            return
        data = self._held
        if data is not None:
            self._held = None
        if self._out == _OUT_CHUNKED:
            data = (data or b"") + b"0\r\n\r\n"
        conn = self._conn
        if data:
            conn.send(data)
        self.ended = True
        conn.finished(self, self.keep_alive)

    def abort(self) -> None:
        """The answer cannot end whole: cut the connection, so the client never takes a
        broken answer for a whole one."""
        if not self.ended:
            self.ended = True
            self._conn.abort()

    def fail(self) -> None:
        """A bug broke the answer (logged by whoever caught it): a 500 if nothing was sent
        yet, else the connection is cut."""
        if self.status is None:
            self.answer(*error_answer(500, "internal_error"), close=True)
        else:
            self.abort()

    def upgrade(self, head: bytes, relay: Relay) -> Channel:
        """Answer an upgrade the parser took (`upgrade_tail` is not None) with `head`
        (a whole response head: a 101, or a 2xx to a CONNECT), and hand the connection's
        bytes, both ways, to `relay` for good: `relay_open` first, with the channel to the
        client, then what the client sent after its head."""
        if self.upgrade_tail is None or self.status is not None:
            raise RuntimeError("not an upgrade request, or answered already")
        self.status = int(head[9:12])
        self.ended = True
        return self._conn.switch(self, head, relay)

    # -- from the connection ----------------------------------------------------------

    def _body_chunk(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        sink = self._sink
        if sink is not None:
            try:
                sink.request_body(chunk)
            except Exception as e:
                sink.crashed(e)
        elif not self.ended:
            if self._body is None:
                self._body = []
            self._body.append(chunk)
            if self._body_size > BODY_BUFFER:
                self._conn.pause(_PAUSE_BUFFERED)

    def _body_end(self) -> None:
        self.body_complete = True
        sink = self._sink
        if sink is not None:
            try:
                sink.request_body_end()
            except Exception as e:
                sink.crashed(e)

    def _body_failed(self, reason: str) -> None:
        sink = self._sink
        self._sink = None
        if sink is not None:
            try:
                sink.request_body_failed(reason)
            except Exception as e:
                sink.crashed(e)


def _status_line(http10: bool, status: int, reason: bytes) -> bytes:
    key = (http10, status, reason)
    line = _status_lines.get(key)
    if line is None:
        line = b"HTTP/1.%d %d %b\r\n" % (0 if http10 else 1, status, reason)
        if len(_status_lines) < 1024:  # whatever reasons upstreams make up
            _status_lines[key] = line
    return line


_CONNECTION_LINES = {
    (False, True): b"\r\n",
    (False, False): b"Connection: close\r\n\r\n",
    (True, True): b"Connection: keep-alive\r\n\r\n",
    (True, False): b"\r\n",
}
"""The end of a response head, by (HTTP/1.0, keep-alive): what each version needs said."""

_status_lines: dict[tuple[bool, int, bytes], bytes] = {}

_OUT_NONE = 0
_OUT_LENGTH = 1
_OUT_CHUNKED = 2
_OUT_UNTIL_CLOSE = 3


class Channel:
    """The client's side of a connection after an upgrade: bytes out, flow, close."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn

    def write(self, data: bytes) -> None:
        self._conn.send(data)

    def pause_reading(self) -> None:
        self._conn.pause(_PAUSE_SINK)

    def resume_reading(self) -> None:
        self._conn.resume(_PAUSE_SINK)

    def close(self) -> None:
        transport = self._conn.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        self._conn.abort()


class _BodyAfterUpgrade:
    """The parser's callbacks on a connection whose upgrade request had a body (see
    `ClientConnection._upgrade`): the first head fed is a stand-in for that request's
    framing, and goes nowhere; its body, and every request after it, go on as usual."""

    __slots__ = ("_conn", "_request", "_stand_in")

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._stand_in = True

    def on_message_begin(self) -> None:
        if self._stand_in:
            self._conn._parsing = self._request
        else:
            self._conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._stand_in:
            self._conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stand_in:
            self._conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._stand_in:
            self._stand_in = False
        else:
            self._conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._conn.on_body(body)

    def on_message_complete(self) -> None:
        self._conn.on_message_complete()


class Listener:
    """The proxy listener: accepts connections and hands each request head to `handler`."""

    def __init__(self, handler: Handler, timers: Timers, timeouts: ClientTimeouts) -> None:
        self.handler = handler
        """May be replaced while serving: every request reads it afresh."""
        self.finished: Callable[[Request], None] | None = None
        """Told of every request that ends, answered or not (the access log); None: nobody."""
        self.timers = timers
        self.timeouts = timeouts
        """For connections accepted from now on; open ones keep theirs."""
        self.connections: set[ClientConnection] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._all_closed: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; the port it got (for port 0). Raises OSError when it cannot."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024
        )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def close(self) -> None:
        """Stop accepting; close idle connections now and the others after their answer."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut()

    async def drain(
        self, deadline: float, before_cut_off: Callable[[], object] | None = None
    ) -> None:
        """Wait until every connection is closed, or `deadline` (the loop's time) passes:
        then call `before_cut_off` (while every connection is still open) and cut off what
        is left."""
        loop = asyncio.get_running_loop()
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), max(0.0, deadline - loop.time()))
        if before_cut_off is not None and self.connections:
            before_cut_off()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def closing(self) -> bool:
        return self._closing

    def _gone(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


class ClientConnection(asyncio.Protocol):
    """One client connection; see the module's docstring."""

    __slots__ = (
        "_active",
        "_broken",
        "_chunk",
        "_dispatching",
        "_ending",
        "_fed_from",
        "_head_size",
        "_header_timer",
        "_idle_timer",
        "_idle_until",
        "_in_head",
        "_linger_timer",
        "_lingering",
        "_listener",
        "_parser",
        "_parsing",
        "_paused",
        "_queue",
        "_relay",
        "_stall_timer",
        "_timeouts",
        "_timers",
        "_upgraded",
        "_url",
        "remote",
        "transport",
        "writing_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._timers = listener.timers
        self._timeouts = listener.timeouts
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._parsing: Request | None = None
        """The request whose head or body the parser is in now."""
        self._in_head = False
        self._head_size = 0
        """Bytes the head in progress may have taken: those of the reads since it began."""
        self._chunk = 0
        """Bytes in the read being parsed."""
        self._url = b""
        self._active: Request | None = None
        """The request being answered: the first in line."""
        self._queue: deque[Request] = deque()
        """Requests parsed whole (heads) and waiting for their turn; last, perhaps, what the
        listener refused (a stand-in whose `refused` is set), answered in its turn."""
        self._fed_from = 0
        """Requests in line before the read being parsed: those parsed from it are dropped
        with it if it turns out malformed (a read is refused whole)."""
        self._broken = False
        """Refused, or the body in hand broke: nothing more is read as requests."""
        self._ending = False
        """No request follows the one in hand: refused, broken, or the listener stopping."""
        self._lingering = False
        """Answered and half-closed: what the client still sends is read and dropped."""
        self._linger_timer: Timer | None = None
        self._upgraded: Request | None = None
        """The upgrade request the parser stopped after: what follows is its bytes."""
        self._paused = 0
        self._dispatching = False
        self._relay: Relay | None = None
        self.writing_paused = False
        self._idle_until = 0.0
        self._idle_timer: Timer | None = None
        self._header_timer: Timer | None = None
        self._stall_timer: Timer | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)):
            self.remote = str(peer[0])
        elif peer is not None:
            self.remote = str(peer)
        self._listener.connections.add(self)
        if self._listener.closing:
            transport.close()
            return
        # The keep-alive timeout also runs from accept.
        self._idle_until = self._timers.time() + self._timeouts.idle
        self._idle_timer = self._timers.call_at(self._idle_until, self._idle_check)

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        if relay is not None:
            relay.relay_data(data)
            return
        parser = self._parser
        if parser is None or self._broken or self._lingering:
            return  # refused, or closing: nothing more is read as requests
        upgraded = self._upgraded
        if upgraded is not None:
            tail = upgraded.upgrade_tail = (upgraded.upgrade_tail or b"") + data
            if len(tail) > BODY_BUFFER:
                self.pause(_PAUSE_BUFFERED)
            return
        self._chunk = size = len(data)
        self._fed_from = len(self._queue)
        if self._in_head:
            self._head_size += size
        while True:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                data = data[e.args[0] :]
                if self._upgrade(data):
                    parser = self._parser  # (a new one: see `_upgrade`)
                    assert parser is not None
                    continue
            except httptools.HttpParserCallbackError as e:
                cause = e.__context__
                self._refuse(cause if isinstance(cause, Refusal) else _bad(str(e)), data)
                return
            except httptools.HttpParserError as e:
                self._refuse(_bad(str(e) or type(e).__name__), data)
                return
            break
        if self._in_head:
            if self._head_size > MAX_HEAD_SIZE:
                self._refuse(_bad("the request head is too large"), data)
                return
            if self._header_timer is None:
                # Timed only if the head did not arrive whole in one read, as most do.
                self._header_timer = self._timers.call_at(
                    self._timers.time() + self._timeouts.headers, self._header_timed_out
                )
        if self._active is None and self._queue:
            self._next()

    def eof_received(self) -> bool | None:
        # A client that closes its side is gone, as for aiohttp and nginx (499): the
        # transport closes, and the request in hand is let go. After an upgrade, the
        # relay decides: a tunnel passes the half-close on.
        relay = self._relay
        if relay is not None and relay.relay_eof():
            return True
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timers()
        # The parser and the request being parsed refer back to this object: let go of
        # them, or every connection would end as cyclic garbage.
        self._parser = None
        self._parsing = self._upgraded = None
        active, self._active = self._active, None
        self._queue.clear()
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.relay_closed()
        if active is not None and not active.ended:
            active.ended = True
            listener = active.listener
            if listener is not None:
                try:
                    listener.client_gone()
                except Exception as e:
                    listener.crashed(e)
            finished = self._listener.finished
            if finished is not None:
                finished(active)
        self.transport = None
        self._listener._gone(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._stall_timer is None:
            self._stall_timer = self._timers.call_at(
                self._timers.time() + self._timeouts.write, self._stalled
            )
        self._tell_writable(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._tell_writable(True)
        if self._active is None and self._relay is None:
            self._after_answer()

    # -- the parser's callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self)
        self._in_head = True
        self._head_size = self._chunk  # at most: the head may have begun inside this read
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_REQUEST_LINE:
            raise _bad(f"the request target is longer than {MAX_REQUEST_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        count = request.header_count = request.header_count + 1
        if count > MAX_HEADERS:
            raise _bad(f"more than {MAX_HEADERS} headers")
        if self._head_size > MAX_FIELD_SIZE and max(len(name), len(value)) > MAX_FIELD_SIZE:
            # (Only a head that large can hold a header that large.)
            raise _bad(f"a header is longer than {MAX_FIELD_SIZE} bytes")
        lower = name.lower()
        bits = _NOTABLE.get(lower, _FORWARD)
        if bits == _FORWARD:
            if lower[:6] != b"proxy-":
                request.lines.append(b"%b: %b\r\n" % (name, value))
            return
        if bits & request.noted & _ONCE_ONLY:
            raise _bad(f"duplicate {name.decode('latin-1')} header")
        if bits & _FORWARD:
            request.lines.append(b"%b: %b\r\n" % (name, value))
        request.noted |= bits & ~_FORWARD
        if bits == HOST:
            request.host = value
        elif bits == UPGRADE:
            prior = request.upgrade_protocols
            request.upgrade_protocols = value if prior is None else prior + b"," + value
        elif bits and bits <= X_FORWARDED_FOR:
            self._noted(request, bits, value)

    @staticmethod
    def _noted(request: Request, bit: int, value: bytes) -> None:
        """A header the request path asks about: framing, `Expect`, `Connection`,
        `X-Forwarded-For`."""
        if bit == CONTENT_LENGTH:
            request.content_length = int(value)  # llhttp has checked it is digits
            request.has_body = request.content_length > 0
        elif bit == EXPECT:
            request.expect = value
        elif bit == CONNECTION:
            request.connection = (
                value if request.connection is None else request.connection + b"," + value
            )
        elif bit == X_FORWARDED_FOR:
            prior = request.forwarded_for
            request.forwarded_for = value if prior is None else prior + b", " + value
        else:
            request.chunked = request.has_body = True
            codings = [c for c in (c.strip() for c in value.lower().split(b",")) if c]
            if codings != [b"chunked"]:
                # llhttp refuses codings after chunked; one before it (`gzip, chunked`) would
                # reach the upstream undecoded, as if plain (the coding is hop-by-hop): RFC
                # 9112 6.1's 501. Refused once llhttp had its say (`_next`).
                request.refused = Refusal(501, "not_implemented", "a transfer coding")

    def on_headers_complete(self) -> None:
        request = self._parsing
        parser = self._parser
        assert request is not None and parser is not None
        self._in_head = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise Refusal(505, "http_version_not_supported", f"HTTP/{version} request")
            request.http10 = True
        elif request.host is None:
            raise _bad("no Host header")
        method = request.method = parser.get_method()
        if request.has_body and method == b"CONNECT":
            raise _bad("a CONNECT with content")  # (RFC 9110 9.3.6: it has none)
        request.target = self._url
        request.keep_alive = parser.should_keep_alive()
        if self._listener.finished is not None:
            request.started = time.monotonic()
        self._queue.append(request)
        if self._active is not None:
            self.pause(_PAUSE_PIPELINED)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None:
            request._body_chunk(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is None:
            return
        request._body_end()
        if request.ended and self._active is None:
            self._after_answer()  # its answer went out before its body was all in (dropped)

    # -- requests in turn ----------------------------------------------------------------

    def _next(self) -> None:
        """Answer the next request in line, if the one before is done with.

        Not re-entered: a handler that answers at once (a 404, a 503) ends its request
        inside this loop, which then takes the next; a recursion would grow with every
        request a client pipelined into one read.
        """
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._active is None and self._queue:
                transport = self.transport
                if self.writing_paused or transport is None or transport.is_closing():
                    return  # the client is behind (on with it once it caught up), or gone
                parsing = self._parsing
                if parsing is not None and parsing.ended:
                    return  # still reading (and dropping) the body of an answered request
                request = self._queue.popleft()
                if request.refused is not None:
                    self._queue.clear()
                    self._answer_refusal(request.refused)
                    return
                if not self._queue:
                    self.resume(_PAUSE_PIPELINED)
                self._active = request
                try:
                    self._listener.handler(request)
                except Exception:
                    self._crashed(request)
        finally:
            self._dispatching = False

    def _crashed(self, request: Request) -> None:
        """The handler raised: a bug. Logged, answered 500 if nothing was sent, closed."""
        log.exception("error handling a request")
        request.fail()

    def keeps(self, request: Request, close: bool) -> bool:
        """Whether the connection can take another request after `request`'s answer."""
        if close or not request.keep_alive or self._ending:
            return False
        if request.upgrade_tail is not None:
            return False  # what followed its head was never parsed as HTTP
        if not request.body_complete:
            # Its body has yet to come, all or part: read and dropped after the answer if
            # it is short, else the connection closes (and never after `Expect` unanswered).
            if request.expect is not None and not request._continued:
                return False
            left = (request.content_length or 0) - request._body_size
            if request.chunked or left > DISCARD_LIMIT:
                return False
        return True

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def finished(self, request: Request, keep: bool) -> None:
        """`request`'s answer is whole on the wire: on to the next, or close."""
        if request is not self._active:
            return
        self._active = None
        request.listener = None
        finished = self._listener.finished
        if finished is not None:
            finished(request)
        # Whatever was paused for its body is not any more; what is left of it, if the
        # connection goes on, is read and dropped.
        request.stop_body()
        transport = self.transport
        if transport is None:
            return
        if not keep or self._ending:
            queue = self._queue
            if queue and queue[-1].refused is not None:
                self._next()  # what the listener refused, after whatever came before it
            else:
                self._close(lingering=not request.body_complete or self._broken)
            return
        self._after_answer()

    def _after_answer(self) -> None:
        """Idle: wait for the next request, or answer the one in line."""
        if self._queue:
            self._next()
            return
        self._idle_until = self._timers.time() + self._timeouts.idle
        if self._idle_timer is None and self.transport is not None:
            self._idle_timer = self._timers.call_at(self._idle_until, self._idle_check)

    # -- flow ------------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        paused = self._paused
        self._paused = paused | reason
        if not paused and self.transport is not None:
            self.transport.pause_reading()

    def resume(self, reason: int) -> None:
        paused = self._paused
        if not paused & reason:
            return
        self._paused = paused & ~reason
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _tell_writable(self, writable: bool) -> None:
        relay = self._relay
        if relay is not None:
            relay.relay_writable(writable)
            return
        active = self._active
        listener = None if active is None else active.listener
        if listener is not None:
            try:
                listener.client_writable(writable)
            except Exception as e:
                listener.crashed(e)

    # -- refusals, upgrades, timers ----------------------------------------------------------

    def _refuse(self, refusal: Refusal, data: bytes = b"") -> None:
        """Answer what the listener cannot take, in its turn (after the requests before
        it), and close. A body that breaks is the business of whoever reads it."""
        parsing = self._parsing
        active = self._active
        # A TLS handshake on the plain-HTTP port is a client misconfigured, not an
        # attack: told at debug level, as aiohttp did.
        tls = data.startswith(b"\x16\x03")
        event(
            log,
            logging.DEBUG if tls else logging.WARNING,
            "bad_request",
            f"bad request from {self.remote}: {refusal.status} {refusal}",
            client=self.remote,
            status=refusal.status,
            reason="TLS on the plain-HTTP port" if tls else str(refusal),
        )
        self._broken = self._ending = True
        self._parsing = None
        if parsing is not None and not self._in_head:
            if parsing is active:
                parsing._body_failed(str(refusal))  # its handler answers (a 400, or abort)
                return
            if parsing.ended:
                # The body of a request answered already, being dropped: nothing is owed.
                if active is None:
                    self._close(lingering=True)
                return
        # What came in this read is refused whole; so is a request whose body broke
        # before its turn. Those before stay in line, and the refusal comes after them.
        queue = self._queue
        while len(queue) > self._fed_from or (parsing is not None and parsing in queue):
            queue.pop()
        self.resume(_PAUSE_PIPELINED)
        stand_in = Request(self)
        stand_in.refused = refusal
        queue.append(stand_in)
        if active is None:
            self._next()

    def _answer_refusal(self, refusal: Refusal) -> None:
        self.send(refusal.answer())
        self._close(lingering=True)

    def _close(self, lingering: bool) -> None:
        """Close once what was written is out. `lingering`: the client may still be
        sending (a body not read, a request refused): half-close first, and read and drop
        what comes for `LINGER` seconds, or the client's kernel, handed unread bytes by a
        close, resets the connection and throws the answer away."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not lingering or self._listener.closing or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._stop_timers()
        self._paused = 0
        transport.resume_reading()
        transport.write_eof()
        self._linger_timer = self._timers.call_at(self._timers.time() + LINGER, transport.close)

    def _upgrade(self, tail: bytes) -> bool:
        """The parser stopped after an upgrade request's head (llhttp does, and skips the
        body such a request may have). True: parse on (`tail`, with a new parser).

        A request with no body keeps what follows as `upgrade_tail`, for a handler that
        upgrades (`Request.upgrade`); one with a body has its body read as any other's,
        and is never upgraded: a new parser takes a stand-in head for that body, whose
        callbacks go nowhere, then `tail`."""
        request = self._queue[-1] if self._queue else None
        self._parsing = None
        if request is None:
            return False
        if not request.has_body:
            request.upgrade_tail = tail
            self._upgraded = request
            if len(tail) > BODY_BUFFER:
                self.pause(_PAUSE_BUFFERED)
            return False
        request.body_complete = False  # (llhttp said its message was complete)
        self._parser = parser = httptools.HttpRequestParser(_BodyAfterUpgrade(self, request))
        framing = (
            b"Transfer-Encoding: chunked"
            if request.chunked
            else b"Content-Length: %d" % (request.content_length or 0)
        )
        parser.feed_data(b"PUT / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        return True

    def switch(self, request: Request, head: bytes, relay: Relay) -> Channel:
        """`Request.upgrade`: from now on the connection's bytes are `relay`'s."""
        transport = self.transport
        self._active = None
        self._upgraded = None
        self._stop_timers()
        self._relay = relay
        channel = Channel(self)
        if transport is not None:
            transport.write(head)
        finished = self._listener.finished
        if finished is not None:
            finished(request)
        relay.relay_open(channel)
        tail, request.upgrade_tail = request.upgrade_tail or b"", b""
        self.resume(_PAUSE_BUFFERED)
        if tail:
            relay.relay_data(tail)
        return channel

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._in_head:
            return
        if self._paused:
            # The listener itself is not reading (a request waits its turn, say): the rest
            # of the head may be waiting in the socket. Its time runs again from here.
            self._header_timer = self._timers.call_at(
                self._timers.time() + self._timeouts.headers, self._header_timed_out
            )
            return
        self._in_head = False
        self._fed_from = len(self._queue)
        self._refuse(Refusal(408, "header_timeout", "no whole request head in time"))

    def _idle_check(self) -> None:
        self._idle_timer = None
        transport = self.transport
        if transport is None or self._relay is not None:
            return
        if self._active is not None or self._queue or self._in_head:
            return  # re-armed when the request in hand is done (or the header timer rules)
        if self._timers.time() < self._idle_until:
            self._idle_timer = self._timers.call_at(self._idle_until, self._idle_check)
            return
        transport.close()

    def _stalled(self) -> None:
        """The client took nothing for the write timeout: cut it off."""
        self._stall_timer = None
        self.abort()

    def _stop_timers(self) -> None:
        for timer in (self._idle_timer, self._header_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._header_timer = self._stall_timer = None
        if self.transport is None and self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    # -- the listener's orders -----------------------------------------------------------

    def shut(self) -> None:
        """Stop taking requests: close now if idle (or lingering), else after the answer in
        hand."""
        self._ending = True
        self._queue.clear()
        if self._active is None and self._relay is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
