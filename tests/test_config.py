"""Config validation: good files become frozen objects, bad ones give every error at once."""

from __future__ import annotations

import dataclasses
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from sidecar.breaker import WindowSettings
from sidecar.config import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_MAX_OPEN_DURATION,
    Address,
    ConfigError,
    load_config,
    parse_config,
)

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


def one_error(text: str) -> str:
    found = errors(text)
    assert len(found) == 1, found
    return found[0]


def route_with(extra: str) -> str:
    return MINIMAL + textwrap.indent(textwrap.dedent(extra), "    ")


def test_minimal_config_gets_every_default() -> None:
    config = parse_config(MINIMAL)
    assert config.listen == Address("0.0.0.0", 8080)
    assert str(config.admin_listen) == DEFAULT_ADMIN_LISTEN
    (route,) = config.routes
    assert route.name == "payments"
    assert route.path_prefix == "/payments"
    assert route.host is None
    assert route.upstream.origin == "http://payments:8080"
    assert route.upstream.base_path == ""
    assert route.strip_prefix is False
    assert (route.timeouts.connect, route.timeouts.request) == (2.0, 30.0)
    b = route.breaker
    assert (b.failure_threshold, b.open_duration, b.half_open_requests, b.success_threshold) == (
        5,
        30.0,
        1,
        1,
    )
    assert b.failure_status == {500, 502, 503, 504}
    assert route.line == 3


def test_config_objects_are_frozen() -> None:
    route = parse_config(MINIMAL).routes[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.name = "x"  # type: ignore[misc]


def test_defaults_are_inherited_key_by_key() -> None:
    config = parse_config(
        """
defaults:
  timeouts: {connect: 500ms}
  breaker: {failure_threshold: 7, open_duration: 2m, failure_status: [503]}
routes:
  - name: a
    match: {path_prefix: /a}
    upstream: http://a
    breaker: {open_duration: 1.5}
    timeouts: {request: 1h}
  - name: b
    match: {host: B.Internal}
    upstream: https://b/api/
"""
    )
    a, b = config.routes
    assert (a.breaker.failure_threshold, a.breaker.open_duration) == (7, 1.5)
    assert a.breaker.failure_status == {503}
    assert (a.timeouts.connect, a.timeouts.request) == (0.5, 3600.0)
    assert (b.breaker.failure_threshold, b.breaker.open_duration) == (7, 120.0)
    assert b.host == "b.internal"
    assert b.upstream.origin == "https://b:443"
    assert b.upstream.base_path == "/api"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("2", 2.0), ("'500ms'", 0.5), ("'2s'", 2.0), ("'5m'", 300.0), ("'1h'", 3600.0),
     ("'0.25s'", 0.25)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    config = parse_config(route_with(f"breaker: {{open_duration: {text}}}"))
    assert config.routes[0].breaker.open_duration == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'10 parsecs'", "is not a duration; use seconds (1.5) or a unit: ms, s, m, h"),
        ("-1", "must not be negative"),
        ("0", "must be greater than 0"),
        ("true", "must be a duration such as 1.5, '500ms', '2s', '5m', not a boolean (true)"),
        ("[1]", "must be a duration such as 1.5, '500ms', '2s', '5m', not a list"),
        ("1.0e+400", "must be at most 8784h"),
        ("'9999999h'", "must be at most 8784h"),
    ],
)
def test_bad_durations(value: str, message: str) -> None:
    error = one_error(route_with(f"breaker: {{open_duration: {value}}}"))
    assert error.startswith("c.yaml:6: routes[0].breaker.open_duration: ")
    assert error.endswith(message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be >= 1, not 0"),
        ("-3", "must be >= 1, not -3"),
        ("2.5", "must be a whole number >= 1, not float 2.5"),
        ("'3'", "must be a whole number >= 1, not a string ('3')"),
        ("yes", "must be a whole number >= 1, not a boolean (true)"),
        ("10000000000", "must be at most 1000000"),
    ],
)
@pytest.mark.parametrize("key", ["failure_threshold", "half_open_requests", "success_threshold"])
def test_thresholds_must_be_at_least_one(key: str, value: str, message: str) -> None:
    error = one_error(route_with(f"breaker: {{{key}: {value}}}"))
    assert error == f"c.yaml:6: routes[0].breaker.{key}: {message}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[500, 99]", "99 is not an HTTP status (100-599)"),
        ("[600]", "600 is not an HTTP status (100-599)"),
        ("['500']", "'500' is not an HTTP status (100-599)"),
        ("500", "must be a list of HTTP statuses such as [500, 503], not int 500"),
    ],
)
def test_failure_status_must_be_statuses(value: str, message: str) -> None:
    assert one_error(route_with(f"breaker: {{failure_status: {value}}}")) == (
        f"c.yaml:6: routes[0].breaker.failure_status: {message}"
    )


