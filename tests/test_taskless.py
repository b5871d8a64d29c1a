"""Simple requests answered without a task (`Proxy.begin`): each way off that path.

Most tests in the suite go through it already (a keep-alive client's second GET
does); these are the ways out of it that they do not reach: an answer that is
an error, a shutdown while an answer is awaited, a client that is behind, and
the two fallbacks for what cannot go out on the pooled connection.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import Task
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar import proxy as proxy_module
from sidecar.breaker import State
from sidecar.client import Connection, Disconnected, Pool, request_head
from sidecar.listener import FastResponse, SimpleRequest
from sidecar.proxy import _Forwarding
from sidecar.upstream import Arming, Sent, UpstreamTimeout, send
from tests.conftest import (
    RawHandler,
    StartSidecar,
    Upstream,
    connect,
    eventually,
    read_one,
    read_request_head,
)

ROUTE = """
client_timeouts: {{write: 300ms}}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
    timeouts: {{request: 120s}}
"""


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return await read_one(reader)


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
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


def spy_on_escalations(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set each time a task-less request is handed to a task."""
    escalated = asyncio.Event()
    escalate = _Forwarding.escalate

    def spied(self: _Forwarding) -> None:
        escalate(self)
        escalated.set()

    monkeypatch.setattr(_Forwarding, "escalate", spied)
    return escalated


async def test_a_pooled_connection_dropped_unanswered_is_retried_on_a_new_one(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],  # stopped after the sidecar
    start_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer the task-less path waits for fails: a task takes over at once, as `send`
    would have had it (a GET is sent again, once, on a new connection)."""
    monkeypatch.setattr(Arming, "INTERVAL", 30.0)  # not the tick's doing

    async def answer(number: int, _line: bytes) -> bytes | None:
        if len(upstream.seen) == 2:
            return None  # the second request, on the pooled connection: never answered
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % number

    upstream = Numbered(answer)
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)))
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
    assert sc.breaker("api").consecutive_failures == 0
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="connect") == 0
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0


async def test_a_shutdown_waits_for_an_answer_awaited_without_a_task(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Arming, "INTERVAL", 30.0)  # no tick hands it to a task first
    escalated = spy_on_escalations(monkeypatch)
    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")  # its upstream connection is pooled now
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(upstream.entered.wait(), 5)
        stopping = asyncio.ensure_future(sc.sidecar.stop())
        await asyncio.wait_for(escalated.wait(), 5)  # by the connection's shutdown
        assert not stopping.done()
        upstream.release.set()
        answer = await read_one(reader)
        await asyncio.wait_for(stopping, 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"hung": true}')
    assert sc.breaker("api").consecutive_failures == 0


async def test_a_client_behind_on_a_whole_answer_gets_the_write_timeout(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is written at once; then the connection waits (in a task) for the client
    to take it, and a client that does not within the write timeout is cut off. (The
    answer is whole by then: the breaker counts a success, unlike a client that stops
    reading in the middle of a long body.)"""
    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    drains: list[FastResponse] = []
    never = asyncio.Event()

    async def drain(self: FastResponse) -> None:
        drains.append(self)
        if len(drains) == 2:
            await never.wait()  # the second answer is never taken

    try:
        await get(reader, writer, "/warm")  # its upstream connection is pooled now
        # From here the client is behind: its socket's buffer is over the high-water mark.
        monkeypatch.setattr(FastResponse, "needs_drain", property(lambda _: True))
        monkeypatch.setattr(FastResponse, "drain", drain)
        one = await get(reader, writer, "/one")
        two = await get(reader, writer, "/two")  # whole, and then nothing more
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert one.startswith(b"HTTP/1.1 200 ") and two.startswith(b"HTTP/1.1 200 ")
    assert len(drains) == 2
    breaker = sc.breaker("api")
    assert (breaker.consecutive_failures, upstream.hits) == (0, 3)
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0


