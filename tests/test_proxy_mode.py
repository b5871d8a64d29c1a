"""The sidecar as the proxy its clients are configured with (CONTRACT.md, "Protocols").

HTTP proxy mode: a client told to use the sidecar as its HTTP proxy (`curl -x`, the
`http_proxy` variable, `requests`' and aiohttp's `proxy`) sends absolute-form requests,
`GET http://payments.internal/charge?x=1 HTTP/1.1`; the sidecar routes them by the host
they name exactly as by `Host`, sends the route's upstream the path and query, says
which host was asked for in `X-Forwarded-Host`, and keeps what was meant for a proxy
(`Proxy-Connection`, `Proxy-Authorization`) to itself.

CONNECT (`https_proxy` clients): `CONNECT host:port` opens a tunnel only for a route with
`connect: true` whose `match.host` is that host and whose upstream has that port, and
only ever to the route's upstream address. The TCP connect is the breaker's outcome; the
bytes after `200 Connection Established` are opaque (the client speaks TLS end to end
with the upstream). A tunnel ends with either side, after `timeouts.websocket_idle` of
silence, or at the end of `shutdown_grace`, and holds a place under
`max_websocket_sessions`. Any other CONNECT is 405 `connect_not_allowed`.

The clients are the real ones: curl (a child process), `requests` (in a thread) and
aiohttp, or raw bytes where a library would hide what a test pins. The upstreams are
in-process servers: the suite's echoing aiohttp upstream, an aiohttp server speaking TLS
with a certificate from `tests.certs`, and plain TCP servers scripted per test, each
counting the connections it accepted (so that "nothing connected" is seen, not assumed).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web

from sidecar.breaker import State
from tests.certs import make_pki, server_context
from tests.conftest import (
    RawHandler,
    Running,
    StartSidecar,
    Upstream,
    connect,
    eventually,
    json_answer,
    parse_head,
    raw_exchange,
    serving,
)

CURL = "/usr/bin/curl"
PROVIDER = "provider.test"
"""The host the CONNECT routes match: a name no resolver knows, so that a client reaches
it only through the sidecar, and the sidecar only by the route's upstream address."""
USER, PASSWORD = "svc", "proxy-secret"
"""Credentials the clients present to the sidecar as their proxy's (never forwarded)."""


# -- a TLS upstream -----------------------------------------------------------------------