def test_empty_failure_status_is_allowed() -> None:
    config = parse_config(route_with("breaker: {failure_status: []}"))
    assert config.routes[0].breaker.failure_status == frozenset()


def test_unknown_keys_are_errors_with_a_suggestion() -> None:
    found = errors(
        """
listn: 0.0.0.0:8080
defaults:
  breaker: {failure_treshold: 3}
routes:
  - name: a
    match: {path_prefx: /a}
    upstream: http://a
    zzz: 1
"""
    )
    assert found == [
        "c.yaml:2: listn: unknown key 'listn'; did you mean 'listen'?",
        "c.yaml:4: defaults.breaker.failure_treshold: unknown key 'failure_treshold'; "
        "did you mean 'failure_threshold'?",
        "c.yaml:7: routes[0].match.path_prefx: unknown key 'path_prefx'; "
        "did you mean 'path_prefix'?",
        "c.yaml:9: routes[0].zzz: unknown key 'zzz' "
        "(known: name, match, upstream, strip_prefix, timeouts, breaker, max_body_size, "
        "max_websocket_sessions, connect, tls, "
        "rate_limit, bulkhead, fallback, recovery, retry)",
    ]


def test_every_error_is_reported_at_once_in_line_order() -> None:
    found = errors(
        """
listen: nowhere
admin: {listen: 127.0.0.1:99999}
routes:
  - name: Payments!
    match: {path_prefix: payments}
    upstream: ftp://payments
    breaker: {failure_threshold: 0}
  - name: ok
    match: {}
    upstream: http://
"""
    )
    assert found == [
        "c.yaml:2: listen: 'nowhere' is not 'host:port', such as '0.0.0.0:8080'",
        "c.yaml:3: admin.listen: '127.0.0.1:99999': the port must be a number from 0 to 65535",
        "c.yaml:5: routes[0].name: 'Payments!' is not a valid route name: "
        "use lower-case letters, digits, '_' and '-'",
        "c.yaml:6: routes[0].match.path_prefix: must start with '/', not a string ('payments')",
        "c.yaml:7: routes[0].upstream: 'ftp://payments': the scheme must be http or https",
        "c.yaml:8: routes[0].breaker.failure_threshold: must be >= 1, not 0",
        "c.yaml:10: routes[1].match: needs at least one of 'host' and 'path_prefix'",
        "c.yaml:11: routes[1].upstream: 'http://': the URL has no host",
    ]


def test_route_names_are_unique() -> None:
    found = errors(
        MINIMAL
        + """
  - name: payments
    match: {path_prefix: /other}
    upstream: http://other
"""
    )
    assert found == [
        "c.yaml:7: routes[1].name: duplicate route name 'payments' (first used at line 3)"
    ]


def test_a_route_that_can_never_match_is_an_error() -> None:
    found = errors(
        """
routes:
  - name: everything
    match: {path_prefix: /}
    upstream: http://a
  - name: orders
    match: {path_prefix: /orders}
    upstream: http://b
"""
    )
    assert found == [
        "c.yaml:6: routes[1]: route 'orders' can never match: route 'everything' (line 3) "
        "matches every request it would"
    ]


