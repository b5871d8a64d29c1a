"""The admin listener against web pages: a browser on the operator's machine must never
change a breaker for a page of another origin, nor for a DNS name rebound to it.

Requests are written byte for byte as a browser sends them (the headers Chromium
puts on a form's POST), or as curl does, to the admin listener's socket.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import DEFAULT_ADMIN_ALLOWED_HOSTS, ConfigError, parse_config

MINIMAL = """
routes:
  - name: payments
    match: {path_prefix: /payments}
    upstream: http://payments:8080
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "c.yaml")
    return [str(p) for p in info.value.problems]


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
