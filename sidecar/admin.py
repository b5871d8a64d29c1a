"""The admin listener: /metrics, /healthz, /readyz, /breakers, and the operator's
endpoints: POST /reload, POST /breakers/{route} (an override), and
POST /breakers/{route}/reset.

The operator's endpoints change what the proxy does, so they need
`Authorization: Bearer <SIDECAR_ADMIN_TOKEN>` when that variable is set; without
it they are accepted only from loopback clients (a pod's own containers).

A browser on the operator's machine is a loopback client too (`kubectl
port-forward`), and any web page it shows can make it POST here. So before the
token or the client's address is looked at, a POST that a browser sent for a page
of another origin is refused (`_cross_site`), and a body must be
`application/json`, which a page of another origin cannot send without asking
first (a CORS preflight, which this listener never grants).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
from collections.abc import Collection
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from sidecar.breaker import Breaker, State
from sidecar.config import format_duration, parse_duration
from sidecar.logs import event
from sidecar.routing import authority

if TYPE_CHECKING:
    from sidecar.app import Sidecar
    from sidecar.exchange import Target

log = logging.getLogger("sidecar")

OVERRIDES = {"forced_open": State.FORCED_OPEN, "forced_closed": State.FORCED_CLOSED, "auto": None}

__all__ = ["Health", "breaker_report", "create_admin_app", "route_report"]


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
        "override_ttl_left": _seconds_or_none(breaker.override_left),
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
        "recovering": breaker.recovering,
        "recovery_share": round(breaker.recovery_share, 4),
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


def route_report(target: Target) -> dict[str, Any]:
    """One route's entry in /breakers: its breaker, and its policies with live figures."""
    report = breaker_report(target.breaker)
    route = target.route
    bucket = target.bucket
    limit = route.rate_limit
    report["rate_limit"] = (
        None
        if limit is None or bucket is None
        else {
            "rate": limit.rate,
            "burst": limit.burst,
            "mode": limit.mode,
            "tokens": round(bucket.tokens, 3),
            "shadow_limited": bucket.shadow_limited,
        }
    )
    bulkhead = target.bulkhead
    settings = route.bulkhead
    report["bulkhead"] = (
        None
        if settings is None or bulkhead is None
        else {
            "max_concurrent": settings.max_concurrent,
            "max_queued": settings.max_queued,
            "queue_timeout": settings.queue_timeout,
            "in_flight": bulkhead.in_flight,
            "queued": bulkhead.queued,
        }
    )
    fallback = route.fallback
    report["fallback"] = (
        None
        if fallback is None
        else {
            "reasons": sorted(fallback.reasons),
            "status": fallback.status,
            "body_file": fallback.body_file,
            "served": dict(target.metrics.fallbacks),
        }
    )
    retry = route.retry
    budget = target.budget
    if retry is None or budget is None:
        report["retry"] = None
    else:
        requests, retries, left = budget.figures()
        report["retry"] = {
            "attempts": retry.attempts,
            "retry_on": sorted(retry.retry_on_kinds) + sorted(retry.retry_on_statuses),
            "methods": sorted(m.decode() for m in retry.methods),
            "per_try_timeout": retry.per_try_timeout,
            "deadline": retry.deadline,
            "backoff": {"base": retry.backoff_base, "max": retry.backoff_max},
            "budget": {
                "ratio": float(retry.budget_ratio),
                "min_per_second": retry.budget_min_per_second,
                "requests_10s": requests,
                "retries_10s": retries,
                "retries_left": left,
            },
            "replay_max_body": retry.replay_max_body,
        }
    recovery = route.recovery
    report["recovery"] = (
        None
        if recovery is None
        else {"ramp": recovery.ramp, "min_share": float(recovery.min_share)}
    )
    metrics = target.metrics
    report["sessions"] = {
        "max_websocket_sessions": route.max_websocket_sessions,
        "websocket_idle": route.timeouts.websocket_idle,
        "websocket_sessions": metrics.sessions.websocket,
        "connect": route.connect,
        "connect_tunnels": metrics.sessions.tunnels,
    }
    tls = route.tls
    report["tls"] = (
        None
        if tls is None
        else {
            "ca_file": tls.ca_file,
            "cert_file": tls.cert_file,
            "server_name": tls.server_name,
            "verify": tls.verify,
            "min_version": tls.min_version,
            "client_cert_expiry": tls.client_cert_expiry,
            "upstream_cert_expiry": (
                tls.context.not_after.get(metrics.tls_server) if tls.context else None
            ),
        }
    )
    return report


