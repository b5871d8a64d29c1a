"""Open-loop HTTP/1.1 load at a fixed rate, with latency measured from each request's schedule.

    python benchmarks/openloop.py --url http://127.0.0.1:18090/bench/item?id=1 --rate 2000
        [--duration 5] [--warmup 1] [--connections 64] [--drain 5]

wrk is closed-loop: each connection sends its next request only when the previous answer
is in, so a slow server is offered less load and its stalls never show in the latencies
("coordinated omission"). wrk2 fixes that but is not packaged in Debian; this is the small
part of it the benchmark needs. Request i is due at start + i / rate, whatever happened
before. It goes out at once on a free keep-alive connection of the pool, or waits in a FIFO
queue for the first connection that frees up. Its latency runs from the time it was *due*
to the end of its response, so time spent queued behind a slow server counts.

The first `--warmup` seconds of the schedule are sent but not recorded. Requests still
unanswered `--drain` seconds after the last one was due are counted as `unfinished`, with
the time waited so far as their latency (a lower bound). `achieved_rps` is the number of
recorded requests answered divided by the time from the first one's schedule to the last
answer (at least `--duration`): a server that keeps up shows the offered rate, one that
falls behind less (its backlog from the warm-up included), whatever it drains later.

Prints one JSON object on stdout: offered and achieved rate, p50/p90/p99/p99.9/max latency
in ms, the responses per status, connection errors, and `sched_lag_p99_ms`, how late the
generator itself sent requests that found a free connection (its own precision). Runs on
uvloop where it is installed, with raw asyncio protocols (aiohttp's client costs several
times more per request). Exit status 0 when it ran, 1 when it could not connect at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import sys
import time
from collections import deque
from typing import cast
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # the sidecar's dependencies include it; plain asyncio works too
    uvloop = None  # type: ignore[assignment]

_now = time.perf_counter


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time, responses parsed by hand."""

    def __init__(self, load: OpenLoop) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due: float | None = None
        """When the request in flight was scheduled; None while the connection is idle."""
        self.closing = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.due is not None:
            done = self._parse()
            if done is None:
                return
            status, keep_alive = done
            due, self.due = self.due, None
            if not keep_alive:
                self.closing = True
            self.load.completed(self, due, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.due is not None:
            self.due = None
            self.load.failed(self)
        else:
            self.load.forget(self)
        if not self.lost.done():
            self.lost.set_result(None)

    # -- requests

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(self.load.request)

    def _parse(self) -> tuple[int, bool] | None:
        """(status, keep-alive) of a complete response at the buffer's start, consumed; or None."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        keep_alive = b"\r\nconnection: close" not in head
        body_start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if len(buf) < body_start + length:
                return None
            del buf[: body_start + length]
            return status, keep_alive
        if b"\r\ntransfer-encoding: chunked" in head:
            pos = body_start
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
                if size == 0:
                    trailer_end = buf.find(b"\r\n\r\n", line_end)
                    if trailer_end < 0:
                        return None
                    del buf[: trailer_end + 4]
                    return status, keep_alive
                pos = line_end + 2 + size + 2
                if len(buf) < pos:
                    return None
        # No length: the body ends with the connection (never the case for these servers).
        del buf[:body_start]
        return status, False


class OpenLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        if url.scheme != "http" or not url.hostname:
            raise SystemExit(f"openloop.py: {args.url!r}: only http://HOST:PORT/PATH URLs")
        self.host = url.hostname
        self.port = url.port or 80
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nUser-Agent: openloop\r\n\r\n"
        ).encode()
        self.args = args
        self.free: list[Connection] = []
        self.connections: set[Connection] = set()
        self.queue: deque[float] = deque()
        self.start = 0.0
        self.window = (0.0, 0.0)
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.last_done = 0.0
        self.outstanding = 0
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.all_done: asyncio.Event | None = None
        self.stopping = False
        self.scheduled = False

    # -- connections

    async def connect(self) -> Connection | None:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: Connection(self), self.host, self.port
            )
        except OSError:
            self.errors += 1
            return None
        self.connections.add(protocol)
        return protocol

    def replace(self, conn: Connection) -> None:
        """A connection is gone (error, or the server closed it): open another in its place."""
        self.connections.discard(conn)
        if conn in self.free:
            self.free.remove(conn)
        if self.stopping:
            return
        asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        for _ in range(50):
            conn = await self.connect()
            if conn is not None:
                self.idle(conn)
                return
            await asyncio.sleep(0.1)

    def idle(self, conn: Connection) -> None:
        if self.queue:
            conn.send(self.queue.popleft())
        else:
            self.free.append(conn)

    # -- outcomes (called by Connection)

    def completed(self, conn: Connection, due: float, status: int) -> None:
        now = _now()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self._record(due, now)
        if conn.closing:
            if conn.transport is not None:
                conn.transport.close()
        else:
            self.idle(conn)

    def failed(self, conn: Connection) -> None:
        self.errors += 1
        self._record(None, _now())
        self.replace(conn)

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.replace(conn)

    def _record(self, due: float | None, now: float) -> None:
        self.outstanding -= 1
        if due is not None and due >= self.window[0]:
            self.latencies.append(now - due)
            self.last_done = now
        if self.outstanding == 0 and self.scheduled and self.all_done is not None:
            self.all_done.set()

    # -- the schedule

    def dispatch(self, due: float, now: float) -> None:
        self.outstanding += 1
        if self.free:
            self.free.pop().send(due)
            if due >= self.window[0]:
                self.lags.append(now - due)
        else:
            self.queue.append(due)

    async def run(self) -> dict[str, object]:
        args = self.args
        conns = await asyncio.gather(*(self.connect() for _ in range(args.connections)))
        self.free = [c for c in conns if c is not None]
        if not self.free:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}")
        interval = 1.0 / args.rate
        total = math.ceil((args.warmup + args.duration) * args.rate)
        self.start = _now() + 0.01
        self.window = (self.start + args.warmup, self.start + args.warmup + args.duration)
        self.all_done = asyncio.Event()
        # No cyclic GC pass in the middle of the schedule: what a request allocates is freed
        # by reference counting alone, and a full collection would stall the sends.
        gc.collect()
        gc.freeze()
        gc.disable()
        i = 0
        while i < total:
            now = _now()
            due = self.start + i * interval
            while due <= now and i < total:
                self.dispatch(due, now)
                i += 1
                due = self.start + i * interval
            # Spin rather than sleep until the request is due: on a VM a timer wakes up a
            # millisecond late or worse, which would show as latency (CPU 1 is the load
            # generator's alone, as it is wrk's). A 1 us timer is 0 ms for libuv, so every
            # pass polls the sockets without blocking; `sleep(0)` starved them on uvloop.
            await asyncio.sleep(1e-6)
        last_due = self.start + (total - 1) * interval
        self.scheduled = True
        if self.outstanding:
            self.all_done.clear()
            timeout = max(0.0, last_due + args.drain - _now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_done.wait(), timeout)
        end = _now()
        unfinished = [end - due for due in self.queue if due >= self.window[0]]
        unfinished += [
            end - c.due for c in self.connections if c.due is not None and c.due >= self.window[0]
        ]
        self.stopping = True
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        low = self.window[0]
        answered = len(self.latencies)  # the recorded requests that got an answer
        latencies = sorted(self.latencies + unfinished)
        lags = sorted(self.lags)
        return {
            "url": args.url,
            "offered_rps": args.rate,
            "achieved_rps": round(answered / max(args.duration, self.last_done - low), 1),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "recorded": len(latencies),
            "unfinished": len(unfinished),
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": _ms(percentile(latencies, 50)),
            "p90_ms": _ms(percentile(latencies, 90)),
            "p99_ms": _ms(percentile(latencies, 99)),
            "p999_ms": _ms(percentile(latencies, 99.9)),
            "max_ms": _ms(latencies[-1] if latencies else math.nan),
            "sched_lag_p99_ms": _ms(percentile(lags, 99)),
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True, help="http://HOST:PORT/PATH?QUERY to GET")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=5, help="measured seconds (5)")
    parser.add_argument("--warmup", type=float, default=1, help="unrecorded seconds first (1)")
    parser.add_argument("--connections", type=int, default=64, help="keep-alive pool (64)")
    parser.add_argument(
        "--drain", type=float, default=5, help="seconds to wait for answers at the end (5)"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.connections < 1:
        parser.error("--rate, --duration and --connections must be positive, --warmup >= 0")
    load = OpenLoop(args)
    runner = asyncio.run if uvloop is None else uvloop.run
    try:
        result = runner(load.run())
    except ConnectionError as e:
        print(f"openloop.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
