"""Rate limits, bulkheads, fallbacks and the recovery ramp, through the proxy.

Real upstreams on loopback; the sidecar's clock (and, with `fake_timers`, its
timers) is a fake that the tests move. Counts are exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.breaker import Rejection, State
from sidecar.cli import describe_route
from sidecar.config import parse_config
from tests.conftest import (
    Running,
    StartSidecar,
    Upstream,
    api_route,
    api_sample,
    eventually,
    fetch,
)


def route(
    url: str, policies: str, breaker: str = "{failure_threshold: 1, open_duration: 30s}"
) -> str:
    return api_route(url, breaker, policies + "\n")


async def breakers(http: aiohttp.ClientSession, sc: Running) -> dict[str, object]:
    async with http.get(f"{sc.admin}/breakers") as response:
        (report,) = (await response.json())["routes"]
        return report  # type: ignore[no-any-return]


# -- rate limit -------------------------------------------------------------------------


async def test_a_rate_limit_admits_exactly_its_burst_then_its_rate(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    rate_limit: {rate: 10/s, burst: 10}"))
    results = await asyncio.gather(*(fetch(http, sc) for _ in range(100)))
    codes = [code for code, _, _ in results]
    assert (codes.count(200), codes.count(429), upstream.hits) == (10, 90, 10)
    limited = next(r for r in results if r[0] == 429)
    _, headers, body = limited
    assert headers["Retry-After"] == "1"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "rate_limited", "route": "api", "retry_after": 1}
    assert headers["RateLimit-Policy"] == '"api";q=10;w=1'
    assert headers["RateLimit"] == '"api";r=0;t=1'
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="rate_limited") == 90
    assert api_sample(sc, "sidecar_requests_total", code="429") == 90
    assert api_sample(sc, "sidecar_rate_limit_tokens") == 0
    sc.clock.advance(1)
    codes = [c for c, _, _ in await asyncio.gather(*(fetch(http, sc) for _ in range(100)))]
    assert (codes.count(200), upstream.hits) == (10, 20)


async def test_retry_after_is_the_time_to_the_next_token_rounded_up(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    rate_limit: {rate: 6/m, burst: 1}"))
    assert (await fetch(http, sc))[0] == 200
    code, headers, _ = await fetch(http, sc)
    assert (code, headers["Retry-After"]) == (429, "10")
    assert "RateLimit-Policy" in headers  # 1 token per 10 s: w=10
    assert headers["RateLimit-Policy"] == '"api";q=1;w=10'
    sc.clock.advance(9.2)
    _, headers, _ = await fetch(http, sc)
    assert headers["Retry-After"] == "1"  # 0.8 s, rounded up
    sc.clock.advance(0.8)
    assert (await fetch(http, sc))[0] == 200


async def test_a_shadow_rate_limit_forwards_everything_and_counts(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    rate_limit: {rate: 2/s, mode: shadow}"))
    codes = [c for c, _, _ in await asyncio.gather(*(fetch(http, sc) for _ in range(5)))]
    assert codes == [200] * 5 and upstream.hits == 5
    assert api_sample(sc, "sidecar_rate_limit_shadow_limited_total") == 3
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="rate_limited") == 0


async def test_a_reload_keeps_an_unchanged_bucket_and_refills_a_changed_one(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    config = route(upstream.url, "    rate_limit: {rate: 3/m}")
    sc = await start_sidecar(config)
    for _ in range(3):
        assert (await fetch(http, sc))[0] == 200
    sc.rewrite_config(config.replace("request: 30s", "") + "    timeouts: {connect: 1s}\n")
    assert (await sc.sidecar.reload()).ok
    assert (await fetch(http, sc))[0] == 429  # the same bucket, still empty
    sc.rewrite_config(route(upstream.url, "    rate_limit: {rate: 4/m}"))
    assert (await sc.sidecar.reload()).ok
    codes = [(await fetch(http, sc))[0] for _ in range(5)]
    assert codes == [200] * 4 + [429]  # a new bucket, full


async def test_a_rate_limited_request_never_takes_a_probe_slot(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    rate_limit: {rate: 1/s, burst: 2}"))
    assert (await fetch(http, sc, "/status/500"))[0] == 500  # token 1: the route opens
    sc.clock.advance(30)  # HALF_OPEN; one token came back, and there is one left: 2
    assert (await fetch(http, sc))[0] == 200  # a probe (token), closes the route
    sc.breaker("api").force(State.FORCED_OPEN)
    code, _, body = await fetch(http, sc)  # a token spent, then the breaker says no
    assert (code, json.loads(body)["error"]) == (503, "circuit_forced_open")
    code, _, body = await fetch(http, sc)  # no token: the breaker is never asked
    assert (code, json.loads(body)["error"]) == (429, "rate_limited")
    sc.breaker("api").force(None)
    b = sc.breaker("api")
    b.acquire().failed()  # type: ignore[union-attr]
    sc.clock.advance(30)  # HALF_OPEN again, 1 token (capped at burst 2 by now)
    sc.clock.advance(1)
    assert b.state is State.HALF_OPEN
    await asyncio.gather(fetch(http, sc), fetch(http, sc))  # 2 tokens, 1 probe slot
    code, _, body = await fetch(http, sc)
    assert (code, json.loads(body)["error"]) == (429, "rate_limited")
    assert b.probes_in_flight == 0


# -- bulkhead ---------------------------------------------------------------------------


@pytest.fixture
async def counting_upstream() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """An upstream that counts the requests it holds at once (and the most it held)."""
    seen = {"now": 0, "most": 0, "hits": 0}

    async def handler(_request: web.Request) -> web.Response:
        seen["now"] += 1
        seen["hits"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        for _ in range(3):  # hold it over a few turns of the loop, so requests overlap
            await asyncio.sleep(0)
        seen["now"] -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", seen
    await server.close()


async def test_500_clients_never_put_more_than_max_concurrent_at_the_upstream(
    start_sidecar: StartSidecar, counting_upstream: tuple[str, dict[str, int]]
) -> None:
    url, seen = counting_upstream
    sc = await start_sidecar(
        route(url, "    bulkhead: {max_concurrent: 8, max_queued: 100, queue_timeout: 30s}")
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        results = await asyncio.gather(*(fetch(http, sc) for _ in range(500)))
    codes = [code for code, _, _ in results]
    assert len(codes) == 500 and set(codes) <= {200, 503}
    assert 0 < seen["most"] <= 8
    full = codes.count(503)
    assert codes.count(200) == seen["hits"] == 500 - full
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="bulkhead_full") == full
    assert api_sample(sc, "sidecar_requests_total", code="200") == 500 - full
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0
    assert api_sample(sc, "sidecar_bulkhead_queued_requests") == 0
    assert api_sample(sc, "sidecar_in_flight_requests") == 0
    # Every request that queued left the queue once: granted, or (none here) timed out.
    queued = api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count")
    assert queued is not None and queued <= 500 - full


async def test_a_queued_request_waits_at_most_queue_timeout(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "    bulkhead: {max_concurrent: 1, max_queued: 1, queue_timeout: 2s}"),
        fake_timers=True,
    )
    held = asyncio.create_task(fetch(http, sc, "/hang"))
    await upstream.entered.wait()
    queued = asyncio.create_task(fetch(http, sc))
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_queued_requests") == 1)
    code, headers, body = await fetch(http, sc)  # the queue is full
    assert (code, headers["Retry-After"]) == (503, "1")
    assert json.loads(body) == {"error": "bulkhead_full", "route": "api", "retry_after": 1}
    sc.clock.advance(1.9)
    assert not queued.done()
    sc.clock.advance(0.1)
    code, _, body = await queued
    assert (code, json.loads(body)["error"]) == (503, "bulkhead_full")
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count") == 1
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_sum") == pytest.approx(2.0)
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="bulkhead_full") == 2
    upstream.release.set()
    assert (await held)[0] == 200
    assert (await fetch(http, sc))[0] == 200


async def test_a_queued_request_gets_the_slot_when_it_frees(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "    bulkhead: {max_concurrent: 1, max_queued: 4, queue_timeout: 5s}"),
        fake_timers=True,
    )
    held = asyncio.create_task(fetch(http, sc, "/hang"))
    await upstream.entered.wait()
    waiting = [asyncio.create_task(fetch(http, sc, f"/n{i}")) for i in range(3)]
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_queued_requests") == 3)
    report = await breakers(http, sc)
    assert report["bulkhead"] == {
        "max_concurrent": 1,
        "max_queued": 4,
        "queue_timeout": 5.0,
        "in_flight": 1,
        "queued": 3,
    }
    sc.clock.advance(1)
    upstream.release.set()
    assert [r[0] for r in await asyncio.gather(held, *waiting)] == [200] * 4
    assert [r["path"] for r in upstream.requests] == ["/n0", "/n1", "/n2"]  # in order
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count") == 3
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0


async def test_a_client_that_leaves_the_queue_takes_no_slot(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "    bulkhead: {max_concurrent: 1, max_queued: 2, queue_timeout: 5s}"),
        fake_timers=True,
    )
    held = asyncio.create_task(fetch(http, sc, "/hang"))
    await upstream.entered.wait()
    gone = asyncio.create_task(fetch(http, sc, "/gone"))
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_queued_requests") == 1)
    gone.cancel()  # the client hangs up while it waits
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_queued_requests") == 0)
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 1
    upstream.release.set()
    assert (await held)[0] == 200
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0
    assert "/gone" not in [r["path"] for r in upstream.requests]
    assert (await fetch(http, sc))[0] == 200


async def test_a_route_that_opened_while_a_request_queued_rejects_it_then(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "    bulkhead: {max_concurrent: 1, max_queued: 2, queue_timeout: 5s}"),
        fake_timers=True,
    )
    held = asyncio.create_task(fetch(http, sc, "/hang?status=500"))
    await upstream.entered.wait()
    queued = asyncio.create_task(fetch(http, sc))
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_queued_requests") == 1)
    upstream.release.set()  # the held one fails: the route opens; the slot frees
    assert (await held)[0] == 500
    code, headers, body = await queued
    assert (code, json.loads(body)["error"], headers["Retry-After"]) == (503, "circuit_open", "30")
    assert upstream.hits == 1
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0


async def test_a_breaker_rejection_never_waits_in_the_queue(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "    bulkhead: {max_concurrent: 1, max_queued: 5, queue_timeout: 5s}"),
        fake_timers=True,
    )
    assert (await fetch(http, sc, "/status/500"))[0] == 500  # OPEN
    sc.clock.advance(30)
    probe = asyncio.create_task(fetch(http, sc, "/hang"))  # HALF_OPEN's one probe: the slot
    await upstream.entered.wait()
    code, _, body = await fetch(http, sc)  # no probe slot: rejected, not queued
    assert (code, json.loads(body)["error"]) == (503, "circuit_half_open")
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count") == 0
    upstream.release.set()
    upstream.entered.clear()
    assert (await probe)[0] == 200


async def test_a_request_the_ramp_sheds_takes_no_slot_and_no_place_in_the_queue(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "    bulkhead: {max_concurrent: 2, max_queued: 1, queue_timeout: 5s}\n"
            "    recovery: {ramp: 60s, min_share: 0%}\n"
            "    timeouts: {request: 5m}",
        ),
        fake_timers=True,
    )
    assert (await fetch(http, sc, "/status/500"))[0] == 500
    sc.clock.advance(30)
    assert (await fetch(http, sc))[0] == 200  # the probe: CLOSED, recovering from 0 %
    for _ in range(5):  # shed, with a slot free: none taken
        code, _, body = await fetch(http, sc)
        assert (code, json.loads(body)["error"]) == (503, "circuit_recovering")
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0
    b = sc.breaker("api")
    b.force(None)  # full traffic again: fill both slots
    held = [asyncio.create_task(fetch(http, sc, "/hang")) for _ in range(2)]
    await eventually(lambda: api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 2)
    b.acquire().failed()  # type: ignore[union-attr]
    sc.clock.advance(30)
    probe = b.acquire()
    assert not isinstance(probe, Rejection)
    probe.succeeded()  # recovering again, from 0 %, both slots taken
    for _ in range(3):  # shed on arrival: no place in the queue taken either
        code, _, body = await fetch(http, sc)
        assert (code, json.loads(body)["error"]) == (503, "circuit_recovering")
    assert api_sample(sc, "sidecar_bulkhead_queued_requests") == 0
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count") == 0
    upstream.release.set()
    assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]


# -- fallback ---------------------------------------------------------------------------


async def test_a_fallback_stands_in_for_the_sidecars_own_answers_only(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    closed_port: int,
    tmp_path: Path,
) -> None:
    (tmp_path / "empty.json").write_text('{"items": []}')
    sc = await start_sidecar(
        f"""
