"""Hostile clients on the proxy listener: exact bytes in, exact outcomes out.

Every attack is written byte for byte to the proxy's socket and the raw answer
read back under one deadline, so that a hang fails the test instead of
blocking it. The rules: what is malformed or ambiguous is answered 400 and the
connection closed; nothing of it reaches an upstream (the upstream's hit
counter and request log prove it); the sidecar is never an open proxy and
never answers its admin paths on the proxy listener; and every other client is
served as before.

Malformed HTTP is refused by the listener (its parser is llhttp, through
httptools) before any handler runs. Its answer is the sidecar's own, as the
contract's "Hardening" has it: `HTTP/1.1 400 Bad Request`, JSON
`{"error":"bad_request"}`, `Connection: close`, never the client's bytes or the
parser's words echoed back. The reason goes to the log (one warning line), and
each test checks that reason: the request was refused for the right cause. The
reasons are recorded below as llhttp 9 and the listener's own checks word them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import RawHandler, Running, StartSidecar, Upstream, eventually, running

DEADLINE = 5.0
"""Seconds one raw exchange may take: anything slower is a hang."""

BAD_REQUEST = {"error": "bad_request"}


# -- a raw client ------------------------------------------------------------------------


@dataclass
class Reply:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> object:
        return json.loads(self.body)


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response: its head, then a body by Content-Length, chunks, or up to the close."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    reply = Reply(
        status_line, [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines)]
    )
    length = reply.header("Content-Length")
    if length is not None:
        reply.body = await reader.readexactly(int(length))
    elif (reply.header("Transfer-Encoding") or "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        reply.body = bytes(body)
    else:
        reply.body = await reader.read()
    return reply


class Client:
    """One raw connection to the proxy listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> Reply:
        return await asyncio.wait_for(read_reply(self.reader), DEADLINE)

    async def assert_closed(self) -> None:
        """The server closes the connection, with nothing more after the replies read."""
        rest = await asyncio.wait_for(self.reader.read(), DEADLINE)
        assert rest == b"", f"bytes after the last reply: {rest[:200]!r}"


@contextlib.asynccontextmanager
async def connect(proxy: str) -> AsyncIterator[Client]:
    host, _, port = proxy.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def talk(proxy: str, data: bytes, replies: int = 1) -> list[Reply]:
    """Send `data` in one write, read `replies` responses, and see the server close.

    A request that should be served must therefore end with `Connection: close`.
    """

    async def exchange() -> list[Reply]:
        async with connect(proxy) as client:
            await client.send(data)
            got = [await read_reply(client.reader) for _ in range(replies)]
            await client.assert_closed()
            return got

    return await asyncio.wait_for(exchange(), DEADLINE)


def forwarded(upstream: Upstream) -> list[tuple[str, str, str]]:
    """What the upstream received, whole: (method, path, body) in order."""
    return [(str(r["method"]), str(r["path"]), str(r["body"])) for r in upstream.requests]


async def assert_still_serving(
    sc: Running,
    upstream: Upstream,
    before: list[tuple[str, str, str]] | None = None,
    host: str = "svc.internal",
) -> None:
    """Only `before` reached the upstream, and a client on another connection gets 200."""
    before = before or []
    assert forwarded(upstream) == before
    assert upstream.hits == len(before)
    ok = f"GET /still-serving HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    [reply] = await talk(sc.proxy, ok.encode())
    assert reply.status == 200
    assert forwarded(upstream) == [*before, ("GET", "/still-serving", "")]
    assert upstream.hits == len(before) + 1


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons the listener logs for what it refuses, in order, as they come."""
    caplog.set_level(logging.DEBUG, logger="sidecar")
    return _Reasons(caplog)  # type: ignore[return-value]


class _Reasons:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def __iter__(self) -> Iterator[str]:
        return iter(
            r.fields["reason"]  # type: ignore[attr-defined]
            for r in self._caplog.records
            if getattr(r, "event", None) == "bad_request"
        )


def assert_refused_400(reply: Reply, refusals: list[str], reason: str) -> None:
    """The listener's own answer to malformed HTTP (the connection is closed after it),
    refused for `reason` (what the log says begins with it)."""
    assert reply.status_line == "HTTP/1.1 400 Bad Request"
    assert reply.header("Content-Type") == "application/json"
    assert reply.header("Connection") == "close"
    assert reply.json() == BAD_REQUEST
    logged = list(refusals)
    assert len(logged) == 1, logged
    assert logged[0].startswith(reason), logged


# -- configs and fixtures -----------------------------------------------------------------


def catch_all(upstream: str, timeouts: str = "") -> str:
    return f"""
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: {upstream}
    {timeouts}
