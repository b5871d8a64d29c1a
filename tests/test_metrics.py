"""The admin listener and the contract's metrics, after a scripted scenario."""

from __future__ import annotations

import os
import shutil
import subprocess

import aiohttp
import pytest

from sidecar.breaker import State
from tests.conftest import StartSidecar, Upstream

TWO_ROUTES = """
routes:
  - name: payments
    match: {{path_prefix: /payments}}
    upstream: {url}
    strip_prefix: true
    breaker: {{failure_threshold: 3, open_duration: 60s}}
  - name: idle-route
    match: {{host: idle.internal}}
    upstream: {url}
"""

SERIES = {
    "sidecar_breaker_state": [{"state": s} for s in ("closed", "open", "half_open")],
    "sidecar_breaker_transitions_total": [
        {"from_state": "closed", "to_state": "open"},
        {"from_state": "open", "to_state": "half_open"},
        {"from_state": "half_open", "to_state": "open"},
        {"from_state": "half_open", "to_state": "closed"},
    ],
    "sidecar_breaker_consecutive_failures": [{}],
    "sidecar_requests_total": [{"code": c} for c in ("429", "502", "503", "504")],
    "sidecar_rejected_requests_total": [
        {"reason": r}
        for r in (
            "circuit_open",
            "circuit_half_open",
            "circuit_forced_open",
            "circuit_recovering",
            "rate_limited",
            "bulkhead_full",
        )
    ],
    "sidecar_recovery_share": [{}],
    "sidecar_upstream_tries_total": [{"result": "success"}, {"result": "failure"}],
    "sidecar_retries_total": [{"reason": "connect"}],
    "sidecar_retries_denied_total": [
        {"reason": r} for r in ("budget", "breaker", "body", "method", "retry_after", "deadline")
    ],
    "sidecar_upstream_failures_total": [
        {"kind": k} for k in ("status", "connect", "timeout", "reset")
    ],
    "sidecar_upstream_request_duration_seconds_count": [{}],
    "sidecar_in_flight_requests": [{}],
    "sidecar_upstream_slow_calls_total": [{}],
    "sidecar_breaker_shadow_rejections_total": [{}],
    "sidecar_breaker_failure_rate": [{}],
    "sidecar_breaker_slow_call_rate": [{}],
    "sidecar_breaker_mode": [{"mode": "enforce"}, {"mode": "shadow"}],
}
NO_RATE = ("sidecar_breaker_failure_rate", "sidecar_breaker_slow_call_rate")
"""-1 says "no rate": these routes have no window."""


