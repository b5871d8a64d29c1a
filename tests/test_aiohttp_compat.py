"""aiohttp's private names the sidecar uses (`sidecar._aiohttp_compat`), one test each.

`pyproject.toml` pins aiohttp to the minor versions this file passed on; to widen
the pin, install the new version and run this file (README, "aiohttp versions").
The proxy's request path uses no aiohttp at all: what is left is the admin
listener's graceful stop.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import aiohttp
from aiohttp import web, web_runner

from sidecar import _aiohttp_compat

PACKAGE = Path(_aiohttp_compat.__file__).parent


def test_set_shutdown_timeout_sets_what_cleanup_reads() -> None:
    """`BaseRunner._shutdown_timeout`: set at construction, read by `cleanup()` (through
    `shutdown()`) as each request's wait; the compat function writes it."""
    runner = web.AppRunner(web.Application())
    assert isinstance(runner._shutdown_timeout, float)
    _aiohttp_compat.set_shutdown_timeout(runner, 1.25)
    assert runner._shutdown_timeout == 1.25
    read_by = inspect.getsource(web_runner.BaseRunner.cleanup) + inspect.getsource(
        web_runner.BaseRunner.shutdown
    )
    assert "self._shutdown_timeout" in read_by, aiohttp.__version__


def test_no_other_module_of_the_package_reaches_into_aiohttp() -> None:
    """Every private aiohttp name goes through the compat module: no other module of
    the package imports a private aiohttp module or reads an underscored attribute of
    anything it got from aiohttp."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_aiohttp_compat.py":
            continue
        tree = ast.parse(path.read_text())
        aiohttp_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
                module = node.module or ""
                if any(part.startswith("_") for part in module.split(".")):
                    offenders.append(f"{path.name}: from {module} import ...")
                for alias in node.names:
                    if alias.name.startswith("_"):
                        offenders.append(f"{path.name}: {alias.name} from {module}")
                    aiohttp_names.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("aiohttp"):
                        aiohttp_names.add((alias.asname or alias.name).split(".")[0])
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aiohttp_names
            ):
                offenders.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_the_request_path_imports_no_aiohttp() -> None:
    """The proxy listener, the exchange and the upstream modules run on httptools alone."""
    for name in ("listener", "exchange", "proxy", "upstream", "upstream_pool", "timers",
                 "responses", "routing"):  # fmt: skip
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {
            (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert not {m for m in imported if m.split(".")[0] in ("aiohttp", "multidict", "yarl")}, (
            name
        )
