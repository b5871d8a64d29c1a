"""Operating a running sidecar: overrides and reset, hot reload, and their metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from sidecar.admin import _is_loopback, _refusal
from sidecar.app import admin_token_from_env, freeze_heap
from sidecar.breaker import Breaker, BreakerSettings, Permit, Rejection, State
from sidecar.config import Route
from sidecar.metrics import RouteMetrics
from sidecar.proxy import Target
from tests.conftest import StartSidecar, Upstream, connect, json_body, raw_exchange, two_routes
from tests.fakes import FakeClock


def settings(**changes: object) -> BreakerSettings:
    base: dict[str, object] = dict(
        failure_threshold=3,
        open_duration=30.0,
        half_open_requests=1,
        success_threshold=1,
        failure_status=frozenset({500}),
        window=None,
        failure_rate=None,
        slow_call_duration=None,
        slow_call_rate=None,
        backoff_multiplier=1.0,
        max_open_duration=300.0,
        jitter=0.0,
        respect_retry_after=False,
        mode="enforce",
    )
    base.update(changes)
    return BreakerSettings(**base)  # type: ignore[arg-type]


def breaker(**changes: object) -> tuple[Breaker, FakeClock, list[str]]:
    clock = FakeClock()
    b = Breaker("r", settings(**changes), clock)
    seen: list[str] = []
    b.add_listener(lambda b, a, z: seen.append(f"{a.value}->{z.value}: {b.reason}"))
    return b, clock, seen


def fail(b: Breaker, times: int) -> None:
    for _ in range(times):
        permit = b.acquire()
        assert not isinstance(permit, Rejection)
        permit.failed()


# -- the breaker ----------------------------------------------------------------------


def test_forced_open_rejects_with_the_ttl_left_then_closes_afresh() -> None:
    b, clock, seen = breaker()
    fail(b, 2)
    b.force(State.FORCED_OPEN, 600, reason="forced by admin for 10m")
    rejection = b.acquire()
    assert isinstance(rejection, Rejection)
    assert (rejection.state, rejection.retry_after) == (State.FORCED_OPEN, 600)
    assert b.retry_after() == 600
    clock.advance(599.5)
    assert b.retry_after() == 1
    assert b.override_left == pytest.approx(0.5)
    clock.advance(0.5)
    assert b.state is State.CLOSED  # read at the ttl's end: over, with clean counts
    assert b.consecutive_failures == 0
    assert b.override_left is None
    assert seen == [
        "closed->forced_open: forced by admin for 10m",
        "forced_open->closed: forced_open override ended (ttl over)",
    ]


def test_forced_open_without_ttl_says_open_duration_and_lasts_until_lifted() -> None:
    b, clock, seen = breaker()
    b.force(State.FORCED_OPEN)
    clock.advance(10**6)
    rejection = b.acquire()
    assert isinstance(rejection, Rejection) and rejection.retry_after == 30
    assert b.override_left == float("inf")
    b.force(None, reason="override lifted by admin")
    assert b.state is State.CLOSED
    assert seen[-1] == "forced_open->closed: override lifted by admin"


def test_an_override_ends_on_acquire_too() -> None:
    b, clock, _ = breaker()
    b.force(State.FORCED_OPEN, 5)
    clock.advance(5)
    permit = b.acquire()
    assert isinstance(permit, Permit) and permit.state is State.CLOSED
    permit.failed()
    assert b.consecutive_failures == 1  # an ordinary CLOSED permit again


def test_forced_closed_admits_everything_and_counts_nothing() -> None:
    b, _, _ = breaker()
    b.force(State.FORCED_CLOSED, 60)
    permits = [b.acquire() for _ in range(10)]
    assert all(isinstance(p, Permit) for p in permits)
    for p in permits:
        assert isinstance(p, Permit)
        p.failed()
    assert b.state is State.FORCED_CLOSED
    assert b.consecutive_failures == 0
    assert b.retry_after() is None


def test_an_override_applies_in_shadow_mode() -> None:
    b, _, _ = breaker(mode="shadow")
    b.force(State.FORCED_OPEN)
    assert isinstance(b.acquire(), Rejection)
    assert b.shadow_rejections == 0


def test_forcing_from_open_ignores_the_outcomes_of_older_permits() -> None:
    b, _, _ = breaker()
    slow = b.acquire()
    assert isinstance(slow, Permit)
    b.force(State.FORCED_CLOSED)
    b.force(None)
    slow.failed()  # admitted before the override: counts against nothing now
    assert b.consecutive_failures == 0


def test_reset_from_open_closes_with_clean_counts() -> None:
    b, _, seen = breaker()
    fail(b, 3)
    assert b.state is State.OPEN
    b.reset("reset by admin")
    assert b.state is State.CLOSED
    assert b.consecutive_failures == 0
    assert seen[-1] == "open->closed: reset by admin"


def test_reset_while_closed_cleans_counts_and_forgets_older_permits() -> None:
    b, _, seen = breaker()
    fail(b, 2)
    older = b.acquire()
    assert isinstance(older, Permit)
    b.reset()
    older.failed()
    assert b.consecutive_failures == 0
    fail(b, 2)
    assert b.state is State.CLOSED  # 2 after the reset, not 5
    assert len(seen) == 0  # CLOSED to CLOSED is no transition


def test_reset_ends_an_override() -> None:
    b, _, _ = breaker()
    b.force(State.FORCED_OPEN, 60)
    b.reset()
    assert b.state is State.CLOSED
    assert isinstance(b.acquire(), Permit)


def test_only_overrides_can_be_forced() -> None:
    b, _, _ = breaker()
    with pytest.raises(ValueError):
        b.force(State.OPEN)


# -- the admin endpoints ----------------------------------------------------------------


async def post(
    http: aiohttp.ClientSession, url: str, body: object = None, token: str | None = None
) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with http.post(url, data=data, headers=headers) as response:
        found = await json_body(response)
        assert isinstance(found, dict)
        return response.status, found


async def test_forced_open_answers_503_circuit_forced_open_with_the_ttl(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    status, report = await post(
        http, s.admin + "/breakers/a", {"state": "forced_open", "ttl": "10m"}
    )
    assert status == 200
    assert (report["state"], report["retry_after"], report["override_ttl_left"]) == (
        "forced_open",
        600,
        600.0,
    )
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "600"
        assert await json_body(response) == {
            "error": "circuit_forced_open",
            "route": "a",
            "retry_after": 600,
        }
    async with http.get(s.proxy + "/b/x") as response:
        assert response.status == 200  # the other route is untouched
    assert upstream.hits == 1
    assert s.sample("sidecar_breaker_state", route="a", state="forced_open") == 1
    assert s.sample("sidecar_breaker_state", route="a", state="closed") == 0
    assert s.sample("sidecar_rejected_requests_total", route="a", reason="circuit_forced_open") == 1
    assert (
        s.sample(
            "sidecar_breaker_transitions_total",
            route="a",
            from_state="closed",
            to_state="forced_open",
        )
        == 1
    )
    s.clock.advance(600)
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 200
    assert s.breaker("a").state is State.CLOSED


async def test_forced_open_without_ttl_says_open_duration(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    assert (await post(http, s.admin + "/breakers/a", {"state": "forced_open"}))[0] == 200
    async with http.get(s.proxy + "/a/x") as response:
        assert response.headers["Retry-After"] == "45"
    status, report = await post(http, s.admin + "/breakers/a", {"state": "auto"})
    assert (status, report["state"], report["override_ttl_left"]) == (200, "closed", None)
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 200


async def test_forced_closed_forwards_through_failures(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    await post(http, s.admin + "/breakers/a", {"state": "forced_closed", "ttl": 60})
    for _ in range(5):
        async with http.get(s.proxy + "/a/status/500") as response:
            assert response.status == 500
    assert upstream.hits == 5
    assert s.breaker("a").state is State.FORCED_CLOSED
    # Still measured: the failures are counted, only not acted on.
    assert s.sample("sidecar_upstream_failures_total", route="a", kind="status") == 5


async def test_reset_closes_an_open_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    for _ in range(2):
        async with http.get(s.proxy + "/a/status/500"):
            pass
    assert s.breaker("a").state is State.OPEN
    status, report = await post(http, s.admin + "/breakers/a/reset")
    assert (status, report["state"], report["consecutive_failures"]) == (200, "closed", 0)
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/breakers/nope", {"state": "forced_open"}, 404, "no route named 'nope'"),
        ("/breakers/nope/reset", None, 404, "no route named 'nope'"),
        ("/breakers/a", {"state": "open"}, 400, "state must be one of"),
        ("/breakers/a", {}, 400, "state must be one of"),
        ("/breakers/a", {"state": "forced_open", "ttl": "soon"}, 400, "ttl: 'soon' is not"),
        ("/breakers/a", {"state": "forced_open", "ttl": 0}, 400, "ttl: must be greater than 0"),
        ("/breakers/a", {"state": "forced_open", "ttl": -5}, 400, "ttl: must not be negative"),
        ("/breakers/a", {"state": "auto", "ttl": "1m"}, 400, "'auto' takes no ttl"),
        ("/breakers/a", {"state": "forced_open", "tll": "1m"}, 400, "unknown keys: tll"),
        ("/breakers/a", b"{not json", 400, "the body must be a JSON object"),
        ("/breakers/a", ["forced_open"], 400, "the body must be a JSON object"),
    ],
)
async def test_bad_admin_requests_get_a_clear_error(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    path: str,
    body: object,
    status: int,
    detail: str,
) -> None:
    s = await start_sidecar(two_routes(upstream))
    got, answer = await post(http, s.admin + path, body)
    assert got == status
    assert str(answer["detail"]).startswith(detail), answer
    assert s.breaker("a").state is State.CLOSED


async def test_with_a_token_every_mutating_endpoint_needs_it(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream), admin_token="s3cret")
    for path, body in (
        ("/breakers/a", {"state": "forced_open"}),
        ("/breakers/a/reset", None),
        ("/reload", None),
    ):
        before = s.breaker("a").state
        for token in (None, "wrong", "s3cret2"):
            async with http.post(
                s.admin + path,
                json=body,
                headers={"Authorization": f"Bearer {token}"} if token else {},
            ) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
        assert s.breaker("a").state is before
        status, _ = await post(http, s.admin + path, body, token="s3cret")
        assert status == 200
    # Reading needs no token.
    async with http.get(s.admin + "/breakers") as response:
        assert response.status == 200


def test_without_a_token_only_loopback_clients_may_change_things() -> None:
    for address, loopback in (
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("::ffff:10.0.0.5", False),
        ("fe80::1%eth0", False),
        ("", False),
        (None, False),
    ):
        assert _is_loopback(address) is loopback, address

    class Transport:
        def __init__(self, peer: str) -> None:
            self.peer = peer

        def get_extra_info(self, name: str, default: object = None) -> object:
            return (self.peer, 40000) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    outside = make_mocked_request("POST", "/reload", transport=Transport("10.0.0.5"))
    refused = _refusal(outside, None)
    assert refused is not None and refused.status == 403
    inside = make_mocked_request("POST", "/reload", transport=Transport("127.0.0.1"))
    assert _refusal(inside, None) is None
    # With a token, loopback is no excuse, and a right token works from anywhere.
    assert _refusal(inside, "t") is not None
    with_token = make_mocked_request(
        "POST", "/reload", headers={"Authorization": "bearer t"}, transport=Transport("10.0.0.5")
    )
    assert _refusal(with_token, "t") is None


# -- hot reload -----------------------------------------------------------------------


async def test_reload_keeps_unchanged_routes_and_starts_changed_ones_fresh(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(
        two_routes(upstream)
        + f"""
  - name: gone
    match: {{path_prefix: /gone}}
    upstream: {upstream.url}
