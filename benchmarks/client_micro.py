"""Issue 5's evidence for a leaner upstream client: aiohttp's ClientSession against a prototype.

    python benchmarks/client_micro.py [--rounds 5] [--requests 2000] [--sidecar]

With --sidecar, run it with PYTHONPATH pointing at the checkout whose
`sidecar.upstream` is to be measured (the `sidecar-send` row).

Starts benchmarks/upstream.py pinned to CPU 1, runs itself on CPU 0, and times
sequential keep-alive GETs two ways, interleaved, in CPU microseconds per
request (time.process_time, so only this process's own work counts):

    aiohttp-session   ClientSession.request + reading the body, configured as the
                      sidecar's (no cookies, no decompression, no auto headers)
    lean-prototype    one asyncio Protocol per connection writing the request by
                      hand and parsing the answer with aiohttp's own C
                      HttpResponseParser (chunked, Content-Length, limits): what a
                      leaner sidecar/upstream.py would be built on
    sidecar-send      (--sidecar) the sidecar's own upstream path: `sidecar.upstream.send()`
                      through the pool the app makes, the answer's events relayed
                      to a receiver that waits for its end

The prototype is not a client (no pool, timeouts, errors or retries): it is the
floor the real one would approach. Measured here: 264 against 120 us.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser

HERE = Path(__file__).resolve().parent
PATH = "/bench/item"


class _Connection(BaseProtocol):
    """One keep-alive connection; `exchange()` sends a GET and reads the whole answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._loop = loop
        self._parser: HttpResponseParser | None = None
        self._answer: asyncio.Future[aiohttp.StreamReader] | None = None

    def data_received(self, data: bytes) -> None:
        assert self._parser is not None and self._answer is not None
        messages, _upgraded, _tail = self._parser.feed_data(data)
        for _message, payload in messages:
            if not self._answer.done():
                self._answer.set_result(payload)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionResetError("the upstream closed"))

    async def exchange(self, transport: asyncio.Transport, head: bytes) -> None:
        self._parser = HttpResponseParser(
            self, self._loop, 2**16, max_line_size=65536, max_field_size=65536,
            response_with_body=True, auto_decompress=False,
        )  # fmt: skip
        self._answer = self._loop.create_future()
        transport.write(head)
        payload = await self._answer
        while await payload.readany():
            pass


async def lean(port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    transport, connection = await loop.create_connection(
        lambda: _Connection(loop), "127.0.0.1", port
    )
    head = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-A: 1\r\n\r\n".encode()
    try:
        for _ in range(n):
            await connection.exchange(transport, head)
    finally:
        transport.close()


async def via_session(session: aiohttp.ClientSession, port: int, n: int) -> None:
    url = f"http://127.0.0.1:{port}{PATH}"
    for _ in range(n):
        async with session.get(url, headers={"X-A": "1"}, allow_redirects=False) as response:
            async for _chunk in response.content.iter_any():
                pass


class _Whole:
    """A `sidecar.upstream.Receiver` that waits for the whole answer."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def upstream_head(self, status: int, reason: bytes, headers: object) -> None:
        pass

    def upstream_body(self, chunk: bytes) -> None:
        pass

    def upstream_end(self) -> None:
        self.done.set_result(None)

    def upstream_failed(self, error: Exception) -> None:
        self.done.set_exception(error)

    def upstream_writable(self, writable: bool) -> None:
        pass

    def crashed(self, error: Exception) -> None:
        self.done.set_exception(error)


async def via_sidecar(pool: Any, port: int, n: int) -> None:
    """`sidecar.upstream.send` as the proxy calls it: one request object, events back."""
    from sidecar import upstream

    origin = f"http://127.0.0.1:{port}"
    for _ in range(n):
        receiver = _Whole()
        request = upstream.UpstreamRequest(origin, b"GET", PATH.encode(), b"X-A: 1\r\n", None, 5.0)
        upstream.send(pool, request, receiver)
        await receiver.done


async def compare(
    port: int, rounds: int, requests: int, with_sidecar: bool
) -> dict[str, list[float]]:
    session = aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    sidecar_pool: Any = None
    if with_sidecar:
        from sidecar.timers import LoopTimers
        from sidecar.upstream_pool import Pool

        sidecar_pool = Pool(LoopTimers(asyncio.get_running_loop()))
    per_request: dict[str, list[float]] = {"aiohttp-session": [], "lean-prototype": []}
    if with_sidecar:
        per_request["sidecar-send"] = []
    try:
        await via_session(session, port, 200)
        await lean(port, 200)
        if with_sidecar:
            await via_sidecar(sidecar_pool, port, 200)
        for _ in range(rounds):
            for name, times in per_request.items():
                started = time.process_time()
                if name == "aiohttp-session":
                    await via_session(session, port, requests)
                elif name == "lean-prototype":
                    await lean(port, requests)
                else:
                    await via_sidecar(sidecar_pool, port, requests)
                times.append((time.process_time() - started) / requests * 1e6)
    finally:
        await session.close()
        if sidecar_pool is not None:
            await sidecar_pool.close()
    return per_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--sidecar", action="store_true", help="also time sidecar.upstream.send (sidecar-send)"
    )
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, str(HERE / "upstream.py"), "--port", str(port)]
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or upstream.poll() is not None:
                    print("client_micro.py: the upstream did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
        os.sched_setaffinity(0, {0})
        try:
            import uvloop

            results = uvloop.run(compare(port, args.rounds, args.requests, args.sidecar))
        except ImportError:
            results = asyncio.run(compare(port, args.rounds, args.requests, args.sidecar))
    finally:
        upstream.terminate()
        upstream.wait()
    print(f"{args.rounds} interleaved rounds x {args.requests} sequential GETs; CPU us per request")
    for name, times in results.items():
        rounded = " ".join(f"{t:.0f}" for t in times)
        print(f"{name:<16} median {statistics.median(times):5.0f}   rounds {rounded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
