"""What the benchmark servers share: their command line, and serving on uvloop, unlogged."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def arguments(description: str, *, upstream: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    if upstream:
        parser.add_argument(
            "--upstream", required=True, help="origin to forward to, http://HOST:PORT"
        )
    return parser.parse_args()


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def catch_all(handler: Handler) -> web.Application:
    """An `Application` whose one route takes every method and path, as the baselines need."""
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    return app


def serve(app: web.Application, args: argparse.Namespace) -> None:
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=new_loop())
