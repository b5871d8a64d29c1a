"""Byte relays: a WebSocket session after its 101, a CONNECT tunnel after its 200.

A `Tunnel` joins the client's connection (handed over by the listener: see
`Request.upgrade`) and an upstream connection (taken over from the pool: see
`Connection.take_over`), and moves bytes both ways as they come, never holding
more than one read in hand: when one side cannot take more (its socket's buffer
is full), reading from the other side pauses until it drains. It ends when
either side closes or resets (the other side is then closed, once what was
written to it is out), or when neither side has sent a byte for the idle
timeout. A client's half-close (its last byte sent, its reading side still
open) is passed on where the upstream's transport can (plain TCP; not TLS), so
a client that says "that was all" still hears the answer; the upstream's end,
half or whole, ends the tunnel. It knows nothing of WebSocket frames: the bytes are opaque, so
extensions, pings and close codes pass as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sidecar.timers import Timer, Timers

if TYPE_CHECKING:
    from sidecar.listener import Channel
    from sidecar.upstream_pool import Connection

__all__ = ["FLUSH_TIMEOUT", "Tunnel"]

FLUSH_TIMEOUT = 60.0
"""Seconds a side closed by the tunnel's end may take to take what was written to it
(the client write timeout's default), before it is cut off."""


class Tunnel:
    """One relay between a client and an upstream; see the module's docstring."""

    __slots__ = (
        "_channel",
        "_ended",
        "_idle",
        "_last",
        "_on_end",
        "_pending",
        "_timer",
        "_timers",
        "client_side",
        "upstream",
        "upstream_side",
    )

    def __init__(self, timers: Timers, idle: float, on_end: Callable[[], None]) -> None:
        """`idle`: seconds of silence both ways that end it; `on_end`: called once, at its
        end (the session count)."""
        self._timers = timers
        self._idle = idle
        self._on_end = on_end
        self._channel: Channel | None = None
        self.upstream: Connection | None = None
        self._pending: list[bytes] | None = None
        """What the upstream sent before the client's side was open."""
        self._ended = False
        self._last = 0.0
        self._timer: Timer | None = None
        """The idle timeout's, from the moment both sides are open."""
        self.client_side = _ClientSide(self)
        """The `Relay` the listener hands the client's bytes to."""
        self.upstream_side = _UpstreamSide(self)
        """The `Relay` the upstream connection hands its bytes to."""

    # -- the client's side -------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._ended

    def client_open(self, channel: Channel) -> None:
        pending, self._pending = self._pending, None
        for data in pending or ():
            channel.write(data)
        if self._ended:
            self._shut(channel)  # the upstream has been and gone: what it said, then the end
            return
        self._channel = channel
        self._last = self._timers.time()
        self._timer = self._timers.call_at(self._last + self._idle, self._idle_check)
        if pending is not None and self.upstream is not None:
            self.upstream.resume_reading()

    def from_client(self, data: bytes) -> None:
        self._last = self._timers.time()
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)

    def client_eof(self) -> bool:
        """The client half-closed: so does the upstream's side, if it can (else the
        whole tunnel closes), and the upstream's answer still comes back."""
        upstream = self.upstream
        return upstream is not None and upstream.write_eof()

    def client_closed(self) -> None:
        self._channel = None
        self._closed(self.upstream)

    def client_writable(self, writable: bool) -> None:
        _follow(self.upstream, writable)

    # -- the upstream's side -----------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self._last = self._timers.time()
        channel = self._channel
        if channel is not None:
            channel.write(data)
            return
        if self._pending is None:
            self._pending = []
        self._pending.append(data)
        if self.upstream is not None:
            self.upstream.pause_reading()  # until the client's side is open

    def upstream_closed(self) -> None:
        self.upstream = None
        self._closed(self._channel)

    def upstream_writable(self, writable: bool) -> None:
        _follow(self._channel, writable)

    # -- the end -----------------------------------------------------------------------

    def _closed(self, other: _Side | None) -> None:
        """One side closed: so does `other`, once what was written to it is out."""
        if other is not None:
            self._shut(other)
        self._end()

    def _shut(self, side: _Side) -> None:
        """Close `side` once what was written to it is out, but no later than
        `FLUSH_TIMEOUT` from now: a peer that stopped reading must not keep it open for
        ever (nothing else would close it: the tunnel has ended)."""
        side.close()
        self._timers.call_at(self._timers.time() + FLUSH_TIMEOUT, side.abort)

    def close(self) -> None:
        """End it from outside (a client that never got its answer): both sides closed."""
        upstream = self.upstream
        if upstream is not None:
            upstream.abort()
        self.upstream = None
        self._end()

    def _idle_check(self) -> None:
        self._timer = None
        if self._ended:
            return
        deadline = self._last + self._idle
        if self._timers.time() < deadline:
            self._timer = self._timers.call_at(deadline, self._idle_check)
            return
        channel, self._channel = self._channel, None
        if channel is not None:
            self._shut(channel)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self._shut(upstream)
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_end()


class _Side(Protocol):
    """Either end of a tunnel: the client's `Channel`, the upstream's `Connection`."""

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _follow(side: _Side | None, writable: bool) -> None:
    """Reading from `side` follows whether the other side can take more."""
    if side is not None:
        if writable:
            side.resume_reading()
        else:
            side.pause_reading()


class _ClientSide:
    """The listener's `Relay`: the client's bytes and flow, to the tunnel."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def relay_open(self, channel: Channel) -> None:
        self._tunnel.client_open(channel)

    def relay_data(self, data: bytes) -> None:
        self._tunnel.from_client(data)

    def relay_eof(self) -> bool:
        return self._tunnel.client_eof()

    def relay_closed(self) -> None:
        self._tunnel.client_closed()

    def relay_writable(self, writable: bool) -> None:
        self._tunnel.client_writable(writable)


class _UpstreamSide:
    """The upstream connection's `Relay`: its bytes and flow, to the tunnel."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def relay_open(self, channel: Channel) -> None:  # (never called: no upgrade upstream)
        pass

    def relay_data(self, data: bytes) -> None:
        self._tunnel.from_upstream(data)

    def relay_eof(self) -> bool:
        return False  # the upstream's end is the tunnel's (it closes with either side)

    def relay_closed(self) -> None:
        self._tunnel.upstream_closed()

    def relay_writable(self, writable: bool) -> None:
        self._tunnel.upstream_writable(writable)
