"""Issues 2, 5 and 13: the sidecar against nginx, HAProxy, minimal aiohttp baselines, a floor
proxy, and itself at an earlier commit.

    python benchmarks/compare.py [--rounds 5] [--duration 5] [--quick] [--only SETUP,...]
                                 [--base COMMIT] [--floor PATH] [--write-results]

Every server (the proxy or app under test, and the upstream) is pinned to CPU 0
with `taskset -c 0`; the load runs on CPU 1. Each round starts every setup afresh
and measures it three ways before stopping it:

- throughput: `wrk -t1 -c50 --latency` (closed loop, keep-alive), with the CPU
  time per request of the server under test read from /proc;
- latency at fixed offered loads (500 and 2,000 req/s): `openloop.py`, an
  open-loop generator whose latencies run from each request's scheduled time;
  "added latency" is a setup's percentile minus upstream-direct's in the same
  round, at the same rate;
- throughput with 1,000 open keep-alive connections: `wrk -t1 -c1000`.

The order of the setups rotates from round to round so no setup always goes
first; the report gives medians over the rounds and ratios of medians, with
PASS/FAIL against the bars of issues 2, 5, 13, 14 and 15. `sidecar-base` is the sidecar
at --base (default 7c06b95), extracted with `git archive` into the temporary
directory and run from there with the same config as `sidecar-forward`; `floor`
is shared/perf/floor_proxy.py, run from where it lies (skipped, in one line, when
it is missing). After the rounds it measures the
sidecar's resident memory with 1, 1,000 and 10,000 routes. `--write-results`
also writes benchmarks/RESULTS.md and benchmarks/results.png (matplotlib, from
the `bench` extra). Missing wrk, nginx or HAProxy are apt-installed (root), with
their system services left stopped: the script runs the binaries with its own
configs in a temporary directory.

The exit status is 0 whatever the verdicts are (this is a report); it is 1 only
when the benchmark itself cannot run (no second CPU, a tool that cannot be
installed, a server that does not start or answers wrongly). Ctrl-C stops every
process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
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
"""Issue 2's bar for both ratios against the minimal aiohttp baselines."""
KEEP_UP = 0.98
"""A setup kept up with an offered rate when it answered at least this share of it."""
BASE_RATIO = 0.95
"""Issue 13: forwarding at this checkout against the sidecar at --base, in the same run."""
NGINX_AIM = 0.85
"""Issue 13's aim (reported, not a bar): forwarding against nginx."""
DEFAULT_BASE = "7c06b95"
"""The commit `sidecar-base` runs by default: the sidecar before issue 13's change."""
DEFAULT_FLOOR = REPO.parent / "shared" / "perf" / "floor_proxy.py"
"""The floor proxy (uvloop + httptools), run from where it lies, never copied here."""
ADDED_COST = ("floor", "nginx", "sidecar-forward", "sidecar-base")
"""Issue 13: the setups whose added microseconds per request over upstream-direct are reported."""
ISSUE_RATE = 2000
"""Issue 5's fixed offered load (req/s) for the added-latency target."""
STEAL_WARNING = 5.0
"""Steal time (percent of CPU 0) above which a run is flagged as disturbed."""
LAG_WARNING = 2.0
"""p99 send lag of the open-loop generator itself (ms) above which a run is flagged."""
ROUTE = "bench"
CLOSED_PORT = 1
"""Nothing listens on 127.0.0.1:1: the OPEN setup's upstream, refused at once."""
MANY_ROUTES = 1000
POLICIES = [
    "    rate_limit: {rate: 1000000/s}",
    "    bulkhead: {max_concurrent: 1000, max_queued: 16, queue_timeout: 1s}",
    """    fallback: {reasons: [circuit_open], status: 200, body: '{"items": []}'}""",
    "    recovery: {ramp: 30s, min_share: 10%}",
]
"""Issue 14: all four policies on the route, none of them turning a request away (the
bucket holds a million tokens, the bulkhead 1,000 slots, the ramp is not ramping)."""
RATE_LIMITED = ["    rate_limit: {rate: 1/h, burst: 1}"]
"""Issue 14: the one token spent before the load, every request gets a 429."""
POLICY_RATIO = 1.05
"""Issue 14: the policies' added work at most 5 % of the forwarding CPU per request."""
RETRY = ["    retry: {}"]
"""Issue 15: a retry policy of every default on the route (a healthy upstream: nothing is
retried; the budget hears of every request, which the sidecar keeps for a replay)."""
RETRY_RATIO = 1.03
"""Issue 15: a retry policy adds at most 3 % to the CPU per request."""
"""Routes configured before the catch-all in `sidecar-1000-routes`."""
OPEN_FILES = 65536
"""RLIMIT_NOFILE wanted for the servers and wrk (1,000 client connections, nginx twice that)."""
SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
TOOLS = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy"}
"""Binary -> the Debian package that provides it."""
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_PNG = HERE / "results.png"
KEPT = "<!-- Written by hand from here on: compare.py --write-results keeps it. -->"
"""RESULTS.md below this line is other benchmarks' (policy_micro.py's, a focused run's)."""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# -- processes ------------------------------------------------------------------


class Processes:
    """Every child this script starts, so that all of them are stopped on any exit."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        log: Path,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
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


def which(name: str) -> str | None:
    """A binary on PATH, or in the sbin directories (nginx and haproxy live in /usr/sbin)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN)


def raise_open_files() -> int:
    """Lift RLIMIT_NOFILE (inherited by every child) towards OPEN_FILES; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= OPEN_FILES or soft == resource.RLIM_INFINITY:
        return OPEN_FILES
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
            return OPEN_FILES
    target = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def expect_rejection(status: int, error: str) -> Callable[[int], None]:
    """A check: the setup answers `status` with the JSON error `error`."""

    def check(port: int) -> None:
        got, body = get(port, "/bench/check")
        try:
            said = json.loads(body).get("error")
        except ValueError:
            said = None
        if got != status or said != error:
            raise BenchError(f"port {port}: expected {status} {error}, got {got} {body[:200]!r}")

    return check


expect_circuit_open = expect_rejection(503, "circuit_open")


def until_rejected(status: int, error: str, what: str) -> Callable[[int], None]:
    """A preparation: requests until the route answers `status` `error` (5 at most)."""

    def prepare(port: int) -> None:
        seen = []
        for _ in range(5):
            got, body = get(port, "/bench/trip")
            seen.append(f"{got} {body[:80]!r}")
            if got == status and error.encode() in body:
                return
        raise BenchError(f"port {port}: {what}; answers were: {seen}")

    return prepare


trip_breaker = until_rejected(503, "circuit_open", "the breaker did not open")
"""Fail the OPEN setup's route (refused upstream, threshold 1) until it answers circuit_open."""


# -- setups ---------------------------------------------------------------------


@dataclass
class Context:
    tmp: Path
    processes: Processes
    upstream_port: int
    base_tree: Path | None = None
    """The tree of --base, extracted into tmp, when `sidecar-base` runs."""
    floor: Path | None = None
    """floor_proxy.py, when `floor` runs."""


@dataclass
class Setup:
    name: str
    description: str
    command: Callable[[Context, int], list[str]]
    """argv of the server under test, listening on the given port (before pinning)."""
    check: Callable[[int], None]
    prepare: Callable[[int], None] | None = None
    ok_status: str = "2xx"
    """What the load should see: "2xx" (no Non-2xx line), or a status such as "503" (every
    response non-2xx, and that status in the open-loop runs)."""
    forwards: bool = True
    """Whether requests reach the upstream (its CPU per request is reported then)."""
    tool: str | None = None
    """A binary the setup needs besides Python (apt-installed when missing)."""
    where: Callable[[Context], tuple[Path, dict[str, str] | None]] | None = None
    """The server's working directory and environment (default: this checkout, os.environ)."""


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