"""


def host_only(upstream: str) -> str:
    return f"""
routes:
  - name: api
    match: {{host: api.internal}}
    upstream: {upstream}
"""


@pytest.fixture
async def proxied(start_sidecar: StartSidecar, upstream: Upstream) -> Running:
    """A sidecar whose one route sends every path to `upstream`."""
    return await start_sidecar(catch_all(upstream.url))


@dataclass
class Elsewhere:
    """A server no route names: the sidecar must never connect to it."""

    authority: str = ""
    connections: int = 0


@pytest.fixture
async def elsewhere(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> Elsewhere:
    state = Elsewhere()

    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        writer.close()

    state.authority = (await raw_upstream(handler)).removeprefix("http://")
    return state


# -- malformed request lines -----------------------------------------------------------

H = b"\r\nHost: svc.internal\r\n\r\n"
"""The rest of a request after its request line."""

TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
"""The start of a TLS ClientHello: https:// sent to the plain-HTTP port."""

MALFORMED_REQUEST_LINES = [
    pytest.param(TLS_HELLO, "TLS on the plain-HTTP port", id="tls-client-hello"),
    pytest.param(b"\x00\x01garbage\xff\r\n\r\n", "Invalid method encountered", id="binary-garbage"),
    pytest.param(b"get /x HTTP/1.1" + H, "Invalid method encountered", id="lowercase-method"),
    pytest.param(b"G(T /x HTTP/1.1" + H, "Invalid method encountered", id="bad-method-char"),
    pytest.param(b"FOO /x HTTP/1.1" + H, "Invalid method encountered", id="unknown-method"),
    pytest.param(b"GET\t/x HTTP/1.1" + H, "Expected space after method", id="tab-separator"),
    pytest.param(b"GET /a b HTTP/1.1" + H, "Expected HTTP/, RTSP/ or ICE/", id="space-in-uri"),
    pytest.param(b"GET /x\x00y HTTP/1.1" + H, "Invalid char in url path", id="nul-in-uri"),
    pytest.param(b"GET /x\rHTTP/1.1" + H, "Expected CRLF", id="cr-in-request-line"),
    pytest.param(
        b"GET /x HTTP/1.1 extra" + H, "Expected CRLF after version", id="token-after-version"
    ),
    pytest.param(b"GET /x http/1.1" + H, "Expected HTTP/, RTSP/ or ICE/", id="lowercase-version"),
    pytest.param(b"GET /x HTTP/1.2" + H, "Invalid HTTP version", id="http-1.2"),
    pytest.param(b"GET /x HTTP/1.10" + H, "Expected CRLF after version", id="http-1.10"),
    pytest.param(b"GET /x HTTP/3.0" + H, "Invalid HTTP version", id="http-3.0"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "Pause on PRI/Upgrade", id="http2-preface"),
    pytest.param(
        b"GET /" + b"a" * 8190 + b" HTTP/1.1" + H,
        "the request target is longer than 8190 bytes",
        id="uri-8191-bytes",
    ),
]


@pytest.mark.parametrize(("attack", "reason"), MALFORMED_REQUEST_LINES)
async def test_malformed_request_line_is_400_and_never_forwarded(
    proxied: Running,
    upstream: Upstream,
    attack: bytes,
    reason: str,
    refusals: list[str],
) -> None:
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, reason)
    await assert_still_serving(proxied, upstream)


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(b"GET /x\r\nHost: svc.internal\r\n\r\n", id="missing-version"),
        pytest.param(b"GET /x\r\n\r\n", id="missing-version-no-headers"),
        pytest.param(b"GET /x HTTP/0.9" + H, id="http-0.9"),
        pytest.param(b"GET /x HTTP/2.0" + H, id="http-2.0-request-line"),
    ],
)
async def test_request_line_without_a_supported_version_is_refused(
    proxied: Running, upstream: Upstream, attack: bytes
) -> None:
    """llhttp accepts these lines; the listener refuses them (they were once forwarded)."""
    [reply] = await talk(proxied.proxy, attack)
    assert reply.status_line == "HTTP/1.1 505 HTTP Version Not Supported"
    assert reply.json() == {"error": "http_version_not_supported"}
    assert reply.header("Connection") == "close"
    await assert_still_serving(proxied, upstream)


# -- bad header bytes --------------------------------------------------------------------

G = b"GET /x HTTP/1.1\r\nHost: svc.internal\r\n"
"""A request's head up to its attacked header."""

