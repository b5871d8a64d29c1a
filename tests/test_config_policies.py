"""Config of the traffic policies: rate_limit, bulkhead, fallback, recovery."""

from __future__ import annotations

import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_config, parse_config
from sidecar.policies import (
    FALLBACK_REASONS,
    BulkheadSettings,
    RateLimitSettings,
    RecoverySettings,
)


def config(text: str, filename: str = "c.yaml"):  # type: ignore[no-untyped-def]
    return parse_config(textwrap.dedent(text), filename)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(text)
    return [str(p) for p in info.value.problems]


def route(policies: str, defaults: str = "") -> str:
    return (
        (f"defaults:\n{textwrap.indent(textwrap.dedent(defaults), '  ')}" if defaults else "")
        + """
routes:
  - name: api
    match: {path_prefix: /api}
    upstream: http://api:8080
"""
        + textwrap.indent(textwrap.dedent(policies), "    ")
    )


def test_no_policies_unless_configured() -> None:
    (r,) = config(route("")).routes
    assert (r.rate_limit, r.bulkhead, r.fallback, r.recovery) == (None, None, None, None)


@pytest.mark.parametrize(
    ("rate", "count", "period"),
    [
        ("100/s", 100, 1.0),
        ("100/60s", 100, 60.0),
        ("6000/m", 6000, 60.0),
        ("5/h", 5, 3600.0),
        ("3 / 500ms", 3, 0.5),
        ("1/1.5s", 1, 1.5),
    ],
)
def test_rates_and_the_burst_that_defaults_to_the_count(
    rate: str, count: int, period: float
) -> None:
    (r,) = config(route(f"rate_limit: {{rate: '{rate}'}}")).routes
    assert r.rate_limit == RateLimitSettings(count, period, count, "enforce")


