"""Issue 16: WebSocket echo round trips through the sidecar against straight to the upstream.

    python benchmarks/websocket_echo.py [--rounds 5] [--duration 5] [--warmup 1]
                                        [--sessions 1,1000] [--size 64] [--upstream raw|aiohttp]
                                        [--targets direct,nginx,sidecar]
                                        [--placement alone|with-upstream] [--no-quiet] [--quick]

Three processes besides this one, each pinned with `taskset`:

- the echo upstream on CPU 1 (`--placement with-upstream`: on CPU 0, with the proxy, as
  compare.py places its servers): by default (`--upstream raw`) a small uvloop server that
  answers the WebSocket handshake (`Sec-WebSocket-Accept` computed as RFC 6455 says) and
  sends every data frame back unmasked, answers a ping with a pong and a close with a
  close; with `--upstream aiohttp`, aiohttp's `web.WebSocketResponse` echoing each message
  (about 1.6 times its CPU a message). It runs for the whole benchmark;
- the proxy on CPU 0 (alone there by default): the sidecar, `sidecar run` (this checkout)
  with one catch-all route to the upstream, `max_websocket_sessions` above the largest
  session count and every other setting at its default; or nginx (below);
- the load client on CPU 1, beside the upstream (two cores: one of them must share, and the
  sidecar is the process measured): uvloop, raw asyncio protocols. It opens N sessions (100
  handshakes at a time), and each session sends one binary message of `--size` bytes
  (masked, as a client must), waits for the echo, checks it byte for byte, and sends the
  next at once: one message in flight per session. After `--warmup` seconds it records,
  for `--duration` seconds, every round trip's time (from the write of the message to the
  arrival of its whole echo), then closes each session with a close frame.

Each round starts nginx and the sidecar afresh, then runs every session count against each
target: straight to the upstream (`direct`), through `nginx` (one worker, proxying WebSocket
as its documentation sets it up: the reference for what any proxy adds on this machine), and
through the `sidecar`, the order of the three rotating from round to round. Over each run's
recorded window the client reads the CPU time of itself, the upstream and the proxy (every
thread and process: /proc/PID/task/*/schedstat), of every other thread on the machine
(`others`), and the hypervisor's steal (/proc/stat). The report gives the medians over the
rounds: messages per second (all sessions together), p50/p99/p99.9 of the round trips, the
CPU per message of each process and its share of a CPU; then for each proxy the ratio to
`direct` of messages per second and the added p50/p99/p99.9 (proxy minus direct), and the
sidecar against nginx, each as the ratio (or difference) of the medians and as the median
and range of the per-round figures.

The machine may be shared: before each run the script waits (two minutes at most) until
every other thread together uses under 10 % of a CPU, and a run during which they used more
is run again, twice at most (the report lists any it kept); `--no-quiet` turns both off.

Reading it: with the default placement, every message through a proxy crosses between the
two CPUs four times, where straight to the upstream it never leaves CPU 1; so with one
session the added latency is mostly four cross-CPU wake-ups of this VM, the same through
either proxy. With 1,000 sessions the proxy and CPU 1 work as a pipeline, and the busier
side sets the pace: when CPU 1 (client + upstream) is the busier, the proxy keeps up and
its own cost shows in its CPU per message rather than in the throughput (1e6 over it is
what one core would relay at that cost, printed beside it), so read the CPU columns before
the ratio. `--placement with-upstream` puts the upstream beside the proxy instead: CPU 0
then saturates first, and the throughput ratio is the proxy's cost.

The exit status is 1 when the benchmark cannot run (a server that does not start, a
session that cannot open, a wrong echo), else 0: this is a report, there is no bar.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from compare import (
    HOST,
    QUIET_ATTEMPTS,
    QUIET_PCT,
    SETUPS,
    BenchError,
    Processes,
    add_quiet_option,
    all_tasks,
    cpu_model,
    cpu_seconds,
    disturbed_note,
    ensure_tools,
    free_port,
    median,
    nginx_argv,
    nginx_report_head,
    once_more,
    pinned,
    raise_open_files,
    spread,
    steal_seconds,
    tail,
    tasks_seconds,
    wait_for_port,
    wait_quiet,
)
from servekit import new_loop

PROXY_CPU = "0"
CLIENT_CPU = "1"
UPSTREAM_CPU = {"alone": "1", "with-upstream": "0"}
"""Where the upstream runs, by `--placement`: with the client (the proxy alone on its core),
or with the proxy (as compare.py places its servers)."""
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OPENING = 100
"""Handshakes in flight at a time while the sessions open."""
SESSIONS_CAP = 4096
"""The route's `max_websocket_sessions` (default 1,000): above any session count here, so a
session the sidecar is still closing from the last run never turns one away."""


# -- frames -------------------------------------------------------------------------------


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame_head(opcode: int, length: int, mask: bytes = b"") -> bytes:
    """A final frame's head (mask bit set when `mask` is given, the key after the length)."""
    bit = 0x80 if mask else 0
    if length < 126:
        head = bytes((0x80 | opcode, bit | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, bit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, bit | 127)) + length.to_bytes(8, "big")
    return head + mask


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