BAD_HEADERS = [
    pytest.param(G + b"X: a\x00b\r\n\r\n", "Invalid header value char", id="nul-in-value"),
    pytest.param(G + b"X\x00Y: b\r\n\r\n", "Invalid header token", id="nul-in-name"),
    pytest.param(G + b"X: a\x7fb\r\n\r\n", "Invalid header value char", id="del-in-value"),
    pytest.param(
        G + b"X: a\rb\r\n\r\n", "Missing expected LF after header value", id="bare-cr-in-value"
    ),
    pytest.param(
        G + b"X: a\rY: b\r\n\r\n", "Missing expected LF after header value", id="bare-cr-line-end"
    ),
    pytest.param(
        b"GET /x HTTP/1.1\nHost: svc.internal\n\n", "Expected CRLF after version", id="lf-only"
    ),
    pytest.param(
        G + b"X: a\nY: b\r\n\r\n", "Missing expected CR after header value", id="lf-only-one-line"
    ),
    pytest.param(G + b"X\xc3\xa9: b\r\n\r\n", "Invalid header token", id="non-ascii-name"),
    pytest.param(G + b"X-A : b\r\n\r\n", "Invalid header token", id="space-before-colon"),
    pytest.param(G + b"X-A\t: b\r\n\r\n", "Invalid header token", id="tab-before-colon"),
    pytest.param(G + b"NoColon\r\n\r\n", "Invalid header token", id="no-colon"),
    pytest.param(G + b": v\r\n\r\n", "Invalid header token", id="empty-name"),
    pytest.param(
        G + b"X-A: b\r\n  c\r\n\r\n", "Unexpected whitespace after header value", id="obs-fold"
    ),
    pytest.param(
        b"GET /x HTTP/1.1\r\n Host: svc.internal\r\n\r\n",
        "Unexpected space after start line",
        id="space-before-first-header",
    ),
    pytest.param(G + b"Host: other\r\n\r\n", "duplicate Host header", id="two-hosts"),
    pytest.param(b"GET /x HTTP/1.1\r\nX: y\r\n\r\n", "no Host header", id="no-host"),
]


@pytest.mark.parametrize(("attack", "reason"), BAD_HEADERS)
async def test_bad_header_bytes_are_400_and_never_forwarded(
    proxied: Running,
    upstream: Upstream,
    attack: bytes,
    reason: str,
    refusals: list[str],
) -> None:
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, reason)
    await assert_still_serving(proxied, upstream)


# -- oversize headers --------------------------------------------------------------------

OVERSIZE = [
    pytest.param(
        G + b"X-A: " + b"b" * 8191 + b"\r\n\r\n",
        "a header is longer than 8190 bytes",
        id="value-8191-bytes",
    ),
    pytest.param(
        G + b"X" + b"b" * 8190 + b": v\r\n\r\n",
        "a header is longer than 8190 bytes",
        id="name-8191-bytes",
    ),
    pytest.param(
        G + b"".join(b"X-%d: v\r\n" % i for i in range(128)) + b"\r\n",
        "more than 128 headers",
        id="129-headers",
    ),
]


@pytest.mark.parametrize(("attack", "reason"), OVERSIZE)
async def test_oversize_headers_are_400_not_431_and_never_forwarded(
    proxied: Running,
    upstream: Upstream,
    attack: bytes,
    reason: str,
    refusals: list[str],
) -> None:
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, reason)
    await assert_still_serving(proxied, upstream)


@pytest.mark.parametrize(
    ("attack", "path", "header"),
    [
        pytest.param(G + b"X-A: " + b"b" * 8190, "/x", ("X-A", "b" * 8190), id="value-8190"),
        pytest.param(
            b"GET /" + b"a" * 8189 + b" HTTP/1.1\r\nHost: svc.internal",
            "/" + "a" * 8189,
            None,
            id="uri-8190",
        ),
        # 120, not 128: the sidecar adds X-Forwarded-*, and the upstream (aiohttp too)
        # stops at 128 headers.
        pytest.param(
            G + b"\r\n".join(b"X-%d: v" % i for i in range(120)),
            "/x",
            ("X-119", "v"),
            id="121-headers",
        ),
    ],
)
async def test_headers_just_within_the_limits_pass(
    proxied: Running,
    upstream: Upstream,
    attack: bytes,
    path: str,
    header: tuple[str, str] | None,
) -> None:
    request = attack.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n"
    [reply] = await talk(proxied.proxy, request)
    assert reply.status == 200
    assert forwarded(upstream) == [("GET", path, "")]
    if header is not None:
        assert list(header) in upstream.requests[0]["headers"]  # type: ignore[operator]


