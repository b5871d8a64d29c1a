"""TLS to the upstream: a route's CA, client certificate, name and minimum version.

Every test drives a real sidecar against real TLS upstreams (aiohttp servers with
certificates made per test by tests/certs.py): what the client gets, what the upstream
saw of the handshake (client certificate, SNI, a resumed session), what is counted. A
failed handshake, or a TLS alert before the response head, is 502 `upstream_tls_error`
and a failure of kind `tls`.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import ConfigError, parse_config
from tests.certs import (
    CLIENT_VALID_UNTIL,
    NEW_CLIENT_VALID_UNTIL,
    Pair,
    Pki,
    TlsUpstream,
    client_serial,
    make_pki,
    tls_upstream,
)
from tests.conftest import StartSidecar, api_route, api_sample, fetch, running

TLS_ERROR = {"error": "upstream_tls_error", "route": "api"}
CLIENT_EXPIRY = "sidecar_tls_client_cert_expiry_timestamp_seconds"
UPSTREAM_EXPIRY = "sidecar_upstream_tls_cert_expiry_timestamp_seconds"
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3

StartUpstream = Callable[..., Awaitable[TlsUpstream]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """`tls_upstream(...)`, closed after the test."""
    started: list[TlsUpstream] = []

    async def start(server: Pair, client_ca: Pair | None = None, **options: Any) -> TlsUpstream:
        upstream = await tls_upstream(server, client_ca, **options)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def tls(**keys: object) -> str:
    """A `tls:` mapping in flow style, every value quoted as JSON (a path, a version)."""
    shown = (f"{k}: {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in keys.items())
    return "{" + ", ".join(shown) + "}"


def route(upstream: str, tls_keys: str | None, more: str = "") -> str:
    """Route `api` to `upstream` with `tls: tls_keys` (none when None); its breaker opens
    only after 100 failures, so `consecutive_failures` counts them."""
    lines = f"    tls: {tls_keys}\n" if tls_keys is not None else ""
    return api_route(upstream, "{failure_threshold: 100}", lines + more)


def failures(sc: Any, kind: str) -> float:
    return api_sample(sc, "sidecar_upstream_failures_total", kind=kind) or 0.0


async def expect_tls_error(http: aiohttp.ClientSession, sc: Any, path: str = "/ok") -> None:
    code, headers, body = await fetch(http, sc, path)
    assert (code, json.loads(body)) == (502, TLS_ERROR), body
    assert headers["Content-Type"].startswith("application/json")


# -- what verifies -----------------------------------------------------------------------


async def test_a_private_ca_verifies_the_upstream_and_the_system_cas_do_not(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """`ca_file` is the route's trust: the private CA's certificate (for 127.0.0.1) passes;
    without it the system CAs, which never heard of that CA, refuse it."""
    upstream = await start_upstream(pki.server)
    sc = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert)))
    code, _, body = await fetch(http, sc, "/ok?x=1")
    assert (code, json.loads(body)["path"]) == (200, "/ok")
    assert [s.path for s in upstream.seen] == ["/ok"]

    plain = await start_sidecar(route(upstream.url, None))
    await expect_tls_error(http, plain)
    assert failures(plain, "tls") == 1
    assert len(upstream.seen) == 1


async def test_a_relative_ca_file_is_read_from_the_config_files_directory(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """`ca_file: pki/ca.crt` names the file next to the config file (which the fixture
    writes into tmp_path), not one under the working directory."""
    assert pki.ca.cert == tmp_path / "pki" / "ca.crt"
    assert not (Path.cwd() / "pki" / "ca.crt").exists()
    upstream = await start_upstream(pki.server)
    sc = await start_sidecar(route(upstream.url, tls(ca_file="pki/ca.crt")))
    assert (await fetch(http, sc))[0] == 200


async def test_tls_settings_in_defaults_are_inherited_key_by_key(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """`defaults.tls.ca_file` and the route's own `tls.server_name` both apply: the
    certificate (for `localhost` only, reached at 127.0.0.1) verifies only with both."""
    upstream = await start_upstream(pki.server_localhost_only)
    sc = await start_sidecar(
        f"defaults:\n  tls: {tls(ca_file=pki.ca.cert)}\n"
        + route(upstream.url, tls(server_name="localhost"))
    )
    assert (await fetch(http, sc))[0] == 200


@pytest.mark.parametrize(
    ("certificate", "keys"),
    [
        ("wrong_name", {"server_name": "localhost"}),  # for wrong.example only
        ("wrong_name", {}),  # nor for 127.0.0.1
        ("expired", {}),
    ],
)
async def test_a_certificate_that_does_not_verify_is_a_502_tls_error_and_a_breaker_failure(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
    certificate: str,
    keys: dict[str, str],
) -> None:
    """A wrong name or a passed notAfter fails the handshake: 502 `upstream_tls_error`,
    one failure of kind `tls` (no other kind), one breaker failure; nothing reaches the
    upstream's handler."""
    upstream = await start_upstream(getattr(pki, certificate))
    sc = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert, **keys)))
    await expect_tls_error(http, sc)
    assert failures(sc, "tls") == 1
    assert failures(sc, "connect") == failures(sc, "reset") == 0
    assert sc.breaker("api").consecutive_failures == 1
    assert upstream.seen == []
    assert api_sample(sc, "sidecar_requests_total", code="502") == 1


