"""After each kind of answer, a client connection goes on cleanly or closes cleanly.

Found by an independent review of the listener (issue 13): an answer that leaves
reading paused for good, a request pipelined behind a closing answer that still
reaches the upstream, a close that resets the answer away, a header timeout that
runs while the listener itself does not read, and an upgrade request's body that
never went upstream. Each test holds what the contract, or HTTP/1.1, asks for.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from sidecar import upstream_pool
from sidecar.breaker import State
from tests.conftest import RawHandler, StartSidecar, Upstream, connect, eventually, read_one

RawUpstream = Callable[[RawHandler], Awaitable[str]]


def one_route(upstream_url: str, extra: str = "") -> str:
    return f"""
routes:
  - name: a
    match: {{path_prefix: /a}}
    upstream: {upstream_url}
    strip_prefix: true
    breaker: {{failure_threshold: 2, open_duration: 45s}}
{extra}"""


def first_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


async def answered(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    return await asyncio.wait_for(read_one(reader), within)


# -- reading goes on after an answer ---------------------------------------------------------


@pytest.mark.parametrize("route_open", [False, True], ids=["no-route-404", "open-503"])
async def test_a_body_buffered_before_its_answer_does_not_stall_the_connection(
    start_sidecar: StartSidecar, upstream: Upstream, route_open: bool
) -> None:
    """A head and a 100 KB body in one read, answered at once: the body was buffered
    before the handler ran, past `BODY_BUFFER`, which pauses reading. The answer keeps
    the connection (the body is whole), and reading goes on: the next request is read.
    (It was not: reading stayed paused until the idle timeout closed the connection.)"""
    sc = await start_sidecar(one_route(upstream.url))
    if route_open:
        sc.breaker("a").force(State.FORCED_OPEN, None, reason="test")
    reader, writer = await connect(sc.proxy)
    body = b"x" * 100_000
    path = b"/a/x" if route_open else b"/nowhere"
    try:
        writer.write(
            b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (path, len(body), body)
        )
        first = await answered(reader)
        assert first.startswith(b"HTTP/1.1 503 " if route_open else b"HTTP/1.1 404 ")
        assert b"Connection: close" not in first  # kept alive: the client may send another
        if route_open:
            sc.breaker("a").force(None, reason="test")
        writer.write(b"GET /a/next HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await answered(reader)
    finally:
        writer.close()
    assert second.startswith(b"HTTP/1.1 200 ")


async def test_an_upload_paused_on_its_last_chunk_does_not_stall_the_next_request(
    start_sidecar: StartSidecar, raw_upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last read of an upload fills the upstream's socket (the client connection
    pauses for it), and the upstream answers before it reads the body (an early answer;
    it reads the body afterwards and keeps the connection). The exchange ends with the
    body whole; reading from the client goes on, and its next request is served. (It was
    not: the pooled upstream connection's resume reached nobody.)"""
    made = upstream_pool.Connection.connection_made

    def small_send_buffer(self: upstream_pool.Connection, transport: asyncio.Transport) -> None:
        # A slow network to the upstream: the kernel takes little of a write at once.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        made(self, transport)

    monkeypatch.setattr(upstream_pool.Connection, "connection_made", small_send_buffer)
    body_read = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST"):
                    # An early answer (RFC 9110 allows it): answered first, then the body
                    # is read and dropped, and the connection serves the next request.
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await asyncio.sleep(0.2)  # the upstream's own pace: it reads late
                    await reader.readexactly(length)
                    body_read.set()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    sc = await start_sidecar(one_route(await raw_upstream(handler)))
    reader, writer = await connect(sc.proxy)
    body = b"x" * 100_000  # one read (the head and body together)
    try:
        writer.write(
            b"POST /a/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        first = await answered(reader)
        assert first.startswith(b"HTTP/1.1 200 "), first[:100]
        assert b"Connection: close" not in first
        await asyncio.wait_for(body_read.wait(), 5)
        writer.write(b"GET /a/next HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await answered(reader)
    finally:
        writer.close()
    assert second.startswith(b"HTTP/1.1 200 ")


async def test_the_header_timeout_does_not_run_while_the_listener_does_not_read(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """A is in hand (its upstream is slow); B and the first half of C arrive in one read.
    B waits its turn, so reading pauses; C's partial head started the header timer, and
    the rest of C waits in the socket, unread. The header timeout does not run out
    meanwhile: A and B are answered in turn. (The 408 used to come, and B was dropped.)"""
    sc = await start_sidecar(one_route(upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /a/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        writer.write(b"GET /a/b HTTP/1.1\r\nHost: x\r\n\r\nGET /a/c HTTP/1.1\r\n")
        conn = await sc.client_connection()
        await eventually(lambda: conn._header_timer is not None)  # C's head is in progress
        writer.write(b"Host: x\r\n\r\n")  # C is whole on the wire, not read
        await writer.drain()
        sc.clock.advance(11)  # past the header timeout (10 s), under A's request timeout
        upstream.release.set()
        a = await answered(reader)
        b = await answered(reader)
        c = await answered(reader)
    finally:
        writer.close()
    assert a.startswith(b"HTTP/1.1 200 ")
    assert b.startswith(b"HTTP/1.1 200 ") and b'"path": "/b"' in b, first_line(b)
    assert c.startswith(b"HTTP/1.1 200 ") and b'"path": "/c"' in c, first_line(c)


# -- a closing answer: nothing behind it goes on, and the answer arrives -----------------------


async def test_nothing_pipelined_behind_an_answer_that_closes_reaches_the_upstream(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """A is answered at once, closing the connection (417 for an `Expect` it cannot meet;
    a 413 or the 400 for `OPTIONS *` are the same), while B waits in line: B is never
    sent upstream. (It was, and its answer was lost: a client that retried a POST would
    have run it twice.)"""
    sc = await start_sidecar(one_route(upstream.url))
    reader, writer = await connect(sc.proxy)
    writer.write(b"GET /a/warm HTTP/1.1\r\nHost: x\r\n\r\n")  # an upstream connection
    await answered(reader)  # in the pool now: B would go out on it at once
    writer.close()
    upstream.hits, upstream.requests = 0, []
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(
            b"GET /a/x HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n"
            b"POST /a/charge HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\ndata"
        )
        data = await asyncio.wait_for(reader.read(), 5)  # until the sidecar closes
    finally:
        writer.close()
    await asyncio.sleep(0.05)  # (to show that nothing reaches the upstream later either)
    assert data.startswith(b"HTTP/1.1 417 ") and data.count(b"HTTP/1.1") == 1
    assert upstream.hits == 0, upstream.requests


@pytest.mark.parametrize("answer", ["413", "503"])
async def test_an_answer_to_an_upload_still_coming_reaches_the_client(
    start_sidecar: StartSidecar, upstream: Upstream, answer: str
) -> None:
    """A 1 MB upload, sent at once as curl sends one (no `Expect`), answered before its
    body is read: 413 over `max_body_size`, or 503 from an OPEN route. The listener
    closes after its answer, but reads and drops what still comes first (a lingering
    close): a socket closed with unread bytes resets the connection, and the client's
    kernel throws the answer away. (It did: the client saw "connection reset".)"""
    limit = "    max_body_size: 1KB" if answer == "413" else ""
    sc = await start_sidecar(one_route(upstream.url, limit))
    if answer == "503":
        sc.breaker("a").force(State.FORCED_OPEN, None, reason="test")
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"POST /a/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        writer.write(b"x" * 1_000_000)
        got = await answered(reader)
    finally:
        writer.close()
    assert got.startswith(b"HTTP/1.1 %b " % answer.encode()), got


async def test_a_lingering_connection_closes_when_the_client_does(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(one_route(upstream.url, "    max_body_size: 1KB"), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"POST /a/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        assert (await answered(reader)).startswith(b"HTTP/1.1 413 ")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # half-closed: our EOF
        conn = await sc.client_connection()
        writer.write(b"y" * 4000)  # the client goes on: read and dropped
        await writer.drain()
        assert conn.transport is not None and not conn.transport.is_closing()
        writer.write_eof()  # and stops: the connection is gone at once
        await eventually(lambda: conn.transport is None)
    finally:
        writer.close()


async def test_a_lingering_connection_is_closed_after_the_linger_time(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(one_route(upstream.url, "    max_body_size: 1KB"), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"POST /a/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        assert (await answered(reader)).startswith(b"HTTP/1.1 413 ")
        conn = await sc.client_connection()
        sc.clock.advance(1.999)
        await asyncio.sleep(0)
        assert conn.transport is not None and not conn.transport.is_closing()
        sc.clock.advance(0.001)  # LINGER: 2 s
        await eventually(lambda: conn.transport is None)
    finally:
        writer.close()


# -- an upgrade request with a body ------------------------------------------------------------


async def test_an_upgrade_request_with_a_body_has_its_body_forwarded(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """`Connection: Upgrade` + `Upgrade: h2c` (what `curl --http2` sends on http://) on
    a POST. llhttp skips the body of an upgrade request; the listener reads it as any
    request's (the sidecar upgrades nothing), and it goes upstream. (It never did: the
    upstream waited for it until the request timeout, and the breaker counted that.)"""
    sc = await start_sidecar(one_route(upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(
            b"POST /a/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        answer = await answered(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"body": "hello"' in answer


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_upgrade_request_with_a_body_cannot_desync_the_upstream_connection(
    start_sidecar: StartSidecar, upstream: Upstream, chunked: bool
) -> None:
    """Against an endpoint that answers without reading the body (aiohttp then reads and
    drops the declared body before the next request on the connection): the body goes
    up whole, so the next client's request on that pooled connection is its own. (The
    sidecar once declared the body and sent none of it: the upstream took the next
    client's request for it.) The connection then serves a request of its own."""
    sc = await start_sidecar(one_route(upstream.url))
    reader, writer = await connect(sc.proxy)
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n28\r\n%b\r\n0\r\n\r\n"
        if chunked
        else (b"Content-Length: 40\r\n\r\n%b")
    )
    try:
        writer.write(
            b"POST /a/status/200 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
            + framing % (b"z" * 40)
            + b"GET /a/after HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = await answered(reader)
        # What followed the body is the connection's next request, not the upgrade's.
        after = await answered(reader)
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert after.startswith(b"HTTP/1.1 200 ") and b'"path": "/after"' in after
    reader, writer = await connect(sc.proxy)  # another client, on the pooled connection
    try:
        writer.write(b"GET /a/victim HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789\r\n\r\n")
        victim = await answered(reader)
    finally:
        writer.close()
    assert victim.startswith(b"HTTP/1.1 200 "), first_line(victim)
    assert b"/victim" in victim


async def test_http10_keep_alive_and_an_answer_of_unknown_length(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(one_route(upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /a/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = await answered(reader)
        assert first.startswith(b"HTTP/1.0 200 ") and b"Connection: keep-alive\r\n" in first
        writer.write(b"GET /a/big/100000?chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)  # ends with the connection
    finally:
        writer.close()
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"Transfer-Encoding" not in head and b"keep-alive" not in head
    assert len(body) == 100_000
