"""WebSocket pass-through on the proxy listener (CONTRACT.md, "Protocols").

A request with `Upgrade: websocket` goes to the route's upstream with its upgrade
headers; the upstream's 101 comes back with its `Sec-WebSocket-*` headers, and from
then on the bytes flow both ways untouched until either side closes. The handshake
alone is the breaker's outcome (101 a success, a failure status, a refused connect or
a timeout a failure); the session is no request duration, holds a place under
`max_websocket_sessions`, and ends at `timeouts.websocket_idle` of silence or at the
end of `shutdown_grace`. Other `Upgrade` tokens are hop-by-hop and dropped.

The upstreams are real in-process servers: aiohttp's `web.WebSocketResponse` and the
`websockets` package's server; the clients aiohttp's and the `websockets` package's,
or raw bytes where a library would hide what the test pins.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve

from sidecar.breaker import State
from tests.conftest import (
    RawHandler,
    Running,
    StartSidecar,
    Upstream,
    api_route,
    api_sample,
    connect,
    eventually,
    json_answer,
    parse_head,
    read_one,
)

MiB = 1 << 20
CHUNK = bytes(range(256)) * 4096
"""1 MiB; `numbered(i)` is it with its first four bytes the message's number."""

ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
"""What an aiohttp client's `receive` gives once its session is over, however it ended."""

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""RFC 6455's sample key and the `Sec-WebSocket-Accept` that answers it."""


def numbered(i: int) -> bytes:
    return i.to_bytes(4, "big") + CHUNK[4:]


# -- an aiohttp WebSocket upstream ------------------------------------------------------


@dataclass
class WsUpstream:
    """An aiohttp server whose sessions the tests script by path (see `ws_app`)."""

    url: str = ""
    hits: int = 0
    """Requests that reached it, upgrades or not."""
    handshakes: list[dict[str, str]] = field(default_factory=list)
    """Each upgrade request's headers, as they arrived."""
    open: int = 0
    """Sessions open now."""
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    closes: list[int | None] = field(default_factory=list)
    """Each ended session's close code, as aiohttp saw it (the peer's, or its own)."""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    """`/hold` reads nothing until it is set."""
    sent: int = 0
    """Messages `/flood` has sent so far."""
    received: list[str] = field(default_factory=list)
    """Text messages `/sink` took (it answers none)."""
    ticks: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    """What `/tick` is to send to the client, as the test puts it here."""


