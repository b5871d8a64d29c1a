"""Issues 14 and 15's micro-benchmark: what the traffic policies, and a retry policy, add
to a request, in one process.

    python benchmarks/policy_micro.py [--rounds 7] [--requests 20000] [--forward-us US]

Route `api` five ways: without policies (`plain`); with all four (`policies`: a rate
limit that never limits, a bulkhead never full, a fallback, a recovery ramp, not
ramping); with a retry policy of every default (`retry`: `retry: {}`, a healthy
upstream, nothing retried); rate-limited (`rate-limited`: 1/h, burst 1, its token spent:
429s); and OPEN (`open`: failure_threshold 1, open 1h, tripped: 503s). Two harnesses, CPU
time per request (time.process_time):

- handle: `Proxy.handle` alone on a stub request, with `Exchange` swapped for a stand-in
  that ends at once as `Exchange._close` ends a request (the permit released, then the
  bulkhead slot): routing, the `Target.policed` branch (`TokenBucket.take`,
  `Bulkhead.try_enter`, `Breaker.acquire`), the slot's release; or the rejection's
  answer looked up and counted. A retry policy's work is all in the exchange, so here
  `retry` - `plain` is a control: it should be 0 within the noise.
- path: path_micro.py's harness, the sidecar's real objects from the client's bytes to
  the answer written, with transports that only collect. `plain` there is the CPU a
  forwarded request costs in this run, without syscalls (less than the whole proxy's CPU
  per request, so a stricter denominator for the 5 % bar).

The setups take turns in blocks of 200 requests, in an order that rotates each block;
each round adds up its blocks. The report gives medians over the rounds, and for each
pair the median and range of the per-round differences. Issue 14's bars: the added work
(`policies` - `plain`, the larger of the two harnesses') at most 5 % of the forwarding
CPU per request; a 429 (`rate-limited`) no costlier than a 503 from `open`. Issue 15's:
the added work of `retry` - `plain` (the larger of the two) at most 3 % of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from compare import POLICIES, RATE_LIMITED, RESULTS_MD, RETRY
from path_micro import ANSWER, REQUEST, Sidecar, Transport, sidecar_objects, timed
from servekit import new_loop

from sidecar import proxy as proxy_module
from sidecar.breaker import Permit
from sidecar.policies import Bulkhead

OPEN = "    breaker: {failure_threshold: 1, open_duration: 1h}\n"
SETTINGS = {
    "plain": "",
    "policies": "".join(line + "\n" for line in POLICIES),  # compare.py's sidecar-policies
    "retry": "".join(line + "\n" for line in RETRY),  # compare.py's sidecar-retry
    "rate-limited": "".join(line + "\n" for line in RATE_LIMITED),
    "open": OPEN,
}
STATUS = {"plain": 200, "policies": 200, "retry": 200, "rate-limited": 429, "open": 503}
"""What each setup answers: forwarded (200), or rejected by the sidecar."""
PAIRS = (("policies", "plain"), ("retry", "plain"), ("rate-limited", "open"))
BLOCK = 200
"""Requests a setup takes in turn: fine-grained, so that a setup's figure and the next's
share the machine's state (on this VM a setup measured alone for a second or more drifts by
several %, far more than what is measured here)."""
BAR = 0.05
"""Issue 14: the policies' added work, as a share of the forwarding CPU per request."""
RETRY_BAR = 0.03
"""Issue 15: a retry policy's added work (healthy upstream, nothing retried), the same way."""


def route(loop: asyncio.AbstractEventLoop, name: str) -> Sidecar:
    """The harness for one setup; `rate-limited` with its token spent, `open` tripped."""
    s = sidecar_objects(loop, SETTINGS[name])
    target = s.proxy.targets[0]
    if name == "rate-limited":
        assert target.bucket.take() == 0.0
    elif name == "open":
        permit = target.breaker.acquire()
        assert isinstance(permit, Permit)
        permit.failed()
    return s


class EndsAtOnce:
    """Stands in for `Exchange`: ends the request as `Exchange._close` does with no
    outcome, the permit released, then the bulkhead slot (last, as there)."""

    def __init__(
        self, _request: Any, _target: Any, permit: Permit, _env: Any, slot: Bulkhead | None = None
    ) -> None:
        self._permit = permit
        self._slot = slot

    def start(self, _path: bytes, _host: bytes | None) -> None:
        self._permit.released()
        if self._slot is not None:
            self._slot.release()


class StubRequest:
    """What `Proxy.handle` reads of a request, and the answer it gives (kept, not sent)."""

    method = b"GET"
    target = b"/api/item?id=7"
    host = b"127.0.0.1:8080"
    noted = 0
    upgrade_tail = None
    route: str | None = None
    status = 200
    """What it was answered; 200: nothing answered it, it was forwarded (the stand-in ended it)."""

    def answer(self, status: int, *_rest: object, close: bool = False) -> None:
        self.status = status


@contextlib.contextmanager
def exchanges_end_at_once() -> Iterator[None]:
    real = proxy_module.Exchange
    proxy_module.Exchange = EndsAtOnce  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        proxy_module.Exchange = real  # type: ignore[misc]


def handle_run(s: Sidecar, status: int) -> Callable[[int], None]:
    """`n` requests through `Proxy.handle` alone; each must end as `status` says."""
    handle = s.proxy.handle
    request = StubRequest()

    def run(n: int) -> None:
        with exchanges_end_at_once():
            for _ in range(n):
                handle(request)
        assert request.status == status, (request.status, status)  # and nothing else happened

    run(1)
    return run