async def test_a_request_head_that_cannot_be_written_is_left_to_a_task(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the task-less path cannot send, the task path answers (or refuses with a
    400, which `send` does too); the request is never left without an answer."""
    refused: list[str] = []

    def request_head(method: str, target: str, *_: object) -> tuple[bytes, bool]:
        refused.append(target)
        raise ValueError("not on the wire")

    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")
        monkeypatch.setattr(proxy_module, "request_head", request_head)
        answer = await get(reader, writer, "/refused")
    finally:
        writer.close()
    assert refused == ["/refused"]
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [r["path"] for r in upstream.requests] == ["/warm", "/refused"]


async def test_a_pooled_connection_that_cannot_take_the_request_is_left_to_a_task(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[Connection] = []
    request = Connection.request

    def flaky(self: Connection, head: bytes, with_body: bool) -> asyncio.Future[object]:
        used.append(self)
        if len(used) == 1:
            raise Disconnected("the upstream closed the connection")
        return request(self, head, with_body)  # type: ignore[return-value]

    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")
        monkeypatch.setattr(Connection, "request", flaky)
        answer = await get(reader, writer, "/again")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert len(used) == 2 and used[0] is not used[1] and used[0].closed
    await eventually(lambda: sc.sample("sidecar_in_flight_requests", route="api") == 0)


async def test_an_upstream_still_silent_at_the_tick_times_out_in_a_task(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request timeout, counted from the send, is kept by the task's watchdog."""
    monkeypatch.setattr(Arming, "INTERVAL", 0.02)
    sc = await start_sidecar(ROUTE.replace("120s", "150ms").format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")  # its upstream connection is pooled now
        answer = await get(reader, writer, "/hang")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 504 ")
    assert answer.endswith(b'{"error":"upstream_timeout","route":"api"}')
    assert sc.sample("sidecar_upstream_failures_total", route="api", kind="timeout") == 1
    await eventually(lambda: upstream.cancelled == 1)  # the connection was let go


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
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)))
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


