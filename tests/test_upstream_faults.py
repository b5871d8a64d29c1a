"""Upstream faults through the proxy: what the client sees, and what the breaker counts.

Issue 4, item 1. Each fault is one row of `FAULTS`: its expected client-visible result
(a status and an exact body, or a response aborted mid-body), the failure kind it
counts (or none: a success), and how many upstream connections a request makes. A
failing row is driven through the same steps, with the exact counters after each:
two faulty exchanges open the route (threshold 2), and the next request is refused
with no connection reaching the upstream. A succeeding row follows a failure and
must reset its count. The two faults that are about time (a 5xx burst then
recovery, flapping up and down) drive the breaker's whole cycle on the fake clock.

The sidecar's timeouts run on the fake clock too: an upstream that takes its time
waits for the test (`Script.pause`), which moves the clock as its row's `pace` says,
and no test waits for a timeout to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.breaker import State
from sidecar.upstream_pool import MAX_HEADER_SIZE
from tests.conftest import RawHandler, Running, StartSidecar, eventually, read_request_head

ROUTE = "api"
REQUEST_TIMEOUT = 0.2
"""The route's request timeout, on the fake clock: where it must fire, the test moves the
clock past it."""

UNREACHABLE = b'{"error":"upstream_unreachable","route":"api"}'
TIMEOUT = b'{"error":"upstream_timeout","route":"api"}'


def circuit_open(retry_after: int) -> bytes:
    return b'{"error":"circuit_open","route":"api","retry_after":%d}' % retry_after


def config(upstream: str, breaker: str = "failure_threshold: 2, open_duration: 10s") -> str:
    return f"""
routes:
  - name: {ROUTE}
    match: {{path_prefix: /api}}
    upstream: {upstream}
    strip_prefix: true
    timeouts: {{connect: 1s, request: {int(REQUEST_TIMEOUT * 1000)}ms}}
    breaker: {{{breaker}}}
"""


# -- exact counters -------------------------------------------------------------------------------

Counters = dict[tuple[str, ...], float]

_COUNTERS = {
    "sidecar_requests_total": "requests",
    "sidecar_upstream_failures_total": "failures",
    "sidecar_rejected_requests_total": "rejected",
    "sidecar_breaker_transitions_total": "transitions",
}


def counters(sc: Running) -> Counters:
    """Every non-zero counter of the route, keyed by a short name and its label values.

    `("requests", "502")` is `sidecar_requests_total{code="502"}`, `("failures",
    "connect")` is `sidecar_upstream_failures_total{kind="connect"}`, `("rejected",
    "circuit_open")` is `sidecar_rejected_requests_total{reason=...}` and
    `("transitions", "closed", "open")` is `sidecar_breaker_transitions_total{...}`.
    Comparing the whole dict asserts that nothing else was counted either.
    """
    found: Counters = {}
    for family in sc.sidecar.metrics.registry.collect():
        for sample in family.samples:
            short = _COUNTERS.get(sample.name)
            if short is None or sample.labels.get("route") != ROUTE or not sample.value:
                continue
            labels = sample.labels
            if short == "transitions":
                key: tuple[str, ...] = (short, labels["from_state"], labels["to_state"])
            else:
                key = (short, labels[{"requests": "code", "failures": "kind"}.get(short, "reason")])
            found[key] = sample.value
    return found


def assert_breaker(sc: Running, state: State, consecutive: int) -> None:
    """The breaker's state and count, as the breaker has them and as /metrics exports them."""
    breaker = sc.breaker(ROUTE)
    assert (breaker.state, breaker.consecutive_failures) == (state, consecutive)
    for s in State:
        expected = 1.0 if s is state else 0.0
        assert sc.sample("sidecar_breaker_state", route=ROUTE, state=s.value) == expected
    assert sc.sample("sidecar_breaker_consecutive_failures", route=ROUTE) == consecutive


async def assert_settled(sc: Running) -> None:
    """Nothing is left in flight (the handler ends just after the client has its last byte)."""
    await eventually(lambda: in_flight(sc) == 0)


