"""The OPEN-route baseline: a bare aiohttp app whose catch-all handler returns 503.

    python benchmarks/bare503.py --port 18083

The response has the same shape as the sidecar's answer from an OPEN route
(JSON body, `Retry-After`), made as cheaply as aiohttp allows: the floor an
OPEN route's rejection is compared against. Runs on uvloop where it is installed.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def handle(request: web.BaseRequest) -> web.Response:
    return web.Response(
        status=503,
        body=b'{"error":"circuit_open","route":"bench","retry_after":30}',
        content_type="application/json",
        headers={"Retry-After": "30"},
    )


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
