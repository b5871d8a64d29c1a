"""Fixtures: a running sidecar with a fake clock, real in-process upstreams, a client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import Sidecar
from sidecar.breaker import Breaker
from sidecar.config import load_config
from sidecar.listener import ClientConnection
from tests.fakes import FakeClock


@dataclass
class Running:
    """A started sidecar and where to reach it."""

    sidecar: Sidecar
    clock: FakeClock
    proxy: str
    admin: str

    def breaker(self, name: str) -> Breaker:
        found = self.sidecar.breaker(name)
        assert found is not None, f"no route {name!r}"
        return found

    def sample(self, name: str, **labels: str) -> float | None:
        return self.sidecar.metrics.registry.get_sample_value(name, labels)

    async def client_connection(self) -> ClientConnection:
        """The proxy listener's one client connection, once it has it: for what a test on
        the fake clock must see of it (whether its writes wait on the client, whether it
        is closing)."""
        listener = self.sidecar._listener
        assert listener is not None
        await eventually(lambda: len(listener.connections) == 1)
        [conn] = listener.connections
        return conn

    def rewrite_config(self, yaml_text: str) -> None:
        """Replace the config file (listening where it does now) for a reload to read."""
        config = self.sidecar.config
        Path(config.path).write_text(_listening(config.listen, config.admin_listen) + yaml_text)


def _listening(listen: object = "127.0.0.1:0", admin: object = "127.0.0.1:0") -> str:
    return f"listen: {listen}\nadmin: {{listen: {admin}}}\n"


class StartSidecar(Protocol):
    def __call__(
        self,
        yaml_text: str,
        rand: Callable[[], float] = ...,
        admin_token: str | None = ...,
        fake_timers: bool = ...,
    ) -> Awaitable[Running]: ...


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    """Start a sidecar from YAML (listeners on free loopback ports), stopped after the test.

    The YAML is written to a file first, which `Running.rewrite_config` replaces and
    `Sidecar.reload` reads. The breakers run on a fake clock; with `fake_timers`, so
    do the request path's timeouts (header, idle, write, connect, request, keep-alive):
    the test moves time with `Running.clock.advance`, and never waits for it.
    """
    started: list[Sidecar] = []

    async def start(
        yaml_text: str,
        rand: Callable[[], float] = random.random,
        admin_token: str | None = None,
        fake_timers: bool = False,
    ) -> Running:
        path = tmp_path / f"sidecar-{len(started)}.yaml"
        path.write_text(_listening() + yaml_text)
        clock = FakeClock()
        sidecar = Sidecar(
            load_config(str(path)),
            clock=clock,
            rand=rand,
            admin_token=admin_token,
            timers=clock if fake_timers else None,
        )
        await sidecar.start()
        started.append(sidecar)
        return Running(
            sidecar,
            clock,
            f"http://{sidecar.addresses['proxy']}",
            f"http://{sidecar.addresses['admin']}",
        )

    yield start
    for sidecar in started:
        await sidecar.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client, as a service would use against the sidecar."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@dataclass
class Upstream:
    """A real aiohttp server that records what reaches it."""

    url: str
    server: TestServer
    hits: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    uploaded: int = 0
    """Request body bytes `/upload` has read so far, in all (the sidecar sent them on)."""


def upstream_app(state: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        state.hits += 1
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        state.requests.append(record)
        return web.json_response(record)

    async def status(request: web.Request) -> web.Response:
        """The status asked for; `?retry_after=` adds that `Retry-After` header."""
        state.hits += 1
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.json_response(
            {"status": "set"}, status=int(request.match_info["code"]), headers=headers
        )

    async def hang(request: web.Request) -> web.Response:
        """Answers only when the test sets `release`; status from ?status=."""
        state.hits += 1
        state.entered.set()
        try:
            await state.release.wait()
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        return web.json_response({"hung": True}, status=int(request.query.get("status", "200")))

    async def big(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "chunked" not in request.query:
            response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = size if request.method == "HEAD" else 0  # aiohttp would write a HEAD's body
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        state.hits += 1
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
            state.uploaded += len(chunk)
        return web.json_response(
            {
                "received": received,
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )

    async def break_mid_body(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        response = web.StreamResponse(status=200)
        if "chunked" not in request.query:
            response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"y" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def redirect(_request: web.Request) -> web.Response:
        state.hits += 1
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def gzipped(_request: web.Request) -> web.Response:
        state.hits += 1
        import gzip

        return web.Response(
            body=gzip.compress(b"compressed payload"),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/hang", hang)
    app.router.add_get("/big/{size}", big)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/break", break_mid_body)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/gzip", gzipped)
    app.router.add_route("*", "/{path:.*}", echo)
    return app


def two_routes(upstream: Upstream) -> str:
    """Routes `a` (/a) and `b` (/b) to `upstream`, each opening after two failures."""
    return f"""
routes:
  - name: a
    match: {{path_prefix: /a}}
    upstream: {upstream.url}
    strip_prefix: true
    breaker: {{failure_threshold: 2, open_duration: 45s}}
  - name: b
    match: {{path_prefix: /b}}
    upstream: {upstream.url}
    strip_prefix: true
    breaker: {{failure_threshold: 2, open_duration: 45s}}
"""


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream(url="", server=None)  # type: ignore[arg-type]
    server = TestServer(upstream_app(state), host="127.0.0.1")
    await server.start_server()
    state.server = server
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    state.release.set()
    await server.close()


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """`app` served on a free loopback port (over TLS with `ssl_context`) until the block
    ends: its port."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """A TCP server speaking whatever bytes a test scripts, for what aiohttp won't send."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


# -- raw sockets to the sidecar, for what an HTTP client library would not send ----------


async def connect(proxy: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the proxy listener at `proxy` ("http://host:port")."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def raw_exchange(proxy: str, data: bytes, within: float = 5.0) -> bytes:
    """Send `data` on a fresh connection; everything the sidecar sends until it closes."""
    reader, writer = await connect(proxy)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


async def read_one(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length, head and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A response head's status and headers (names in lower case)."""
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def json_answer(proxy: str, request: bytes) -> tuple[int, dict[str, str], Any]:
    """`request` on a fresh connection to the proxy listener at `proxy`, and the one
    answer with a Content-Length that comes: its status, headers and JSON body."""
    reader, writer = await connect(proxy)
    try:
        writer.write(request)
        response = await read_one(reader)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return *parse_head(head), json.loads(body)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for something the sidecar does on its own (not for time to pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def fetch(
    http: aiohttp.ClientSession,
    sc: Running,
    path: str = "/ok",
    method: str = "GET",
    **kwargs: object,
) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy: its status, headers and body."""
    async with http.request(method, sc.proxy + path, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), await response.read()


def api_route(upstream: str, breaker: str, more: str = "") -> str:
    """Config of one route `api`, matching every path, to `upstream`; `more`: further
    keys of the route, as lines indented four spaces."""
    return f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream}
    breaker: {breaker}
{more}"""


def api_sample(sc: Running, name: str, **labels: str) -> float | None:
    """A series of route `api`."""
    return sc.sample(name, route="api", **labels)


async def json_body(response: aiohttp.ClientResponse) -> object:
    return json.loads(await response.read())


@contextlib.asynccontextmanager
async def running(
    config_path: str, *python_options: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """`sidecar run` as a child process, with the proxy and admin addresses it logged."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *python_options, "-m", "sidecar", "run", "-c", config_path,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        found = re.search(r"proxy on (\S+), admin on (\S+),", line)
        assert found, line
        yield process, found[1], found[2]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
