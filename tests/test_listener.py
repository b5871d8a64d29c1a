"""The listener's connection protocol on its own: a test handler, real sockets, a fake clock.

What the proxy tests reach only through routes and upstreams: the turn each
pipelined request waits for, `Expect: 100-continue` answered only when the body
is asked for, the keep-alive and header timeouts to the millisecond, and the
hand-off to a byte relay after an upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from sidecar.config import ClientTimeouts
from sidecar.listener import Channel, Listener, Request
from sidecar.responses import error_answer
from tests.fakes import FakeClock

OK = error_answer(200, "ok")  # {"error":"ok"}: any whole answer will do


@dataclass
class Served:
    """A listener on a free port whose handler is the test's."""

    listener: Listener
    clock: FakeClock
    url: str
    seen: list[Request] = field(default_factory=list)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Callable[[Request], None]], Served]]:
    started: list[Listener] = []

    async def start(handler: Callable[[Request], None]) -> Served:
        clock = FakeClock()
        served = Served(Listener(lambda r: None, clock, ClientTimeouts(1.0, 5.0, 2.0)), clock, "")

        def handle(request: Request) -> None:
            served.seen.append(request)
            handler(request)

        served.listener.handler = handle
        port = await served.listener.start("127.0.0.1", 0)
        served.url = f"127.0.0.1:{port}"
        started.append(served.listener)
        return served

    yield start  # type: ignore[misc]
    for listener in started:
        listener.close()
        await listener.drain(asyncio.get_running_loop().time() + 5)


async def open_to(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = served.url.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not in time")


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def test_pipelined_requests_wait_their_turn_and_are_answered_in_order(serve) -> None:  # type: ignore[no-untyped-def]
    held: list[Request] = []
    served = await serve(held.append)  # answers nothing by itself
    reader, writer = await open_to(served)
    try:
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
        await until(lambda: len(held) == 1)
        await asyncio.sleep(0.05)  # (to show that nothing more happens: not waiting for time)
        assert [r.target for r in served.seen] == [b"/0"]  # the others wait their turn
        held[0].answer(*OK)
        await until(lambda: len(held) == 2)
        assert held[1].target == b"/1"
        held[1].answer(*OK)
        await until(lambda: len(held) == 3)
        held[2].answer(*OK)
        answers = [await read_answer(reader) for _ in range(3)]
    finally:
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)


async def test_thousands_of_pipelined_requests_answered_at_once_are_answered_in_order(
    serve,  # type: ignore[no-untyped-def]
) -> None:
    """Each is answered inside the loop that hands the next over: no recursion per request
    (which once overflowed the stack past about a thousand)."""
    served = await serve(lambda request: request.answer(*OK))
    reader, writer = await open_to(served)
    count = 3000
    try:
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count)))
        answers = [await read_answer(reader) for _ in range(count)]
    finally:
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
    assert [r.target for r in served.seen] == [b"/%d" % i for i in range(count)]


async def test_100_continue_goes_out_only_when_the_body_is_asked_for(serve) -> None:  # type: ignore[no-untyped-def]
    held: list[Request] = []
    served = await serve(held.append)
    reader, writer = await open_to(served)
    received = bytearray()

    class Sink:
        def request_body(self, chunk: bytes) -> None:
            received.extend(chunk)

        def request_body_end(self) -> None:
            held[0].answer(*OK)

        def request_body_failed(self, reason: str) -> None:
            raise AssertionError(reason)

        def crashed(self, error: Exception) -> None:
            raise AssertionError("crashed") from error

    try:
        writer.write(
            b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        await until(lambda: len(held) == 1)
        peek = asyncio.ensure_future(reader.read(1))
        await asyncio.sleep(0.05)  # (to show that nothing comes: not waiting for time)
        assert not peek.done()  # no 100 Continue before the handler wants the body
        held[0].read_body(Sink())
        first = (await peek) + await reader.readuntil(b"\r\n\r\n")
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert bytes(received) == b"hello"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_the_header_timeout_runs_from_a_heads_first_byte(serve) -> None:  # type: ignore[no-untyped-def]
    served = await serve(lambda request: request.answer(*OK))
    reader, writer = await open_to(served)
    try:
        served.clock.advance(3.5)  # idle (the keep-alive timeout is 5 s): no header timer
        writer.write(b"GET /x HTTP/1.1\r\nHo")  # the head begins ...
        clock = served.clock
        await until(lambda: any(abs(t - clock.now - 1.0) < 1e-9 for t in clock.pending))
        served.clock.advance(0.999)
        await asyncio.sleep(0)
        writer.write(b"st: x\r\n")  # ... trickles on: no new deadline ...
        await asyncio.sleep(0.05)
        served.clock.advance(0.001)  # ... and runs out a second after its first byte
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b'\r\n\r\n{"error":"header_timeout"}')
    assert served.seen == []


