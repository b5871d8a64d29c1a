"""The upstream client's connection pool: reuse, what is never reused, idle expiry, TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.client import Pool
from sidecar.upstream import UpstreamUnreachable, send
from tests.conftest import RawHandler, StartSidecar, raw_exchange, read_request_head

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


async def exchange(pool: Pool, origin: str) -> tuple[int, bytes]:
    ex = await send(pool, "GET", origin, "/x", CIMultiDict(), None, 2.0, 5.0, time.monotonic)
    try:
        return ex.response.status, b"".join([chunk async for chunk in ex.body()])
    finally:
        ex.close()


async def test_idle_connections_are_closed_after_the_keepalive_timeout(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    upstream = Counted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    origin = await raw_upstream(upstream)
    pool = Pool(keepalive_timeout=0.2)
    try:
        assert await exchange(pool, origin) == (200, b"ok")
        assert await exchange(pool, origin) == (200, b"ok")
        assert (upstream.connections, upstream.closed_by_peer) == (1, 0)
        await asyncio.sleep(0.5)
        assert upstream.closed_by_peer == 1
        assert await exchange(pool, origin) == (200, b"ok")
        assert upstream.connections == 2
    finally:
        await pool.close()


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
    untrusting = Pool()
    trusting = Pool(ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await exchange(untrusting, origin)
        assert await exchange(trusting, origin) == (200, f"hi localhost:{port}".encode())
        assert await exchange(trusting, origin) == (200, f"hi localhost:{port}".encode())
        assert len(trusting.origin(origin).idle) == 1  # the one connection, reused
    finally:
        await untrusting.close()
        await trusting.close()
        await runner.cleanup()
