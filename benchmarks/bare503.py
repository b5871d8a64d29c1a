"""The OPEN-route baseline: a bare aiohttp app whose catch-all handler returns 503.

    python benchmarks/bare503.py --port 18083

The response has the same shape as the sidecar's answer from an OPEN route
(JSON body, `Retry-After`), made as cheaply as aiohttp allows: the floor an
OPEN route's rejection is compared against. Runs on uvloop where it is installed.
"""

from __future__ import annotations

from aiohttp import web
from servekit import arguments, catch_all, serve


async def handle(request: web.BaseRequest) -> web.Response:
    return web.Response(
        status=503,
        body=b'{"error":"circuit_open","route":"bench","retry_after":30}',
        content_type="application/json",
        headers={"Retry-After": "30"},
    )


def main() -> None:
    serve(catch_all(handle), arguments(__doc__ or ""))


if __name__ == "__main__":
    main()
