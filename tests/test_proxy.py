"""Through the proxy: every row of the contract's "What a client sees", with real upstreams."""

from __future__ import annotations

import asyncio
import gzip
import socket
from typing import Any

import aiohttp
import pytest
from yarl import URL

from sidecar.breaker import State
from tests.conftest import (
    Running,
    StartSidecar,
    Upstream,
    connect,
    eventually,
    raw_exchange,
    read_request_head,
)


def routes(
    upstream: str, *, threshold: int = 3, open_duration: str = "10s", extra: str = ""
) -> str:
    return f"""
routes:
  - name: api
    match: {{path_prefix: /api}}
    upstream: {upstream}
    strip_prefix: true
    timeouts: {{connect: 1s, request: 2s}}
    breaker:
      failure_threshold: {threshold}
      open_duration: {open_duration}
      {extra}
"""


async def get(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with http.get(url, **kw) as response:
        body = await response.read()
        return response.status, response.headers, body


async def trip(http: aiohttp.ClientSession, sc: Running, times: int = 3) -> None:
    for _ in range(times):
        status, _, _ = await get(http, f"{sc.proxy}/api/status/500")
        assert status == 500
    assert sc.breaker("api").state is State.OPEN


# -- route CLOSED, upstream answers ------------------------------------------------------


async def test_forwards_method_path_query_body_and_headers(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url + "/base"))
    async with http.post(
        URL(f"{sc.proxy}/api/items/a%20b?x=1&y=%2F", encoded=True),
        data=b"hello",
        headers={"X-Custom": "kept", "Host": "svc.local:8080", "X-Forwarded-For": "10.0.0.9"},
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/base/items/a%20b?x=1&y=%2F"
    assert seen["body"] == "hello"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-custom"] == "kept"
    assert headers["host"] == f"127.0.0.1:{upstream.server.port}"
    assert headers["x-forwarded-host"] == "svc.local:8080"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
    assert headers["content-length"] == "5"
    assert "user-agent" in headers  # the client's own, not one added by the sidecar
    assert sc.breaker("api").consecutive_failures == 0


async def test_sets_x_forwarded_for_when_absent(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    async with http.get(f"{sc.proxy}/api/x") as response:
        seen = await response.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"


async def test_hop_by_hop_request_headers_are_dropped(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    async with http.get(
        f"{sc.proxy}/api/x",
        headers={
            "Connection": "keep-alive, X-Named-Hop",
            "X-Named-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "websocket",
            "X-End-To-End": "kept",
        },
    ) as response:
        seen = await response.json()
    names = {k.lower() for k, _ in seen["headers"]}
    for dropped in ("x-named-hop", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"):
        assert dropped not in names
    assert "x-end-to-end" in names
    # The connection header the upstream sees is aiohttp's own, for its keep-alive pool.
    assert dict((k.lower(), v) for k, v in seen["headers"]).get("connection") in (
        None,
        "keep-alive",
    )


async def test_hop_by_hop_response_headers_are_dropped(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: keep-alive, X-Secret-Hop\r\n"
            b"X-Secret-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Trailer: X-Sum\r\n"
            b"X-End-To-End: kept\r\n"
            b"\r\nok"
        )
        await writer.drain()
        writer.close()

    sc = await start_sidecar(routes(await raw_upstream(handler)))
    status, headers, body = await get(http, f"{sc.proxy}/api/x")
    assert (status, body) == (200, b"ok")
    for dropped in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert dropped not in headers
    assert headers["X-End-To-End"] == "kept"


async def test_upstream_status_and_body_pass_through(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    status, headers, body = await get(http, f"{sc.proxy}/api/status/404")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert body == b'{"status": "set"}'
    assert sc.breaker("api").consecutive_failures == 0  # 404 is not in failure_status


async def test_redirects_are_passed_on_not_followed(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    status, headers, _ = await get(http, f"{sc.proxy}/api/redirect", allow_redirects=False)
    assert (status, headers["Location"]) == (302, "/elsewhere")
    assert upstream.hits == 1


async def test_compressed_bodies_pass_through_untouched(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    status, headers, body = await get(http, f"{sc.proxy}/api/gzip")
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"compressed payload"


async def test_head_requests(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    async with http.head(f"{sc.proxy}/api/big/5000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "5000"
        assert await response.read() == b""


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_body_streams_with_its_framing(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession, chunked: bool
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    payload = b"z" * 300_000

    async def chunks() -> Any:
        for i in range(0, len(payload), 50_000):
            yield payload[i : i + 50_000]

    data: Any = chunks() if chunked else payload
    async with http.put(f"{sc.proxy}/api/upload", data=data) as response:
        seen = await response.json()
    assert seen["received"] == len(payload)
    if chunked:
        assert (seen["content_length"], seen["transfer_encoding"]) == (None, "chunked")
    else:
        assert (seen["content_length"], seen["transfer_encoding"]) == ("300000", None)


async def test_failure_statuses_count_and_open_the_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    breaker = sc.breaker("api")
    await get(http, f"{sc.proxy}/api/status/503")
    await get(http, f"{sc.proxy}/api/status/502")
    assert breaker.consecutive_failures == 2
    await get(http, f"{sc.proxy}/api/ok")
    assert breaker.consecutive_failures == 0
    await trip(http, sc)
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="status") == 5


# -- route OPEN ------------------------------------------------------------------------


async def test_open_route_answers_503_at_once_with_retry_after(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url, open_duration="10s"))
    await trip(http, sc)
    hits = upstream.hits
    status, headers, body = await get(http, f"{sc.proxy}/api/anything")
    assert status == 503
    assert headers["Retry-After"] == "10"
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"error":"circuit_open","route":"api","retry_after":10}'
    assert upstream.hits == hits  # the upstream was not contacted

    sc.clock.advance(7.2)
    status, headers, body = await get(http, f"{sc.proxy}/api/anything")
    assert (status, headers["Retry-After"]) == (503, "3")
    assert body == b'{"error":"circuit_open","route":"api","retry_after":3}'
    sc.clock.advance(2.5)
    _, headers, _ = await get(http, f"{sc.proxy}/api/anything")
    assert headers["Retry-After"] == "1"
    assert upstream.hits == hits


async def test_after_open_duration_a_probe_closes_the_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url, open_duration="10s"))
    await trip(http, sc)
    sc.clock.advance(10)
    assert sc.breaker("api").state is State.HALF_OPEN
    status, _, _ = await get(http, f"{sc.proxy}/api/ok")
    assert status == 200
    assert sc.breaker("api").state is State.CLOSED


async def test_a_failed_probe_reopens_for_a_new_period(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url, open_duration="10s"))
    await trip(http, sc)
    sc.clock.advance(10)
    status, _, _ = await get(http, f"{sc.proxy}/api/status/500")
    assert status == 500
    status, headers, _ = await get(http, f"{sc.proxy}/api/ok")
    assert (status, headers["Retry-After"]) == (503, "10")


# -- HALF_OPEN, probe slots all taken -------------------------------------------------------


async def test_half_open_with_probe_slots_taken_answers_503_retry_after_1(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url, extra="half_open_requests: 1"))
    await trip(http, sc)
    sc.clock.advance(10)
    probe = asyncio.create_task(get(http, f"{sc.proxy}/api/hang"))
    await upstream.entered.wait()
    hits = upstream.hits
    status, headers, body = await get(http, f"{sc.proxy}/api/ok")
    assert (status, headers["Retry-After"]) == (503, "1")
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"error":"circuit_half_open","route":"api","retry_after":1}'
    assert upstream.hits == hits
    upstream.release.set()
    assert (await probe)[0] == 200
    assert sc.breaker("api").state is State.CLOSED
    assert (
        sc.sample("sidecar_rejected_requests_total", route="api", reason="circuit_half_open") == 1
    )


# -- upstream refuses, resets, times out -------------------------------------------------------


async def test_refused_connection_is_502_and_a_connect_failure(
    start_sidecar: StartSidecar, closed_port: int, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(f"http://127.0.0.1:{closed_port}"))
    status, headers, body = await get(http, f"{sc.proxy}/api/x")
    assert status == 502
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"error":"upstream_unreachable","route":"api"}'
    assert sc.breaker("api").consecutive_failures == 1
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 1


async def test_unresolvable_host_is_502(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes("http://no-such-host.invalid"))
    status, _, body = await get(http, f"{sc.proxy}/api/x")
    assert (status, body) == (502, b'{"error":"upstream_unreachable","route":"api"}')
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 1


async def test_reset_before_response_headers_is_502(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 O")  # half a status line, then a reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()

    sc = await start_sidecar(routes(await raw_upstream(handler)))
    status, _, body = await get(http, f"{sc.proxy}/api/x")
    assert (status, body) == (502, b'{"error":"upstream_unreachable","route":"api"}')
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 1


async def test_close_right_after_accept_is_502(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    sc = await start_sidecar(routes(await raw_upstream(handler)))
    status, _, _ = await get(http, f"{sc.proxy}/api/x")
    assert status == 502


def in_flight(sc: Running) -> float | None:
    return sc.sample("sidecar_in_flight_requests", route="api")


async def test_upstream_timeout_is_504_and_a_timeout_failure(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        routes(upstream.url).replace("request: 2s", "request: 100ms"), fake_timers=True
    )
    answer = asyncio.ensure_future(get(http, f"{sc.proxy}/api/hang"))
    await asyncio.wait_for(upstream.entered.wait(), 5)
    sc.clock.advance(0.099)
    assert in_flight(sc) == 1  # (a 504 would have been decided in `advance`)
    sc.clock.advance(0.001)
    status, headers, body = await asyncio.wait_for(answer, 5)
    assert status == 504
    assert headers["Content-Type"] == "application/json"
    assert body == b'{"error":"upstream_timeout","route":"api"}'
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1
    assert sc.breaker("api").consecutive_failures == 1
    await eventually(lambda: upstream.cancelled == 1)  # the upstream connection was let go


async def test_a_connect_that_never_completes_is_504_a_timeout_failure(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    # A listening socket with a full accept queue: Linux drops further SYNs, so a
    # connect neither succeeds nor fails, as to a black-holed address.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue
            text = routes(f"http://127.0.0.1:{port}").replace("connect: 1s", "connect: 100ms")
            sc = await start_sidecar(text, fake_timers=True)
            answer = asyncio.ensure_future(get(http, f"{sc.proxy}/api/x"))
            await eventually(lambda: sc.clock.set_for(0.1))  # the connect's timer is set
            sc.clock.advance(0.099)
            assert sc.clock.set_for(0.001)  # not yet due
            sc.clock.advance(0.001)  # the connect timeout (the request's is 2 s)
            status, _, body = await asyncio.wait_for(answer, 5)
    assert status == 504
    assert body == b'{"error":"upstream_timeout","route":"api"}'
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 0


# -- upstream breaks off after its response headers -----------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
async def test_break_mid_body_aborts_the_client_and_counts_reset(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession, chunked: bool
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    url = f"{sc.proxy}/api/break" + ("?chunked=1" if chunked else "")
    async with http.get(url) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="reset") == 1
    assert sc.breaker("api").consecutive_failures == 1
    assert sc.sample("sidecar_requests_total", route="api", code="200") == 1


# -- no route matches --------------------------------------------------------------------------


async def test_no_route_is_404_and_never_reaches_an_upstream(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    for path in ("/", "/apix", "/other/api"):
        status, headers, body = await get(http, f"{sc.proxy}{path}")
        assert (status, body) == (404, b'{"error":"no_route"}')
        assert headers["Content-Type"] == "application/json"
    assert upstream.hits == 0
    assert sc.sample("sidecar_unrouted_requests_total") == 3


async def test_absolute_form_requests_are_routed_by_path_never_to_their_host(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    host, port = sc.proxy[len("http://") :].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET http://example.com/elsewhere HTTP/1.1\r\nHost: example.com\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 404")
    assert upstream.hits == 0


# -- client goes away before the upstream answered -----------------------------------------------


async def _disconnect_while_at_upstream(sc: Running, upstream: Upstream) -> None:
    host, port = sc.proxy[len("http://") :].rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/hang HTTP/1.1\r\nHost: svc\r\n\r\n")
    await writer.drain()
    await upstream.entered.wait()
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: upstream.cancelled == 1)


async def test_client_gone_frees_the_probe_slot_and_counts_nothing(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await trip(http, sc)
    sc.clock.advance(10)
    breaker = sc.breaker("api")
    await _disconnect_while_at_upstream(sc, upstream)
    await eventually(lambda: breaker.probes_in_flight == 0)
    assert breaker.state is State.HALF_OPEN
    assert breaker.consecutive_failures == 3
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0
    status, _, _ = await get(http, f"{sc.proxy}/api/ok")  # the slot is free for the next probe
    assert status == 200
    assert breaker.state is State.CLOSED


async def test_client_gone_while_closed_is_neither_success_nor_failure(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await get(http, f"{sc.proxy}/api/status/500")
    await _disconnect_while_at_upstream(sc, upstream)
    await eventually(lambda: sc.sample("sidecar_in_flight_requests", route="api") == 0)
    assert sc.breaker("api").consecutive_failures == 1
    failures = sum(
        sc.sample("sidecar_upstream_failures_total", route="api", kind=k) or 0
        for k in ("status", "connect", "timeout", "reset")
    )
    assert failures == 1


# -- an outcome only applies to the state it was admitted in -------------------------------------


async def test_slow_request_admitted_closed_does_not_extend_the_open_period(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url, open_duration="10s"))
    slow = asyncio.create_task(get(http, f"{sc.proxy}/api/hang?status=500"))
    await upstream.entered.wait()
    await trip(http, sc)
    sc.clock.advance(6)
    upstream.release.set()
    assert (await slow)[0] == 500
    _, headers, _ = await get(http, f"{sc.proxy}/api/x")
    assert headers["Retry-After"] == "4"
    assert (
        sc.sample(
            "sidecar_breaker_transitions_total", route="api", from_state="closed", to_state="open"
        )
        == 1
    )


# -- whose fault: the client's mistakes are never the upstream's failures -------------------------


async def test_a_probe_is_judged_by_its_answer_not_by_a_slow_reader(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await trip(http, sc)
    sc.clock.advance(10)
    async with http.get(f"{sc.proxy}/api/big/{64 << 20}") as probe:  # body left unread
        assert probe.status == 200
        assert sc.breaker("api").state is State.CLOSED
        status, _, _ = await get(http, f"{sc.proxy}/api/ok")
        assert status == 200


async def test_a_slow_upload_is_not_an_upstream_timeout(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        routes(upstream.url).replace("request: 2s", "request: 200ms"), fake_timers=True
    )

    async def trickle() -> Any:
        for sent in range(100, 600, 100):  # 0.75 s in all, far more than the request timeout
            yield b"x" * 100
            await eventually(lambda sent=sent: upstream.uploaded == sent)  # passed on
            sc.clock.advance(0.15)  # ... and the next 100 bytes come within the timeout

    async with http.post(f"{sc.proxy}/api/upload", data=trickle()) as response:
        assert response.status == 200
        assert (await response.json())["received"] == 500
    assert sc.breaker("api").consecutive_failures == 0


async def test_a_client_that_stops_sending_its_body_gets_408_and_counts_nothing(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(
        routes(upstream.url).replace("request: 2s", "request: 100ms"), fake_timers=True
    )
    reader, writer = await connect(sc.proxy)
    writer.write(b"POST /api/upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\nonly-this")
    await writer.drain()
    await eventually(lambda: upstream.uploaded == 9)  # passed on; the rest never comes
    sc.clock.advance(0.099)
    assert in_flight(sc) == 1
    sc.clock.advance(0.001)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert body == b'{"error":"client_timeout","route":"api"}'
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_requests_total", route="api", code="408") == 1


async def test_absolute_form_is_forwarded_by_its_path(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(
        f"routes:\n  - {{name: all, match: {{path_prefix: /}}, upstream: '{upstream.url}/base'}}\n"
    )
    data = await raw_exchange(
        sc.proxy,
        b"GET http://evil.example/x?q=1 HTTP/1.1\r\n"
        b"Host: evil.example\r\nConnection: close\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 200")
    assert upstream.requests[-1]["path"] == "/base/x?q=1"


async def test_absolute_form_forwards_the_host_it_names_as_x_forwarded_host(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """The target's authority picked the route, so it is the host the upstream is told of."""
    sc = await start_sidecar(
        f"routes:\n  - {{name: all, match: {{path_prefix: /}}, upstream: '{upstream.url}'}}\n"
    )
    await raw_exchange(
        sc.proxy,
        b"GET http://api.example:8080/x HTTP/1.1\r\n"
        b"Host: other.example\r\nConnection: close\r\n\r\n",
    )
    headers = {k.lower(): v for k, v in upstream.requests[-1]["headers"]}  # type: ignore[attr-defined]
    assert headers["x-forwarded-host"] == "api.example:8080"


async def test_every_connection_header_and_the_whole_proxy_family_are_dropped(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await raw_exchange(
        sc.proxy,
        b"GET /api/x HTTP/1.1\r\nHost: svc\r\n"
        b"Connection: keep-alive\r\nConnection: X-Second, close\r\nX-Second: secret\r\n"
        b"Proxy-Foo: 1\r\nProxy: 2\r\n"
        b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n",
    )
    headers = {k.lower(): v for k, v in upstream.requests[-1]["headers"]}  # type: ignore[union-attr]
    assert "x-second" not in headers
    assert "proxy-foo" not in headers and "proxy" not in headers
    assert headers["x-forwarded-for"] == "1.1.1.1, 2.2.2.2, 127.0.0.1"


async def test_a_clients_own_x_forwarded_host_is_not_passed_on(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await raw_exchange(sc.proxy, b"GET /api/x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n")
    headers = {k.lower(): v for k, v in upstream.requests[-1]["headers"]}  # type: ignore[union-attr]
    assert "x-forwarded-host" not in headers


async def test_no_content_type_is_invented_for_a_request(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await raw_exchange(
        sc.proxy,
        b"POST /api/x HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    headers = {k.lower(): v for k, v in upstream.requests[-1]["headers"]}  # type: ignore[union-attr]
    assert "content-type" not in headers
    assert upstream.requests[-1]["body"] == "hi"


async def test_a_body_ending_with_the_connection_that_is_reset_aborts_the_client(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"p" * 5000)
        await writer.drain()
        await asyncio.sleep(0.05)  # let the first bytes reach the sidecar before the reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()

    sc = await start_sidecar(routes(await raw_upstream(handler)))
    async with http.get(f"{sc.proxy}/api/x") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="reset") == 1


async def test_an_unsolicited_101_is_a_502(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: nonsense\r\n\r\n")
        await writer.drain()
        writer.close()

    sc = await start_sidecar(routes(await raw_upstream(handler)))
    status, _, body = await get(http, f"{sc.proxy}/api/x")
    assert (status, body) == (502, b'{"error":"upstream_unreachable","route":"api"}')


async def test_expect_100_continue_is_refused_at_once_while_open(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    await trip(http, sc)
    data = await raw_exchange(
        sc.proxy,
        b"PUT /api/upload HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 503")  # never "100 Continue" first
    assert data.endswith(b'{"error":"circuit_open","route":"api","retry_after":10}')
    assert sc.sample("sidecar_rejected_requests_total", route="api", reason="circuit_open") == 1


async def test_expect_100_continue_while_closed_forwards_the_body(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(routes(upstream.url))
    host, port = sc.proxy[len("http://") :].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PUT /api/upload HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"received": 5' in data


def test_error_bodies_are_valid_json() -> None:
    import json

    from sidecar.responses import error_answer

    for status, error, route, retry_after in (
        (404, "no_route", None, None),
        (502, "upstream_unreachable", "r-1_x", None),
        (503, "circuit_open", "r", 17),
    ):
        _, _, lines, body = error_answer(status, error, route, retry_after)
        assert isinstance(json.loads(body), dict)
        assert b"Content-Length: %d\r\n" % len(body) in lines
    assert b"Retry-After: 17\r\n" in error_answer(503, "circuit_open", "r", 17)[2]


async def test_a_stalled_response_body_times_out_and_aborts_the_client(
    start_sidecar: StartSidecar, raw_upstream: Any, http: aiohttp.ClientSession
) -> None:
    stop = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"d" * 10)
        await writer.drain()
        await stop.wait()  # ... and nothing more
        writer.close()

    sc = await start_sidecar(
        routes(await raw_upstream(handler)).replace("request: 2s", "request: 100ms"),
        fake_timers=True,
    )
    try:
        async with http.get(f"{sc.proxy}/api/x") as response:
            assert response.status == 200
            assert await asyncio.wait_for(response.content.readexactly(10), 5) == b"d" * 10
            sc.clock.advance(0.099)
            assert in_flight(sc) == 1
            sc.clock.advance(0.001)  # 100 ms since the last bytes
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.read(), 5)
    finally:
        stop.set()
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1
    assert sc.breaker("api").consecutive_failures == 1


async def test_a_slow_reader_is_not_an_upstream_timeout(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        routes(upstream.url).replace("request: 2s", "request: 100ms"), fake_timers=True
    )
    size = 32 << 20  # far more than the socket buffers: the sidecar must wait on the client
    received = 0
    async with http.get(f"{sc.proxy}/api/big/{size}") as response:
        conn = await sc.client_connection()
        received += len(await response.content.readany())
        await eventually(lambda: conn.writing_paused)  # the client's buffers are full
        sc.clock.advance(0.4)  # the client dawdles, well past the request timeout
        assert in_flight(sc) == 1
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == size
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 0


async def _early_answer_then_stall(
    start_sidecar: StartSidecar, raw_upstream: Any, client_sends: bytes, trickle: bool
) -> tuple[Running, int]:
    """The upstream answers at once, sends 10 of 1000 bytes and waits for the rest of the
    upload (reading what comes of it); the client's trickle, if any, is a chunk each 50 ms."""
    uploaded = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"e" * 10)
        await writer.drain()
        while data := await reader.read(65536):  # until the sidecar lets go
            uploaded.extend(data)
        writer.close()

    sc = await start_sidecar(
        routes(await raw_upstream(handler)).replace("request: 2s", "request: 200ms"),
        fake_timers=True,
    )
    reader, writer = await connect(sc.proxy)
    writer.write(b"POST /api/x HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(client_sends)
    sent = len(client_sends)  # upstream bytes: the sidecar frames a chunk as the client did
    trickled = 0
    answer = b""
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        answer += await asyncio.wait_for(reader.readexactly(10), 5)
        await eventually(lambda: len(uploaded) == sent)
        if trickle:
            # 2 s of trickle must not hide the stall: the answer's time runs from its last
            # bytes, whatever the client sends.
            while in_flight(sc) == 1 and trickled < 40:
                writer.write(b"1\r\nx\r\n")
                trickled += 1
                sent += 6
                await eventually(lambda sent=sent: len(uploaded) == sent)
                sc.clock.advance(0.05)
        else:
            sc.clock.advance(0.199)
            assert in_flight(sc) == 1
            sc.clock.advance(0.001)
        answer += await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")  # then aborted, never whole:
    assert len(answer.partition(b"\r\n\r\n")[2]) < 1000
    await eventually(lambda: in_flight(sc) == 0)
    return sc, trickled


async def test_a_stalled_body_is_found_even_while_the_client_trickles_its_upload(
    start_sidecar: StartSidecar, raw_upstream: Any
) -> None:
    sc, trickled = await _early_answer_then_stall(
        start_sidecar, raw_upstream, b"1\r\nx\r\n", trickle=True
    )
    assert trickled == 4  # < 40: found 200 ms after the answer, while the client uploads
    # ... and not charged to the upstream, which may be waiting for the rest of the upload.
    assert sc.breaker("api").consecutive_failures == 0


async def test_a_client_that_stalls_its_upload_after_an_early_answer_counts_nothing(
    start_sidecar: StartSidecar, raw_upstream: Any
) -> None:
    sc, _ = await _early_answer_then_stall(
        start_sidecar, raw_upstream, b"a\r\n0123456789\r\n", trickle=False
    )
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 0