def test_a_more_specific_route_after_a_host_route_is_fine() -> None:
    config = parse_config(
        """
routes:
  - name: api-host
    match: {host: api.internal}
    upstream: http://a
  - name: orders
    match: {path_prefix: /orders}
    upstream: http://b
  - name: orders-v2
    match: {path_prefix: /orders-v2}
    upstream: http://b
"""
    )
    assert [r.name for r in config.routes] == ["api-host", "orders", "orders-v2"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://a?x=1", "'http://a?x=1': an upstream URL takes no query or fragment"),
        ("http://u:p@a", "'http://u:p@a': credentials in the URL are not supported"),
        ("http://a:99999", "'http://a:99999' is not a valid URL: Port out of range 0-65535"),
        ("a:80", "'a:80': the scheme must be http or https"),
        ("'[1]'", "'[1]': the scheme must be http or https"),
        ("42", "must be a URL such as 'http://payments:8080', not int 42"),
    ],
)
def test_bad_upstreams(value: str, message: str) -> None:
    error = one_error(MINIMAL.replace("http://payments:8080", value))
    assert error == f"c.yaml:5: routes[0].upstream: {message}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "must be 'host:port', such as '0.0.0.0:8080', not int 8080"),
        ("':8080'", "':8080' is not 'host:port', such as '0.0.0.0:8080'"),
        ("'[zz]:80'", "'[zz]:80': 'zz' is not an IPv6 address"),
        ("'a b:80'", "'a b:80': 'a b' is not an IP address or host name"),
        ("'h:http'", "'h:http': the port must be a number from 0 to 65535"),
    ],
)
def test_bad_listen_addresses(value: str, message: str) -> None:
    assert one_error(f"listen: {value}\n" + MINIMAL) == f"c.yaml:1: listen: {message}"


def test_listen_addresses_ipv6_and_port_zero() -> None:
    config = parse_config("listen: '[::1]:0'\nadmin: {listen: 'localhost:9000'}\n" + MINIMAL)
    assert config.listen == Address("::1", 0)
    assert str(config.listen) == "[::1]:0"
    assert config.admin_listen == Address("localhost", 9000)


def test_proxy_and_admin_cannot_share_an_address() -> None:
    error = one_error("listen: 127.0.0.1:9000\nadmin: {listen: 127.0.0.1:9000}\n" + MINIMAL)
    assert error == "c.yaml:2: admin.listen: is the same address as listen (127.0.0.1:9000)"


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{path_prefix: '/a?b'}", "path_prefix: '/a?b': a path prefix holds no query or fragment"),
        ("{host: 'api.internal:8080'}", "host: 'api.internal:8080': match the host without a port"),
        ("{host: 'not a host'}", "host: 'not a host' is not a host name"),
        ("{host: ''}", "host: must be a host name such as 'payments.internal', not a string"),
        ("[/a]", "match: must be a mapping of keys, not a list"),
    ],
)
def test_bad_matches(match: str, message: str) -> None:
    error = one_error(MINIMAL.replace("{path_prefix: /payments}", match))
    assert error.startswith("c.yaml:4: routes[0].match")
    assert message in error


def test_host_and_prefix_together() -> None:
    config = parse_config(
        MINIMAL.replace("{path_prefix: /payments}", "{host: p.internal, path_prefix: /v1/}")
    )
    route = config.routes[0]
    assert (route.host, route.path_prefix) == ("p.internal", "/v1")


def test_strip_prefix_needs_a_path_prefix() -> None:
    text = MINIMAL.replace("{path_prefix: /payments}", "{host: p}") + "    strip_prefix: true\n"
    assert one_error(text) == "c.yaml:6: routes[0].strip_prefix: needs match.path_prefix to strip"


