"""The answers the sidecar makes itself: JSON errors, their header lines, their reasons.

Every sidecar-made answer (a rejection, an upstream error, a refused request)
is built here, as the header lines and body the listener writes: status line,
`Date` and `Connection` are the listener's to add. The layout is aiohttp's for
the same answer (a test compares them byte for byte), without a `Server`
header: the sidecar tells no one which Python or aiohttp it runs.
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["Answer", "error_answer", "fallback_answer", "reason_phrase"]

Answer = tuple[int, bytes, bytes, bytes]
"""(status, reason phrase, header lines, body): what `Request.answer` takes."""


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of `status` ("Service Unavailable"), or "Unknown"."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_answer(
    status: int, error: str, route: str | None = None, retry_after: int | None = None
) -> Answer:
    """A JSON error: `{"error": error, "route": route, "retry_after": N}`, with
    `Retry-After: N` when there is one."""
    # Formatted by hand: every value is a constant, a route name ([a-z0-9_-]+) or a
    # number, so nothing needs escaping, and rejections from an OPEN route are cached.
    body = f'{{"error":"{error}"'
    if route is not None:
        body += f',"route":"{route}"'
    lines = b""
    if retry_after is not None:
        body += f',"retry_after":{retry_after}'
        lines = b"Retry-After: %d\r\n" % retry_after
    data = (body + "}").encode()
    lines += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    return status, reason_phrase(status), lines, data


def fallback_answer(
    status: int,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    reason: str,
    retry_after: int | None,
) -> Answer:
    """A route's fallback in place of the sidecar's own answer for `reason`: its status,
    headers and body, with `X-Sidecar-Fallback: reason` and the `Retry-After` the
    replaced answer had, if any."""
    lines = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers)
    lines += b"X-Sidecar-Fallback: %s\r\n" % reason.encode()
    if retry_after is not None:
        lines += b"Retry-After: %d\r\n" % retry_after
    if status not in (204, 304):  # (which have no body, and say no length: RFC 9110 8.6)
        lines += b"Content-Length: %d\r\n" % len(body)
    return status, reason_phrase(status), lines, body