# -- the raw echo upstream ----------------------------------------------------------------


class EchoUpstream(asyncio.Protocol):
    """One connection: the handshake, then every data frame echoed (unmasked), a ping
    answered with a pong, a close with a close (then the connection closes)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        data = self.buffer + data if self.buffer else data
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            key = b""
            for line in data[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if not key:
                transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                transport.close()
                return
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %b\r\n\r\n" % accept_key(key)
            )
            self.open = True
            data = data[end + 4 :]
        while len(data) >= 2:
            opcode = data[0] & 0x0F
            masked = data[1] & 0x80
            length = data[1] & 0x7F
            at = 2
            if length == 126:
                at = 4
                length = int.from_bytes(data[2:4], "big")
            elif length == 127:
                at = 10
                length = int.from_bytes(data[2:10], "big")
            if masked:
                at += 4
            if len(data) < at + length:
                break
            payload = data[at : at + length]
            if masked:
                payload = apply_mask(payload, data[at - 4 : at])
            data = data[at + length :]
            if opcode == 0x8:  # close: the same code back, then the end
                transport.write(frame_head(0x8, min(len(payload), 2)) + payload[:2])
                transport.close()
                return
            if opcode == 0x9:  # ping
                transport.write(frame_head(0xA, len(payload)) + payload)
            elif opcode in (0x0, 0x1, 0x2):
                transport.write(frame_head(opcode, len(payload)) + payload)
        self.buffer = data


async def serve_raw(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoUpstream, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def serve_aiohttp(port: int) -> None:
    from aiohttp import WSMsgType, web
    from servekit import catch_all, serve

    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    serve(catch_all(echo), argparse.Namespace(host=HOST, port=port))


def upstream_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the echo upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=("raw", "aiohttp"), default="raw")
    args = parser.parse_args(argv)
    if args.kind == "aiohttp":
        serve_aiohttp(args.port)
        return 0
    loop = new_loop()
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(serve_raw(args.port))
    return 0


# -- the load client ----------------------------------------------------------------------


class Load:
    """What the sessions share: the recorded round trips, and whether to record or stop."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.recording = False
        self.stopping = False
        self.errors: list[str] = []