def test_strip_prefix_must_be_a_boolean() -> None:
    assert one_error(MINIMAL + "    strip_prefix: 'yes'\n") == (
        "c.yaml:6: routes[0].strip_prefix: must be true or false, not a string ('yes')"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "c.yaml:1: (top level): the file is empty"),
        ("listen: 0.0.0.0:8080\n", "c.yaml:1: routes: at least one route is required"),
        ("routes: []\n", "c.yaml:1: routes: at least one route is required"),
        ("routes: {a: 1}\n", "c.yaml:1: routes: must be a list of routes, not a mapping"),
        ("- a\n- b\n", "c.yaml:1: (top level): must be a mapping of keys, not a list"),
        ("routes:\n  - just-a-string\n",
         "c.yaml:2: routes[0]: must be a mapping of keys, not a string ('just-a-string')"),
    ],
)  # fmt: skip
def test_shape_errors(text: str, message: str) -> None:
    assert message in errors(text)


def test_missing_required_route_keys() -> None:
    found = errors("routes:\n  - name: a\n")
    assert found == [
        "c.yaml:2: routes[0]: missing required key 'match'",
        "c.yaml:2: routes[0]: missing required key 'upstream'",
    ]


def test_yaml_syntax_errors_give_their_line() -> None:
    found = errors("routes:\n  - name: a\n    match: {path_prefix: /a\n    upstream: x\n")
    assert len(found) == 1
    assert found[0].startswith("c.yaml:4: (yaml): invalid YAML: ")


def test_duplicate_keys_are_errors() -> None:
    found = errors(MINIMAL + "    upstream: http://again\n")
    assert found == ["c.yaml:6: routes[0].upstream: duplicate key 'upstream'"]


def test_python_tags_are_refused_not_executed() -> None:
    found = errors("listen: !!python/object/apply:os.system ['echo pwned']\n" + MINIMAL)
    assert len(found) == 1
    assert found[0].startswith("c.yaml:1: (yaml): invalid YAML: ")
    assert "python/object/apply" in found[0]


def test_alias_bomb_is_stopped() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        bomb += (
            f"a{i}: &a{i} [*a{i - 1 if i > 1 else ''}" + f", *a{i - 1 if i > 1 else ''}" * 9 + "]\n"
        )
    bomb = bomb.replace("*a0", "*a")
    found = errors(bomb)
    assert found == ["c.yaml:1: (yaml): more than 100000 values (an alias bomb?)"]


def test_anchors_and_merge_keys_work() -> None:
    config = parse_config(
        """
x-strict: &strict {failure_threshold: 2, open_duration: 60s}
routes:
  - name: a
    match: {path_prefix: /a}
    upstream: http://a
    breaker: {<<: *strict, open_duration: 10s}
""".replace("x-strict: &strict", "defaults:\n  breaker: &strict")
    )
    assert (config.routes[0].breaker.failure_threshold, config.routes[0].breaker.open_duration) == (
        2,
        10.0,
    )


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(MINIMAL)
    assert load_config(str(path)).path == str(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}:0: (file): no such file"


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}:0: (file): is a directory, not a file"


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"routes: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:0: (file): is not UTF-8 text")


def test_the_example_config_is_valid() -> None:
    config = load_config(str(Path(__file__).parent.parent / "config.example.yaml"))
    by_name = {r.name: r for r in config.routes}
    assert (
        by_name["payments"].breaker.failure_threshold,
        by_name["payments"].breaker.open_duration,
    ) == (3, 60.0)
    assert (
        by_name["recommendations"].breaker.failure_threshold,
        by_name["recommendations"].breaker.open_duration,
    ) == (10, 30.0)
    assert (
        by_name["log-shipping"].breaker.failure_threshold,
        by_name["log-shipping"].breaker.open_duration,
    ) == (20, 300.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routes: " + "[" * 1000 + "]" * 1000 + "\n", "c.yaml:1: (yaml): nested far too deeply"),
        ("listen: " + "1" * 5000 + "\n" + MINIMAL, "c.yaml:1: (yaml): invalid value: Exceeds"),
        (
            "defaults: {breaker: {open_duration: " + "9" * 400 + "}}\n" + MINIMAL,
            "c.yaml:1: defaults.breaker.open_duration: must be at most 8784h",
        ),
        (
            "defaults: {breaker: {failure_status: [0x" + "f" * 4000 + "]}}\n" + MINIMAL,
            "failure_status: a very large number is not an HTTP status (100-599)",
        ),
        ("listen: '127.0.0.1:\u00b2'\n" + MINIMAL, "the port must be a number from 0 to 65535"),
        ("listen: '\u212a:80'\n" + MINIMAL, "is not an IP address or host name"),
        ("defaults: {<<: 5}\n" + MINIMAL, "c.yaml:1: defaults: '<<' merges mappings, not int 5"),
    ],
)
def test_hostile_values_give_messages_not_tracebacks(text: str, message: str) -> None:
    found = errors(text)
    assert len(found) == 1, found
    assert message in found[0]


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("'http://a b:80/'", "'a b' is not an IP address or host name"),
        ("'http://u/p\u00e4th'", "write the base path percent-encoded"),
        ("'http://u/a b'", "write the base path percent-encoded"),
    ],
)
def test_upstreams_must_be_sendable_as_written(upstream: str, message: str) -> None:
    assert message in one_error(MINIMAL.replace("http://payments:8080", upstream))


