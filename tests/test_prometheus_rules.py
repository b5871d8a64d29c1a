"""The alert rules and the Grafana dashboard in deploy/: promtool, and the series they name."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartSidecar, Upstream

ROOT = Path(__file__).parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"
README = ROOT / "README.md"
DEMO_CERTS = ROOT / "examples" / "tls"
SEVERITIES = {"critical", "warning", "info"}
PER_ROUTE = re.compile(
    r"\bsidecar_(breaker|requests|rejected|upstream|in_flight|rate_limit|bulkhead|recovery|fallback"
    r"|retries|websocket|connect_tunnels|tls)"
)

TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""
NOT_EXPORTED = {"up": TARGET_LABELS}
"""Series Prometheus makes itself, with their labels."""

ROUTES = """
routes:
  - name: provider
    match: {host: provider.test}
    upstream: PROVIDER_URL
    connect: true
    tls:
      ca_file: DEMO_CERTS/ca.pem
      cert_file: DEMO_CERTS/client.pem
      key_file: DEMO_CERTS/client-key.pem
  - name: search
    match: {path_prefix: /search}
    upstream: UPSTREAM
    rate_limit: {rate: 100/s, mode: shadow}
    retry: {}
    breaker:
      mode: shadow
      window: {duration: 30s, min_requests: 5}
      failure_rate: 50%
      slow_call_duration: 1s
      slow_call_rate: 80%
  - name: payments
    match: {path_prefix: /}
    upstream: UPSTREAM
    rate_limit: {rate: 6000/m, burst: 200}
    bulkhead: {max_concurrent: 64, max_queued: 16, queue_timeout: 1s}
    recovery: {ramp: 30s, min_share: 10%}
    fallback:
      reasons: [circuit_open, circuit_recovering, rate_limited, bulkhead_full]
      status: 200
      body: '{"items": []}'
"""
"""Every kind of route, so that the sidecar exports every series and label value it has
(the rate-limit, bulkhead and fallback series exist only for routes that configure them,
the retry reasons beyond connect only for a route with a retry policy, and the two
certificate expiry gauges only for an https route with a client certificate that has
connected)."""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is missing: apt-get install prometheus (Debian's package has it)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_targets() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expr) for every query of the dashboard."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


# -- the rules themselves -----------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_runbook_and_tests_that_fire_it_and_not() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        if "route" in rule["expr"]:  # a per-route alert says which route
            assert "$labels.route" in annotations["summary"], name
        assert name in fired, f"no test shows {name} firing"
        assert name in quiet, f"no test shows {name} staying quiet"


# -- every series named exists --------------------------------------------------------------

SELECTOR = re.compile(r"\b(sidecar_\w+|up)\s*\{([^{}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)")


@pytest.fixture
async def provider() -> AsyncIterator[str]:
    """An HTTPS upstream with the example's demo server certificate, which wants a client
    certificate the demo CA signed (mTLS), as config.example.yaml's sms-gateway does."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=DEMO_CERTS / "ca.pem")
    context.load_cert_chain(DEMO_CERTS / "server.pem", DEMO_CERTS / "server-key.pem")
    context.verify_mode = ssl.CERT_REQUIRED

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    yield f"https://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
async def exported(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    provider: str,
    http: aiohttp.ClientSession,
) -> dict[str, dict[str, set[str]]]:
    """Each sample name a running sidecar's /metrics shows: its labels and their values."""
    routes = ROUTES.replace("PROVIDER_URL", provider).replace("DEMO_CERTS", str(DEMO_CERTS))
    sc = await start_sidecar(routes.replace("UPSTREAM", upstream.url))
    # One call through the https route, so that its upstream's certificate is seen.
    async with http.get(f"{sc.proxy}/", headers={"Host": "provider.test"}) as response:
        assert response.status == 200, await response.text()
    async with http.get(f"{sc.admin}/metrics") as response:
        text = await response.text()
    series: dict[str, dict[str, set[str]]] = {
        name: {label: set() for label in labels} for name, labels in NOT_EXPORTED.items()
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {label: set() for label in TARGET_LABELS})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return series


