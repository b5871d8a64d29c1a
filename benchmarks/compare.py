"""Issue 2's throughput comparison: the sidecar against minimal aiohttp baselines.

    python benchmarks/compare.py [--rounds 5] [--duration 5] [--warmup 1]

Every server (the proxy or app under test, and the upstream) is pinned to CPU 0
with `taskset -c 0`; wrk runs on CPU 1 (`taskset -c 1 wrk -t1 -c50 --latency`)
with keep-alive connections. Each round starts every setup afresh, warms it up,
measures it and stops it; the order rotates from round to round so no setup
always goes first. The report is the median requests/sec of each setup over the
rounds and two ratios of medians, each against the 0.90 bar of the issue:

    sidecar-forward / minimal-proxy     forwarding to a 100-byte upstream
    sidecar-open    / bare-503          answering from an OPEN route

The exit status is 0 whatever the ratios are (this is a report); it is 1 only
when the benchmark itself cannot run (no second CPU, no wrk, a server that
does not start or answers wrongly). Ctrl-C stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
SERVER_CPU = "0"
WRK_CPU = "1"
PASS_RATIO = 0.90
STEAL_WARNING = 5.0
"""Steal time (percent of CPU 0) above which a run is flagged as disturbed."""
ROUTE = "bench"
CLOSED_PORT = 1
"""Nothing listens on 127.0.0.1:1: the OPEN setup's upstream, refused at once."""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# -- processes ------------------------------------------------------------------


class Processes:
    """Every child this script starts, so that all of them are stopped on any exit."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C reaches this script only, which then
                # stops the child in order (SIGTERM, then SIGKILL).
                start_new_session=True,
            )
        self._children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self._children)):
            self.stop(child, grace=5.0)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, child: subprocess.Popen[bytes], log: Path, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise BenchError(f"{child.args!r} exited with {child.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{child.args!r} did not listen on port {port} in {timeout:g}s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


# -- HTTP checks ----------------------------------------------------------------


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def expect_forwarded(port: int) -> None:
    status, body = get(port, "/bench/check?x=1")
    if status != 200 or len(body) != 100:
        raise BenchError(f"port {port}: expected 200 with 100 bytes, got {status} {body[:200]!r}")


def expect_circuit_open(port: int) -> None:
    status, body = get(port, "/bench/check")
    try:
        error = json.loads(body).get("error")
    except ValueError:
        error = None
    if status != 503 or error != "circuit_open":
        raise BenchError(f"port {port}: expected 503 circuit_open, got {status} {body[:200]!r}")


def trip_breaker(port: int) -> None:
    """Fail the OPEN setup's route (refused upstream, threshold 1) until it answers circuit_open."""
    seen = []
    for _ in range(5):
        status, body = get(port, "/bench/trip")
        seen.append(f"{status} {body[:80]!r}")
        if status == 503 and b"circuit_open" in body:
            return
    raise BenchError(f"port {port}: the breaker did not open; answers were: {seen}")


# -- setups ---------------------------------------------------------------------


@dataclass
class Context:
    tmp: Path
    processes: Processes
    upstream_port: int


@dataclass
class Setup:
    name: str
    description: str
    command: Callable[[Context, int], list[str]]
    """argv of the server under test, listening on the given port (before pinning)."""
    check: Callable[[int], None]
    prepare: Callable[[int], None] | None = None
    ok_status: str = "2xx"
    """What wrk should see: "2xx" (no Non-2xx line) or "503" (every response non-2xx)."""
    forwards: bool = True
    """Whether requests reach the upstream (its CPU per request is reported then)."""


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


def sidecar_config(tmp: Path, name: str, port: int, upstream_port: int, open_route: bool) -> Path:
    breaker = "    breaker:\n      failure_threshold: 1\n      open_duration: 1h\n"
    timeouts = "    timeouts:\n      connect: 1s\n"
    text = (
        f"listen: {HOST}:{port}\n"
        f"admin:\n  listen: {HOST}:0\n"
        "routes:\n"
        f"  - name: {ROUTE}\n"
        "    match:\n      path_prefix: /\n"
        f"    upstream: http://{HOST}:{CLOSED_PORT if open_route else upstream_port}\n"
        + (timeouts + breaker if open_route else "")
    )
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def _sidecar(open_route: bool) -> Callable[[Context, int], list[str]]:
    def command(ctx: Context, port: int) -> list[str]:
        name = "sidecar-open" if open_route else "sidecar-forward"
        config = sidecar_config(ctx.tmp, name, port, ctx.upstream_port, open_route)
        return [sys.executable, "-m", "sidecar", "run", "-c", str(config)]

    return command


