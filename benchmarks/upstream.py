"""The benchmark's upstream: answers every request with a fixed 100-byte body.

    python benchmarks/upstream.py --port 18090

`compare.py` starts it pinned to CPU 0 (`taskset -c 0`), next to the proxy under
test, so every forwarding setup shares that core with the same upstream.
Runs on uvloop where it is installed.
"""

from __future__ import annotations

from aiohttp import web
from servekit import arguments, catch_all, serve

BODY = b"x" * 99 + b"\n"
assert len(BODY) == 100


async def handle(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=BODY, content_type="text/plain")


def main() -> None:
    serve(catch_all(handle), arguments(__doc__ or ""))


if __name__ == "__main__":
    main()
