"""Rate rules, slow calls, backoff, jitter, upstream Retry-After and shadow mode, through the proxy.

Real upstreams on loopback; the sidecar's clock is a fake that the tests move,
including while an upstream holds a request, which is how a call is made slow.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sidecar.breaker import State
from sidecar.proxy import retry_after_seconds
from tests.conftest import Running, StartSidecar, Upstream, api_route, api_sample, json_body


def route(url: str, breaker: str) -> str:
    return api_route(url, breaker)


async def get(http: aiohttp.ClientSession, sc: Running, path: str) -> tuple[int, dict[str, str]]:
    async with http.get(sc.proxy + path) as response:
        await response.read()
        return response.status, dict(response.headers)


async def held(
    http: aiohttp.ClientSession, sc: Running, upstream: Upstream, seconds: float, status: int = 200
) -> int:
    """One request that the upstream holds while `seconds` pass on the sidecar's clock."""
    upstream.entered.clear()
    upstream.release.clear()
    task = asyncio.create_task(get(http, sc, f"/hang?status={status}"))
    await upstream.entered.wait()
    sc.clock.advance(seconds)
    upstream.release.set()
    code, _ = await task
    return code


async def test_a_failure_rate_opens_the_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{failure_threshold: null, window: {requests: 10, min_requests: 10}, "
            "failure_rate: 40%}",
        )
    )
    for i in range(9):  # F S S F S S F S S: below the floor, never a trip
        code, _ = await get(http, sc, "/status/500" if i % 3 == 0 else "/ok")
    assert api_sample(sc, "sidecar_breaker_failure_rate") == -1
    assert sc.breaker("api").state is State.CLOSED
    await get(http, sc, "/status/502")  # 4 of 10
    assert sc.breaker("api").state is State.OPEN
    assert api_sample(sc, "sidecar_breaker_failure_rate") == pytest.approx(0.4)
    assert api_sample(sc, "sidecar_breaker_slow_call_rate") == 0
    hits = upstream.hits
    code, headers = await get(http, sc, "/ok")
    assert (code, headers["Retry-After"], upstream.hits) == (503, "30", hits)
    async with http.get(f"{sc.admin}/breakers") as response:
        (report,) = (await response.json())["routes"]
    assert report["window"] == {
        "outcomes": 10,
        "failures": 4,
        "slow_calls": 0,
        "failure_rate": 0.4,
        "slow_call_rate": 0.0,
    }
    assert report["settings"]["failure_rate"] == 0.4


async def test_slow_calls_open_the_route_and_are_timed_to_the_headers(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{window: {duration: 1m, min_requests: 3}, slow_call_duration: 2s, "
            "slow_call_rate: 60%}",
        )
    )
    assert await held(http, sc, upstream, 2.0) == 200  # 2 s is not longer than 2 s
    assert await held(http, sc, upstream, 3.0) == 200
    assert sc.breaker("api").state is State.CLOSED
    assert api_sample(sc, "sidecar_upstream_slow_calls_total") == 1
    assert await held(http, sc, upstream, 4.0, status=500) == 500  # slow and a failure
    assert sc.breaker("api").state is State.OPEN
    assert sc.breaker("api").reason == "slow-call rate 66.7 % >= 60 % over 3 requests"
    assert api_sample(sc, "sidecar_upstream_slow_calls_total") == 2
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="status") == 1
    # The histogram has the same times, to the headers, on the same clock.
    assert api_sample(sc, "sidecar_upstream_request_duration_seconds_bucket", le="2.5") == 1
    assert api_sample(sc, "sidecar_upstream_request_duration_seconds_bucket", le="5.0") == 3
    assert api_sample(sc, "sidecar_upstream_request_duration_seconds_sum") == 9


async def test_a_slow_upload_is_not_a_slow_call(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{window: {requests: 5, min_requests: 1}, slow_call_duration: 1s, "
            "slow_call_rate: 100%}",
        )
    )

    async def dribble() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 100
            await asyncio.sleep(0)
            sc.clock.advance(10)  # the client takes its time; the upstream is not to blame

    async with http.post(f"{sc.proxy}/upload", data=dribble()) as response:
        assert response.status == 200
        assert (await response.json())["received"] == 300
    assert api_sample(sc, "sidecar_upstream_slow_calls_total") == 0
    assert sc.breaker("api").state is State.CLOSED


async def test_backoff_grows_to_the_cap_and_closing_resets_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{failure_threshold: 1, open_duration: 10s, backoff_multiplier: 2, "
            "max_open_duration: 30s}",
        )
    )
    await get(http, sc, "/status/500")
    seen = []
    for _ in range(4):
        code, headers = await get(http, sc, "/ok")
        assert code == 503
        seen.append(int(headers["Retry-After"]))
        sc.clock.advance(seen[-1])
        assert (await get(http, sc, "/status/503"))[0] == 503  # the probe fails
    assert seen == [10, 20, 30, 30]
    sc.clock.advance(30)
    assert (await get(http, sc, "/ok"))[0] == 200  # a good probe closes
    await get(http, sc, "/status/500")
    assert (await get(http, sc, "/ok"))[1]["Retry-After"] == "10"