def test_policies_inherit_from_defaults_key_by_key_and_null_turns_them_off(
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").write_bytes(b"")
    text = """
    defaults:
      rate_limit: {rate: 10/s, burst: 20}
      bulkhead: {max_concurrent: 4, max_queued: 2}
      recovery: {ramp: 30s}
      fallback: {reasons: [circuit_open], body: 'a'}
    routes:
      - name: a
        match: {path_prefix: /a}
        upstream: http://a
        rate_limit: {mode: shadow}
        bulkhead: {queue_timeout: 250ms}
        recovery: {min_share: 25%}
        fallback: {body_file: EMPTY}
      - name: b
        match: {path_prefix: /b}
        upstream: http://b
        rate_limit: null
        bulkhead: null
        recovery: null
        fallback: null
    """
    a, b = config(text.replace("EMPTY", str(tmp_path / "empty"))).routes
    assert a.rate_limit == RateLimitSettings(10, 1.0, 20, "shadow")
    assert a.bulkhead == BulkheadSettings(4, 2, 0.25)
    assert a.recovery == RecoverySettings(30.0, Fraction(1, 4))
    assert a.fallback is not None
    assert (a.fallback.body, a.fallback.body_file) == (
        b"",
        str(tmp_path / "empty"),
    )  # the file replaced 'a'
    assert a.fallback.reasons == {"circuit_open"}
    assert (b.rate_limit, b.bulkhead, b.recovery, b.fallback) == (None, None, None, None)


def test_fallback_defaults_and_a_body_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "fallbacks").mkdir()
    (tmp_path / "fallbacks" / "empty.json").write_bytes(b'{"items": []}\n')
    path = tmp_path / "sidecar.yaml"
    path.write_text(route("fallback: {body_file: fallbacks/empty.json}"))
    (r,) = load_config(str(path)).routes
    f = r.fallback
    assert f is not None
    assert f.reasons == frozenset(FALLBACK_REASONS)
    assert (f.status, f.headers, f.body) == (
        200,
        (("Content-Type", "application/json"),),
        b'{"items": []}\n',
    )
    assert f.body_file == str(tmp_path / "fallbacks" / "empty.json")


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        (
            "rate_limit: {rate: 10}",
            "rate_limit.rate: 10 is not a rate; say per what, such as '10/s'",
        ),
        ("rate_limit: {rate: 0/s}", "rate_limit.rate: '0/s' admits nothing"),
        ("rate_limit: {rate: 10/fortnight}", "rate_limit.rate: 'fortnight' is not a duration"),
        ("rate_limit: {rate: 10/s, burst: 0}", "rate_limit.burst: 0 admits nothing"),
        ("rate_limit: {burst: 5}", "rate_limit: needs rate"),
        ("rate_limit: {rate: 1/s, mode: dry}", "rate_limit.mode: must be 'enforce' or 'shadow'"),
        ("rate_limit: {rate: 1/s, scope: fleet}", "rate_limit.scope: 'fleet' shares the rate"),
        (
            "rate_limit: {rate: 1/s, scop: local}",
            "rate_limit.scop: unknown key 'scop'; did you mean 'scope'?",
        ),
        ("rate_limit: {}", "rate_limit: is empty"),
        ("rate_limit: 10/s", "rate_limit: must be a mapping of keys"),
        ("bulkhead: {max_queued: 3}", "bulkhead: needs max_concurrent"),
        ("bulkhead: {max_concurrent: 0}", "bulkhead.max_concurrent: must be >= 1"),
        (
            "bulkhead: {max_concurrent: 2, max_queued: -1}",
            "bulkhead.max_queued: must be >= 0 (0: no queue), not -1",
        ),
        (
            "bulkhead: {max_concurrent: 2, queue_timeout: 1s}",
            "bulkhead.queue_timeout: has no queue to time out: set max_queued above 0",
        ),
        (
            "{breaker: {half_open_requests: 3}, bulkhead: {max_concurrent: 2}}",
            "bulkhead.max_concurrent: max_concurrent (2) is below the breaker's "
            "half_open_requests (3)",
        ),
        ("fallback: {reasons: [circuit_opne]}", "did you mean 'circuit_open'?"),
        ("fallback: {reasons: []}", "fallback.reasons: is empty"),
        ("fallback: {status: 199}", "fallback.status: must be an HTTP status from 200 to 599"),
        ("fallback: {status: 204, body: x}", "fallback: status 204 has no body"),
        (
            f"fallback: {{body: x, body_file: {Path(__file__).parent / 'test_config.py'}}}",
            "fallback: takes one of 'body' and 'body_file'",
        ),
        ("fallback: {body_file: missing.json}", "fallback.body_file: missing.json: no such file"),
        (
            "fallback: {body_file: /dev/null}",
            "fallback.body_file: /dev/null: is not a regular file",
        ),
        ("fallback: {body_file: /tmp}", "fallback.body_file: /tmp: is a directory"),
        ("fallback: {body: {items: []}}", "fallback.body: must be text (quote JSON"),
        ("fallback: {headers: {Content-Length: 3}}", "Content-Length: not allowed here"),
        ("fallback: {headers: {Retry-After: 3}}", "Retry-After of the answer it replaces"),
        ("fallback: {headers: {'Bad Name': x}}", "'Bad Name' is not a header name"),
        ("fallback: {headers: {X-A: [1]}}", "X-A: the value must be text"),
        ('fallback: {headers: {X-A: "a\\x01"}}', "X-A: the value must be one line of printable"),
        ("fallback: {headers: {X-A: a, x-a: b}}", "x-a: given twice"),
        ("bulkhead: {max_concurrent: 2, max_queued: 1.5}", "bulkhead.max_queued: must be a whole"),
        ("recovery: {min_share: 10%}", "recovery: needs ramp"),
        ("recovery: {ramp: 0s}", "recovery.ramp: must be greater than 0"),
        ("recovery: {ramp: 10s, min_share: 100%}", "recovery.min_share: must be below 100%"),
    ],
)
def test_each_mistake_is_one_clear_error(policies: str, message: str) -> None:
    text = (
        route(policies)
        if not policies.startswith("{")
        else route("\n".join(f"{k}: {v}" for k, v in _split(policies)))
    )
    found = errors(text)
    assert len(found) == 1, found
    assert message in found[0], found


def _split(mapping: str) -> list[tuple[str, str]]:
    """`{a: {..}, b: {..}}` as its two top-level items (for a route's several keys)."""
    import yaml

    data = yaml.safe_load(mapping)
    return [(k, yaml.safe_dump(v, default_flow_style=True).strip()) for k, v in data.items()]


def test_a_mistake_in_defaults_is_reported_once_not_per_route() -> None:
    text = """
    defaults:
      bulkhead: {max_queued: 2}
    routes:
      - {name: a, match: {path_prefix: /a}, upstream: 'http://a'}
      - {name: b, match: {path_prefix: /b}, upstream: 'http://b'}
    """
    assert errors(text) == [
        "c.yaml:3: defaults.bulkhead: needs max_concurrent: the requests in flight at once"
    ]


