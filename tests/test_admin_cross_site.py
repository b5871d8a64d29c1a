"""The admin listener against web pages: a browser on the operator's machine must never
change a breaker for a page of another origin, nor for a DNS name rebound to it.

Requests are written byte for byte as a browser sends them (the headers Chromium
puts on a form's POST), or as curl does, to the admin listener's socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.admin import _cross_site
from sidecar.app import Sidecar
from sidecar.breaker import State
from sidecar.cli import main
from sidecar.config import DEFAULT_ADMIN_ALLOWED_HOSTS, load_config, parse_config
from tests.conftest import Running, StartSidecar, Upstream, raw_exchange, two_routes
from tests.fakes import FakeClock
from tests.test_config import MINIMAL, errors

# -- admin.allowed_hosts in the config ----------------------------------------------------


def test_no_host_name_is_allowed_by_default() -> None:
    assert DEFAULT_ADMIN_ALLOWED_HOSTS == ()
    assert parse_config(MINIMAL).admin_allowed_hosts == ()
    assert parse_config("admin: {allowed_hosts: []}\n" + MINIMAL).admin_allowed_hosts == ()


def test_allowed_hosts_are_stored_lower_case_without_the_final_dot_once_each() -> None:
    config = parse_config(
        "admin:\n  allowed_hosts: [Sidecar.Internal, 'admin.example.', sidecar.internal]\n"
        + MINIMAL
    )
    assert config.admin_allowed_hosts == ("sidecar.internal", "admin.example")


def test_each_wrong_allowed_host_is_one_line_at_its_own_line() -> None:
    assert errors("""
        admin:
          listen: 127.0.0.1:9901
          allowed_hosts:
            - ok.example
            - sidecar.internal:9901
            - 10.0.0.1
            - '[::1]'
            - localhost
            - '*.example'
            - a b
            - bücher.example
            - 5
            - ''
        routes:
          - name: payments
            match: {path_prefix: /payments}
            upstream: http://payments:8080
        """) == [
        "c.yaml:6: admin.allowed_hosts[1]: 'sidecar.internal:9901': name the host without "
        "a port (any port is allowed)",
        "c.yaml:7: admin.allowed_hosts[2]: '10.0.0.1': IP addresses are always allowed; "
        "list host names only",
        "c.yaml:8: admin.allowed_hosts[3]: '[::1]': IP addresses are always allowed; "
        "list host names only",
        "c.yaml:9: admin.allowed_hosts[4]: 'localhost': localhost is always allowed; "
        "list other host names only",
        "c.yaml:10: admin.allowed_hosts[5]: '*.example': no wildcards; list each host name",
        "c.yaml:11: admin.allowed_hosts[6]: 'a b' is not a host name",
        "c.yaml:12: admin.allowed_hosts[7]: 'bücher.example' is not a host name: write it "
        "in its xn-- form, as browsers send it",
        "c.yaml:13: admin.allowed_hosts[8]: must be a host name such as 'sidecar.internal', "
        "not int 5",
        "c.yaml:14: admin.allowed_hosts[9]: must be a host name such as 'sidecar.internal', "
        "not a string ('')",
    ]


@pytest.mark.parametrize(
    ("value", "kind"), [("sidecar.internal", "a string ('sidecar.internal')"), ("null", "null")]
)
def test_allowed_hosts_must_be_a_list(value: str, kind: str) -> None:
    assert errors(f"admin: {{allowed_hosts: {value}}}\n" + MINIMAL) == [
        "c.yaml:1: admin.allowed_hosts: must be a list of host names such as "
        f"['sidecar.internal'], not {kind}"
    ]


def test_a_misspelt_admin_key_suggests_the_right_one() -> None:
    assert errors("admin:\n  allowed_host: [sidecar.internal]\n" + MINIMAL) == [
        "c.yaml:2: admin.allowed_host: unknown key 'allowed_host'; did you mean 'allowed_hosts'?"
    ]
    assert errors("admin:\n  lisen: 127.0.0.1:9901\n" + MINIMAL) == [
        "c.yaml:2: admin.lisen: unknown key 'lisen'; did you mean 'listen'?"
    ]


def test_check_shows_the_allowed_hosts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    assert main(["check", "-c", str(path)]) == 0
    assert (
        "admin.allowed_hosts: none (an admin POST's Host must be an IP address or localhost)\n"
        in capsys.readouterr().out
    )
    path.write_text("admin: {allowed_hosts: [sidecar.internal, Admin.Example]}\n" + MINIMAL)
    assert main(["check", "-c", str(path)]) == 0
    assert (
        "listen 0.0.0.0:8080, admin 127.0.0.1:9901\n"
        "admin.allowed_hosts: sidecar.internal, admin.example (besides IP addresses and "
        "localhost)\n" in capsys.readouterr().out
    )


# -- the rule on its own ------------------------------------------------------------------


def refusal(own_port: int = 9901, allowed: tuple[str, ...] = (), **headers: str) -> str | None:
    """`_cross_site` for headers given as keywords (`Sec_Fetch_Site` for Sec-Fetch-Site)."""
    return _cross_site(
        CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items()), own_port, allowed
    )


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Host": "127.0.0.1:9901"}, ()),  # curl -X POST http://127.0.0.1:9901/reload
        ({"Host": "localhost:9901"}, ()),
        ({"Host": "LocalHost.:9901"}, ()),
        ({"Host": "[::1]:9901"}, ()),
        ({"Host": "10.1.2.3"}, ()),  # any IP address: no DNS to rebind
        ({}, ()),  # HTTP/1.0 without Host, without Origin: no browser
        ({"Host": "127.0.0.1:9901", "Origin": "http://127.0.0.1:9901"}, ()),
        ({"Host": "localhost:9901", "Origin": "http://LOCALHOST:9901"}, ()),
        ({"Host": "[::1]:9901", "Origin": "http://[::1]:9901"}, ()),
        (
            {"Host": "Sidecar.Internal:9901", "Origin": "http://sidecar.internal:9901"},
            ("sidecar.internal",),
        ),
        # The Host's port is not checked: behind `kubectl port-forward 8000:9901`, curl
        # names port 8000.
        ({"Host": "localhost:8000"}, ()),
        ({"Host": "127.0.0.1:9901", "Sec_Fetch_Site": "same-origin"}, ()),
        ({"Host": "127.0.0.1:9901", "Sec_Fetch_Site": "same-site"}, ()),
        ({"Host": "127.0.0.1:9901", "Sec_Fetch_Site": "none"}, ()),  # typed in the address bar
    ],
)
def test_what_passes(headers: dict[str, str], allowed: tuple[str, ...]) -> None:
    assert refusal(allowed=allowed, **headers) is None


@pytest.mark.parametrize(
    ("headers", "allowed", "detail"),
    [
        (
            {"Host": "127.0.0.1:9901", "Origin": "http://127.0.0.1:8000"},
            (),
            "Origin 'http://127.0.0.1:8000' is not this listener's own (http://127.0.0.1:9901)",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "http://127.0.0.1"},  # port 80
            (),
            "Origin 'http://127.0.0.1' is not this listener's own (http://127.0.0.1:9901)",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "https://127.0.0.1:9901"},
            (),
            "Origin 'https://127.0.0.1:9901' is not this listener's own",
        ),
        (
            # Any IP address passes the Host rule, but own origin is the Host's: a page
            # from someone's server at the admin's port is not own.
            {"Host": "127.0.0.1:9901", "Origin": "http://203.0.113.7:9901"},
            (),
            "Origin 'http://203.0.113.7:9901' is not this listener's own",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "http://localhost:9901"},
            (),
            "Origin 'http://localhost:9901' is not this listener's own",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "null"},
            (),
            "Origin 'null' is not this listener's own",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "http://127.0.0.1:9901/x"},
            (),
            "Origin 'http://127.0.0.1:9901/x' is not this listener's own",
        ),
        (
            {"Host": "127.0.0.1:9901", "Origin": "http://127.0.0.1:99999"},
            (),
            "Origin 'http://127.0.0.1:99999' is not this listener's own",
        ),
        (
            {"Origin": "http://127.0.0.1:9901"},
            (),
            "Origin 'http://127.0.0.1:9901' with no Host header to compare it with",
        ),
        (
            {"Host": "127.0.0.1:9901", "Sec_Fetch_Site": "cross-site"},
            (),
            "Sec-Fetch-Site: cross-site: a web page of another site sent this request",
        ),
        (
            {"Host": "127.0.0.1:9901", "Sec_Fetch_Site": " Cross-Site"},
            (),
            "Sec-Fetch-Site: cross-site",
        ),
        (
            {"Host": "evil.example:9901", "Origin": "http://evil.example:9901"},
            (),
            "Host 'evil.example:9901' is not an IP address, localhost or one of "
            "admin.allowed_hosts (a DNS name pointed at this machine: DNS rebinding?)",
        ),
        ({"Host": "evil.example:9901"}, ("sidecar.internal",), "Host 'evil.example:9901'"),
        ({"Host": "sub.localhost:9901"}, (), "Host 'sub.localhost:9901'"),
        ({"Host": "127.1:9901"}, (), "Host '127.1:9901'"),
        ({"Host": "::1"}, (), "Host '::1'"),  # IPv6 only in brackets
        ({"Host": "[evil.example]:9901"}, (), "Host '[evil.example]:9901'"),
        ({"Host": ""}, (), "Host ''"),
        ({"Host": "127.0.0.1@evil.example"}, (), "Host '127.0.0.1@evil.example'"),
    ],
)
def test_what_is_refused(headers: dict[str, str], allowed: tuple[str, ...], detail: str) -> None:
    found = refusal(allowed=allowed, **headers)
    assert found is not None and found.startswith(detail), found


def test_an_origin_without_a_port_is_port_80() -> None:
    assert refusal(80, Host="127.0.0.1", Origin="http://127.0.0.1") is None
    assert refusal(80, Host="127.0.0.1", Origin="http://127.0.0.1:80") is None
    assert refusal(80, Host="127.0.0.1", Origin="http://127.0.0.1:8080") is not None


def test_a_header_sent_twice_is_refused() -> None:
    host = ("Host", "127.0.0.1:9901")
    origin = ("Origin", "http://127.0.0.1:9901")
    same = ("Sec-Fetch-Site", "same-origin")
    assert _cross_site(CIMultiDict([host, origin, origin]), 9901, ()) == (
        "more than one Origin header"
    )
    assert _cross_site(CIMultiDict([host, host]), 9901, ()) == "more than one Host header"
    assert _cross_site(CIMultiDict([host, origin, same, same]), 9901, ()) is None


# -- as a browser and as curl send them ---------------------------------------------------

CHROMIUM = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/156.0.0.0 Safari/537.36"
)
TEXT_PLAIN_FORM = b'{"state":"=","state":"forced_open"}\r\n'
"""`<form enctype="text/plain">` with `<input name='{"state":"' value='","state":"forced_open"}'>`:
JSON whose last `state` wins, which the admin forced a route open with before this rule."""
BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
FORMS = {
    "text/plain": TEXT_PLAIN_FORM,
    "application/x-www-form-urlencoded": b"state=forced_open&ttl=10m",
    f"multipart/form-data; boundary={BOUNDARY}": (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="state"\r\n\r\nforced_open\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode(),
}


def port_of(s: Running) -> int:
    return s.sidecar.addresses["admin"].port


def request(path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """A POST with exactly these headers (Content-Length added for a body)."""
    if body:
        headers = [*headers, ("Content-Length", str(len(body)))]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"POST {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body


def form_post(
    path: str,
    host: str,
    origin: str,
    content_type: str,
    body: bytes,
    sec_fetch_site: str = "same-site",
) -> bytes:
    """A form's POST as Chromium sends it from a page at `origin` (a top-level navigation;
    127.0.0.1 on another port is the same site, hence `same-site`)."""
    return request(
        path,
        [
            ("Host", host),
            ("Cache-Control", "max-age=0"),
            ("Origin", origin),
            ("Content-Type", content_type),
            ("Upgrade-Insecure-Requests", "1"),
            ("User-Agent", CHROMIUM),
            ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            ("Sec-Fetch-Site", sec_fetch_site),
            ("Sec-Fetch-Mode", "navigate"),
            ("Sec-Fetch-User", "?1"),
            ("Sec-Fetch-Dest", "document"),
            ("Referer", origin + "/"),
            ("Accept-Encoding", "gzip, deflate, br, zstd"),
            ("Accept-Language", "en-US,en;q=0.9"),
        ],
        body,
    )


def fetch_post(path: str, host: str, origin: str, body: bytes) -> bytes:
    """`fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body})`
    from a page of the listener's own origin."""
    return request(
        path,
        [
            ("Host", host),
            ("sec-ch-ua-platform", '"Linux"'),
            ("User-Agent", CHROMIUM),
            ("Content-Type", "application/json"),
            ("Accept", "*/*"),
            ("Origin", origin),
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "cors"),
            ("Sec-Fetch-Dest", "empty"),
            ("Referer", origin + "/"),
        ],
        body,
    )