SETUPS = [
    Setup(
        "upstream-direct",
        "reference only: wrk straight at the upstream, no proxy",
        lambda ctx, port: [],  # the upstream itself; see measure()
        expect_forwarded,
    ),
    Setup(
        "minimal-proxy",
        "baseline: benchmarks/minimal_proxy.py -> upstream",
        lambda ctx, port: _python(
            "minimal_proxy.py",
            "--port",
            str(port),
            "--upstream",
            f"http://{HOST}:{ctx.upstream_port}",
        ),
        expect_forwarded,
    ),
    Setup(
        "sidecar-forward",
        "sidecar run, one route path_prefix / -> upstream (CLOSED)",
        _sidecar(open_route=False),
        expect_forwarded,
    ),
    Setup(
        "bare-503",
        "baseline: benchmarks/bare503.py, catch-all 503 JSON",
        lambda ctx, port: _python("bare503.py", "--port", str(port)),
        expect_circuit_open,
        ok_status="503",
        forwards=False,
    ),
    Setup(
        "sidecar-open",
        "sidecar run, one route OPEN (upstream 127.0.0.1:1, threshold 1, open 1h)",
        _sidecar(open_route=True),
        expect_circuit_open,
        prepare=trip_breaker,
        ok_status="503",
        forwards=False,
    ),
]
RATIOS = [("sidecar-forward", "minimal-proxy"), ("sidecar-open", "bare-503")]


