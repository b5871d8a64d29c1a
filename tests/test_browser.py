"""A real browser on the sidecar's machine: web pages of other origins, shown in headless
Chromium, post forms to the admin listener, which must refuse them.

Selenium's calls block, so they run in a thread while this loop serves the sidecar
and the pages. Select it alone with `-m browser`; skipped where Chromium, its driver or
selenium are missing (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import MultiMapping

from sidecar import admin
from sidecar.breaker import State
from tests.conftest import StartSidecar, Upstream, two_routes

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_HOST = "page.example"
"""A name for the pages' server that is no site of the admin's (Chromium maps it to
127.0.0.1 itself, so no DNS is asked)."""


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian's {package} package; .ci/run installs it)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is missing (pip install -e '.[test]')"
    return None


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium under chromedriver, named by path: no driver download."""
    missing = _missing()
    if missing is not None:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--host-resolver-rules=MAP {PAGE_HOST} 127.0.0.1",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def form_page(action: str, enctype: str, fields: str = "") -> str:
    """A page whose form posts itself to `action` as soon as it is shown."""
    return f"""<!doctype html>
<html><body onload="document.forms[0].submit()">
<form method="post" action="{action}" enctype="{enctype}">{fields}</form>
</body></html>"""


FORCE_FIELDS = """<input type="hidden" name='{"state":"' value='","state":"forced_open"}'>"""
"""text/plain sends `name=value`: this makes `{"state":"=","state":"forced_open"}`, JSON
whose last "state" wins."""


@contextlib.asynccontextmanager
async def serve_pages(admin_url: str) -> AsyncIterator[int]:
    """A web server of two pages on a port of its own: /force posts
    {"state": "forced_open"} to route a as text/plain, /reset resets route b."""

    pages = {
        "/force": form_page(f"{admin_url}/breakers/a", "text/plain", FORCE_FIELDS),
        "/reset": form_page(f"{admin_url}/breakers/b/reset", "application/x-www-form-urlencoded"),
    }

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.path], content_type="text/html")

    app = web.Application()
    for path in pages:
        app.router.add_get(path, page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        yield server.port
    finally:
        await server.close()


def submit(driver: Any, page: str, action: str) -> dict[str, object]:
    """Show `page`, whose form posts itself to `action`; the answer the browser shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page)
    WebDriverWait(driver, 10).until(
        lambda d: d.current_url == action and d.find_elements(By.TAG_NAME, "pre")
    )
    shown = json.loads(driver.find_element(By.TAG_NAME, "pre").text)
    assert isinstance(shown, dict)
    return shown


async def test_pages_of_other_origins_change_no_breaker(
    start_sidecar: StartSidecar,
    upstream: Upstream,
    chromium: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = await start_sidecar(two_routes(upstream))
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(f"{s.proxy}/b/status/500") as response:
                assert response.status == 500
    assert s.breaker("b").state is State.OPEN
    # Each refusal of the rule, to show the browser's requests did arrive and were refused.
    refusals: list[str] = []
    rule = admin._cross_site

    def counted(headers: MultiMapping[str], own_port: int, allowed: Collection[str]) -> str | None:
        found = rule(headers, own_port, allowed)
        if found is not None:
            refusals.append(found)
        return found

    monkeypatch.setattr(admin, "_cross_site", counted)
    force, reset = s.admin + "/breakers/a", s.admin + "/breakers/b/reset"
    async with serve_pages(s.admin) as port:
        # 127.0.0.1 on another port: the same site, another origin.
        shown = await asyncio.to_thread(submit, chromium, f"http://127.0.0.1:{port}/force", force)
        assert shown["error"] == "cross_site_request"
        # A page of another site.
        shown = await asyncio.to_thread(submit, chromium, f"http://{PAGE_HOST}:{port}/reset", reset)
        assert shown["error"] == "cross_site_request"
        assert s.breaker("a").state is State.CLOSED
        assert s.breaker("b").state is State.OPEN
        assert refusals == [
            f"Origin 'http://127.0.0.1:{port}' is not this listener's own ({s.admin})",
            "Sec-Fetch-Site: cross-site: a web page of another site sent this request",
        ]

        # The same pages against the admin as it was before the rule: they do change
        # the breakers, so the browser really sends what the rule refuses.
        monkeypatch.setattr(admin, "_cross_site", lambda *_: None)
        monkeypatch.setattr(admin, "_not_json", lambda _: None)
        shown = await asyncio.to_thread(submit, chromium, f"http://127.0.0.1:{port}/force", force)
        assert shown["state"] == "forced_open"
        shown = await asyncio.to_thread(submit, chromium, f"http://{PAGE_HOST}:{port}/reset", reset)
        assert shown["state"] == "closed"
    assert s.breaker("a").state is State.FORCED_OPEN
    assert s.breaker("b").state is State.CLOSED