def in_flight(sc: Running) -> float | None:
    return sc.sample("sidecar_in_flight_requests", route=ROUTE)


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the client got: a status, the body bytes, and whether the body ended whole."""

    status: int
    headers: dict[str, str]
    body: bytes
    aborted: bool


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that takes header lines as long as the sidecar's own client does."""
    async with aiohttp.ClientSession(
        auto_decompress=False, max_line_size=2 * MAX_HEADER_SIZE, max_field_size=2 * MAX_HEADER_SIZE
    ) as session:
        yield session


async def fetch(client: aiohttp.ClientSession, url: str, script: Script | None = None) -> Seen:
    """GET `url`; with `script`, its `client_has_headers` is set once the response headers
    are in, before the body, and its `received` counts the body's bytes as they come."""
    async with client.get(url) as response:
        if script is not None:
            script.client_has_headers.set()
        body = b""
        try:
            async for chunk in response.content.iter_any():
                body += chunk
                if script is not None:
                    script.received += len(chunk)
        except aiohttp.ClientPayloadError:
            return Seen(response.status, dict(response.headers), body, aborted=True)
        return Seen(response.status, dict(response.headers), body, aborted=False)


# -- scripted upstreams ---------------------------------------------------------------------------


@dataclass
class Script:
    """What a raw upstream's handler shares with its test."""

    connections: int = 0
    """TCP connections the upstream accepted."""
    hung_up: int = 0
    """Connections the sidecar closed while the upstream kept them open, waiting."""
    client_has_headers: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the test once its client has the response headers."""
    waiting: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the upstream when it waits for time to pass (`pause`)."""
    go_on: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the test once it has moved the clock."""
    sent: int = 0
    """Body bytes the upstream sent in the exchange in hand."""
    received: int = 0
    """Body bytes of it the client has."""

    async def pause(self, reader: asyncio.StreamReader) -> bool:
        """Take time, as an upstream does between two steps: wait until the test has moved
        the clock (False), or until the sidecar hangs up first (True: counted)."""
        self.go_on.clear()
        self.waiting.set()
        hang_up = asyncio.ensure_future(reader.read())
        go_on = asyncio.ensure_future(self.go_on.wait())
        try:
            await asyncio.wait([hang_up, go_on], return_when=asyncio.FIRST_COMPLETED)
        finally:
            go_on.cancel()
            if not hang_up.done():
                hang_up.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hang_up
        if hang_up.cancelled():
            return False
        assert hang_up.result() == b""
        self.hung_up += 1
        return True


Behaviour = Callable[[Script, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

PRIMER = b"GET /prime "
"""A request the success rows answer with a 500 first, so that a success shows as a reset count."""


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def answered_primer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Read the request head; if it is the primer, answer it with a 500 and say so."""
    if not (await read_request_head(reader)).startswith(PRIMER):
        return False
    writer.write(
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    writer.close()
    return True


async def until_hung_up(script: Script, reader: asyncio.StreamReader, within: float) -> bool:
    """Wait up to `within` seconds for the sidecar to close the connection; say if it did."""
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except TimeoutError:
        return False
    assert data == b""
    script.hung_up += 1
    return True


async def never_answers(script: Script, reader: asyncio.StreamReader, _w: object) -> None:
    await read_request_head(reader)
    await script.pause(reader)  # ... until the sidecar gives up


async def closes_at_once(_s: Script, _r: object, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def resets_mid_headers(
    _s: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Ty")
    await writer.drain()
    reset(writer)


BODY = b"p" * 10_000
"""What the upstreams that break off mid-body were sending."""


async def resets_mid_body(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:1000])
    await writer.drain()
    await script.client_has_headers.wait()  # the headers went through: now break off
    reset(writer)


async def resets_mid_chunked_body(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + BODY[:1000])
    await writer.drain()
    await script.client_has_headers.wait()
    reset(writer)


DRIP = [b"d%d" % i * 20 for i in range(8)]
DRIP_GAP = REQUEST_TIMEOUT / 4
"""Each gap well inside the request timeout; all eight together twice past it."""


async def drips(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await answered_primer(reader, writer):
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(b"".join(DRIP)))
    for chunk in DRIP:
        await writer.drain()
        if await script.pause(reader):  # the upstream's own pace: a gap
            return
        writer.write(chunk)
        script.sent += len(chunk)
    await writer.drain()


async def drips_then_stalls(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY))
    for i in range(3):
        writer.write(BODY[i * 100 : (i + 1) * 100])
        script.sent += 100
        await writer.drain()
        if await script.pause(reader):  # a gap; after the third, the rest never comes
            return
    await until_hung_up(script, reader, within=60)


async def drips_its_headers(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A header line per gap: always some progress, but the headers never end in time."""
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(2 * len(DRIP)):
        await writer.drain()
        if await script.pause(reader):
            return
        writer.write(b"X-Drip-%d: %d\r\n" % (i, i))
    writer.write(b"Content-Length: 2\r\n\r\nok")


async def speaks_ssh(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request_head(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n")  # a line, and then it waits
    await writer.drain()
    await until_hung_up(script, reader, within=60)


def answers(raw: bytes) -> Behaviour:
    """Answer every request with `raw`, then close (a success row's primer gets a 500)."""

    async def answer(
        _s: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await answered_primer(reader, writer):
            return
        writer.write(raw)
        await writer.drain()

    return answer


def with_header(value_length: int) -> bytes:
    """A 200 with an `X-Big` header whose value is `value_length` bytes."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: " + b"b" * value_length + b"\r\n\r\nok"


def counting(script: Script, behaviour: Behaviour) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script.connections += 1
        try:
            await behaviour(script, reader, writer)
        except ConnectionError:
            pass  # the sidecar hung up first: fine for an upstream this broken
        finally:
            writer.close()

    return handler


# -- the table ------------------------------------------------------------------------------

REFUSED = "refused"
UNRESOLVABLE = "unresolvable"


@dataclass(frozen=True)
class Fault:
    name: str
    upstream: Behaviour | str
    """A raw upstream's behaviour, or REFUSED / UNRESOLVABLE."""
    status: int
    """The status the client sees."""
    body: bytes | None
    """The exact body the client gets; None: its connection is aborted mid-body."""
    kind: str | None
    """The failure kind counted; None: a success."""
    connections: int = 1
    """Upstream connections per client request."""
    headers: tuple[tuple[str, str], ...] = ()
    """Headers the client must get, as the upstream sent them."""
    hangs_up: bool = False
    """The upstream waits on an open connection: the sidecar must close it."""
    pace: tuple[float, ...] = ()
    """The fake time the test moves each time the upstream takes its time (`Script.pause`),
    in order. Where the row's outcome is a timeout, the last is where the sidecar gives up:
    the test moves to a millisecond short of it first (nothing happens), then to it."""


FAULTS = [
    Fault("connection refused", REFUSED, 502, UNREACHABLE, "connect", connections=0),
    Fault(
        "accepts and never answers",
        never_answers,
        504,
        TIMEOUT,
        "timeout",
        hangs_up=True,
        pace=(REQUEST_TIMEOUT,),
    ),
    # A request is sent again only when a *reused* pooled connection drops unanswered
    # (test_exchange.py); on a new connection, as here, the drop is the answer: one
    # connection, one failure. (aiohttp's client sent it again: two connections.)
    Fault("closes right after accept", closes_at_once, 502, UNREACHABLE, "connect"),
    Fault("resets in the middle of the headers", resets_mid_headers, 502, UNREACHABLE, "connect"),
    Fault("headers, then resets mid-body", resets_mid_body, 200, None, "reset"),
    Fault("headers, then resets mid-chunked-body", resets_mid_chunked_body, 200, None, "reset"),
    Fault("a very slow body (drip)", drips, 200, b"".join(DRIP), None, pace=(DRIP_GAP,) * 8),
    Fault(
        "a drip that stalls",
        drips_then_stalls,
        200,
        None,
        "timeout",
        hangs_up=True,
        pace=(DRIP_GAP, DRIP_GAP, REQUEST_TIMEOUT),
    ),
    Fault(
        "headers dripped past the timeout",
        drips_its_headers,
        504,
        TIMEOUT,
        "timeout",
        hangs_up=True,
        pace=(DRIP_GAP,) * 4,  # the fourth gap ends the request's time
    ),
    Fault(
        "not HTTP: an SSH banner, then silence",
        speaks_ssh,
        502,
        UNREACHABLE,
        "connect",
        hangs_up=True,
    ),
    Fault(
        "not HTTP: a TLS alert, then close",
        answers(b"\x15\x03\x01\x00\x02\x02\x46"),  # protocol_version alert, no newline
        502,
        UNREACHABLE,
        "connect",
    ),
    Fault(
        "not HTTP: status 999",
        answers(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok"),
        502,
        UNREACHABLE,
        "connect",
    ),
    Fault(
        "not HTTP: a header line without a colon",
        answers(b"HTTP/1.1 200 OK\r\nnot a header\r\nContent-Length: 2\r\n\r\nok"),
        502,
        UNREACHABLE,
        "connect",
    ),
    # The limit is on a header's value (aiohttp's max_field_size), not on the whole line.
    Fault(
        "oversize response header (value 64 KiB + 1)",
        answers(with_header(MAX_HEADER_SIZE + 1)),
        502,
        UNREACHABLE,
        "connect",
    ),
    Fault(
        "large response header (value 64 KiB, allowed)",
        answers(with_header(MAX_HEADER_SIZE)),
        200,
        b"ok",
        None,
        headers=(("X-Big", "b" * MAX_HEADER_SIZE),),
    ),
    Fault("host name does not resolve", UNRESOLVABLE, 502, UNREACHABLE, "connect", connections=0),
]


async def upstream_url(
    fault: Fault, script: Script, raw_upstream: Callable[[RawHandler], Awaitable[str]], port: int
) -> str:
    if fault.upstream == REFUSED:
        return f"http://127.0.0.1:{port}"
    if fault.upstream == UNRESOLVABLE:
        return "http://no-such-host.invalid"  # RFC 6761: never resolves
    assert not isinstance(fault.upstream, str)
    return await raw_upstream(counting(script, fault.upstream))


async def exchange(
    sc: Running, client: aiohttp.ClientSession, url: str, fault: Fault, script: Script
) -> Seen:
    """`fetch`, moving the clock as `fault.pace` says each time the upstream takes its time."""
    script.sent = script.received = 0
    script.waiting.clear()
    fetching = asyncio.ensure_future(fetch(client, url, script))
    try:
        for n, step in enumerate(fault.pace, start=1):
            await asyncio.wait_for(script.waiting.wait(), 5)
            script.waiting.clear()
            # The client has all the upstream sent (so the sidecar took it in) ...
            await eventually(lambda: script.received == script.sent)
            if fault.kind == "timeout" and n == len(fault.pace):
                sc.clock.advance(step - 0.001)
                assert in_flight(sc) == 1
                sc.clock.advance(0.001)  # ... and the sidecar gives up, at once
                assert in_flight(sc) == 0
            else:
                sc.clock.advance(step)
                assert in_flight(sc) == 1  # ... and still waits on the upstream
                script.go_on.set()
        return await asyncio.wait_for(fetching, 5)
    finally:
        fetching.cancel()


def assert_seen(seen: Seen, fault: Fault) -> None:
    assert seen.status == fault.status
    if fault.body is None:
        assert seen.aborted, "the client must see the break, never a silently truncated body"
        assert len(seen.body) < len(BODY) and BODY.startswith(seen.body)
    else:
        assert (seen.body, seen.aborted) == (fault.body, False)
        if fault.kind is not None:
            assert seen.headers["Content-Type"] == "application/json"
    for name, value in fault.headers:
        assert seen.headers.get(name) == value


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_upstream_fault(
    fault: Fault,
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    closed_port: int,
    client: aiohttp.ClientSession,
) -> None:
    script = Script()
    sc = await start_sidecar(
        config(await upstream_url(fault, script, raw_upstream, closed_port)), fake_timers=True
    )
    code = str(fault.status)
    url = f"{sc.proxy}/api/x"

    if fault.kind is None:
        # A success: it resets the count a failure (the primer's 500) left.
        assert (await fetch(client, f"{sc.proxy}/api/prime")).status == 500
        assert_breaker(sc, State.CLOSED, 1)
        assert_seen(await exchange(sc, client, url, fault, script), fault)
        assert_breaker(sc, State.CLOSED, 0)
        assert counters(sc) == {
            ("requests", "500"): 1,
            ("requests", code): 1,
            ("failures", "status"): 1,
        }
        assert script.connections == 2
        await assert_settled(sc)
        return

    assert_seen(await exchange(sc, client, url, fault, script), fault)
    assert_breaker(sc, State.CLOSED, 1)
    assert counters(sc) == {("requests", code): 1, ("failures", fault.kind): 1}
    assert script.connections == fault.connections

    script.client_has_headers.clear()
    assert_seen(await exchange(sc, client, url, fault, script), fault)
    assert_breaker(sc, State.OPEN, 2)
    assert counters(sc) == {
        ("requests", code): 2,
        ("failures", fault.kind): 2,
        ("transitions", "closed", "open"): 1,
    }
    assert script.connections == 2 * fault.connections

    seen = await fetch(client, url)
    assert (seen.status, seen.headers["Retry-After"], seen.body) == (503, "10", circuit_open(10))
    assert script.connections == 2 * fault.connections  # the upstream was not contacted
    assert counters(sc) == {
        ("requests", code): 2,
        ("requests", "503"): 1,
        ("failures", fault.kind): 2,
        ("rejected", "circuit_open"): 1,
        ("transitions", "closed", "open"): 1,
    }

    # The period over, a probe meets the same fault.
    sc.clock.advance(10)
    assert_breaker(sc, State.HALF_OPEN, 2)
    script.client_has_headers.clear()
    assert_seen(await exchange(sc, client, url, fault, script), fault)
    assert script.connections == 3 * fault.connections
    after = {
        ("requests", code): 3,
        ("requests", "503"): 1,
        ("rejected", "circuit_open"): 1,
        ("transitions", "closed", "open"): 1,
        ("transitions", "open", "half_open"): 1,
    }
    if fault.body is None:
        # A probe is judged by its status alone (README, "When an outcome is known"): the
        # 200 closed the route, and the break that followed has no state left to apply to.
        assert_breaker(sc, State.CLOSED, 0)
        assert counters(sc) == {
            **after,
            ("failures", fault.kind): 2,
            ("transitions", "half_open", "closed"): 1,
        }
    else:
        assert_breaker(sc, State.OPEN, 3)
        assert counters(sc) == {
            **after,
            ("failures", fault.kind): 3,
            ("transitions", "half_open", "open"): 1,
        }
        seen = await fetch(client, url)
        assert (seen.status, seen.body) == (503, circuit_open(10))  # a new, whole period
        assert script.connections == 3 * fault.connections

    # The sidecar let go of every connection it gave up on.
    await eventually(lambda: script.hung_up == (3 if fault.hangs_up else 0))
    await assert_settled(sc)


# -- faults over time: the whole cycle on the fake clock -----------------------------------------


@dataclass
class Switchable:
    """An aiohttp upstream answering whatever status the test sets, with its own JSON body."""

    status: int = 200
    hits: int = 0
    url: str = ""


@pytest.fixture
async def switchable() -> AsyncIterator[Switchable]:
    state = Switchable()

    async def answer(_request: web.Request) -> web.Response:
        state.hits += 1
        return web.json_response({"upstream": state.status}, status=state.status)

    app = web.Application()
    app.router.add_get("/{path:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


async def test_a_5xx_burst_opens_the_route_and_recovery_closes_it(
    start_sidecar: StartSidecar, switchable: Switchable, client: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        config(
            switchable.url,
            "failure_threshold: 3, open_duration: 10s, half_open_requests: 1, success_threshold: 2",
        )
    )
    url = f"{sc.proxy}/api/x"

    # The burst: the upstream's own 5xx answers reach the client unchanged, and count.
    for n, status in enumerate((500, 503, 504), start=1):
        switchable.status = status
        seen = await fetch(client, url)
        assert (seen.status, seen.body) == (status, b'{"upstream": %d}' % status)
        assert_breaker(sc, State.OPEN if n == 3 else State.CLOSED, n)
    assert switchable.hits == 3

    # The burst goes on at the upstream, but nothing reaches it while OPEN.
    seen = await fetch(client, url)
    assert (seen.status, seen.headers["Retry-After"], seen.body) == (503, "10", circuit_open(10))
    sc.clock.advance(4)
    seen = await fetch(client, url)
    assert (seen.status, seen.headers["Retry-After"], seen.body) == (503, "6", circuit_open(6))
    switchable.status = 200  # recovered, but the route cannot know before its period ends
    sc.clock.advance(5.5)
    seen = await fetch(client, url)
    assert (seen.status, seen.headers["Retry-After"], seen.body) == (503, "1", circuit_open(1))
    assert switchable.hits == 3
    assert counters(sc) == {
        ("requests", "500"): 1,
        ("requests", "503"): 1 + 3,  # the upstream's own, and three rejections
        ("requests", "504"): 1,
        ("failures", "status"): 3,
        ("rejected", "circuit_open"): 3,
        ("transitions", "closed", "open"): 1,
    }

    # The period ends: HALF_OPEN with no traffic at all, then two probes close the route.
    sc.clock.advance(0.5)
    assert_breaker(sc, State.HALF_OPEN, 3)
    assert counters(sc)[("transitions", "open", "half_open")] == 1
    seen = await fetch(client, url)
    assert (seen.status, seen.body) == (200, b'{"upstream": 200}')
    assert_breaker(sc, State.HALF_OPEN, 0)  # one of two probe successes; a success resets
    seen = await fetch(client, url)
    assert (seen.status, seen.body) == (200, b'{"upstream": 200}')
    assert_breaker(sc, State.CLOSED, 0)
    seen = await fetch(client, url)
    assert (seen.status, seen.body) == (200, b'{"upstream": 200}')
    assert switchable.hits == 6
    assert counters(sc) == {
        ("requests", "200"): 3,
        ("requests", "500"): 1,
        ("requests", "503"): 4,
        ("requests", "504"): 1,
        ("failures", "status"): 3,
        ("rejected", "circuit_open"): 3,
        ("transitions", "closed", "open"): 1,
        ("transitions", "open", "half_open"): 1,
        ("transitions", "half_open", "closed"): 1,
    }
    await assert_settled(sc)


class Flapping:
    """An upstream whose listener comes and goes on one port: down is connection refused."""

    def __init__(self) -> None:
        self.port = 0
        self.hits = 0
        self._server: asyncio.Server | None = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        await read_request_head(reader)
        # Connection: close, so that no pooled connection outlives a "down".
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nup")
        await writer.drain()
        writer.close()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None


@pytest.fixture
async def flapping() -> AsyncIterator[Flapping]:
    upstream = Flapping()
    await upstream.up()
    yield upstream
    if upstream._server is not None:
        await upstream.down()


async def test_a_flapping_upstream_cycles_the_breaker(
    start_sidecar: StartSidecar, flapping: Flapping, client: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(f"http://127.0.0.1:{flapping.port}"))
    url = f"{sc.proxy}/api/x"

    async def expect(status: int, body: bytes) -> None:
        seen = await fetch(client, url)
        assert (seen.status, seen.body, seen.aborted) == (status, body, False)

    # Flapping faster than the threshold: each success resets the count, the route stays CLOSED.
    await expect(200, b"up")
    await flapping.down()
    await expect(502, UNREACHABLE)
    assert_breaker(sc, State.CLOSED, 1)
    await flapping.up()
    await expect(200, b"up")
    assert_breaker(sc, State.CLOSED, 0)

    # Down long enough: OPEN; up again, but nothing reaches it while OPEN.
    await flapping.down()
    await expect(502, UNREACHABLE)
    await expect(502, UNREACHABLE)
    assert_breaker(sc, State.OPEN, 2)
    await flapping.up()
    await expect(503, circuit_open(10))
    assert flapping.hits == 2

    # Down when the probe goes: OPEN again, for a new period.
    await flapping.down()
    sc.clock.advance(10)
    assert_breaker(sc, State.HALF_OPEN, 2)
    await expect(502, UNREACHABLE)
    assert_breaker(sc, State.OPEN, 3)  # a failed probe is one more failure
    await flapping.up()
    sc.clock.advance(9)
    await expect(503, circuit_open(1))
    assert flapping.hits == 2

    # Up when the next probe goes: CLOSED, with a fresh count.
    sc.clock.advance(1)
    await expect(200, b"up")
    assert_breaker(sc, State.CLOSED, 0)
    await flapping.down()
    await expect(502, UNREACHABLE)
    assert_breaker(sc, State.CLOSED, 1)
    assert flapping.hits == 3
    assert counters(sc) == {
        ("requests", "200"): 3,
        ("requests", "502"): 5,
        ("requests", "503"): 2,
        ("failures", "connect"): 5,
        ("rejected", "circuit_open"): 2,
        ("transitions", "closed", "open"): 1,
        ("transitions", "open", "half_open"): 2,
        ("transitions", "half_open", "open"): 1,
        ("transitions", "half_open", "closed"): 1,
    }
    await assert_settled(sc)