async def test_an_idle_connection_closes_at_the_keep_alive_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    served = await serve(lambda request: request.answer(*OK))
    reader, writer = await open_to(served)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answer(reader)
        served.clock.advance(4.999)
        writer.write(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")  # just in time: a fresh 5 s
        await read_answer(reader)
        served.clock.advance(4.999)
        await asyncio.sleep(0.05)
        assert not reader.at_eof()
        served.clock.advance(0.001)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert [r.target for r in served.seen] == [b"/x", b"/y"]


@dataclass
class Echo:
    """A relay that echoes what the client sends, upper-cased, through its channel."""

    channel: Channel | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def relay_open(self, channel: Channel) -> None:
        self.channel = channel

    def relay_data(self, data: bytes) -> None:
        assert self.channel is not None
        self.channel.write(data.upper())

    def relay_eof(self) -> bool:
        return False  # a half-close closes it

    def relay_closed(self) -> None:
        self.closed.set()

    def relay_writable(self, writable: bool) -> None:
        pass


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"


async def test_after_an_upgrade_the_connection_is_a_byte_relay(serve) -> None:  # type: ignore[no-untyped-def]
    echo = Echo()

    def handler(request: Request) -> None:
        assert request.upgrade_tail is not None
        assert request.upgrade(SWITCH, echo) is echo.channel

    served = await serve(handler)
    reader, writer = await open_to(served)
    try:
        writer.write(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            b"early bytes, "  # sent with the head: the relay's first
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == SWITCH
        writer.write(b"then more\r\n\r\nGET / HTTP/1.1\r\n\r\n")  # no HTTP any more
        expected = b"EARLY BYTES, THEN MORE\r\n\r\nGET / HTTP/1.1\r\n\r\n"
        got = b""
        while len(got) < len(expected) and (more := await asyncio.wait_for(reader.read(100), 5)):
            got += more
        assert got == expected
        served.clock.advance(60)  # no keep-alive or header timer runs on a relay
        writer.write(b"still there")
        assert await asyncio.wait_for(reader.read(100), 5) == b"STILL THERE"
    finally:
        writer.close()
    await asyncio.wait_for(echo.closed.wait(), 5)
    assert len(served.seen) == 1


async def test_an_upgrade_answered_without_one_closes_after_its_answer(serve) -> None:  # type: ignore[no-untyped-def]
    served = await serve(lambda request: request.answer(*OK))
    reader, writer = await open_to(served)
    try:
        writer.write(
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n"  # after an upgrade request: not HTTP
        )
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in answer
    assert [r.target for r in served.seen] == [b"/x"]


async def test_a_stop_closes_idle_connections_and_lets_the_one_in_hand_finish(serve) -> None:  # type: ignore[no-untyped-def]
    held: list[Request] = []
    served = await serve(held.append)
    idle_reader, idle_writer = await open_to(served)
    busy_reader, busy_writer = await open_to(served)
    try:
        busy_writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: len(held) == 1)
        served.listener.close()
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        draining = asyncio.ensure_future(
            served.listener.drain(asyncio.get_running_loop().time() + 5)
        )
        await asyncio.sleep(0.05)
        assert not draining.done()
        held[0].answer(*OK)
        answer = await asyncio.wait_for(busy_reader.read(), 5)
        await asyncio.wait_for(draining, 5)
    finally:
        for writer in (idle_writer, busy_writer):
            with contextlib.suppress(Exception):
                writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in answer