# -- wrk ------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    server_cpu_us: float = float("nan")
    """CPU time (user + system) of the server under test per request, in microseconds."""
    upstream_cpu_us: float = float("nan")
    """The same for the upstream process (forwarding setups only)."""
    steal_pct: float = float("nan")
    """Share of CPU 0's time stolen by the hypervisor during the run (noisy neighbours)."""


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if rps is None:
        raise BenchError(f"no Requests/sec in wrk's output:\n{output}")
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        rps=float(rps[1]),
        p50_ms=_latency_ms(p50[1]) if p50 else float("nan"),
        p99_ms=_latency_ms(p99[1]) if p99 else float("nan"),
        requests=int(total[1]) if total else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc; NaN if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_ticks(cpu: str) -> tuple[int, int]:
    """(steal, total) jiffies of one CPU so far, from /proc/stat; (0, 0) if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name == f"cpu{cpu}":
                numbers = [int(v) for v in values[:8]]
                return numbers[7], sum(numbers)
    return 0, 0


def run_wrk(processes: Processes, url: str, seconds: int, connections: int, log: Path) -> WrkResult:
    argv = pinned(
        WRK_CPU,
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
    )
    child = processes.start(argv, log.with_suffix(".wrk.log"))
    try:
        child.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {argv}") from None
    finally:
        processes.stop(child)
    output = log.with_suffix(".wrk.log").read_text(errors="replace")
    log.with_suffix(".wrk.log").unlink()
    if child.returncode != 0:
        raise BenchError(f"wrk exited with {child.returncode}:\n{output}")
    return parse_wrk(output)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("wrk is missing: apt-get install -y wrk", flush=True)
    for argv in (
        ["apt-get", "install", "-y", "wrk"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "wrk"],
    ):
        result = subprocess.run(argv, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if argv[1] == "install" and result.returncode == 0:
            break
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed and `apt-get install -y wrk` failed (root needed)")


# -- the run --------------------------------------------------------------------


@dataclass
class Results:
    by_setup: dict[str, list[WrkResult]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def measure(
    setup: Setup,
    ctx: Context,
    upstream: subprocess.Popen[bytes],
    args: argparse.Namespace,
    round_no: int,
) -> WrkResult:
    if upstream.poll() is not None:
        raise BenchError(f"the upstream exited with {upstream.returncode}")
    log = ctx.tmp / f"{setup.name}.{round_no}.log"
    server = None
    measured = upstream.pid
    if setup.name == "upstream-direct":
        port = ctx.upstream_port
    else:
        port = free_port()
        server = ctx.processes.start(pinned(SERVER_CPU, setup.command(ctx, port)), log)
        measured = server.pid
    try:
        if server is not None:
            wait_for_port(port, server, log)
        if setup.prepare is not None:
            setup.prepare(port)
        setup.check(port)
        url = f"http://{HOST}:{port}/bench/item?id=1"
        if args.warmup > 0:
            run_wrk(ctx.processes, url, args.warmup, args.connections, log)
        cpu0, up0, (steal0, total0) = (
            cpu_seconds(measured),
            cpu_seconds(upstream.pid),
            cpu_ticks(SERVER_CPU),
        )
        result = run_wrk(ctx.processes, url, args.duration, args.connections, log)
        cpu1, up1, (steal1, total1) = (
            cpu_seconds(measured),
            cpu_seconds(upstream.pid),
            cpu_ticks(SERVER_CPU),
        )
        if result.requests:
            result.server_cpu_us = (cpu1 - cpu0) / result.requests * 1e6
            if setup.forwards and server is not None:
                result.upstream_cpu_us = (up1 - up0) / result.requests * 1e6
        if total1 > total0:
            result.steal_pct = 100.0 * (steal1 - steal0) / (total1 - total0)
        if server is not None and server.poll() is not None:
            raise BenchError(f"{setup.name} exited during the run:\n{tail(log)}")
        return result
    finally:
        if server is not None:
            ctx.processes.stop(server)


def describe_machine() -> list[str]:
    try:
        import aiohttp

        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = "not installed"
    try:
        import uvloop

        uvloop_version = f"yes ({getattr(uvloop, '__version__', '?')})"
    except ImportError:
        uvloop_version = "no"
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    wrk_version = (wrk.stdout or wrk.stderr).split("\n")[0]
    return [
        f"date      {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine   {os.cpu_count()} CPUs ({model}), {distro}, Linux {platform.release()}",
        f"python    {platform.python_version()}, aiohttp {aiohttp_version}, "
        f"uvloop {uvloop_version}",
        f"wrk       {wrk_version.strip() or 'unknown'}",
        f"sidecar   {sidecar_revision()}",
    ]


def sidecar_revision() -> str:
    """The commit the sidecar code was measured at, and whether sidecar/ had local edits."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "sidecar"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted edits in sidecar/" if dirty else " (sidecar/ clean)")


def check_cpus() -> None:
    if not shutil.which("taskset"):
        raise BenchError("taskset is missing (apt-get install -y util-linux)")
    allowed = os.sched_getaffinity(0)
    if not {0, 1} <= allowed:
        raise BenchError(f"needs CPUs 0 and 1 (servers on 0, wrk on 1); allowed: {sorted(allowed)}")
    if len(allowed) > 2:
        print(
            f"note: {len(allowed)} CPUs; CPUs 0 and 1 are used, others should be idle", flush=True
        )


def run(args: argparse.Namespace) -> Results:
    results = Results({setup.name: [] for setup in SETUPS})
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream_port = free_port()
            upstream_log = tmp / "upstream.log"
            upstream = processes.start(
                pinned(SERVER_CPU, _python("upstream.py", "--port", str(upstream_port))),
                upstream_log,
            )
            wait_for_port(upstream_port, upstream, upstream_log)
            ctx = Context(tmp, processes, upstream_port)
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(SETUPS)
                for setup in SETUPS[shift:] + SETUPS[:shift]:
                    result = measure(setup, ctx, upstream, args, round_no)
                    results.by_setup[setup.name].append(result)
                    note = _anomaly(setup, result)
                    if note:
                        results.warnings.append(f"round {round_no} {setup.name}: {note}")
                    print(
                        f"round {round_no}/{args.rounds}  {setup.name:<16} "
                        f"{result.rps:>10.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                        f"p99 {result.p99_ms:6.2f} ms  cpu {_us(result.server_cpu_us):>4} us/req  "
                        f"steal {result.steal_pct:4.1f}%" + (f"  !! {note}" if note else ""),
                        flush=True,
                    )
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                processes.stop_all()
            finally:
                signal.signal(signal.SIGINT, previous)
    return results