def _fraction(rate: Fraction | None) -> float | None:
    return None if rate is None else float(rate)


def _seconds_or_none(seconds: float | None) -> float | None:
    """JSON has no infinity: an override without a ttl has no time left to show."""
    return None if seconds is None or math.isinf(seconds) else round(seconds, 3)


def _error(status: int, error: str, detail: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(
        {"error": error, "detail": detail, **extra}, status=status, headers=headers
    )


def _is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::([0-9]{0,5}))?")
"""`host`, `host:port`, `[v6]` or `[v6]:port`, as in a Host header or an Origin."""


def _authority(text: str) -> tuple[str, int | None] | None:
    """(lower-case host without brackets or final dot, port or None), or None if malformed."""
    m = _AUTHORITY.fullmatch(text.strip())
    if m is None:
        return None
    host, port_text = m.group(1).lower(), m.group(2)
    port = int(port_text) if port_text else None
    if port is not None and port > 65535:
        return None
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    # `localhost.` is `localhost`, as for a route's match.host.
    return host.removesuffix("."), port


def _host_allowed(host: str, allowed_hosts: Collection[str]) -> bool:
    """An IP address or localhost cannot be rebound to this machine by someone's DNS."""
    if host == "localhost" or host in allowed_hosts:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cross_site(
    headers: MultiMapping[str], own_port: int, allowed_hosts: Collection[str]
) -> str | None:
    """Why a browser may have sent this POST for a web page of another origin, or None.

    `headers` is the request's (a multidict: a header sent twice is suspect); `own_port`
    the port the admin listener is bound to. Own origin is `http://` + this request's
    Host, which must pass the Host rule, + `own_port`. Comparing the Origin with the
    Host the request names, not with any host that passes the rule, matters: otherwise
    a page served from some IP address at the admin's port would pass as own.
    """

    def values(name: str) -> list[str]:
        return headers.getall(name, [])

    if any(v.strip().lower() == "cross-site" for v in values("Sec-Fetch-Site")):
        return "Sec-Fetch-Site: cross-site: a web page of another site sent this request"
    hosts = values("Host")
    if len(hosts) > 1:
        return "more than one Host header"
    host: str | None = None
    if hosts:
        found = _authority(hosts[0])
        if found is None or not _host_allowed(found[0], allowed_hosts):
            return (
                f"Host {_shown(hosts[0])} is not an IP address, localhost or one of "
                "admin.allowed_hosts (a DNS name pointed at this machine: DNS rebinding?)"
            )
        host = found[0]
    origins = values("Origin")
    if not origins:
        return None
    if len(origins) > 1:
        return "more than one Origin header"
    if host is None:
        return f"Origin {_shown(origins[0])} with no Host header to compare it with"
    own = f"http://{authority(host, own_port)}"
    scheme, sep, rest = origins[0].strip().partition("://")
    origin = _authority(rest) if sep else None
    if (
        origin is None
        or scheme != "http"
        or origin[0] != host
        or (80 if origin[1] is None else origin[1]) != own_port
    ):
        return f"Origin {_shown(origins[0])} is not this listener's own ({own})"
    return None


def _shown(value: str, limit: int = 100) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _not_json(request: web.Request) -> web.Response | None:
    """415 for a body not declared JSON, or None (JSON, or no body at all).

    A form can send text/plain, urlencoded and multipart bodies anywhere; a page that
    wants to send JSON elsewhere must ask first (a CORS preflight), and is never let.
    """
    if not request.body_exists:
        return None
    given = request.headers.getall("Content-Type", [])
    if len(given) == 1 and given[0].partition(";")[0].strip().lower() == "application/json":
        return None
    sent = ", ".join(map(_shown, given)) if given else "none"
    return _error(
        415,
        "unsupported_media_type",
        f"a body must be sent with Content-Type: application/json (sent: {sent})",
    )


def _refusal(request: web.Request, token: str | None) -> web.Response | None:
    """Why a mutating request may not go ahead, or None if it may."""
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Header values arrive with undecodable bytes as surrogates: compare them as sent.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, token.encode()):
            return None
        return _error(401, "unauthorized", "send Authorization: Bearer <SIDECAR_ADMIN_TOKEN>")
    if _is_loopback(request.remote):
        return None
    return _error(
        403,
        "forbidden",
        "without SIDECAR_ADMIN_TOKEN set, only loopback clients may change the sidecar",
    )


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _error(400, "bad_request", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "bad_request", "the body must be a JSON object")
    return body


