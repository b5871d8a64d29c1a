"""The command line, as a user runs it: exit codes, messages, never a traceback."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import __version__
from sidecar.breaker import Breaker, BreakerSettings, Permit
from sidecar.cli import log_transition
from sidecar.demo import run_demo
from tests.conftest import running
from tests.fakes import FakeClock

EXAMPLE = str(Path(__file__).parent.parent / "config.example.yaml")


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return str(path)


def config_text(upstream: str = "http://127.0.0.1:1", listen: str = "127.0.0.1:0") -> str:
    return f"""
listen: {listen}
admin: {{listen: 127.0.0.1:0}}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream}
"""


def test_version() -> None:
    result = sidecar("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"sidecar {__version__}")


def test_no_command_is_a_usage_error() -> None:
    result = sidecar()
    assert result.returncode == 2
    assert "usage: sidecar" in result.stderr


def test_unknown_option_is_a_usage_error() -> None:
    result = sidecar("run", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_check_valid_prints_effective_settings() -> None:
    result = sidecar("check", "-c", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: valid, 4 routes\n")
    assert "- payments: path_prefix=/payments -> http://payments.internal:8080" in result.stdout
    assert "breaker: failure_threshold 3, open_duration 1m," in result.stdout
    assert (
        "    opening: backoff_multiplier 2, max_open_duration 10m, jitter 10 %, "
        "respect_retry_after true, mode enforce\n" in result.stdout
    )
    assert (
        "    rates: window last 1m (min_requests 20), failure_rate 50 %, "
        "slow_call_duration 1s, slow_call_rate 80 %\n" in result.stdout
    )


def test_check_into_a_closed_pipe_stops_quietly() -> None:
    # `sidecar check -c F | head -1`: a reader that has gone away.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "check", "-c", EXAMPLE],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, b"")


def test_check_invalid_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "routes:\n  - name: A\n    match: {path_prefix: x}\n    upstream: http://u\n"
        "    breaker: {failure_threshold: 0}\n",
    )
    result = sidecar("check", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:2: routes[0].name: 'A' is not a valid route name: "
        "use lower-case letters, digits, '_' and '-'",
        f"{path}:3: routes[0].match.path_prefix: must start with '/', not a string ('x')",
        f"{path}:5: routes[0].breaker.failure_threshold: must be >= 1, not 0",
        f"sidecar check: {path}: 3 errors",
    ]


@pytest.mark.parametrize("command", ["check", "run"])
def test_missing_config_file_exits_2_without_traceback(command: str, tmp_path: Path) -> None:
    result = sidecar(command, "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'nope.yaml'}:0: (file): no such file" in result.stderr


def test_no_config_given_exits_2() -> None:
    result = sidecar("run", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "no config: pass --config PATH or set SIDECAR_CONFIG" in result.stderr


def test_config_from_environment(tmp_path: Path) -> None:
    import os

    env = dict(os.environ, SIDECAR_CONFIG=EXAMPLE)
    assert sidecar("check", env=env).returncode == 0


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = sidecar("run", "-c", write(tmp_path, config_text(listen=f"127.0.0.1:{port}")))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"sidecar run: cannot listen on 127.0.0.1:{port} (proxy): address already in use"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_serves_and_stops_gracefully_on_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with running(write(tmp_path, config_text())) as (process, proxy, admin):
        assert process.stderr is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{proxy}/x") as response:
                assert response.status == 502  # nothing listens on the upstream's port
            async with http.get(f"http://{admin}/readyz") as response:
                assert response.status == 200
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        rest = (await process.stderr.read()).decode()
        assert "stopping gracefully" in rest
        assert "Traceback" not in rest


async def test_demo_tells_the_seed_scenario() -> None:
    clock = FakeClock()
    out = io.StringIO()
    assert await run_demo(out, clock=clock, sleep=clock.sleep) == 0
    text = out.getvalue()
    for expected in (
        "failure 1/3",
        "failure 2/3",
        "failure 3/3",
        "** CLOSED -> OPEN: 3 consecutive failures",
        "circuit_open, Retry-After: 4",
        "circuit_open, Retry-After: 3",
        "circuit_open, Retry-After: 2",
        "circuit_open, Retry-After: 1",
        "** OPEN -> HALF_OPEN",
        "probe failed",
        "** HALF_OPEN -> OPEN",
        "probe ok",
        "** HALF_OPEN -> CLOSED",
        'sidecar_breaker_state{route="orders",state="closed"} 1.0',
        "sidecar run -c config.example.yaml",
    ):
        assert expected in text, expected
    assert text.index("failure 3/3") < text.index("CLOSED -> OPEN") < text.index("probe failed")
    assert text.index("probe failed") < text.index("probe ok") < text.index("HALF_OPEN -> CLOSED")
    assert "(upstream not contacted)" in text


def test_malformed_requests_log_one_warning_line_not_a_traceback() -> None:
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from sidecar.cli import one_line_client_errors

    try:
        raise BadHttpMessage("Duplicate 'Host' header found.")
    except BadHttpMessage:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
            ("127.0.0.1",), sys.exc_info(),
        )  # fmt: skip
    assert one_line_client_errors(record)
    assert record.levelname == "WARNING"
    assert record.exc_info is None
    assert record.getMessage() == ("bad request from 127.0.0.1: 400 Duplicate 'Host' header found.")


async def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path, upstream: Any) -> None:
    async with running(write(tmp_path, config_text(upstream.url))) as (process, proxy, admin):
        assert process.stderr is not None
        async with aiohttp.ClientSession() as http:
            in_flight = asyncio.create_task(http.get(f"http://{proxy}/hang"))
            await upstream.entered.wait()
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.stderr.readline(), 30)  # "stopping gracefully"
            async with http.get(f"http://{admin}/readyz") as response:
                assert response.status == 503  # draining: not ready
            upstream.release.set()
            response = await in_flight
            assert response.status == 200
            assert await response.json() == {"hung": True}
            response.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0


def test_every_transition_logs_one_line_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    settings = BreakerSettings(
        failure_threshold=2,
        open_duration=10.0,
        half_open_requests=1,
        success_threshold=1,
        failure_status=frozenset({500}),
        backoff_multiplier=3.0,
        max_open_duration=60.0,
    )
    breaker = Breaker("payments", settings, clock)
    breaker.add_listener(log_transition)

    def fail() -> None:
        permit = breaker.acquire()
        assert isinstance(permit, Permit)
        permit.failed()

    with caplog.at_level("INFO", logger="sidecar"):
        fail()
        fail()
        clock.advance(10)
        fail()
    assert caplog.messages == [
        "route payments: closed -> open for 10s (2 consecutive failures)",
        "route payments: open -> half_open (open period of 10 s over)",
        "route payments: half_open -> open for 30s (probe failed)",
    ]