def unknown_names(text: str, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """The metric names, labels and label values in `text` that the sidecar does not export."""
    problems = [
        f"no series {name}" for name in re.findall(r"\bsidecar_\w+", text) if name not in exported
    ]
    known_labels = {"le"}.union(*(labels for labels in exported.values()))
    for grouping in GROUPING.findall(text):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in known_labels:
                problems.append(f"no series has a label {label}")
    for name, matchers in SELECTOR.findall(text):
        labels = exported.get(name)
        if labels is None:
            continue  # reported above
        for label, op, value in MATCHER.findall(matchers):
            if label not in labels:
                problems.append(f"{name} has no label {label}")
            elif label not in TARGET_LABELS | {"route"} and "$" not in value and op != "!~":
                wanted = value.split("|") if op == "=~" else [value]
                problems += [
                    f"{name}{{{label}={v!r}}} is never exported"
                    for v in wanted
                    if v not in labels[label]
                ]
    return problems


def test_the_names_checker_catches_a_misspelt_series_label_and_value() -> None:
    exported = {"sidecar_breaker_state": {"route": {"a"}, "state": {"open"}, "job": set()}}
    assert unknown_names('sidecar_breaker_state{state="open"}', exported) == []
    assert unknown_names(
        'sum by (rout) (sidecar_breaker_states{job="x"}) + sidecar_breaker_state{stat="open"}'
        ' + sidecar_breaker_state{state=~"open|opne"}',
        exported,
    ) == [
        "no series sidecar_breaker_states",
        "no series has a label rout",
        "sidecar_breaker_state has no label stat",
        "sidecar_breaker_state{state='opne'} is never exported",
    ]


def test_the_alert_rules_name_only_series_the_sidecar_exports(
    exported: dict[str, dict[str, set[str]]],
) -> None:
    for rule in alert_rules():
        text = "\n".join([rule["expr"], *rule["annotations"].values()])
        assert unknown_names(text, exported) == [], rule["alert"]


def test_the_dashboard_names_only_series_the_sidecar_exports(
    exported: dict[str, dict[str, set[str]]],
) -> None:
    for title, expr in dashboard_targets():
        assert unknown_names(expr, exported) == [], title


# -- the dashboard ----------------------------------------------------------------------------


def dashboard_queries(kind: str | None = None) -> str:
    """Every query of the dashboard's panels (of type `kind` only, if given), a line each."""
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    return "\n".join(t["expr"] for p in panels if kind in (None, p["type"]) for t in p["targets"])


def test_the_dashboard_has_its_variables_and_the_panels_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "sidecar_breaker_state" in variables["route"]["query"]["query"]
    assert variables["route"]["includeAll"] and variables["route"]["multi"]

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            if PER_ROUTE.search(target["expr"]):  # the route variable filters it
                assert 'route=~"$route"' in target["expr"], panel["title"]

    assert "sidecar_breaker_state" in dashboard_queries("state-timeline")
    everything = dashboard_queries()
    assert re.search(r"by \(route, reason\) \(rate\(sidecar_rejected_requests_total", everything)
    assert re.search(r"by \(route, kind\) \(rate\(sidecar_upstream_failures_total", everything)
    assert re.search(r"by \(route, code\) \(rate\(sidecar_requests_total", everything)
    assert "sidecar_in_flight_requests" in everything
    quantiles = re.findall(
        r"histogram_quantile\((0\.\d+), sum by \(route, le\) "
        r"\(rate\(sidecar_upstream_request_duration_seconds_bucket",
        everything,
    )
    assert quantiles == ["0.5", "0.9", "0.99"]


def test_the_dashboard_shows_the_traffic_policies() -> None:
    """Issue 14: rejections by reason, tokens, the bulkhead, the recovery ramp, fallbacks."""
    everything = dashboard_queries()
    # The three owners of a rejection, as the alerts tell them apart.
    for reasons in (
        'reason=~"circuit_open|circuit_half_open|circuit_recovering"',
        'reason="rate_limited"',
        'reason="bulkhead_full"',
    ):
        assert re.search(
            r"sum by \(route\) \(rate\(sidecar_rejected_requests_total\{[^}]*" + re.escape(reasons),
            everything,
        ), reasons
    for series in (
        "sidecar_rate_limit_tokens",
        "sidecar_rate_limit_shadow_limited_total",
        "sidecar_bulkhead_in_flight_requests",
        "sidecar_bulkhead_queued_requests",
        "sidecar_recovery_share",
    ):
        assert series in everything, series
    assert re.search(r"by \(route, reason\) \(rate\(sidecar_fallback_responses_total", everything)
    assert re.search(
        r"histogram_quantile\(0\.99, sum by \(route, le\) "
        r"\(rate\(sidecar_bulkhead_queue_wait_seconds_bucket",
        everything,
    )


def test_the_dashboard_shows_the_retries() -> None:
    """Issue 15: retries by reason, denials by reason, and the retries' share of the tries."""
    everything = dashboard_queries()
    assert re.search(r"by \(route, reason\) \(rate\(sidecar_retries_total", everything)
    assert re.search(r"by \(route, reason\) \(rate\(sidecar_retries_denied_total", everything)
    assert re.search(
        r"sum by \(route\) \(rate\(sidecar_retries_total\{[^}]*\}\[\$__rate_interval\]\)\)"
        r" / sum by \(route\) \(rate\(sidecar_upstream_tries_total\{",
        everything,
    )


def test_the_dashboard_shows_the_protocols() -> None:
    """Issue 16: sessions and tunnels open, those turned away at the cap, TLS failures, and
    the days left on both certificates."""
    everything = dashboard_queries()
    for series in ("sidecar_websocket_sessions", "sidecar_connect_tunnels"):
        assert re.search(r"sum by \(route\) \(" + series + r"\{", everything), series
    assert re.search(
        r"sum by \(route\) \(rate\(sidecar_rejected_requests_total\{[^}]*"
        r'reason="websocket_sessions_full"',
        everything,
    )
    assert re.search(
        r'sum by \(route\) \(rate\(sidecar_upstream_failures_total\{[^}]*kind="tls"', everything
    )
    for series in (
        "sidecar_tls_client_cert_expiry_timestamp_seconds",
        "sidecar_upstream_tls_cert_expiry_timestamp_seconds",
    ):
        assert re.search(r"\(" + series + r"\{[^}]*\} - time\(\)\) / 86400", everything), series
    rows = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    assert "Protocols" in rows


def test_each_rejection_reason_has_one_owning_alert() -> None:
    """A 429 or a full bulkhead never raises the breaker's alerts, and the other way round."""
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    breaker = exprs["SidecarHighRejectionRatio"]
    assert 'reason=~"circuit_open|circuit_half_open|circuit_recovering"' in breaker
    assert "rate_limited" not in breaker and "bulkhead_full" not in breaker
    assert "websocket_sessions_full" not in breaker  # a cap reached: the upstream is fine
    assert 'reason="rate_limited"' in exprs["SidecarRateLimited"]
    assert "unless on (job, instance, route)" in exprs["SidecarRateLimited"]
    assert 'reason="bulkhead_full"' in exprs["SidecarBulkheadFull"]
    assert 'reason="websocket_sessions_full"' in exprs["SidecarWebSocketSessionsFull"]
    for name, expr in exprs.items():
        if name != "SidecarWebSocketSessionsFull":
            assert "websocket_sessions_full" not in expr, name
    # A retry denial is no rejection: only the budget's own denials raise its alert.
    budget = exprs["SidecarRetryBudgetExhausted"]
    assert 'sidecar_retries_denied_total{reason="budget"}' in budget
    assert "sidecar_rejected_requests_total" not in budget
    assert not any(
        "retries_denied" in expr
        for name, expr in exprs.items()
        if name != "SidecarRetryBudgetExhausted"
    )


# -- the README -----------------------------------------------------------------------------

DOCUMENTED_VALUES = {
    "sidecar_rejected_requests_total": "reason",
    "sidecar_upstream_failures_total": "kind",
    "sidecar_breaker_state": "state",
    "sidecar_retries_denied_total": "reason",
    "sidecar_upstream_tries_total": "result",
}
"""Series whose label values the README's Metrics table lists in full."""


def readme_metrics_table() -> dict[str, str]:
    """The README's Metrics table: each series' name and its row."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(sidecar_\w+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_the_readme_documents_every_series_the_sidecar_exports(
    exported: dict[str, dict[str, set[str]]],
) -> None:
    rows = readme_metrics_table()
    for name, labels in exported.items():
        if not name.startswith("sidecar_"):
            continue
        documented = name if name in rows else re.sub(r"_(bucket|sum|count)$", "", name)
        assert documented in rows, f"the README's Metrics table has no {name}"
        label = DOCUMENTED_VALUES.get(name)
        for value in sorted(labels.get(label, ())) if label else ():
            assert f"`{value}`" in rows[documented], f"the README's {name} row lacks {value}"
    for name in rows:
        assert name in exported or f"{name}_bucket" in exported, f"the README names {name}"
