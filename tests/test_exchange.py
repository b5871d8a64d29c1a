"""One exchange per admitted request: each way it can end, and the deadline it keeps.

The sidecar runs on a fake clock here (`fake_timers`): its request timeout,
write timeout and deadline ticker move only when the test says so, and no
test waits for time to pass. Most tests in the suite go through an exchange
already; these are the ends they do not reach: a pooled connection that fails,
a shutdown while an answer is awaited, a client that is behind, a bug on either
side of the send, and the timers themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from sidecar import exchange as exchange_module
from sidecar import proxy as proxy_module
from sidecar.breaker import State
from sidecar.listener import ClientConnection
from sidecar.timers import Ticker
from sidecar.upstream_pool import Connection, Disconnected
from tests.conftest import (
    RawHandler,
    Running,
    StartSidecar,
    Upstream,
    connect,
    eventually,
    read_one,
    read_request_head,
)
from tests.fakes import FakeClock

ROUTE = """
client_timeouts: {{write: 300ms}}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
    timeouts: {{request: 1s}}
"""

PROBING = "    breaker: {failure_threshold: 1, open_duration: 10s, jitter: 0%}\n"


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return await read_one(reader)


def settled(sc: Running) -> bool:
    return sc.sample("sidecar_in_flight_requests", route="api") == 0


class Numbered:
    """A raw upstream that numbers its connections and records each request line with the
    number of the connection it came on (`seen`). `answer(number, line)` says what to
    answer: bytes, or None to close the connection without answering."""

    def __init__(self, answer: Callable[[int, bytes], Awaitable[bytes | None]]) -> None:
        self.answer = answer
        self.seen: list[tuple[int, bytes]] = []
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                line = (await read_request_head(reader)).split(b"\r\n")[0]
                self.seen.append((number, line))
                reply = await self.answer(number, line)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# -- a pooled connection that fails ---------------------------------------------------------


async def test_a_pooled_connection_dropped_unanswered_is_retried_on_a_new_one(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],  # stopped after the sidecar
    start_sidecar: StartSidecar,
) -> None:
    """A GET is sent again, once, on a new connection (RFC 9112 9.3.1.1), even without a
    retry policy: a try like any other, the stale one a `connect` failure to the breaker."""

    async def answer(number: int, _line: bytes) -> bytes | None:
        if len(upstream.seen) == 2:
            return None  # the second request, on the pooled connection: never answered
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % number

    upstream = Numbered(answer)
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        first = await get(reader, writer, "/first")
        second = await get(reader, writer, "/second")
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n1")
    assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"\r\n\r\n2")
    assert upstream.seen == [
        (1, b"GET /first HTTP/1.1"),
        (1, b"GET /second HTTP/1.1"),
        (2, b"GET /second HTTP/1.1"),
    ]
    assert sc.breaker("api").consecutive_failures == 0  # the resend's success reset it
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 1
    assert sc.sample("sidecar_upstream_tries_total", route="api", result="failure") == 1
    assert sc.sample("sidecar_upstream_tries_total", route="api", result="success") == 2
    assert sc.sample("sidecar_retries_total", route="api", reason="connect") == 1
    assert settled(sc)


async def test_a_pooled_connection_that_cannot_take_the_request_is_left_for_a_new_one(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[Connection] = []
    request = Connection.request

    def flaky(self: Connection, *args: object) -> None:
        used.append(self)
        if len(used) == 1:
            raise Disconnected("the upstream closed the connection")
        request(self, *args)  # type: ignore[arg-type]

    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")
        monkeypatch.setattr(Connection, "request", flaky)
        answer = await get(reader, writer, "/again")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert len(used) == 2 and used[0] is not used[1] and used[0].closed
    await eventually(lambda: settled(sc))


async def test_a_pooled_connection_answering_an_unusable_status_is_a_502(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],  # stopped after the sidecar
    start_sidecar: StartSidecar,
) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok",
    ]

    async def answer(_number: int, _line: bytes) -> bytes:
        return answers[len(upstream.seen) - 1]

    upstream = Numbered(answer)
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        first = await get(reader, writer, "/first")
        second = await get(reader, writer, "/second")
    finally:
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 502 ")
    assert second.endswith(b'{"error":"upstream_unreachable","route":"api"}')
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 1


async def test_the_connection_of_a_slow_answer_is_pooled_after(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],  # stopped after the sidecar
    start_sidecar: StartSidecar,
) -> None:
    """An answer that outlives the ticker's tick (its deadline set for real) still ends with
    its connection back in the pool, once."""
    waiting = asyncio.Event()
    go_on = asyncio.Event()

    async def answer(_number: int, line: bytes) -> bytes:
        if line.startswith(b"GET /slow "):
            waiting.set()
            await go_on.wait()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    upstream = Numbered(answer)
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        assert (await get(reader, writer, "/warm")).endswith(b"ok")
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await waiting.wait()
        sc.clock.advance(Ticker.INTERVAL)  # the tick: its deadline gets a timer
        go_on.set()
        assert (await read_one(reader)).endswith(b"ok")
        assert (await get(reader, writer, "/after")).endswith(b"ok")
    finally:
        writer.close()
    assert upstream.seen == [
        (1, b"GET /warm HTTP/1.1"),
        (1, b"GET /slow HTTP/1.1"),
        (1, b"GET /after HTTP/1.1"),
    ]


async def test_an_answer_longer_than_a_read_is_relayed_whole(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")
        answer = await get(reader, writer, "/big/3000000")  # more than one read's worth
        again = await get(reader, writer, "/after")
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"x" * 3_000_000
    assert again.startswith(b"HTTP/1.1 200 ")


# -- shutdown, and clients that leave or fall behind ----------------------------------------


async def test_a_shutdown_waits_for_an_answer_in_flight(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")  # its upstream connection is pooled now
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        stopping = asyncio.ensure_future(sc.sidecar.stop())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not stopping.done()
        upstream.release.set()
        answer = await read_one(reader)
        await asyncio.wait_for(stopping, 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"hung": true}')
    assert b"Connection: close\r\n" in answer  # stopping: no further request on it
    assert sc.breaker("api").consecutive_failures == 0


async def test_a_probe_whose_client_leaves_at_once_gives_its_slot_back(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url) + PROBING, fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        failed = await get(reader, writer, "/status/500")  # opens the route; pooled
        assert failed.startswith(b"HTTP/1.1 500 ")
        sc.clock.advance(10)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")  # the probe ...
        await asyncio.wait_for(upstream.entered.wait(), 5)
    finally:
        writer.close()  # ... whose client leaves before any answer
    await eventually(lambda: upstream.cancelled == 1)  # its upstream connection closed
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.probes_in_flight) == (State.HALF_OPEN, 0)
    assert settled(sc)


async def test_a_client_behind_waits_its_turn_then_is_cut_off(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """The answer went out whole (a success), but the client has not taken it yet: its
    socket's buffer is full, as its transport says with `pause_writing`. The request it
    pipelined behind waits until it catches up, and a client that does not within the
    write timeout is cut off."""
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        one = await get(reader, writer, "/one")
        [conn] = sc.sidecar._listener.connections  # type: ignore[union-attr]
        assert isinstance(conn, ClientConnection)
        conn.pause_writing()  # what its transport says when the client is behind
        writer.write(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.05)  # (to show that nothing happens: not waiting for time)
        assert [r["path"] for r in upstream.requests] == ["/one"]  # /two waits its turn
        sc.clock.advance(0.299)
        await asyncio.sleep(0)
        assert conn.transport is not None and not conn.transport.is_closing()
        sc.clock.advance(0.001)  # the write timeout
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert one.startswith(b"HTTP/1.1 200 ")
    assert [r["path"] for r in upstream.requests] == ["/one"]
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_requests_total", route="api", code="200") == 1
    assert settled(sc)


async def test_a_client_that_catches_up_is_served_next(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/one")
        [conn] = sc.sidecar._listener.connections  # type: ignore[union-attr]
        conn.pause_writing()
        writer.write(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.05)  # (to show that nothing happens: not waiting for time)
        assert upstream.hits == 1
        conn.resume_writing()  # caught up
        two = await read_one(reader)
        sc.clock.advance(1)  # long past the write timeout: nothing is cut off now
        assert (await get(reader, writer, "/three")).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert two.startswith(b"HTTP/1.1 200 ")


# -- bugs: answered, logged, and nothing held -------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "judged"),
    [(proxy_module.Proxy, "match", State.HALF_OPEN),
     (exchange_module, "upstream_lines", State.HALF_OPEN),
     # The probe's answer was judged (a success) before the bug.
     (exchange_module, "client_lines", State.CLOSED)],
    ids=["before-the-permit", "after-the-permit", "at-the-answer"],
)  # fmt: skip
async def test_a_bug_is_a_500_a_closed_connection_and_a_permit_given_back(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: object,
    name: str,
    judged: State,
) -> None:
    """As a probe, where a permit kept would hold the route's one slot for good."""

    def bug(*_: object) -> None:
        raise RuntimeError("a bug")

    sc = await start_sidecar(ROUTE.format(url=upstream.url) + PROBING, fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/status/500")  # opens the route; pooled
        sc.clock.advance(10)
        monkeypatch.setattr(module, name, bug)
        with caplog.at_level(logging.ERROR, logger="sidecar"):
            answer = await get(reader, writer, "/probe")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert answer.endswith(b'{"error":"internal_error"}')
    assert "RuntimeError: a bug" in caplog.text
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.probes_in_flight) == (judged, 0)
    assert settled(sc)


