"""Logs: one JSON object a line (the default), or plain text, on stderr.

Every line has these keys, in this order, whatever logged it (aiohttp included):

    time     ISO 8601, UTC, milliseconds: "2026-11-27T11:07:25.123Z"
    level    "debug", "info", "warning" or "error"
    logger   "sidecar", "sidecar.access", "aiohttp.server", ...
    event    what happened, a stable name to filter on (below); "log" for anything else
    message  the same line as text mode prints, for people

and then the event's own fields. The events and their fields:

    started             proxy, admin (addresses), routes (count), version
    breaker_transition  route, from, to, reason; period (seconds) when `to` is "open"
    admin_action        action ("force", "reset", "reload"), route, state, ttl, client
    reload              result ("success" or "failure"); on success kept, updated, reset,
                        added, removed (route names) and restart_required (keys);
                        on failure errors (one string each)
    stopping            signal, grace (seconds)
    stopped             -
    access              client, method, path (no query string), route (null: unrouted),
                        status (null: the connection broke before an answer), duration_ms
    admin_refused       reason ("cross_site_request"), detail, path, client: an admin POST
                        a browser sent for a page of another origin (warning)
    bad_request         client, status (400, 408, 501, 505), reason: a request the proxy
                        listener refused before any route saw it (warning; a TLS handshake
                        on the plain-HTTP port at debug level)

A field is never renamed or removed within a major version; new ones may appear.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from sidecar.config import LogSettings

__all__ = ["ACCESS", "JsonFormatter", "configure", "event"]

ACCESS = logging.getLogger("sidecar.access")
"""One line per proxied request, when `log.access` is on."""

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def event(logger: logging.Logger, level: int, name: str, message: str, /, **fields: Any) -> None:
    """Log `message`, with `name` as its JSON `event` and `fields` as its JSON fields."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """The schema of this module's docstring."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(settings: LogSettings) -> None:
    """Send every logger's lines to stderr in `settings.format`, from `settings.level` up.

    Called again on reload: the handler is replaced, never added twice.
    """
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if getattr(handler, "_sidecar", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._sidecar = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter() if settings.format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # The access log is at INFO: on with `log.access`, whatever the level says of the rest.
    ACCESS.setLevel(logging.INFO if settings.access else logging.CRITICAL + 1)
