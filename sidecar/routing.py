"""Routing: which route a request belongs to, and the path it has at the upstream.

The table is compiled once, when the config loads; matching is a pure function
of the Host header and the raw path, tested without HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # (sidecar.config uses the Router itself, to find shadowed routes)
    from sidecar.config import Route

__all__ = ["HOST_CACHE_SIZE", "Router", "authority", "normalize_host", "upstream_target"]

T = TypeVar("T")

HOST_CACHE_SIZE = 1024
"""Host headers a router remembers the normalized form of (it starts over when full)."""


def authority(host: str, port: int | None = None) -> str:
    """`host:port` as a URL or a Host header writes it: an IPv6 address in brackets, no
    port if None. (`normalize_host` reads one back.)"""
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


def normalize_host(host_header: str | None) -> str | None:
    """`Example.COM:8080` -> `example.com`; `[::1]:80` -> `::1`."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, _, _port = host.partition(":")
    return name.rstrip(".")


class Router(Generic[T]):
    """First match in file order; each entry pairs a route with what the caller keeps for it.

    Compiled into a dict keyed by (host, path prefix): a request looks up its own
    host and no host, with no prefix and with each leading run of its path's
    segments (as deep as the deepest configured prefix), and the earliest route
    found wins. So a table of a thousand routes costs a request a handful of dict
    look-ups, not a thousand comparisons.
    """

    __slots__ = ("_depth", "_hosts", "_index", "_normalized")

    def __init__(self, entries: Sequence[tuple[Route, T]]) -> None:
        self._index: dict[tuple[str | None, str | None], tuple[int, T]] = {}
        self._depth = 0
        """Segments in the deepest prefix: a path is never split further than this."""
        for order, (route, target) in enumerate(entries):
            prefix = None if route.path_prefix in (None, "/") else route.path_prefix
            self._index.setdefault((route.host, prefix), (order, target))
            if prefix is not None:
                self._depth = max(self._depth, prefix.count("/"))
        self._hosts = frozenset(route.host for route, _ in entries if route.host is not None)
        self._normalized: dict[str | bytes, str | None] = {}
        """Host headers seen: their host if a route names it, else None (no route could
        match on it). Clients send the same few, so this spares normalizing each."""

    def match(self, host_header: str | bytes | None, path: str) -> T | None:
        """The target of the first route matching `host_header` (as sent: bytes are read
        as Latin-1) and `path` (no query)."""
        host = None
        if self._hosts and host_header:
            cache = self._normalized
            try:
                host = cache[host_header]
            except KeyError:
                if len(cache) >= HOST_CACHE_SIZE:
                    cache.clear()  # bounded whatever Host headers clients make up
                text = (
                    host_header if isinstance(host_header, str) else host_header.decode("latin-1")
                )
                name = normalize_host(text)
                host = cache[host_header] = name if name in self._hosts else None
        return self.lookup(host, path)

    def lookup(self, host: str | None, path: str) -> T | None:
        """`match` for a host already normalized (lower case, no port, no brackets)."""
        index = self._index
        # Each candidate key in turn; the earliest route found wins. (Written out, not
        # as a loop over hosts: this runs for every request.)
        best = index.get((None, None))
        if host is not None:
            found = index.get((host, None))
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        end = 0
        for _ in range(self._depth):
            end = path.find("/", end + 1)
            prefix = path if end < 0 else path[:end]
            found = index.get((None, prefix))
            if found is not None and (best is None or found[0] < best[0]):
                best = found
            if host is not None:
                found = index.get((host, prefix))
                if found is not None and (best is None or found[0] < best[0]):
                    best = found
            if end < 0:
                break
        return None if best is None else best[1]


def upstream_target(route: Route, raw_path: str) -> str:
    """The path and query to request at the upstream for `raw_path` (with its query)."""
    path, sep, query = raw_path.partition("?")
    prefix = route.path_prefix
    if route.strip_prefix and prefix is not None and prefix != "/":
        path = path[len(prefix) :]
    path = route.upstream.base_path + path
    return (path or "/") + sep + query