async def test_every_series_exists_for_every_route_before_any_traffic(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    for route in ("payments", "idle-route"):
        for name, label_sets in SERIES.items():
            for labels in label_sets:
                value = sc.sample(name, route=route, **labels)
                expected = 1.0 if labels in ({"state": "closed"}, {"mode": "enforce"}) else 0.0
                if name == "sidecar_recovery_share":
                    expected = 1.0  # not recovering
                if name in NO_RATE:
                    expected = -1.0
                assert value == expected, (name, route, labels)
    assert sc.sample("sidecar_unrouted_requests_total") == 0
    from sidecar import __version__

    assert sc.sample("sidecar_build_info", version=__version__) == 1


async def test_metric_values_after_a_scripted_scenario(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    p = f"{sc.proxy}/payments"
    script = ["/ok", "/status/500", "/status/500", "/status/500"]  # 1 ok, 3 failures: OPEN
    for path in script:
        async with http.get(p + path) as response:
            await response.read()
    for _ in range(2):  # rejected
        async with http.get(p + "/ok") as response:
            assert response.status == 503
    sc.clock.advance(60)
    async with http.get(p + "/status/500") as response:  # a failed probe: OPEN again
        assert response.status == 500
    sc.clock.advance(60)
    async with http.get(p + "/ok") as response:  # a good probe: CLOSED
        assert response.status == 200
    async with http.get(f"{sc.proxy}/nowhere") as response:
        assert response.status == 404

    def s(name: str, **labels: str) -> float | None:
        return sc.sample(name, route="payments", **labels)

    assert s("sidecar_requests_total", code="200") == 2
    assert s("sidecar_requests_total", code="500") == 4
    assert s("sidecar_requests_total", code="503") == 2
    assert s("sidecar_rejected_requests_total", reason="circuit_open") == 2
    assert s("sidecar_upstream_failures_total", kind="status") == 4
    assert s("sidecar_upstream_request_duration_seconds_count") == 6
    assert s("sidecar_upstream_request_duration_seconds_bucket", le="+Inf") == 6
    assert s("sidecar_upstream_request_duration_seconds_bucket", le="60.0") == 6
    # Measured on the sidecar's clock, which this test never moved during an exchange.
    assert s("sidecar_upstream_request_duration_seconds_sum") == 0
    assert s("sidecar_in_flight_requests") == 0
    assert s("sidecar_breaker_consecutive_failures") == 0
    transitions = {
        (a, b): s("sidecar_breaker_transitions_total", from_state=a, to_state=b)
        for a, b in [("closed", "open"), ("open", "half_open"), ("half_open", "open"),
                     ("half_open", "closed")]
    }  # fmt: skip
    assert transitions == {
        ("closed", "open"): 1,
        ("open", "half_open"): 2,
        ("half_open", "open"): 1,
        ("half_open", "closed"): 1,
    }
    assert sc.sample("sidecar_unrouted_requests_total") == 1
    assert sc.sample("sidecar_requests_total", route="idle-route", code="200") is None


async def test_scrape_shows_half_open_with_no_traffic(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    for _ in range(3):
        async with http.get(f"{sc.proxy}/payments/status/500") as response:
            await response.read()
    sc.clock.advance(60)
    async with http.get(f"{sc.admin}/metrics") as response:
        text = await response.text()
    assert 'sidecar_breaker_state{route="payments",state="half_open"} 1.0' in text
    assert 'sidecar_breaker_state{route="payments",state="open"} 0.0' in text
    # The transition is counted in the very scrape that shows it.
    assert (
        'sidecar_breaker_transitions_total{from_state="open",route="payments",'
        'to_state="half_open"} 1.0'
    ) in text


async def test_metrics_pass_promtool(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    for path in ("/payments/ok", "/payments/status/500", "/nowhere"):
        async with http.get(sc.proxy + path) as response:
            await response.read()
    async with http.get(f"{sc.admin}/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.read()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b""  # not even a lint warning


async def test_healthz_readyz_and_breakers(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    async with http.get(f"{sc.admin}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{sc.admin}/readyz") as response:
        assert response.status == 200
    for _ in range(3):
        async with http.get(f"{sc.proxy}/payments/status/500") as response:
            await response.read()
    sc.clock.advance(15.5)
    async with http.get(f"{sc.admin}/breakers") as response:
        assert response.status == 200
        report = await response.json()
    payments, idle = report["routes"]
    assert payments == {
        "name": "payments",
        "state": "open",
        "mode": "enforce",
        "consecutive_failures": 3,
        "retry_after": 45,
        "open_period": 60.0,
        "override_ttl_left": None,
        "window": None,
        "shadow_rejections": 0,
        "recovering": False,
        "recovery_share": 1.0,
        "rate_limit": None,
        "bulkhead": None,
        "fallback": None,
        "recovery": None,
        "retry": None,
        "sessions": {
            "max_websocket_sessions": 1000,
            "websocket_idle": 3600.0,
            "websocket_sessions": 0,
            "connect": False,
            "connect_tunnels": 0,
        },
        "tls": None,
        "settings": {
            "failure_threshold": 3,
            "open_duration": 60.0,
            "half_open_requests": 1,
            "success_threshold": 1,
            "failure_status": [500, 502, 503, 504],
            "window": None,
            "failure_rate": None,
            "slow_call_duration": None,
            "slow_call_rate": None,
            "backoff_multiplier": 1.0,
            "max_open_duration": 300.0,
            "jitter": 0.0,
            "respect_retry_after": False,
            "mode": "enforce",
        },
    }
    assert (idle["name"], idle["state"], idle["retry_after"]) == ("idle-route", "closed", None)
    sc.sidecar.health.ready = False  # as while stopping
    async with http.get(f"{sc.admin}/readyz") as response:
        assert response.status == 503


async def test_admin_paths_on_the_proxy_listener_are_routed_like_any_path(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(TWO_ROUTES.format(url=upstream.url))
    async with http.get(f"{sc.proxy}/metrics") as response:
        assert response.status == 404
        assert await response.json() == {"error": "no_route"}
    assert sc.breaker("payments").state is State.CLOSED
