"""The app's lifecycle: build the two listeners from a config, start them, stop them gracefully."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar._aiohttp_compat import set_shutdown_timeout
from sidecar.admin import Health, create_admin_app
from sidecar.breaker import Breaker, Clock
from sidecar.config import Address, Config, ConfigError, load_config
from sidecar.listener import Listener, Request
from sidecar.logs import ACCESS, event
from sidecar.logs import configure as configure_logs
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy, RouteChanges
from sidecar.timers import LoopTimers, Timers
from sidecar.upstream_pool import Pool

__all__ = ["ReloadResult", "Sidecar", "StartupError", "admin_token_from_env", "freeze_heap"]

log = logging.getLogger("sidecar")


def freeze_heap() -> None:
    """Keep what exists now (modules, the config, the routes) out of every later
    full collection; called once the sidecar runs.

    A full collection walks every object the collector tracks, and stops the
    loop while it does. Measured here: in a 60 s run at 2,000 req/s one came,
    and took 21 ms with one route; with 10,000 routes one takes 30-40 ms.
    Frozen, what start-up made is no longer walked: the same collection took
    0.5 ms.

    A frozen object that turns into cyclic garbage is never freed. The routes a
    reload replaces are freed by reference counting alone: they hold no reference
    cycle, which a test checks. A reload's new routes are not frozen.
    """
    gc.collect()
    gc.freeze()


class StartupError(Exception):
    """The sidecar cannot start; the message is one line for the user."""


@dataclass
class ReloadResult:
    ok: bool
    errors: list[str] = field(default_factory=list)
    """Every problem of an invalid config, one line each."""
    changes: RouteChanges | None = None
    restart_required: list[str] = field(default_factory=list)
    """Keys whose new values only a restart applies (the listen addresses)."""

    def as_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"result": "failure", "errors": self.errors}
        assert self.changes is not None
        return {
            "result": "success",
            "routes": dataclasses.asdict(self.changes),
            "restart_required": self.restart_required,
        }


def admin_token_from_env() -> str | None:
    """`SIDECAR_ADMIN_TOKEN` without surrounding whitespace (a Secret made from a file
    ends in a newline), or None when unset or blank: an empty token guards nothing."""
    return os.environ.get("SIDECAR_ADMIN_TOKEN", "").strip() or None


class Sidecar:
    """Both listeners of one sidecar: the proxy and the admin endpoints."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
        registry: CollectorRegistry | None = None,
        admin_token: str | None = None,
        timers: Timers | None = None,
    ) -> None:
        """`clock` is the breakers'; `timers` the request path's deadlines and timeouts
        (default: the running loop's). A test may hand in the same fake for both."""
        self.config = config
        self._bound = (config.listen, config.admin_listen)
        """What the listeners were started with: a reload cannot move them."""
        self.admin_token = admin_token
        """Mutating admin requests need it as their bearer token; None: loopback only."""
        self.health = Health()
        self.metrics = Metrics(registry or CollectorRegistry(auto_describe=True), __version__)
        self.metrics.last_reload_success = time.time()
        # Every route's breaker and series exist from here, before the first scrape.
        self.proxy = Proxy(config.routes, self.metrics, clock, rand)
        self.admin_app = create_admin_app(self)
        self._timers = timers
        self._admin: web.AppRunner | None = None
        self._listener: Listener | None = None
        self._pool: Pool | None = None
        self._reloading = asyncio.Lock()
        self.addresses: dict[str, Address] = {}

    async def start(self) -> None:
        """Listen on both addresses, or raise `StartupError` having opened neither."""
        _warn(self.config)
        timers = self._timers or LoopTimers(asyncio.get_running_loop())
        # The pool needs a running loop, so it is made here; it is closed in stop(),
        # after the proxy listener has let its requests finish.
        self._pool = Pool(timers)
        self.proxy.attach(self._pool, timers)
        self._listener = Listener(self.proxy.handle, timers, self.config.client_timeouts)
        self._listener.finished = self._access_log()
        try:
            admin = self._admin = web.AppRunner(self.admin_app, access_log=None)
            await admin.setup()
            address = self.config.admin_listen
            site = web.TCPSite(admin, address.host, address.port, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                raise StartupError(_bind_error("admin", address, e)) from None
            self.addresses["admin"] = _bound_address(admin, address)
            address = self.config.listen
            try:
                port = await self._listener.start(address.host, address.port)
            except OSError as e:
                raise StartupError(_bind_error("proxy", address, e)) from None
            self.addresses["proxy"] = Address(address.host, port)
        except BaseException:
            await self.stop()
            raise
        self.health.ready = True

    def _access_log(self) -> Callable[[Request], None] | None:
        """What the listener tells of each request that ends: the access log's line, or
        nothing at all when it is off."""
        return self._log_access if ACCESS.isEnabledFor(logging.INFO) else None

    @staticmethod
    def _log_access(request: Request) -> None:
        status = request.status
        method = request.method.decode("latin-1")
        path = request.target.decode("latin-1").partition("?")[0]
        event(
            ACCESS,
            logging.INFO,
            "access",
            f"{request.remote} {method} {path} {status or '-'}",
            client=request.remote,
            method=method,
            path=path,
            route=request.route,
            status=status,
            duration_ms=round((time.monotonic() - request.started) * 1000, 3),
            tries=request.tries,
        )

    async def reload(self) -> ReloadResult:
        """Re-read the config file: swap to it if valid, else keep serving the old one."""
        async with self._reloading:
            try:
                # In a thread: 10,000 routes take a second or two to check, and the
                # requests in hand meanwhile must not wait for it.
                config = await asyncio.to_thread(load_config, self.config.path)
            except ConfigError as e:
                self.metrics.reloads["failure"] += 1
                errors = [str(p) for p in e.problems]
                event(
                    log,
                    logging.ERROR,
                    "reload",
                    f"reload failed, still serving the config loaded before: "
                    f"{len(errors)} error{'s' * (len(errors) != 1)}: " + "; ".join(errors),
                    result="failure",
                    errors=errors,
                )
                return ReloadResult(False, errors)
            # (key, its new address, the listener still on the old one)
            moved = [
                (key, new, listener)
                for key, new, bound, listener in zip(
                    ("listen", "admin.listen"),
                    (config.listen, config.admin_listen),
                    self._bound,
                    ("proxy", "admin"),
                    strict=True,
                )
                if new != bound
            ]
            restart = [key for key, _, _ in moved]
            changes = self.proxy.reconfigure(config.routes)
            configure_logs(config.log)  # before _access_log(), which asks the access log
            proxy_listener = self._listener
            if proxy_listener is not None:
                proxy_listener.timeouts = config.client_timeouts  # for connections from now on
                proxy_listener.finished = self._access_log()
            self.config = config
            self.metrics.reloads["success"] += 1
            self.metrics.last_reload_success = time.time()
            result = ReloadResult(True, changes=changes, restart_required=restart)
            by_kind = dataclasses.asdict(changes)
            summary = ", ".join(f"{len(names)} {what}" for what, names in by_kind.items() if names)
            event(
                log,
                logging.INFO,
                "reload",
                f"reloaded {config.path}: {summary}",
                result="success",
                **by_kind,
                restart_required=restart,
            )
            _warn(config)
            for key, new, listener in moved:
                log.warning(
                    "%s changed to %s: still listening on %s until restarted",
                    key,
                    new,
                    self.addresses[listener],
                )
            return result

    def breaker(self, name: str) -> Breaker | None:
        return next((b for b in self.proxy.breakers if b.name == name), None)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within `shutdown_grace`, clean up.

        One deadline for everything: what is still running at `shutdown_grace` is
        cut off then, so the process is gone within the grace it promised (aiohttp's
        own shutdown would wait up to twice its timeout, per listener).
        """
        self.health.ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        # The proxy first: the admin listener keeps answering /readyz (503) and
        # /metrics while the proxy drains.
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            # At the deadline, a request still waiting for a bulkhead slot is answered
            # (503, nothing was sent upstream) before the connections are cut off.
            await listener.drain(deadline, self.proxy.turn_away_queued)
        admin, self._admin = self._admin, None
        if admin is not None:
            await _drain(admin, deadline)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
            self.proxy.detach()


def _warn(config: Config) -> None:
    """Log what the config allows but users should know is unwise (at start and reload)."""
    for warning in config.warnings:
        event(log, logging.WARNING, "config_warning", warning, warning=warning)


async def _drain(runner: web.BaseRunner, deadline: float) -> None:
    """`runner.cleanup()`, but whatever is left at `deadline` is aborted."""
    loop = asyncio.get_running_loop()
    # Read by cleanup() for each connection's wait; set here, as reloads change the grace.
    # (Never 0, which aiohttp reads as "no limit".)
    set_shutdown_timeout(runner, max(0.001, deadline - loop.time()))
    server = runner.server
    cleanup = asyncio.ensure_future(runner.cleanup())
    await asyncio.wait([cleanup], timeout=max(0.0, deadline - loop.time()))
    if not cleanup.done() and server is not None:
        for connection in server.connections:
            if connection.transport is not None:
                connection.transport.abort()  # its handler is cancelled: nothing waits on it
    await cleanup


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
