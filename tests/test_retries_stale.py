"""Retries: the stale resend under a retry policy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import RawHandler, StartSidecar, connect
from tests.test_exchange import Numbered, get


@pytest.mark.parametrize("retry", ["", "    retry: {attempts: 1}\n"])
async def test_stale_resend_survives_a_policy_of_attempts_1(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
    start_sidecar: StartSidecar,
    retry: str,
) -> None:
    """A keep-alive race (the pooled connection closes unanswered) is resent without a
    policy; `retry: {attempts: 1}` ("1 = no retry") must not make it a 502."""

    async def answer(number: int, _line: bytes) -> bytes | None:
        if len(upstream.seen) == 2:
            return None  # the second request, on the pooled connection: closed unanswered
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % number

    upstream = Numbered(answer)
    url = await raw_upstream(upstream)
    sc = await start_sidecar(
        f"routes:\n  - name: api\n    match: {{path_prefix: /}}\n    upstream: {url}\n" + retry,
        fake_timers=True,
    )
    reader, writer = await connect(sc.proxy)
    try:
        await get(reader, writer, "/first")
        second = await get(reader, writer, "/second")
    finally:
        writer.close()
    assert second.startswith(b"HTTP/1.1 200 ")
