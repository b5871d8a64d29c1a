"""The command line: `sidecar run | check | demo | --version`.

Exit codes: 0 done or stopped gracefully; 1 cannot start (one line says why);
2 bad config or usage (every config error, one per line).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from sidecar import __version__
from sidecar.breaker import Breaker, State, format_percent
from sidecar.config import Config, ConfigError, Route, format_duration, load_config
from sidecar.logs import configure as configure_logs
from sidecar.logs import event

__all__ = ["main", "run_loop"]

log = logging.getLogger("sidecar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sidecar check ... | head`: the reader left; stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A circuit-breaker reverse proxy that runs next to your service.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, handler, text in (
        ("run", _run, "serve the proxy and the admin listener until SIGTERM/SIGINT"),
        ("check", _check, "validate a config and print each route's effective settings"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "-c",
            "--config",
            default=os.environ.get("SIDECAR_CONFIG"),
            metavar="PATH",
            help="the YAML config file (default: $SIDECAR_CONFIG)",
        )
        command.set_defaults(handler=handler)
    demo = commands.add_parser(
        "demo",
        help="a self-contained tour: watch a breaker open and recover",
        description="Start a flaky upstream and the proxy in this process, drive traffic and "
        "print the breaker's timeline.",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _load(args: argparse.Namespace) -> Config | None:
    if not args.config:
        print(
            f"sidecar {args.command}: no config: pass --config PATH or set SIDECAR_CONFIG",
            file=sys.stderr,
        )
        return None
    try:
        return load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        count = len(e.problems)
        print(
            f"sidecar {args.command}: {args.config}: {count} error{'s' * (count != 1)}",
            file=sys.stderr,
        )
        return None


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 2
    print(f"{config.path}: valid, {len(config.routes)} route{'s' * (len(config.routes) != 1)}")
    print(f"listen {config.listen}, admin {config.admin_listen}")
    allowed = ", ".join(config.admin_allowed_hosts)
    print(
        f"admin.allowed_hosts: {allowed} (besides IP addresses and localhost)"
        if allowed
        else "admin.allowed_hosts: none (an admin POST's Host must be an IP address or localhost)"
    )
    log_settings = config.log
    print(
        f"shutdown_grace {format_duration(config.shutdown_grace)}, log {log_settings.format} "
        f"at {log_settings.level}" + (" with access log" if log_settings.access else "")
    )
    for route in config.routes:
        print(describe_route(route))
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def describe_route(route: Route) -> str:
    """A route and its effective settings, as `sidecar check` prints them."""
    match = " ".join(
        f"{key}={value}"
        for key, value in (("host", route.host), ("path_prefix", route.path_prefix))
        if value is not None
    )
    b = route.breaker
    lines = [
        f"- {route.name}: {match} -> {route.upstream.url}"
        + (" (strip_prefix)" if route.strip_prefix else ""),
        f"    timeouts: connect {format_duration(route.timeouts.connect)}, "
        f"request {format_duration(route.timeouts.request)}, "
        f"websocket_idle {format_duration(route.timeouts.websocket_idle)}; "
        f"max_websocket_sessions {route.max_websocket_sessions}"
        + ("; CONNECT tunnels allowed" if route.connect else ""),
        f"    breaker: failure_threshold {b.failure_threshold or 'off'}, "
        f"open_duration {format_duration(b.open_duration)}, "
        f"half_open_requests {b.half_open_requests}, "
        f"success_threshold {b.success_threshold}, "
        f"failure_status {sorted(b.failure_status)}",
    ]
    rules = []
    if b.window is not None:
        size = (
            f"last {b.window.requests} requests"
            if b.window.requests is not None
            else f"last {format_duration(b.window.duration or 0)}"
        )
        rules.append(f"window {size} (min_requests {b.window.min_requests})")
    if b.failure_rate is not None:
        rules.append(f"failure_rate {format_percent(b.failure_rate)}")
    if b.slow_call_duration is not None:
        rules.append(f"slow_call_duration {format_duration(b.slow_call_duration)}")
    if b.slow_call_rate is not None:
        rules.append(f"slow_call_rate {format_percent(b.slow_call_rate)}")
    if rules:
        lines.append(f"    rates: {', '.join(rules)}")
    lines.append(
        f"    opening: backoff_multiplier {b.backoff_multiplier:g}, "
        f"max_open_duration {format_duration(b.open_duration_cap)}, "
        f"jitter {format_percent(b.jitter)}, "
        f"respect_retry_after {str(b.respect_retry_after).lower()}, mode {b.mode}"
    )
    if route.tls is not None:
        tls = route.tls
        parts = [f"ca_file {tls.ca_file}" if tls.ca_file else "system CAs"]
        if tls.cert_file:
            parts.append(f"client cert {tls.cert_file}")
        if tls.server_name:
            parts.append(f"server_name {tls.server_name}")
        parts.append(f"min_version {tls.min_version}")
        if not tls.verify:
            parts.append("verify OFF")
        lines.append(f"    tls: {', '.join(parts)}")
    if route.rate_limit is not None:
        r = route.rate_limit
        lines.append(
            f"    rate_limit: {r.count}/{format_duration(r.period)}, burst {r.burst}, mode {r.mode}"
        )
    if route.bulkhead is not None:
        h = route.bulkhead
        queue = (
            f"max_queued {h.max_queued}, queue_timeout {format_duration(h.queue_timeout)}"
            if h.max_queued
            else "no queue"
        )
        lines.append(f"    bulkhead: max_concurrent {h.max_concurrent}, {queue}")
    if route.recovery is not None:
        lines.append(
            f"    recovery: ramp {format_duration(route.recovery.ramp)} "
            f"from {format_percent(route.recovery.min_share)}"
        )
    if route.retry is not None:
        t = route.retry
        retry_on = ", ".join([*sorted(t.retry_on_kinds), *map(str, sorted(t.retry_on_statuses))])
        methods = ", ".join(sorted(m.decode() for m in t.methods))
        limits = [
            f"per_try_timeout {format_duration(t.per_try_timeout)}"
            if t.per_try_timeout is not None
            else "per_try_timeout = timeouts.request",
            f"deadline {format_duration(t.deadline)}" if t.deadline is not None else "no deadline",
        ]
        lines.append(
            f"    retry: attempts {t.attempts}, on [{retry_on}], methods [{methods}] "
            f"(or any with Idempotency-Key), {', '.join(limits)}"
        )
        lines.append(
            f"           backoff {format_duration(t.backoff_base)} to "
            f"{format_duration(t.backoff_max)} (full jitter), budget "
            f"{format_percent(t.budget_ratio)} + {t.budget_min_per_second:g}/s, "
            f"replay_max_body {t.replay_max_body} bytes"
        )
    if route.fallback is not None:
        f = route.fallback
        source = f"body_file {f.body_file}" if f.body_file else f"body of {len(f.body)} bytes"
        lines.append(
            f"    fallback: status {f.status}, {source}, for {', '.join(sorted(f.reasons))}"
        )
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 2
    configure_logs(config.log)
    logging.getLogger("aiohttp.server").addFilter(one_line_client_errors)
    return run_loop(_serve(config))


def one_line_client_errors(record: logging.LogRecord) -> bool:
    """A malformed request is the client's mistake: one warning line, not an error traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        reason = " ".join(str(error.message).split())
        what = record.getMessage().replace("Error handling request", "bad request")
        record.msg = "%s: %d %s"
        record.args = (what, error.code, reason)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        with asyncio.Runner() as runner:
            return runner.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def log_transition(breaker: Breaker, from_state: State, to_state: State) -> None:
    """The one log line of every state change: route, from, to, reason (and period)."""
    extra = ""
    period = breaker.open_period
    fields: dict[str, object] = {}
    if to_state is State.OPEN and period is not None:
        extra = f" for {format_duration(period)}"
        fields["period"] = round(period, 3)
    event(
        log,
        logging.WARNING if to_state is State.OPEN else logging.INFO,
        "breaker_transition",
        f"route {breaker.name}: {from_state.value} -> {to_state.value}{extra} ({breaker.reason})",
        route=breaker.name,
        **{"from": from_state.value, "to": to_state.value},
        reason=breaker.reason,
        **fields,
    )


