"""The upstream pool and its wire: reuse, what is never reused, idle expiry, TLS, framing."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.timers import LoopTimers, Timers
from sidecar.upstream import (
    UpstreamError,
    UpstreamRequest,
    UpstreamTlsError,
    UpstreamUnreachable,
    send,
)
from sidecar.upstream_pool import Pool
from tests.conftest import (
    RawHandler,
    StartSidecar,
    connect,
    eventually,
    raw_exchange,
    read_one,
    read_request_head,
)

REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def config(url: str) -> str:
    return f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
"""


class Counted:
    """A raw upstream answering every request on a connection; it counts connections."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    await read_request_head(reader)
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                self.requests += 1
                writer.write(self.answer)
                await writer.drain()
        except ConnectionError:
            self.closed_by_peer += 1
        finally:
            writer.close()


async def test_sequential_requests_share_one_upstream_connection(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    upstream = Counted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    sc = await start_sidecar(config(await raw_upstream(upstream)))
    for _ in range(3):
        reply = await raw_exchange(
            sc.proxy, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"ok")
    assert (upstream.requests, upstream.connections) == (3, 1)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_connection_the_upstream_means_to_close_is_not_reused(
    answer: bytes,
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    upstream = Counted(answer)  # which keeps the connection open all the same
    sc = await start_sidecar(config(await raw_upstream(upstream)))
    for _ in range(2):
        reply = await raw_exchange(
            sc.proxy, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert reply.endswith(b"ok")
    assert (upstream.requests, upstream.connections) == (2, 2)


class Collected:
    """A `Receiver` that keeps the whole answer (or the error)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers = b""
        self.body = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def upstream_head(self, status: int, reason: bytes, block: bytes) -> None:
        self.status, self.headers = status, block

    def upstream_body(self, chunk: bytes) -> None:
        self.body += chunk

    def upstream_end(self) -> None:
        self.done.set_result(None)

    def upstream_failed(self, error: UpstreamError) -> None:
        self.done.set_exception(error)

    def upstream_writable(self, writable: bool) -> None:
        pass

    def crashed(self, error: Exception) -> None:
        self.done.set_exception(error)


async def exchange(pool: Pool, origin: str, method: bytes = b"GET") -> tuple[int, bytes]:
    answer = Collected()
    send(pool, UpstreamRequest(origin, method, b"/x", b"", None, 2.0), answer)
    await asyncio.wait_for(answer.done, 5)
    return answer.status, answer.body


def pool_on(timers: Timers | None = None, **kwargs: object) -> Pool:
    return Pool(timers or LoopTimers(asyncio.get_running_loop()), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_upstreams_are_verified_and_pooled(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f"hi {request.headers['Host']}")

    app = web.Application()
    app.router.add_get("/{path:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    origin = f"https://localhost:{port}"
    untrusting = pool_on()
    trusting = pool_on(ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        with pytest.raises(UpstreamTlsError, match="CERTIFICATE_VERIFY_FAILED"):
            await exchange(untrusting, origin)
        assert await exchange(trusting, origin) == (200, f"hi localhost:{port}".encode())
        assert await exchange(trusting, origin) == (200, f"hi localhost:{port}".encode())
        assert len(trusting.origin(origin).idle) == 1  # the one connection, reused
    finally:
        await untrusting.close()
        await trusting.close()
        await runner.cleanup()


# -- the wire: each way an answer may be framed ------------------------------------------


def answering(*answers: bytes) -> Counted:
    """A raw upstream giving `answers` in turn, one per request, on any connection."""
    upstream = Counted(b"")
    replies = list(answers)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.connections += 1
        try:
            while replies:
                await read_request_head(reader)
                upstream.requests += 1
                writer.write(replies.pop(0))
                await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    upstream.__call__ = handler  # type: ignore[method-assign]
    return upstream


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("answer", "method", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"GET", 200, b"hello"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
         b"GET", 200, b"hello"),
        # A HEAD's answer has no body whatever its Content-Length says.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", 200, b""),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"GET", 204, b""),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b"GET", 304, b""),
        # Interim answers are skipped.
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"GET", 200, b"hello"),
    ],
    ids=["length", "chunked", "head", "204", "304", "interim"],
)  # fmt: skip
async def test_each_framing_of_an_answer_and_the_connection_reused(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    answer: bytes,
    method: bytes,
    status: int,
    body: bytes,
) -> None:
    upstream = answering(answer, OK)
    origin = await raw_upstream(upstream.__call__)
    pool = pool_on()
    try:
        assert await exchange(pool, origin, method) == (status, body)
        assert await exchange(pool, origin) == (200, b"ok")
        assert upstream.connections == 1
    finally:
        await pool.close()