routes:
  - name: down
    match: {{host: down.internal}}
    upstream: http://127.0.0.1:{closed_port}
    breaker: {{failure_threshold: 5}}
    fallback: {{reasons: [upstream_unreachable], status: 503, body: 'later'}}
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream.url}
    breaker: {{failure_threshold: 1}}
    fallback:
      reasons: [circuit_open, upstream_unreachable]
      headers: {{Content-Type: application/json, Cache-Control: no-store}}
      body_file: empty.json
"""
    )
    code, headers, body = await fetch(http, sc, "/status/500")
    assert (code, "X-Sidecar-Fallback" in headers) == (500, False)  # the upstream's answer
    code, headers, body = await fetch(http, sc)
    assert (code, body) == (200, b'{"items": []}')
    assert headers["X-Sidecar-Fallback"] == "circuit_open"
    assert headers["Retry-After"] == "30"
    assert headers["Cache-Control"] == "no-store"
    assert headers["Content-Type"] == "application/json"
    assert upstream.hits == 1
    assert api_sample(sc, "sidecar_fallback_responses_total", reason="circuit_open") == 1
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="circuit_open") == 1
    assert api_sample(sc, "sidecar_requests_total", code="200") == 1
    async with http.get(sc.proxy + "/", headers={"Host": "down.internal"}) as response:
        assert response.status == 503 and await response.read() == b"later"
        assert response.headers["X-Sidecar-Fallback"] == "upstream_unreachable"
        assert "Retry-After" not in response.headers
    assert (
        sc.sample("sidecar_fallback_responses_total", route="down", reason="upstream_unreachable")
        == 1
    )
    assert sc.sample("sidecar_upstream_failures_total", route="down", kind="connect") == 1


# -- recovery ramp ----------------------------------------------------------------------


async def test_after_recovery_the_ramp_admits_a_rising_share(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    recovery: {ramp: 10s, min_share: 10%}"))
    assert api_sample(sc, "sidecar_recovery_share") == 1
    assert (await fetch(http, sc, "/status/500"))[0] == 500
    sc.clock.advance(30)
    assert (await fetch(http, sc))[0] == 200  # the probe: CLOSED, recovering
    assert api_sample(sc, "sidecar_recovery_share") == pytest.approx(0.1)
    report = await breakers(http, sc)
    assert (report["state"], report["recovering"]) == ("closed", True)
    assert report["recovery"] == {"ramp": 10.0, "min_share": 0.1}
    hits = upstream.hits
    results = [await fetch(http, sc) for _ in range(100)]
    codes = [code for code, _, _ in results]
    assert (codes.count(200), codes.count(503), upstream.hits - hits) == (10, 90, 10)
    _, headers, body = next(r for r in results if r[0] == 503)
    assert headers["Retry-After"] == "1"
    assert json.loads(body) == {"error": "circuit_recovering", "route": "api", "retry_after": 1}
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="circuit_recovering") == 90
    sc.clock.advance(10)
    assert api_sample(sc, "sidecar_recovery_share") == 1
    assert [(await fetch(http, sc))[0] for _ in range(10)] == [200] * 10


async def test_an_admin_reset_skips_the_ramp(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "    recovery: {ramp: 60s, min_share: 0%}"))
    await fetch(http, sc, "/status/500")
    sc.clock.advance(30)
    await fetch(http, sc)
    assert (await fetch(http, sc))[0] == 503
    async with http.post(f"{sc.admin}/breakers/api/reset") as response:
        assert response.status == 200
    assert api_sample(sc, "sidecar_recovery_share") == 1
    assert (await fetch(http, sc))[0] == 200


# -- all together -----------------------------------------------------------------------

ALL = """
    rate_limit: {rate: 100/60s}
    bulkhead: {max_concurrent: 4, max_queued: 2, queue_timeout: 1s}
    fallback: {reasons: [circuit_open], body: '{"items": []}'}
    recovery: {ramp: 30s}
    retry: {}