def curl_post(path: str, host: str, content_type: str | None = None, body: bytes = b"") -> bytes:
    """`curl -X POST [-H 'Content-Type: ...'] [-d ...] http://HOST/PATH`."""
    headers = [("Host", host), ("User-Agent", "curl/7.88.1"), ("Accept", "*/*")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    return request(path, headers, body)


async def send(s: Running, data: bytes) -> tuple[int, dict[str, object]]:
    reply = await raw_exchange(s.admin, data)
    head, _, body = reply.partition(b"\r\n\r\n")
    answer = json.loads(body)
    assert isinstance(answer, dict)
    assert b"\r\ncontent-type: application/json" in head.lower()
    return int(head.split(b" ")[1]), answer


async def trip(s: Running, http: aiohttp.ClientSession, route: str) -> None:
    for _ in range(2):
        async with http.get(f"{s.proxy}/{route}/status/500") as response:
            assert response.status == 500
    assert s.breaker(route).state is State.OPEN


def refused_as_cross_site(answer: dict[str, object], detail: str) -> None:
    assert answer["error"] == "cross_site_request", answer
    assert str(answer["detail"]).startswith(detail), answer


@pytest.mark.parametrize("content_type", list(FORMS))
async def test_a_form_of_another_origin_cannot_force_a_route_open(
    start_sidecar: StartSidecar, upstream: Upstream, content_type: str
) -> None:
    s = await start_sidecar(two_routes(upstream))
    port = port_of(s)
    page = "http://127.0.0.1:8000"  # any other port on this machine: another origin
    attack = form_post("/breakers/a", f"127.0.0.1:{port}", page, content_type, FORMS[content_type])
    status, answer = await send(s, attack)
    assert status == 403
    refused_as_cross_site(
        answer, f"Origin '{page}' is not this listener's own (http://127.0.0.1:{port})"
    )
    assert s.breaker("a").state is State.CLOSED
    assert s.sample("sidecar_breaker_state", route="a", state="forced_open") == 0


async def test_a_refusal_is_logged_for_the_operator(
    start_sidecar: StartSidecar, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    s = await start_sidecar(two_routes(upstream))
    port = port_of(s)
    attack = form_post(
        "/breakers/a", f"127.0.0.1:{port}", "http://evil.example", "text/plain", FORMS["text/plain"]
    )
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        status, _ = await send(s, attack)
    assert status == 403
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "admin_refused"]
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["reason"], fields["path"]) == ("cross_site_request", "/breakers/a")
    assert fields["detail"].startswith("Origin 'http://evil.example' is not")