async def test_an_answer_that_ends_with_the_connection(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    """No length, not chunked: the body ends with the connection, which is not reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nhel")
        await writer.drain()
        writer.write(b"lo")
        writer.close()

    origin = await raw_upstream(handler)
    pool = pool_on()
    try:
        assert await exchange(pool, origin) == (200, b"hello")
        assert pool.open_connections == 0
    finally:
        await pool.close()


async def test_an_answer_head_past_the_limit_is_an_error_not_a_hang(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"
    origin = await raw_upstream(answering(endless).__call__)
    pool = pool_on()
    try:
        with pytest.raises(UpstreamUnreachable, match="too long"):
            await exchange(pool, origin)
        assert pool.open_connections == 0
    finally:
        await pool.close()


@pytest.mark.parametrize("together", [True, False], ids=["same-write", "later"])
async def test_a_connection_the_upstream_speaks_on_unasked_is_closed(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], together: bool
) -> None:
    """An upstream may not answer what was never asked: the connection is never used
    again (what it said would be read as the next request's answer)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    unasked = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nunasked"
    said = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(ok + unasked if together else ok)
        await writer.drain()
        if not together:
            await said.wait()
            writer.write(unasked)
        await reader.read()
        writer.close()

    origin = await raw_upstream(handler)
    pool = pool_on()
    try:
        assert await exchange(pool, origin) == (200, b"ok")
        said.set()
        await eventually(lambda: pool.open_connections == 0)
        assert not pool.origin(origin).idle
    finally:
        await pool.close()


# -- found by review (issue 13): each held by a test through the sidecar -----------------


def route_to(url: str) -> str:
    return (
        "routes:\n  - {name: a, match: {path_prefix: /a}, strip_prefix: true, "
        f"upstream: '{url}'}}\n"
    )


async def answer_to(sc_proxy: str, request: bytes) -> bytes:
    reader, writer = await connect(sc_proxy)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_one(reader), 5)
    finally:
        writer.close()


async def test_a_request_that_fails_on_a_new_connection_is_not_sent_again(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """Only a *reused* connection that closes unanswered has its request sent again (the
    upstream may have been closing it as the request went out). One that closes on a new
    connection died on the request: sending it again would run it twice."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            if len(seen) == 1:
                writer.close()  # dies on it
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    sc = await start_sidecar(route_to(await raw_upstream(handler)))
    answer = await answer_to(sc.proxy, b"DELETE /a/item/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert len(seen) == 1


async def test_empty_lines_before_a_status_line_are_skipped(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """llhttp skips empty lines before a status line; so does the head taken from the
    bytes (it once took the first CRLF for the status line's end, and the real status
    line went to the client as a header)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_head(reader)
            writer.write(b"\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Up: 1\r\n\r\nhi")
            await writer.drain()
            await reader.read()
        finally:
            writer.close()

    sc = await start_sidecar(route_to(await raw_upstream(handler)))
    answer = await answer_to(sc.proxy, b"GET /a/x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = answer.split(b"\r\n\r\n")[0]
    assert head.count(b"HTTP/1.1") == 1, head
    assert head.startswith(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Up: 1\r\n"), head


async def test_interim_answers_split_across_reads_leave_the_final_head_whole(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer_in_pieces(reader, writer)
        finally:
            writer.close()

    async def answer_in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        for piece in (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r",
            b"\n\r\nHTTP/1.1 2",
            b"02 Accepted\r\nX-Up: 1\r\nContent-Le",
            b"ngth: 2\r\n\r\nok",
        ):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # the upstream's own pace: each piece its own read
        await reader.read()

    sc = await start_sidecar(route_to(await raw_upstream(handler)))
    answer = await answer_to(sc.proxy, b"GET /a/x HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202 Accepted\r\nX-Up: 1\r\nContent-Length: 2\r\n")
    assert b"Link" not in head and b"Continue" not in head
    assert body == b"ok"


async def test_bytes_after_a_whole_answer_never_answer_the_next_request(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """An upstream sends more than its Content-Length. The connection goes back to the
    pool only once the whole read is parsed: the extra bytes close it, and the client's
    pipelined next request goes out on a new one. (It went out on this one mid-parse,
    and the extra bytes failed it with a 502 the upstream never sent.)"""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    sc = await start_sidecar(route_to(await raw_upstream(handler)))
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /a/2 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(read_one(reader), 5)
        second = await asyncio.wait_for(read_one(reader), 5)
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 200 ")
    assert sc.sample("sidecar_upstream_failures_total", route="a", kind="connect") == 0


async def test_an_upload_given_up_lets_its_upstream_connection_go_at_once(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """The upstream stops reading an upload; at the request timeout the client gets its
    504, and the upstream connection is aborted, its unsent bytes dropped. (A plain
    close waits for the write buffer to flush, which a peer that does not read never
    allows: the socket and the buffered body stayed open.)"""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await read_request_head(reader)
            await release.wait()  # hung: reads nothing more
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    sc = await start_sidecar(route_to(await raw_upstream(handler)), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    pool = sc.sidecar._pool
    assert pool is not None
    try:
        writer.write(b"PUT /a/up HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n")
        writer.write(b"x" * 8_000_000)  # more than the kernel buffers both ways take
        await eventually(lambda: pool.open_connections == 1)
        conn = await sc.client_connection()
        await eventually(lambda: bool(conn._paused))  # the upload waits on the upstream
        sc.clock.advance(31)  # the request timeout (30 s)
        answer = await asyncio.wait_for(read_one(reader), 5)
        assert answer.startswith(b"HTTP/1.1 504 ")
        await eventually(lambda: pool.open_connections == 0)
    finally:
        release.set()
        writer.close()
    assert sc.sample("sidecar_upstream_failures_total", route="a", kind="timeout") == 1


async def test_a_retired_origin_keeps_no_connection(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    """`Pool.retain` (a reload that dropped a route, or changed its TLS settings): the
    origins it does not name close their idle connections at once, and a connection in
    use when it came goes when its answer is done, never back to the pool."""
    upstream = Counted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    url = await raw_upstream(upstream)
    pool = pool_on()
    try:
        assert await exchange(pool, url) == (200, b"ok")
        origin = pool.origin(url)
        assert len(origin.idle) == 1
        idle = origin.idle[0]
        pool.retain({url})  # named: kept
        assert origin.idle == [idle] and not idle.closed
        in_use = Collected()
        send(pool, UpstreamRequest(url, b"GET", b"/x", b"", None, 2.0), in_use)
        assert origin.idle == []  # the idle connection carries it
        pool.retain(set())
        assert origin.retired
        await asyncio.wait_for(in_use.done, 5)
        assert in_use.status == 200
        assert origin.idle == []
        await eventually(lambda: idle.closed)
        assert pool.origin(url) is not origin  # a new one, for a route that names it again
    finally:
        await pool.close()
