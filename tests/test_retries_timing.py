"""Retries: the backoff's formula; what is kept for a replay, and for how long."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.conftest import (
    RawHandler,
    StartSidecar,
    connect,
    eventually,
    fetch,
    read_request_head,
)
from tests.test_retries import route


async def test_first_backoff_cap_is_base_times_2_as_the_contract_writes(
    start_sidecar: StartSidecar, closed_port: int, http: object
) -> None:
    """The contract: "wait uniform(0, min(max, base * 2^n)) before try n+1": before try 2
    (n = 1) the cap is 2 x base = 200 ms, not base."""
    sc = await start_sidecar(
        route(f"http://127.0.0.1:{closed_port}", "{attempts: 2, backoff: {base: 100ms, max: 1s}}"),
        rand=lambda: 0.5,
        fake_timers=True,
    )
    task = asyncio.create_task(fetch(http, sc))  # type: ignore[arg-type]
    try:
        await eventually(lambda: sc.clock.set_for(0.1) or sc.clock.set_for(0.05), 2)
        assert sc.clock.set_for(0.1)  # 0.5 x 200 ms
    finally:
        sc.clock.advance(1)
        await task


async def test_a_body_that_can_never_be_replayed_is_not_kept(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], start_sidecar: StartSidecar
) -> None:
    """A POST without Idempotency-Key is never retried, so its body is not kept; nor is
    any body kept after the answer's head, while the answer streams."""
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await reader.readexactly(1000)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")  # half the body
        await writer.drain()
        await go.wait()
        writer.close()

    sc = await start_sidecar(route(await raw_upstream(handler), "{}"), fake_timers=True)
    reader, writer = await connect(sc.proxy)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
    conn = await sc.client_connection()
    await reader.readuntil(b"ab")
    exchange = conn._active.listener  # type: ignore[union-attr]
    kept = exchange._kept  # type: ignore[union-attr]
    go.set()
    writer.close()
    assert kept is None
