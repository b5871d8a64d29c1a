"""Routing: which route a request belongs to, and the path it has at the upstream.

The table is compiled once, when the config loads; matching is a pure function
of the Host header and the raw path, tested without HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from sidecar.config import Route

__all__ = ["Router", "normalize_host", "upstream_target"]

T = TypeVar("T")


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
    """First match in file order; each entry pairs a route with what the caller keeps for it."""

    __slots__ = ("_entries", "_uses_host")

    def __init__(self, entries: Sequence[tuple[Route, T]]) -> None:
        self._entries = tuple(
            (
                route.host,
                route.path_prefix if route.path_prefix != "/" else None,
                "" if route.path_prefix in (None, "/") else f"{route.path_prefix}/",
                target,
            )
            for route, target in entries
        )
        self._uses_host = any(route.host is not None for route, _ in entries)

    def match(self, host_header: str | None, path: str) -> T | None:
        """The target of the first route matching `host_header` and `path` (no query)."""
        host = normalize_host(host_header) if self._uses_host else None
        for route_host, prefix, prefix_slash, target in self._entries:
            if route_host is not None and route_host != host:
                continue
            if prefix is not None and path != prefix and not path.startswith(prefix_slash):
                continue
            return target
        return None


def upstream_target(route: Route, raw_path: str) -> str:
    """The path and query to request at the upstream for `raw_path` (with its query)."""
    path, sep, query = raw_path.partition("?")
    prefix = route.path_prefix
    if route.strip_prefix and prefix is not None and prefix != "/":
        path = path[len(prefix) :]
    path = route.upstream.base_path + path
    return (path or "/") + sep + query