# -- request smuggling ------------------------------------------------------------------

P = b"POST /x HTTP/1.1\r\nHost: svc.internal\r\n"
"""A POST's head up to its framing headers."""
CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"

SMUGGLING = [
    pytest.param(
        P + b"Content-Length: 4\r\n" + CHUNKED + b"0\r\n\r\n",
        "Transfer-Encoding can't be present with Content-Length",
        id="cl-then-te",
    ),
    pytest.param(
        P + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        "Content-Length can't be present with Transfer-Encoding",
        id="te-then-cl",
    ),
    pytest.param(
        P + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "Duplicate Content-Length",
        id="two-different-cl",
    ),
    # RFC 9110 would allow identical values; refusing them too is the safe side.
    pytest.param(
        P + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        "Duplicate Content-Length",
        id="two-equal-cl",
    ),
    pytest.param(
        P + b"Content-Length: 4, 5\r\n\r\nabcde",
        "Invalid character in Content-Length",
        id="cl-list",
    ),
    pytest.param(
        P + b"Content-Length: +4\r\n\r\nabcd", "Invalid character in Content-Length", id="cl-plus"
    ),
    pytest.param(
        P + b"Content-Length: -1\r\n\r\nabcd", "Invalid character in Content-Length", id="cl-neg"
    ),
    pytest.param(
        P + b"Content-Length: 0x4\r\n\r\nabcd", "Invalid character in Content-Length", id="cl-hex"
    ),
    pytest.param(
        P + b"Content-Length: 1 2\r\n\r\nabcd",
        "Invalid character in Content-Length",
        id="cl-inner-space",
    ),
    pytest.param(P + b"Content-Length: \r\n\r\nabcd", "Empty Content-Length", id="cl-empty"),
    pytest.param(
        P + b"Content-Length: 99999999999999999999999\r\n\r\nabcd",
        "Content-Length overflow",
        id="cl-overflow",
    ),
    pytest.param(
        P + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "Invalid `Transfer-Encoding` header value",
        id="te-chunked-identity",
    ),
    pytest.param(
        P + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "Invalid `Transfer-Encoding` header value",
        id="te-chunked-twice",
    ),
    pytest.param(
        P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        "Invalid `Transfer-Encoding` header value",
        id="two-te-headers",
    ),
    pytest.param(
        P + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        "Request has invalid `Transfer-Encoding`",
        id="te-identity",
    ),
    pytest.param(
        P + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "Request has invalid `Transfer-Encoding`",
        id="te-xchunked",
    ),
    pytest.param(
        P + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
        "Request has invalid `Transfer-Encoding`",
        id="te-quoted",
    ),
    pytest.param(
        P + b"Transfer-Encoding: chunked;x=1\r\n\r\n0\r\n\r\n",
        "Request has invalid `Transfer-Encoding`",
        id="te-with-parameter",
    ),
    pytest.param(
        P + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "Invalid header field char",
        id="te-space-before-colon",
    ),
    pytest.param(
        P + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
        "Invalid header token",
        id="te-tab-before-colon",
    ),
    pytest.param(
        P + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        "Invalid header value char",
        id="te-vertical-tab",
    ),
    pytest.param(
        P + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "Invalid header value char",
        id="te-obs-fold",
    ),
    # An empty Transfer-Encoding: read as none, its body would be parsed as the next
    # request. llhttp 9.4 refuses it outright.
    pytest.param(
        P + b"Transfer-Encoding: \r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "Empty Transfer-Encoding",
        id="te-empty",
    ),
]


@pytest.mark.parametrize(("attack", "reason"), SMUGGLING)
async def test_ambiguous_framing_is_400_and_never_forwarded(
    proxied: Running,
    upstream: Upstream,
    attack: bytes,
    reason: str,
    refusals: list[str],
) -> None:
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, reason)
    await assert_still_serving(proxied, upstream)