def path_run(s: Sidecar, status: int) -> tuple[Callable[[], None], tuple[Transport, ...]]:
    """One request through the whole path: a forwarded one gets the upstream's answer, a
    rejected one is answered by the sidecar alone."""
    client, upstream = s.client, s.upstream
    transports = (s.client_transport, s.upstream_transport)

    def forwarded() -> None:
        client.data_received(REQUEST)
        upstream.data_received(ANSWER)

    def rejected() -> None:
        client.data_received(REQUEST)

    one = forwarded if status == 200 else rejected
    one()
    answer = s.client_transport.written[-1]
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:40]
    return one, transports


def whole_proxy_forward_us() -> float | None:
    """`sidecar-forward`'s CPU per request in RESULTS.md's throughput table (the last full
    compare.py run): the whole proxy's, syscalls included."""
    with contextlib.suppress(OSError):
        column = None
        for line in RESULTS_MD.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if "cpu us/req" in cells:
                column = cells.index("cpu us/req")
            elif column is not None and cells[0] == "sidecar-forward":
                with contextlib.suppress(ValueError, IndexError):
                    return float(cells[column])
    return None


def median_and_range(values: list[float], digits: int, sign: str = "") -> str:
    return (
        f"{statistics.median(values):{sign}.{digits}f}, per round "
        f"{min(values):{sign}.{digits}f}..{max(values):{sign}.{digits}f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--requests", type=int, default=20000, help="per setup and round, in blocks of 200"
    )
    parser.add_argument(
        "--forward-us",
        type=float,
        default=whole_proxy_forward_us(),
        help="the whole proxy's CPU per forwarded request (default: RESULTS.md's sidecar-forward)",
    )
    args = parser.parse_args()
    loop = new_loop()
    asyncio.set_event_loop(loop)
    names = list(SETTINGS)
    handles = {n: handle_run(route(loop, n), STATUS[n]) for n in names}
    paths = {n: path_run(route(loop, n), STATUS[n]) for n in names}
    blocks = max(1, args.requests // BLOCK)
    handle_ns: dict[str, list[float]] = {n: [] for n in names}
    path_us: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm up
        handles[n](BLOCK)
        timed(*paths[n], BLOCK)
    for _ in range(args.rounds):
        handle_s = dict.fromkeys(names, 0.0)
        path_s = dict.fromkeys(names, 0.0)
        for b in range(blocks):
            for n in names[b % len(names) :] + names[: b % len(names)]:
                started = time.process_time()
                handles[n](BLOCK)
                handle_s[n] += time.process_time() - started
                path_s[n] += timed(*paths[n], BLOCK)
        for n in names:
            handle_ns[n].append(handle_s[n] / (blocks * BLOCK) * 1e9)
            path_us[n].append(path_s[n] / blocks)

    print(
        f"{args.rounds} rounds x {blocks * BLOCK} requests a setup, interleaved in blocks of "
        f"{BLOCK}; CPU per request, median over the rounds"
    )
    print(f"{'setup':<13} {'status':>6} {'handle ns':>10} {'path us':>8}")
    for n in names:
        print(
            f"{n:<13} {STATUS[n]:>6} {statistics.median(handle_ns[n]):10.0f}"
            f" {statistics.median(path_us[n]):8.2f}"
        )
    forward = statistics.median(path_us["plain"])
    added: dict[str, float] = {}
    for a, b in PAIRS:
        for harness, values, scale in (("handle", handle_ns, 1.0), ("path", path_us, 1e3)):
            diffs = [(x - y) * scale for x, y in zip(values[a], values[b], strict=True)]
            ratios = [x / y for x, y in zip(values[a], values[b], strict=True)]
            added[f"{harness} {a}"] = statistics.median(diffs)
            print(
                f"{harness:<6} {a} - {b}: {median_and_range(diffs, 0, '+')} ns; "
                f"ratio {statistics.median(values[a]) / statistics.median(values[b]):.3f}, "
                f"per round {min(ratios):.3f}..{max(ratios):.3f}"
            )

    def added_work(label: str, setup: str, bar: float) -> None:
        worst = max(added[f"handle {setup}"], added[f"path {setup}"])
        share = worst / 1e3 / forward
        print(
            f"{label}, {setup} added work <= {bar:.0%} of forwarding: {worst:.0f} ns is "
            f"{share:.1%} of this run's in-process path ({forward:.2f} us): "
            f"{'PASS' if share <= bar else 'FAIL'}"
        )
        if args.forward_us:
            whole = worst / 1e3 / args.forward_us
            print(
                f"      and {whole:.1%} of the whole proxy's {args.forward_us:g} us CPU per "
                f"forwarded request (--forward-us; default RESULTS.md): "
                f"{'PASS' if whole <= bar else 'FAIL'}"
            )

    added_work("bar 1", "policies", BAR)
    costlier = max(
        statistics.median(values["rate-limited"]) / statistics.median(values["open"])
        for values in (handle_ns, path_us)
    )
    print(
        f"bar 2, a 429 no costlier than a 503 from OPEN: rate-limited / open {costlier:.3f} "
        f"(the larger of the two harnesses): {'PASS' if costlier <= 1.0 else 'FAIL'}"
    )
    added_work("bar 3 (issue 15)", "retry", RETRY_BAR)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