def sidecar_config(
    tmp: Path,
    name: str,
    port: int,
    upstream_port: int,
    open_route: bool,
    extra_routes: int = 0,
    route_settings: tuple[str, ...] = (),
) -> Path:
    """The sidecar's config: `extra_routes` (half host, half prefix) before the catch-all,
    which has `route_settings` (YAML lines) added.

    The benchmark's requests (`/bench/...`, Host 127.0.0.1) match none of the extra
    routes, so routing passes over every one of them before the catch-all `/` route,
    which must come last (an earlier `/` would shadow the rest, and the config would
    be rejected).
    """
    upstream = f"http://{HOST}:{upstream_port}"
    lines = [f"listen: {HOST}:{port}", "admin:", f"  listen: {HOST}:0", "routes:"]
    hosts = extra_routes // 2
    for n in range(extra_routes):
        if n < hosts:
            lines += [f"  - name: host-{n}", f"    match: {{host: h{n}.bench}}"]
        else:
            lines += [f"  - name: prefix-{n}", f"    match: {{path_prefix: /r{n}}}"]
        lines.append(f"    upstream: {upstream}")
    lines += [f"  - name: {ROUTE}", "    match: {path_prefix: /}"]
    if open_route:
        lines += [
            f"    upstream: http://{HOST}:{CLOSED_PORT}",
            "    timeouts: {connect: 1s}",
            "    breaker: {failure_threshold: 1, open_duration: 1h}",
        ]
    else:
        lines.append(f"    upstream: {upstream}")
    lines += route_settings
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sidecar(
    name: str,
    open_route: bool = False,
    extra_routes: int = 0,
    route_settings: list[str] | None = None,
) -> Callable[..., list[str]]:
    def command(ctx: Context, port: int) -> list[str]:
        config = sidecar_config(
            ctx.tmp,
            name,
            port,
            ctx.upstream_port,
            open_route,
            extra_routes,
            tuple(route_settings or ()),
        )
        return [sys.executable, "-m", "sidecar", "run", "-c", str(config)]

    return command


def base_environment(tree: Path) -> dict[str, str]:
    """os.environ with the base tree first on PYTHONPATH, so `import sidecar` finds its own."""
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(tree) + (os.pathsep + rest if rest else "")}


def _in_base_tree(ctx: Context) -> tuple[Path, dict[str, str] | None]:
    if ctx.base_tree is None:
        raise BenchError("sidecar-base: the base tree was not prepared")
    return ctx.base_tree, base_environment(ctx.base_tree)


def floor_command(ctx: Context, port: int) -> list[str]:
    if ctx.floor is None:
        raise BenchError("floor: no floor_proxy.py")
    return [sys.executable, str(ctx.floor), str(port), f"{HOST}:{ctx.upstream_port}"]


def _beside_floor(ctx: Context) -> tuple[Path, dict[str, str] | None]:
    if ctx.floor is None:
        raise BenchError("floor: no floor_proxy.py")
    return ctx.floor.parent, None


def _tool_path(name: str) -> str:
    path = which(name)
    if path is None:
        raise BenchError(f"{name} is not installed")
    return path


def nginx_argv(prefix: Path, http: str) -> list[str]:
    """nginx with one worker and no access log, every path it writes under `prefix` (made
    here), `http` (directives indented four spaces) inside `http { }`: its argv."""
    prefix.mkdir()
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    temps = "\n".join(
        f"    {key}_temp_path {prefix / key};"
        for key in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = f"""
worker_processes 1;
worker_rlimit_nofile {files};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {files // 2};
}}
http {{
    access_log off;
{temps}
{http}
}}
"""
    path = prefix / "nginx.conf"
    path.write_text(config.lstrip())
    return [
        _tool_path("nginx"),
        "-p",
        f"{prefix}/",
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(path),
    ]


def nginx_proxy_directives(
    port: int, upstream: str, scheme: str = "http", location: str = ""
) -> str:
    """nginx's `http { }` directives for a proxy on `port` to `upstream` (HOST:PORT) over
    `scheme`, with upstream keep-alive; `location`: more directives for `location /`."""
    return f"""    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass {scheme}://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{location}
        }}
    }}"""


def nginx_command(ctx: Context, port: int) -> list[str]:
    """nginx-light: one worker, access log off, upstream keep-alive; every path in the tmp dir."""
    return nginx_argv(
        ctx.tmp / f"nginx-{port}",
        "    keepalive_requests 1000000;\n"
        + nginx_proxy_directives(port, f"{HOST}:{ctx.upstream_port}"),
    )


def haproxy_command(ctx: Context, port: int) -> list[str]:
    """HAProxy: one thread, HTTP mode, server connections reused by every client, no logging."""
    # HAProxy wants two descriptors per connection and refuses to start above the limit.
    maxconn = max(256, min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2))
    config = f"""
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench
    bind {HOST}:{port}
    default_backend upstream

backend upstream
    server upstream {HOST}:{ctx.upstream_port}
"""
    path = ctx.tmp / f"haproxy-{port}.cfg"
    path.write_text(config.lstrip())
    return [_tool_path("haproxy"), "-db", "-f", str(path)]


SETUPS = [
    Setup(
        "upstream-direct",
        "reference: the load straight at the upstream, no proxy",
        lambda ctx, port: [],  # the upstream itself; see measure()
        expect_forwarded,
    ),
    Setup(
        "nginx",
        "nginx-light, 1 worker, upstream keepalive 64, HTTP/1.1 to the upstream",
        nginx_command,
        expect_forwarded,
        tool="nginx",
    ),
    Setup(
        "haproxy",
        "HAProxy, nbthread 1, mode http, http-reuse always",
        haproxy_command,
        expect_forwarded,
        tool="haproxy",
    ),
    Setup(
        "floor",
        "floor_proxy.py (shared/perf; uvloop + httptools, both heads parsed and rebuilt, "
        "one kept-alive upstream connection per client connection) -> upstream",
        floor_command,
        expect_forwarded,
        where=_beside_floor,
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
        "sidecar run, one route path_prefix / -> upstream (CLOSED), breaker and metrics on",
        _sidecar("sidecar-forward"),
        expect_forwarded,
    ),
    Setup(
        "sidecar-base",
        "the same config and command, the sidecar at --base (git archive into the temp dir, "
        "first on PYTHONPATH and the working directory)",
        _sidecar("sidecar-base"),
        expect_forwarded,
        where=_in_base_tree,
    ),
    Setup(
        "sidecar-1000-routes",
        f"the same behind {MANY_ROUTES // 2} host + {MANY_ROUTES - MANY_ROUTES // 2} "
        "prefix routes that do not match (the catch-all comes last)",
        _sidecar("sidecar-1000-routes", extra_routes=MANY_ROUTES),
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
        _sidecar("sidecar-open", open_route=True),
        expect_circuit_open,
        prepare=trip_breaker,
        ok_status="503",
        forwards=False,
    ),
    Setup(
        "sidecar-policies",
        "sidecar-forward with all four policies of issue 14 on the route, none turning a "
        "request away: rate_limit 1000000/s, bulkhead 1000 (+16 queued), a fallback for "
        "circuit_open, recovery ramp 30s (not ramping)",
        _sidecar("sidecar-policies", route_settings=POLICIES),
        expect_forwarded,
    ),
    Setup(
        "sidecar-retry",
        "sidecar-forward with issue 15's retry policy on the route, every default (retry: {}): "
        "2 attempts, the budget 20 % + 10/s; the upstream healthy, nothing retried",
        _sidecar("sidecar-retry", route_settings=RETRY),
        expect_forwarded,
    ),
    Setup(
        "sidecar-rate-limited",
        "sidecar run, one route rate-limited (rate 1/h, burst 1, the token spent): every "
        "request a 429",
        _sidecar("sidecar-rate-limited", route_settings=RATE_LIMITED),
        expect_rejection(429, "rate_limited"),
        prepare=until_rejected(429, "rate_limited", "the route was not rate-limited"),
        ok_status="429",
        forwards=False,
    ),
]
SETUP_NAMES = [setup.name for setup in SETUPS]


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


def cpu_seconds(pgid: int) -> float:
    """CPU seconds so far of a process group (nginx: master and worker), all threads.

    From /proc/PID/task/TID/schedstat, the scheduler's own count in nanoseconds:
    utime and stime in /proc/PID/stat are sampled at each timer tick (4 ms at
    HZ=250), which a load sent at a fixed rate, in step with the tick, can skew
    (/proc/stat's per-CPU figures, counted the same way, once put CPU 0 at 6 %
    busy while the upstream alone used 37 % of it). Where schedstat is missing,
    those ticks it is.
    """
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) != pgid:
            continue
        found = True
        try:
            total += sum(
                int(task.read_text().split()[0]) / 1e9
                for task in stat.parent.glob("task/*/schedstat")
            )
        except (OSError, IndexError, ValueError):
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total if found else float("nan")


