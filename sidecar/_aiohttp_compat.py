"""Every private name of aiohttp the sidecar uses, in one place, each pinned by a test.

aiohttp is the admin listener's server; the proxy's request path uses none of
it. What remains here is what aiohttp offers no public way to do. Each use is
checked by `tests/test_aiohttp_compat.py` against the installed aiohttp, and
`pyproject.toml` pins aiohttp to the minor versions that test passed on: to
widen the pin, install the new version, run that test file, and adjust here
whatever it names.
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["set_shutdown_timeout"]


def set_shutdown_timeout(runner: web.BaseRunner, seconds: float) -> None:
    """Bound how long `runner.cleanup()` waits for each request in hand.

    aiohttp takes it only when the runner is made (`shutdown_timeout=`); the
    sidecar's grace can change with a reload after that. (`BaseRunner._shutdown_timeout`,
    read by `cleanup()`, aiohttp 3.9 to 3.14 at least.)
    """
    runner._shutdown_timeout = seconds
