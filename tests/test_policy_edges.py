"""The traffic policies at their edges: shutdown with requests queued, a ramp begun
while a request waited, hostile fallback settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from sidecar.breaker import Permit
from sidecar.config import ConfigError, parse_config
from sidecar.proxy import Queued
from sidecar.responses import fallback_answer
from tests.conftest import StartSidecar, Upstream, eventually, raw_exchange

ROUTE = """
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
{policies}
"""


def _fallback_config(headers: str) -> str:
    return f"""
routes:
  - name: r
    match: {{path_prefix: /r}}
    upstream: http://127.0.0.1:9
    fallback: {{headers: {headers}}}
"""


# -- shutdown with requests queued --------------------------------------------------------


async def test_stop_answers_a_queued_request_instead_of_resetting_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """A queued request has sent nothing upstream: at stop it should get a clean 503
    (retryable elsewhere), not a connection reset at the end of shutdown_grace."""
    sc = await start_sidecar(
        "shutdown_grace: 500ms\n"
        + ROUTE.format(
            url=upstream.url,
            policies="    bulkhead: {max_concurrent: 1, max_queued: 1, queue_timeout: 60s}",
        )
    )
    held = asyncio.create_task(http.get(sc.proxy + "/hang"))
    await upstream.entered.wait()
    queued = asyncio.create_task(
        raw_exchange(sc.proxy, b"GET /queued HTTP/1.1\r\nHost: x\r\n\r\n", within=10)
    )
    await eventually(lambda: sc.sample("sidecar_bulkhead_queued_requests", route="api") == 1)
    await sc.sidecar.stop()
    held.cancel()
    try:
        answer = await queued
    except ConnectionError as e:
        pytest.fail(f"the queued request was cut off at stop ({type(e).__name__}), not answered")
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]


async def test_stop_never_forwards_a_queued_request_whose_client_was_cut_off(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the end of shutdown_grace the listener aborts every connection; each in-flight
    exchange's client_gone releases its slot, and grant_waiting hands it to a waiter whose
    connection is already aborted (its connection_lost has not run yet): an Exchange
    starts, and the request goes upstream for a client that will never see the answer."""
    granted_dead: list[str] = []
    original = Queued.grant

    def grant(self: Queued) -> bool:
        request = self._request
        transport = request._conn.transport
        took = original(self)
        if took and (transport is None or transport.is_closing()):
            granted_dead.append(request.target.decode())
        return took

    monkeypatch.setattr(Queued, "grant", grant)
    sc = await start_sidecar(
        "shutdown_grace: 300ms\n"
        + ROUTE.format(
            url=upstream.url,
            policies="    bulkhead: {max_concurrent: 3, max_queued: 6, queue_timeout: 60s}",
        )
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        held = [asyncio.create_task(client.get(sc.proxy + "/hang")) for _ in range(3)]
        await eventually(lambda: sc.sample("sidecar_bulkhead_in_flight_requests", route="api") == 3)
        waiting = [asyncio.create_task(client.get(sc.proxy + f"/q{i}")) for i in range(6)]
        await eventually(lambda: sc.sample("sidecar_bulkhead_queued_requests", route="api") == 6)
        await sc.sidecar.stop()
        for task in held + waiting:
            task.cancel()
        await asyncio.gather(*held, *waiting, return_exceptions=True)
    assert granted_dead == [], f"exchanges started for clients already cut off: {granted_dead}"


# -- recovery ramp ----------------------------------------------------------------------


async def test_a_request_that_queued_before_a_new_ramp_began_is_not_let_past_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The ramp let it through on arrival, when there was none; while it waited, the
    route opened and closed into a new ramp (at 0 %): the slot, when it comes, does not
    let it skip that ramp."""
    sc = await start_sidecar(
        ROUTE.format(
            url=upstream.url,
            policies="    timeouts: {request: 5m}\n"
            "    breaker: {failure_threshold: 1, open_duration: 30s}\n"
            "    bulkhead: {max_concurrent: 1, max_queued: 1, queue_timeout: 2m}\n"
            "    recovery: {ramp: 10m, min_share: 0%}",
        ),
        fake_timers=True,
    )
    held = asyncio.create_task(http.get(sc.proxy + "/hang"))
    await upstream.entered.wait()
    queued = asyncio.create_task(http.get(sc.proxy + "/queued"))
    await eventually(lambda: sc.sample("sidecar_bulkhead_queued_requests", route="api") == 1)
    b = sc.breaker("api")
    failing = b.acquire()
    assert isinstance(failing, Permit)
    failing.failed()  # OPEN
    sc.clock.advance(30)
    probe = b.acquire()
    assert isinstance(probe, Permit)
    probe.succeeded()  # CLOSED, recovering from 0 %
    assert b.recovering
    upstream.release.set()  # the slot frees
    (await held).release()
    async with await queued as response:
        assert response.status == 503
        assert (await response.json())["error"] == "circuit_recovering"
    assert upstream.hits == 1


# -- config -----------------------------------------------------------------------------


def test_a_body_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "body"
    os.mkfifo(fifo)
    config = tmp_path / "c.yaml"
    config.write_text(
        "routes:\n  - name: r\n    match: {path_prefix: /r}\n"
        "    upstream: http://127.0.0.1:9\n    fallback: {body_file: body}\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "check", "-c", str(config)],
            capture_output=True,
            timeout=5,
            cwd=Path(__file__).parent.parent,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("sidecar check hangs on a body_file that is a FIFO (open() blocks)")
    assert result.returncode == 2


@pytest.mark.parametrize("value", ['"a\\x01b"', '"a\\x7fb"', '"a\\x1bb"'])
def test_fallback_header_values_with_control_characters_are_refused(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(_fallback_config(f"{{X-Note: {value}}}"))


def test_fallback_headers_differing_only_in_case_are_refused() -> None:
    # Else the answer would carry two Content-Type headers.
    with pytest.raises(ConfigError):
        parse_config(_fallback_config("{Content-Type: application/json, content-type: text/plain}"))


# -- HTTP details -----------------------------------------------------------------------


def test_a_204_fallback_has_no_content_length() -> None:
    # RFC 9110 8.6: a server MUST NOT send Content-Length in a 204.
    _, _, lines, _ = fallback_answer(204, (), b"", "circuit_open", 30)
    assert b"content-length" not in lines.lower()
    _, _, lines, _ = fallback_answer(200, (), b"", "circuit_open", 30)
    assert b"Content-Length: 0" in lines
