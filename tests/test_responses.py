"""The response heads the sidecar writes itself, byte for byte.

Its own answers (errors, rejections, refusals) are compared with aiohttp's for
the same answer, `Date` aside, and without the `Server` header aiohttp adds:
the sidecar sends none of its own (the contract's "Hardening"). A forwarded
answer carries exactly what the upstream sent, less hop-by-hop headers, plus
framing, `Date` where the upstream sent none, and `Connection` where the version
needs it: never an invented `Content-Type` or `Server`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import RawHandler, StartSidecar, raw_exchange, read_request_head

DATE = re.compile(rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def dateless(answer: bytes) -> bytes:
    """`answer` with its one Date header's value blanked (and no Server header)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    head = re.sub(rb"\r\nServer: [^\r\n]*", b"", head + b"\r\n")
    assert len(DATE.findall(head)) == 1, head
    return DATE.sub(b"\r\nDate: -\r\n", head)[:-2] + sep + body


AIOHTTP_ANSWERS: dict[str, web.Response] = {}


@pytest.fixture
async def aiohttp_answers() -> AsyncIterator[str]:
    """An aiohttp server answering /<name> with `AIOHTTP_ANSWERS[name]`, made afresh."""

    async def answer(request: web.Request) -> web.Response:
        kind = request.match_info["name"]
        made = made_by_aiohttp(kind)
        if "close" in request.query:
            made.force_close()
        return made

    app = web.Application()
    app.router.add_get("/{name}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


def made_by_aiohttp(kind: str) -> web.Response:
    body, status, headers = {
        "no_route": (b'{"error":"no_route"}', 404, None),
        "unreachable": (b'{"error":"upstream_unreachable","route":"api"}', 502, None),
        "open": (
            b'{"error":"circuit_open","route":"api","retry_after":10}',
            503,
            {"Retry-After": "10"},
        ),
        "bad_request": (b'{"error":"bad_request"}', 400, None),
        "version": (b'{"error":"http_version_not_supported"}', 505, None),
    }[kind]
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def get(base: str, path: str, version: str = "1.1", close: bool = True) -> bytes:
    head = f"GET {path} HTTP/{version}\r\nHost: svc\r\n"
    if close:
        head += "Connection: close\r\n"
    return await raw_exchange(base, (head + "\r\n").encode())


ROUTES = """
routes:
  - name: api
    match: {{path_prefix: /api}}
    upstream: http://127.0.0.1:{port}
    breaker: {{failure_threshold: 1, open_duration: 10s, jitter: 0%}}
"""


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_the_sidecars_own_answers_are_aiohttps_byte_for_byte(
    start_sidecar: StartSidecar, aiohttp_answers: str, closed_port: int, version: str
) -> None:
    sc = await start_sidecar(ROUTES.format(port=closed_port))
    close = version == "1.1"  # (an HTTP/1.0 request closes without saying so)
    ours = {
        "no_route": await get(sc.proxy, "/nowhere", version, close),
        "unreachable": await get(sc.proxy, "/api/x", version, close),  # and it opens
        "open": await get(sc.proxy, "/api/x", version, close),
    }
    for kind, answer in ours.items():
        theirs = await get(aiohttp_answers, f"/{kind}", version, close)
        assert dateless(answer) == dateless(theirs), kind


@pytest.mark.parametrize(
    ("request_bytes", "kind"),
    [
        (b"GET /x HTTP/1.1\r\nX: a\x00b\r\n\r\n", "bad_request"),
        (b"GET /x HTTP/2.0\r\nHost: svc\r\n\r\n", "version"),
    ],
)
async def test_the_listeners_refusals_are_aiohttps_byte_for_byte(
    start_sidecar: StartSidecar,
    aiohttp_answers: str,
    closed_port: int,
    request_bytes: bytes,
    kind: str,
) -> None:
    sc = await start_sidecar(ROUTES.format(port=closed_port))
    ours = await raw_exchange(sc.proxy, request_bytes)
    theirs = await get(aiohttp_answers, f"/{kind}?close=1", close=False)
    assert dateless(ours) == dateless(theirs)


# -- forwarded answers: what the upstream sent, and only what the contract adds ------------


@pytest.fixture
async def scripted(
    raw_upstream: Callable[[RawHandler], Awaitable[str]],
) -> Callable[[bytes], Awaitable[str]]:
    """A raw upstream answering every request with the given bytes, then closing."""

    async def start(answer: bytes) -> str:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request_head(reader)
            writer.write(answer)
            await writer.drain()
            writer.close()

        return await raw_upstream(handler)

    return start


CATCH_ALL = "routes:\n  - {{name: api, match: {{path_prefix: /}}, upstream: '{url}'}}\n"


async def test_no_content_type_or_server_is_invented_for_an_answer_without_them(
    start_sidecar: StartSidecar, scripted: Callable[[bytes], Awaitable[str]]
) -> None:
    """It once arrived with `Content-Type: application/octet-stream` (and aiohttp's Server)."""
    url = await scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
    sc = await start_sidecar(CATCH_ALL.format(url=url))
    answer = await get(sc.proxy, "/x")
    assert dateless(answer) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nDate: -\r\nConnection: close\r\n\r\nok"
    )


async def test_an_answer_keeps_its_own_headers_in_order_and_its_own_date(
    start_sidecar: StartSidecar, scripted: Callable[[bytes], Awaitable[str]]
) -> None:
    head = (
        b"HTTP/1.1 201 Made Up Reason\r\nX-B: 1\r\ncontent-type: text/odd\r\n"
        b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nServer: upstream/1\r\nX-B: 2\r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nabc"
    )
    sc = await start_sidecar(CATCH_ALL.format(url=await scripted(head)))
    answer = await get(sc.proxy, "/x")
    assert answer == (
        b"HTTP/1.1 201 Made Up Reason\r\nX-B: 1\r\ncontent-type: text/odd\r\n"
        b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nServer: upstream/1\r\nX-B: 2\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc"
    )


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1.1", b"HTTP/1.1 200 OK\r\nDate: -\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        # HTTP/1.0 has no chunked framing: the body ends with the connection.
        ("1.0", b"HTTP/1.0 200 OK\r\nDate: -\r\n\r\nhello"),
    ],
)  # fmt: skip
async def test_an_answer_of_unknown_length_is_framed_for_the_clients_version(
    start_sidecar: StartSidecar,
    scripted: Callable[[bytes], Awaitable[str]],
    version: str,
    expected: bytes,
) -> None:
    url = await scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    sc = await start_sidecar(CATCH_ALL.format(url=url))
    assert dateless(await get(sc.proxy, "/x", version)) == expected
