"""Issue 16: TLS origination throughput, the sidecar against nginx, with plain HTTP beside it.

    python benchmarks/tls_origination.py [--rounds 5] [--duration 5] [--warmup 1]
                                         [--connections 50] [--quick]

The upstream is nginx (one worker), serving a fixed 100-byte `text/plain` body on two
ports: plain HTTP, and HTTPS with a certificate for `localhost` and 127.0.0.1 signed by a
private CA (EC P-256 keys, made fresh in a temporary directory with `cryptography`),
TLS 1.2 and 1.3. Every answer carries `X-Upstream-Tls: <the protocol>` when it came over
TLS, so the check before each run can tell that a setup reached the port it should, and
over TLS 1.3. nginx is the upstream because it is the cheapest server here: the proxies'
costs are most of what is measured. Each proxy listens on plain HTTP:

- `sidecar-https`: `sidecar run` (this checkout), one catch-all route with
  `upstream: https://127.0.0.1:PORT` and `tls: {ca_file: ca.pem, server_name: localhost}`
  (every other setting at its default: verification on, TLS 1.2 at least, sessions
  resumed); `sidecar-http` the same route to the plain port;
- `nginx-https`: nginx, `worker_processes 1`, `proxy_pass https://` an upstream block with
  `keepalive 64`, `proxy_http_version 1.1`, `proxy_set_header Connection ""`,
  `proxy_ssl_verify on` with `proxy_ssl_trusted_certificate ca.pem`, `proxy_ssl_name
  localhost`, `proxy_ssl_server_name on`, `proxy_ssl_session_reuse on` and
  `proxy_ssl_protocols TLSv1.2 TLSv1.3` (nginx 1.22 leaves 1.3 out by default);
  `nginx-http` the same to the plain port (compare.py's `nginx` setup);
- `upstream-direct`: the load straight at the upstream's plain port, for reference.

Server names match on both sides (SNI `localhost`, and the name checked). Like compare.py,
every server (the proxy under test and the upstream) runs on CPU 0 (`taskset -c 0`) and
wrk on CPU 1. Each round starts every proxy afresh, checks one answer, runs 1 s of wrk
warm-up (the upstream TLS connections are made then), then `wrk -t1 -c50 -d5s --latency`
(keep-alive), reading the CPU time of the proxy (all its processes and threads) and of
the upstream from /proc over the run; the order of the setups rotates from round to
round. The report gives medians over the rounds and the ratios sidecar / nginx of the
medians, over TLS and over plain HTTP, each with the median and range of the per-round
ratios, and what TLS adds to each proxy's CPU per request.

The exit status is 1 when the benchmark cannot run (a tool missing that cannot be
installed, a server that does not start or answers wrongly), else 0: a report, no bar.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compare import (
    HOST,
    QUIET_ATTEMPTS,
    QUIET_PCT,
    SERVER_CPU,
    SETUPS,
    BenchError,
    Processes,
    WrkResult,
    add_quiet_option,
    all_tasks,
    cpu_seconds,
    cpu_ticks,
    disturbed_note,
    ensure_tools,
    free_port,
    median,
    nginx_argv,
    nginx_proxy_directives,
    nginx_report_head,
    once_more,
    pinned,
    raise_open_files,
    run_wrk,
    spread,
    tail,
    tasks_seconds,
    tool_version,
    wait_for_port,
    wait_quiet,
)

BODY = "x" * 99 + "\n"
SERVER_NAME = "localhost"
SETUP_NAMES = ("upstream-direct", "nginx-http", "sidecar-http", "nginx-https", "sidecar-https")
TLS_HEADER = "X-Upstream-Tls"


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    """A private CA and a server certificate it signed, for `localhost` and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("sidecar benchmark CA"))
        .issuer_name(name("sidecar benchmark CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(SERVER_NAME))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


# -- servers ------------------------------------------------------------------------------


def nginx(tmp: Path, name: str, http_block: str) -> list[str]:
    """nginx with one worker, no access log, every path in `tmp / name`, client
    connections kept alive as long as wrk needs; `http_block` inside `http { }`."""
    return nginx_argv(
        tmp / name,
        f"    keepalive_requests 1000000;\n    keepalive_timeout 75s;\n{http_block}",
    )


def upstream_argv(tmp: Path, pki: Pki, http_port: int, https_port: int) -> list[str]:
    location = f"""
        location / {{
            default_type text/plain;
            add_header {TLS_HEADER} $ssl_protocol;
            return 200 "{BODY.rstrip()}\\n";
        }}"""
    return nginx(
        tmp,
        "upstream",
        f"""
    server {{
        listen {HOST}:{http_port};{location}
    }}
    server {{
        listen {HOST}:{https_port} ssl;
        ssl_certificate {pki.cert};
        ssl_certificate_key {pki.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:1m;{location}
    }}""",
    )


@dataclass
class Ports:
    http: int
    https: int


@dataclass
class Setup:
    name: str
    command: Callable[[Path, Pki, Ports, int], list[str]] | None
    """argv of the proxy listening on the port (None: the load goes to the upstream)."""
    tls: bool


def nginx_proxy(tls: bool) -> Callable[[Path, Pki, Ports, int], list[str]]:
    def command(tmp: Path, pki: Pki, upstream: Ports, port: int) -> list[str]:
        scheme = "https" if tls else "http"
        address = upstream.https if tls else upstream.http
        ssl = (
            f"""
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {pki.ca};
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {SERVER_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;"""
            if tls
            else ""
        )
        return nginx(
            tmp,
            f"nginx-{scheme}-{port}",
            "\n" + nginx_proxy_directives(port, f"{HOST}:{address}", scheme, ssl),
        )

    return command


def sidecar_proxy(tls: bool) -> Callable[[Path, Pki, Ports, int], list[str]]:
    def command(tmp: Path, pki: Pki, upstream: Ports, port: int) -> list[str]:
        lines = [
            f"listen: {HOST}:{port}",
            "admin:",
            f"  listen: {HOST}:0",
            "routes:",
            "  - name: bench",
            "    match: {path_prefix: /}",
        ]
        if tls:
            lines += [
                f"    upstream: https://{HOST}:{upstream.https}",
                f"    tls: {{ca_file: {pki.ca}, server_name: {SERVER_NAME}}}",
            ]
        else:
            lines.append(f"    upstream: http://{HOST}:{upstream.http}")
        path = tmp / f"sidecar-{port}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return [sys.executable, "-m", "sidecar", "run", "-c", str(path)]

    return command


SETUPS_HERE = {
    "upstream-direct": Setup("upstream-direct", None, False),
    "nginx-http": Setup("nginx-http", nginx_proxy(False), False),
    "sidecar-http": Setup("sidecar-http", sidecar_proxy(False), False),
    "nginx-https": Setup("nginx-https", nginx_proxy(True), True),
    "sidecar-https": Setup("sidecar-https", sidecar_proxy(True), True),
}


def check(port: int, tls: bool) -> str:
    """One GET through the setup: 200, the 100-byte body, and the upstream's word that it
    came over TLS (and which version) or not. The protocol, or "plain"."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/bench/check?x=1")
        response = conn.getresponse()
        body = response.read()
        said = response.getheader(TLS_HEADER, "")
    finally:
        conn.close()
    if response.status != 200 or body != BODY.encode():
        raise BenchError(f"port {port}: expected 200 with the body, got {response.status} {body!r}")
    if tls and said != "TLSv1.3":
        raise BenchError(f"port {port}: the upstream says the request came over {said!r}")
    if not tls and said:
        raise BenchError(f"port {port}: expected plain HTTP to the upstream, it says {said!r}")
    return said or "plain"


# -- the run ------------------------------------------------------------------------------


@dataclass
class Measurement:
    wrk: WrkResult
    proxy_us: float
    upstream_us: float
    steal_pct: float
    others_pct: float
    """CPU time (% of one CPU) of every thread on the machine but the proxy's and the
    upstream's during the run, wrk's left out (it has ended when the second count is
    taken): kernel threads, or another job on the machine, which disturbs the run."""


def measure(
    processes: Processes,
    tmp: Path,
    pki: Pki,
    upstream: Ports,
    upstream_pid: int,
    setup: Setup,
    args: argparse.Namespace,
) -> Measurement:
    child = None
    port = upstream.http
    log = tmp / f"{setup.name}.log"
    try:
        if setup.command is not None:
            port = free_port()
            argv = setup.command(tmp, pki, upstream, port)
            child = processes.start(pinned(SERVER_CPU, argv), log)
            wait_for_port(port, child, log)
        try:
            check(port, setup.tls)
        except (OSError, http.client.HTTPException) as e:
            raise BenchError(f"{setup.name}: {e}\n{tail(log)}") from None
        url = f"http://{HOST}:{port}/bench/item?id=1"
        if args.warmup > 0:
            run_wrk(processes, url, args.warmup, args.connections, log)
        steal0, total0 = cpu_ticks(SERVER_CPU)
        proxy0 = cpu_seconds(child.pid) if child is not None else 0.0
        upstream0 = cpu_seconds(upstream_pid)
        tasks0, started = all_tasks(), time.monotonic()
        result = run_wrk(processes, url, args.duration, args.connections, log)
        tasks1, seconds = all_tasks(), time.monotonic() - started
        upstream1 = cpu_seconds(upstream_pid)
        proxy1 = cpu_seconds(child.pid) if child is not None else 0.0
        steal1, total1 = cpu_ticks(SERVER_CPU)
    finally:
        if child is not None:
            processes.stop(child)
    if result.non_2xx or result.socket_errors:
        raise BenchError(
            f"{setup.name}: {result.non_2xx} non-2xx answers, {result.socket_errors} socket "
            f"errors\n{tail(log)}"
        )
    n = max(1, result.requests)
    return Measurement(
        wrk=result,
        proxy_us=(proxy1 - proxy0) / n * 1e6 if child is not None else float("nan"),
        upstream_us=(upstream1 - upstream0) / n * 1e6,
        steal_pct=100 * (steal1 - steal0) / max(1, total1 - total0),
        others_pct=100
        * (tasks_seconds(tasks0, tasks1) - (proxy1 - proxy0) - (upstream1 - upstream0))
        / seconds,
    )


Results = dict[str, list[Measurement]]
"""By setup, one measurement a round, in round order."""


def report(results: Results, args: argparse.Namespace, machine: list[str]) -> list[str]:
    lines = [*machine, ""]
    lines.append(
        f"{'setup':<16} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'proxy us/req':>12} "
        f"{'upstr us/req':>12} {'steal%':>6} {'others%':>7}  req/s per round"
    )
    for name in args.setups:
        got = results.get(name, [])
        if not got:
            continue
        proxy = median([m.proxy_us for m in got])
        lines.append(
            f"{name:<16} {median([m.wrk.rps for m in got]):>7.0f} "
            f"{median([m.wrk.p50_ms for m in got]):>7.2f} "
            f"{median([m.wrk.p99_ms for m in got]):>7.2f} "
            f"{'-' if proxy != proxy else f'{proxy:.1f}':>12} "
            f"{median([m.upstream_us for m in got]):>12.1f} "
            f"{median([m.steal_pct for m in got]):>6.1f} "
            f"{median([m.others_pct for m in got]):>7.1f}  "
            + " ".join(f"{m.wrk.rps:.0f}" for m in got)
        )
    lines += [
        "",
        "ratio of the medians [median of the per-round ratios, min..max]:",
    ]

    def ratio(ours: str, theirs: str, key: Callable[[Measurement], float], what: str) -> None:
        a, b = results.get(ours, []), results.get(theirs, [])
        if not a or not b:
            return
        value = median([key(m) for m in a]) / median([key(m) for m in b])
        per_round = [key(x) / key(y) for x, y in zip(a, b, strict=True)]
        lines.append(f"  {ours} / {theirs} {what}: {value:.3f} [{spread(per_round, '.3f')}]")

    def rps(m: Measurement) -> float:
        return m.wrk.rps

    def cpu(m: Measurement) -> float:
        return m.proxy_us

    for ours, theirs in (
        ("sidecar-https", "nginx-https"),
        ("sidecar-http", "nginx-http"),
        ("sidecar-https", "sidecar-http"),
        ("nginx-https", "nginx-http"),
    ):
        ratio(ours, theirs, rps, "req/s")
        ratio(ours, theirs, cpu, "proxy CPU a request")
    lines.append("")
    lines.append("what TLS origination adds to the proxy's CPU a request (https - http, medians):")
    for server in ("sidecar", "nginx"):
        tls, plain = results.get(f"{server}-https", []), results.get(f"{server}-http", [])
        if tls and plain:
            added = median([m.proxy_us for m in tls]) - median([m.proxy_us for m in plain])
            per_round = [t.proxy_us - p.proxy_us for t, p in zip(tls, plain, strict=True)]
            lines.append(f"  {server:<8} {added:+.1f} us [{spread(per_round, '+.1f')}]")
    return lines


def describe(args: argparse.Namespace) -> list[str]:
    import ssl

    return [
        *nginx_report_head(
            f"{os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()} ({ssl.OPENSSL_VERSION})"
        ),
        f"wrk       {tool_version(['wrk', '-v'])}",
        f"placement the proxy and the upstream (nginx, 1 worker) on CPU {SERVER_CPU}; wrk on CPU 1",
        f"load      wrk -t1 -c{args.connections} -d{args.duration:g}s (after {args.warmup:g}s "
        f"warm-up); {args.rounds} rounds, the order rotating; 100-byte answers, keep-alive",
    ]


def run(args: argparse.Namespace) -> int:
    processes = Processes()
    results: Results = {}
    started = time.monotonic()
    setups = [SETUPS_HERE[name] for name in args.setups]
    with tempfile.TemporaryDirectory(prefix="tls-origination-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            pki = make_pki(tmp)
            ports = Ports(free_port(), free_port())
            log = tmp / "upstream.log"
            upstream = processes.start(
                pinned(SERVER_CPU, upstream_argv(tmp, pki, ports.http, ports.https)), log
            )
            wait_for_port(ports.http, upstream, log)
            wait_for_port(ports.https, upstream, log)
            for n in range(args.rounds):
                shift = n % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    for attempt in range(QUIET_ATTEMPTS):
                        if args.quiet:
                            wait_quiet()
                        m = measure(processes, tmp, pki, ports, upstream.pid, setup, args)
                        print(
                            f"round {n + 1}/{args.rounds} {setup.name:<16} {m.wrk.rps:8.0f} "
                            f"req/s  proxy {m.proxy_us:5.1f} us/req  upstream "
                            f"{m.upstream_us:5.1f} us/req  others {m.others_pct:3.0f} %",
                            flush=True,
                        )
                        if not once_more(args.quiet, m.others_pct, attempt):
                            break
                    results.setdefault(setup.name, []).append(m)
        finally:
            processes.stop_all()
    print()
    lines = report(results, args, describe(args))
    lines += disturbed_note(
        [
            f"{name} ({m.others_pct:.0f} %)"
            for name, got in results.items()
            for m in got
            if m.others_pct > QUIET_PCT
        ]
    )
    print("\n".join(lines))
    print(f"took {(time.monotonic() - started) / 60:.1f} minutes")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up (0: none)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument(
        "--only",
        default=",".join(SETUP_NAMES),
        help=f"setups, comma-separated, of {', '.join(SETUP_NAMES)} (default all)",
    )
    add_quiet_option(parser)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    chosen = set(args.only.split(","))
    unknown = chosen - set(SETUP_NAMES)
    if unknown:
        parser.error(f"--only: unknown setups {', '.join(sorted(unknown))}")
    args.setups = [name for name in SETUP_NAMES if name in chosen]
    if not {0, 1} <= os.sched_getaffinity(0):
        print("cannot run: needs CPUs 0 and 1")
        return 1
    raise_open_files()
    try:
        ensure_tools([s for s in SETUPS if s.name == "nginx"])
        return run(args)
    except BenchError as e:
        print(f"cannot run: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
