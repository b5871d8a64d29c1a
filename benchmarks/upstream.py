"""The benchmark's upstream: answers every request with a fixed 100-byte body.

    python benchmarks/upstream.py --port 18090

`compare.py` starts it pinned to CPU 0 (`taskset -c 0`), next to the proxy under
test, so every forwarding setup shares that core with the same upstream.
Runs on uvloop where it is installed.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

BODY = b"x" * 99 + b"\n"
assert len(BODY) == 100


async def handle(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=BODY, content_type="text/plain")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=new_loop())


if __name__ == "__main__":
    main()
