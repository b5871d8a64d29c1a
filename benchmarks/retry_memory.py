"""Issue 15's memory bar: request bodies kept for a replay stay bounded.

    python benchmarks/retry_memory.py [--requests 1000] [--hold 60]

`sidecar run` (a child process, this checkout) with one route to an upstream in this
process that holds every request: it reads the whole body, then answers only when every
request is in (or after --hold seconds). N clients (default 1,000), each on its own
connection, PUT a body with a Content-Length at the same time. Once the upstream has every
body whole, the sidecar's resident memory (VmRSS in /proc/PID/status) is read and compared
with what it was before the load (after a warm-up of a few requests of the same size),
and its peak (VmHWM) likewise. Each case sends two such bursts, one after the other: what
the first leaves behind (freed, but kept by the allocator) must serve the second, not grow.
The growth per request is the larger of the two. Three cases, each with a fresh sidecar:

- `retry 64KiB`: `retry: {}` (replay_max_body 64 KiB): every body is kept until the
  answer's head, so each request should hold 64 KiB plus the per-request overhead;
- `plain 64KiB`: the same route without a retry policy: the overhead alone;
- `retry 1MiB`: `retry: {}`, bodies larger than replay_max_body, never kept: the overhead
  alone again, well below 1 MiB a request (the body streams through).

The bars: with `retry 64KiB`, the growth per request at most 64 KiB plus the `plain`
case's overhead plus 16 KiB of slack; with `retry 1MiB`, at most 64 KiB (replay_max_body):
a body buffered whole would cost 1 MiB. (The overhead in RSS is noisy, 20 to 45 KiB from
run to run: while a new upstream connection is being made, the upload's first reads wait
in memory, and memory freed after that stays resident.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from compare import (
    HOST,
    BenchError,
    Processes,
    free_port,
    raise_open_files,
    tail,
    wait_for_port,
)
from servekit import new_loop

KIB = 1024
SLACK_KIB = 16
"""Per request, beyond the body kept and the plain route's overhead: allocator slack."""
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
CASES = (("retry", 64 * KIB), ("plain", 64 * KIB), ("retry", 1024 * KIB))
WARM = 20
"""Requests of the same size sent (at once) before the baseline is read."""
BURSTS = 2
"""Bursts a case: what the first leaves behind (freed, kept by the allocator) must serve the
second, not add to it."""


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


class Upstream(asyncio.Protocol):
    """Reads one request (head and a Content-Length body), counts it whole, then answers
    when the holder says so. Keep-alive."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        self.head = b""
        self.left: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.left is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4 :]
            self.head = b""
            value = head.partition(b"\r\ncontent-length:")[2].partition(b"\r\n")[0]
            self.left = int(value)
        self.left -= len(data)
        if self.left <= 0:
            self.left = None
            self.holder.arrived(self)

    def answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(ANSWER)  # type: ignore[attr-defined]


class Holder:
    """The requests the upstream holds, and the moment it has `expected` of them."""

    def __init__(self) -> None:
        self.held: list[Upstream] = []
        self.expected = 0
        self.all_in = asyncio.Event()

    def arrived(self, protocol: Upstream) -> None:
        self.held.append(protocol)
        if len(self.held) >= self.expected:
            self.all_in.set()

    def release(self) -> None:
        held, self.held = self.held, []
        self.all_in.clear()
        for protocol in held:
            protocol.answer()


async def put(port: int, body: bytes) -> int:
    """One PUT on a connection of its own; the answer's status."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(
            b"PUT /up/item HTTP/1.1\r\nHost: %b:%d\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (HOST.encode(), port, len(body))
        )
        writer.write(body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Result:
    route: str
    size: int
    before_kib: int
    held_kib: list[int]
    """VmRSS with every request held at the upstream, in each burst."""
    peak_kib: int
    after_kib: int
    seconds: float
    statuses: dict[int, int]

    def growth(self, requests: int) -> float:
        return (max(self.held_kib) - self.before_kib) / requests

    def peak_growth(self, requests: int) -> float:
        return (self.peak_kib - self.before_kib) / requests


async def _finish(holder: Holder, tasks: list[asyncio.Future[int]]) -> list[int]:
    holder.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, int) else 0 for r in results]