async def test_server_name_is_the_sni_and_the_name_checked(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """A certificate for `localhost` only, at 127.0.0.1: without `server_name` the IP is
    checked (and fails; no SNI is sent for an IP), with `server_name: localhost` it
    verifies and the upstream sees SNI `localhost`."""
    upstream = await start_upstream(pki.server_localhost_only)
    by_ip = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert)))
    await expect_tls_error(http, by_ip)
    assert upstream.server_names == [None]

    named = await start_sidecar(
        route(upstream.url, tls(ca_file=pki.ca.cert, server_name="localhost"))
    )
    assert (await fetch(http, named))[0] == 200
    assert upstream.server_names == [None, "localhost"]


async def test_without_server_name_the_upstream_urls_host_is_the_sni_and_the_name(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """`https://localhost:PORT` sends SNI `localhost` and checks that name."""
    upstream = await start_upstream(pki.server_localhost_only)
    sc = await start_sidecar(route(f"https://localhost:{upstream.port}", tls(ca_file=pki.ca.cert)))
    assert (await fetch(http, sc))[0] == 200
    assert upstream.server_names == ["localhost"]


async def test_min_version_1_3_refuses_an_upstream_that_stops_at_1_2(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """Against an upstream speaking at most TLS 1.2, the default minimum (1.2) connects,
    `min_version: "1.3"` is a 502 `upstream_tls_error` of kind `tls`."""
    upstream = await start_upstream(pki.server, max_version=TLS12)
    default = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert)))
    code, _, body = await fetch(http, default)
    assert (code, json.loads(body)["tls_version"]) == (200, "TLSv1.2")

    strict = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert, min_version="1.3")))
    await expect_tls_error(http, strict)
    assert failures(strict, "tls") == 1
    assert len(upstream.seen) == 1


# -- verify: false -----------------------------------------------------------------------


