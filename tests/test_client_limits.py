"""Limits on the service's side: max_body_size (413) and the header timeout (slowloris)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.breaker import State
from sidecar.config import ConfigError, parse_config
from sidecar.listener import ClientConnection
from tests.conftest import (
    RawHandler,
    Running,
    StartSidecar,
    Upstream,
    connect,
    eventually,
    json_body,
    raw_exchange,
    read_one,
    read_request_head,
)


def config(url: str, extra: str = "", route_extra: str = "") -> str:
    return f"""
client_timeouts: {{headers: 300ms, idle: 30s}}
{extra}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
    max_body_size: 1KB
{route_extra}
"""


# -- max_body_size ----------------------------------------------------------------------


async def test_a_declared_length_over_the_limit_is_413_before_anything_else(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream.url))
    async with http.post(f"{sc.proxy}/upload", data=b"x" * 1001) as response:
        assert response.status == 413
        assert response.headers["Connection"] == "close"
        assert await json_body(response) == {"error": "body_too_large", "route": "api"}
    assert upstream.hits == 0
    assert sc.sample("sidecar_requests_total", route="api", code="413") == 1
    assert sc.breaker("api").consecutive_failures == 0
    async with http.post(f"{sc.proxy}/upload", data=b"x" * 1000) as response:
        assert response.status == 200  # exactly the limit is fine
        assert (await response.json())["received"] == 1000


async def test_expect_100_continue_over_the_limit_is_refused_before_the_upload(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(config(upstream.url))
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await raw_exchange(sc.proxy, head)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert upstream.hits == 0


async def test_a_chunked_body_that_grows_past_the_limit_is_cut_off(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream.url))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 400

    async with http.post(f"{sc.proxy}/upload", data=chunks()) as response:
        assert response.status == 413
        assert await json_body(response) == {"error": "body_too_large", "route": "api"}
    # The upstream saw an upload break off, never a body that looked whole; the
    # breaker heard nothing (the client's fault).
    assert upstream.requests == []
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 0
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0
    async with http.get(f"{sc.proxy}/after") as response:
        assert response.status == 200


async def test_without_a_limit_nothing_is_refused(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream.url).replace("    max_body_size: 1KB\n", ""))
    async with http.post(f"{sc.proxy}/upload", data=b"z" * 100_000) as response:
        assert (await response.json())["received"] == 100_000


@pytest.mark.parametrize(
    ("value", "size"),
    [("1048576", 1048576), ("512KB", 512_000), ("10MiB", 10 * 2**20), ("1.5 GB", 1_500_000_000),
     ("100B", 100), ("null", None)],
)  # fmt: skip
def test_sizes(value: str, size: int | None) -> None:
    text = config("http://u", extra=f"defaults: {{max_body_size: {value}}}")
    text = text.replace("    max_body_size: 1KB\n", "")
    assert parse_config(text).routes[0].max_body_size == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be at least 1 byte (null for no limit)"),
        ("10 furlongs", "'10 furlongs' is not a size; use bytes (1048576) or a unit"),
        ("-5", "must be at least 1 byte"),
        ("1.5", "must be a size such as 1048576, '512KB' or '10MiB', not float 1.5"),
        ("99999999GiB", "must be at most 1 PiB"),
    ],
)
def test_bad_sizes(value: str, message: str) -> None:
    text = config("http://u").replace("max_body_size: 1KB", f"max_body_size: {value}")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    (problem,) = info.value.problems
    assert str(problem).startswith("c.yaml:8: routes[0].max_body_size: " + message)


# -- the header timeout --------------------------------------------------------------------
# On the fake clock: the test moves time (`sc.clock.advance`), and a timer that falls due
# does its work within that call, so what it did or did not do is seen at once.


def closing(conn: ClientConnection) -> bool:
    return conn.transport is None or conn.transport.is_closing()


async def test_a_slowloris_client_is_cut_off_while_others_are_served(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    conn = await sc.client_connection()
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\n"  # and never the blank line
    writer.write(head)
    await eventually(lambda: sc.clock.set_for(0.3))  # the header timer, from the first byte
    try:
        # A header byte each 50 ms: each one would reset an idle timer. Meanwhile
        # everybody else is served.
        for sent in range(1, 7):
            if sent <= 3:
                async with http.get(f"{sc.proxy}/ok") as response:
                    assert response.status == 200
            writer.write(b"X")
            # (Read by the sidecar: `_head_size` counts the bytes of a head in progress.)
            await eventually(lambda sent=sent: conn._head_size == len(head) + sent)
            sc.clock.advance(0.05 if sent < 6 else 0.049)
            assert not closing(conn)
        sc.clock.advance(0.001)  # 300 ms since the head's first byte
        answer = await asyncio.wait_for(reader.read(), 5.0)  # until the sidecar closes
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b'\r\n\r\n{"error":"header_timeout"}')
    assert [r["path"] for r in upstream.requests] == ["/ok"] * 3


async def test_an_idle_keep_alive_connection_is_not_a_slow_header(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """The header timer starts at a request's first byte, not when the connection goes quiet."""
    sc = await start_sidecar(config(upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    conn = await sc.client_connection()
    try:
        request = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2):
            writer.write(request)
            # (A 408 sent meanwhile would be read here as the answer.)
            assert (await read_one(reader)).startswith(b"HTTP/1.1 200 ")
            # Quiet for longer than the header timeout: a pooled client connection.
            sc.clock.advance(0.6)
            assert not closing(conn)
    finally:
        writer.close()


async def test_a_head_that_arrives_in_pieces_within_the_timeout_is_served(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(config(upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /pieces HT")
        await eventually(lambda: sc.clock.set_for(0.3))  # the header timer, from here
        sc.clock.advance(0.15)
        writer.write(b"TP/1.1\r\nHost:")
        sc.clock.advance(0.149)  # the client's pace: the head is whole within 300 ms
        writer.write(b" x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_client_timeouts_config() -> None:
    parsed = parse_config(config("http://u")).client_timeouts
    assert (parsed.headers, parsed.idle) == (0.3, 30.0)
    default = parse_config(config("http://u").replace("client_timeouts:", "#")).client_timeouts
    assert (default.headers, default.idle, default.write) == (10.0, 75.0, 60.0)
    with pytest.raises(ConfigError) as info:
        parse_config(config("http://u").replace("headers: 300ms", "header: 1s"), "c.yaml")
    assert [str(p) for p in info.value.problems] == [
        "c.yaml:2: client_timeouts.header: unknown key 'header'; did you mean 'headers'?"
    ]


# -- found by review: each once broke the header timer or the body limit ---------------------

API = """
client_timeouts: {{headers: 300ms, idle: 30s}}
routes:
  - name: api
    match: {{path_prefix: /api}}
    upstream: {url}
    max_body_size: 1KB
"""


async def test_body_bytes_dropped_after_an_answer_do_not_start_the_header_timer(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """They did: an idle pooled connection then got a 408, read as its next answer."""
    sc = await start_sidecar(API.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    conn = await sc.client_connection()
    try:
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert (await read_one(reader)).startswith(b"HTTP/1.1 404 ")
        writer.write(b"hello")  # read and dropped by the listener after the answer
        # (Read: the parser is between requests once the body's last byte is in.)
        await eventually(lambda: conn._parsing is None)
        sc.clock.advance(0.6)  # twice the header timeout
        assert not closing(conn)
        writer.write(b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_one(reader)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_nothing_follows_a_413(start_sidecar: StartSidecar, upstream: Upstream) -> None:
    sc = await start_sidecar(API.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"POST /api/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        assert (await read_one(reader)).startswith(b"HTTP/1.1 413 ")
        writer.write(b"z" * 500)  # the client goes on uploading what it declared
        rest = await asyncio.wait_for(reader.read(), 5)  # closed after the 413, not drained
    finally:
        writer.close()
    assert rest == b""


async def test_a_partial_head_pipelined_during_a_slow_request_is_timed(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """It was not: the slowloris held its connection for `idle` instead of `headers`."""
    sc = await start_sidecar(API.format(url=upstream.url).replace("/api}", "/}"), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        writer.write(b"GET /b HTTP/1.1\r\nHo")  # and never the rest
        await eventually(lambda: sc.clock.set_for(0.3))  # timed from its first byte
        sc.clock.advance(0.299)
        assert sc.clock.set_for(0.001)  # not yet due
        # The header timeout, while the first request is still in hand: its answer
        # (the next thing read) comes first, then the 408.
        sc.clock.advance(0.001)
        upstream.release.set()
        assert (await read_one(reader)).startswith(b"HTTP/1.1 200 ")  # answered first
        rest = await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()
    assert rest.startswith(b"HTTP/1.1 408 ")


async def test_a_body_too_large_during_an_early_answer_is_cut_off_at_once(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """It waited for timeouts.request, then counted an upstream `timeout`: the client's fault."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        writer.write(b"0\r\n\r\n")
        await reader.read()

    url = await raw_upstream(echo)
    sc = await start_sidecar(API.format(url=url) + "    timeouts: {request: 30s}\n")
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"190\r\n" + b"a" * 400 + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        for _ in range(2):  # 1200 bytes in all: past the 1KB limit
            writer.write(b"190\r\n" + b"a" * 400 + b"\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)  # long before the 30 s timeout
        assert not rest.endswith(b"0\r\n\r\n")  # aborted, never ended as if whole
    finally:
        writer.close()
    for kind in ("timeout", "reset", "connect", "status"):
        assert sc.sample("sidecar_upstream_failures_total", route="api", kind=kind) == 0
    assert sc.breaker("api").consecutive_failures == 0


def test_the_aiohttp_internals_the_listener_reads_are_still_there() -> None:
    """`_messages` and `_ErrInfo`: if aiohttp renames them, a broken chunk hangs again."""
    from aiohttp import web_protocol

    assert "_messages" in web_protocol.RequestHandler.__slots__
    assert hasattr(web_protocol, "_ErrInfo")


async def test_the_aiohttp_internals_the_fast_paths_use_are_still_there() -> None:
    """The listener's fast path and the upstream client lean on these (issue 5): if an
    aiohttp upgrade renames one, this says which, before anything misbehaves."""
    from aiohttp import helpers, http_parser, http_writer
    from aiohttp.base_protocol import BaseProtocol

    server = web.Server(lambda _request: None)  # type: ignore[arg-type, return-value]
    assert isinstance(server._connections, dict) and isinstance(server._kwargs, dict)
    protocol = BaseProtocol(asyncio.get_running_loop())
    for name in ("_paused", "_drain_helper", "_parser", "transport"):
        assert hasattr(protocol, name), name
    for name in ("_pause_transport_reading", "_resume_transport_reading"):
        assert callable(getattr(protocol, name, None)), name
    for module, name in (
        (http_writer, "_serialize_headers"),
        (helpers, "must_be_empty_body"),
        (helpers, "should_remove_content_length"),
        (helpers, "rfc822_formatted_time"),
        (http_parser, "HttpRequestParser"),
        (http_parser, "HttpResponseParser"),
    ):
        assert callable(getattr(module, name, None)), f"aiohttp.{module.__name__}.{name}"
    assert http_writer._serialize_headers("HTTP/1.1 200 OK", CIMultiDict(A="b")) == (
        b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
    )


# -- the write timeout: a client that stops reading its response ------------------------------

READER = """
client_timeouts: {{write: 300ms}}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
"""


def in_flight(sc: Running) -> float | None:
    return sc.sample("sidecar_in_flight_requests", route="api")


async def test_a_client_that_stops_reading_is_cut_off_and_counts_nothing(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """It held its upstream connection (and a socket each side) for as long as it liked."""
    sc = await start_sidecar(READER.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    conn = await sc.client_connection()
    try:
        writer.write(b"GET /big/200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        # ... and reads no more. The socket buffers fill, the sidecar's writes wait, and
        # after the write timeout it lets go of both sides. (No `await` from here to the
        # timeout: the client's socket cannot move meanwhile.)
        await eventually(lambda: conn.writing_paused)
        sc.clock.advance(0.299)
        assert not closing(conn) and in_flight(sc) == 1
        sc.clock.advance(0.001)
        assert closing(conn)
        await eventually(lambda: sc.sample("sidecar_in_flight_requests", route="api") == 0)
    finally:
        writer.close()
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.consecutive_failures) == (State.CLOSED, 0)
    for kind in ("status", "connect", "timeout", "reset"):
        assert sc.sample("sidecar_upstream_failures_total", route="api", kind=kind) == 0
    async with aiohttp.ClientSession() as http, http.get(f"{sc.proxy}/after") as response:
        assert response.status == 200  # and everyone else is served


async def test_a_slow_but_steady_reader_is_not_cut_off(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(READER.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    conn = await sc.client_connection()
    size = 32 << 20  # far more than the socket buffers: the sidecar's writes wait on the client
    paced = 0
    try:
        writer.write(f"GET /big/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        received = 0
        while received < size:
            chunk = await asyncio.wait_for(reader.read(256 * 1024), 5)
            assert chunk, f"cut off after {received} bytes"
            received += len(chunk)
            if conn.writing_paused and sc.clock.set_for(0.3):
                # The sidecar waits on the client, its write timer set since the clock last
                # moved: the client took enough for its writes to go on meanwhile.
                sc.clock.advance(0.2)  # the client's pace: slow, but never 300 ms idle
                paced += 1
    finally:
        writer.close()
    assert received == size
    assert paced >= 5  # a second and more with the sidecar's writes waiting on the client
