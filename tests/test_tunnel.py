"""`Tunnel` alone, on a fake clock, with stand-ins for its two sides: what only the
relay decides (the socket-level behaviour is in test_websocket and test_proxy_mode)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.tunnel import FLUSH_TIMEOUT, Tunnel
from tests.fakes import FakeClock


@dataclass
class Side:
    """What a tunnel does to one of its sides."""

    written: list[bytes] = field(default_factory=list)
    closed: bool = False
    aborted: bool = False
    reading: bool = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write_eof(self) -> bool:
        return True


def tunnel(clock: FakeClock, idle: float = 30.0) -> tuple[Tunnel, Side, list[str]]:
    ended: list[str] = []
    relay = Tunnel(clock, idle, lambda: ended.append("ended"))
    upstream = Side()
    relay.upstream = upstream  # type: ignore[assignment]
    return relay, upstream, ended


def test_the_idle_time_runs_from_the_opening_not_from_the_connect() -> None:
    """A CONNECT's tunnel exists while the upstream connects; however long that takes,
    its silence is counted from when both sides are open."""
    clock = FakeClock()
    relay, _upstream, ended = tunnel(clock)
    clock.advance(45)  # a slow connect, longer than the idle timeout
    assert ended == []
    client = Side()
    relay.client_open(client)  # type: ignore[arg-type]
    clock.advance(29)
    assert ended == []
    relay.from_client(b"x")  # traffic moves the deadline
    clock.advance(29)
    assert ended == []
    clock.advance(2)
    assert ended == ["ended"]
    assert client.closed


def test_what_the_upstream_sends_before_the_client_side_opens_waits_for_it() -> None:
    """A server that speaks first (a banner) before the client has its 200: kept, with
    reading from the upstream paused, then written first once the client's side opens."""
    clock = FakeClock()
    relay, upstream, _ended = tunnel(clock)
    relay.from_upstream(b"220 banner\r\n")
    assert not upstream.reading
    client = Side()
    relay.client_open(client)  # type: ignore[arg-type]
    assert client.written == [b"220 banner\r\n"]
    assert upstream.reading


def test_a_side_left_closing_is_cut_off_after_the_flush_timeout() -> None:
    """The client goes: the upstream is closed (what was written to it goes out first),
    and aborted `FLUSH_TIMEOUT` later whatever became of that."""
    clock = FakeClock()
    relay, upstream, ended = tunnel(clock)
    relay.client_open(Side())  # type: ignore[arg-type]
    relay.client_closed()
    assert (upstream.closed, upstream.aborted, ended) == (True, False, ["ended"])
    clock.advance(FLUSH_TIMEOUT - 1)
    assert not upstream.aborted
    clock.advance(1)
    assert upstream.aborted
