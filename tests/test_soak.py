"""50,000 requests of every kind through a real `sidecar run`: nothing leaks.

The sidecar runs as a child process, so that its own file descriptors, memory
and stderr can be read: /proc/PID/fd, /proc/PID/status, and every line it logs.
The upstream is in this process: it answers, fails, or holds a request until
the sidecar's request timeout (504) or the client (which gives up) cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import running

REQUESTS = 50_000
WARM_UP = 3_000
CONCURRENCY = 50
RSS_GROWTH_BOUND = 10 * 2**20
"""Bytes the sidecar's resident memory may grow by over the soak, after its warm-up."""
SOCKET_BOUND = 2 * CONCURRENCY + 10
"""Sockets the sidecar may hold at any moment: a client connection and a pooled upstream
one per concurrent client, its listeners and the scrape's. How many idle connections
each pool holds when counted is chance; a leak over 50,000 requests would be thousands."""
OTHER_FD_SLACK = 2
"""Non-socket descriptors (files, pipes, the event loop's) the sidecar may gain."""

# What each request asks the upstream for, and how often.
MIX = [("/ok", 77), ("/fail", 15), ("/hang", 4), ("/cancel", 4)]


def fds(pid: int) -> tuple[int, int]:
    """(sockets, other descriptors) the process holds."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = sum(link.startswith("socket:") for link in links)
    return sockets, len(links) - sockets


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found
    return int(found[1]) * 1024


async def upstream_server() -> TestServer:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok" * 50)

    async def fail(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="no")

    async def hang(_request: web.Request) -> web.Response:
        await asyncio.Event().wait()  # until the sidecar or its client gives up
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/hang", hang)
    app.router.add_get("/cancel", hang)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def drive(
    http: aiohttp.ClientSession, proxy: str, n: int, rng: random.Random
) -> Counter[str]:
    """`n` requests from CONCURRENCY workers; how each ended, by status or 'gave up'."""
    paths = [path for path, weight in MIX for _ in range(weight)]
    outcomes: Counter[str] = Counter()
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            path = rng.choice(paths)
            try:
                async with asyncio.timeout(0.05 if path == "/cancel" else 10):
                    async with http.get(f"http://{proxy}{path}") as response:
                        await response.read()
                        outcomes[str(response.status)] += 1
            except TimeoutError:
                outcomes["gave up"] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


async def scrape(http: aiohttp.ClientSession, admin: str) -> str:
    async with http.get(f"http://{admin}/metrics") as response:
        return await response.text()


@pytest.mark.slow
async def test_50000_mixed_requests_leak_no_descriptors_memory_or_tasks(tmp_path: Path) -> None:
    upstream = await upstream_server()
    config = tmp_path / "soak.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - name: soak
    match: {{path_prefix: /}}
    upstream: http://127.0.0.1:{upstream.port}
    timeouts: {{request: 200ms}}
    breaker:                       # open only if nothing at all gets through: the soak
      failure_threshold: 1000000   # is about resources, so the route stays CLOSED,
      window: {{duration: 10s, min_requests: 1000}}   # but the window works all along
      failure_rate: 100%
"""
    )
    rng = random.Random(4)
    try:
        async with running(str(config), "-W", "error::ResourceWarning") as (process, proxy, admin):
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(connector=connector) as http:
                warm = await drive(http, proxy, WARM_UP, rng)
                fds_before, rss_before = fds(process.pid), rss(process.pid)

                seen = await drive(http, proxy, REQUESTS, rng)

                metrics = await scrape(http, admin)
                assert 'sidecar_in_flight_requests{route="soak"} 0.0' in metrics
                fds_after, rss_after = fds(process.pid), rss(process.pid)
            # Every request ended one way or another, and the sidecar counted what clients saw.
            assert sum(seen.values()) == REQUESTS
            assert set(seen) == {"200", "500", "504", "gave up"}, seen
            assert seen["gave up"] > 1000 and seen["504"] > 1000  # the mix really was mixed
            # The sidecar counted every answer a client saw; beyond those, at most the ones
            # it sent just as their client gave up.
            total = warm + seen
            counted = {
                code: float(
                    re.search(
                        rf'sidecar_requests_total{{code="{code}",route="soak"}} (\S+)', metrics
                    )[1]  # type: ignore[index]
                )
                for code in ("200", "500", "504")
            }
            for code, n in counted.items():
                assert n >= total[code], (code, n, total[code])
            assert sum(counted.values()) - sum(total[c] for c in counted) <= total["gave up"]
            assert fds_after[0] <= SOCKET_BOUND, (fds_before, fds_after)
            assert fds_after[1] <= fds_before[1] + OTHER_FD_SLACK, (fds_before, fds_after)
            assert rss_after - rss_before <= RSS_GROWTH_BOUND, (rss_before, rss_after)
            # The upstream's connections from the sidecar are back to the pool's size.
            assert upstream.runner is not None and upstream.runner.server is not None
            assert len(upstream.runner.server.connections) <= CONCURRENCY
            print(
                f"\nsoak: {dict(seen)}; sidecar fds {fds_before} -> {fds_after}, "
                f"rss {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
            )
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == 0
            assert process.stderr is not None
            log = (await process.stderr.read()).decode()
    finally:
        await upstream.close()
    troubles = ("Traceback", "Task was destroyed", "Unclosed", "Exception ignored", '"error"')
    for trouble in troubles:  # (JSON lines: '"level": "error"' is an error line)
        assert trouble not in log, log[-3000:]
