"""`sidecar run` as an operator sees it: signals, graceful drain, reload, log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import LogSettings, parse_config
from sidecar.logs import ACCESS, JsonFormatter, configure, event
from tests.conftest import Upstream, connect, running

SCHEMA_KEYS = ["time", "level", "logger", "event", "message"]


def write_config(path: Path, upstream: Upstream, extra: str = "", routes: str = "") -> str:
    path.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
{extra}
routes:
{routes}
  - name: main
    match: {{path_prefix: /}}
    upstream: {upstream.url}
    breaker: {{failure_threshold: 1, open_duration: 1h}}
"""
    )
    return str(path)


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll something another process does (not waiting for time to pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("not in time")
        await asyncio.sleep(0.02)


async def until_not_ready(admin: str) -> None:
    """Until the sidecar's /readyz says 503 (it has taken the signal to stop)."""

    async def not_ready() -> bool:
        return await status_of(f"http://{admin}/readyz") == 503

    await until(not_ready)


async def status_of(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return response.status
    except aiohttp.ClientConnectionError:
        return None


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.splitlines()]
    for line in lines:
        assert list(line)[:5] == SCHEMA_KEYS, line
    return lines


async def test_sigterm_drains_requests_in_flight_then_exits_0(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = write_config(tmp_path / "c.yaml", upstream, "shutdown_grace: 20s")
    async with running(config) as (process, proxy, admin), aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(http.get(f"http://{proxy}/hang"))
        await upstream.entered.wait()
        assert await status_of(f"http://{admin}/readyz") == 200
        process.send_signal(signal.SIGTERM)
        await until_not_ready(admin)
        # The listener no longer accepts: a new client is refused, not queued.
        assert await status_of(f"http://{proxy}/x") is None
        # Nor are changes taken while draining, by SIGHUP or by the admin listener.
        async with http.post(f"http://{admin}/reload") as response:
            assert response.status == 503
            assert (await response.json())["error"] == "stopping"
        assert process.returncode is None  # still draining the one in flight
        upstream.release.set()
        response = await held
        assert response.status == 200
        assert await response.json() == {"hung": True}
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert process.stderr is not None
        lines = json_lines((await process.stderr.read()).decode())
    stopping = next(x for x in lines if x["event"] == "stopping")
    assert (stopping["signal"], stopping["grace"]) == ("SIGTERM", 20.0)
    assert lines[-1]["event"] == "stopped"
    assert not [x for x in lines if x["level"] == "error"]


async def test_requests_past_the_grace_are_cut_off_and_the_exit_is_still_0(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = write_config(tmp_path / "c.yaml", upstream, "shutdown_grace: 2s")
    async with running(config) as (process, proxy, admin), aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(http.get(f"http://{proxy}/hang"))
        await upstream.entered.wait()
        # An admin client in the middle of its request, too: the body never comes.
        _, stuck_admin = await connect(f"http://{admin}")
        stuck_admin.write(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        await stuck_admin.drain()
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        # One deadline for both listeners; aiohttp alone would take two graces each (4 s+).
        assert 2 <= loop.time() - signalled < 3.2
        with pytest.raises(aiohttp.ClientConnectionError):
            await held
        stuck_admin.close()


async def test_a_second_signal_forces_the_exit(tmp_path: Path, upstream: Upstream) -> None:
    config = write_config(tmp_path / "c.yaml", upstream, "shutdown_grace: 5m")
    async with running(config) as (process, proxy, admin), aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(http.get(f"http://{proxy}/hang"))
        await upstream.entered.wait()
        process.send_signal(signal.SIGTERM)
        await until_not_ready(admin)
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 1
        held.cancel()
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
    assert "second SIGINT: exiting now" in log


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(
    tmp_path: Path, upstream: Upstream
) -> None:
    path = tmp_path / "c.yaml"
    config = write_config(path, upstream)
    async with running(config) as (process, proxy, admin), aiohttp.ClientSession() as http:

        async def routes() -> list[str]:
            async with http.get(f"http://{admin}/breakers") as response:
                return [r["name"] for r in (await response.json())["routes"]]

        async with http.get(f"http://{proxy}/before") as response:
            assert response.status == 200  # no access log yet
        write_config(
            path,
            upstream,
            "log: {access: true}",  # taken up by the reload, as every key is
            routes=f"  - {{name: extra, match: {{host: extra.test}}, upstream: '{upstream.url}'}}",
        )
        process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await routes() == ["extra", "main"]

        await until(reloaded)
        path.write_text("routes: [oops\n")
        process.send_signal(signal.SIGHUP)

        async def failure_counted() -> bool:
            async with http.get(f"http://{admin}/metrics") as response:
                text = await response.text()
            return 'sidecar_config_reloads_total{result="failure"} 1.0' in text

        await until(failure_counted)
        assert await routes() == ["extra", "main"]
        async with http.get(f"http://{proxy}/x", headers={"Host": "extra.test"}) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert process.stderr is not None
        lines = json_lines((await process.stderr.read()).decode())
    reloads = [x for x in lines if x["event"] == "reload"]
    assert [x["result"] for x in reloads] == ["success", "failure"]
    assert reloads[0]["added"] == ["extra"] and reloads[0]["kept"] == ["main"]
    assert reloads[1]["level"] == "error"
    assert len(reloads[1]["errors"]) == 1 and reloads[1]["errors"][0].startswith(config + ":")
    access = [(x["path"], x["route"]) for x in lines if x["event"] == "access"]
    assert access == [("/x", "extra")]


async def test_transitions_and_the_access_log_in_json(tmp_path: Path, upstream: Upstream) -> None:
    config = write_config(tmp_path / "c.yaml", upstream, "log: {access: true}")
    async with running(config) as (process, proxy, _), aiohttp.ClientSession() as http:
        for path in ("/ok?token=secret", "/status/500", "/ok"):
            async with http.get(f"http://{proxy}{path}") as response:
                await response.read()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
    lines = json_lines(log)
    # (`running` read the first line, "started", to find the addresses.)
    [transition] = [x for x in lines if x["event"] == "breaker_transition"]
    assert transition["level"] == "warning"
    assert {k: transition[k] for k in ("route", "from", "to", "reason", "period")} == {
        "route": "main",
        "from": "closed",
        "to": "open",
        "reason": "1 consecutive failures",
        "period": 3600.0,
    }
    assert transition["message"] == "route main: closed -> open for 1h (1 consecutive failures)"
    access = [x for x in lines if x["event"] == "access"]
    assert [(x["path"], x["status"], x["route"]) for x in access] == [
        ("/ok", 200, "main"),  # no query string: it may hold secrets
        ("/status/500", 500, "main"),
        ("/ok", 503, "main"),
    ]
    assert "secret" not in log
    assert all(x["client"] == "127.0.0.1" and x["duration_ms"] >= 0 for x in access)


async def test_text_logs_when_asked(tmp_path: Path, upstream: Upstream) -> None:
    config = write_config(tmp_path / "c.yaml", upstream, "log: {format: text}")
    async with running(config) as (process, proxy, _), aiohttp.ClientSession() as http:
        async with http.get(f"http://{proxy}/status/500") as response:
            await response.read()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert process.stderr is not None
        rest = (await process.stderr.read()).decode().splitlines()
    line = r"\S+ \S+ (INFO|WARNING) sidecar: "
    transition = line + r"route main: closed -> open for 1h \(1 consecutive failures\)"
    assert len([x for x in rest if re.fullmatch(transition, x)]) == 1, rest
    assert all(re.match(line, x) for x in rest), rest


def test_the_json_schema_of_any_record() -> None:
    record = logging.LogRecord("aiohttp.server", logging.ERROR, "x", 1, "boom %s", ("!",), None)
    record.created = 1_800_000_000.25
    record.msecs = 250.0
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {
        "time": "2027-01-15T08:00:00.250Z",
        "level": "error",
        "logger": "aiohttp.server",
        "event": "log",
        "message": "boom !",
    }


def test_event_fields_never_override_the_schema(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("sidecar.test")
    with caplog.at_level(logging.INFO, logger="sidecar.test"):
        event(logger, logging.INFO, "thing", "hello", level="nope", route="r")
    entry = json.loads(JsonFormatter().format(caplog.records[0]))
    assert (entry["level"], entry["event"], entry["route"]) == ("info", "thing", "r")


def test_configure_replaces_its_handler_and_switches_the_access_log() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure(LogSettings(format="json", level="info", access=True))
        configure(LogSettings(format="text", level="error", access=False))
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1
        assert not isinstance(ours[0].formatter, JsonFormatter)
        assert root.level == logging.ERROR
        assert not ACCESS.isEnabledFor(logging.INFO)
        configure(LogSettings(level="error", access=True))
        assert ACCESS.isEnabledFor(logging.INFO)  # on whatever the level of the rest
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        ACCESS.setLevel(logging.NOTSET)


def test_operations_keys_are_validated() -> None:
    base = "routes: [{name: a, match: {path_prefix: /}, upstream: 'http://x:1'}]\n"
    config = parse_config(base)
    assert (config.shutdown_grace, config.log) == (15.0, LogSettings("json", "info", False))
    config = parse_config(base + "shutdown_grace: 0\nlog: {format: text, level: debug}\n")
    assert (config.shutdown_grace, config.log.format, config.log.level) == (0.0, "text", "debug")
    with pytest.raises(Exception) as raised:
        parse_config(
            base + "shutdown_grace: soon\nlog: {format: xml, level: loud, access: 1, color: true}\n"
        )
    assert str(raised.value).splitlines() == [
        "<config>:2: shutdown_grace: 'soon' is not a duration; use seconds (1.5) or a unit: "
        "ms, s, m, h",
        "<config>:3: log.color: unknown key 'color' (known: format, level, access)",
        "<config>:3: log.format: must be one of 'json', 'text', not a string ('xml')",
        "<config>:3: log.level: must be one of 'debug', 'info', 'warning', 'error', not a "
        "string ('loud')",
        "<config>:3: log.access: must be true or false, not int 1",
    ]