def ws_app(state: WsUpstream) -> web.Application:
    async def echo(ws: web.WebSocketResponse, request: web.Request) -> None:
        """Echoes text and binary messages; `close-4000` closes with 4000 "bye", `abort`
        resets the connection."""
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                if msg.data == "close-4000":
                    await ws.close(code=4000, message=b"bye")
                    return
                if msg.data == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    return
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:
                return

    async def ping_first(ws: web.WebSocketResponse, _request: web.Request) -> None:
        """Pings the client, then tells it which pong came back (autoping is off here)."""
        await ws.ping(b"from-upstream")
        msg = await ws.receive()
        await ws.send_str(f"{msg.type.name}:{msg.data.decode()}")
        await ws.receive()  # until the client closes

    async def hold(ws: web.WebSocketResponse, _request: web.Request) -> None:
        """Reads nothing until `release`; then checks numbered 1 MiB messages arrive
        whole and in order, and answers `done` with what it got."""
        await state.release.wait()
        count = size = 0
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                assert msg.data == numbered(count), f"message {count} garbled or out of order"
                count += 1
                size += len(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(f"{count} messages in order, {size} bytes")
            else:
                return

    async def flood(ws: web.WebSocketResponse, _request: web.Request) -> None:
        """Sends 64 numbered 1 MiB messages as fast as they are taken, then `end`."""
        for i in range(64):
            await ws.send_bytes(numbered(i))
            state.sent += 1
        await ws.send_str("end")
        await ws.receive()

    async def sink(ws: web.WebSocketResponse, _request: web.Request) -> None:
        """Takes text messages, answers none: traffic one way, up."""
        while (msg := await ws.receive()).type is WSMsgType.TEXT:
            state.received.append(msg.data)

    async def tick(ws: web.WebSocketResponse, _request: web.Request) -> None:
        """Sends what the test puts in `ticks` until the client closes: traffic one way,
        down."""
        closing = asyncio.ensure_future(ws.receive())
        while True:
            getting = asyncio.ensure_future(state.ticks.get())
            await asyncio.wait({closing, getting}, return_when=asyncio.FIRST_COMPLETED)
            if closing.done():
                getting.cancel()
                return
            await ws.send_str(getting.result())

    behaviours = {
        "/ping-first": ping_first,
        "/hold": hold,
        "/flood": flood,
        "/sink": sink,
        "/tick": tick,
    }

    async def session(request: web.Request) -> web.StreamResponse:
        state.hits += 1
        state.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse(
            max_msg_size=0, autoping=request.path != "/ping-first", protocols=("chat.v1",)
        )
        await ws.prepare(request)
        state.open += 1
        state.opened.set()
        try:
            await behaviours.get(request.path, echo)(ws, request)
        finally:
            state.open -= 1
            state.closes.append(ws.close_code)
        return ws

    async def reject(_request: web.Request) -> web.Response:
        """A plain answer to an upgrade request."""
        state.hits += 1
        return web.Response(status=500, text="no websocket here")

    async def plain(request: web.Request) -> web.Response:
        state.hits += 1
        return web.json_response({"upgrade": request.headers.get("Upgrade")})

    app = web.Application()
    app.router.add_route("*", "/reject", reject)
    app.router.add_route("*", "/plain", plain)
    app.router.add_get("/{path:.*}", session)
    return app


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    state = WsUpstream()
    server = TestServer(ws_app(state), host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    state.release.set()
    await server.close()


# -- a `websockets` package upstream ----------------------------------------------------


@dataclass
class WsServer:
    url: str
    closes: list[int | None]
    """Each ended session's close code (`websockets` saw it)."""


@pytest.fixture
async def ws_server() -> AsyncIterator[WsServer]:
    """A `websockets` server: echoes; `close-4000` closes with 4000 "bye"."""
    closes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if message == "close-4000":
                    await ws.close(4000, "bye")
                    break
                await ws.send(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            closes.append(ws.close_code)

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield WsServer(f"http://127.0.0.1:{port}", closes)


# -- helpers ----------------------------------------------------------------------------


def route(upstream: str, more: str = "", breaker: str = "{failure_threshold: 5}") -> str:
    return api_route(upstream, breaker, more)


def sessions(sc: Running) -> float | None:
    return api_sample(sc, "sidecar_websocket_sessions")


def ws_url(sc: Running, path: str) -> str:
    return "ws://" + sc.proxy.removeprefix("http://") + path


def upgrade_request(
    path: str = "/echo", upgrade: str = "websocket", connection: str = "Upgrade"
) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: app.test\r\nUpgrade: {upgrade}\r\n"
        f"Connection: {connection}\r\nSec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\nOrigin: http://app.test\r\n\r\n"
    ).encode()


async def refused(sc: Running, path: str = "/echo") -> tuple[int, dict[str, str], object]:
    """An upgrade request answered with anything but 101: status, headers, JSON body."""
    return await json_answer(sc.proxy, upgrade_request(path))


async def echoes(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(text)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert (msg.type, msg.data) == (WSMsgType.TEXT, text)


async def ended(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The session is over for the client (a close frame, or the connection gone)."""
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type in ENDED, msg


async def settled(progress: Callable[[], int], quiet: float = 0.3, within: float = 10.0) -> int:
    """`progress()` once it stopped moving for `quiet` seconds.

    A flow held back by a reader that takes nothing stalls after the socket buffers on
    the way are full; one that something buffers without bound runs to its end. (A
    stall is seen by nothing moving: with the shutdown grace, the only real time this
    file waits for.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = progress(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.02)
        now = progress()
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= quiet:
            break
    return last


# -- pass-through: aiohttp on both sides ------------------------------------------------


async def test_text_and_binary_messages_pass_both_ways_and_the_gauge_counts_the_session(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """Text (non-ASCII too) and binary messages are echoed through the sidecar, and
    `sidecar_websocket_sessions` is 1 for the open session, 0 once it closed."""
    sc = await start_sidecar(route(ws_upstream.url))
    assert sessions(sc) == 0
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        await echoes(ws, "hello, wörld ✓")
        await ws.send_bytes(b"\x00\x01binary\xff")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01binary\xff")
        await echoes(ws, "")
    await eventually(lambda: sessions(sc) == 0)
    await eventually(lambda: ws_upstream.open == 0)


async def test_a_16_mib_message_passes_whole_both_ways(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """One 16 MiB binary message goes up and comes back byte for byte."""
    sc = await start_sidecar(route(ws_upstream.url))
    payload = os.urandom(16 * MiB)
    async with http.ws_connect(sc.proxy + "/echo", max_msg_size=0) as ws:
        await ws.send_bytes(payload)
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.type is WSMsgType.BINARY
        assert len(msg.data) == len(payload)
        assert msg.data == payload


async def test_pings_and_pongs_pass_both_ways(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """Control frames are relayed too: the client's explicit ping comes back as the
    upstream's pong (aiohttp answers it), and the upstream's ping is answered by the
    client's autoping, whose pong the upstream sees with its payload."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/echo", autoping=False) as ws:
        await ws.ping(b"from-client")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"from-client")
    async with http.ws_connect(sc.proxy + "/ping-first") as ws:  # autoping on
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "PONG:from-upstream")


async def test_close_codes_pass_both_ways(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """The upstream's close (4000 "bye") reaches the client as sent; the client's close
    (1001) reaches the upstream."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await ws.send_str("close-4000")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4000, "bye")
    assert ws.close_code == 4000
    await eventually(lambda: len(ws_upstream.closes) == 1)  # (with the client's answer: 1000)

    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await echoes(ws, "before closing")
        await ws.close(code=1001, message=b"going away")
    await eventually(lambda: ws_upstream.closes[1:] == [1001])
    await eventually(lambda: sessions(sc) == 0)


async def test_the_handshake_passes_with_its_upgrade_headers_and_the_bytes_are_untouched(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream
) -> None:
    """On the wire: a browser's handshake (`Upgrade: WebSocket`, `Connection: keep-alive,
    Upgrade`) reaches the upstream with its upgrade headers, key and Origin; the 101
    comes back with `Upgrade: websocket`, `Connection: Upgrade` and the upstream's
    `Sec-WebSocket-Accept`; then a masked frame goes up and the echo frame comes back
    byte for byte."""
    sc = await start_sidecar(route(ws_upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(upgrade_request(upgrade="WebSocket", connection="keep-alive, Upgrade"))
        status, headers = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        assert "upgrade" in headers["connection"].lower()
        assert headers["sec-websocket-accept"] == ACCEPT
        assert "content-length" not in headers and "transfer-encoding" not in headers

        [seen] = ws_upstream.handshakes
        assert seen["Upgrade"].lower() == "websocket"
        assert "upgrade" in seen["Connection"].lower()
        assert (seen["Sec-WebSocket-Key"], seen["Sec-WebSocket-Version"]) == (KEY, "13")
        assert seen["Origin"] == "http://app.test"

        mask = b"\x37\xfa\x21\x3d"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(b"Hello"))
        writer.write(b"\x81\x85" + mask + masked)  # FIN, text, masked, 5 bytes
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"\x81\x05Hello"
    finally:
        writer.close()


# -- pass-through with the `websockets` package on one side -----------------------------


async def test_a_websockets_client_through_the_sidecar_to_an_aiohttp_upstream(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream
) -> None:
    """The `websockets` client negotiates its subprotocol and permessage-deflate with
    the upstream through the sidecar (the `Sec-WebSocket-Protocol` and `-Extensions`
    answers come back), exchanges text, binary and a ping, and its 1001 close reaches
    the upstream; the upstream's 4000 "bye" reaches it."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with ws_connect(
        ws_url(sc, "/echo"), proxy=None, max_size=None, subprotocols=["chat.v2", "chat.v1"]
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        await ws.send("text ✓")
        assert await asyncio.wait_for(ws.recv(), 5) == "text ✓"
        await ws.send(CHUNK)
        assert await asyncio.wait_for(ws.recv(), 5) == CHUNK
        await asyncio.wait_for(await ws.ping(b"ws-ping"), 5)
        await ws.close(1001, "going away")
    await eventually(lambda: ws_upstream.closes == [1001])

    async with ws_connect(ws_url(sc, "/echo"), proxy=None) as ws:
        await ws.send("close-4000")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
    await eventually(lambda: sessions(sc) == 0)


async def test_an_aiohttp_client_through_the_sidecar_to_a_websockets_server(
    start_sidecar: StartSidecar, ws_server: WsServer, http: aiohttp.ClientSession
) -> None:
    """Against the `websockets` server: echo of text and binary, a ping answered by
    its pong, its 4000 "bye" close to the client, the client's 1001 to it."""
    sc = await start_sidecar(route(ws_server.url))
    async with http.ws_connect(sc.proxy + "/", autoping=False, max_msg_size=0) as ws:
        await echoes(ws, "to websockets")
        await ws.send_bytes(CHUNK)
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, CHUNK)
        await ws.ping(b"aiohttp-ping")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"aiohttp-ping")
        await ws.close(code=1001, message=b"going away")
    await eventually(lambda: ws_server.closes == [1001])

    async with http.ws_connect(sc.proxy + "/") as ws:
        await ws.send_str("close-4000")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4000, "bye")
    await eventually(lambda: len(ws_server.closes) == 2)
    await eventually(lambda: sessions(sc) == 0)


# -- the handshake is the breaker's outcome ---------------------------------------------


async def test_a_101_is_a_success_and_a_failure_status_answering_the_upgrade_a_failure(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """An upstream answering the upgrade with a plain 500 is relayed (the client's
    handshake fails with that status) and counts as a `status` failure; a 101 then is
    a success, which resets the consecutive failures."""
    sc = await start_sidecar(route(ws_upstream.url, breaker="{failure_threshold: 2}"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await http.ws_connect(sc.proxy + "/reject")
    assert failed.value.status == 500
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="status") == 1
    assert sc.breaker("api").consecutive_failures == 1

    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await echoes(ws, "ok")
        assert sc.breaker("api").consecutive_failures == 0
        assert sc.breaker("api").state is State.CLOSED
    assert api_sample(sc, "sidecar_requests_total", code="500") == 1
    assert api_sample(sc, "sidecar_requests_total", code="101") == 1
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="status") == 1


async def test_an_upstream_that_refuses_the_connection_is_a_502_and_a_connect_failure(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, closed_port: int
) -> None:
    """Nothing listening upstream: the handshake gets 502 `upstream_unreachable`, a
    `connect` failure each time."""
    sc = await start_sidecar(route(f"http://127.0.0.1:{closed_port}"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await http.ws_connect(sc.proxy + "/echo")
    assert failed.value.status == 502
    status, _, body = await refused(sc)
    assert (status, body) == (502, {"error": "upstream_unreachable", "route": "api"})
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="connect") == 2
    assert sessions(sc) == 0


async def test_an_upstream_that_never_answers_the_handshake_is_a_504_and_a_timeout(
    start_sidecar: StartSidecar, raw_upstream: Callable[[RawHandler], Awaitable[str]]
) -> None:
    """The handshake runs under `timeouts.request`: no answer in time is 504
    `upstream_timeout`, a `timeout` failure."""
    heads: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # until the sidecar gives up on it
        writer.close()

    url = await raw_upstream(silent)
    sc = await start_sidecar(route(url, "    timeouts: {request: 5s}\n"), fake_timers=True)
    answer = asyncio.create_task(refused(sc))
    await eventually(lambda: len(heads) == 1)
    assert b"upgrade: websocket" in heads[0].lower()
    sc.clock.advance(5)
    status, _, body = await answer
    assert (status, body) == (504, {"error": "upstream_timeout", "route": "api"})
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="timeout") == 1


async def test_a_forced_open_route_answers_the_upgrade_503_and_the_upstream_sees_nothing(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`POST /breakers/api {"state": "forced_open"}`: the upgrade is answered 503
    `circuit_forced_open` with a Retry-After, before anything is upgraded or sent on."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.post(sc.admin + "/breakers/api", json={"state": "forced_open"}) as response:
        assert response.status == 200
    status, headers, body = await refused(sc)
    assert (status, body["error"]) == (503, "circuit_forced_open")  # type: ignore[index]
    assert int(headers["retry-after"]) >= 1
    assert "upgrade" not in headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await http.ws_connect(sc.proxy + "/echo")
    assert failed.value.status == 503
    assert ws_upstream.hits == 0
    assert sessions(sc) == 0


async def test_an_open_route_answers_the_upgrade_503_circuit_open(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """With `failure_threshold: 1`, one failed handshake opens the route; the next
    upgrade is answered 503 `circuit_open` and never reaches the upstream."""
    sc = await start_sidecar(
        route(ws_upstream.url, breaker="{failure_threshold: 1, open_duration: 30s}")
    )
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(sc.proxy + "/reject")
    assert sc.breaker("api").state is State.OPEN
    status, headers, body = await refused(sc)
    assert (status, headers["retry-after"]) == (503, "30")
    assert body == {"error": "circuit_open", "route": "api", "retry_after": 30}
    assert ws_upstream.hits == 1
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="circuit_open") == 1


async def test_a_handshake_holds_a_bulkhead_slot_only_until_its_101(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`bulkhead: {max_concurrent: 1}`: two sessions open at once, and a plain request
    beside them, each admitted: a session keeps no slot after its handshake."""
    sc = await start_sidecar(route(ws_upstream.url, "    bulkhead: {max_concurrent: 1}\n"))
    async with (
        http.ws_connect(sc.proxy + "/echo") as first,
        http.ws_connect(sc.proxy + "/echo") as second,
    ):
        await echoes(first, "one")
        await echoes(second, "two")
        async with http.get(sc.proxy + "/plain") as response:
            assert response.status == 200
            assert await response.json() == {"upgrade": None}
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="bulkhead_full") == 0


# -- sessions are not request durations -------------------------------------------------


async def test_a_long_session_is_one_handshake_duration_and_never_a_slow_call(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """A session with 50 messages, open while the clock moves 90 s (past
    `slow_call_duration: 1s` and past the request timeout), stays open and counts one
    duration (its handshake's), no slow call and no failure: the route stays CLOSED
    though any slow call would open it."""
    sc = await start_sidecar(
        route(
            ws_upstream.url,
            breaker="{failure_threshold: 1, window: {requests: 10, min_requests: 1}, "
            "slow_call_duration: 1s, slow_call_rate: 50%}",
        ),
        fake_timers=True,
    )
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        for step in range(3):
            for i in range(50 // 3 + 1):
                await echoes(ws, f"message {step}.{i}")
            sc.clock.advance(30)
        await echoes(ws, "still open after 90 s")
    await eventually(lambda: sessions(sc) == 0)
    assert api_sample(sc, "sidecar_upstream_request_duration_seconds_count") == 1
    assert api_sample(sc, "sidecar_upstream_slow_calls_total") == 0
    for kind in ("status", "connect", "timeout", "reset"):
        assert api_sample(sc, "sidecar_upstream_failures_total", kind=kind) == 0, kind
    assert sc.breaker("api").state is State.CLOSED


# -- max_websocket_sessions -------------------------------------------------------------


async def test_sessions_beyond_max_websocket_sessions_get_503_until_one_closes(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`max_websocket_sessions: 2`: a third concurrent upgrade is answered 503
    `websocket_sessions_full` with `Retry-After: 1`, counted as a rejection, without
    reaching the upstream; once one session closes, a new one is admitted."""
    sc = await start_sidecar(route(ws_upstream.url, "    max_websocket_sessions: 2\n"))
    first = await http.ws_connect(sc.proxy + "/echo")
    async with http.ws_connect(sc.proxy + "/echo") as second:
        await eventually(lambda: sessions(sc) == 2)
        status, headers, body = await refused(sc)
        assert (status, headers["retry-after"]) == (503, "1")
        assert headers["content-type"].startswith("application/json")
        assert body == {"error": "websocket_sessions_full", "route": "api", "retry_after": 1}
        assert ws_upstream.hits == 2
        assert (
            api_sample(sc, "sidecar_rejected_requests_total", reason="websocket_sessions_full") == 1
        )
        assert sc.breaker("api").consecutive_failures == 0  # a rejection is no outcome

        await first.close()
        await eventually(lambda: sessions(sc) == 1)
        async with http.ws_connect(sc.proxy + "/echo") as third:
            await echoes(third, "admitted")
            await echoes(second, "still here")
            assert sessions(sc) == 2
    await eventually(lambda: sessions(sc) == 0)


# -- timeouts.websocket_idle ------------------------------------------------------------


async def test_a_silent_session_is_closed_after_websocket_idle(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`timeouts: {websocket_idle: 30s}`: a session silent both ways for 30 s is closed,
    for the client and for the upstream."""
    sc = await start_sidecar(
        route(ws_upstream.url, "    timeouts: {websocket_idle: 30s}\n"), fake_timers=True
    )
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        sc.clock.advance(31)
        await ended(ws)
    await eventually(lambda: sessions(sc) == 0)
    await eventually(lambda: ws_upstream.open == 0)


async def test_traffic_moves_the_websocket_idle_deadline(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """A message at 20 s keeps the session open past the first 30 s deadline; 30 s of
    silence after the last message closes it."""
    sc = await start_sidecar(
        route(ws_upstream.url, "    timeouts: {websocket_idle: 30s}\n"), fake_timers=True
    )
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        sc.clock.advance(20)
        await echoes(ws, "at 20 s")
        sc.clock.advance(20)  # 40 s in, 20 s silent
        await echoes(ws, "at 40 s")
        sc.clock.advance(29)
        await echoes(ws, "at 69 s")
        sc.clock.advance(31)
        await ended(ws)
    await eventually(lambda: sessions(sc) == 0)


@pytest.mark.parametrize("way", ["up", "down"])
async def test_traffic_one_way_moves_the_websocket_idle_deadline_too(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession, way: str
) -> None:
    """Silent "both ways": messages only from the client (`up`, to an upstream that
    never answers) or only from the upstream (`down`, to a client that sends nothing)
    keep the session open past the first deadline just as well."""
    sc = await start_sidecar(
        route(ws_upstream.url, "    timeouts: {websocket_idle: 30s}\n"), fake_timers=True
    )
    async with http.ws_connect(sc.proxy + ("/sink" if way == "up" else "/tick")) as ws:

        async def one_way(text: str) -> None:
            if way == "up":
                await ws.send_str(text)
                await eventually(lambda: ws_upstream.received[-1:] == [text])
            else:
                ws_upstream.ticks.put_nowait(text)
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert (msg.type, msg.data) == (WSMsgType.TEXT, text)

        await eventually(lambda: sessions(sc) == 1)
        sc.clock.advance(20)
        await one_way("at 20 s")
        sc.clock.advance(20)  # 40 s in: past the first deadline
        await one_way("at 40 s")
        sc.clock.advance(31)
        await ended(ws)
    await eventually(lambda: sessions(sc) == 0)


# -- either side going away -------------------------------------------------------------


async def test_an_upstream_reset_ends_the_clients_session(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """The upstream aborts its connection mid-session: the client's session ends
    (close or error, not a hang) and the gauge is back to 0."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await echoes(ws, "before")
        await ws.send_str("abort")
        await ended(ws)
    await eventually(lambda: sessions(sc) == 0)


async def test_a_client_reset_ends_the_upstreams_session(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream
) -> None:
    """The client aborts its connection mid-session: the upstream's session ends too,
    and the gauge is back to 0."""
    sc = await start_sidecar(route(ws_upstream.url))
    reader, writer = await connect(sc.proxy)
    writer.write(upgrade_request())
    status, _ = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
    assert status == 101
    await eventually(lambda: ws_upstream.open == 1 and sessions(sc) == 1)
    writer.transport.abort()
    await eventually(lambda: ws_upstream.open == 0)
    await eventually(lambda: sessions(sc) == 0)


# -- back-pressure ----------------------------------------------------------------------


async def test_a_client_faster_than_the_upstream_is_held_back_and_nothing_is_lost(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """64 MiB in 1 MiB messages to an upstream that reads nothing for a while: the
    client's sending stalls with the socket buffers full (the sidecar keeps no copy of
    what the upstream does not take); once the upstream reads, all 64 arrive whole and
    in order."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/hold", max_msg_size=0) as ws:
        await asyncio.wait_for(ws_upstream.opened.wait(), 5)
        sent = 0

        async def send_all() -> None:
            nonlocal sent
            for i in range(64):
                await ws.send_bytes(numbered(i))
                sent += 1

        sender = asyncio.create_task(send_all())
        held = await settled(lambda: sent)
        assert not sender.done() and held < 48, f"{held} MiB left the client, none read"
        ws_upstream.release.set()
        await asyncio.wait_for(sender, 30)
        await ws.send_str("done")
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.data == f"64 messages in order, {64 * MiB} bytes"


async def test_an_upstream_faster_than_the_client_is_held_back_and_nothing_is_lost(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """The other way: the upstream sends 64 MiB to a client that reads nothing for a
    while. The sidecar's writes to the client wait (its transport's buffer stays a
    few MiB at most) and the upstream's sending stalls; then the client reads all 64
    messages whole and in order."""
    sc = await start_sidecar(route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/flood", max_msg_size=0) as ws:
        conn = await sc.client_connection()
        await eventually(lambda: conn.writing_paused)
        held = await settled(lambda: ws_upstream.sent)
        assert held < 48, f"the upstream got {held} MiB away, none read"
        assert conn.transport is not None
        buffered = conn.transport.get_write_buffer_size()
        assert buffered < 8 * MiB, f"{buffered / MiB:.1f} MiB waiting in the sidecar"
        for i in range(64):
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert (msg.type, msg.data[:4]) == (WSMsgType.BINARY, numbered(i)[:4])
            assert msg.data == numbered(i)
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "end")


# -- many at once -----------------------------------------------------------------------


async def test_a_thousand_concurrent_sessions(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream
) -> None:
    """1,000 sessions open at once (the default `max_websocket_sessions` admits them
    all), each with its own echo; the gauge reaches 1000, then returns to 0."""
    count = 1000
    sc = await start_sidecar(route(ws_upstream.url))
    everyone = asyncio.Event()
    handshaking = asyncio.Semaphore(100)  # not a thousand connects in one backlog
    opened = 0

    async def one(client: aiohttp.ClientSession, i: int) -> None:
        nonlocal opened
        async with handshaking:
            ws = await client.ws_connect(sc.proxy + f"/echo/{i}")
        async with ws:
            await echoes(ws, f"session {i}")
            opened += 1
            await everyone.wait()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(count)]
        try:
            await eventually(lambda: opened == count or any(t.done() for t in tasks), 60)
            assert opened == count
            await eventually(lambda: sessions(sc) == count)
            assert ws_upstream.open == count
        finally:
            everyone.set()
            await asyncio.gather(*tasks)
    await eventually(lambda: sessions(sc) == 0, 30)
    await eventually(lambda: ws_upstream.open == 0, 30)


# -- shutdown ---------------------------------------------------------------------------


async def test_stop_gives_an_open_session_the_grace_then_closes_it(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`shutdown_grace: 1s` (real time): the session still works once the stop has
    begun, is closed at the end of the grace (for the client and the upstream), and
    the stop returns then."""
    sc = await start_sidecar("shutdown_grace: 1s\n" + route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.create_task(sc.sidecar.stop())
        await echoes(ws, "during the grace")
        await ended(ws)
        await asyncio.wait_for(stopping, 5)
        took = loop.time() - began
    assert 0.9 <= took < 2.0, took
    await eventually(lambda: ws_upstream.open == 0)


async def test_a_session_that_ends_within_the_grace_lets_stop_return_sooner(
    start_sidecar: StartSidecar, ws_upstream: WsUpstream, http: aiohttp.ClientSession
) -> None:
    """`shutdown_grace: 10s`: a session the client closes just after the stop began
    lets the stop return at once, not at the end of the grace."""
    sc = await start_sidecar("shutdown_grace: 10s\n" + route(ws_upstream.url))
    async with http.ws_connect(sc.proxy + "/echo") as ws:
        await eventually(lambda: sessions(sc) == 1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.create_task(sc.sidecar.stop())
        await echoes(ws, "last words")
        await ws.close()
    await asyncio.wait_for(stopping, 5)
    assert loop.time() - began < 3
    await eventually(lambda: ws_upstream.closes == [1000])


# -- other upgrades ---------------------------------------------------------------------


H2C_REQUEST = (
    b"GET /h2c HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


async def test_an_h2c_upgrade_is_forwarded_as_an_ordinary_request_without_it(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """`Upgrade: h2c` is no WebSocket: the request goes on as an ordinary one, with
    `Upgrade` and what `Connection` names (`HTTP2-Settings`) dropped, and its answer
    is an ordinary 200. After it the connection carries the next request as HTTP/1.1,
    or its answer said `Connection: close` and it closes: never an unannounced close."""
    sc = await start_sidecar(route(upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(H2C_REQUEST)
        head, _, body = (await read_one(reader)).partition(b"\r\n\r\n")
        status, headers = parse_head(head)
        assert status == 200
        assert "upgrade" not in headers
        seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
        assert "upgrade" not in seen
        assert "http2-settings" not in seen
        assert "upgrade" not in seen.get("connection", "").lower()
        assert upstream.hits == 1

        if headers.get("connection", "").lower() == "close":
            # Said so, then done (the parser that stopped at the Upgrade is not reused).
            assert await asyncio.wait_for(reader.read(), 5) == b""
        else:
            writer.write(b"GET /after HTTP/1.1\r\nHost: app.test\r\n\r\n")
            head, _, body = (await read_one(reader)).partition(b"\r\n\r\n")
            assert parse_head(head)[0] == 200
            assert json.loads(body)["path"] == "/after"
    finally:
        writer.close()
    assert sessions(sc) == 0
