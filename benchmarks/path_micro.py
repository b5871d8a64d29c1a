"""The request path's own CPU per request, without sockets: the sidecar against the floor.

    python benchmarks/path_micro.py [--rounds 7] [--requests 20000] [--floor PATH]

Drives one keep-alive GET at a time through the sidecar's real objects, with
transports that only collect what is written: the client connection parses the
request, the proxy routes and admits it, the exchange sends it on a pooled
upstream connection, that connection parses the answer, and the answer goes back
to the client. The same bytes go through `floor_proxy.py`'s two protocols
(from ../shared/perf, where it lies; skipped if it is not there). Interleaved
rounds; medians of microseconds per request (time.process_time). No syscalls
are in either figure: this is the Python (and parser) work a request costs,
what a profile under load spreads among the socket writes.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLOOR = REPO.parent / "shared" / "perf" / "floor_proxy.py"

REQUEST = (
    b"GET /api/item?id=7 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 100\r\n"
    b"Date: Mon, 07 Dec 2026 10:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n\r\n"
    + b"x" * 99
    + b"\n"
)


class Transport:
    """Collects what is written; says it is open."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("closed")

    def abort(self) -> None:
        raise AssertionError("aborted")


@dataclass
class Sidecar:
    """The sidecar's real request-path objects for one route `api` (`/api` -> an upstream
    that is never dialled), wired to collecting transports."""

    proxy: Any
    client: Any
    client_transport: Transport
    upstream: Any
    upstream_transport: Transport


def sidecar_objects(loop: asyncio.AbstractEventLoop, route_settings: str = "") -> Sidecar:
    """The objects, with `route_settings` (YAML lines indented as the route's keys) added to
    the route's config; the upstream connection is one idle in the pool."""
    from prometheus_client import CollectorRegistry

    from sidecar.config import load_config
    from sidecar.listener import ClientConnection, Listener
    from sidecar.metrics import Metrics
    from sidecar.proxy import Proxy
    from sidecar.timers import LoopTimers
    from sidecar.upstream_pool import Connection, Pool

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(
            "routes:\n  - name: api\n    match: {path_prefix: /api}\n"
            "    upstream: http://127.0.0.1:9000\n" + route_settings
        )
    config = load_config(f.name)
    timers = LoopTimers(loop)
    proxy = Proxy(config.routes, Metrics(CollectorRegistry(), "bench"))
    pool = Pool(timers)
    proxy.attach(pool, timers)
    listener = Listener(proxy.handle, timers, config.client_timeouts)
    client = ClientConnection(listener)
    client_transport = Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    origin = pool.origin("http://127.0.0.1:9000")
    upstream = Connection(pool, origin)
    upstream_transport = Transport()
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    pool.release(upstream)
    return Sidecar(proxy, client, client_transport, upstream, upstream_transport)


def sidecar_path(loop: asyncio.AbstractEventLoop, route_settings: str = "") -> Any:
    """A function that takes one request through the sidecar and checks its answer."""
    s = sidecar_objects(loop, route_settings)
    client, upstream = s.client, s.upstream
    client_transport, upstream_transport = s.client_transport, s.upstream_transport

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(ANSWER)

    one()
    assert upstream_transport.written[-1].startswith(b"GET /api/item?id=7 HTTP/1.1\r\n")
    assert client_transport.written[-1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert client_transport.written[-1].endswith(b"x" * 99 + b"\n")
    return one, (client_transport, upstream_transport)


def floor_path(path: Path) -> Any:
    """The same through floor_proxy.py's Down and Up protocols (its module body, which
    starts a server, is not run: its classes are taken from its source)."""
    source = path.read_text()
    source = source[: source.index("async def main")]
    spec = importlib.util.spec_from_loader("floor_proxy", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.argv = [str(path), "0", "127.0.0.1:9000"]
    exec(compile(source, str(path), "exec"), module.__dict__)
    down = module.Down()
    down_transport = Transport()
    down.connection_made(down_transport)
    up = module.Up(down)
    up_transport = Transport()
    up.connection_made(up_transport)
    down.up = up

    def one() -> None:
        down.data_received(REQUEST)
        up.data_received(ANSWER)

    one()
    assert up_transport.written[-1].startswith(b"GET /api/item?id=7 HTTP/1.1\r\n")
    assert b"".join(down_transport.written[-2:]).endswith(b"x" * 99 + b"\n")
    return one, (down_transport, up_transport)


def timed(one: Any, transports: tuple[Transport, ...], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        one()
    elapsed = time.process_time() - started
    for transport in transports:
        transport.written.clear()
    return elapsed / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--floor", type=Path, default=FLOOR)
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    setups = {"sidecar": sidecar_path(loop)}
    if args.floor.exists():
        setups["floor"] = floor_path(args.floor)
    else:
        print(f"(no floor: {args.floor} is not there)")
    results: dict[str, list[float]] = {name: [] for name in setups}
    for one, transports in setups.values():
        timed(one, transports, args.requests // 10)  # warm up
    for _ in range(args.rounds):
        for name, (one, transports) in setups.items():
            results[name].append(timed(one, transports, args.requests))
    print(f"{args.rounds} interleaved rounds x {args.requests} requests; CPU us per request")
    for name, times in results.items():
        rounded = " ".join(f"{t:.2f}" for t in times)
        print(f"{name:<8} median {statistics.median(times):6.2f}   rounds {rounded}")
    if "floor" in results:
        extra = statistics.median(results["sidecar"]) - statistics.median(results["floor"])
        print(f"the sidecar's own work beyond the floor: {extra:.2f} us a request")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