@pytest.mark.parametrize("where", ["match", "_judge"])  # before the send, and after
async def test_a_bug_on_the_task_less_path_is_a_500_and_a_closed_connection(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """As for a handler's bug in a task: logged, answered, and nothing held."""

    def bug(*_: object) -> None:
        raise RuntimeError("a bug")

    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")
        monkeypatch.setattr(proxy_module.Proxy, where, bug)
        answer = await get(reader, writer, "/bug")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert "RuntimeError: a bug" in caplog.text
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0


async def test_an_answer_not_whole_at_its_head_is_relayed_by_a_task(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(ROUTE.format(url=upstream.url))
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/warm")  # its upstream connection is pooled now
        answer = await get(reader, writer, "/big/3000000")  # more than one read's worth
        again = await get(reader, writer, "/after")
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"x" * 3_000_000
    assert again.startswith(b"HTTP/1.1 200 ")


async def test_a_probe_whose_task_is_cancelled_before_it_runs_gives_its_slot_back(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task cancelled before its first step (its client gone at once) never runs the
    coroutine that would let go of the permit and the connection: its done callback does.

    (The test cancels it with the client still there, which only a client's going away
    does for real: that client is never answered, and the test closes it.)"""
    monkeypatch.setattr(Arming, "INTERVAL", 0.02)
    sc = await start_sidecar(
        ROUTE.replace("120s", "10s").format(url=upstream.url)
        + "    breaker: {failure_threshold: 1, open_duration: 10s, jitter: 0%}\n"
    )
    reader, writer = await connect(sc.proxy)
    adopt = SimpleRequest.adopt

    def adopt_and_leave(self: SimpleRequest, handling: Coroutine[Any, Any, Any]) -> Task[None]:
        task = adopt(self, handling)
        task.cancel()  # as the client's going away would, before the task's first step
        return task

    try:
        failed = await get(reader, writer, "/status/500")  # opens the route; pooled
        assert failed.startswith(b"HTTP/1.1 500 ")
        sc.clock.advance(10)
        monkeypatch.setattr(SimpleRequest, "adopt", adopt_and_leave)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")  # the probe; the tick hands it on
        await eventually(lambda: upstream.cancelled == 1)  # its upstream connection closed
    finally:
        writer.close()
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.probes_in_flight) == (State.HALF_OPEN, 0)
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0


async def test_the_connection_of_a_request_handed_to_a_task_is_pooled_after(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],  # stopped after the sidecar
    start_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The task takes the connection over: it goes back to the pool at the end, once."""
    monkeypatch.setattr(Arming, "INTERVAL", 0.02)
    escalated = spy_on_escalations(monkeypatch)

    async def answer(_number: int, line: bytes) -> bytes:
        if line.startswith(b"GET /slow "):
            await escalated.wait()  # answered once the tick handed it to a task
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    upstream = Numbered(answer)
    sc = await start_sidecar(ROUTE.format(url=await raw_upstream(upstream)))
    reader, writer = await connect(sc.proxy)
    try:
        answers = [await get(reader, writer, path) for path in ("/warm", "/slow", "/after")]
    finally:
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 200 ") and a.endswith(b"ok") for a in answers)
    assert upstream.seen == [
        (1, b"GET /warm HTTP/1.1"),
        (1, b"GET /slow HTTP/1.1"),
        (1, b"GET /after HTTP/1.1"),
    ]


async def test_a_bug_after_the_permit_gives_the_permit_back(
    start_sidecar: StartSidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = await start_sidecar(
        ROUTE.format(url=upstream.url)
        + "    breaker: {failure_threshold: 1, open_duration: 10s, jitter: 0%}\n"
    )

    def bug(*_: object) -> None:
        raise RuntimeError("a bug")

    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/status/500")  # opens the route; pooled
        sc.clock.advance(10)
        monkeypatch.setattr(proxy_module.Proxy, "_add_forwarded", staticmethod(bug))
        answer = await get(reader, writer, "/probe")
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 500 ")
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.probes_in_flight) == (State.HALF_OPEN, 0)


# -- `send` carrying on with a request sent before it (`Sent`) ------------------------------


async def sent_to(pool: Pool, url: str, waited: float) -> Sent:
    """A GET of /x sent on a new connection to `url`, as if `waited` seconds ago."""
    origin = pool.origin(url)
    connection = await pool.connect(origin, 2.0)
    head = request_head("GET", "/x", origin, CIMultiDict(), False)[0]
    loop_at = asyncio.get_running_loop().time() - waited
    return Sent(connection, connection.request(head, with_body=True), time.monotonic(), loop_at)


async def test_the_headers_of_a_request_sent_before_are_due_from_its_send(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    url = await raw_upstream(silent)
    pool = Pool()
    try:
        sent = await sent_to(pool, url, waited=0.55)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await send(
                pool, "GET", url, "/x", CIMultiDict(), None, 2.0, 0.6, time.monotonic, sent=sent
            )
        assert loop.time() - started < 0.3  # the 0.05 s left, not a fresh 0.6 s
    finally:
        await pool.close()


async def test_the_body_of_a_request_sent_before_gets_the_whole_timeout_per_wait(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def pausing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(0.3)  # the upstream's pace: well within the 0.6 s timeout
        writer.write(b"cd")
        await reader.read()
        writer.close()

    url = await raw_upstream(pausing)
    pool = Pool()
    try:
        sent = await sent_to(pool, url, waited=0.5)  # 0.1 s left for the headers
        exchange = await send(
            pool, "GET", url, "/x", CIMultiDict(), None, 2.0, 0.6, time.monotonic, sent=sent
        )
        try:
            assert b"".join([chunk async for chunk in exchange.body()]) == b"abcd"
        finally:
            exchange.close()
    finally:
        await pool.close()


async def test_an_arm_that_fails_leaves_the_others_on_its_tick_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Arming, "INTERVAL", 0.01)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    armed = asyncio.Event()

    class Waiting:
        def __init__(self, order: int) -> None:
            self.order = order

        def __hash__(self) -> int:
            return self.order  # a set of small ints iterates in order: the failing one first

        def arm(self) -> None:
            if self.order == 0:
                raise RuntimeError("a bug")
            armed.set()

    arming = Arming.of(loop)
    arming.add(Waiting(0))
    arming.add(Waiting(1))
    await asyncio.wait_for(armed.wait(), 5)
    assert [type(context["exception"]) for context in errors] == [RuntimeError]