async def test_jitter_stretches_the_period_and_retry_after_tells_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "{failure_threshold: 1, open_duration: 10s, jitter: 50%}"),
        rand=lambda: 0.9,
    )
    await get(http, sc, "/status/500")
    code, headers = await get(http, sc, "/ok")
    assert (code, headers["Retry-After"]) == (503, "15")  # 10 s stretched by 45 %: 14.5 s
    async with http.get(f"{sc.admin}/breakers") as response:
        (report,) = (await response.json())["routes"]
    assert report["open_period"] == pytest.approx(14.5)
    sc.clock.advance(14.4)
    assert (await get(http, sc, "/ok"))[1]["Retry-After"] == "1"
    sc.clock.advance(0.1)
    assert (await get(http, sc, "/ok"))[0] == 200


async def test_jittered_backoff_stays_within_its_bounds(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{failure_threshold: 1, open_duration: 10s, backoff_multiplier: 2, "
            "max_open_duration: 40s, jitter: 20%}",
        ),
        rand=random.Random(7).random,
    )
    await get(http, sc, "/status/500")
    periods = []
    for base in (10, 20, 40, 40, 40):
        period = sc.breaker("api").open_period or 0
        assert base <= period < base * 1.2
        code, headers = await get(http, sc, "/ok")
        assert (code, headers["Retry-After"]) == (503, str(math.ceil(period)))
        periods.append(period)
        sc.clock.advance(period)
        await get(http, sc, "/status/500")  # the probe fails: backed off, jittered again
    assert len(set(periods[2:])) == 3  # at the cap, each period is still drawn anew


async def test_an_upstream_retry_after_opens_the_route_and_passes_through(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{respect_retry_after: true}"))
    async with http.get(f"{sc.proxy}/status/503?retry_after=120") as response:
        # The upstream's own answer reaches the client unchanged.
        assert response.status == 503
        assert response.headers["Retry-After"] == "120"
        assert await json_body(response) == {"status": "set"}
    assert sc.breaker("api").reason == "upstream asked to retry after 120 s"
    async with http.get(f"{sc.proxy}/ok") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "120"
        assert await json_body(response) == {
            "error": "circuit_open",
            "route": "api",
            "retry_after": 120,
        }
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="status") == 1


async def test_an_unreadable_upstream_retry_after_passes_through_as_a_plain_failure(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{respect_retry_after: true}"))
    odd = "Mon, 01 Jan 2020 99999999999999999999:00:00 GMT"  # overflowed the date parser
    async with http.get(f"{sc.proxy}/status/503", params={"retry_after": odd}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == odd
        assert await json_body(response) == {"status": "set"}
    assert sc.breaker("api").state is State.CLOSED
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="status") == 1


async def test_a_429_with_an_http_date_opens_the_route_capped(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "{respect_retry_after: true, max_open_duration: 2m}")
    )
    date = email.utils.formatdate(time.time() + 3600, usegmt=True)
    async with http.get(f"{sc.proxy}/status/429", params={"retry_after": date}) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == date
    assert sc.breaker("api").state is State.OPEN
    assert sc.breaker("api").retry_after() == 120  # an hour asked, capped at 2m


async def test_retry_after_is_ignored_unless_asked_to_respect_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{failure_threshold: 3}"))
    for path in ("/status/429?retry_after=120", "/status/503?retry_after=120"):
        await get(http, sc, path)
    assert sc.breaker("api").state is State.CLOSED
    # The 503 is one failure; the 429 before it was an ordinary success.
    assert sc.breaker("api").consecutive_failures == 1


async def test_shadow_mode_forwards_everything_and_counts_what_it_would_reject(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{failure_threshold: 2, mode: shadow}"))
    for _ in range(2):
        assert (await get(http, sc, "/status/500"))[0] == 500
    assert api_sample(sc, "sidecar_breaker_state", state="open") == 1
    # ... and says it is only watching, so that an alert on OPEN can leave it out.
    assert api_sample(sc, "sidecar_breaker_mode", mode="shadow") == 1
    assert api_sample(sc, "sidecar_breaker_mode", mode="enforce") == 0
    hits = upstream.hits
    for _ in range(3):
        assert (await get(http, sc, "/ok"))[0] == 200  # enforcing would have said 503
    assert upstream.hits == hits + 3
    assert api_sample(sc, "sidecar_breaker_shadow_rejections_total") == 3
    assert api_sample(sc, "sidecar_rejected_requests_total", reason="circuit_open") == 0
    assert api_sample(sc, "sidecar_requests_total", code="503") == 0
    assert api_sample(sc, "sidecar_breaker_state", state="open") == 1  # the state it reports
    sc.clock.advance(30)
    assert (await get(http, sc, "/ok"))[0] == 200  # the probe
    assert api_sample(sc, "sidecar_breaker_state", state="closed") == 1
    async with http.get(f"{sc.admin}/breakers") as response:
        (report,) = (await response.json())["routes"]
    assert (report["mode"], report["shadow_rejections"]) == ("shadow", 3)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", None),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("9" * 5000, 1e12),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), None),
        (email.utils.formatdate(NOW + 60), 60.0),  # "-0000": no zone given, read as UTC
        ("Mon, 99 Foo 2023 99:99:99 GMT", None),
        ("Mon, 01 Jan 2020 99999999999999999999:00:00 GMT", None),
        ("Mon, 01 Jan 99999 00:00:00 GMT", None),
    ],
)
def test_retry_after_header_values(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, NOW) == seconds