def test_path_prefix_must_be_on_the_wire_form() -> None:
    error = one_error(MINIMAL.replace("/payments}", "'/caf\u00e9'}"))
    assert "write the prefix as it appears on the wire, percent-encoded" in error
    config = parse_config(MINIMAL.replace("/payments}", "/caf%C3%A9}"))
    assert config.routes[0].path_prefix == "/caf%C3%A9"


# -- rate windows, slow calls and backoff ------------------------------------------------


def breaker_with(body: str, defaults: str = "") -> str:
    """A config whose one route has `breaker:` `body` (and `defaults.breaker` `defaults`)."""
    text = ""
    if defaults:
        text += "defaults:\n  breaker:\n" + textwrap.indent(textwrap.dedent(defaults), "    ")
    return text + route_with("breaker:\n" + textwrap.indent(textwrap.dedent(body), "  "))


def test_rate_keys_parse_into_exact_settings() -> None:
    (route,) = parse_config(
        breaker_with(
            """
            failure_threshold: null
            window: {duration: 30s, min_requests: 20}
            failure_rate: 50%
            slow_call_duration: 2s
            slow_call_rate: 0.8
            backoff_multiplier: 2
            max_open_duration: 5m
            jitter: 10%
            respect_retry_after: true
            mode: shadow
            """
        )
    ).routes
    b = route.breaker
    assert b.failure_threshold is None
    assert b.window == WindowSettings(duration=30.0, requests=None, min_requests=20)
    assert (b.failure_rate, b.slow_call_rate) == (Fraction(1, 2), Fraction(4, 5))
    assert (b.slow_call_duration, b.backoff_multiplier, b.max_open_duration) == (2.0, 2.0, 300.0)
    assert (b.jitter, b.respect_retry_after, b.mode) == (0.1, True, "shadow")


def test_without_the_new_keys_the_breaker_is_as_before() -> None:
    b = parse_config(MINIMAL).routes[0].breaker
    assert (b.window, b.failure_rate, b.slow_call_duration, b.slow_call_rate) == (None,) * 4
    assert (b.backoff_multiplier, b.jitter, b.respect_retry_after, b.mode) == (
        1.0,
        0.0,
        False,
        "enforce",
    )
    assert b.max_open_duration == DEFAULT_MAX_OPEN_DURATION


@pytest.mark.parametrize(
    ("value", "rate"),
    [("50%", Fraction(1, 2)), ("33.3%", Fraction(333, 1000)), ("100%", Fraction(1)),
     ("0.1", Fraction(1, 10)), ("1", Fraction(1)), ("'7.5 %'", Fraction(3, 40))],
)  # fmt: skip
def test_percentages(value: str, rate: Fraction) -> None:
    config = parse_config(breaker_with(f"window: {{requests: 10}}\nfailure_rate: {value}\n"))
    assert config.routes[0].breaker.failure_rate == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0%", "must be more than 0% (null turns the rule off)"),
        ("0", "must be more than 0% (null turns the rule off)"),
        ("101%", "'101%' is more than 100%"),
        ("50", "50 is not a fraction from 0 to 1; write '50%' or 0.5 for half"),
        ("-0.5", "-0.5 is not a fraction from 0 to 1; write '50%' or 0.5 for half"),
        ("half", "'half' is not a percentage; write '50%' or a fraction such as 0.5"),
        (".nan", "nan is not a fraction from 0 to 1; write '50%' or 0.5 for half"),
        ("true", "must be a percentage such as '50%' or 0.5, not a boolean (true)"),
    ],
)
def test_bad_percentages(value: str, message: str) -> None:
    text = breaker_with(f"window: {{requests: 10}}\nfailure_rate: {value}\n")
    assert one_error(text).endswith(f"routes[0].breaker.failure_rate: {message}")