async def test_verify_false_reaches_any_certificate_and_warns_at_start_and_reload(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`verify: false` checks neither the chain (no ca_file: the system CAs don't know it),
    nor the name, nor the dates; a warning naming `verify` is logged when the sidecar
    starts and again at every reload."""
    wrong = await start_upstream(pki.wrong_name)
    expired = await start_upstream(pki.expired)
    config = f"""
routes:
  - name: wrong
    match: {{path_prefix: /wrong}}
    upstream: {wrong.url}
    tls: {{verify: false}}
  - name: expired
    match: {{path_prefix: /expired}}
    upstream: {expired.url}
    tls: {{verify: false}}
"""
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        sc = await start_sidecar(config)
    assert warnings_about_verify(caplog), caplog.messages
    assert (await fetch(http, sc, "/wrong"))[0] == 200
    assert (await fetch(http, sc, "/expired"))[0] == 200
    assert [s.path for s in wrong.seen + expired.seen] == ["/wrong", "/expired"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        assert (await sc.sidecar.reload()).ok
    assert warnings_about_verify(caplog), caplog.messages


def warnings_about_verify(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("sidecar")
        and "verify" in r.getMessage().lower()
    ]


async def test_verify_false_still_reports_the_expiry_of_the_certificate_it_accepted(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The upstream-certificate gauge is the leaf's notAfter even when it was not
    verified: an expired certificate is what it is there to show."""
    upstream = await start_upstream(pki.expired)
    sc = await start_sidecar(route(upstream.url, tls(verify=False)))
    assert (await fetch(http, sc))[0] == 200
    assert api_sample(sc, UPSTREAM_EXPIRY) == pki.expired.not_after_timestamp


# -- client certificates (mTLS) ----------------------------------------------------------


async def test_a_client_certificate_is_presented_to_an_mtls_upstream(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """`cert_file` + `key_file`: the upstream, requiring a client certificate of its CA,
    answers, and the certificate it saw is that one."""
    upstream = await start_upstream(pki.server, pki.client_ca, min_version=TLS13)
    sc = await start_sidecar(
        route(
            upstream.url,
            tls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key),
        )
    )
    code, _, body = await fetch(http, sc)
    assert (code, json.loads(body)["client_cert"]) == (200, True)
    [seen] = upstream.seen
    assert seen.client_serial == client_serial(pki.client)


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-cert", "untrusted-cert"])
async def test_a_refused_client_certificate_is_a_502_tls_error_and_a_breaker_failure(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
    version: ssl.TLSVersion,
    client: str | None,
) -> None:
    """An mTLS upstream refusing the sidecar (no client certificate, or one of a CA it does
    not trust). With TLS 1.2 the handshake fails; with TLS 1.3 the client's handshake has
    completed and the refusal is an alert where the response head should be: both are 502
    `upstream_tls_error`, kind `tls`, one breaker failure, and nothing reached the handler."""
    upstream = await start_upstream(
        pki.server, pki.client_ca, min_version=version, max_version=version
    )
    keys: dict[str, object] = {"ca_file": pki.ca.cert}
    if client is not None:
        pair = getattr(pki, client)
        keys |= {"cert_file": pair.cert, "key_file": pair.key}
    sc = await start_sidecar(route(upstream.url, tls(**keys)))
    await expect_tls_error(http, sc)
    assert failures(sc, "tls") == 1
    assert failures(sc, "connect") == failures(sc, "reset") == 0
    assert sc.breaker("api").consecutive_failures == 1
    assert upstream.seen == []


# -- retries -----------------------------------------------------------------------------


async def test_a_tls_failure_is_retried_when_retry_on_names_tls(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The upstream's first handshake presents a certificate for another name, the next
    the right one: with `retry_on: [tls]` the second try answers (one retry of reason
    `tls`, one failure, one success); with the default `retry_on` the failure is the
    answer."""
    keys = tls(ca_file=pki.ca.cert, server_name="localhost")
    upstream = await start_upstream(pki.server, first_handshake=pki.wrong_name)
    sc = await start_sidecar(
        route(upstream.url, keys, "    retry: {attempts: 2, retry_on: [tls]}\n"),
        rand=lambda: 0.0,
    )
    code, _, body = await fetch(http, sc)
    assert (code, json.loads(body)["path"]) == (200, "/ok")
    assert upstream.server_names == ["localhost", "localhost"]
    assert api_sample(sc, "sidecar_retries_total", reason="tls") == 1
    assert failures(sc, "tls") == 1
    assert api_sample(sc, "sidecar_upstream_tries_total", result="failure") == 1
    assert api_sample(sc, "sidecar_upstream_tries_total", result="success") == 1

    other = await start_upstream(pki.server, first_handshake=pki.wrong_name)
    sc2 = await start_sidecar(
        route(other.url, keys, "    retry: {attempts: 2}\n"), rand=lambda: 0.0
    )
    await expect_tls_error(http, sc2)
    assert other.server_names == ["localhost"]
    assert not api_sample(sc2, "sidecar_retries_total", reason="tls")


# -- session resumption ------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
async def test_a_new_connection_resumes_the_tls_session_of_the_one_before(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
    version: ssl.TLSVersion,
) -> None:
    """The upstream closes every connection after its answer (`Connection: close`), so
    each request makes a new one: the first is a full handshake, the later ones resume
    the session (as the upstream sees it), client certificate and all."""
    upstream = await start_upstream(
        pki.server, pki.client_ca, min_version=version, max_version=version, close_connections=True
    )
    sc = await start_sidecar(
        route(
            upstream.url,
            tls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key),
        )
    )
    for _ in range(3):
        assert (await fetch(http, sc))[0] == 200
    assert len(upstream.server_names) == 3  # three handshakes: three connections
    assert [s.session_reused for s in upstream.seen] == [False, True, True]
    assert {s.client_serial for s in upstream.seen} == {client_serial(pki.client)}


# -- gauges ------------------------------------------------------------------------------


async def test_the_expiry_gauges_are_the_client_and_the_upstream_certificates_not_after(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The client certificate's notAfter from start (only for a route with a cert_file);
    the upstream's once a connection was made (https routes only)."""
    mtls = await start_upstream(pki.server, pki.client_ca)
    plain = await start_upstream(pki.server)
    client = tls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)
    sc = await start_sidecar(
        f"""
routes:
  - name: api
    match: {{path_prefix: /api}}
    upstream: {mtls.url}
    tls: {client}
  - name: plain
    match: {{path_prefix: /plain}}
    upstream: {plain.url}
    tls: {tls(ca_file=pki.ca.cert)}
"""
    )
    assert api_sample(sc, CLIENT_EXPIRY) == CLIENT_VALID_UNTIL.timestamp()
    assert sc.sample(CLIENT_EXPIRY, route="plain") is None
    assert api_sample(sc, UPSTREAM_EXPIRY) is None
    assert sc.sample(UPSTREAM_EXPIRY, route="plain") is None

    assert (await fetch(http, sc, "/api"))[0] == 200
    assert api_sample(sc, UPSTREAM_EXPIRY) == pki.server.not_after_timestamp
    assert sc.sample(UPSTREAM_EXPIRY, route="plain") is None
    assert (await fetch(http, sc, "/plain"))[0] == 200
    assert sc.sample(UPSTREAM_EXPIRY, route="plain") == pki.server.not_after_timestamp


async def test_the_upstream_certificate_gauge_is_the_certificate_last_seen(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The upstream's first handshake presents one certificate, the next a renewed one
    (no session resumed in between): each new connection moves the gauge to the
    certificate it was shown."""
    upstream = await start_upstream(
        pki.renewed, first_handshake=pki.server, close_connections=True, resumable=False
    )
    sc = await start_sidecar(route(upstream.url, tls(ca_file=pki.ca.cert)))
    assert (await fetch(http, sc))[0] == 200
    assert api_sample(sc, UPSTREAM_EXPIRY) == pki.server.not_after_timestamp
    assert (await fetch(http, sc))[0] == 200
    assert api_sample(sc, UPSTREAM_EXPIRY) == pki.renewed.not_after_timestamp


# -- reload ------------------------------------------------------------------------------


async def test_a_reload_reads_the_files_again_and_new_connections_use_the_new_certificate(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The config text unchanged, the client certificate's files replaced by another
    certificate: after the reload the next connection presents the new one, and the
    expiry gauge is the new notAfter."""
    upstream = await start_upstream(pki.server, pki.client_ca, close_connections=True)
    config = route(
        upstream.url,
        tls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key),
    )
    sc = await start_sidecar(config)
    assert (await fetch(http, sc))[0] == 200
    old, new = client_serial(pki.client), client_serial(pki.client_new)

    pki.client.cert.write_bytes(pki.client_new.cert.read_bytes())
    pki.client.key.write_bytes(pki.client_new.key.read_bytes())
    assert (await sc.sidecar.reload()).ok
    assert (await fetch(http, sc))[0] == 200
    assert [s.client_serial for s in upstream.seen] == [old, new]
    assert api_sample(sc, CLIENT_EXPIRY) == NEW_CLIENT_VALID_UNTIL.timestamp()


async def test_a_bad_file_fails_the_reload_with_400_and_the_old_context_stays(
    start_upstream: StartUpstream,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
    pki: Pki,
) -> None:
    """The client certificate's file overwritten with garbage: POST /reload is 400 naming
    `cert_file`; new connections still present the certificate loaded before."""
    upstream = await start_upstream(pki.server, pki.client_ca, close_connections=True)
    sc = await start_sidecar(
        route(
            upstream.url,
            tls(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key),
        )
    )
    assert (await fetch(http, sc))[0] == 200
    serial = client_serial(pki.client)

    pki.client.cert.write_text("this is not a certificate\n")
    async with http.post(sc.admin + "/reload") as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["result"] == "failure"
    assert any("routes[0].tls.cert_file" in e for e in answer["errors"]), answer

    for _ in range(2):
        assert (await fetch(http, sc))[0] == 200
    assert [s.client_serial for s in upstream.seen] == [serial] * 3
    assert api_sample(sc, CLIENT_EXPIRY) == CLIENT_VALID_UNTIL.timestamp()


# -- config errors -----------------------------------------------------------------------


def config_errors(text: str, directory: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text).lstrip("\n"), str(directory / "c.yaml"))
    return [str(p) for p in info.value.problems]


def one_error(text: str, directory: Path) -> str:
    found = config_errors(text, directory)
    assert len(found) == 1, found
    return found[0]


def https_route(tls_lines: str, upstream: str = "https://127.0.0.1:8443") -> str:
    """Route `api` at line 2; its `tls:` at line 5, the keys under it from line 6."""
    return (
        "routes:\n"
        "  - name: api\n"
        "    match: {path_prefix: /}\n"
        f"    upstream: {upstream}\n"
        "    tls:\n" + textwrap.indent(textwrap.dedent(tls_lines).strip("\n"), "      ") + "\n"
    )


def test_valid_tls_settings_parse(pki: Pki, tmp_path: Path) -> None:
    """Every key at once, files given relative to the config file's directory."""
    parse_config(
        https_route(
            """
            ca_file: pki/ca.crt
            cert_file: pki/client.crt
            key_file: pki/client.key
            server_name: localhost
            verify: true
            min_version: "1.3"
            """
        ),
        str(tmp_path / "c.yaml"),
    )


def test_a_missing_ca_file_is_an_error_at_its_line(tmp_path: Path) -> None:
    found = one_error(https_route("ca_file: nope.crt"), tmp_path)
    assert found.startswith(f"{tmp_path / 'c.yaml'}:6: routes[0].tls.ca_file: "), found


def test_a_relative_file_is_not_looked_for_in_the_working_directory(
    pki: Pki, tmp_path: Path
) -> None:
    """The same text is valid in tmp_path, and wrong for a config file elsewhere."""
    text = https_route("ca_file: pki/ca.crt")
    parse_config(text, str(tmp_path / "c.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "routes[0].tls.ca_file" in one_error(text, elsewhere)


@pytest.mark.parametrize("given", ["cert_file", "key_file"])
def test_a_client_certificate_needs_both_files(pki: Pki, tmp_path: Path, given: str) -> None:
    """cert_file without key_file, or key_file without cert_file: one error that names the
    missing key."""
    missing = {"cert_file": "key_file", "key_file": "cert_file"}[given]
    found = one_error(https_route(f"{given}: {getattr(pki.client, given[:-5])}"), tmp_path)
    assert "routes[0].tls" in found
    assert missing in found.split("routes[0].tls", 1)[1], found


@pytest.mark.parametrize("bad", ["ca_file", "cert_file", "key_file"])
def test_a_file_that_is_not_pem_is_an_error_at_its_key(pki: Pki, tmp_path: Path, bad: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello, I am not PEM\n")
    files = {"ca_file": pki.ca.cert, "cert_file": pki.client.cert, "key_file": pki.client.key}
    files[bad] = garbage
    found = one_error(https_route("\n".join(f"{k}: {v}" for k, v in files.items())), tmp_path)
    assert f"routes[0].tls.{bad}" in found, found


def test_a_key_that_is_not_the_certificates_is_an_error(pki: Pki, tmp_path: Path) -> None:
    found = one_error(
        https_route(f"cert_file: {pki.client.cert}\nkey_file: {pki.stranger.key}"), tmp_path
    )
    assert "routes[0].tls" in found, found


def test_a_directory_is_not_a_ca_file(pki: Pki, tmp_path: Path) -> None:
    found = one_error(https_route(f"ca_file: {tmp_path / 'pki'}"), tmp_path)
    assert "routes[0].tls.ca_file" in found, found


def test_tls_on_a_route_to_an_http_upstream_is_an_error(pki: Pki, tmp_path: Path) -> None:
    """A route writing `tls:` with an http:// upstream is told so; `tls:` in defaults is
    for the https routes and leaves an http route alone."""
    found = one_error(
        https_route(f"ca_file: {pki.ca.cert}", upstream="http://127.0.0.1:8080"), tmp_path
    )
    assert "routes[0].tls" in found, found

    parse_config(
        f"defaults:\n  tls: {{ca_file: {pki.ca.cert}}}\n"
        "routes:\n  - name: api\n    match: {path_prefix: /}\n    upstream: http://127.0.0.1:8080\n",
        str(tmp_path / "c.yaml"),
    )


@pytest.mark.parametrize("version", ['"1.1"', '"1.0"', '"2"', "tls1.3", "true"])
def test_min_version_is_1_2_or_1_3(tmp_path: Path, version: str) -> None:
    found = one_error(https_route(f"min_version: {version}"), tmp_path)
    assert found.startswith(f"{tmp_path / 'c.yaml'}:6: routes[0].tls.min_version: "), found
    assert "1.2" in found and "1.3" in found, found


def test_verify_must_be_a_boolean(tmp_path: Path) -> None:
    found = one_error(https_route('verify: "no"'), tmp_path)
    assert "routes[0].tls.verify" in found, found


def test_an_unknown_key_under_tls_suggests_the_closest(tmp_path: Path) -> None:
    assert one_error(https_route("ca_fil: ca.crt"), tmp_path) == (
        f"{tmp_path / 'c.yaml'}:6: routes[0].tls.ca_fil: unknown key 'ca_fil'; "
        "did you mean 'ca_file'?"
    )
    found = one_error(
        "defaults:\n  tls: {min_verison: '1.3'}\n"
        "routes:\n  - name: api\n    match: {path_prefix: /}\n    upstream: https://u\n",
        tmp_path,
    )
    assert found.endswith(
        "defaults.tls.min_verison: unknown key 'min_verison'; did you mean 'min_version'?"
    ), found


def test_sidecar_check_exits_2_on_a_missing_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(https_route("ca_file: nope.crt"))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"{path}:6: routes[0].tls.ca_file: " in result.stderr
    assert "Traceback" not in result.stderr


# -- as `sidecar run` runs -------------------------------------------------------------


async def test_as_sidecar_run_serves_on_uvloop_alerts_are_tls_errors_and_sessions_resume(
    start_upstream: StartUpstream, pki: Pki, tmp_path: Path
) -> None:
    """`sidecar run` (the process, on uvloop, where the tests above run on asyncio's loop):
    a refused client certificate (TLS 1.3 and 1.2) and a wrong name are 502
    `upstream_tls_error`, and a new connection resumes the session."""
    pytest.importorskip("uvloop")
    resume = await start_upstream(pki.server, close_connections=True)
    refused13 = await start_upstream(pki.server, pki.client_ca, min_version=TLS13)
    refused12 = await start_upstream(pki.server, pki.client_ca, max_version=TLS12)
    wrong = await start_upstream(pki.wrong_name)
    routes = "".join(
        f"""
  - name: {name}
    match: {{path_prefix: /{name}}}
    upstream: {upstream.url}
    tls: {tls(ca_file=pki.ca.cert)}"""
        for name, upstream in [
            ("resume", resume),
            ("refused13", refused13),
            ("refused12", refused12),
            ("wrong", wrong),
        ]
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nroutes:{routes}\n")
    async with running(str(path)) as (_process, proxy, admin), aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"http://{proxy}/resume") as response:
                assert response.status == 200
        for name in ("refused13", "refused12", "wrong"):
            async with http.get(f"http://{proxy}/{name}") as response:
                body = await response.json()
                assert (response.status, body) == (502, TLS_ERROR | {"route": name})
        async with http.get(f"http://{admin}/metrics") as response:
            metrics = await response.text()
    assert [s.session_reused for s in resume.seen] == [False, True, True]
    for name in ("refused13", "refused12", "wrong"):
        line = f'sidecar_upstream_failures_total{{kind="tls",route="{name}"}} 1.0'
        assert line in metrics.splitlines(), name
