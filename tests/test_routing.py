"""Routing as a pure function: no HTTP needed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import Route, parse_config
from sidecar.routing import HOST_CACHE_SIZE, Router, authority, normalize_host, upstream_target


def routes(yaml_routes: str) -> tuple[Route, ...]:
    return parse_config("routes:\n" + yaml_routes).routes


def router(yaml_routes: str) -> Router[str]:
    return Router([(r, r.name) for r in routes(yaml_routes)])


TABLE = """
  - {name: api-host, match: {host: API.internal}, upstream: "http://a"}
  - {name: orders-on-shop, match: {host: shop.internal, path_prefix: /orders}, upstream: "http://b"}
  - {name: orders, match: {path_prefix: /orders}, upstream: "http://c"}
  - {name: root, match: {path_prefix: /}, upstream: "http://d"}
"""


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.internal", "/anything", "api-host"),
        ("API.INTERNAL:8443", "/orders", "api-host"),  # host first in file order, port ignored
        ("api.internal.", "/x", "api-host"),
        ("shop.internal", "/orders/7", "orders-on-shop"),
        ("shop.internal:80", "/orders", "orders-on-shop"),
        ("shop.internal", "/ordersx", "root"),  # segment-aware
        ("other", "/orders", "orders"),
        (None, "/orders/", "orders"),
        (None, "/orders-v2", "root"),
        (None, "/", "root"),
    ],
)
def test_first_match_in_file_order(host: str | None, path: str, expected: str) -> None:
    assert router(TABLE).match(host, path) == expected


def test_no_match() -> None:
    r = router(
        '  - {name: a, match: {path_prefix: /a}, upstream: "http://a"}\n'
        '  - {name: h, match: {host: h.internal}, upstream: "http://a"}\n'
    )
    assert r.match("x", "/b") is None
    assert r.match("x", "/ab") is None
    assert r.match(None, "/") is None
    assert r.match("h.internal.evil", "/") is None


def test_prefix_with_trailing_slash_is_the_same_prefix() -> None:
    r = router('  - {name: a, match: {path_prefix: /a/}, upstream: "http://a"}\n')
    assert r.match(None, "/a") == "a"
    assert r.match(None, "/a/b") == "a"
    assert r.match(None, "/ab") is None


@pytest.mark.parametrize(
    ("header", "host"),
    [("Example.COM:8080", "example.com"), ("[::1]:80", "::1"), ("[::1]", "::1"), ("h", "h"),
     ("", None), (None, None), ("h.:1", "h")],
)  # fmt: skip
def test_normalize_host(header: str | None, host: str | None) -> None:
    assert normalize_host(header) == host


@pytest.mark.parametrize(
    ("host", "port", "written"),
    [("example.com", None, "example.com"),
     ("example.com", 8080, "example.com:8080"),
     ("10.0.0.1", 80, "10.0.0.1:80"),
     ("::1", None, "[::1]"),
     ("fe80::1", 443, "[fe80::1]:443")],
)  # fmt: skip
def test_authority_is_what_normalize_host_reads_back(
    host: str, port: int | None, written: str
) -> None:
    assert authority(host, port) == written
    assert normalize_host(written) == host


def one(yaml_route: str) -> Route:
    return routes(yaml_route)[0]


@pytest.mark.parametrize(
    ("upstream", "strip", "raw", "expected"),
    [
        ("http://u", False, "/pay/x?a=1&b", "/pay/x?a=1&b"),
        ("http://u", True, "/pay/x?a=1", "/x?a=1"),
        ("http://u", True, "/pay", "/"),
        ("http://u", True, "/pay?q", "/?q"),
        ("http://u", True, "/pay/", "/"),
        ("http://u/api", True, "/pay/x", "/api/x"),
        ("http://u/api/", True, "/pay/x", "/api/x"),  # no '//' from the join
        ("http://u/api", True, "/pay", "/api"),
        ("http://u/api", False, "/pay/x", "/api/pay/x"),
        ("http://u/api/", False, "/pay?x=%2F", "/api/pay?x=%2F"),  # query kept verbatim
        ("http://u", False, "/pay/a%20b", "/pay/a%20b"),  # percent-encoding kept
    ],
)
def test_upstream_target(upstream: str, strip: bool, raw: str, expected: str) -> None:
    route = one(
        f'  - {{name: a, match: {{path_prefix: /pay}}, upstream: "{upstream}", '
        f"strip_prefix: {str(strip).lower()}}}\n"
    )
    assert upstream_target(route, raw) == expected


def test_strip_prefix_of_root_strips_nothing() -> None:
    route = one(
        '  - {name: a, match: {path_prefix: /}, upstream: "http://u/base", strip_prefix: true}\n'
    )
    assert upstream_target(route, "/x/y") == "/base/x/y"


# -- the compiled table against first-match in file order ------------------------------------

TEMPLATE = routes('  - {name: t, match: {path_prefix: /t}, upstream: "http://t"}\n')[0]
SEGMENT = st.sampled_from(["a", "b", "ab", "%2F", "a.b", ""])
PREFIX = st.one_of(
    st.none(),
    st.just("/"),
    st.lists(SEGMENT.filter(bool), min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
)
HOST = st.sampled_from([None, "x.internal", "y.internal"])


def first_match(table: list[Route], host: str | None, path: str) -> str | None:
    """The definition: the first route in file order whose host and prefix both match."""
    wanted = normalize_host(host)
    for route in table:
        if route.host is not None and route.host != wanted:
            continue
        prefix = route.path_prefix
        if prefix not in (None, "/") and path != prefix and not path.startswith(prefix + "/"):
            continue
        return route.name
    return None


@given(
    table=st.lists(
        st.tuples(HOST, PREFIX).filter(lambda hp: hp != (None, None)), min_size=1, max_size=12
    ),
    requests=st.lists(
        st.tuples(
            st.sampled_from([None, "x.internal", "Y.INTERNAL:8080", "z"]),
            st.lists(SEGMENT, max_size=5).map(lambda s: "/" + "/".join(s)),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_the_compiled_table_matches_first_match_in_file_order(
    table: list[tuple[str | None, str | None]], requests: list[tuple[str | None, str]]
) -> None:
    built = [
        dataclasses.replace(TEMPLATE, name=f"r{i}", host=host, path_prefix=prefix)
        for i, (host, prefix) in enumerate(table)
    ]
    compiled = Router([(route, route.name) for route in built])
    for host, path in requests:
        assert compiled.match(host, path) == first_match(built, host, path), (host, path)


def test_a_path_is_never_split_deeper_than_the_deepest_prefix() -> None:
    """A path of thousands of segments costs no more than the table's own depth."""
    table = router('  - {name: deep, match: {path_prefix: /a/b}, upstream: "http://a"}\n')
    assert table.match(None, "/a/b" + "/x" * 4000) == "deep"
    assert table.match(None, "/a" + "/x" * 4000) is None


def test_the_host_headers_remembered_stay_bounded_whatever_clients_send() -> None:
    """A router remembers the Host headers it normalized; made-up ones cannot grow that."""
    table = router(TABLE)
    for i in range(HOST_CACHE_SIZE * 3):
        assert table.match(f"made-up-{i}.example", "/orders") == "orders"
        assert len(table._normalized) <= HOST_CACHE_SIZE
    assert table.match("API.INTERNAL:8443", "/orders") == "api-host"  # and still right
    assert table.match("API.INTERNAL:8443", "/orders") == "api-host"  # remembered