"""


async def test_every_policy_series_exists_from_start_up_and_passes_promtool(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, ALL))
    assert api_sample(sc, "sidecar_rate_limit_tokens") == 100
    assert api_sample(sc, "sidecar_rate_limit_shadow_limited_total") == 0
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0
    assert api_sample(sc, "sidecar_bulkhead_queued_requests") == 0
    assert api_sample(sc, "sidecar_bulkhead_queue_wait_seconds_count") == 0
    assert api_sample(sc, "sidecar_recovery_share") == 1
    assert api_sample(sc, "sidecar_fallback_responses_total", reason="circuit_open") == 0
    for reason in ("rate_limited", "bulkhead_full", "circuit_recovering"):
        assert api_sample(sc, "sidecar_rejected_requests_total", reason=reason) == 0
    assert (await fetch(http, sc))[0] == 200
    assert api_sample(sc, "sidecar_rate_limit_tokens") == 99
    report = await breakers(http, sc)
    assert report["rate_limit"] == {
        "rate": "100/60s",
        "burst": 100,
        "mode": "enforce",
        "tokens": 99.0,
        "shadow_limited": 0,
    }
    assert report["fallback"] == {
        "reasons": ["circuit_open"],
        "status": 200,
        "body_file": None,
        "served": {"circuit_open": 0},
    }
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed")
    async with http.get(f"{sc.admin}/metrics") as response:
        text = await response.read()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.strip() == b"", result.stdout + result.stderr


def test_check_prints_the_effective_policies() -> None:
    config = parse_config(route("http://u:8080", ALL))
    text = describe_route(config.routes[0])
    assert "    rate_limit: 100/1m, burst 100, mode enforce" in text
    assert "    bulkhead: max_concurrent 4, max_queued 2, queue_timeout 1s" in text
    assert "    recovery: ramp 30s from 10 %" in text
    assert "    fallback: status 200, body of 13 bytes, for circuit_open" in text


async def test_each_rejection_logs_one_debug_line_with_its_reason(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sc = await start_sidecar(route(upstream.url, "    rate_limit: {rate: 1/m}"))
    with caplog.at_level(logging.INFO, logger="sidecar"):
        await fetch(http, sc)
        await fetch(http, sc)  # a 429, not logged at info
    assert not [r for r in caplog.records if getattr(r, "event", None) == "rejected"]
    with caplog.at_level(logging.DEBUG, logger="sidecar"):
        await fetch(http, sc)
        sc.breaker("api").force(State.FORCED_OPEN)
        sc.clock.advance(60)
        await fetch(http, sc)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "rejected"]
    assert [(r.levelno, r.fields) for r in lines] == [  # type: ignore[attr-defined]
        (logging.DEBUG, {"route": "api", "reason": "rate_limited"}),
        (logging.DEBUG, {"route": "api", "reason": "circuit_forced_open"}),
    ]
