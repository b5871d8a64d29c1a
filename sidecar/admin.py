"""The admin listener: /metrics, /healthz, /readyz and /breakers."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from sidecar.breaker import Breaker
from sidecar.metrics import Metrics

__all__ = ["Health", "breaker_report", "create_admin_app"]


class Health:
    """What /readyz reports: ready once listening with a valid config, not while stopping."""

    def __init__(self) -> None:
        self.ready = False


def breaker_report(breaker: Breaker) -> dict[str, Any]:
    """One route's entry in /breakers."""
    settings = breaker.settings
    window = settings.window
    counts = breaker.window_counts()
    rates = breaker.rates(counts)
    return {
        "name": breaker.name,
        "state": breaker.state.value,
        "mode": settings.mode,
        "consecutive_failures": breaker.consecutive_failures,
        "retry_after": breaker.retry_after(),
        "open_period": breaker.open_period,
        "window": None
        if counts is None
        else {
            "outcomes": counts.total,
            "failures": counts.failures,
            "slow_calls": counts.slow,
            "failure_rate": None if rates is None else rates[0],
            "slow_call_rate": None if rates is None else rates[1],
        },
        "shadow_rejections": breaker.shadow_rejections,
        "settings": {
            "failure_threshold": settings.failure_threshold,
            "open_duration": settings.open_duration,
            "half_open_requests": settings.half_open_requests,
            "success_threshold": settings.success_threshold,
            "failure_status": sorted(settings.failure_status),
            "window": None
            if window is None
            else {
                "duration": window.duration,
                "requests": window.requests,
                "min_requests": window.min_requests,
            },
            "failure_rate": _fraction(settings.failure_rate),
            "slow_call_duration": settings.slow_call_duration,
            "slow_call_rate": _fraction(settings.slow_call_rate),
            "backoff_multiplier": settings.backoff_multiplier,
            "max_open_duration": settings.open_duration_cap,
            "jitter": settings.jitter,
            "respect_retry_after": settings.respect_retry_after,
            "mode": settings.mode,
        },
    }


def _fraction(rate: Fraction | None) -> float | None:
    return None if rate is None else float(rate)


def create_admin_app(metrics: Metrics, health: Health) -> web.Application:
    async def get_metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        # Text format 0.0.4: what every Prometheus version scrapes (our names need no escaping).
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    async def get_healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_readyz(_request: web.Request) -> web.Response:
        if health.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not_ready"}, status=503)

    async def get_breakers(_request: web.Request) -> web.Response:
        return web.json_response({"routes": [breaker_report(b) for b in metrics.breakers()]})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    app.router.add_get("/breakers", get_breakers)
    return app