async def test_a_bug_while_the_body_goes_up_is_a_500_not_the_clients_400(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler's bug raised from a body callback must not read as the client's malformed
    bytes (the parser's callbacks carry both)."""

    def bug(*_: object) -> None:
        raise RuntimeError("a bug")

    sc = await start_sidecar(ROUTE.format(url=upstream.url) + PROBING, fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/status/500")  # opens the route; pooled
        sc.clock.advance(10)
        monkeypatch.setattr(exchange_module.Exchange, "request_body", bug)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await eventually(lambda: upstream.hits == 2)  # the head went up; the body comes after
        with caplog.at_level(logging.ERROR, logger="sidecar"):
            writer.write(b"hello")
            answer = await read_one(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert "RuntimeError: a bug" in caplog.text
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.probes_in_flight) == (State.HALF_OPEN, 0)
    assert settled(sc)


# -- the deadline: on the fake clock, to the millisecond ---------------------------------------


async def test_an_upstream_silent_past_the_request_timeout_is_a_504_and_let_go(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        sc.clock.advance(0.999)
        await asyncio.sleep(0)
        assert sc.sample("sidecar_in_flight_requests", route="api") == 1
        sc.clock.advance(0.001)
        answer = await read_one(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 504 ")
    assert answer.endswith(b'{"error":"upstream_timeout","route":"api"}')
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1
    await eventually(lambda: upstream.cancelled == 1)  # the upstream connection was let go


async def test_each_wait_for_the_body_gets_the_whole_timeout(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    start_sidecar: StartSidecar,
) -> None:
    more = asyncio.Event()
    stalled = asyncio.Event()

    async def pausing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
        await writer.drain()
        await more.wait()
        writer.write(b"cd")
        await writer.drain()
        await stalled.wait()  # the last two bytes never come
        await reader.read()
        writer.close()

    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(pausing)), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(2) == b"ab"
        sc.clock.advance(0.9)  # within the timeout of this wait
        more.set()
        assert await reader.readexactly(2) == b"cd"
        sc.clock.advance(0.9)  # 1.8 s since the head, but 0.9 s since the last bytes
        await asyncio.sleep(0)
        assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 0
        sc.clock.advance(0.1)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # cut off, never "whole"
    finally:
        stalled.set()
        writer.close()
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1


async def test_an_exchange_that_ends_before_the_tick_never_sets_a_timer(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url), fake_timers=True)
    ticker = sc.sidecar.proxy.ticker
    before = len(sc.clock.pending)
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        assert len(ticker._waiting) == 1  # waiting in the ticker, with no timer of its own
        upstream.release.set()
        await read_one(reader)
        assert not ticker._waiting  # ended: the tick has nothing to set
        sc.clock.advance(Ticker.INTERVAL)
        # What is left: the pool's keep-alive sweep and the client connection's idle
        # timer, no deadline.
        assert len(sc.clock.pending) == before + 2
    finally:
        writer.close()


async def test_a_deadline_shorter_than_a_tick_is_set_at_once(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(
        ROUTE.replace("request: 1s", "request: 100ms").format(url=upstream.url), fake_timers=True
    )
    reader, writer = await connect(sc.proxy)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        assert not sc.sidecar.proxy.ticker._waiting
        sc.clock.advance(0.1)
        assert (await read_one(reader)).startswith(b"HTTP/1.1 504 ")
    finally:
        writer.close()


def test_an_arm_that_fails_leaves_the_others_on_its_tick_armed() -> None:
    clock = FakeClock()
    ticker = Ticker(clock)
    errors: list[dict[str, object]] = []
    armed: list[int] = []

    class Waiting:
        def __init__(self, order: int) -> None:
            self.order = order

        def __hash__(self) -> int:
            return self.order  # a set of small ints iterates in order: the failing one first

        def arm(self) -> None:
            if self.order == 0:
                raise RuntimeError("a bug")
            armed.append(self.order)

    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _, context: errors.append(context))
        ticker.add(Waiting(0))
        ticker.add(Waiting(1))
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_advance(clock, Ticker.INTERVAL))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert armed == [1]
    assert [type(context["exception"]) for context in errors] == [RuntimeError]


async def _advance(clock: FakeClock, seconds: float) -> None:
    clock.advance(seconds)
