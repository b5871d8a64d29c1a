"""The proxy listener: aiohttp's low-level server, plus the client deadline it lacks.

aiohttp closes a connection that waits too long for its next request (its
keep-alive timeout, which also runs from accept), but has no deadline for a
request whose headers trickle in: a slowloris client sending a header byte now
and then would hold its connection as long as the keep-alive timeout allows,
and thousands of them hold thousands of sockets. Here the first byte of every
request starts a header timer; the request reaching the handler stops it; if
it fires first, the client gets a 408 and its connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ProxyServer"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 28\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b'{"error":"header_timeout"}\r\n'
)


class ProxyServer(web.Server):
    """`web.Server` whose connections enforce `header_timeout` on every request."""

    def __init__(self, handler: Handler, *, header_timeout: float, **kwargs: Any) -> None:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            connection = request.protocol
            if isinstance(connection, _Connection):
                connection.headers_received()
            try:
                return await handler(request)
            finally:
                if isinstance(connection, _Connection):
                    connection.request_done()

        super().__init__(handle, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        # `_kwargs` is what web.Server itself passes to each RequestHandler.
        return _Connection(self, header_timeout=self._header_timeout, **self._kwargs)


class _Connection(RequestHandler):
    """One client connection; times the arrival of each request's headers."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def data_received(self, data: bytes) -> None:
        # Bytes while no request is being handled are the head of the next one.
        if data and self._header_timer is None and not self._in_request:
            self._header_timer = asyncio.get_running_loop().call_later(
                self._header_timeout, self._header_timed_out
            )
        super().data_received(data)

    def headers_received(self) -> None:
        self._in_request = True
        self._stop_timer()

    def request_done(self) -> None:
        self._in_request = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._in_request or self.transport is None:
            return
        self.transport.write(_HEADER_TIMEOUT_RESPONSE)
        self.force_close()