BAD_CHUNKS = [
    pytest.param(b"zz\r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size", id="not-hex"),
    pytest.param(b"-3\r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size", id="negative"),
    pytest.param(b"+3\r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size", id="plus-sign"),
    pytest.param(b"0x3\r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size", id="0x-prefix"),
    pytest.param(b"3 \r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size", id="trailing-space"),
    pytest.param(
        b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n", "Chunk size overflow", id="size-overflow"
    ),
    pytest.param(b"3\nabc\n0\n\n", "Missing expected CR after chunk size", id="lf-only"),
    pytest.param(b"3\r\nabcdef\r\n0\r\n\r\n", "Expected LF after chunk data", id="data-overrun"),
    pytest.param(b"3\r\nabcXX0\r\n\r\n", "Expected LF after chunk data", id="no-crlf-after-data"),
    pytest.param(
        b"3;\x00\r\nabc\r\n0\r\n\r\n",
        "Invalid character in chunk extensions name",
        id="nul-in-extension",
    ),
    pytest.param(b"3\r\nabc\r\n0\r\nX\x00: y\r\n\r\n", "Invalid header token", id="bad-trailer"),
    # A chunk size shorter than the data: the rest would be read as a request of its own.
    pytest.param(
        b"10\r\n" + b"GET /smuggled HTTP/1.1\r\nHost: svc.internal\r\n\r\n" + b"\r\n0\r\n\r\n",
        "Expected LF after chunk data",
        id="size-shorter-than-data",
    ),
]


@pytest.mark.parametrize(("chunks", "reason"), BAD_CHUNKS)
async def test_invalid_chunked_body_in_one_packet_is_400_and_never_forwarded(
    proxied: Running,
    upstream: Upstream,
    chunks: bytes,
    reason: str,
    refusals: list[str],
) -> None:
    [reply] = await talk(proxied.proxy, P + CHUNKED + chunks)
    assert_refused_400(reply, refusals, reason)
    await assert_still_serving(proxied, upstream)


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"Transfer-Encoding: CHUNKED\r\n", id="upper-case"),
        pytest.param(b"Transfer-Encoding: Chunked\r\n", id="mixed-case"),
        pytest.param(b"Transfer-Encoding:\tchunked\r\n", id="tab-before-value"),
        pytest.param(b"Transfer-Encoding: chunked \r\n", id="space-after-value"),
        pytest.param(b"Transfer-Encoding: ,chunked\r\n", id="empty-list-element"),
    ],
)
async def test_valid_spellings_of_chunked_are_decoded_and_reframed(
    proxied: Running, upstream: Upstream, framing: bytes
) -> None:
    """RFC 9112: coding names are case-insensitive, OWS is SP or HTAB, empty list items are
    allowed. No desync is possible: the sidecar decodes the body and frames it anew."""
    request = P + framing + b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    [reply] = await talk(proxied.proxy, request)
    assert reply.status == 200
    headers = {k.lower(): v for k, v in upstream.requests[0]["headers"]}  # type: ignore[attr-defined]
    assert headers["transfer-encoding"] == "chunked"  # the sidecar's own framing
    await assert_still_serving(proxied, upstream, [("POST", "/x", "abc")])


@pytest.mark.parametrize(
    ("chunks", "body"),
    [
        pytest.param(b"3;ext=1\r\nabc\r\n0\r\n\r\n", "abc", id="extension"),
        pytest.param(b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", "abc", id="trailer"),
        pytest.param(b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n", "abc", id="two-chunks"),
        pytest.param(b"A\r\nabcdefghij\r\n0\r\n\r\n", "abcdefghij", id="upper-case-hex"),
    ],
)
async def test_valid_chunked_bodies_are_forwarded_whole(
    proxied: Running, upstream: Upstream, chunks: bytes, body: str
) -> None:
    [reply] = await talk(proxied.proxy, P + b"Connection: close\r\n" + CHUNKED + chunks)
    assert reply.status == 200
    await assert_still_serving(proxied, upstream, [("POST", "/x", body)])


async def test_transfer_coding_other_than_chunked_is_refused(
    proxied: Running, upstream: Upstream
) -> None:
    body = gzip.compress(b"hello")
    request = (
        P + b"Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    [reply] = await talk(proxied.proxy, request)
    # It was once forwarded with the gzip coding dropped (hop-by-hop), so that the upstream
    # took gzip bytes for the body. RFC 9112 6.1: refuse a coding not understood, 501.
    assert (reply.status, reply.json()) == (501, {"error": "not_implemented"})
    await assert_still_serving(proxied, upstream)


# -- what follows a request in the same packet ------------------------------------------


async def test_pipelined_requests_after_a_zero_length_body_are_each_forwarded(
    proxied: Running, upstream: Upstream
) -> None:
    one = b"GET /one HTTP/1.1\r\nHost: svc.internal\r\nContent-Length: 0\r\n\r\n"
    two = b"GET /two HTTP/1.1\r\nHost: svc.internal\r\nConnection: close\r\n\r\n"
    first, second = await talk(proxied.proxy, one + two, replies=2)
    assert (first.status, first.json()["path"]) == (200, "/one")  # type: ignore[index]
    assert (second.status, second.json()["path"]) == (200, "/two")  # type: ignore[index]
    await assert_still_serving(proxied, upstream, [("GET", "/one", ""), ("GET", "/two", "")])


async def test_request_after_a_chunked_body_is_its_own_request_upstream(
    proxied: Running, upstream: Upstream
) -> None:
    """The classic smuggling packet: the upstream sees exactly the two requests the client
    framed, each with its own framing, in order; never the second inside the first's body."""
    attack = (
        P + CHUNKED + b"3\r\nabc\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: svc.internal\r\nConnection: close\r\n\r\n"
    )
    first, second = await talk(proxied.proxy, attack, replies=2)
    assert (first.status, first.json()["body"]) == (200, "abc")  # type: ignore[index]
    assert (second.status, second.json()["path"]) == (200, "/smuggled")  # type: ignore[index]
    await assert_still_serving(proxied, upstream, [("POST", "/x", "abc"), ("GET", "/smuggled", "")])


INNER = b"GET /smuggled HTTP/1.1\r\nHost: svc.internal\r\n\r\n"


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(
            P + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(INNER), INNER),
            id="content-length",
        ),
        pytest.param(
            P + b"Connection: close\r\n" + CHUNKED + b"%x\r\n%s\r\n0\r\n\r\n" % (len(INNER), INNER),
            id="chunked",
        ),
    ],
)
async def test_request_inside_a_body_stays_body(
    proxied: Running, upstream: Upstream, attack: bytes
) -> None:
    [reply] = await talk(proxied.proxy, attack)
    assert reply.status == 200
    await assert_still_serving(proxied, upstream, [("POST", "/x", INNER.decode())])


