"""The boundary to upstreams: one pooled aiohttp client, and its errors made ours.

aiohttp's exceptions are translated into `UpstreamError`s in exactly one
place, `translate()`; the proxy handler never catches aiohttp exceptions itself.

    UpstreamError               the upstream exchange failed; `kind` is the failure label
     +-- UpstreamUnreachable    refused, unresolvable, or reset before response headers (502)
     +-- UpstreamTimeout        connect or response-headers deadline passed (504)
     +-- UpstreamReset          broke off after its response headers (client aborted)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import Timeouts

__all__ = [
    "UpstreamError",
    "UpstreamReset",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "client_timeout",
    "iter_body",
    "new_client_session",
    "send",
    "translate",
]

POOL_SIZE = 0
"""Connections per session; 0 is unlimited, as a sidecar's caller already bounds its concurrency."""
KEEPALIVE_TIMEOUT = 30.0
"""Seconds an idle upstream connection is kept for reuse."""


class UpstreamError(Exception):
    kind = "connect"
    """The `kind` label of `sidecar_upstream_failures_total`."""


class UpstreamUnreachable(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamReset(UpstreamError):
    kind = "reset"


def new_client_session() -> aiohttp.ClientSession:
    """One session for every route: keep-alive pool, bytes passed through untouched."""
    connector = aiohttp.TCPConnector(
        limit=POOL_SIZE,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        enable_cleanup_closed=False,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # a proxy forwards the bytes it was given
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies between clients
        timeout=aiohttp.ClientTimeout(total=None),  # per-route deadlines are set per request
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        trust_env=False,
        raise_for_status=False,
    )


def translate(exc: BaseException, *, after_headers: bool) -> UpstreamError:
    """Map an exception from the upstream exchange to the project's own error."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(str(exc) or "timed out")
    if after_headers:
        return UpstreamReset(str(exc) or type(exc).__name__)
    return UpstreamUnreachable(str(exc) or type(exc).__name__)


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """aiohttp's deadlines for a route, made once.

    The request deadline (until response headers) is enforced by `send`; here it
    also bounds each read of the body, so an upstream that stops sending mid-body
    cannot hold a client forever.
    """
    return aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=timeouts.connect, sock_read=timeouts.request
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: aiohttp.StreamReader | None,
    timeout: aiohttp.ClientTimeout,
    request_timeout: float,
) -> aiohttp.ClientResponse:
    """Send a request upstream and return once its response headers are in."""
    try:
        async with asyncio.timeout(request_timeout):
            return await session.request(
                method,
                url,
                headers=headers,
                data=body,
                timeout=timeout,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        # ValueError: aiohttp's own complaint about a header it cannot send on.
        raise translate(e, after_headers=False) from e


async def iter_body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body as it arrives; a break-off raises `UpstreamReset` or `UpstreamTimeout`."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        raise translate(e, after_headers=True) from e
