"""`sidecar demo`: a flaky upstream and the proxy in one process, and the breaker's timeline.

The scenario is the seed's: threshold 3, the upstream fails, the circuit opens,
requests are answered at once with a shrinking Retry-After, a half-open probe
fails and re-opens it, the upstream recovers, the next probe closes it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

import aiohttp
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.breaker import Breaker, Clock, State
from sidecar.config import parse_config

__all__ = ["DEMO_CONFIG", "run_demo"]

OPEN_SECONDS = 4
DEMO_CONFIG = f"""
listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
routes:
  - name: orders
    match:
      path_prefix: /orders
    upstream: http://127.0.0.1:{{port}}
    breaker:
      failure_threshold: 3
      open_duration: {OPEN_SECONDS}s
      half_open_requests: 1
      success_threshold: 1
"""


class FlakyUpstream:
    """An upstream whose health the demo switches; it counts the requests that reach it."""

    def __init__(self) -> None:
        self.healthy = True
        self.hits = 0

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        if self.healthy:
            return web.json_response({"order": 42, "status": "shipped"})
        return web.json_response({"error": "database unavailable"}, status=500)


class Timeline:
    """Prints one line per request and per state change, with the time since the start."""

    def __init__(self, out: TextIO, threshold: int, clock: Clock) -> None:
        self.out = out
        self.clock = clock
        self.started = clock()
        self.threshold = threshold
        self._pending: list[str] = []

    def line(self, text: str) -> None:
        print(f"  {self.clock() - self.started:5.1f}s  {text}", file=self.out, flush=True)
        self.flush()

    def flush(self) -> None:
        """Print the state changes seen since the last line."""
        for pending in self._pending:
            print(f"  {'':5}   {pending}", file=self.out, flush=True)
        self._pending.clear()

    def note(self, text: str) -> None:
        print(f"\n  -- {text}", file=self.out, flush=True)

    def on_transition(self, breaker: Breaker, from_state: State, to_state: State) -> None:
        why = {
            (State.CLOSED, State.OPEN): f"{self.threshold} consecutive failures",
            (State.OPEN, State.HALF_OPEN): f"{OPEN_SECONDS}s are up; one probe may pass",
            (State.HALF_OPEN, State.OPEN): f"the probe failed; open for {OPEN_SECONDS}s more",
            (State.HALF_OPEN, State.CLOSED): "the probe succeeded",
        }[from_state, to_state]
        self._pending.append(f"** {from_state.name} -> {to_state.name}: {why}")


async def run_demo(
    out: TextIO = sys.stdout,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Run the tour; tests pass a fake `clock` and a `sleep` that advances it."""
    flaky = FlakyUpstream()
    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{path:.*}", flaky.handle)
    upstream_runner = web.AppRunner(upstream_app, access_log=None)
    await upstream_runner.setup()
    site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await site.start()
    port = upstream_runner.addresses[0][1]

    config = parse_config(DEMO_CONFIG.format(port=port), "demo.yaml")
    sidecar = Sidecar(config, clock=clock)
    breaker = sidecar.proxy.breakers[0]
    threshold = breaker.settings.failure_threshold
    assert threshold is not None, "the demo's route opens on consecutive failures"
    timeline = Timeline(out, threshold, clock)
    breaker.add_listener(timeline.on_transition)
    await sidecar.start()
    proxy = f"http://{sidecar.addresses['proxy']}"
    admin = f"http://{sidecar.addresses['admin']}"
    print(
        f"sidecar demo: a flaky upstream on 127.0.0.1:{port}, the proxy on {proxy[7:]}\n"
        f'route "orders": failure_threshold 3, open_duration {OPEN_SECONDS}s, '
        "half_open_requests 1, success_threshold 1",
        file=out,
    )
    try:
        async with aiohttp.ClientSession() as client:

            async def get() -> None:
                hits = flaky.hits
                probe = breaker.state is State.HALF_OPEN
                timeline.flush()
                async with client.get(f"{proxy}/orders/42") as response:
                    await response.read()
                reached = "reached the upstream" if flaky.hits > hits else "upstream not contacted"
                status = response.status
                if status == 503 and "Retry-After" in response.headers:
                    error = json.loads(await response.text())["error"]
                    detail = f"{error}, Retry-After: {response.headers['Retry-After']}"
                elif probe:
                    detail = "probe failed" if status >= 500 else "probe ok"
                elif status >= 500:
                    detail = f"failure {breaker.consecutive_failures}/{timeline.threshold}"
                else:
                    detail = "ok"
                timeline.line(f"GET /orders/42 -> {status}  {detail:<34} ({reached})")

            timeline.note("the upstream is healthy")
            for _ in range(2):
                await get()
            timeline.note("the upstream starts failing (answers 500)")
            flaky.healthy = False
            for _ in range(3):
                await get()
            timeline.note("while OPEN, the sidecar answers at once, never touching the upstream")
            await _poll_until_half_open(breaker, get, sleep)
            await get()  # the probe: the upstream still fails
            timeline.note("the upstream recovers; the circuit stays open until its period is over")
            flaky.healthy = True
            await _poll_until_half_open(breaker, get, sleep)
            await get()  # the probe succeeds
            for _ in range(2):
                await get()

            async with client.get(f"{admin}/metrics") as response:
                metrics = await response.text()
        print("\nFrom the admin listener's /metrics:", file=out)
        for line in metrics.splitlines():
            if line.startswith(("sidecar_breaker_state{", "sidecar_breaker_transitions_total{")):
                print(f"  {line}", file=out)
        print(
            "\nNext: write routes for your own upstreams (start from config.example.yaml),\n"
            "  sidecar check -c config.example.yaml\n"
            "  sidecar run -c config.example.yaml\n"
            "then point your service's outbound HTTP at the proxy (:8080) and scrape\n"
            "http://127.0.0.1:9901/metrics (also /breakers, /healthz, /readyz).",
            file=out,
        )
    finally:
        await sidecar.stop()
        await upstream_runner.cleanup()
    return 0


async def _poll_until_half_open(
    breaker: Breaker,
    get: Callable[[], Awaitable[None]],
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """One request a second while OPEN, so that the Retry-After is seen counting down."""
    while breaker.state is State.OPEN:
        await get()
        await sleep(1.0)