def create_admin_app(sidecar: Sidecar) -> web.Application:
    metrics = sidecar.metrics
    health = sidecar.health

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
        return web.json_response({"routes": [route_report(t) for t in sidecar.proxy.targets]})

    def gate(request: web.Request) -> web.Response | None:
        """Why an operator's request may not go ahead now, or None if it may.

        In this order: a web page's request (403), the same with or without
        SIDECAR_ADMIN_TOKEN; then the token or the client's address (401, 403); then
        a body that is not JSON (415); then shutting down (503).
        """
        own_port = sidecar.addresses["admin"].port
        cross_site = _cross_site(request.headers, own_port, sidecar.config.admin_allowed_hosts)
        if cross_site is not None:
            event(
                log,
                logging.WARNING,
                "admin_refused",
                f"admin: refused {request.method} {request.path} from {request.remote}: "
                f"{cross_site}",
                reason="cross_site_request",
                detail=cross_site,
                path=request.path,
                client=request.remote,
            )
            return _error(403, "cross_site_request", cross_site)
        # (Not `_refusal(...) or _not_json(...)`: before aiohttp 3.12 a response with no
        # stored values was false, and the refusal fell through.)
        refused = _refusal(request, sidecar.admin_token)
        if refused is None:
            refused = _not_json(request)
        if refused is None and not health.ready:
            refused = _error(503, "stopping", "the sidecar is shutting down: no changes now")
        return refused

    async def post_reload(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        _audit(request, "reload", None)
        result = await sidecar.reload()
        return web.json_response(result.as_json(), status=200 if result.ok else 400)

    def route_breaker(request: web.Request) -> Breaker | web.Response:
        name = request.match_info["route"]
        breaker = sidecar.breaker(name)
        if breaker is None:
            return _error(404, "no_such_route", f"no route named {name!r}")
        return breaker

    async def post_override(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        # The body first: from looking the breaker up to forcing it there is no await,
        # so a reload cannot swap the route in between and leave the order on a
        # breaker nobody uses.
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        breaker = route_breaker(request)
        if isinstance(breaker, web.Response):
            return breaker
        unknown = sorted(set(body) - {"state", "ttl"})
        if unknown:
            return _error(400, "bad_request", f"unknown keys: {', '.join(unknown)}")
        wanted = body.get("state")
        if not isinstance(wanted, str) or wanted not in OVERRIDES:
            return _error(
                400, "bad_request", "state must be one of 'forced_open', 'forced_closed', 'auto'"
            )
        state = OVERRIDES[wanted]
        ttl = None
        if body.get("ttl") is not None:
            if state is None:
                return _error(400, "bad_request", "'auto' takes no ttl")
            try:
                ttl = parse_duration(body["ttl"])
            except ValueError as e:
                return _error(400, "bad_request", f"ttl: {e}")
            if ttl <= 0:
                return _error(400, "bad_request", "ttl: must be greater than 0")
        _audit(request, "force", breaker.name, state=wanted, ttl=ttl)
        if state is None:
            breaker.force(None, reason="override lifted by admin")
        else:
            until = "" if ttl is None else f" for {format_duration(ttl)}"
            breaker.force(state, ttl, reason=f"forced by admin{until}")
        return web.json_response(breaker_report(breaker))

    async def post_reset(request: web.Request) -> web.Response:
        refused = gate(request)
        if refused is not None:
            return refused
        breaker = route_breaker(request)
        if isinstance(breaker, web.Response):
            return breaker
        _audit(request, "reset", breaker.name)
        breaker.reset("reset by admin")
        return web.json_response(breaker_report(breaker))

    # The operator's bodies are a few bytes of JSON: 64 KiB is plenty (413 beyond).
    app = web.Application(client_max_size=65536)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    app.router.add_get("/breakers", get_breakers)
    app.router.add_post("/reload", post_reload)
    app.router.add_post("/breakers/{route}", post_override)
    app.router.add_post("/breakers/{route}/reset", post_reset)
    return app


def _audit(request: web.Request, action: str, route: str | None, **fields: Any) -> None:
    what = action if route is None else f"{action} {route}"
    shown = {k: format_duration(v) if k == "ttl" else v for k, v in fields.items() if v is not None}
    details = " ".join(f"{k}={v}" for k, v in shown.items())
    event(
        log,
        logging.INFO,
        "admin_action",
        f"admin: {what} {details} from {request.remote}".replace("  ", " "),
        action=action,
        route=route,
        client=request.remote,
        **fields,
    )