def cpu_ticks(cpu: str) -> tuple[int, int]:
    """(steal, total) jiffies of one CPU so far, from /proc/stat; (0, 0) if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name == f"cpu{cpu}":
                numbers = [int(v) for v in values[:8]]
                return numbers[7], sum(numbers)
    return 0, 0


def steal_seconds() -> dict[str, float]:
    """Seconds each CPU's time was stolen by the hypervisor so far (/proc/stat)."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and len(values) > 7:
                found[name[3:]] = int(values[7]) / _TICK
    return found


def all_tasks() -> dict[str, int]:
    """CPU nanoseconds so far of every thread of every process (their schedstat), by
    /proc path: what the measured processes did not use of it in a window was used by
    something else (kernel threads, another job on the machine)."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[str(path)] = int(path.read_text().split()[0])
    return found


def tasks_seconds(before: dict[str, int], after: dict[str, int]) -> float:
    """CPU seconds all threads used between two `all_tasks()` (a thread that ended in
    between is left out: its last figures are gone)."""
    return sum(ns - before.get(path, 0) for path, ns in after.items()) / 1e9


# -- a quiet machine (websocket_echo.py, tls_origination.py) ------------------------


QUIET_PCT = 10.0
"""A run during which the machine's other threads used more than this (% of one CPU) was
disturbed: it is run again (twice at most), and the report counts those it kept."""
QUIET_PATIENCE = 120.0
"""Seconds to wait, before a run, for the machine to be quiet; then it runs anyway."""
QUIET_ATTEMPTS = 3
"""Runs of one measurement at the most: the first, and two more when others disturbed it."""


def wait_quiet(limit: float = QUIET_PCT, patience: float = QUIET_PATIENCE) -> None:
    """Wait (`patience` seconds at most) until every thread on the machine together uses
    less than `limit` % of a CPU over a second (the benchmark's own servers idle then): on a
    shared machine another job's burst would otherwise land in a run."""
    deadline = time.monotonic() + patience
    said = False
    while True:
        before = all_tasks()
        time.sleep(1.0)
        busy = 100 * tasks_seconds(before, all_tasks())
        if busy < limit:
            return
        if time.monotonic() > deadline:
            print(f"  (the machine is still busy, {busy:.0f} % of a CPU: running anyway)")
            return
        if not said:
            print(f"  (the machine is busy, {busy:.0f} % of a CPU: waiting for it to calm)")
            said = True
        time.sleep(2.0)


def once_more(quiet: bool, others_pct: float, attempt: int) -> bool:
    """Whether to run again the measurement just taken (attempt 0, 1, ...), during which
    others used `others_pct` % of a CPU: with `quiet`, when that is over QUIET_PCT and
    attempts are left (it says so)."""
    if not quiet or others_pct <= QUIET_PCT or attempt == QUIET_ATTEMPTS - 1:
        return False
    print("  (disturbed: once more)", flush=True)
    return True


def disturbed_note(kept: list[str]) -> list[str]:
    """The report's line on the runs kept although others disturbed them (`kept`: each
    such run, and by how much), or none."""
    if not kept:
        return []
    return [
        f"{len(kept)} of the runs kept were disturbed (others over {QUIET_PCT:g} % of a CPU, "
        "three times in a row): " + ", ".join(kept)
    ]


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """`--no-quiet` (`args.quiet` False): neither wait for a quiet machine nor run again."""
    parser.add_argument(
        "--no-quiet",
        dest="quiet",
        action="store_false",
        help=f"do not wait for the machine to be quiet before each run, nor run again one "
        f"that others disturbed (over {QUIET_PCT:g} %% of a CPU)",
    )


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status), KiB; 0 if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _run_load(processes: Processes, argv: list[str], seconds: float, log: Path) -> str:
    """Run one load generator pinned to the load CPU; its output (stdout and stderr)."""
    out = log.with_suffix(".load.log")
    child = processes.start(pinned(WRK_CPU, argv), out)
    try:
        child.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the load did not finish: {shlex.join(argv)}") from None
    finally:
        processes.stop(child)
    output = out.read_text(errors="replace")
    out.unlink()
    if child.returncode != 0:
        raise BenchError(f"{shlex.join(argv[:3])} ... exited with {child.returncode}:\n{output}")
    return output


def run_wrk(
    processes: Processes, url: str, seconds: float, connections: int, log: Path
) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    return parse_wrk(_run_load(processes, [*argv, "--latency", url], seconds, log))


# -- the open-loop generator ----------------------------------------------------


@dataclass
class OpenLoopResult:
    offered: float
    achieved: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    unfinished: int
    statuses: dict[str, int]
    lag_p99_ms: float
    """How late the generator itself sent requests (its own precision)."""
    server_cpu_us: float = float("nan")
    """CPU time per request of the setup's server at this rate (the upstream's, direct)."""
    upstream_cpu_us: float = float("nan")
    """CPU time per request of the upstream behind a forwarding setup at this rate."""

    @property
    def kept_up(self) -> bool:
        return self.achieved >= KEEP_UP * self.offered

    @property
    def cpu_busy_pct(self) -> float:
        """The share of CPU 0 the setup and its upstream need at this rate."""
        upstream = 0.0 if math.isnan(self.upstream_cpu_us) else self.upstream_cpu_us
        return (self.server_cpu_us + upstream) * self.offered / 1e4


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def run_openloop(
    processes: Processes,
    url: str,
    rate: int,
    args: argparse.Namespace,
    log: Path,
) -> OpenLoopResult:
    argv = _python(
        "openloop.py",
        "--url",
        url,
        "--rate",
        str(rate),
        "--duration",
        f"{args.latency_duration:g}",
        "--warmup",
        f"{args.warmup:g}",
        "--connections",
        str(args.latency_connections),
    )
    output = _run_load(processes, argv, args.latency_duration + args.warmup + 10, log)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BenchError(f"no JSON result from openloop.py:\n{output}") from None
    return OpenLoopResult(
        offered=float(rate),
        achieved=_num(data.get("achieved_rps")),
        p50_ms=_num(data.get("p50_ms")),
        p99_ms=_num(data.get("p99_ms")),
        p999_ms=_num(data.get("p999_ms")),
        errors=int(data.get("errors", 0)),
        unfinished=int(data.get("unfinished", 0)),
        statuses={str(k): int(v) for k, v in data.get("statuses", {}).items()},
        lag_p99_ms=_num(data.get("sched_lag_p99_ms")),
    )


# -- tools ----------------------------------------------------------------------


