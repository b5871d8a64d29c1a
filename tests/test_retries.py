"""Retries with a budget, through the proxy, against upstreams that fail in each way.

For each failure: which tries are retried, how many reach the upstream, what the
client gets, what the breaker counts. The jitter is injected (0: no wait, unless
the test says otherwise); time is a fake clock the tests move.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from sidecar.breaker import State
from sidecar.cli import describe_route
from tests.conftest import (
    RawHandler,
    Running,
    StartSidecar,
    Upstream,
    api_route,
    api_sample,
    eventually,
    fetch,
)

NO_WAIT = 0.0


def route(url: str, retry: str, extra: str = "", breaker: str = "{failure_threshold: 100}") -> str:
    return api_route(url, breaker, f"    retry: {retry}\n{extra}")


def counts(sc: Running) -> dict[str, float | None]:
    return {
        "ok": api_sample(sc, "sidecar_upstream_tries_total", result="success"),
        "failed": api_sample(sc, "sidecar_upstream_tries_total", result="failure"),
    }


# -- the matrix -------------------------------------------------------------------------


async def test_a_refused_connection_is_retried_up_to_attempts_then_502(
    start_sidecar: StartSidecar, http: aiohttp.ClientSession, closed_port: int
) -> None:
    sc = await start_sidecar(
        route(f"http://127.0.0.1:{closed_port}", "{attempts: 3}"), rand=lambda: NO_WAIT
    )
    code, _, body = await fetch(http, sc)
    assert (code, json.loads(body)["error"]) == (502, "upstream_unreachable")
    assert counts(sc) == {"ok": 0, "failed": 3}
    assert api_sample(sc, "sidecar_retries_total", reason="connect") == 2
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="connect") == 3
    assert sc.breaker("api").consecutive_failures == 3  # every try is one outcome


async def test_a_reset_before_the_head_is_retried_and_the_second_try_answers(
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    http: aiohttp.ClientSession,
) -> None:
    seen = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.append(1)
        if len(seen) == 1:
            writer.transport.abort()  # reset, before any response
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    sc = await start_sidecar(route(await raw_upstream(handler), "{}"), rand=lambda: NO_WAIT)
    code, _, body = await fetch(http, sc)
    assert (code, body, len(seen)) == (200, b"ok", 2)
    assert counts(sc) == {"ok": 1, "failed": 1}
    assert api_sample(sc, "sidecar_retries_total", reason="connect") == 1


async def test_a_timeout_is_retried_only_when_retry_on_names_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "{attempts: 3, per_try_timeout: 1s, retry_on: [timeout]}"),
        rand=lambda: NO_WAIT,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc, "/hang"))
    for hits in (1, 2, 3):
        await eventually(lambda: upstream.hits == hits)  # noqa: B023
        sc.clock.advance(1)
    code, _, body = await task
    assert (code, json.loads(body)["error"]) == (504, "upstream_timeout")
    assert counts(sc) == {"ok": 0, "failed": 3}
    assert api_sample(sc, "sidecar_retries_total", reason="timeout") == 2

    sc2 = await start_sidecar(
        route(upstream.url, "{attempts: 3, per_try_timeout: 1s}"),  # the default retry_on
        rand=lambda: NO_WAIT,
        fake_timers=True,
    )
    upstream.hits = 0
    task = asyncio.create_task(fetch(http, sc2, "/hang"))
    await eventually(lambda: upstream.hits == 1)
    sc2.clock.advance(1)
    assert (await task)[0] == 504
    assert upstream.hits == 1
    assert sc2.sample("sidecar_retries_denied_total", route="api", reason="deadline") == 0


async def test_a_503_is_retried_and_the_last_real_answer_reaches_the_client(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{attempts: 3}"), rand=lambda: NO_WAIT)
    code, _, body = await fetch(http, sc, "/status/503")
    assert (code, json.loads(body), upstream.hits) == (503, {"status": "set"}, 3)
    assert counts(sc) == {"ok": 0, "failed": 3}
    assert api_sample(sc, "sidecar_retries_total", reason="503") == 2
    assert api_sample(sc, "sidecar_requests_total", code="503") == 1  # one answer to the client


async def test_a_status_not_in_retry_on_is_answered_at_once(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{attempts: 3}"), rand=lambda: NO_WAIT)
    assert (await fetch(http, sc, "/status/500"))[0] == 500
    assert upstream.hits == 1
    assert (
        sum(
            v
            for v in (
                api_sample(sc, "sidecar_retries_denied_total", reason=r)
                for r in ("budget", "breaker", "body", "method", "retry_after", "deadline")
            )
            if v
        )
        == 0
    )


async def test_retry_after_within_the_backoff_cap_is_the_wait_and_a_longer_one_ends_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "{attempts: 3, backoff: {base: 100ms, max: 2s}}"),
        rand=lambda: NO_WAIT,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc, "/status/503?retry_after=2"))
    await eventually(lambda: upstream.hits == 1)
    sc.clock.advance(1.9)
    await asyncio.sleep(0.05)  # (a turn for the loop: nothing may go out before 2 s)
    assert upstream.hits == 1
    sc.clock.advance(0.1)
    await eventually(lambda: upstream.hits == 2)
    sc.clock.advance(2)
    code, headers, _ = await task
    assert (code, headers["Retry-After"], upstream.hits) == (503, "2", 3)

    upstream.hits = 0
    code, headers, _ = await fetch(http, sc, "/status/503?retry_after=3")
    assert (code, headers["Retry-After"], upstream.hits) == (503, "3", 1)
    assert api_sample(sc, "sidecar_retries_denied_total", reason="retry_after") == 1


async def test_the_backoff_is_full_jitter_doubling_to_its_cap(
    start_sidecar: StartSidecar, closed_port: int, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            f"http://127.0.0.1:{closed_port}",
            "{attempts: 4, backoff: {base: 100ms, max: 300ms}}",
        ),
        rand=lambda: 0.999,  # the top of each range
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc))
    for expected in (0.1998, 0.2997, 0.2997):  # base x 2 = 200 ms, then the 300 ms cap
        await eventually(lambda: sc.clock.set_for(expected))  # noqa: B023
        sc.clock.advance(expected)
    assert (await task)[0] == 502
    assert api_sample(sc, "sidecar_retries_total", reason="connect") == 3


async def test_a_reset_after_the_head_is_never_retried(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{attempts: 3}"), rand=lambda: NO_WAIT)
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(http, sc, "/break")
    assert upstream.hits == 1
    assert counts(sc) == {"ok": 0, "failed": 1}
    assert api_sample(sc, "sidecar_upstream_failures_total", kind="reset") == 1


# -- methods and bodies -----------------------------------------------------------------


async def test_post_is_retried_only_with_an_idempotency_key_and_its_body_replayed(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{attempts: 2}"), rand=lambda: NO_WAIT)
    assert (await fetch(http, sc, "/status/503", "POST", data=b"pay"))[0] == 503
    assert upstream.hits == 1
    assert api_sample(sc, "sidecar_retries_denied_total", reason="method") == 1

    upstream.hits = 0
    code, _, _ = await fetch(
        http, sc, "/status/503", "POST", data=b"pay", headers={"Idempotency-Key": "k1"}
    )
    assert (code, upstream.hits) == (503, 2)


async def test_a_body_is_replayed_whole_and_a_larger_one_is_never_retried(
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    http: aiohttp.ClientSession,
) -> None:
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.append(await reader.readexactly(length))
        status = b"503 Busy" if len(bodies) % 2 else b"200 OK"
        writer.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
        await writer.drain()
        writer.close()

    sc = await start_sidecar(
        route(await raw_upstream(handler), "{replay_max_body: 1KiB}"), rand=lambda: NO_WAIT
    )
    body = bytes(range(256)) * 4  # 1 KiB: kept
    assert (await fetch(http, sc, "/x", "PUT", data=body))[0] == 200
    assert bodies == [body, body]
    bodies.clear()
    assert (await fetch(http, sc, "/x", "PUT", data=body + b"!"))[0] == 503
    assert bodies == [body + b"!"]
    assert api_sample(sc, "sidecar_retries_denied_total", reason="body") == 1


async def test_a_chunked_body_is_never_buffered_so_never_retried(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(route(upstream.url, "{}"), rand=lambda: NO_WAIT)

    async def chunks():  # type: ignore[no-untyped-def]
        yield b"a"
        yield b"b"

    assert (await fetch(http, sc, "/status/503", "PUT", data=chunks()))[0] == 503
    assert upstream.hits == 1
    assert api_sample(sc, "sidecar_retries_denied_total", reason="body") == 1


# -- the breaker, the budget, the deadline ----------------------------------------------


async def test_each_try_is_one_breaker_outcome_so_the_route_opens_after_its_threshold_of_tries(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """failure_threshold 5, attempts 3: the first client request makes 3 failures, the
    second 2 more: the route opens on its second try, which denies the third its permit."""
    sc = await start_sidecar(
        route(upstream.url, "{attempts: 3}", breaker="{failure_threshold: 5}"),
        rand=lambda: NO_WAIT,
    )
    assert (await fetch(http, sc, "/status/503"))[0] == 503
    assert (upstream.hits, sc.breaker("api").state) == (3, State.CLOSED)
    assert (await fetch(http, sc, "/status/503"))[0] == 503  # the last real answer
    assert (upstream.hits, sc.breaker("api").state) == (5, State.OPEN)
    assert api_sample(sc, "sidecar_retries_denied_total", reason="breaker") == 1
    code, _, body = await fetch(http, sc, "/status/503")
    assert (code, json.loads(body)["error"], upstream.hits) == (503, "circuit_open", 5)


async def test_a_storm_stays_within_the_budget(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    """200 clients at once against an upstream that fails everything, attempts 3, budget
    20 % + 1/s: all within one second of the clock, so retries <= 20 % x 200 + 1 x 10 = 50,
    and the upstream sees at most 250 requests (without the budget: 600)."""
    sc = await start_sidecar(
        route(
            upstream.url,
            "{attempts: 3, budget: {ratio: 20%, min_per_second: 1}}",
            breaker="{failure_threshold: 100000}",
        ),
        rand=lambda: NO_WAIT,
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        results = await asyncio.gather(*(fetch(http, sc, "/status/503") for _ in range(200)))
    assert [r[0] for r in results] == [503] * 200
    retries = api_sample(sc, "sidecar_retries_total", reason="503")
    assert retries is not None and 0 < retries <= 50
    assert upstream.hits == 200 + retries <= 250
    # Every first try failed; those the budget could not retry were denied for it.
    assert (api_sample(sc, "sidecar_retries_denied_total", reason="budget") or 0) >= 200 - retries
    assert counts(sc) == {"ok": 0, "failed": 200 + retries}


async def test_no_try_starts_after_the_deadline(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{attempts: 5, per_try_timeout: 600ms, deadline: 1s, retry_on: [timeout]}",
        ),
        rand=lambda: NO_WAIT,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc, "/hang"))
    await eventually(lambda: upstream.hits == 1)
    sc.clock.advance(0.6)  # the first try's time is up: the second gets what is left
    await eventually(lambda: upstream.hits == 2)
    sc.clock.advance(0.4)
    code, _, _ = await task
    assert (code, upstream.hits) == (504, 2)
    assert api_sample(sc, "sidecar_retries_denied_total", reason="deadline") == 1


# -- beside the other policies ----------------------------------------------------------


async def test_a_retry_spends_no_token_and_keeps_its_bulkhead_slot_through_the_backoff(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{attempts: 2, backoff: {base: 1s, max: 1s}}",
            "    rate_limit: {rate: 2/m}\n    bulkhead: {max_concurrent: 1}\n",
        ),
        rand=lambda: 0.5,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc, "/status/503"))
    await eventually(lambda: sc.clock.set_for(0.5))  # in its backoff
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 1
    code, _, body = await fetch(http, sc)  # the slot is still the first request's
    assert (code, json.loads(body)["error"]) == (503, "bulkhead_full")
    sc.clock.advance(0.5)
    assert (await task)[0] == 503
    assert upstream.hits == 2
    tokens = api_sample(sc, "sidecar_rate_limit_tokens")  # two tokens: two client requests
    assert tokens is not None and tokens < 0.1
    assert api_sample(sc, "sidecar_bulkhead_in_flight_requests") == 0


async def test_a_retry_is_not_shed_by_the_recovery_ramp(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(
            upstream.url,
            "{attempts: 2}",
            "    recovery: {ramp: 60s, min_share: 0%}\n",
            breaker="{failure_threshold: 3, open_duration: 30s}",
        ),
        rand=lambda: NO_WAIT,
    )
    b = sc.breaker("api")
    b.acquire().failed()  # type: ignore[union-attr]
    b.acquire().failed()  # type: ignore[union-attr]
    b.acquire().failed()  # type: ignore[union-attr]
    sc.clock.advance(30)
    assert (await fetch(http, sc, "/ok"))[0] == 200  # the probe; recovering from 0 %
    assert b.recovering
    b._credit = 1_000_000  # one admission owed: the next request passes the ramp
    code, _, _ = await fetch(http, sc, "/status/503")
    assert (code, upstream.hits) == (503, 3)  # its retry went too


# -- without a retry policy -------------------------------------------------------------


async def test_without_a_policy_nothing_is_retried_but_the_stale_resend(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream.url}
"""
    )
    assert (await fetch(http, sc, "/status/503"))[0] == 503
    assert upstream.hits == 1
    assert api_sample(sc, "sidecar_retries_total", reason="connect") == 0
    assert api_sample(sc, "sidecar_retries_total", reason="503") is None