@dataclass
class TlsUpstream:
    """An aiohttp server speaking TLS on 127.0.0.1 with `tests.certs`' server certificate,
    for DNS `provider.test` and `localhost` and IP 127.0.0.1."""

    port: int = 0
    ca_file: Path = Path()
    """The certificate (PEM) of the CA that signed it: the CA file a client trusts it with."""
    accepted: int = 0
    """TCP connections accepted (counted at accept, before any TLS handshake)."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    """What each request that reached it was: its path, whether it came over TLS, its
    headers (lower-case names)."""


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TlsUpstream]:
    """`GET /ok` answers `ok over TLS`."""
    pki = make_pki(tmp_path, extra_server_names=[PROVIDER])
    context = server_context(pki.server)
    state = TlsUpstream(ca_file=pki.ca.cert)

    async def ok(request: web.Request) -> web.Response:
        state.requests.append(
            {
                "path": request.raw_path,
                "secure": request.secure,
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )
        return web.Response(text="ok over TLS")

    app = web.Application()
    app.router.add_get("/ok", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None

    def accepted() -> asyncio.Protocol:
        # asyncio makes the protocol when it accepts the TCP connection, before the
        # TLS handshake: a connection that never speaks TLS is counted too.
        state.accepted += 1
        return handlers()

    server = await asyncio.get_running_loop().create_server(accepted, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await runner.cleanup()


# -- plain TCP upstreams ------------------------------------------------------------------


@dataclass
class Echo:
    """A TCP server that echoes what it reads: what a tunnel's far end is to the sidecar.

    `bye` makes it answer `bye` and close its side; with `banner` it speaks first."""

    port: int = 0
    banner: bytes = b""
    accepted: int = 0
    received: bytearray = field(default_factory=bytearray)
    eofs: int = 0
    """Connections on which it read the end of the stream (the sidecar closed its side)."""
    ended: int = 0
    """Connections over (the sidecar closed or reset its side, or it closed its own)."""


@pytest.fixture
async def echo(raw_upstream: Callable[[RawHandler], Awaitable[str]]) -> Echo:
    state = Echo()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.accepted += 1
        try:
            if state.banner:
                writer.write(state.banner)
            while True:
                data = await reader.read(65536)
                if not data:
                    state.eofs += 1
                    return
                state.received += data
                if data == b"bye":
                    writer.write(b"bye")
                    await writer.drain()
                    return
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            state.ended += 1
            writer.close()

    url = await raw_upstream(handle)
    state.port = int(url.rsplit(":", 1)[1])
    return state


@dataclass
class Listening:
    """A TCP listener that only counts the connections it accepts."""

    port: int
    accepted: int = 0


@pytest.fixture
async def listening() -> AsyncIterator[Callable[[int], Awaitable[Listening]]]:
    """`await listening(port)` (0: any free port) starts one."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(port: int = 0) -> Listening:
        state = Listening(port)

        async def count(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.accepted += 1
            writers.append(writer)

        server = await asyncio.start_server(count, "127.0.0.1", port)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


# -- helpers ------------------------------------------------------------------------------


def provider(upstream: str, more: str = "", host: str = PROVIDER) -> str:
    """Route `provider` for requests to `host`, to `upstream`, with `connect: true`;
    `more`: further keys of the route, indented four spaces."""
    return f"""
routes:
  - name: provider
    match: {{host: {host}}}
    upstream: {upstream}
    connect: true
{more}"""


def tunnels(sc: Running) -> float | None:
    return sc.sample("sidecar_connect_tunnels", route="provider")


def connect_request(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


async def open_tunnel(
    sc: Running, authority: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A raw CONNECT the sidecar answers 200: the connection, and the answer's head."""
    reader, writer = await connect(sc.proxy)
    writer.write(connect_request(authority))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return reader, writer, head


async def refused(sc: Running, authority: str) -> tuple[int, dict[str, str], Any]:
    """A raw CONNECT answered with anything but 200: status, headers, JSON body."""
    return await json_answer(sc.proxy, connect_request(authority))


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    """`data` through the tunnel to the echo server and back."""
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data


async def at_eof(reader: asyncio.StreamReader) -> bytes:
    """What is left to read until the connection's end (which must come)."""
    return await asyncio.wait_for(reader.read(), 5)


async def curl(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """curl with `args` (no config file, no proxy unless `args` or `env` name one):
    the status and body it got."""
    process = await asyncio.create_subprocess_exec(
        CURL, "-q", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    body, _, code = out.rpartition(b"\n")
    return int(code), body


def requests_get(url: str, proxies: dict[str, str], **kwargs: object) -> tuple[int, bytes]:
    """`requests` (in the calling thread), the environment's proxies ignored."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(url, proxies=proxies, timeout=10, **kwargs)  # type: ignore[arg-type]
        return response.status_code, response.content


def with_credentials(proxy: str) -> str:
    return proxy.replace("http://", f"http://{USER}:{PASSWORD}@", 1)


# -- HTTP proxy mode ------------------------------------------------------------------------


PAYMENTS = "payments.internal"


def payments(upstream: Upstream) -> str:
    return f"""
routes:
  - name: payments
    match: {{host: {PAYMENTS}}}
    upstream: {upstream.url}
"""


ProxyClient = Callable[[str, str], Awaitable[tuple[int, bytes]]]
"""Fetches a URL (2nd) through an HTTP proxy (1st, `http://host:port`), presenting
`USER`:`PASSWORD` to it: the status and body."""


async def curl_x(proxy: str, url: str) -> tuple[int, bytes]:
    return await curl("-x", with_credentials(proxy), url)


async def curl_env(proxy: str, url: str) -> tuple[int, bytes]:
    return await curl(url, env={"http_proxy": with_credentials(proxy)})


async def requests_proxy(proxy: str, url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(requests_get, url, {"http": with_credentials(proxy)})


async def aiohttp_proxy(proxy: str, url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, proxy=with_credentials(proxy)) as response,
    ):
        return response.status, await response.read()


HTTP_CLIENTS = pytest.mark.parametrize(
    "client",
    [curl_x, curl_env, requests_proxy, aiohttp_proxy],
    ids=["curl -x", "curl http_proxy=", "requests", "aiohttp"],
)


@HTTP_CLIENTS
async def test_a_client_using_the_sidecar_as_its_http_proxy_reaches_the_route_by_host(
    start_sidecar: StartSidecar, upstream: Upstream, client: ProxyClient
) -> None:
    """`http://payments.internal/charge?x=1` through the sidecar as the HTTP proxy: the
    route matching `payments.internal` answers; its upstream gets the path and query,
    its own `Host`, `X-Forwarded-Host: payments.internal`, and no `Proxy-*` header (not
    the client's `Proxy-Authorization` for the sidecar, nor `Proxy-Connection`)."""
    sc = await start_sidecar(payments(upstream))
    status, body = await client(sc.proxy, f"http://{PAYMENTS}/charge?x=1")
    assert status == 200, body
    assert json.loads(body)["path"] == "/charge?x=1"
    [seen] = upstream.requests
    headers = {k.lower(): v for k, v in seen["headers"]}  # type: ignore[attr-defined]
    assert seen["path"] == "/charge?x=1"
    assert headers["host"] == upstream.url.removeprefix("http://")
    assert headers["x-forwarded-host"] == PAYMENTS
    assert [name for name in headers if name.startswith("proxy")] == []
    assert sc.sample("sidecar_requests_total", route="payments", code="200") == 1


@HTTP_CLIENTS
async def test_an_http_proxy_request_for_a_host_no_route_matches_is_404_no_route(
    start_sidecar: StartSidecar, upstream: Upstream, client: ProxyClient
) -> None:
    """The sidecar is no open proxy: `http://elsewhere.internal/charge` is 404
    `{"error":"no_route"}` and reaches no upstream (nor that host)."""
    sc = await start_sidecar(payments(upstream))
    status, body = await client(sc.proxy, "http://elsewhere.internal/charge?x=1")
    assert (status, json.loads(body)) == (404, {"error": "no_route"})
    assert upstream.hits == 0
    assert sc.sample("sidecar_unrouted_requests_total") == 1


async def test_proxy_headers_in_an_absolute_form_request_are_not_forwarded(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """As raw bytes, so the test does not rest on what a client library sends:
    `Proxy-Connection` and `Proxy-Authorization` stop at the sidecar; the request's
    other headers go on."""
    sc = await start_sidecar(payments(upstream))
    answer = await raw_exchange(
        sc.proxy,
        b"GET http://payments.internal/charge?x=1 HTTP/1.1\r\nHost: payments.internal\r\n"
        b"Proxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic c3ZjOnNlY3JldA==\r\n"
        b"X-Request-Id: r-1\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    [seen] = upstream.requests
    headers = {k.lower(): v for k, v in seen["headers"]}  # type: ignore[attr-defined]
    assert "proxy-connection" not in headers
    assert "proxy-authorization" not in headers
    assert "c3ZjOnNlY3JldA" not in json.dumps(seen)
    assert headers["x-request-id"] == "r-1"
    assert seen["path"] == "/charge?x=1"


async def test_a_proxy_client_keeps_its_connection_for_the_next_request(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """Two requests from one `requests` session through the sidecar as its proxy: both
    answered, each by its own path, on the one connection to the sidecar the client
    opened (the sidecar kept it alive for the second)."""
    sc = await start_sidecar(payments(upstream))
    proxies = {"http": sc.proxy}

    def twice() -> tuple[list[int], int]:
        with requests.Session() as session:
            session.trust_env = False
            statuses = [
                session.get(
                    f"http://{PAYMENTS}/charge?x={i}", proxies=proxies, timeout=10
                ).status_code
                for i in (1, 2)
            ]
            adapter = session.get_adapter(f"http://{PAYMENTS}")
            assert isinstance(adapter, requests.adapters.HTTPAdapter)
            manager = adapter.proxy_manager[sc.proxy]
            # (urllib3's pool container cannot be iterated, only its keys listed)
            [pool] = [manager.pools[key] for key in manager.pools.keys()]  # noqa: SIM118
            return statuses, pool.num_connections

    assert await asyncio.to_thread(twice) == ([200, 200], 1)
    assert [r["path"] for r in upstream.requests] == ["/charge?x=1", "/charge?x=2"]


# -- CONNECT: clients speaking TLS to the upstream through the tunnel -----------------------


def tls_route(tls: TlsUpstream, more: str = "", host: str = PROVIDER) -> str:
    return provider(f"https://127.0.0.1:{tls.port}", more, host)


TlsClient = Callable[[str, str, Path], Awaitable[tuple[int, bytes]]]
"""Fetches an https URL (2nd) through an HTTP proxy (1st), trusting the CA file (3rd)."""


async def curl_x_tls(proxy: str, url: str, cafile: Path) -> tuple[int, bytes]:
    return await curl("-x", proxy, "--cacert", str(cafile), url)


async def curl_env_tls(proxy: str, url: str, cafile: Path) -> tuple[int, bytes]:
    return await curl("--cacert", str(cafile), url, env={"https_proxy": proxy})


async def requests_tls(proxy: str, url: str, cafile: Path) -> tuple[int, bytes]:
    return await asyncio.to_thread(requests_get, url, {"https": proxy}, verify=str(cafile))


async def aiohttp_tls(proxy: str, url: str, cafile: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, proxy=proxy, ssl=context) as response,
    ):
        return response.status, await response.read()


@pytest.mark.parametrize("host", ["localhost", PROVIDER])
@pytest.mark.parametrize(
    "client",
    [curl_x_tls, curl_env_tls, requests_tls, aiohttp_tls],
    ids=["curl -x", "curl https_proxy=", "requests", "aiohttp"],
)
async def test_an_https_proxy_client_speaks_tls_to_the_upstream_through_the_tunnel(
    start_sidecar: StartSidecar, tls_upstream: TlsUpstream, client: TlsClient, host: str
) -> None:
    """`https://HOST:PORT/ok` through the sidecar as the HTTPS proxy, for a route
    `match: {host: HOST}`, `upstream: https://127.0.0.1:PORT`, `connect: true`: the
    client verifies the upstream's own certificate (the sidecar is no TLS endpoint) and
    gets the upstream's answer. With HOST `provider.test`, a name no resolver knows,
    only the sidecar could have taken it there. The tunnel is opaque: the upstream sees
    the client's own request, with its `Host` and none of the sidecar's `X-Forwarded-*`
    headers. One TCP connection reached the upstream; the tunnel is gone once the
    client is done."""
    sc = await start_sidecar(tls_route(tls_upstream, host=host))
    url = f"https://{host}:{tls_upstream.port}/ok"
    status, body = await client(sc.proxy, url, tls_upstream.ca_file)
    assert (status, body) == (200, b"ok over TLS")
    [seen] = tls_upstream.requests
    headers = seen["headers"]
    assert (seen["path"], seen["secure"]) == ("/ok", True)
    assert headers["host"] == f"{host}:{tls_upstream.port}"
    assert [name for name in headers if name.startswith("x-forwarded")] == []
    assert tls_upstream.accepted == 1
    await eventually(lambda: tunnels(sc) == 0)
    assert sc.breaker("provider").consecutive_failures == 0


# -- CONNECT: only to the route's address -------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "provider.test:{other}",
        "127.0.0.1:{port}",
        "localhost:{port}",
        "example.com:443",
        "plain.test:{port}",
        "api.provider.test:{port}",
    ],
    ids=[
        "another port",
        "the upstream's IP, not match.host",
        "another name of the upstream's address",
        "a host no route names",
        "a route without connect: true",
        "a subdomain of match.host",
    ],
)
async def test_a_connect_to_anything_but_a_connect_routes_address_is_405(
    start_sidecar: StartSidecar,
    tls_upstream: TlsUpstream,
    listening: Callable[[int], Awaitable[Listening]],
    target: str,
) -> None:
    """405 `{"error":"connect_not_allowed"}` (no route name) with an `Allow` header that
    does not offer CONNECT; nothing connects to the upstream, nor to the port asked
    for. Then the route's own CONNECT still opens its tunnel (one connection)."""
    other = await listening(0)
    port = tls_upstream.port
    sc = await start_sidecar(
        tls_route(tls_upstream)
        + f"""  - name: plain
    match: {{host: plain.test}}
    upstream: https://127.0.0.1:{port}
"""
    )
    status, headers, body = await refused(sc, target.format(other=other.port, port=port))
    assert (status, body) == (405, {"error": "connect_not_allowed"})
    assert headers["allow"]
    assert "CONNECT" not in headers["allow"].upper()
    assert headers["content-type"].startswith("application/json")
    assert (tls_upstream.accepted, other.accepted) == (0, 0)
    assert tunnels(sc) == 0

    _, writer, _ = await open_tunnel(sc, f"{PROVIDER}:{port}")
    await eventually(lambda: tls_upstream.accepted == 1)
    writer.close()
    assert other.accepted == 0


async def test_the_tunnel_goes_to_the_routes_upstream_address_never_to_the_named_host(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """`CONNECT provider.test:PORT` (a name no resolver knows) for a route matching
    `provider.test` with `upstream: http://127.0.0.1:PORT`: the tunnel goes to
    127.0.0.1:PORT. The host is matched case-insensitively; the 200 carries no
    `Content-Length` or `Transfer-Encoding` (RFC 9110 9.3.6)."""
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, head = await open_tunnel(sc, f"Provider.TEST:{echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    _, headers = parse_head(head)
    assert "content-length" not in headers and "transfer-encoding" not in headers
    await round_trip(reader, writer, b"hello through the tunnel")
    assert echo.accepted == 1
    writer.close()


# -- CONNECT: the bytes, both ways, and the tunnel's end -----------------------------------


async def test_bytes_pass_both_ways_untouched_and_the_gauge_counts_open_tunnels(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """A raw CONNECT: `HTTP/1.1 200`, then any bytes (every byte value, 4 MiB) come back
    from the echo server as they were sent; `sidecar_connect_tunnels{route="provider"}`
    counts 1 then 2 tunnels while they are open and 0 after their clients close."""
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    authority = f"provider.test:{echo.port}"
    reader, writer, _ = await open_tunnel(sc, authority)
    assert tunnels(sc) == 1
    await round_trip(reader, writer, b"GET / HTTP/1.1\r\n\r\nnot HTTP \x00\xff at all")
    await round_trip(reader, writer, bytes(range(256)) * 16384)
    second_reader, second_writer, _ = await open_tunnel(sc, authority)
    await round_trip(second_reader, second_writer, b"second")
    assert tunnels(sc) == 2
    writer.close()
    await eventually(lambda: tunnels(sc) == 1)
    second_writer.close()
    await eventually(lambda: tunnels(sc) == 0)
    await eventually(lambda: echo.ended == 2)


async def test_the_upstream_may_speak_first(start_sidecar: StartSidecar, echo: Echo) -> None:
    """An upstream that sends as soon as it is connected (SSH, SMTP): its banner reaches
    the client after the 200, none of it lost nor ahead of the 200."""
    echo.banner = b"SSH-2.0-upstream\r\n"
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, head = await open_tunnel(sc, f"provider.test:{echo.port}")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 Connection Established"
    assert await asyncio.wait_for(reader.readexactly(len(echo.banner)), 5) == echo.banner
    await round_trip(reader, writer, b"client hello")
    writer.close()


async def test_the_client_closing_ends_the_tunnel_for_the_upstream(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """The client closes its connection: the upstream reads the end of the stream, and
    the gauge goes back to 0."""
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    await round_trip(reader, writer, b"last words")
    writer.close()
    await eventually(lambda: echo.eofs == 1)
    await eventually(lambda: tunnels(sc) == 0)


async def test_a_client_half_close_reaches_the_upstream_as_its_end(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """The client sends its last bytes and shuts down its sending side (a half-close):
    the tunnel ends, and what the client sent last reaches the upstream first."""
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    await round_trip(reader, writer, b"ping")
    writer.write(b"final")
    writer.write_eof()
    await eventually(lambda: echo.ended == 1)
    assert echo.received == b"pingfinal"
    await eventually(lambda: tunnels(sc) == 0)
    writer.close()


async def test_the_upstream_closing_ends_the_tunnel_for_the_client(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """The upstream closes its side after its last bytes: the client gets them, then
    the end of the stream; the gauge goes back to 0."""
    sc = await start_sidecar(provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    await round_trip(reader, writer, b"ping")
    writer.write(b"bye")
    assert await at_eof(reader) == b"bye"
    await eventually(lambda: tunnels(sc) == 0)
    writer.close()


async def test_a_silent_tunnel_is_closed_after_websocket_idle(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """`timeouts: {websocket_idle: 30s}` (fake time): bytes either way move the deadline;
    30 s of silence after the last of them closes the tunnel, for the client and the
    upstream."""
    sc = await start_sidecar(
        provider(f"http://127.0.0.1:{echo.port}", "    timeouts: {websocket_idle: 30s}\n"),
        fake_timers=True,
    )
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    sc.clock.advance(29)
    await round_trip(reader, writer, b"at 29 s")
    sc.clock.advance(29)  # 58 s in, 29 s silent
    await round_trip(reader, writer, b"at 58 s")
    assert tunnels(sc) == 1
    sc.clock.advance(31)
    assert await at_eof(reader) == b""
    await eventually(lambda: echo.ended == 1)
    await eventually(lambda: tunnels(sc) == 0)
    writer.close()


async def test_stop_gives_an_open_tunnel_the_grace_then_closes_it(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """`shutdown_grace: 1s` (real time): the tunnel still carries bytes once the stop
    has begun, and is closed at the end of the grace, for the client and the upstream."""
    sc = await start_sidecar("shutdown_grace: 1s\n" + provider(f"http://127.0.0.1:{echo.port}"))
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    loop = asyncio.get_running_loop()
    began = loop.time()
    stopping = asyncio.create_task(sc.sidecar.stop())
    await round_trip(reader, writer, b"during the grace")
    assert await at_eof(reader) == b""
    await asyncio.wait_for(stopping, 5)
    assert 0.9 <= loop.time() - began < 2.0
    await eventually(lambda: echo.ended == 1)
    writer.close()


# -- CONNECT and the breaker ---------------------------------------------------------------


async def test_a_refused_connect_is_502_a_connect_failure_and_an_open_route_answers_503(
    start_sidecar: StartSidecar,
    closed_port: int,
    listening: Callable[[int], Awaitable[Listening]],
) -> None:
    """Nothing listens on the upstream's port: 502 `upstream_unreachable`, counted as a
    `connect` failure, and with `failure_threshold: 1` the route opens. The next CONNECT
    is 503 `circuit_open` with `Retry-After`, before any connect: something listening
    there now sees no connection."""
    sc = await start_sidecar(
        provider(
            f"http://127.0.0.1:{closed_port}",
            "    breaker: {failure_threshold: 1, open_duration: 30s}\n",
        )
    )
    authority = f"provider.test:{closed_port}"
    status, _, body = await refused(sc, authority)
    assert (status, body) == (502, {"error": "upstream_unreachable", "route": "provider"})
    assert sc.sample("sidecar_upstream_failures_total", route="provider", kind="connect") == 1
    assert sc.breaker("provider").state is State.OPEN

    now_listening = await listening(closed_port)
    status, headers, body = await refused(sc, authority)
    assert (status, headers["retry-after"]) == (503, "30")
    assert body == {"error": "circuit_open", "route": "provider", "retry_after": 30}
    assert now_listening.accepted == 0
    assert tunnels(sc) == 0


async def test_a_connect_that_does_not_complete_in_time_is_504_a_timeout_failure(
    start_sidecar: StartSidecar,
) -> None:
    """`timeouts: {connect: 1s}` (fake time), an upstream whose accept queue is full
    (its SYNs go unanswered): at 1 s, 504 `upstream_timeout`, a `timeout` failure."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(3):  # (one fills the queue; the others wait in SYN_SENT as well)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            sc = await start_sidecar(
                provider(
                    f"http://127.0.0.1:{port}",
                    "    timeouts: {connect: 1s}\n    breaker: {failure_threshold: 5}\n",
                ),
                fake_timers=True,
            )
            answer = asyncio.create_task(refused(sc, f"provider.test:{port}"))
            await eventually(lambda: sc.clock.set_for(1))
            sc.clock.advance(1)
            status, _, body = await answer
            assert (status, body) == (504, {"error": "upstream_timeout", "route": "provider"})
            assert (
                sc.sample("sidecar_upstream_failures_total", route="provider", kind="timeout") == 1
            )
            assert sc.breaker("provider").consecutive_failures == 1
        finally:
            for filler in fillers:
                filler.close()


async def test_a_long_tunnel_is_no_request_duration_and_never_a_slow_call(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """A tunnel carrying bytes while the clock moves 90 s (past `slow_call_duration: 1s`
    and past `timeouts.request`) stays open; once closed, it counted no slow call, no
    failure, and no 90 s in the duration histogram: the route stays CLOSED though any
    slow call would open it."""
    sc = await start_sidecar(
        provider(
            f"http://127.0.0.1:{echo.port}",
            "    breaker: {failure_threshold: 1, window: {requests: 10, min_requests: 1},"
            " slow_call_duration: 1s, slow_call_rate: 50%}\n",
        ),
        fake_timers=True,
    )
    reader, writer, _ = await open_tunnel(sc, f"provider.test:{echo.port}")
    for second in (30, 60, 90):
        sc.clock.advance(30)
        await round_trip(reader, writer, f"at {second} s".encode())
    writer.close()
    await eventually(lambda: tunnels(sc) == 0)
    duration = sc.sample("sidecar_upstream_request_duration_seconds_sum", route="provider")
    assert (duration or 0) < 1
    assert sc.sample("sidecar_upstream_slow_calls_total", route="provider") == 0
    for kind in ("status", "connect", "timeout", "reset"):
        assert sc.sample("sidecar_upstream_failures_total", route="provider", kind=kind) == 0, kind
    assert sc.breaker("provider").state is State.CLOSED


# -- CONNECT and max_websocket_sessions ----------------------------------------------------


async def test_tunnels_beyond_max_websocket_sessions_get_503_until_one_closes(
    start_sidecar: StartSidecar, echo: Echo
) -> None:
    """`max_websocket_sessions: 1`: a second concurrent tunnel is 503
    `websocket_sessions_full` with `Retry-After: 1`, counted as a rejection, and the
    upstream sees no second connection; once the first closes, a new one opens."""
    sc = await start_sidecar(
        provider(f"http://127.0.0.1:{echo.port}", "    max_websocket_sessions: 1\n")
    )
    authority = f"provider.test:{echo.port}"
    reader, writer, _ = await open_tunnel(sc, authority)
    await round_trip(reader, writer, b"first")
    status, headers, body = await refused(sc, authority)
    assert (status, headers["retry-after"]) == (503, "1")
    assert body == {"error": "websocket_sessions_full", "route": "provider", "retry_after": 1}
    assert echo.accepted == 1
    assert (
        sc.sample(
            "sidecar_rejected_requests_total", route="provider", reason="websocket_sessions_full"
        )
        == 1
    )
    assert sc.breaker("provider").consecutive_failures == 0

    writer.close()
    await eventually(lambda: tunnels(sc) == 0)
    reader, writer, _ = await open_tunnel(sc, authority)
    await round_trip(reader, writer, b"third")
    assert echo.accepted == 2
    writer.close()


async def test_websocket_sessions_and_tunnels_share_one_cap(start_sidecar: StartSidecar) -> None:
    """`max_websocket_sessions: 1` on a route that takes both: with a WebSocket session
    open, a CONNECT is 503 `websocket_sessions_full`."""
    opened: list[int] = []

    async def session(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        opened.append(1)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", session)
    async with serving(app) as port:
        sc = await start_sidecar(
            provider(f"http://127.0.0.1:{port}", "    max_websocket_sessions: 1\n")
        )
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(sc.proxy + "/ws", headers={"Host": "provider.test"}) as ws,
        ):
            await eventually(lambda: opened == [1])
            status, _, body = await refused(sc, f"provider.test:{port}")
            assert (status, body["error"]) == (503, "websocket_sessions_full")
            await ws.close()
