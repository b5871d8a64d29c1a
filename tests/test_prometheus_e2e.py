"""A real Prometheus scraping a real `sidecar run`: it sees a route open, and so do the alerts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Upstream, running

ROOT = Path(__file__).parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
DEADLINE = 30.0
"""Seconds Prometheus gets to show something: its first scrape alone comes about 6 s
after it starts, since its target discovery sends its first targets on a 5 s tick."""

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is missing: apt-get install prometheus (Debian's package)",
)

CONFIG = """
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - name: search
    match: {{path_prefix: /search}}
    upstream: {url}
    strip_prefix: true
    breaker: {{failure_threshold: 3, open_duration: 10m, mode: shadow}}
  - name: payments
    match: {{path_prefix: /}}
    upstream: {url}
    breaker: {{failure_threshold: 3, open_duration: 10m}}
"""


def alert_expr(name: str) -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return str(next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == name))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query, with Grafana's variables filled in as "All"."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            for variable in ("$job", "$instance", "$route"):
                expr = expr.replace(variable, ".*")
            found.append((panel["title"], expr))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A running Prometheus server and its HTTP API."""

    def __init__(self, url: str, log: Path, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.log = log
        self.http = http

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> dict[str, float]:
        """The instant vector `expr` gives now, as {route: value} ("" for no route label)."""
        data = await self.get("/api/v1/query", query=expr)
        return {r["metric"].get("route", ""): float(r["value"][1]) for r in data["result"]}

    async def alerts(self, name: str) -> dict[str, str]:
        """The active (pending or firing) alerts called `name`, as {route: state}."""
        data = await self.get("/api/v1/alerts")
        return {
            a["labels"].get("route", ""): a["state"]
            for a in data["alerts"]
            if a["labels"]["alertname"] == name
        }

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@contextlib.asynccontextmanager
async def prometheus(target: str | None) -> AsyncIterator[Prometheus]:
    """Prometheus on a free loopback port with the alert rules, scraping `target`
    (host:port) every second; killed, and its files removed, afterwards."""
    assert PROMETHEUS is not None
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-prometheus-"))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "sidecar", "static_configs": [{"targets": [target]}]}]
        if target
        else [],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    process: asyncio.subprocess.Process | None = None
    try:
        async with aiohttp.ClientSession() as http:
            for _attempt in range(3):  # another process may take the free port first
                url = f"http://127.0.0.1:{free_port()}"
                with log.open("ab") as log_file:
                    process = await asyncio.create_subprocess_exec(
                        PROMETHEUS,
                        f"--config.file={workdir / 'prometheus.yml'}",
                        f"--storage.tsdb.path={workdir / 'tsdb'}",
                        f"--web.listen-address={url.removeprefix('http://')}",
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=log_file,
                    )
                if await ready(http, url, process):
                    break
            else:
                raise AssertionError(f"prometheus did not start:\n{log.read_text()}")
            yield Prometheus(url, log, http)
    finally:
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def ready(http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process) -> bool:
    """Whether Prometheus answers /-/ready (False: it exited, e.g. its port was taken)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while process.returncode is None:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/-/ready") as response:
                if response.status == 200:
                    return True
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"prometheus at {url} not ready within {DEADLINE} s")
        await asyncio.sleep(0.05)
    return False


async def until_all_seen(
    observe: Callable[[], Awaitable[dict[str, Any]]], prom: Prometheus
) -> dict[str, Any]:
    """Observe Prometheus again and again until every observation is non-empty."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        seen = await observe()
        if all(seen.values()):
            return seen
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not seen within {DEADLINE} s: {seen}\n{prom.log_tail()}")
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_prometheus_sees_the_route_open_and_the_alert_pending_but_not_for_shadow(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG.format(url=upstream.url))
    async with running(str(config)) as (_process, proxy, admin), aiohttp.ClientSession() as http:
        # Three 500s open payments; search, in shadow mode, opens too but forwards on.
        for path, statuses in (
            ("/status/500", [500, 500, 500, 503]),
            ("/search/status/500", [500, 500, 500, 500]),
        ):
            answered = []
            for _ in statuses:
                async with http.get(f"http://{proxy}{path}") as response:
                    answered.append(response.status)
            assert answered == statuses, path

        timeline = next(expr for title, expr in dashboard_exprs() if title == "Breaker state")
        async with prometheus(admin) as prom:

            async def observe() -> dict[str, Any]:
                return {
                    "up": await prom.query('up{job="sidecar"}'),
                    "open": await prom.query('sidecar_breaker_state{state="open"} == 1'),
                    "paging": await prom.query(alert_expr("SidecarCircuitOpen")),
                    "shadow": await prom.query(alert_expr("SidecarShadowCircuitOpen")),
                    "alerts": await prom.alerts("SidecarCircuitOpen"),
                    "shadow_alerts": await prom.alerts("SidecarShadowCircuitOpen"),
                    "timeline": await prom.query(timeline),
                }

            seen = await until_all_seen(observe, prom)

    assert seen["up"] == {"": 1.0}
    assert seen["open"] == {"payments": 1.0, "search": 1.0}
    # The paging alert's expression sees payments; search is open but in shadow mode.
    assert seen["paging"] == {"payments": 1.0}
    assert seen["shadow"] == {"search": 1.0}
    # Evaluated every second, with `for: 5m`: pending, not firing yet.
    assert seen["alerts"] == {"payments": "pending"}
    assert seen["shadow_alerts"] == {"search": "pending"}
    assert seen["timeline"] == {"payments": 2.0, "search": 2.0}  # 2 is shown as OPEN


async def test_every_dashboard_query_and_alert_expression_is_valid_promql() -> None:
    """Prometheus' query API answers an error for what does not parse (promtool 2.42 has
    no parse-only command)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = dashboard_exprs() + [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]
    async with prometheus(None) as prom:
        for title, expr in exprs:
            async with prom.http.get(f"{prom.url}/api/v1/query", params={"query": expr}) as r:
                body = await r.json()
            assert body["status"] == "success", (title, expr, body)
