"""The forwarding baseline: the smallest reasonable aiohttp reverse proxy.

    python benchmarks/minimal_proxy.py --port 18082 --upstream http://127.0.0.1:18090

One shared `ClientSession` (no decompression), one catch-all route; it forwards
the method, the path with its query and the headers, streams the request body
up and the response body down, and does nothing else: no routing table, no
breaker, no metrics, no timeouts, no error mapping. Only the hop-by-hop headers
are dropped, which correct HTTP needs (a copied `Transfer-Encoding` would
double-chunk the body). Runs on uvloop where it is installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from servekit import arguments, catch_all, serve
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _copy(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in HOP_BY_HOP:
        out.popall(name, None)
    return out


def make_app(upstream: str) -> web.Application:
    origin = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        async with request.app[SESSION].request(
            request.method,
            URL(origin + request.raw_path, encoded=True),
            headers=_copy(request.headers),
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=_copy(upstream.headers)
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = catch_all(handle)
    app.cleanup_ctx.append(session_ctx)
    return app


def main() -> None:
    args = arguments(__doc__ or "", upstream=True)
    serve(make_app(args.upstream), args)


if __name__ == "__main__":
    main()