async def _serve(config: Config) -> int:
    from sidecar.app import Sidecar, StartupError, admin_token_from_env, freeze_heap

    sidecar = Sidecar(config, admin_token=admin_token_from_env())
    sidecar.proxy.add_transition_listener(log_transition)
    try:
        await sidecar.start()
    except StartupError as e:
        print(f"sidecar run: {e}", file=sys.stderr)
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[object]] = set()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("second %s: exiting now, in-flight requests cut off", name)
            os._exit(1)
        grace = sidecar.config.shutdown_grace
        # Not ready from the moment it is said, not from when stop() gets to run.
        sidecar.health.ready = False
        event(
            log,
            logging.INFO,
            "stopping",
            f"{name}: stopping gracefully: not ready, no new connections, "
            f"{format_duration(grace)} for requests in flight",
            signal=name,
            grace=grace,
        )
        stopping.set()

    def on_hangup() -> None:
        if stopping.is_set():
            log.warning("SIGHUP while stopping: not reloading")
            return
        task = loop.create_task(sidecar.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    freeze_heap()
    # Only now, with every handler in place, is it said that the sidecar runs: a
    # SIGHUP sent as soon as that line is seen must reload, not kill.
    event(
        log,
        logging.INFO,
        "started",
        f"sidecar {__version__}: proxy on {sidecar.addresses['proxy']}, "
        f"admin on {sidecar.addresses['admin']}, {len(config.routes)} routes",
        proxy=str(sidecar.addresses["proxy"]),
        admin=str(sidecar.addresses["admin"]),
        routes=len(config.routes),
        version=__version__,
    )
    if sidecar.admin_token is None:
        log.info("SIDECAR_ADMIN_TOKEN is not set: admin changes accepted from loopback only")

    # The handlers stay in place while draining, so that a second signal forces the exit.
    await stopping.wait()
    await sidecar.stop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(signum)
    event(log, logging.INFO, "stopped", "stopped")
    return 0


def _demo(_args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_loop(run_demo())
