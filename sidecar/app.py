"""The app's lifecycle: build the two listeners from a config, start them, stop them gracefully."""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.admin import Health, create_admin_app
from sidecar.breaker import Clock
from sidecar.client import Pool
from sidecar.config import Address, Config
from sidecar.listener import ProxyServer
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.upstream import new_client_session

__all__ = ["SHUTDOWN_GRACE", "Sidecar", "StartupError"]

SHUTDOWN_GRACE = 15.0
"""Seconds in-flight requests get to finish after SIGTERM."""


class StartupError(Exception):
    """The sidecar cannot start; the message is one line for the user."""


class Sidecar:
    """Both listeners of one sidecar: the proxy and the admin endpoints."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.health = Health()
        self.metrics = Metrics(registry or CollectorRegistry(auto_describe=True), __version__)
        # Every route's breaker and series exist from here, before the first scrape.
        self.proxy = Proxy(
            config.routes, self.metrics, clock, rand, write_timeout=config.client_timeouts.write
        )
        self.admin_app = create_admin_app(self.metrics, self.health)
        self._runners: list[web.BaseRunner] = []
        self._session: Pool | None = None
        self.addresses: dict[str, Address] = {}

    async def start(self, shutdown_grace: float = SHUTDOWN_GRACE) -> None:
        """Listen on both addresses, or raise `StartupError` having opened neither."""
        # The client session needs a running loop, so it is made here; it is closed
        # in stop(), after the proxy listener has stopped handing requests over.
        self._session = session = new_client_session()
        self.proxy.attach(session)
        # The proxy listener is aiohttp's low-level server: every request goes to one
        # handler, so the Application's router and middleware machinery would only
        # cost time. handler_cancellation: a client that goes away cancels its handler,
        # which releases its permit (and probe slot) and its upstream request.
        clients = self.config.client_timeouts
        proxy_server = ProxyServer(
            self.proxy.handle,
            header_timeout=clients.headers,
            keepalive_timeout=clients.idle,
            handler_cancellation=True,
            access_log=None,
        )
        try:
            for name, runner, address in (
                (
                    "admin",
                    web.AppRunner(self.admin_app, shutdown_timeout=shutdown_grace, access_log=None),
                    self.config.admin_listen,
                ),
                (
                    "proxy",
                    web.ServerRunner(proxy_server, shutdown_timeout=shutdown_grace),
                    self.config.listen,
                ),
            ):
                await runner.setup()
                self._runners.append(runner)
                site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
                try:
                    await site.start()
                except OSError as e:
                    raise StartupError(_bind_error(name, address, e)) from None
                self.addresses[name] = _bound_address(runner, address)
        except BaseException:
            await self.stop()
            raise
        self.health.ready = True

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, clean up."""
        self.health.ready = False
        # The proxy first: the admin listener keeps answering /readyz (503) and
        # /metrics while the proxy drains.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _bound_address(runner: web.BaseRunner, wanted: Address) -> Address:
    for sock_address in runner.addresses:
        if isinstance(sock_address, tuple):
            return Address(wanted.host, int(sock_address[1]))
    return wanted


def _bind_error(name: str, address: Address, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        reason = "address already in use"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no such address on this machine"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    else:
        reason = error.strerror or str(error)
    return f"cannot listen on {address} ({name}): {reason}"