def ensure_tools(setups: list[Setup]) -> None:
    """apt-install wrk, nginx-light and HAProxy when the chosen setups need them.

    Their system services stay stopped: a temporary policy-rc.d forbids starting them
    during the install, and under systemd they are disabled afterwards. The benchmark
    runs the binaries itself, with its own configs.
    """
    needed = ["wrk", *sorted({s.tool for s in setups if s.tool})]
    missing = [name for name in needed if which(name) is None]
    if not missing:
        return
    packages = [TOOLS[name] for name in missing]
    if os.geteuid() != 0:
        raise BenchError(
            f"{', '.join(missing)} missing; as root: apt-get install -y {' '.join(packages)}"
        )
    print(f"{', '.join(missing)} missing: apt-get install -y {' '.join(packages)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    try:
        if ours:
            policy.write_text(
                "#!/bin/sh\n# compare.py: start no service while installing\nexit 101\n"
            )
            policy.chmod(0o755)
        if subprocess.run(install, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(install, env=env)
    except OSError as e:
        raise BenchError(f"apt-get failed: {e}") from None
    finally:
        if ours:
            with contextlib.suppress(OSError):
                policy.unlink()
    if Path("/run/systemd/system").is_dir():
        units = [name for name in missing if name in ("nginx", "haproxy")]
        if units:
            subprocess.run(
                ["systemctl", "disable", "--now", *units],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    still = [name for name in missing if which(name) is None]
    if still:
        raise BenchError(
            f"{', '.join(still)} still missing after `apt-get install -y {' '.join(packages)}`"
        )


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return ((done.stdout or done.stderr).strip().split("\n") or ["?"])[0]


# -- the floor and the base -----------------------------------------------------


def floor_problem(path: Path) -> str:
    """Why the floor proxy cannot run here; "" when it can."""
    if not path.is_file():
        return f"{path} not found"
    missing = [name for name in ("httptools", "uvloop") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{path} needs {' and '.join(missing)} (pip install {' '.join(missing)})"
    return ""


def _git(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)


def resolve_base(commit: str) -> tuple[str, str]:
    """(the full hash of --base, "") or ("", why `sidecar-base` cannot run here).

    A --base that names no commit of this repository is a mistake in the command, not
    something to skip: BenchError.
    """
    try:
        if _git("rev-parse", "--git-dir").returncode != 0:
            return "", f"{REPO} is not a git checkout"
        found = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except OSError as e:
        return "", f"git cannot run ({e})"
    if found.returncode != 0:
        raise BenchError(f"--base {commit}: no such commit in {REPO}")
    return found.stdout.strip(), ""


def extract_base(commit: str, tmp: Path) -> Path:
    """The tree at `commit` (`git archive`, then `tar -x`) in the temp dir, removed with it.

    An archive rather than `git worktree add`: it only reads the repository, and leaves no
    worktree entry behind in the shared .git when the run is killed.
    """
    tree = tmp / f"base-{commit[:12]}"
    tree.mkdir()
    archive = tmp / "base.tar"
    steps = [
        ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), commit],
        ["tar", "-x", "-f", str(archive), "-C", str(tree)],
    ]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
        except OSError as e:
            raise BenchError(f"sidecar-base: {argv[0]} cannot run ({e})") from None
        if done.returncode != 0:
            raise BenchError(f"sidecar-base: {shlex.join(argv)} failed:\n{done.stderr.strip()}")
    archive.unlink()
    return tree


def check_import(who: str, cwd: Path, env: dict[str, str] | None, tree: Path) -> str:
    """Check that a server started in `cwd` with `env` imports `tree`'s sidecar; a line saying so.

    Runs `python -c "import sidecar"` the way the server is started (same interpreter,
    working directory and environment): the installed sidecar may be an editable install
    of another checkout, and the comparison means nothing if both rows run the same code.
    """
    done = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise BenchError(f"{who}: `import sidecar` fails in {cwd}:\n{done.stderr.strip()[-2000:]}")
    imported = Path(done.stdout.strip().splitlines()[-1]).resolve()
    expected = (tree / "sidecar" / "__init__.py").resolve()
    if imported != expected:
        raise BenchError(f"{who} would import {imported}, not {expected}")
    return f"{who:<15} imports {imported}"


# -- the run --------------------------------------------------------------------


@dataclass
class Measurement:
    """One setup in one round."""

    throughput: WrkResult
    latency: dict[int, OpenLoopResult] = field(default_factory=dict)
    many: WrkResult | None = None
    """The wrk run with --many-connections open connections."""


@dataclass
class MemoryResult:
    routes: int
    rss_kib: int = 0
    start_s: float = float("nan")
    error: str = ""


@dataclass
class Results:
    by_setup: dict[str, list[Measurement]] = field(default_factory=dict)
    memory: list[MemoryResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def measure(
    setup: Setup,
    ctx: Context,
    upstream: subprocess.Popen[bytes],
    args: argparse.Namespace,
    round_no: int,
) -> Measurement:
    if upstream.poll() is not None:
        raise BenchError(f"the upstream exited with {upstream.returncode}")
    log = ctx.tmp / f"{setup.name}.{round_no}.log"
    server = None
    measured = upstream.pid
    if setup.name == "upstream-direct":
        port = ctx.upstream_port
    else:
        port = free_port()
        cwd, env = setup.where(ctx) if setup.where is not None else (REPO, None)
        server = ctx.processes.start(
            pinned(SERVER_CPU, setup.command(ctx, port)), log, cwd=cwd, env=env
        )
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
        measurement = Measurement(result)
        for rate in args.latency_rates:
            before = cpu_seconds(measured), cpu_seconds(upstream.pid)
            lat = run_openloop(ctx.processes, url, rate, args, log)
            after = cpu_seconds(measured), cpu_seconds(upstream.pid)
            # The processes are idle but for the generator's requests, all of them sent.
            sent = math.ceil((args.warmup + args.latency_duration) * rate)
            lat.server_cpu_us = (after[0] - before[0]) / sent * 1e6
            if setup.forwards and server is not None:
                lat.upstream_cpu_us = (after[1] - before[1]) / sent * 1e6
            measurement.latency[rate] = lat
        if args.many_connections:
            measurement.many = run_wrk(
                ctx.processes, url, args.duration, args.many_connections, log
            )
        if server is not None and server.poll() is not None:
            raise BenchError(f"{setup.name} exited during the run:\n{tail(log)}")
        return measurement
    except BenchError as e:
        raise BenchError(f"{setup.name}: {e}") from None
    finally:
        if server is not None:
            ctx.processes.stop(server)


def measure_memory(ctx: Context, args: argparse.Namespace) -> list[MemoryResult]:
    """The sidecar's RSS with N routes (N - 1 extra ones and the catch-all), after a warm-up."""
    found = []
    for routes in args.memory_routes:
        result = MemoryResult(routes)
        found.append(result)
        port = free_port()
        name = f"sidecar-memory-{routes}"
        log = ctx.tmp / f"{name}.log"
        config = sidecar_config(ctx.tmp, name, port, ctx.upstream_port, False, routes - 1)
        argv = [sys.executable, "-m", "sidecar", "run", "-c", str(config)]
        started = time.monotonic()
        server = ctx.processes.start(pinned(SERVER_CPU, argv), log)
        try:
            wait_for_port(port, server, log, timeout=args.memory_timeout)
            result.start_s = time.monotonic() - started
            expect_forwarded(port)
            run_wrk(ctx.processes, f"http://{HOST}:{port}/bench/item?id=1", 1, 50, log)
            time.sleep(0.5)
            result.rss_kib = rss_kib(server.pid)
        except BenchError as e:
            result.error = str(e).splitlines()[0]
        finally:
            ctx.processes.stop(server)
        print(
            f"memory  sidecar with {routes:>6} routes: "
            + (
                f"RSS {result.rss_kib / 1024:.1f} MiB, listening after {result.start_s:.1f}s"
                if not result.error
                else result.error
            ),
            flush=True,
        )
    return found


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def nginx_report_head(machine: str) -> list[str]:
    """The first lines of websocket_echo.py's and tls_origination.py's reports: the date,
    `machine`, the sidecar's revision, nginx's version."""
    nginx = which("nginx")
    return [
        f"date      {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine   {machine}",
        f"sidecar   {sidecar_revision()}",
        f"nginx     {tool_version([nginx, '-v']) if nginx else 'not installed'}",
    ]


def describe_machine(extra: list[str]) -> list[str]:
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
    model = cpu_model()
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    nginx = which("nginx")
    haproxy = which("haproxy")
    return [
        f"date      {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine   {os.cpu_count()} CPUs ({model}), {distro}, Linux {platform.release()}",
        f"python    {platform.python_version()}, aiohttp {aiohttp_version}, "
        f"uvloop {uvloop_version}",
        f"wrk       {tool_version(['wrk', '-v'])}",
        f"nginx     {tool_version([nginx, '-v']) if nginx else 'not installed'}",
        f"haproxy   {tool_version([haproxy, '-v']) if haproxy else 'not installed'}",
        f"sidecar   {sidecar_revision()}",
        *extra,
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
        raise BenchError(
            f"needs CPUs 0 and 1 (servers on 0, load on 1); allowed: {sorted(allowed)}"
        )
    if len(allowed) > 2:
        print(
            f"note: {len(allowed)} CPUs; CPUs 0 and 1 are used, others should be idle", flush=True
        )


def run(args: argparse.Namespace, setups: list[Setup]) -> Results:
    results = Results({setup.name: [] for setup in setups})
    processes = Processes()
    names = {setup.name for setup in setups}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base_tree = None
        if "sidecar-base" in names:
            base_tree = extract_base(args.base_commit, tmp)
            print(
                check_import("sidecar-base", base_tree, base_environment(base_tree), base_tree),
                f"(git archive {args.base_commit[:7]})",
                flush=True,
            )
        if args.memory_routes or any(
            n.startswith("sidecar-") and n != "sidecar-base" for n in names
        ):
            print(check_import("sidecar-forward", REPO, None, REPO), "(this checkout)", flush=True)
        try:
            upstream_port = free_port()
            upstream_log = tmp / "upstream.log"
            upstream = processes.start(
                pinned(SERVER_CPU, _python("upstream.py", "--port", str(upstream_port))),
                upstream_log,
            )
            wait_for_port(upstream_port, upstream, upstream_log)
            ctx = Context(
                tmp,
                processes,
                upstream_port,
                base_tree=base_tree,
                floor=args.floor if "floor" in names else None,
            )
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    m = measure(setup, ctx, upstream, args, round_no)
                    results.by_setup[setup.name].append(m)
                    note = _anomaly(setup, m)
                    if note:
                        results.warnings.append(f"round {round_no} {setup.name}: {note}")
                    print(_progress(setup, m, round_no, args, note), flush=True)
            results.memory = measure_memory(ctx, args)
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                processes.stop_all()
            finally:
                signal.signal(signal.SIGINT, previous)
    return results


def _progress(
    setup: Setup, m: Measurement, round_no: int, args: argparse.Namespace, note: str
) -> str:
    r = m.throughput
    parts = [
        f"round {round_no}/{args.rounds}  {setup.name:<19} {r.rps:>7.0f} req/s  "
        f"cpu {_us(r.server_cpu_us):>4} us/req  steal {r.steal_pct:4.1f}%"
    ]
    for rate, lat in m.latency.items():
        slow = "" if lat.kept_up else f" (only {lat.achieved:.0f}/s)"
        parts.append(f"@{rate}/s p50 {lat.p50_ms:.2f} p99 {lat.p99_ms:.2f} ms{slow}")
    if m.many is not None:
        parts.append(f"c{args.many_connections} {m.many.rps:.0f} req/s")
    return " | ".join(parts) + (f"  !! {note}" if note else "")


def _anomaly(setup: Setup, m: Measurement) -> str:
    notes = []
    for label, result in (("", m.throughput), ("many connections: ", m.many)):
        if result is None:
            continue
        if result.socket_errors:
            notes.append(f"{label}{result.socket_errors} socket errors")
        if setup.ok_status == "2xx" and result.non_2xx:
            notes.append(f"{label}{result.non_2xx} non-2xx responses")
        if setup.ok_status != "2xx" and result.non_2xx != result.requests:
            notes.append(f"{label}only {result.non_2xx} of {result.requests} responses non-2xx")
    if m.throughput.steal_pct > STEAL_WARNING:
        notes.append(f"{m.throughput.steal_pct:.0f}% of CPU {SERVER_CPU} stolen by the hypervisor")
    expected = "200" if setup.ok_status == "2xx" else setup.ok_status
    for rate, lat in m.latency.items():
        wrong = sum(n for status, n in lat.statuses.items() if status != expected)
        if lat.errors or wrong:
            notes.append(
                f"@{rate}/s: {lat.errors} connection errors, {wrong} answers not {expected}"
            )
        if lat.lag_p99_ms > LAG_WARNING:
            notes.append(f"@{rate}/s: the generator itself sent late (p99 {lat.lag_p99_ms:.1f} ms)")
    return ", ".join(notes)


# -- the report -----------------------------------------------------------------


def _us(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f} %"


def _cpu_split(own: float, upstream: float) -> str:
    """A forwarding setup's CPU per request, then its upstream's: "287 + 182"."""
    return _us(own) if math.isnan(upstream) else f"{_us(own)} + {_us(upstream)}"


def _ms(value: float, sign: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str) -> str:
    """'median, min..max' of per-round figures."""
    if not values:
        return "-"
    return f"{format(median(values), fmt)}, {format(min(values), fmt)}..{format(max(values), fmt)}"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    left: int = 1
    """How many leading columns are left-aligned."""
    left_tail: int = 0
    """How many trailing columns are left-aligned too (text after the numbers)."""

    def _left(self, i: int) -> bool:
        return i < self.left or i >= len(self.headers) - self.left_tail

    def text(self) -> list[str]:
        widths = [
            max(len(h), *(len(row[i]) for row in self.rows)) if self.rows else len(h)
            for i, h in enumerate(self.headers)
        ]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if self._left(i) else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        return [line(self.headers), *(line(row) for row in self.rows)]

    def markdown(self) -> list[str]:
        rule = ["---" if self._left(i) else "---:" for i in range(len(self.headers))]
        return ["| " + " | ".join(cells) + " |" for cells in (self.headers, rule, *self.rows)]


@dataclass
class LatencySummary:
    achieved: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    added_p50_ms: float
    added_p99_ms: float
    cpu_busy_pct: float
    server_cpu_us: float
    upstream_cpu_us: float
    slow_rounds: int
    rounds: int
    min_achieved: float


@dataclass
class Summary:
    """The medians of one setup over the rounds."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    upstream_cpu_us: float
    steal_pct: float
    per_round: list[float]
    latency: dict[int, LatencySummary]
    many_rps: float
    many_per_round: list[float]
    many_errors: float


@dataclass
class Target:
    issue: str
    claim: str
    value: float
    bar: float = float("nan")
    at_least: bool = True
    unit: str = ""
    detail: str = ""
    kind: str = "bar"
    """"bar" (PASS/FAIL), "aim" (reported against a figure, not a bar) or "info" (a figure)."""
    digits: int = 3

    @property
    def verdict(self) -> str:
        if self.kind == "info":
            return "-"
        if math.isnan(self.value):
            return "n/a"
        ok = self.value >= self.bar if self.at_least else self.value <= self.bar
        if self.kind == "aim":
            return "met" if ok else "not met"
        return "PASS" if ok else "FAIL"

    @property
    def bar_text(self) -> str:
        if self.kind == "info":
            return "-"
        aim = "aim " if self.kind == "aim" else ""
        return f"{aim}{'>=' if self.at_least else '<='} {self.bar:g}{self.unit}"

    @property
    def value_text(self) -> str:
        return f"{self.value:.{self.digits}f}{self.unit}"


def summarize(results: Results) -> dict[str, Summary]:
    reference = results.by_setup.get("upstream-direct", [])
    out: dict[str, Summary] = {}
    for name, runs in results.by_setup.items():
        if not runs:
            continue
        latency: dict[int, LatencySummary] = {}
        for rate in runs[0].latency:
            own = [m.latency[rate] for m in runs if rate in m.latency]
            base = [m.latency.get(rate) for m in reference]
            added50, added99 = [], []
            for mine, ref in zip(own, base, strict=False):
                if ref is not None:
                    added50.append(mine.p50_ms - ref.p50_ms)
                    added99.append(mine.p99_ms - ref.p99_ms)
            latency[rate] = LatencySummary(
                achieved=median([r.achieved for r in own]),
                p50_ms=median([r.p50_ms for r in own]),
                p99_ms=median([r.p99_ms for r in own]),
                p999_ms=median([r.p999_ms for r in own]),
                added_p50_ms=median(added50),
                added_p99_ms=median(added99),
                cpu_busy_pct=median([r.cpu_busy_pct for r in own]),
                server_cpu_us=median([r.server_cpu_us for r in own]),
                upstream_cpu_us=median([r.upstream_cpu_us for r in own]),
                slow_rounds=sum(not r.kept_up for r in own),
                rounds=len(own),
                min_achieved=min(r.achieved for r in own),
            )
        many = [m.many for m in runs if m.many is not None]
        out[name] = Summary(
            name=name,
            rps=statistics.median(m.throughput.rps for m in runs),
            p50_ms=median([m.throughput.p50_ms for m in runs]),
            p99_ms=median([m.throughput.p99_ms for m in runs]),
            cpu_us=median([m.throughput.server_cpu_us for m in runs]),
            upstream_cpu_us=median([m.throughput.upstream_cpu_us for m in runs]),
            steal_pct=median([m.throughput.steal_pct for m in runs]),
            per_round=[m.throughput.rps for m in runs],
            latency=latency,
            many_rps=median([w.rps for w in many]),
            many_per_round=[w.rps for w in many],
            many_errors=median([float(w.socket_errors) for w in many]),
        )
    return out


def _paired(results: Results, ours: str, base: str, key: Callable[[Measurement], float]) -> str:
    ratios = [
        key(a) / key(b)
        for a, b in zip(results.by_setup[ours], results.by_setup[base], strict=True)
        if key(b) and not math.isnan(key(a) / key(b))
    ]
    if not ratios:
        return ""
    return (
        f"per round {statistics.median(ratios):.3f} (median), {min(ratios):.3f}..{max(ratios):.3f}"
    )


def _per_round_us(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    return (
        f"per round {statistics.median(values):+.1f} (median), "
        f"{min(values):+.1f}..{max(values):+.1f}"
    )


def _own_and_upstream_us(m: Measurement) -> float:
    """CPU per request of a setup and of the upstream behind it, wrk run (the upstream's alone,
    direct)."""
    upstream = m.throughput.upstream_cpu_us
    return m.throughput.server_cpu_us + (0.0 if math.isnan(upstream) else upstream)


def added_cost(results: Results, s: dict[str, Summary], name: str) -> Target:
    """Issue 13: the microseconds a request costs with `name` in front of the upstream, over the
    upstream alone. The value from 1/throughput (CPU 0, shared by the setup and the upstream, is
    saturated under wrk's closed loop, so 1/req/s is its time per request); in the detail, the
    same from the CPU per request read from /proc (setup + upstream, minus upstream-direct's),
    which does not count time CPU 0 sat idle or was stolen."""
    direct_name = "upstream-direct"
    direct = s[direct_name]
    x = s[name]
    value = 1e6 / x.rps - 1e6 / direct.rps
    pairs = list(zip(results.by_setup[name], results.by_setup[direct_name], strict=True))
    by_rps = [1e6 / a.throughput.rps - 1e6 / b.throughput.rps for a, b in pairs]
    by_cpu = [_own_and_upstream_us(a) - b.throughput.server_cpu_us for a, b in pairs]
    upstream = 0.0 if math.isnan(x.upstream_cpu_us) else x.upstream_cpu_us
    cpu = x.cpu_us + upstream - direct.cpu_us
    detail = (
        f"{1e6 / x.rps:.1f} - {1e6 / direct.rps:.1f} us; {_per_round_us(by_rps)}; "
        f"from CPU per request {cpu:+.1f} us ({_us(x.cpu_us)} + upstream {_us(upstream)} "
        f"- {_us(direct.cpu_us)}), {_per_round_us(by_cpu)}"
    )
    return Target(
        "13",
        f"added us/req of {name} over {direct_name}, from 1/throughput",
        value,
        unit=" us",
        detail=detail,
        kind="info",
        digits=1,
    )


def targets(results: Results, s: dict[str, Summary]) -> list[Target]:
    found: list[Target] = []

    def rps(m: Measurement) -> float:
        return m.throughput.rps

    def cpu(m: Measurement) -> float:
        return m.throughput.server_cpu_us

    def ratio(issue: str, ours: str, base: str, bar: float, label: str, kind: str = "bar") -> None:
        if ours in s and base in s:
            detail = _paired(results, ours, base, rps)
            if base == "sidecar-base":
                detail += (
                    f"; CPU {_us(s[ours].cpu_us)} vs {_us(s[base].cpu_us)} us/req: "
                    f"{s[ours].cpu_us / s[base].cpu_us:.3f}, " + _paired(results, ours, base, cpu)
                )
            found.append(
                Target(
                    issue,
                    f"{label}: {ours} / {base} req/s",
                    s[ours].rps / s[base].rps,
                    bar,
                    True,
                    detail=detail,
                    kind=kind,
                )
            )

    def cpu_ratio(issue: str, ours: str, base: str, bar: float, label: str) -> None:
        if ours in s and base in s:
            found.append(
                Target(
                    issue,
                    f"{label}: {ours} / {base} CPU per request",
                    s[ours].cpu_us / s[base].cpu_us,
                    bar,
                    False,
                    detail=f"{s[ours].cpu_us:.0f} vs {s[base].cpu_us:.0f} us/req; "
                    + _paired(results, ours, base, cpu)
                    + f"; req/s ratio {s[ours].rps / s[base].rps:.3f}, "
                    + _paired(results, ours, base, rps),
                )
            )

    ratio("2", "sidecar-forward", "minimal-proxy", PASS_RATIO, "forwarding")
    ratio("2", "sidecar-open", "bare-503", PASS_RATIO, "rejecting from OPEN")
    ratio("5", "sidecar-forward", "nginx", 0.50, "forwarding")
    ratio("5, 13", "sidecar-open", "bare-503", 0.95, "rejecting from OPEN")
    forward = s.get("sidecar-forward")
    if forward and ISSUE_RATE in forward.latency and "upstream-direct" in s:
        lat = forward.latency[ISSUE_RATE]
        detail = (
            f"p50 {lat.added_p50_ms:+.2f} ms; sidecar p99 {lat.p99_ms:.2f} ms; "
            f"CPU {SERVER_CPU} {_pct(lat.cpu_busy_pct)} busy"
        )
        ng = s.get("nginx")
        if ng is not None and ISSUE_RATE in ng.latency:
            ref = ng.latency[ISSUE_RATE]
            detail += (
                f" (nginx: added p99 {_ms(ref.added_p99_ms, sign=True)} ms, "
                f"CPU {SERVER_CPU} {_pct(ref.cpu_busy_pct)} busy)"
            )
        if lat.slow_rounds:
            detail += (
                f"; did NOT keep up in {lat.slow_rounds}/{lat.rounds} rounds "
                f"(achieved {lat.achieved:.0f} of {ISSUE_RATE} req/s, median)"
            )
        found.append(
            Target(
                "5",
                f"added p99 latency of sidecar-forward at {ISSUE_RATE} req/s",
                lat.added_p99_ms,
                1.0,
                False,
                " ms",
                detail,
            )
        )
    cpu_ratio("5", "sidecar-1000-routes", "sidecar-forward", 1.05, "1,000 routes")
    ratio("13", "sidecar-forward", "sidecar-base", BASE_RATIO, "forwarding, now vs --base")
    ratio("13", "sidecar-forward", "nginx", NGINX_AIM, "forwarding", kind="aim")
    ratio("13", "floor", "nginx", float("nan"), "the floor", kind="info")
    cpu_ratio("14", "sidecar-policies", "sidecar-forward", POLICY_RATIO, "all four policies")
    cpu_ratio("14", "sidecar-rate-limited", "sidecar-open", 1.0, "a 429 against OPEN's 503")
    cpu_ratio("15", "sidecar-retry", "sidecar-forward", RETRY_RATIO, "a retry policy")
    if "upstream-direct" in s:
        found += [added_cost(results, s, name) for name in ADDED_COST if name in s]
    return found


def memory_table(results: Results) -> Table:
    table = Table(["routes", "RSS MiB", "listening after", "KiB per route vs 1 route"])
    one = next((m for m in results.memory if m.routes == 1 and m.rss_kib), None)
    for m in results.memory:
        if m.error:
            table.rows.append([f"{m.routes}", "-", m.error[:60], "-"])
            continue
        per_route = (
            f"{(m.rss_kib - one.rss_kib) / (m.routes - 1):.1f}"
            if one is not None and m.routes > 1
            else "-"
        )
        table.rows.append(
            [f"{m.routes}", f"{m.rss_kib / 1024:.1f}", f"{m.start_s:.1f} s", per_route]
        )
    return table


def tables(
    results: Results, s: dict[str, Summary], args: argparse.Namespace
) -> list[tuple[str, Table]]:
    names = [n for n in SETUP_NAMES if n in s]
    found: list[tuple[str, Table]] = []
    nginx = s.get("nginx")
    throughput = Table(
        [
            "setup",
            "median req/s",
            "/ nginx",
            "p50 ms",
            "p99 ms",
            "cpu us/req",
            "upstr us/req",
            "steal%",
            "req/s per round",
        ]
    )
    for n in names:
        x = s[n]
        throughput.rows.append(
            [
                n,
                f"{x.rps:.0f}",
                f"{x.rps / nginx.rps:.2f}" if nginx else "-",
                _ms(x.p50_ms),
                _ms(x.p99_ms),
                _us(x.cpu_us),
                _us(x.upstream_cpu_us),
                f"{x.steal_pct:.1f}",
                " ".join(f"{v:.0f}" for v in x.per_round),
            ]
        )
    found.append(
        (
            f"Throughput: wrk -t1 -c{args.connections} -d{args.duration}s, "
            f"medians of {args.rounds} rounds",
            throughput,
        )
    )
    for rate in args.latency_rates:
        table = Table(
            [
                "setup",
                "achieved req/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "added p50 ms",
                "added p99 ms",
                f"CPU {SERVER_CPU} busy",
                "CPU us/req",
                "kept up",
            ]
        )
        for n in names:
            lat = s[n].latency.get(rate)
            if lat is None:
                continue
            kept = (
                "yes"
                if not lat.slow_rounds
                else f"NO in {lat.slow_rounds}/{lat.rounds} (min {lat.min_achieved:.0f}/s)"
            )
            reference = n == "upstream-direct"
            table.rows.append(
                [
                    n,
                    f"{lat.achieved:.0f}",
                    _ms(lat.p50_ms),
                    _ms(lat.p99_ms),
                    _ms(lat.p999_ms),
                    "(reference)" if reference else _ms(lat.added_p50_ms, sign=True),
                    "(reference)" if reference else _ms(lat.added_p99_ms, sign=True),
                    _pct(lat.cpu_busy_pct),
                    _cpu_split(lat.server_cpu_us, lat.upstream_cpu_us),
                    kept,
                ]
            )
        found.append(
            (
                f"Latency at {rate} req/s offered: openloop.py, {args.latency_connections} "
                f"keep-alive connections, {args.latency_duration:g}s (+{args.warmup:g}s "
                "unrecorded); added = minus upstream-direct in the same round; "
                "CPU us/req = the setup's own + the upstream's at this rate; "
                f"CPU {SERVER_CPU} busy = their sum x the rate; medians",
                table,
            )
        )
    if args.many_connections:
        many = Table(
            ["setup", "median req/s", f"/ c{args.connections}", "socket errors", "per round"]
        )
        for n in names:
            x = s[n]
            many.rows.append(
                [
                    n,
                    f"{x.many_rps:.0f}",
                    f"{x.many_rps / x.rps:.2f}",
                    f"{x.many_errors:.0f}",
                    " ".join(f"{v:.0f}" for v in x.many_per_round),
                ]
            )
        found.append(
            (
                f"Throughput with {args.many_connections} open keep-alive connections: "
                f"wrk -t1 -c{args.many_connections} -d{args.duration}s",
                many,
            )
        )
    if results.memory:
        found.append(
            (
                "Sidecar memory per route: VmRSS after 1 s of wrk; N routes = "
                "N - 1 (half host, half prefix) + the catch-all",
                memory_table(results),
            )
        )
    verdicts = Table(["issue", "claim", "value", "bar", "verdict", "detail"], left=2, left_tail=2)
    for t in targets(results, s):
        verdicts.rows.append([t.issue, t.claim, t.value_text, t.bar_text, t.verdict, t.detail])
    if verdicts.rows:
        found.append(
            (
                "Targets (ratios of medians unless stated; an `aim` and the rows without a bar "
                "are reported, not judged)",
                verdicts,
            )
        )
    return found


def load_description(args: argparse.Namespace) -> list[str]:
    rates = (
        f"openloop.py at {', '.join(str(r) for r in args.latency_rates)} req/s"
        if args.latency_rates
        else "no open-loop runs"
    )
    return [
        f"servers   every server and the upstream pinned to CPU {SERVER_CPU} (taskset); "
        f"the load on CPU {WRK_CPU}",
        f"load      wrk -t1 -c{args.connections} -d{args.duration}s (after {args.warmup}s "
        f"warm-up); {rates}; "
        + (
            f"wrk -t1 -c{args.many_connections} -d{args.duration}s"
            if args.many_connections
            else "no many-connection run"
        ),
        f"rounds    {args.rounds}, interleaved (the order rotates each round)",
    ]


LEGEND = [
    "cpu us/req    user+system CPU of the server under test (all its processes), per request",
    "upstr us/req  the same for the upstream (forwarding setups)",
    "steal%        CPU 0 time taken by the hypervisor during the run (high: noisy)",
    "CPU 0 busy    in the latency tables: the share of CPU 0 the setup and its upstream use at",
    "              that rate (CPU us/req x rate); the closer to 100 %, the longer whatever",
    "              arrives during a stall waits behind it, and the higher p99 climbs",
    f"kept up       achieved >= {KEEP_UP:.0%} of the offered rate in every round; when not, "
    "its latencies are those of a queue that kept growing",
    "added us/req  (issue 13) 1e6 / req/s of the setup minus the same of upstream-direct, wrk at",
    "              c50: CPU 0 (proxy + upstream) time per request, saturated; `from CPU per",
    "              request`: the setup's + the upstream's CPU us/req minus upstream-direct's",
]


def report(results: Results, args: argparse.Namespace, machine: list[str]) -> str:
    s = summarize(results)
    lines = ["", "=" * 100, "sidecar comparison (issues 2, 5, 13, 14 and 15)", *machine]
    lines += load_description(args)
    for title, table in tables(results, s, args):
        lines += ["", title, *("  " + row for row in table.text())]
    if results.warnings:
        lines += ["", "warnings:", *(f"  {w}" for w in results.warnings)]
    lines.append("")
    lines += [f"  {setup.name:<19} {setup.description}" for setup in SETUPS if setup.name in s]
    lines += [f"  {line}" for line in LEGEND]
    lines.append("=" * 100)
    return "\n".join(lines)


def write_chart(results: Results, args: argparse.Namespace, machine: list[str]) -> str:
    """benchmarks/results.png; an empty string, or why there is no chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (pip install -e '.[bench]')"
    s = summarize(results)
    names = [n for n in SETUP_NAMES if n in s]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9.5))
    x = list(range(len(names)))
    width = 0.38
    top.bar(
        [i - width / 2 for i in x],
        [s[n].rps for n in names],
        width,
        label=f"{args.connections} connections",
        color="#4c72b0",
    )
    if args.many_connections:
        top.bar(
            [i + width / 2 for i in x],
            [s[n].many_rps for n in names],
            width,
            label=f"{args.many_connections} connections",
            color="#8fb0d9",
        )
    top.set_xticks(x, names, rotation=15, ha="right")
    top.set_ylabel("requests/s (median)")
    top.set_title(f"Throughput, servers on one core (median of {args.rounds} rounds)")
    top.legend()
    top.grid(axis="y", alpha=0.3)
    forwarding = [n for n in names if n != "upstream-direct"]
    bars = [(rate, pct) for rate in args.latency_rates for pct in ("p50", "p99")]
    if bars and forwarding:
        step = 0.8 / len(bars)
        colors = ["#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#937860"]
        for k, (rate, pct) in enumerate(bars):
            values, slow = [], []
            for n in forwarding:
                lat = s[n].latency.get(rate)
                values.append(
                    float("nan")
                    if lat is None
                    else (lat.added_p50_ms if pct == "p50" else lat.added_p99_ms)
                )
                slow.append(lat is not None and lat.slow_rounds > 0)
            xs = [i - 0.4 + step * (k + 0.5) for i in range(len(forwarding))]
            drawn = bottom.bar(
                xs, values, step, label=f"added {pct} @ {rate} req/s", color=colors[k % 6]
            )
            for rect, is_slow in zip(drawn, slow, strict=True):
                if is_slow:
                    rect.set_hatch("//")
        bottom.axhline(
            1.0,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"issue 5 bar: added p99 <= 1 ms @ {ISSUE_RATE} req/s",
        )
        bottom.set_yscale("symlog", linthresh=0.1)
        bottom.set_xticks(list(range(len(forwarding))), forwarding, rotation=15, ha="right")
        bottom.set_ylabel("ms over upstream-direct (symlog)")
        bottom.set_title(
            "Added latency at fixed offered load (open loop; hatched: could not keep up)"
        )
        bottom.legend(fontsize="small", ncol=2)
        bottom.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"sidecar benchmark - {machine[0].split(None, 1)[1]} - {machine[1].split(None, 1)[1]}",
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(RESULTS_PNG, dpi=100)
    plt.close(fig)
    return ""


def write_results(
    results: Results, args: argparse.Namespace, machine: list[str], command: str, minutes: float
) -> None:
    why_no_chart = write_chart(results, args, machine)
    if why_no_chart:
        print(f"compare.py: {why_no_chart}: RESULTS.md is written without the chart", flush=True)
        with contextlib.suppress(FileNotFoundError):
            RESULTS_PNG.unlink()  # a chart from another run would not match these results
    s = summarize(results)
    lines = [
        "# Benchmark results (issues 2, 5, 13, 14 and 15)",
        "",
        "Written by `python benchmarks/compare.py --write-results`; see `README.md` beside this",
        "file for what each setup is and how the figures are taken. Absolute figures depend on",
        "the machine; the ratios, taken within one run, are what the targets are judged on.",
        "",
        "## Machine and command",
        "",
        "```",
        *machine,
        *load_description(args),
        f"command   {command}",
        f"took      {minutes:.1f} minutes",
        "```",
    ]
    for title, table in tables(results, s, args):
        lines += ["", f"## {title}", "", *table.markdown()]
    if not why_no_chart:
        lines += ["", "## Chart", "", "![throughput and added latency per setup](results.png)"]
    slow = [
        f"`{n}` at {rate} req/s ({lat.slow_rounds}/{lat.rounds} rounds, "
        f"median {lat.achieved:.0f} req/s achieved)"
        for n, x in s.items()
        for rate, lat in x.latency.items()
        if lat.slow_rounds
    ]
    lines += ["", "## Notes", ""]
    if slow:
        lines.append(
            "Could not keep up with the offered rate (achieved < "
            f"{KEEP_UP:.0%}): " + "; ".join(slow) + ". Their latencies there are those of a"
            " growing queue, not of the proxy."
        )
    else:
        lines.append("Every setup kept up with every offered rate.")
    if results.warnings:
        lines += ["", "Warnings during the run:", ""]
        lines += [f"- {w}" for w in results.warnings]
    lines += ["", "Legend:", ""]
    lines += [f"- `{setup.name}`: {setup.description}" for setup in SETUPS if setup.name in s]
    lines += [f"- {line}" for line in LEGEND]
    kept = ""
    with contextlib.suppress(FileNotFoundError):
        old = RESULTS_MD.read_text()
        if KEPT in old:
            kept = "\n" + old[old.index(KEPT) :]
    RESULTS_MD.write_text("\n".join(lines) + "\n" + kept)
    print(f"wrote {RESULTS_MD}" + ("" if why_no_chart else f" and {RESULTS_PNG.name}"))


# -- the command line -----------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 500,2000") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: negative")
    return [v for v in values if v > 0]


def _setup_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in SETUP_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setup {', '.join(unknown) or '(none)'}; known: {', '.join(SETUP_NAMES)}"
        )
    return names


def estimate_minutes(args: argparse.Namespace, setups: int) -> float:
    """Rough wall-clock time of a run, calibrated on the 2-vCPU VM of README.md."""
    per_setup: float = 1.0 + args.warmup + args.duration
    per_setup += sum(0.8 + args.warmup + args.latency_duration for _ in args.latency_rates)
    per_setup += (args.duration + 0.5) if args.many_connections else 0.0
    memory = sum(3.0 + routes / 2500 for routes in args.memory_routes)
    return float(per_setup * setups * args.rounds + memory) / 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare the sidecar with nginx, HAProxy, minimal aiohttp baselines, a "
        "floor proxy and itself at an earlier commit."
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 1)")
    parser.add_argument(
        "--duration", type=int, help="seconds of each measured run (default 5; --quick 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of load before each measurement (default 1)"
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument(
        "--latency-rates",
        type=_int_list,
        default=[500, ISSUE_RATE],
        metavar="R,...",
        help=f"open-loop offered loads in req/s (default 500,{ISSUE_RATE}; 0 for none)",
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        help="seconds of each open-loop run (default 8; --quick 2)",
    )
    parser.add_argument(
        "--latency-connections",
        type=int,
        default=64,
        help="keep-alive connections of the open-loop generator (default 64)",
    )
    parser.add_argument(
        "--many-connections",
        type=int,
        default=1000,
        help="connections of the second wrk run (default 1000; 0 to skip it)",
    )
    parser.add_argument(
        "--memory-routes",
        type=_int_list,
        metavar="N,...",
        help="route counts for the memory probe (default 1,1000,10000; --quick 1,1000; 0: none)",
    )
    parser.add_argument(
        "--memory-timeout",
        type=float,
        default=60.0,
        help="seconds the sidecar may take to start in the memory probe (default 60)",
    )
    parser.add_argument(
        "--only",
        type=_setup_list,
        metavar="SETUP,...",
        help=f"only these of: {', '.join(SETUP_NAMES)}",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        metavar="COMMIT",
        help=f"the commit `sidecar-base` runs (default {DEFAULT_BASE})",
    )
    parser.add_argument(
        "--floor",
        type=Path,
        default=DEFAULT_FLOOR,
        metavar="PATH",
        help=f"floor_proxy.py for the `floor` setup (default {DEFAULT_FLOOR})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round of 2 s runs (about 2 minutes)"
    )
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="also write benchmarks/RESULTS.md and benchmarks/results.png",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.duration is None:
        args.duration = 2 if args.quick else 5
    if args.latency_duration is None:
        args.latency_duration = 2.0 if args.quick else 8.0
    if args.memory_routes is None:
        args.memory_routes = [1, 1000] if args.quick else [1, 1000, 10000]
    if args.memory_routes and 1 not in args.memory_routes:
        args.memory_routes.insert(0, 1)  # the baseline the per-route figure needs
    if (
        args.rounds < 1
        or args.duration < 1
        or args.connections < 1
        or args.warmup < 0
        or args.latency_duration <= 0
        or args.latency_connections < 1
        or args.many_connections < 0
    ):
        parser.error("--rounds, --duration and the connection counts must be at least 1")

    setups = SETUPS
    if args.only:
        wanted = set(args.only)
        if args.latency_rates or wanted & set(ADDED_COST):
            wanted.add("upstream-direct")  # added latency and cost are measured against it
        setups = [s for s in SETUPS if s.name in wanted]
    args.floor = args.floor.expanduser().resolve()
    args.base_commit = ""

    # Ctrl-C, even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    started = time.monotonic()
    try:
        extra = []
        if any(s.name == "sidecar-base" for s in setups):
            args.base_commit, why = resolve_base(args.base)
            if why:
                setups = [s for s in setups if s.name != "sidecar-base"]
                extra.append(f"base      the sidecar-base row is skipped: {why}")
            else:
                extra.append(f"base      git {args.base_commit[:7]} (--base {args.base})")
        if any(s.name == "floor" for s in setups):
            why = floor_problem(args.floor)
            if why:
                setups = [s for s in setups if s.name != "floor"]
                extra.append(f"floor     the floor row is skipped: {why}")
            else:
                extra.append(f"floor     {args.floor}")
        if not setups:
            raise BenchError("no setup left to run")
        check_cpus()
        ensure_tools(setups)
        open_files = raise_open_files()
        if open_files < 2 * args.many_connections + 256:
            print(
                f"note: only {open_files} open files allowed (ulimit -n); "
                f"{args.many_connections} connections may fail",
                flush=True,
            )
        machine = describe_machine(extra)
        print("\n".join(machine), flush=True)
        print(
            f"{len(setups)} setups x {args.rounds} rounds: about "
            f"{estimate_minutes(args, len(setups)):.0f} minutes",
            flush=True,
        )
        results = run(args, setups)
    except BenchError as e:
        print(f"compare.py: cannot run the benchmark: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print(report(results, args, machine))
    minutes = (time.monotonic() - started) / 60
    print(f"took {minutes:.1f} minutes")
    if args.write_results:
        command = shlex.join(
            ["python", "benchmarks/compare.py", *(sys.argv[1:] if argv is None else argv)]
        )
        write_results(results, args, machine, command, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