async def test_a_form_of_another_origin_cannot_reset_a_tripped_route(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    await trip(s, http, "b")
    host = f"127.0.0.1:{port_of(s)}"
    for page, content_type in (
        ("http://127.0.0.1:8000", "application/x-www-form-urlencoded"),  # a form, no fields
        ("http://localhost:3000", "text/plain"),
    ):
        status, answer = await send(
            s, form_post("/breakers/b/reset", host, page, content_type, b"", "cross-site")
        )
        assert status == 403
        refused_as_cross_site(answer, "Sec-Fetch-Site: cross-site")
    assert s.breaker("b").state is State.OPEN
    assert s.breaker("b").open_period == 45


async def test_a_form_of_another_origin_cannot_reload(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    s = await start_sidecar(two_routes(upstream))
    host = f"127.0.0.1:{port_of(s)}"
    attack = form_post("/reload", host, "http://127.0.0.1:8000", "text/plain", b"")
    status, answer = await send(s, attack)
    assert status == 403
    refused_as_cross_site(answer, "Origin 'http://127.0.0.1:8000' is not this listener's own")
    assert s.sample("sidecar_config_reloads_total", result="success") == 0


async def test_sec_fetch_site_cross_site_is_refused_without_an_origin(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    s = await start_sidecar(two_routes(upstream))
    attack = request(
        "/breakers/a",
        [
            ("Host", f"127.0.0.1:{port_of(s)}"),
            ("Content-Type", "application/json"),
            ("Sec-Fetch-Site", "cross-site"),
            ("Sec-Fetch-Mode", "navigate"),
        ],
        b'{"state": "forced_open"}',
    )
    status, answer = await send(s, attack)
    assert status == 403
    refused_as_cross_site(answer, "Sec-Fetch-Site: cross-site")
    assert s.breaker("a").state is State.CLOSED


async def test_origin_null_is_another_origin(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    # A form in a sandboxed iframe, or one posted from a file:// page, says `Origin: null`.
    s = await start_sidecar(two_routes(upstream))
    host = f"127.0.0.1:{port_of(s)}"
    attack = form_post("/breakers/a", host, "null", "text/plain", TEXT_PLAIN_FORM, "cross-site")
    status, answer = await send(s, attack.replace(b"Sec-Fetch-Site: cross-site\r\n", b""))
    assert status == 403
    refused_as_cross_site(answer, "Origin 'null' is not this listener's own")
    assert s.breaker("a").state is State.CLOSED


async def test_a_dns_name_rebound_to_this_machine_is_refused(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    # evil.example served the page, then its DNS answer changed to 127.0.0.1: to the
    # browser the admin listener is now the page's own origin, JSON and all.
    s = await start_sidecar(two_routes(upstream))
    port = port_of(s)
    attack = fetch_post(
        "/breakers/a", f"evil.example:{port}", f"http://evil.example:{port}",
        b'{"state": "forced_open", "ttl": "10m"}',
    )  # fmt: skip
    status, answer = await send(s, attack)
    assert status == 403
    refused_as_cross_site(
        answer,
        f"Host 'evil.example:{port}' is not an IP address, localhost or one of admin.allowed_hosts",
    )
    assert s.breaker("a").state is State.CLOSED


@contextlib.asynccontextmanager
async def allowing(tmp_path: Path, upstream: Upstream, hosts: str) -> AsyncIterator[Running]:
    """A sidecar whose admin.allowed_hosts is `hosts` (YAML)."""
    path = tmp_path / "allowing.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\n"
        f"admin: {{listen: 127.0.0.1:0, allowed_hosts: {hosts}}}\n" + two_routes(upstream)
    )
    clock = FakeClock()
    sidecar = Sidecar(load_config(str(path)), clock=clock)
    await sidecar.start()
    try:
        yield Running(
            sidecar,
            clock,
            f"http://{sidecar.addresses['proxy']}",
            f"http://{sidecar.addresses['admin']}",
        )
    finally:
        await sidecar.stop()


async def test_only_the_allowed_host_names_pass(tmp_path: Path, upstream: Upstream) -> None:
    async with allowing(tmp_path, upstream, "[Sidecar.Internal]") as s:
        port = port_of(s)
        body = b'{"state": "forced_open"}'
        attack = fetch_post(
            "/breakers/a", f"evil.example:{port}", f"http://evil.example:{port}", body
        )
        status, answer = await send(s, attack)
        assert status == 403
        refused_as_cross_site(answer, f"Host 'evil.example:{port}' is not an IP address")
        assert s.breaker("a").state is State.CLOSED
        own = fetch_post(
            "/breakers/a", f"sidecar.internal:{port}", f"http://sidecar.internal:{port}", body
        )
        status, answer = await send(s, own)
        assert (status, answer["state"]) == (200, "forced_open")
        # The page of an allowed name on another port is still another origin.
        other = fetch_post(
            "/breakers/b", f"sidecar.internal:{port}", "http://sidecar.internal:8000", body
        )
        assert (await send(s, other))[0] == 403
        # A reload changes the list at once.
        path = Path(s.sidecar.config.path)
        path.write_text(path.read_text().replace("[Sidecar.Internal]", "[evil.example]"))
        reload = curl_post("/reload", f"127.0.0.1:{port}")
        assert (await send(s, reload))[0] == 200
        assert s.sidecar.config.admin_allowed_hosts == ("evil.example",)
        status, answer = await send(s, attack.replace(b"/breakers/a", b"/breakers/b"))
        assert (status, answer["state"]) == (200, "forced_open")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_json_post_from_the_listeners_own_origin_is_accepted(
    start_sidecar: StartSidecar, upstream: Upstream, host: str
) -> None:
    s = await start_sidecar(two_routes(upstream))
    port = port_of(s)  # the port bound, not the 0 of the config
    own = fetch_post(
        "/breakers/a", f"{host}:{port}", f"http://{host}:{port}", b'{"state": "forced_open"}'
    )
    status, answer = await send(s, own)
    assert (status, answer["state"]) == (200, "forced_open")
    assert s.breaker("a").state is State.FORCED_OPEN


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_a_json_post_without_an_origin_is_accepted(
    start_sidecar: StartSidecar, upstream: Upstream, content_type: str
) -> None:
    # curl -X POST -H 'Content-Type: application/json' -d '{"state": ...}' 127.0.0.1:PORT/...
    s = await start_sidecar(two_routes(upstream))
    body = b'{"state": "forced_open", "ttl": "10m"}'
    status, answer = await send(
        s, curl_post("/breakers/a", f"127.0.0.1:{port_of(s)}", content_type, body)
    )
    assert (status, answer["state"], answer["retry_after"]) == (200, "forced_open", 600)


async def test_curl_posts_without_a_body_keep_working(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    await trip(s, http, "b")
    host = f"127.0.0.1:{port_of(s)}"
    assert (await send(s, curl_post("/reload", host)))[0] == 200
    # An empty body is no body, whatever type it claims (curl -d '' sends urlencoded).
    reset = curl_post("/breakers/b/reset", host, "application/x-www-form-urlencoded")
    status, answer = await send(s, reset.replace(b"Connection", b"Content-Length: 0\r\nConnection"))
    assert (status, answer["state"]) == (200, "closed")


@pytest.mark.parametrize(
    ("content_type", "sent"),
    [
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),  # curl -d
        ("text/plain", "'text/plain'"),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f"'multipart/form-data; boundary={BOUNDARY}'",
        ),
        ("application/json-patch+json", "'application/json-patch+json'"),
        (None, "none"),
    ],
)
async def test_a_body_that_is_not_json_is_415(
    start_sidecar: StartSidecar, upstream: Upstream, content_type: str | None, sent: str
) -> None:
    s = await start_sidecar(two_routes(upstream))
    post = curl_post("/breakers/a", f"127.0.0.1:{port_of(s)}", content_type, TEXT_PLAIN_FORM)
    status, answer = await send(s, post)
    assert status == 415
    assert answer == {
        "error": "unsupported_media_type",
        "detail": f"a body must be sent with Content-Type: application/json (sent: {sent})",
    }
    assert s.breaker("a").state is State.CLOSED


async def test_a_chunked_body_that_is_not_json_is_415(
    start_sidecar: StartSidecar, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    s = await start_sidecar(two_routes(upstream))
    await trip(s, http, "b")
    post = (
        f"POST /breakers/b/reset HTTP/1.1\r\nHost: 127.0.0.1:{port_of(s)}\r\n"
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "2\r\n{}\r\n0\r\n\r\n"
    ).encode()
    assert (await send(s, post))[0] == 415
    assert s.breaker("b").state is State.OPEN


async def test_with_a_token_the_cross_site_rule_still_comes_first(
    start_sidecar: StartSidecar, upstream: Upstream
) -> None:
    s = await start_sidecar(two_routes(upstream), admin_token="s3cret")
    port = port_of(s)
    host = f"127.0.0.1:{port}"
    body = b'{"state": "forced_open"}'
    bearer = ("Authorization", "Bearer s3cret")

    def curl(content_type: str, token: bool) -> bytes:
        headers = [("Host", host), ("Content-Type", content_type), *([bearer] * token)]
        return request("/breakers/a", headers, body)

    # A page's request: refused as such, with the right token too, and without one.
    page = form_post("/breakers/a", host, "http://127.0.0.1:8000", "application/json", body)
    for attack in (page, page.replace(b"Host:", b"Authorization: Bearer s3cret\r\nHost:")):
        status, answer = await send(s, attack)
        assert status == 403
        refused_as_cross_site(answer, "Origin 'http://127.0.0.1:8000' is not this listener's own")
    assert s.breaker("a").state is State.CLOSED
    # Then the token, then the body's type.
    assert (await send(s, curl("text/plain", token=False)))[1]["error"] == "unauthorized"
    assert (await send(s, curl("text/plain", token=True)))[1]["error"] == "unsupported_media_type"
    assert (await send(s, curl("application/json", token=False)))[0] == 401
    assert s.breaker("a").state is State.CLOSED
    status, answer = await send(s, curl("application/json", token=True))
    assert (status, answer["state"]) == (200, "forced_open")
    own = fetch_post("/breakers/b", host, f"http://{host}", body)
    status, answer = await send(s, own.replace(b"Host:", b"Authorization: Bearer s3cret\r\nHost:"))
    assert (status, answer["state"]) == (200, "forced_open")
