"""What issue 16's settings look like from outside the request path: `sidecar check`'s
lines and warnings, and each route's entry in `/breakers`."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.breaker import State
from sidecar.files import FileProblem, read_small_file
from sidecar.tunnel import FLUSH_TIMEOUT
from tests.certs import make_pki, server_context, tls_upstream
from tests.conftest import StartSidecar, connect, eventually, serving


def ok_app() -> web.Application:
    """An upstream whose `GET /` answers 200 `ok`."""

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    return app


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket session that sends each text message back."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_prints_the_protocol_settings_and_warns_of_verify_false(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"""
defaults:
  timeouts: {{websocket_idle: 10m}}
routes:
  - name: provider
    match: {{host: provider.test}}
    upstream: https://127.0.0.1:8443
    connect: true
    max_websocket_sessions: 50
    tls: {{ca_file: {pki.ca.cert}, cert_file: {pki.client.cert}, key_file: {pki.client.key},
           server_name: localhost, min_version: "1.3"}}
  - name: careless
    match: {{path_prefix: /careless}}
    upstream: https://127.0.0.1:9443
    tls: {{verify: false}}
""")
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert (
        "    timeouts: connect 2s, request 30s, websocket_idle 10m; max_websocket_sessions 50; "
        "CONNECT tunnels allowed\n" in result.stdout
    )
    assert (
        f"    tls: ca_file {pki.ca.cert}, client cert {pki.client.cert}, server_name localhost, "
        "min_version 1.3\n" in result.stdout
    )
    assert "    tls: system CAs, min_version 1.2, verify OFF\n" in result.stdout
    assert result.stderr == (
        "warning: routes[1]: tls.verify is false: the upstream's certificate and name are "
        "not checked\n"
    )


async def test_breakers_shows_sessions_tunnels_and_tls(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    upstream = await tls_upstream(pki.server)
    try:
        sc = await start_sidecar(f"""
routes:
  - name: provider
    match: {{host: localhost}}
    upstream: {upstream.url}
    connect: true
    tls: {{ca_file: {pki.ca.cert}, cert_file: {pki.client.cert}, key_file: {pki.client.key}}}
""")
        async with http.get(sc.proxy + "/x", headers={"Host": "localhost"}) as response:
            assert response.status == 200
        async with http.get(sc.admin + "/breakers") as response:
            [route] = (await response.json())["routes"]
        assert route["sessions"] == {
            "max_websocket_sessions": 1000,
            "websocket_idle": 3600.0,
            "websocket_sessions": 0,
            "connect": True,
            "connect_tunnels": 0,
        }
        assert route["tls"] == {
            "ca_file": str(pki.ca.cert),
            "cert_file": str(pki.client.cert),
            "server_name": None,
            "verify": True,
            "min_version": "1.2",
            "client_cert_expiry": pki.client.not_after_timestamp,
            "upstream_cert_expiry": pki.server.not_after_timestamp,
        }
    finally:
        await upstream.close()


async def test_a_client_half_close_is_passed_on_and_the_answer_still_comes(
    start_sidecar: StartSidecar,
) -> None:
    """A tunnelled protocol where the client says "that was all" by shutting its sending
    side (as `nc -N` does): the upstream sees the end of the question, and its answer,
    which it sends only then, still reaches the client before the tunnel ends."""

    async def answers_at_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        question = await reader.read()  # until the client's half-close arrives
        writer.write(b"answer to " + question)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answers_at_eof, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sc = await start_sidecar(f"""
routes:
  - name: provider
    match: {{host: provider.test}}
    upstream: http://127.0.0.1:{port}
    connect: true