class Session(asyncio.Protocol):
    """One WebSocket session: the handshake, then one message in flight at a time."""

    def __init__(self, load: Load, host: str, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.load = load
        self.host = host
        self.key = base64.b64encode(os.urandom(16))
        mask = os.urandom(4)
        self.frame = frame_head(0x2, len(payload), mask) + apply_mask(payload, mask)
        self.echo = frame_head(0x2, len(payload)) + payload
        self.close_frame = frame_head(0x8, 2, mask) + apply_mask((1000).to_bytes(2, "big"), mask)
        self.transport: asyncio.Transport | None = None
        self.rest = b""
        self.handshaking = True
        self.closing = False
        self.sent = 0
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            b"GET /echo HTTP/1.1\r\nHost: %b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.host.encode(), self.key)
        )

    def data_received(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        if self.handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.rest = data
                return
            head, data = data[:end], data[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101 ") or accept_key(self.key) not in head:
                self._fail(f"handshake answered {head[:300]!r}")
                return
            self.handshaking = False
            if not self.opened.done():
                self.opened.set_result(None)
        if self.closing:
            self.rest = b""  # the answer to the close frame
            return
        echo = self.echo
        need = len(echo)
        while len(data) >= need:
            got, data = data[:need], data[need:]
            if got != echo:
                self._fail(f"the echo differs: {got[:80]!r}")
                return
            self.answered()
            if self.closing:
                data = b""
        self.rest = data

    def send(self) -> None:
        transport = self.transport
        if transport is not None:
            self.sent = time.perf_counter_ns()
            transport.write(self.frame)

    def answered(self) -> None:
        now = time.perf_counter_ns()
        load = self.load
        if load.recording:
            load.samples.append(now - self.sent)
        transport = self.transport
        if transport is None:
            return
        if load.stopping:
            self.closing = True
            transport.write(self.close_frame)
            return
        self.sent = now
        transport.write(self.frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake ({exc})"))
        elif not self.load.stopping:
            self.load.errors.append(f"a session closed mid-run ({exc})")
        if not self.lost.done():
            self.lost.set_result(None)

    def _fail(self, why: str) -> None:
        self.load.errors.append(why)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()


Snapshot = tuple[float, dict[str, float], dict[str, int], dict[str, float]]


def snapshot(pids: dict[str, int]) -> Snapshot:
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return time.perf_counter(), cpu, all_tasks(), steal_seconds()


def percentile(ordered: list[int], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted nanoseconds, in microseconds."""
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank] / 1000


async def client(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    load = Load()
    payload = bytes(i % 251 for i in range(args.size))
    host = f"{HOST}:{args.port}"
    sessions: list[Session] = []
    gate = asyncio.Semaphore(OPENING)

    async def open_one() -> None:
        async with gate:
            session = Session(load, host, payload)
            sessions.append(session)
            await loop.create_connection(lambda: session, HOST, args.port)
            await asyncio.wait_for(session.opened, 15)

    started = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(args.sessions)))
    opening = time.perf_counter() - started
    for session in sessions:
        session.send()
    await asyncio.sleep(args.warmup)
    pids = {"client": os.getpid()}
    for item in filter(None, args.pids.split(",")):
        name, _, pid = item.partition("=")
        pids[name] = int(pid)
    gc.collect()
    gc.disable()
    t0, cpu0, all0, steal0 = snapshot(pids)
    load.recording = True
    await asyncio.sleep(args.duration)
    load.recording = False
    t1, cpu1, all1, steal1 = snapshot(pids)
    gc.enable()
    load.stopping = True
    await asyncio.wait([s.lost for s in sessions], timeout=5)
    for s in sessions:
        if s.transport is not None:
            s.transport.abort()
    seconds = t1 - t0
    samples = sorted(load.samples)
    return {
        "sessions": args.sessions,
        "seconds": seconds,
        "opening_s": opening,
        "messages": len(samples),
        "rate": len(samples) / seconds,
        "p50_us": percentile(samples, 50),
        "p90_us": percentile(samples, 90),
        "p99_us": percentile(samples, 99),
        "p999_us": percentile(samples, 99.9),
        "max_us": samples[-1] / 1000 if samples else float("nan"),
        "cpu_s": {name: cpu1[name] - cpu0[name] for name in pids},
        "all_s": tasks_seconds(all0, all1),
        "steal_s": {cpu: steal1[cpu] - steal0.get(cpu, 0.0) for cpu in steal1},
        "errors": load.errors[:5],
        "error_count": len(load.errors),
    }


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the load client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--pids", default="", help="name=PID,... whose CPU time to read")
    args = parser.parse_args(argv)
    loop = new_loop()
    try:
        result = loop.run_until_complete(client(args))
    except (OSError, TimeoutError) as e:
        print(f"cannot run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    print(json.dumps(result))
    return 0 if not result["error_count"] else 1


# -- the benchmark ------------------------------------------------------------------------

TARGETS = ("direct", "nginx", "sidecar")
PROXIES = ("nginx", "sidecar")


@dataclass
class Run:
    target: str
    sessions: int
    result: dict[str, Any]

    def get(self, key: str) -> float:
        return float(self.result[key])

    def cpu_us(self, name: str) -> float:
        seconds = self.result["cpu_s"].get(name)
        if seconds is None or not self.result["messages"]:
            return float("nan")
        return float(seconds) / self.get("messages") * 1e6

    def share(self, name: str) -> float:
        """A process's CPU time over the window, % of one CPU."""
        seconds = self.result["cpu_s"].get(name)
        return float("nan") if seconds is None else 100 * float(seconds) / self.get("seconds")

    def others_pct(self) -> float:
        """CPU time that none of the measured processes used (kernel threads, anything else
        running on the machine), % of one CPU: a disturbance shows here."""
        ours = sum(float(v) for v in self.result["cpu_s"].values())
        return 100 * (self.get("all_s") - ours) / self.get("seconds")

    def steal_pct(self) -> float:
        stolen = [float(v) for v in self.result["steal_s"].values()]
        return 100 * max(stolen, default=0.0) / self.get("seconds")


def sidecar_command(tmp: Path, port: int, upstream_port: int) -> list[str]:
    path = tmp / f"sidecar-{port}.yaml"
    path.write_text(
        f"listen: {HOST}:{port}\nadmin:\n  listen: {HOST}:0\nroutes:\n"
        f"  - name: echo\n    match: {{path_prefix: /}}\n"
        f"    upstream: http://{HOST}:{upstream_port}\n"
        f"    max_websocket_sessions: {SESSIONS_CAP}\n"
    )
    return [sys.executable, "-m", "sidecar", "run", "-c", str(path)]


def nginx_command(tmp: Path, port: int, upstream_port: int) -> list[str]:
    """nginx as a WebSocket proxy, as its documentation sets one up: one worker, HTTP/1.1 to
    the upstream with the client's `Upgrade` and `Connection: upgrade`, an hour's read
    timeout (the sidecar's `websocket_idle`), no access log."""
    return nginx_argv(
        tmp / f"nginx-{port}",
        f"""    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://{HOST}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}""",
    )


PROXY_COMMANDS = {"nginx": nginx_command, "sidecar": sidecar_command}


def run_client(
    processes: Processes,
    tmp: Path,
    port: int,
    sessions: int,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:
    log = tmp / f"client-{port}-{sessions}.log"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_client",
        f"--port={port}",
        f"--sessions={sessions}",
        f"--size={args.size}",
        f"--warmup={args.warmup}",
        f"--duration={args.duration}",
        "--pids=" + ",".join(f"{name}={pid}" for name, pid in pids.items()),
    ]
    child = processes.start(pinned(CLIENT_CPU, argv), log)
    try:
        child.wait(args.warmup + args.duration + 60)
    except subprocess.TimeoutExpired:
        processes.stop(child)
        raise BenchError(f"the client did not finish:\n{tail(log)}") from None
    processes.stop(child)
    output = log.read_text(errors="replace")
    log.unlink()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"the client ({sessions} sessions, port {port}) failed:\n{output[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if result["error_count"]:
        raise BenchError(
            f"the client ({sessions} sessions, port {port}) saw {result['error_count']} errors: "
            + "; ".join(result["errors"])
        )
    return result


Runs = dict[tuple[int, str], list[Run]]
"""(sessions, target): one run a round, in round order."""


def table(runs: Runs, args: argparse.Namespace) -> list[str]:
    lines = [
        f"{'sessions':>8} {'target':<8} {'msg/s':>7} {'p50 us':>7} {'p99 us':>7} "
        f"{'p99.9 us':>8} | {'proxy':>6} {'upstr':>6} {'client':>6} | {'proxy':>5} "
        f"{'upstr':>5} {'client':>6} {'others':>6} {'steal':>5} | msg/s per round",
        f"{'':>8} {'':<8} {'':>7} {'':>7} {'':>7} {'':>8} | {'CPU us a message':>20} | "
        f"{'% of a CPU':>31} |",
    ]
    for sessions in args.sessions:
        for target in args.targets:
            got = runs.get((sessions, target), [])
            if not got:
                continue

            def med(key: Callable[[Run], float], got: list[Run] = got) -> float:
                return median([key(r) for r in got])

            direct = target == "direct"
            proxy_us = "-" if direct else f"{med(lambda r: r.cpu_us('proxy')):.1f}"
            proxy_pct = "-" if direct else f"{med(lambda r: r.share('proxy')):.0f}"
            lines.append(
                f"{sessions:>8} {target:<8} {med(lambda r: r.get('rate')):>7.0f} "
                f"{med(lambda r: r.get('p50_us')):>7.0f} {med(lambda r: r.get('p99_us')):>7.0f} "
                f"{med(lambda r: r.get('p999_us')):>8.0f} | {proxy_us:>6} "
                f"{med(lambda r: r.cpu_us('upstream')):>6.1f} "
                f"{med(lambda r: r.cpu_us('client')):>6.1f} | {proxy_pct:>5} "
                f"{med(lambda r: r.share('upstream')):>5.0f} "
                f"{med(lambda r: r.share('client')):>6.0f} "
                f"{med(Run.others_pct):>6.1f} {med(Run.steal_pct):>5.1f} | "
                + " ".join(f"{r.get('rate'):.0f}" for r in got)
            )
    return lines


def comparisons(runs: Runs, args: argparse.Namespace) -> list[str]:
    lines = [
        "ratio of the medians (or difference of the medians) [median of the per-round "
        "figures, min..max]:"
    ]
    for sessions in args.sessions:
        direct = runs.get((sessions, "direct"), [])
        for proxy in PROXIES:
            through = runs.get((sessions, proxy), [])
            if not through:
                continue
            cpu = median([t.cpu_us("proxy") for t in through])
            line = f"  {sessions:>5} sessions, {proxy:<7}: {cpu:.1f} us CPU a message"
            line += f" (one core relays ~{1e6 / cpu:.0f} msg/s at that)" if cpu > 0 else ""
            if direct:
                pairs = list(zip(direct, through, strict=True))
                ratio = median([t.get("rate") for t in through]) / median(
                    [d.get("rate") for d in direct]
                )
                line += (
                    f"; msg/s / direct {ratio:.3f} "
                    f"[{spread([t.get('rate') / d.get('rate') for d, t in pairs], '.3f')}]"
                )
                for key, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
                    added = median([t.get(key) for t in through]) - median(
                        [d.get(key) for d in direct]
                    )
                    line += (
                        f"; added {name} {added:+.0f} us "
                        f"[{spread([t.get(key) - d.get(key) for d, t in pairs], '+.0f')}]"
                    )
            lines.append(line)
        nginx = runs.get((sessions, "nginx"), [])
        sidecar = runs.get((sessions, "sidecar"), [])
        if nginx and sidecar:
            pairs_n = list(zip(nginx, sidecar, strict=True))
            rate = median([s.get("rate") for s in sidecar]) / median([n.get("rate") for n in nginx])
            cpu_ratio = median([s.cpu_us("proxy") for s in sidecar]) / median(
                [n.cpu_us("proxy") for n in nginx]
            )
            p99 = median([s.get("p99_us") for s in sidecar]) - median(
                [n.get("p99_us") for n in nginx]
            )
            lines.append(
                f"  {sessions:>5} sessions, sidecar / nginx: msg/s {rate:.3f} "
                f"[{spread([s.get('rate') / n.get('rate') for n, s in pairs_n], '.3f')}]; "
                f"CPU a message {cpu_ratio:.2f}x "
                f"[{spread([s.cpu_us('proxy') / n.cpu_us('proxy') for n, s in pairs_n], '.2f')}]"
                f"; p99 {p99:+.0f} us "
                f"[{spread([s.get('p99_us') - n.get('p99_us') for n, s in pairs_n], '+.0f')}]"
            )
    return lines


def describe(args: argparse.Namespace) -> list[str]:
    try:
        import uvloop

        uv = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        uv = "no uvloop"
    return [
        *nginx_report_head(
            f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, {uv}"
        ),
        f"placement {args.placement}: the proxy (nginx or the sidecar) on CPU {PROXY_CPU}, the "
        f"{args.upstream} echo upstream on CPU {UPSTREAM_CPU[args.placement]}, the client on "
        f"CPU {CLIENT_CPU}",
        f"load      {args.size}-byte binary messages, one in flight per session; sessions "
        f"{', '.join(map(str, args.sessions))}; {args.rounds} rounds x {args.duration:g} s "
        f"(+{args.warmup:g} s warm-up), the order of {', '.join(args.targets)} rotating",
    ]


def run(args: argparse.Namespace) -> int:
    processes = Processes()
    runs: Runs = {}
    started = time.monotonic()
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="websocket-echo-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream_port = free_port()
            log = tmp / "upstream.log"
            argv = [sys.executable, script, "_upstream", f"--port={upstream_port}"]
            upstream = processes.start(
                pinned(UPSTREAM_CPU[args.placement], [*argv, f"--kind={args.upstream}"]), log
            )
            wait_for_port(upstream_port, upstream, log)
            for n in range(args.rounds):
                shift = n % len(args.targets)
                order = args.targets[shift:] + args.targets[:shift]
                ports = {"direct": upstream_port}
                pids = {"direct": {"upstream": upstream.pid}}
                logs = {"direct": log}
                children = []
                for proxy in (t for t in order if t != "direct"):
                    port = free_port()
                    logs[proxy] = tmp / f"{proxy}-{n}.log"
                    child = processes.start(
                        pinned(PROXY_CPU, PROXY_COMMANDS[proxy](tmp, port, upstream_port)),
                        logs[proxy],
                    )
                    children.append(child)
                    wait_for_port(port, child, logs[proxy])
                    ports[proxy] = port
                    pids[proxy] = {"upstream": upstream.pid, "proxy": child.pid}
                for sessions in args.sessions:
                    for target in order:
                        for attempt in range(QUIET_ATTEMPTS):
                            if args.quiet:
                                wait_quiet()
                            try:
                                result = run_client(
                                    processes, tmp, ports[target], sessions, args, pids[target]
                                )
                            except BenchError as e:
                                raise BenchError(
                                    f"{target}: {e}\nits log:\n{tail(logs[target])}"
                                ) from None
                            got = Run(target, sessions, result)
                            print(
                                f"round {n + 1}/{args.rounds} {sessions:>5} sessions {target:<7} "
                                f"{result['rate']:7.0f} msg/s  p50 {result['p50_us']:6.0f} us  "
                                f"p99 {result['p99_us']:6.0f} us  others {got.others_pct():3.0f} %",
                                flush=True,
                            )
                            if not once_more(args.quiet, got.others_pct(), attempt):
                                break
                        runs.setdefault((sessions, target), []).append(got)
                for child in children:
                    processes.stop(child)
        finally:
            processes.stop_all()
    print()
    notes = disturbed_note(
        [
            f"{r.sessions} {r.target} ({r.others_pct():.0f} %)"
            for got in runs.values()
            for r in got
            if r.others_pct() > QUIET_PCT
        ]
    )
    print(
        "\n".join([*describe(args), "", *table(runs, args), "", *comparisons(runs, args), *notes])
    )
    print(f"took {(time.monotonic() - started) / 60:.1f} minutes")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        return upstream_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds recorded a run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before recording")
    parser.add_argument(
        "--sessions", default="1,1000", help="session counts, comma-separated (default 1,1000)"
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"which of {', '.join(TARGETS)} to run (default all)",
    )
    parser.add_argument("--size", type=int, default=64, help="bytes a message (default 64)")
    parser.add_argument(
        "--upstream", choices=("raw", "aiohttp"), default="raw", help="the echo server"
    )
    parser.add_argument(
        "--placement",
        choices=tuple(UPSTREAM_CPU),
        default="alone",
        help="alone (default): the proxy alone on CPU 0, the upstream with the client on CPU 1;"
        " with-upstream: the upstream on CPU 0 with the proxy",
    )
    add_quiet_option(parser)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (0.5 s warm-up)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.5
    try:
        args.sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error("--sessions: comma-separated numbers")
    if not args.sessions or min(args.sessions) < 1 or max(args.sessions) > SESSIONS_CAP:
        parser.error(f"--sessions: between 1 and {SESSIONS_CAP}")
    args.targets = [t for t in TARGETS if t in args.targets.split(",")]
    if not args.targets:
        parser.error(f"--targets: some of {', '.join(TARGETS)}")
    if not {0, 1} <= os.sched_getaffinity(0):
        print("cannot run: needs CPUs 0 and 1")
        return 1
    limit = raise_open_files()
    if limit < 4 * max(args.sessions) + 64:
        print(f"cannot run: the open-files limit is {limit}, too low for {max(args.sessions)}")
        return 1
    try:
        if "nginx" in args.targets:
            ensure_tools([s for s in SETUPS if s.name == "nginx"])
        return run(args)
    except BenchError as e:
        print(f"cannot run: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