async def test_valid_request_then_garbage_in_one_packet_is_refused_whole(
    proxied: Running,
    upstream: Upstream,
    refusals: list[str],
) -> None:
    """aiohttp parses the packet at once and drops what it parsed when it meets the garbage:
    the client gets one 400 (not a 200 then a 400), the valid request is never forwarded."""
    attack = b"GET /first HTTP/1.1\r\nHost: svc.internal\r\n\r\nG(T /x HTTP/1.1" + H
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, "Invalid method encountered")
    await assert_still_serving(proxied, upstream)


async def test_http10_chunked_with_a_request_behind_it_is_refused(
    proxied: Running,
    upstream: Upstream,
    refusals: list[str],
) -> None:
    attack = (
        b"POST /x HTTP/1.0\r\nHost: svc.internal\r\n" + CHUNKED + b"3\r\nabc\r\n0\r\n\r\n" + INNER
    )
    [reply] = await talk(proxied.proxy, attack)
    assert_refused_400(reply, refusals, "Data after `Connection: close`")
    await assert_still_serving(proxied, upstream)


async def test_http10_chunked_alone_is_decoded_reframed_and_the_connection_closed(
    proxied: Running, upstream: Upstream
) -> None:
    """RFC 9112 6.1 would have this treated as faulty framing; aiohttp decodes it instead.
    No desync follows: the upstream gets one HTTP/1.1 request framed by the sidecar, and
    the client's connection is closed after the answer (`talk` checks)."""
    attack = b"POST /x HTTP/1.0\r\nHost: svc.internal\r\n" + CHUNKED + b"3\r\nabc\r\n0\r\n\r\n"
    [reply] = await talk(proxied.proxy, attack)
    assert reply.status_line == "HTTP/1.0 200 OK"
    await assert_still_serving(proxied, upstream, [("POST", "/x", "abc")])


# -- a body that breaks once it is on its way ---------------------------------------------


@dataclass
class Recorder:
    """A raw upstream that never answers: it keeps what it receives until the sidecar hangs up."""

    received: bytearray = field(default_factory=bytearray)
    hung_up: bool = False


@pytest.fixture
async def recorder(raw_upstream: Callable[[RawHandler], Awaitable[str]]) -> tuple[Recorder, str]:
    state = Recorder()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            state.received += chunk
        state.hung_up = True
        writer.close()

    return state, await raw_upstream(handler)


HEAD_THEN_CHUNK = P + CHUNKED + b"3\r\nabc\r\n"