def test_every_error_at_once_with_its_line() -> None:
    found = errors(
        route(
            """
            rate_limit: {rate: 10/s, burst: 0}
            bulkhead: {max_concurrent: 0}
            fallback: {status: 99}
            recovery: {ramp: -1s}
            """
        )
    )
    assert [line.split(": ")[0] for line in found] == [
        "c.yaml:7",
        "c.yaml:8",
        "c.yaml:9",
        "c.yaml:10",
    ]


def test_an_inherited_bulkhead_too_small_for_a_routes_probes_is_reported_at_the_route() -> None:
    text = """
    defaults:
      bulkhead: {max_concurrent: 2}
    routes:
      - name: a
        match: {path_prefix: /a}
        upstream: http://a
        breaker: {half_open_requests: 3}
      - {name: b, match: {path_prefix: /b}, upstream: 'http://b'}
    """
    assert errors(text) == [
        "c.yaml:8: routes[0].breaker.half_open_requests: max_concurrent (2) is below the "
        "breaker's half_open_requests (3): probes could never all be in flight"
    ]


def test_retry_with_every_default_and_key_by_key() -> None:
    from sidecar.policies import RetrySettings

    (r,) = config(route("retry: {}")).routes
    assert r.retry == RetrySettings(
        attempts=2,
        retry_on_kinds=frozenset({"connect"}),
        retry_on_statuses=frozenset({502, 503, 504}),
        methods=frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"}),
        per_try_timeout=None,
        deadline=None,
        backoff_base=0.025,
        backoff_max=0.25,
        budget_ratio=Fraction(1, 5),
        budget_min_per_second=10.0,
        replay_max_body=64 * 1024,
    )
    (r,) = config(
        route(
            "retry: {attempts: 3, retry_on: [timeout, 429], budget: {ratio: 10%}}",
            defaults="retry: {per_try_timeout: 2s, methods: [GET]}",
        )
    ).routes
    assert r.retry is not None
    assert (r.retry.attempts, r.retry.per_try_timeout, r.retry.methods) == (3, 2.0, {b"GET"})
    assert (r.retry.retry_on_kinds, r.retry.retry_on_statuses) == ({"timeout"}, {429})
    assert (r.retry.budget_ratio, r.retry.budget_min_per_second) == (Fraction(1, 10), 10.0)
    assert config(route("retry: null", defaults="retry: {}")).routes[0].retry is None


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ("retry: {attempts: 0}", "retry.attempts: must be >= 1"),
        ("retry: {attempts: 11}", "retry.attempts: must be at most 10"),
        ("retry: {retry_on: [reset]}", "'reset' is never retried"),
        ("retry: {retry_on: [conect]}", "'conect' is neither a failure kind"),
        ("retry: {retry_on: [200]}", "neither a failure kind (connect, timeout, tls) nor a status"),
        ("retry: {retry_on: []}", "retry.retry_on: must be a list"),
        ("retry: {methods: [POST]}", "POST is not idempotent"),
        ("retry: {methods: [get]}", "'get' is not a method"),
        ("retry: {backoff: {base: 1s, max: 10ms}}", "max (10ms) is shorter than base (1s)"),
        ("retry: {backoff: {bse: 1s}}", "unknown key 'bse'"),
        ("retry: {budget: {ratio: 0%, min_per_second: 0}}", "admit no retry at all"),
        ("retry: {budget: {ratio: 150%}}", "is more than 100%"),
        ("retry: {replay_max_body: 1GiB}", "must be at most 16MiB"),
        ("retry: {per_try_timeout: 5s, deadline: 2s}", "per_try_timeout (5s) is longer than"),
        ("retry: {atempts: 2}", "unknown key 'atempts'; did you mean 'attempts'?"),
        (
            "{breaker: {slow_call_duration: 1s}, retry: {per_try_timeout: 1s}}",
            "per_try_timeout (1s) is not longer than the breaker's slow_call_duration (1s)",
        ),
    ],
)
def test_each_retry_mistake_is_one_clear_error(policies: str, message: str) -> None:
    if policies.startswith("{"):
        policies = "\n".join(f"{k}: {v}" for k, v in _split(policies))
    found = errors(route(policies))
    assert len(found) == 1, found
    assert message in found[0], found