"""
    )
    for route in ("a", "b"):
        for _ in range(2):
            async with http.get(s.proxy + f"/{route}/status/500"):
                pass
    assert s.breaker("a").state is State.OPEN and s.breaker("b").state is State.OPEN
    await post(http, s.admin + "/breakers/gone", {"state": "forced_open"})
    s.rewrite_config(f"""
routes:
  - name: a                       # the same breaker, a new upstream path: kept
    match: {{path_prefix: /a}}
    upstream: {upstream.url}/v2
    strip_prefix: true
    breaker: {{failure_threshold: 2, open_duration: 45s}}
  - name: b                       # a new breaker setting: fresh
    match: {{path_prefix: /b}}
    upstream: {upstream.url}
    strip_prefix: true
    breaker: {{failure_threshold: 3, open_duration: 45s}}
  - name: new
    match: {{path_prefix: /new}}
    upstream: {upstream.url}
""")
    status, answer = await post(http, s.admin + "/reload")
    assert status == 200
    assert answer == {
        "result": "success",
        "routes": {
            "kept": [],
            "updated": ["a"],
            "reset": ["b"],
            "added": ["new"],
            "removed": ["gone"],
        },
        "restart_required": [],
    }
    assert s.breaker("a").state is State.OPEN
    assert s.breaker("b").state is State.CLOSED
    assert s.sample("sidecar_requests_total", route="a", code="500") == 2
    assert s.sample("sidecar_requests_total", route="b", code="500") is None
    assert s.sample("sidecar_breaker_state", route="gone", state="closed") is None
    assert s.sample("sidecar_breaker_state", route="new", state="closed") == 1
    assert s.sample("sidecar_config_reloads_total", result="success") == 1
    async with http.get(s.proxy + "/new/x") as response:
        assert response.status == 200
    async with http.get(s.proxy + "/gone/x") as response:
        assert response.status == 404
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 503  # still OPEN, as it was
    s.clock.advance(45)
    async with http.get(s.proxy + "/a/x") as response:
        assert (await json_body(response))["path"] == "/v2/x"  # type: ignore[index]


async def test_the_routes_a_reload_replaces_hold_no_reference_cycle(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # `sidecar run` freezes the heap it starts with (freeze_heap): a frozen object in a
    # reference cycle is never freed, so the routes a reload drops must go by reference
    # counting alone, their breaker, metrics and config with them.
    s = await start_sidecar(two_routes(upstream))
    async with http.get(s.proxy + "/a/status/500"):
        pass  # a failure counted, a state listener called: as in service
    gc.collect()
    s.rewrite_config("routes:\n  - name: b" + two_routes(upstream).split("  - name: b")[1])
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        status, answer = await post(http, s.admin + "/reload")
        assert (status, answer["routes"]["removed"]) == (200, ["a"])  # type: ignore[index]
        gc.collect()
        found = [
            o
            for o in gc.garbage
            if isinstance(o, Target | Breaker | Route | RouteMetrics)
            and (o.route.name if isinstance(o, Target) else o.name) == "a"
        ]
        assert found == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_freeze_heap_keeps_what_exists_from_the_collector() -> None:
    before = object.__new__(Breaker)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())  # frozen: no generation has it
    finally:
        gc.unfreeze()


async def test_an_invalid_reload_keeps_the_old_config_serving(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    before = s.sample("sidecar_config_last_reload_success_timestamp_seconds")
    assert before is not None and before > 1.7e9
    s.rewrite_config(
        "routes:\n  - name: a\n    upstream: ftp://x\n    breaker: {failure_threshold: 0}\n"
    )
    status, answer = await post(http, s.admin + "/reload")
    assert status == 400
    assert answer["result"] == "failure"
    errors = answer["errors"]
    assert isinstance(errors, list) and len(errors) == 3
    assert all(str(e).startswith(s.sidecar.config.path + ":") for e in errors)
    assert s.sample("sidecar_config_reloads_total", result="failure") == 1
    assert s.sample("sidecar_config_reloads_total", result="success") == 0
    assert s.sample("sidecar_config_last_reload_success_timestamp_seconds") == before
    async with http.get(s.proxy + "/b/x") as response:
        assert response.status == 200


async def test_a_new_listen_address_needs_a_restart(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = await start_sidecar(two_routes(upstream))
    path = s.sidecar.config.path
    with open(path, "w") as f:
        f.write("listen: 127.0.0.1:1\nadmin: {listen: 127.0.0.1:0}\n" + two_routes(upstream))
    status, answer = await post(http, s.admin + "/reload")
    assert (status, answer["restart_required"]) == (200, ["listen"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"listen changed to 127.0.0.1:1: still listening on {s.sidecar.addresses['proxy']} "
        "until restarted"
    ]
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 200  # still where it was


async def test_a_request_in_flight_finishes_on_the_route_it_started_on(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    held = asyncio.ensure_future(http.get(s.proxy + "/a/hang"))
    await upstream.entered.wait()
    only_b = "routes:\n  - name: b" + two_routes(upstream).split("  - name: b")[1]
    s.rewrite_config(only_b)  # route a removed while its request is at the upstream
    status, answer = await post(http, s.admin + "/reload")
    assert (status, answer["routes"]["removed"]) == (200, ["a"])  # type: ignore[index]
    upstream.release.set()
    response = await held
    assert response.status == 200
    response.release()


async def test_no_request_fails_while_reloading_under_load(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    steady = f"""
routes:
  - name: steady
    match: {{path_prefix: /s}}
    upstream: {upstream.url}
    strip_prefix: true
