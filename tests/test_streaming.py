"""Bodies stream both ways in bounded memory: a 1 GB transfer does not grow RSS."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp

from tests.conftest import StartSidecar, Upstream

GIGABYTE = 1 << 30
RSS_GROWTH_LIMIT = 16 << 20
"""A few MB of buffers, never the body: 16 MB is 1.5 % of what passes through."""


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def config(upstream: Upstream) -> str:
    return f"""
routes:
  - name: bulk
    match: {{path_prefix: /}}
    upstream: {upstream.url}
"""


async def test_one_gigabyte_download_in_bounded_memory(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream))
    # Warm up: the pools, buffers and code paths exist before the baseline is taken.
    async with http.get(f"{sc.proxy}/big/{8 << 20}") as response:
        async for _ in response.content.iter_any():
            pass
    before = rss()
    received = 0
    async with http.get(f"{sc.proxy}/big/{GIGABYTE}") as response:
        assert response.headers["Content-Length"] == str(GIGABYTE)
        async for chunk in response.content.iter_any():
            received += len(chunk)
    growth = rss() - before
    assert received == GIGABYTE
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MB"


async def test_one_gigabyte_upload_in_bounded_memory(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(config(upstream))
    chunk = b"u" * 65536

    async def body(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    async with http.post(f"{sc.proxy}/upload", data=body(8 << 20)) as response:
        assert (await response.json())["received"] == 8 << 20
    before = rss()
    async with http.post(f"{sc.proxy}/upload", data=body(GIGABYTE)) as response:
        seen = await response.json()
    growth = rss() - before
    assert seen["received"] == GIGABYTE
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MB"