async def test_the_access_log_tells_the_tries(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sc = await start_sidecar(
        "log: {access: true}\n" + route(upstream.url, "{attempts: 3}"), rand=lambda: NO_WAIT
    )
    with caplog.at_level(logging.INFO, logger="sidecar.access"):
        sc.sidecar._listener.finished = sc.sidecar._access_log()  # type: ignore[union-attr]
        await fetch(http, sc, "/status/503")
        await fetch(http, sc, "/ok")
    tries = [r.fields["tries"] for r in caplog.records if getattr(r, "event", "") == "access"]  # type: ignore[attr-defined]
    assert tries == [3, 1]


async def test_breakers_and_check_show_the_policy_and_the_budget_live(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        route(upstream.url, "{attempts: 3, budget: {ratio: 50%, min_per_second: 0.1}}"),
        rand=lambda: NO_WAIT,
    )
    await fetch(http, sc, "/ok")
    await fetch(http, sc, "/status/503")  # 1 retry allowed: 50 % of 2 + 1
    async with http.get(f"{sc.admin}/breakers") as response:
        (report,) = (await response.json())["routes"]
    assert report["retry"] == {
        "attempts": 3,
        "retry_on": ["connect", 502, 503, 504],
        "methods": ["DELETE", "GET", "HEAD", "OPTIONS", "PUT"],
        "per_try_timeout": None,
        "deadline": None,
        "backoff": {"base": 0.025, "max": 0.25},
        "budget": {
            "ratio": 0.5,
            "min_per_second": 0.1,
            "requests_10s": 2,
            "retries_10s": 2,
            "retries_left": 0,
        },
        "replay_max_body": 65536,
    }
    assert upstream.hits == 4  # 1, then 3 tries: 2 retries <= 50 % x 2 requests + 0.1 x 10
    text = describe_route(sc.sidecar.config.routes[0])
    assert "    retry: attempts 3, on [connect, 502, 503, 504]" in text
    assert "budget 50 % + 0.1/s" in text


async def test_a_try_after_a_long_wait_still_times_out_on_its_own_deadline(
    start_sidecar: StartSidecar,
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    http: aiohttp.ClientSession,
) -> None:
    """The wait (an upstream's Retry-After of 3 s) outlasts the first try's deadline; the
    second try still gets exactly per_try_timeout."""
    seen = []
    answer = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            seen.append(1)
            if len(seen) == 1:
                await answer.wait()
                writer.write(b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
            await reader.read()  # the second: never answered (until the sidecar lets go)
        finally:
            writer.close()

    sc = await start_sidecar(
        route(
            await raw_upstream(handler),
            "{per_try_timeout: 1s, retry_on: [503, timeout], backoff: {max: 5s}}",
        ),
        rand=lambda: NO_WAIT,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc))
    await eventually(lambda: len(seen) == 1)
    sc.clock.advance(0.5)  # the first try's deadline has its timer now
    answer.set()
    await eventually(lambda: sc.clock.set_for(3))
    sc.clock.advance(1)  # past the first try's deadline, in the wait
    sc.clock.advance(2)
    await eventually(lambda: len(seen) == 2)
    await eventually(lambda: sc.clock.set_for(1))
    sc.clock.advance(1)
    code, _, body = await task
    assert (code, json.loads(body)["error"]) == (504, "upstream_timeout")
    assert counts(sc) == {"ok": 0, "failed": 2}
