"""Many clients at once, and clients that give up: exact outcomes, reconciled with the counters.

A scripted upstream counts what reaches it and how much of it at once; the
sidecar's clock is a fake that the test moves between phases.
"""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.breaker import State
from tests.conftest import Running, StartSidecar, eventually

CLIENTS = 500
HALF_OPEN_REQUESTS = 3


@dataclass
class Scripted:
    """An upstream whose answer the test sets, and which can hold requests at a gate."""

    status: int = 200
    gated: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    cancelled: int = 0
    server: TestServer | None = None

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gated:
                await self.gate.wait()
            return web.json_response({"from": "upstream"}, status=self.status)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    @property
    def open_connections(self) -> int:
        assert self.server is not None and self.server.runner is not None
        server = self.server.runner.server
        assert server is not None
        return len(server.connections)


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    state = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    state.gate.set()
    await state.server.close()


@pytest.fixture
async def many() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no connection limit: CLIENTS requests really are in flight at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


def route(url: str) -> str:
    # A connect timeout well past 3 s: 500 connects at once overflow the test upstream's
    # listen backlog (128), and a SYN the kernel dropped is sent again 1 s later, then 3 s:
    # on a loaded machine that is a 504 the test is not about.
    return f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
    timeouts: {{connect: 10s}}
    breaker:
      failure_threshold: 5
      open_duration: 10s
      half_open_requests: {HALF_OPEN_REQUESTS}
      success_threshold: {HALF_OPEN_REQUESTS}
"""


async def one(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    """One whole response: its status and every byte of its body."""
    async with session.get(url) as response:
        return response.status, await response.read()


async def wave(session: aiohttp.ClientSession, sc: Running, n: int = CLIENTS) -> Counter[int]:
    results = await asyncio.gather(*(one(session, f"{sc.proxy}/x/{i}") for i in range(n)))
    assert len(results) == n  # gather raised if any request had failed outright
    for status, body in results:
        assert body, f"an empty body with {status}"
    return Counter(status for status, _ in results)


def transitions(sc: Running) -> dict[str, float]:
    return {
        f"{a}->{b}": sc.sample(
            "sidecar_breaker_transitions_total", route="api", from_state=a, to_state=b
        )
        or 0
        for a, b in [("closed", "open"), ("open", "half_open"), ("half_open", "open"),
                     ("half_open", "closed")]
    }  # fmt: skip


@pytest.mark.slow
async def test_500_clients_through_a_whole_cycle_each_get_exactly_one_answer(
    start_sidecar: StartSidecar, scripted: Scripted, many: aiohttp.ClientSession
) -> None:
    assert scripted.server is not None
    sc = await start_sidecar(route(str(scripted.server.make_url("")).rstrip("/")))
    breaker = sc.breaker("api")
    seen: Counter[int] = Counter()

    # CLOSED -> OPEN: the upstream fails every request. Those admitted before the
    # fifth failure are forwarded (500); the rest are refused (503). One OPEN only.
    scripted.status = 500
    seen += await wave(many, sc)
    assert breaker.state is State.OPEN
    assert set(seen) <= {500, 503}
    assert seen[500] >= 5
    assert scripted.hits == seen[500]
    assert transitions(sc)["closed->open"] == 1

    # OPEN: nobody reaches the upstream.
    hits = scripted.hits
    opened = await wave(many, sc)
    assert opened == Counter({503: CLIENTS})
    assert scripted.hits == hits
    seen += opened

    # HALF_OPEN: 500 at once, and never more than HALF_OPEN_REQUESTS at the upstream.
    sc.clock.advance(10)
    scripted.status, scripted.gated = 200, True
    probing = asyncio.ensure_future(wave(many, sc))
    await eventually(lambda: scripted.in_flight == HALF_OPEN_REQUESTS)
    await eventually(
        lambda: (
            (
                sc.sample(
                    "sidecar_rejected_requests_total", route="api", reason="circuit_half_open"
                )
                or 0
            )
            == CLIENTS - HALF_OPEN_REQUESTS
        )
    )
    assert breaker.probes_in_flight == HALF_OPEN_REQUESTS
    scripted.gate.set()
    half_open = await probing
    assert half_open == Counter({200: HALF_OPEN_REQUESTS, 503: CLIENTS - HALF_OPEN_REQUESTS})
    assert scripted.most_in_flight == HALF_OPEN_REQUESTS
    assert breaker.state is State.CLOSED
    seen += half_open

    # CLOSED again: everyone is served.
    scripted.gated = False
    closed = await wave(many, sc)
    assert closed == Counter({200: CLIENTS})
    seen += closed

    # Exactly one transition per edge, and the sidecar's counters say what clients saw.
    assert transitions(sc) == {
        "closed->open": 1,
        "open->half_open": 1,
        "half_open->open": 0,
        "half_open->closed": 1,
    }
    for code, n in seen.items():
        assert sc.sample("sidecar_requests_total", route="api", code=str(code)) == n, code
    for code in ("502", "504"):
        assert sc.sample("sidecar_requests_total", route="api", code=code) == 0
    assert sum(seen.values()) == 4 * CLIENTS
    assert sc.sample("sidecar_in_flight_requests", route="api") == 0


async def disconnect_at_upstream(
    sc: Running, scripted: Scripted, n: int
) -> list[asyncio.Task[tuple[int, bytes]]]:
    """Start `n` requests, wait until the upstream holds them all, then have every client leave."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    tasks = [asyncio.ensure_future(one(session, f"{sc.proxy}/held/{i}")) for i in range(n)]
    try:
        await eventually(lambda: scripted.in_flight == n)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    return tasks