def test_a_window_takes_exactly_one_kind() -> None:
    assert one_error(breaker_with("window: {duration: 30s, requests: 100}\n")) == (
        "c.yaml:7: routes[0].breaker.window: takes one of 'duration' (time-based) and "
        "'requests' (count-based), not both"
    )
    assert one_error(breaker_with("window: {min_requests: 5}\n")) == (
        "c.yaml:7: routes[0].breaker.window: needs 'duration' (the last N seconds) or "
        "'requests' (the last N outcomes)"
    )


def test_window_min_requests_defaults_and_limits() -> None:
    def window_of(body: str) -> WindowSettings | None:
        return parse_config(breaker_with(body)).routes[0].breaker.window

    assert window_of("window: {duration: 1m}\n") == WindowSettings(60.0, None, 20)
    assert window_of("window: {requests: 8}\n") == WindowSettings(None, 8, 8)
    assert window_of("window: {requests: 500}\n") == WindowSettings(None, 500, 20)
    assert one_error(breaker_with("window: {requests: 5, min_requests: 6}\n")).endswith(
        "routes[0].breaker.window.min_requests: min_requests (6) is more than "
        "window.requests (5): no rate rule could ever trip"
    )
    assert one_error(breaker_with("window: {requests: 1000000}\n")).endswith(
        "routes[0].breaker.window.requests: must be at most 100000"
    )


def test_a_route_window_replaces_the_kind_and_inherits_min_requests() -> None:
    defaults = "window: {duration: 30s, min_requests: 50}\nfailure_rate: 50%\n"
    config = parse_config(breaker_with("window: {requests: 200}\n", defaults))
    assert config.routes[0].breaker.window == WindowSettings(None, 200, 50)
    config = parse_config(breaker_with("window: {min_requests: 5}\n", defaults))
    assert config.routes[0].breaker.window == WindowSettings(30.0, None, 5)
    config = parse_config(breaker_with("failure_rate: null\nwindow: null\n", defaults))
    assert config.routes[0].breaker.window is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "failure_rate: 50%\n",
            "routes[0].breaker.failure_rate: failure_rate needs a window: add window.duration "
            "(time-based) or window.requests (count-based)",
        ),
        (
            "window: {requests: 10}\nslow_call_rate: 50%\n",
            "routes[0].breaker.slow_call_rate: slow_call_rate needs slow_call_duration: "
            "when is a call slow?",
        ),
        (
            "open_duration: 10m\nmax_open_duration: 5m\n",
            "routes[0].breaker.max_open_duration: max_open_duration (5m) is shorter than "
            "open_duration (10m)",
        ),
        (
            "failure_threshold: null\n",
            "routes[0].breaker.failure_threshold: no rule can open this circuit: set "
            "failure_threshold, failure_rate, slow_call_rate or respect_retry_after",
        ),
        ("backoff_multiplier: 0.5\n", "must be from 1 (no backoff) to 100, not 0.5"),
        ("backoff_multiplier: 1000000000\n", "must be from 1 (no backoff) to 100, not 1000000000"),
        ("jitter: 150%\n", "'150%' is more than 100%"),
        ("mode: enforcing\n", "must be 'enforce' or 'shadow', not a string ('enforcing')"),
        ("respect_retry_after: yes please\n", "must be true or false, not a string"),
        ("slow_call_duration: 0\n", "must be greater than 0"),
        ("window: [30s]\n", "must be a mapping of keys, not a list"),
        (
            "window: {duration: 500ms}\nfailure_rate: 50%\n",
            "routes[0].breaker.window.duration: must be at least 1s: a shorter window holds "
            "too few outcomes to judge a rate by",
        ),
        (
            "window: {duration: 1.0e-320}\nfailure_rate: 50%\n",
            "routes[0].breaker.window.duration: must be at least 1s",
        ),
        (
            "window: {requests: 10}\nslow_call_duration: 30s\nslow_call_rate: 50%\n",
            "routes[0].breaker.slow_call_duration: slow_call_duration (30s) is not shorter than "
            "timeouts.request (30s): a call that takes that long has timed out, so no call "
            "could ever be slow",
        ),
        (
            "open_duration: 10m\nbackoff_multiplier: 2\n",
            "routes[0].breaker.backoff_multiplier: backoff_multiplier 2 can never grow the open "
            "period: max_open_duration is no longer than open_duration (10m); set a longer "
            "max_open_duration",
        ),
        (
            "max_open_duration: 10m\n",
            "routes[0].breaker.max_open_duration: caps nothing here: set backoff_multiplier "
            "above 1, or respect_retry_after",
        ),
        ("window: {duration: 30s, size: 3}\n", "unknown key 'size'"),
    ],
)
def test_rate_and_backoff_settings_are_checked(body: str, message: str) -> None:
    assert message in one_error(breaker_with(body))


