"""Retries: a request body across tries (replayed, then continued; never left paused)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sidecar.upstream_pool import Pool
from tests.conftest import RawHandler, Running, StartSidecar, connect, eventually, read_request_head


class Keeping:
    """A keep-alive raw upstream: records (connection number, request line, body) and
    answers 200, except a request line starting with `hold` waits for `release`."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes, bytes]] = []
        self.heads: list[bytes] = []
        self.release = asyncio.Event()
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await read_request_head(reader)
                line = head.split(b"\r\n")[0]
                self.heads.append(line)
                length = 0
                for h in head.split(b"\r\n"):
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.seen.append((number, line, body))
                if line.startswith(b"GET /hold"):
                    await self.release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def refuse_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pool's next new connection is refused (as by an upstream restarting)."""
    real = Pool.connect
    calls: list[int] = []

    async def connect_(self: Pool, origin: object, timeout: float | None) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real(self, origin, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(Pool, "connect", connect_)
    return calls


async def keeping_sidecar(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], start_sidecar: StartSidecar
) -> tuple[Keeping, Running]:
    """A sidecar retrying once after 0.5 s (on the fake clock), to a `Keeping` upstream."""
    upstream = Keeping()
    url = await raw_upstream(upstream)
    sc = await start_sidecar(
        f"""
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {url}
    timeouts: {{request: 5s}}
    retry: {{attempts: 2, backoff: {{base: 1s, max: 1s}}}}
""",
        rand=lambda: 0.5,
        fake_timers=True,
    )
    return upstream, sc


async def test_the_body_resumes_when_the_retry_goes_on_a_pooled_connection(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    start_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Try 1 connects (not writable: the client's body is paused at its first chunk), is
    refused; during the backoff another request hands its connection back to the pool;
    try 2 is sent on it, writable at once, so no `upstream_writable(True)` will come: the
    retry itself resumes the client's body, and the upload ends whole (not in a 408)."""
    upstream, sc = await keeping_sidecar(raw_upstream, start_sidecar)
    r1, w1 = await connect(sc.proxy)
    w1.write(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    await r1.readuntil(b"ok")
    w1.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")  # takes the pooled connection
    await eventually(lambda: len(upstream.seen) == 2)
    refused = refuse_once(monkeypatch)

    r2, w2 = await connect(sc.proxy)
    w2.write(b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n" + b"a" * 1024)
    await eventually(lambda: len(refused) == 1)
    await eventually(lambda: sc.clock.set_for(0.5))  # try 1 refused: in the backoff
    upstream.release.set()  # /hold answers: its connection goes back to the pool
    await r1.readuntil(b"ok")
    await asyncio.sleep(0.05)
    w2.write(b"b" * 1024)  # the rest of the body
    await w2.drain()
    sc.clock.advance(0.5)  # try 2, on the pooled connection
    try:
        await eventually(lambda: any(line.startswith(b"PUT") for _, line, _ in upstream.seen))
        status = (await asyncio.wait_for(r2.readuntil(b"\r\n"), 5)).split()[1]
    finally:
        w1.close()
        w2.close()
    assert status == b"200"
    assert [body for _, line, body in upstream.seen if line.startswith(b"PUT")] == [
        b"a" * 1024 + b"b" * 1024
    ]


async def test_body_replayed_then_continued_when_the_retry_connects(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    start_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: the same, but try 2 connects anew (its connect resumes the body): whole."""
    upstream, sc = await keeping_sidecar(raw_upstream, start_sidecar)
    refused = refuse_once(monkeypatch)
    r2, w2 = await connect(sc.proxy)
    w2.write(b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Length: 61440\r\n\r\n" + b"a" * 1024)
    await eventually(lambda: len(refused) == 1)
    await eventually(lambda: sc.clock.set_for(0.5))
    w2.write(b"b" * 30000)
    sc.clock.advance(0.5)
    await asyncio.sleep(0.05)
    w2.write(b"c" * (61440 - 31024))
    try:
        status = (await asyncio.wait_for(r2.readuntil(b"\r\n"), 2)).split()[1]
    finally:
        w2.close()
    assert status == b"200"
    assert [body for _, _, body in upstream.seen] == [
        b"a" * 1024 + b"b" * 30000 + b"c" * (61440 - 31024)
    ]