""")
        reader, writer = await connect(sc.proxy)
        writer.write(f"CONNECT provider.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(b"question")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"answer to question"
        await eventually(lambda: sc.sample("sidecar_connect_tunnels", route="provider") == 0)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_resets_the_tls_handshake_is_a_tls_error(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An asyncio (aiohttp) upstream that refuses a missing client certificate under TLS
    1.2 cuts the connection off in the handshake without sending an alert: still 502
    `upstream_tls_error`, kind `tls`, not a connect failure (TCP had connected)."""
    pki = make_pki(tmp_path)

    context = server_context(pki.server, pki.client_ca, max_version=ssl.TLSVersion.TLSv1_2)
    async with serving(ok_app(), context) as port:
        sc = await start_sidecar(f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: https://127.0.0.1:{port}
    tls: {{ca_file: {pki.ca.cert}}}
""")
        async with http.get(sc.proxy + "/") as response:
            assert (response.status, await response.json()) == (
                502,
                {"error": "upstream_tls_error", "route": "api"},
            )
        failures = "sidecar_upstream_failures_total"
        assert sc.sample(failures, route="api", kind="tls") == 1
        assert sc.sample(failures, route="api", kind="connect") == 0


async def test_a_websocket_session_to_an_https_upstream(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The service speaks plain `ws://` to the sidecar; the sidecar speaks TLS to the
    upstream (`wss://` there): the session's bytes go through the TLS connection it took
    over after the 101."""
    pki = make_pki(tmp_path)

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{request.secure} {message.data}")
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    async with serving(app, server_context(pki.server)) as port:
        sc = await start_sidecar(f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: https://127.0.0.1:{port}
    tls: {{ca_file: {pki.ca.cert}}}
""")
        async with http.ws_connect(sc.proxy + "/ws") as ws:
            for text in ("one", "two"):
                await ws.send_str(text)
                assert (await ws.receive_str()) == f"True {text}"
            assert sc.sample("sidecar_websocket_sessions", route="api") == 1
        await eventually(lambda: sc.sample("sidecar_websocket_sessions", route="api") == 0)


async def test_a_reload_with_the_same_tls_files_keeps_the_context_and_its_connections(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A reload that changes nothing of a route's TLS (settings and files' contents)
    keeps its context: the pooled connection carries the next request (no new
    handshake), and the upstream's certificate expiry stays exported throughout."""
    pki = make_pki(tmp_path)
    upstream = await tls_upstream(pki.server)
    config = f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream.url}
    tls: {{ca_file: {pki.ca.cert}}}
    breaker: {{failure_threshold: %d}}
"""
    gauge = "sidecar_upstream_tls_cert_expiry_timestamp_seconds"
    try:
        sc = await start_sidecar(config % 5)
        async with http.get(sc.proxy + "/one") as response:
            assert response.status == 200
        sc.rewrite_config(config % 6)  # (the breaker changes: the route is reset, not kept)
        assert (await sc.sidecar.reload()).ok
        assert sc.sample(gauge, route="api") == pki.server.not_after_timestamp
        async with http.get(sc.proxy + "/two") as response:
            assert response.status == 200
        assert len(upstream.server_names) == 1  # one handshake: the connection was kept
        assert [seen.path for seen in upstream.seen] == ["/one", "/two"]
    finally:
        await upstream.close()


async def test_no_fallback_ever_answers_a_connect(start_sidecar: StartSidecar) -> None:
    """A route's fallback (200 by default) would read as an open tunnel to a CONNECT
    client: a refused CONNECT gets the sidecar's own answer, fallback or not."""
    sc = await start_sidecar("""
routes:
  - name: provider
    match: {host: provider.test}
    upstream: http://127.0.0.1:9
    connect: true
    bulkhead: {max_concurrent: 1}
    fallback: {body: '{}'}
""")
    sc.breaker("provider").force(State.FORCED_OPEN)
    reader, writer = await connect(sc.proxy)
    writer.write(b"CONNECT provider.test:9 HTTP/1.1\r\nHost: provider.test:9\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"X-Sidecar-Fallback" not in head
    assert (
        sc.sample(
            "sidecar_fallback_responses_total", route="provider", reason="circuit_forced_open"
        )
        == 0
    )
    assert (
        sc.sample("sidecar_rejected_requests_total", route="provider", reason="circuit_forced_open")
        == 1
    )


async def test_a_connect_with_content_is_a_bad_request(start_sidecar: StartSidecar) -> None:
    """RFC 9110 9.3.6: a CONNECT has no content. One with a `Content-Length` is refused
    400 by the listener, never routed as if `host:port` were a path."""
    sc = await start_sidecar("""
routes:
  - name: api
    match: {path_prefix: /}
    upstream: http://127.0.0.1:9
""")
    reader, writer = await connect(sc.proxy)
    writer.write(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nContent-Length: 2\r\n\r\nhi")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert body == b'{"error":"bad_request"}'


async def test_open_sessions_stay_counted_through_a_reload_that_resets_the_route(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """A reload that changes the breaker makes the route anew (fresh counts), but the
    WebSocket session still open is still counted, in the gauge and against the cap,
    until it ends."""

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    async with serving(app) as port:
        config = f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: http://127.0.0.1:{port}
    max_websocket_sessions: 1
    breaker: {{failure_threshold: %d}}
"""
        sc = await start_sidecar(config % 5)
        async with http.ws_connect(sc.proxy + "/ws") as ws:
            sc.rewrite_config(config % 6)
            result = await sc.sidecar.reload()
            assert result.ok and result.changes is not None and result.changes.reset == ["api"]
            await ws.send_str("still here")
            assert await ws.receive_str() == "still here"
            assert sc.sample("sidecar_websocket_sessions", route="api") == 1
            async with http.get(
                sc.proxy + "/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
            ) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"] == "websocket_sessions_full"
        await eventually(lambda: sc.sample("sidecar_websocket_sessions", route="api") == 0)
        async with http.ws_connect(sc.proxy + "/ws") as ws:
            await ws.send_str("after")
            assert await ws.receive_str() == "after"


async def test_handshakes_that_waited_in_the_bulkhead_queue_still_meet_the_cap(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """Two handshakes queue behind a plain request holding the route's one bulkhead slot,
    each with room under `max_websocket_sessions: 1` when it came: when the slot frees,
    the first opens its session and the second, for which there is no room any more,
    gets 503 `websocket_sessions_full`."""
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws_echo)
    async with serving(app) as port:
        sc = await start_sidecar(f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: http://127.0.0.1:{port}
    max_websocket_sessions: 1
    bulkhead: {{max_concurrent: 1, max_queued: 5, queue_timeout: 30s}}
""")
        holder = asyncio.ensure_future(http.get(sc.proxy + "/slow"))
        queued = "sidecar_bulkhead_queued_requests"
        await eventually(lambda: sc.sample("sidecar_bulkhead_in_flight_requests", route="api") == 1)
        first = asyncio.ensure_future(http.ws_connect(sc.proxy + "/ws"))
        await eventually(lambda: sc.sample(queued, route="api") == 1)
        second = asyncio.ensure_future(http.ws_connect(sc.proxy + "/ws"))
        await eventually(lambda: sc.sample(queued, route="api") == 2)
        release.set()
        async with await holder as response:
            assert response.status == 200
        ws = await first
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await second
        assert refused.value.status == 503
        assert (
            sc.sample(
                "sidecar_rejected_requests_total", route="api", reason="websocket_sessions_full"
            )
            == 1
        )
        assert sc.sample("sidecar_websocket_sessions", route="api") == 1
        await ws.close()


async def test_a_side_that_never_reads_is_cut_off_after_the_flush_timeout(
    start_sidecar: StartSidecar,
) -> None:
    """The client floods a tunnel whose upstream reads nothing, until the idle timeout
    ends it (fake time): its upstream connection, closed once what was written to it is
    out, is cut off after `FLUSH_TIMEOUT` since that never comes."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_reads(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sc = await start_sidecar(
            f"""
routes:
  - name: provider
    match: {{host: provider.test}}
    upstream: http://127.0.0.1:{port}
    connect: true
""",
            fake_timers=True,
        )
        pool = sc.sidecar._pool
        assert pool is not None
        reader, writer = await connect(sc.proxy)
        writer.write(f"CONNECT provider.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        chunk = b"x" * 65536
        for _ in range(256):  # 16 MiB: more than the kernel's buffers on both hops hold
            writer.write(chunk)
        await eventually(lambda: len(pool._connections) == 1)
        [upstream] = pool._connections
        await eventually(lambda: upstream.writing_paused)  # bytes the upstream will never take
        # Both ways stalled (the sidecar reads no more from the client it cannot pass
        # on), until the idle timeout ends the tunnel.
        sc.clock.advance(3601)
        tunnels = "sidecar_connect_tunnels"
        await eventually(lambda: sc.sample(tunnels, route="provider") == 0)
        assert pool.open_connections == 1  # closing, but its bytes are not out
        sc.clock.advance(FLUSH_TIMEOUT + 1)
        await eventually(lambda: pool.open_connections == 0)
        writer.transport.abort()
    finally:
        for accepted_writer in accepted:
            accepted_writer.transport.abort()
        server.close()
        await server.wait_closed()


def test_reading_a_directory_as_a_file_leaks_no_descriptor(tmp_path: Path) -> None:
    """`ca_file: /etc/ssl/certs` (a directory) fails every reload: each must give its file
    descriptor back."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(FileProblem, match="is a directory"):
            read_small_file(str(tmp_path), 1024)
    assert len(os.listdir("/proc/self/fd")) == before


async def test_an_mtls_refusal_under_tls_13_without_an_alert_is_a_tls_error(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Under TLS 1.3 the upstream judges the client certificate after the handshake; an
    asyncio (aiohttp) upstream refusing it then closes the new connection without an
    alert. For a route that presents a certificate, that is 502 `upstream_tls_error`,
    kind `tls`."""
    pki = make_pki(tmp_path)

    context = server_context(pki.server, pki.client_ca, min_version=ssl.TLSVersion.TLSv1_3)
    async with serving(ok_app(), context) as port:
        sc = await start_sidecar(f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: https://127.0.0.1:{port}
    tls: {{ca_file: {pki.ca.cert}, cert_file: {pki.stranger.cert}, key_file: {pki.stranger.key}}}
""")
        async with http.get(sc.proxy + "/") as response:
            assert (response.status, await response.json()) == (
                502,
                {"error": "upstream_tls_error", "route": "api"},
            )
        assert sc.sample("sidecar_upstream_failures_total", route="api", kind="tls") == 1


async def test_a_connect_no_route_tunnels_is_counted_as_unrouted(
    start_sidecar: StartSidecar,
) -> None:
    """A service that sends CONNECTs the sidecar refuses (a host missing from its
    `NO_PROXY`, say) shows in `sidecar_unrouted_requests_total`."""
    sc = await start_sidecar("""
routes:
  - name: api
    match: {host: api.test}
    upstream: http://127.0.0.1:9
""")
    for _ in range(3):
        reader, writer = await connect(sc.proxy)
        writer.write(b"CONNECT api.test:9 HTTP/1.1\r\nHost: api.test:9\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 405 ")
    assert sc.sample("sidecar_unrouted_requests_total") == 3