def test_a_contradiction_in_defaults_is_reported_once_not_per_route() -> None:
    text = (
        "defaults:\n  breaker: {failure_rate: 50%}\n"
        + MINIMAL
        + ("  - name: other\n    match: {path_prefix: /other}\n    upstream: http://other\n")
    )
    assert one_error(text).startswith("c.yaml:2: defaults.breaker.failure_rate: failure_rate needs")


def test_a_route_that_breaks_an_inherited_limit_is_told_where() -> None:
    text = breaker_with("open_duration: 10m\n", defaults="max_open_duration: 2m\n")
    assert one_error(text) == (
        "c.yaml:10: routes[0].breaker.open_duration: max_open_duration (2m) is shorter "
        "than open_duration (10m)"
    )


def test_max_open_duration_defaults_to_five_minutes_or_open_duration() -> None:
    (route,) = parse_config(breaker_with("open_duration: 10m\n")).routes
    assert route.breaker.max_open_duration == 600.0


def test_an_invalid_window_is_not_also_reported_as_missing() -> None:
    assert one_error(breaker_with("window: {duration: 1ms}\nfailure_rate: 50%\n")).endswith(
        "routes[0].breaker.window.duration: must be at least 1s: a shorter window holds "
        "too few outcomes to judge a rate by"
    )


def test_a_route_timeout_that_outlasts_slow_calls_is_told_at_the_timeout() -> None:
    text = breaker_with("{}\n", defaults="slow_call_duration: 2s\n").replace(
        "    breaker:\n      {}\n", "    timeouts: {request: 1s}\n"
    )
    assert one_error(text) == (
        "c.yaml:9: routes[0].timeouts.request: slow_call_duration (2s) is not shorter than "
        "timeouts.request (1s): a call that takes that long has timed out, so no call could "
        "ever be slow"
    )


def test_max_open_duration_null_goes_back_to_the_default() -> None:
    text = breaker_with(
        "max_open_duration: null\n", defaults="backoff_multiplier: 2\nmax_open_duration: 1h\n"
    )
    assert parse_config(text).routes[0].breaker.max_open_duration == DEFAULT_MAX_OPEN_DURATION


def test_the_admin_listener_is_loopback_unless_configured_otherwise() -> None:
    """/metrics, /breakers and (later) the admin overrides are not for the network at large."""
    assert parse_config(MINIMAL).admin_listen == Address("127.0.0.1", 9901)
    open_admin = parse_config("admin: {listen: 0.0.0.0:9901}\n" + MINIMAL)
    assert open_admin.admin_listen == Address("0.0.0.0", 9901)