"""
    other = f"""
  - name: other
    match: {{path_prefix: /o}}
    upstream: {upstream.url}
    timeouts: {{request: 5s}}
"""
    s = await start_sidecar(steady)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as own:  # a pool of its own: many connections
            while not stop.is_set():
                async with own.get(s.proxy + "/s/x") as response:
                    await response.read()
                    statuses.append(response.status)

    clients = [asyncio.ensure_future(client()) for _ in range(16)]
    for i in range(30):
        # A route added and removed in turn, and the steady route's timeouts changed
        # every third time (an update that keeps its breaker).
        text = steady + ("    timeouts: {request: 9s}\n" if i % 3 == 0 else "")
        s.rewrite_config(text + (other if i % 2 else ""))
        status, answer = await post(http, s.admin + "/reload")
        assert status == 200, answer
        await asyncio.sleep(0.01)  # let requests run between reloads
    stop.set()
    await asyncio.gather(*clients)
    assert s.sample("sidecar_config_reloads_total", result="success") == 30
    assert len(statuses) > 30
    assert set(statuses) == {200}
    assert s.sample("sidecar_requests_total", route="steady", code="200") == len(statuses)


async def test_an_override_posted_across_a_reload_lands_on_the_live_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    body = json.dumps({"state": "forced_open"}).encode()
    reader, writer = await connect(s.admin)
    writer.write(
        b"POST /breakers/a HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    for _ in range(50):  # let the admin handler start and wait for the body
        await asyncio.sleep(0)
    s.rewrite_config(
        two_routes(upstream).replace("failure_threshold: 2", "failure_threshold: 3", 1)
    )
    status, answer = await post(http, s.admin + "/reload")
    assert (status, answer["routes"]["reset"]) == (200, ["a"])  # type: ignore[index]
    writer.write(body)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    async with http.get(s.proxy + "/a/x") as response:
        assert response.status == 503  # in force on the breaker that serves the route


async def test_hostile_admin_requests_get_4xx_never_500(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream), admin_token="s3cret")
    # Undecodable bytes in the token: compared as sent, refused.
    reply = await raw_exchange(
        s.admin,
        b"POST /breakers/a/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 401 ")
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    async with http.post(s.admin + "/breakers/a", data=b"[" * 60_000, headers=auth) as response:
        assert response.status == 400  # nested too deep for the JSON parser: no traceback
    async with http.post(s.admin + "/breakers/a", data=b" " * 70_000, headers=auth) as response:
        assert response.status == 413  # the operator's bodies are small
    assert s.breaker("a").state is State.CLOSED


@pytest.mark.parametrize(
    ("value", "token"), [("s3cret", "s3cret"), (" s3cret\n", "s3cret"), ("  ", None), ("", None)]
)
def test_the_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, token: str | None
) -> None:
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", value)
    assert admin_token_from_env() == token


async def test_the_exposition_is_promtool_clean_with_overrides_and_after_a_reload(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian's prometheus package; .ci/run installs it)")
    s = await start_sidecar(two_routes(upstream))
    await post(http, s.admin + "/breakers/a", {"state": "forced_open", "ttl": "1m"})
    await post(http, s.admin + "/breakers/b", {"state": "forced_closed"})
    async with http.get(s.proxy + "/a/x"):
        pass
    s.rewrite_config(two_routes(upstream).replace("name: b", "name: c"))
    assert (await post(http, s.admin + "/reload"))[0] == 200
    async with http.get(s.admin + "/metrics") as response:
        text = await response.read()
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert b'route="b"' not in text
    assert b'sidecar_breaker_state{route="a",state="forced_open"} 1.0' in text
