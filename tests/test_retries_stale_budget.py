"""Retries: the stale resend under a policy; the budget's window."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from fractions import Fraction

import pytest

from sidecar.policies import RetryBudget, RetrySettings
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


def test_budget_admits_twice_its_floor_within_ten_seconds() -> None:
    """ratio 0 %, min_per_second 1: at most 10 retries in any 10 s (the contract). The
    one-second buckets forget second 0 whole at t = 10.0, so 20 pass within 9.01 s."""
    settings = RetrySettings(
        3, frozenset(), frozenset(), frozenset(), None, None, 0.025, 0.25, Fraction(0), 1.0, 1
    )
    now = [0.99]
    budget = RetryBudget(settings, lambda: now[0])
    granted = 0
    for t in (0.99, 10.0):
        now[0] = t
        while budget.admits():
            budget.withdraw()
            granted += 1
    assert granted <= 10