def _anomaly(setup: Setup, result: WrkResult) -> str:
    notes = []
    if result.socket_errors:
        notes.append(f"{result.socket_errors} socket errors")
    if setup.ok_status == "2xx" and result.non_2xx:
        notes.append(f"{result.non_2xx} non-2xx responses")
    if result.steal_pct > STEAL_WARNING:
        notes.append(f"{result.steal_pct:.0f}% of CPU {SERVER_CPU} stolen by the hypervisor")
    if setup.ok_status == "503" and result.non_2xx != result.requests:
        notes.append(f"only {result.non_2xx} of {result.requests} responses were non-2xx")
    return ", ".join(notes)


def _us(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def report(results: Results, args: argparse.Namespace, machine: list[str]) -> str:
    lines = ["", "=" * 100, "sidecar throughput comparison (issue 2)", *machine]
    lines.append(
        f"load      taskset -c {WRK_CPU} wrk -t1 -c{args.connections} -d{args.duration}s "
        f"--latency (warm-up {args.warmup}s); servers and upstream on CPU {SERVER_CPU}; "
        f"{args.rounds} rounds, interleaved"
    )
    lines.append("")
    lines.append(
        f"{'setup':<16} {'median req/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cpu us/req':>10} {'upstr us/req':>12} {'steal%':>6}   req/s per round"
    )
    medians: dict[str, float] = {}
    for setup in SETUPS:
        runs = results.by_setup[setup.name]
        if not runs:
            continue
        medians[setup.name] = statistics.median(r.rps for r in runs)
        lines.append(
            f"{setup.name:<16} {medians[setup.name]:>12.0f} "
            f"{_median([r.p50_ms for r in runs]):>7.2f} "
            f"{_median([r.p99_ms for r in runs]):>7.2f} "
            f"{_us(_median([r.server_cpu_us for r in runs])):>10} "
            f"{_us(_median([r.upstream_cpu_us for r in runs])):>12} "
            f"{_median([r.steal_pct for r in runs]):>6.1f}   "
            + " ".join(f"{r.rps:.0f}" for r in runs)
        )
    lines.append("")
    lines.append(
        f"ratio of medians (the verdict; bar {PASS_RATIO:.2f})   "
        "[median and range of the per-round ratios]"
    )
    for ours, baseline in RATIOS:
        if ours not in medians or baseline not in medians:
            continue
        ratio = medians[ours] / medians[baseline]
        paired = [
            a.rps / b.rps
            for a, b in zip(results.by_setup[ours], results.by_setup[baseline], strict=True)
        ]
        verdict = "PASS" if ratio >= PASS_RATIO else "FAIL"
        lines.append(
            f"  {ours + ' / ' + baseline:<34} {ratio:5.3f}  {verdict}   "
            f"[{statistics.median(paired):.3f}, {min(paired):.3f}..{max(paired):.3f}]"
        )
    if results.warnings:
        lines.append("")
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in results.warnings)
    lines.append("")
    for setup in SETUPS:
        lines.append(f"  {setup.name:<16} {setup.description}")
    lines.append("  cpu us/req   user+system CPU time of the server under test, per request")
    lines.append("  upstr us/req the same for the upstream (forwarding setups)")
    lines.append("  steal%       CPU 0 time taken by the hypervisor during the run (high: noisy)")
    lines.append("=" * 100)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare the sidecar's throughput with minimal aiohttp baselines."
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds of each measured wrk run (default 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of wrk before each measurement (default 1)"
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.warmup < 0:
        parser.error("--rounds, --duration and --connections must be at least 1, --warmup 0")

    # Ctrl-C, even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    try:
        check_cpus()
        ensure_wrk()
        machine = describe_machine()
        print("\n".join(machine), flush=True)
        results = run(args)
    except BenchError as e:
        print(f"compare.py: cannot run the benchmark: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print(report(results, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