async def one_case(
    processes: Processes, tmp: Path, route: str, size: int, n: int, hold: float
) -> Result:
    holder = Holder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(holder), HOST, 0, backlog=4096)
    upstream_port = server.sockets[0].getsockname()[1]
    port = free_port()
    config = tmp / f"{route}-{size}.yaml"
    config.write_text(
        f"listen: {HOST}:{port}\nadmin:\n  listen: {HOST}:0\nroutes:\n"
        f"  - name: up\n    match: {{path_prefix: /}}\n    upstream: http://{HOST}:{upstream_port}\n"
        "    timeouts: {request: 5m}\n" + ("    retry: {}\n" if route == "retry" else "")
    )
    log = tmp / f"{route}-{size}.log"
    child = processes.start([sys.executable, "-m", "sidecar", "run", "-c", str(config)], log)
    try:
        await loop.run_in_executor(None, wait_for_port, port, child, log)
        warm = await _warm(port, holder, size)
        if any(s != 200 for s in warm):
            raise BenchError(f"warm-up statuses {sorted(set(warm))}:\n{tail(log)}")
        await asyncio.sleep(0.5)
        before = status_kib(child.pid)
        body = b"x" * size
        held: list[int] = []
        statuses: list[int] = []
        seconds = 0.0
        for _ in range(BURSTS):
            started = time.monotonic()
            holder.expected = n
            tasks = [asyncio.ensure_future(put(port, body)) for _ in range(n)]
            try:
                await asyncio.wait_for(holder.all_in.wait(), hold)
            except TimeoutError:
                got = len(holder.held)
                await _finish(holder, tasks)
                raise BenchError(
                    f"only {got} of {n} requests reached the upstream:\n{tail(log)}"
                ) from None
            seconds = max(seconds, time.monotonic() - started)
            await asyncio.sleep(0.5)  # anything still moving settles
            held.append(status_kib(child.pid)["VmRSS"])
            statuses += await _finish(holder, tasks)
        after = status_kib(child.pid)
    finally:
        processes.stop(child)
        server.close()
    counted: dict[int, int] = {}
    for s in statuses:
        counted[s] = counted.get(s, 0) + 1
    return Result(
        route,
        size,
        before["VmRSS"],
        held,
        after["VmHWM"],
        after["VmRSS"],
        seconds,
        counted,
    )


async def _warm(port: int, holder: Holder, size: int) -> list[int]:
    holder.expected = WARM
    body = b"x" * size
    tasks = [asyncio.ensure_future(put(port, body)) for _ in range(WARM)]
    await asyncio.wait_for(holder.all_in.wait(), 30)
    return await _finish(holder, tasks)


def size_text(size: int) -> str:
    return f"{size // (1024 * KIB)}MiB" if size % (1024 * KIB) == 0 else f"{size // KIB}KiB"


async def run(args: argparse.Namespace) -> int:
    n = args.requests
    processes = Processes()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="retry-memory-") as tmp:
        try:
            for route, size in CASES:
                results.append(await one_case(processes, Path(tmp), route, size, n, args.hold))
        finally:
            processes.stop_all()
    print(
        f"{n} concurrent PUTs, each on its own connection, held at the upstream until all are "
        "in; the sidecar's memory, KiB"
    )
    print(
        f"{'case':<12} {'before':>8} {'held 1st':>8} {'held 2nd':>8} {'peak':>8} {'after':>8} "
        f"{'KiB/req held':>12} {'KiB/req peak':>12} {'all in s':>8}  statuses"
    )
    growth: dict[tuple[str, int], float] = {}
    for r in results:
        name = f"{r.route} {size_text(r.size)}"
        growth[(r.route, r.size)] = r.growth(n)
        statuses = " ".join(f"{s}x{c}" for s, c in sorted(r.statuses.items()))
        print(
            f"{name:<12} {r.before_kib:8d} {r.held_kib[0]:8d} {r.held_kib[-1]:8d} {r.peak_kib:8d} "
            f"{r.after_kib:8d} "
            f"{r.growth(n):12.1f} {r.peak_growth(n):12.1f} {r.seconds:8.1f}  {statuses}"
        )
    overhead = growth[("plain", 64 * KIB)]
    kept = growth[("retry", 64 * KIB)]
    big = growth[("retry", 1024 * KIB)]
    bound = 64 + overhead + SLACK_KIB
    print(
        f"kept bodies: retry - plain at 64 KiB = {kept - overhead:.1f} KiB a request "
        f"(the body is 64 KiB)"
    )
    print(
        f"bar, 64 KiB bodies kept within 64 KiB + the overhead ({overhead:.1f}) + "
        f"{SLACK_KIB} KiB = {bound:.1f} KiB a request: {kept:.1f} "
        f"({kept * n / 1024:.0f} MiB for {n}): {'PASS' if kept <= bound else 'FAIL'}"
    )
    print(
        f"bar, 1 MiB bodies not buffered, within 64 KiB (replay_max_body) a request: "
        f"{big:.1f}: {'PASS' if big <= 64 else 'FAIL'}"
    )
    wrong = [r for r in results if set(r.statuses) != {200}]
    if wrong:
        print("not every request was answered 200: " + ", ".join(r.route for r in wrong))
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="concurrent PUTs a case")
    parser.add_argument(
        "--hold", type=float, default=60, help="seconds to wait for every request to arrive"
    )
    args = parser.parse_args()
    limit = raise_open_files()
    if limit < 2 * args.requests + 64:
        print(f"the open-files limit is {limit}: too low for {args.requests} connections")
        return 1
    loop = new_loop()
    try:
        return loop.run_until_complete(run(args))
    except BenchError as e:
        print(f"cannot run: {e}")
        return 1
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