async def test_clients_that_leave_while_closed_count_nothing_and_free_the_upstream(
    start_sidecar: StartSidecar, scripted: Scripted
) -> None:
    assert scripted.server is not None
    sc = await start_sidecar(route(str(scripted.server.make_url("")).rstrip("/")))
    scripted.gated = True
    await disconnect_at_upstream(sc, scripted, 50)
    # The sidecar cancelled every upstream request and closed its connection: none is
    # left half-used in the pool, and the upstream saw each one end.
    await eventually(lambda: scripted.cancelled == 50)
    await eventually(lambda: scripted.open_connections == 0)
    await eventually(lambda: sc.sample("sidecar_in_flight_requests", route="api") == 0)
    breaker = sc.breaker("api")
    assert (breaker.state, breaker.consecutive_failures) == (State.CLOSED, 0)
    for kind in ("status", "connect", "timeout", "reset"):
        assert sc.sample("sidecar_upstream_failures_total", route="api", kind=kind) == 0


async def test_probes_whose_clients_leave_free_their_slots(
    start_sidecar: StartSidecar, scripted: Scripted, many: aiohttp.ClientSession
) -> None:
    assert scripted.server is not None
    sc = await start_sidecar(route(str(scripted.server.make_url("")).rstrip("/")))
    breaker = sc.breaker("api")
    scripted.status = 500
    for _ in range(5):
        await one(many, f"{sc.proxy}/fail")
    assert breaker.state is State.OPEN
    sc.clock.advance(10)
    scripted.status, scripted.gated = 200, True
    for _ in range(3):  # three rounds: a leaked slot would leave fewer each time
        await disconnect_at_upstream(sc, scripted, HALF_OPEN_REQUESTS)
        await eventually(lambda: breaker.probes_in_flight == 0)
        await eventually(lambda: scripted.open_connections == 0)
        assert (breaker.state, breaker.consecutive_failures) == (State.HALF_OPEN, 5)
    scripted.gated = False
    results = await asyncio.gather(*(one(many, f"{sc.proxy}/ok") for _ in range(3)))
    assert sorted(status for status, _ in results) == [200] * HALF_OPEN_REQUESTS
    assert breaker.state is State.CLOSED
    assert transitions(sc)["half_open->open"] == 0