async def test_chunk_broken_after_forwarding_never_reaches_upstream_whole(
    start_sidecar: StartSidecar, recorder: tuple[Recorder, str]
) -> None:
    state, url = recorder
    sc = await start_sidecar(catch_all(url, "timeouts: {request: 1s}"))
    async with connect(sc.proxy) as client:
        await client.send(HEAD_THEN_CHUNK)
        await eventually(lambda: state.received.endswith(b"3\r\nabc\r\n"))
        await client.send(b"zz\r\nmore\r\n0\r\n\r\n")
        reply = await client.reply()
    assert reply.status in (400, 408)
    await eventually(lambda: state.hung_up)
    # The upstream saw the upload break off: never a last chunk that would make it look whole.
    assert state.received.startswith(b"POST /x HTTP/1.1\r\n")
    assert not state.received.endswith(b"0\r\n\r\n")
    assert b"more" not in state.received


async def test_chunk_broken_after_forwarding_is_answered_400_at_once(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(catch_all(upstream.url, "timeouts: {request: 1s}"))
    async with connect(sc.proxy) as client:
        await client.send(HEAD_THEN_CHUNK)
        await eventually(lambda: upstream.hits == 1)
        await client.send(b"zz\r\nmore\r\n0\r\n\r\n")
        reply = await client.reply()
    assert (reply.status, reply.json()) == (400, {"error": "bad_request", "route": "all"})
    assert forwarded(upstream) == []


# -- absolute-form, authority-form, asterisk-form: never an open proxy --------------------


def absolute_forms(authority: str) -> list[tuple[str, str]]:
    """(request target, the path the configured upstream must see)."""
    return [
        (f"http://{authority}/x", "/x"),
        (f"https://{authority}/x?q=1", "/x?q=1"),
        (f"http://user@{authority}/x", "/x"),
        (f"http://{authority}", "/"),
    ]


async def test_absolute_form_for_an_unrouted_host_is_404_no_route(
    start_sidecar: StartSidecar, upstream: Upstream, elsewhere: Elsewhere
) -> None:
    sc = await start_sidecar(host_only(upstream.url))
    authority = elsewhere.authority
    targets = [target for target, _ in absolute_forms(authority)]
    for target in [*targets, "http://evil.example/"]:
        host = "evil.example" if "evil" in target else authority
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        [reply] = await talk(sc.proxy, request.encode())
        assert reply.status == 404, target
        assert reply.header("Content-Type") == "application/json"
        assert reply.json() == {"error": "no_route"}
    assert elsewhere.connections == 0
    assert sc.sample("sidecar_unrouted_requests_total") == len(targets) + 1
    await assert_still_serving(sc, upstream, host="api.internal")


async def test_absolute_form_goes_to_the_configured_upstream_by_path(
    start_sidecar: StartSidecar, upstream: Upstream, elsewhere: Elsewhere
) -> None:
    sc = await start_sidecar(catch_all(upstream.url))
    authority = elsewhere.authority
    expected = []
    for target, path in absolute_forms(authority):
        request = f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        [reply] = await talk(sc.proxy, request.encode())
        assert reply.status == 200, target
        expected.append(("GET", path, ""))
    # Origin-form that looks like a network path: a path all the same.
    request = f"GET //{authority}/x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    [reply] = await talk(sc.proxy, request.encode())
    assert reply.status == 200
    expected.append(("GET", f"//{authority}/x", ""))
    assert forwarded(upstream) == expected
    assert elsewhere.connections == 0
    upstream_host = upstream.url.removeprefix("http://")
    for seen in upstream.requests:
        headers = {k.lower(): v for k, v in seen["headers"]}  # type: ignore[attr-defined]
        assert headers["host"] == upstream_host


async def test_absolute_form_is_routed_by_the_host_it_names_not_the_host_header(
    start_sidecar: StartSidecar, upstream: Upstream, elsewhere: Elsewhere
) -> None:
    """RFC 9112 3.2.2, as Envoy does: the target's authority, not `Host`, picks the route."""
    sc = await start_sidecar(host_only(upstream.url))
    request = f"GET http://{elsewhere.authority}/x HTTP/1.1\r\nHost: api.internal\r\n"
    [reply] = await talk(sc.proxy, (request + "Connection: close\r\n\r\n").encode())
    assert (reply.status, reply.json()) == (404, {"error": "no_route"})
    assert elsewhere.connections == 0
    request = "GET http://api.internal/x HTTP/1.1\r\nHost: elsewhere.example\r\n"
    [reply] = await talk(sc.proxy, (request + "Connection: close\r\n\r\n").encode())
    assert reply.status == 200
    await assert_still_serving(sc, upstream, [("GET", "/x", "")], host="api.internal")


async def test_connect_for_an_unrouted_host_is_405(
    start_sidecar: StartSidecar, upstream: Upstream, elsewhere: Elsewhere
) -> None:
    sc = await start_sidecar(host_only(upstream.url))
    authority = elsewhere.authority
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    [reply] = await talk(sc.proxy, request.encode())
    assert (reply.status, reply.json()) == (405, {"error": "connect_not_allowed"})
    assert reply.header("Allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert elsewhere.connections == 0
    await assert_still_serving(sc, upstream, host="api.internal")


async def test_connect_is_never_forwarded(
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    elsewhere: Elsewhere,
) -> None:
    received = bytearray()

    async def accepts_anything(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read(65536))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    sc = await start_sidecar(catch_all(await raw_upstream(accepts_anything)))
    authority = elsewhere.authority
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    [reply] = await talk(sc.proxy, request.encode())
    # It was once forwarded to the route's upstream, whose 200 read as an open tunnel.
    assert elsewhere.connections == 0
    assert bytes(received) == b""
    assert (reply.status, reply.json()) == (405, {"error": "connect_not_allowed"})


async def test_asterisk_form_is_400_bad_request_and_never_forwarded(
    proxied: Running, upstream: Upstream
) -> None:
    """`OPTIONS *` reaches the handler; the upstream client cannot send `*`, so 400."""
    attack = b"OPTIONS * HTTP/1.1\r\nHost: svc.internal\r\nConnection: close\r\n\r\n"
    [reply] = await talk(proxied.proxy, attack)
    assert (reply.status, reply.json()) == (400, {"error": "bad_request", "route": "all"})
    assert reply.header("Content-Type") == "application/json"
    await assert_still_serving(proxied, upstream)


# -- admin paths on the proxy listener ----------------------------------------------------


def admin_paths(route: str) -> list[tuple[str, str]]:
    """The admin listener's endpoints, the mutating ones aimed at `route`."""
    return [
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/breakers"),
        ("POST", "/reload"),
        ("POST", f"/breakers/{route}/reset"),
        ("POST", f"/breakers/{route}"),
    ]


def admin_request(method: str, path: str, host: str) -> bytes:
    body = b'{"state": "forced_open"}' if method == "POST" else b""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def test_admin_paths_on_the_proxy_listener_are_unrouted_without_a_route(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(host_only(upstream.url))
    for method, path in admin_paths("api"):
        [reply] = await talk(sc.proxy, admin_request(method, path, "svc.internal"))
        assert (reply.status, reply.json()) == (404, {"error": "no_route"}), path
    assert sc.breaker("api").state.value == "closed"
    await assert_still_serving(sc, upstream, host="api.internal")


async def test_admin_paths_on_the_proxy_listener_go_to_the_upstream(
    proxied: Running, upstream: Upstream
) -> None:
    for method, path in admin_paths("all"):
        [reply] = await talk(proxied.proxy, admin_request(method, path, "svc.internal"))
        assert reply.status == 200, path
        assert reply.json()["path"] == path  # type: ignore[index]  # the upstream's echo
    assert [(m, p) for m, p, _ in forwarded(upstream)] == admin_paths("all")
    assert proxied.breaker("all").state.value == "closed"  # not forced open by the POST


# -- as a user runs it: one warning line per malformed request, never a traceback ---------


async def test_malformed_requests_log_one_warning_line_each_in_sidecar_run(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\n" + catch_all(upstream.url)
    )
    async with running(str(config)) as (process, proxy_address, _):
        proxy = f"http://{proxy_address}"
        attacks = [
            G + b"X: a\x00b\r\n\r\n",
            G + b"X-A: " + b"b" * 8191 + b"\r\n\r\n",
            P + b"Content-Length: 4\r\n" + CHUNKED + b"0\r\n\r\n",
            P + CHUNKED + b"zz\r\n\r\n",
        ]
        for attack in attacks:
            [reply] = await talk(proxy, attack)
            assert reply.status == 400
        # Not HTTP at all (TLS on the plain port): aiohttp logs it at debug level, so nothing.
        [reply] = await talk(proxy, TLS_HELLO)
        assert reply.status == 400
        [reply] = await talk(proxy, b"GET /ok HTTP/1.1" + H[:-2] + b"Connection: close\r\n\r\n")
        assert reply.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
    assert "Traceback" not in log
    lines = [json.loads(x) for x in log.splitlines()]  # JSON, the default: one object each
    assert not [x for x in lines if x["level"] == "error"]
    warnings = [x for x in lines if "bad request from 127.0.0.1: 400" in x["message"]]
    assert len(warnings) == len(attacks), log
    assert all(x["level"] == "warning" and "exception" not in x for x in warnings)
