"""Configuration: YAML in, validated and frozen objects out, or every error at once.

This module only parses and validates. It never logs, exits or opens sockets:
the command line decides what to do with a `ConfigError`, whose `problems`
each read `FILE:LINE: dotted.key.path: message`.

Every default is a named constant below. `defaults:` in the file overrides
them key by key, and each route overrides `defaults:` key by key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from sidecar.breaker import MODES, BreakerSettings, Mode, WindowSettings
from sidecar.files import FileProblem, read_small_file
from sidecar.policies import (
    FALLBACK_REASONS,
    RETRY_KINDS,
    BulkheadSettings,
    FallbackSettings,
    RateLimitSettings,
    RecoverySettings,
    RetrySettings,
)
from sidecar.routing import Router, authority
from sidecar.tls import TLS_VERSIONS, TlsSettings, TlsSetupError, build_context, resolve_path

__all__ = [
    "Address",
    "ClientTimeouts",
    "Config",
    "ConfigError",
    "LogSettings",
    "Problem",
    "Route",
    "Timeouts",
    "Upstream",
    "format_duration",
    "load_config",
    "parse_config",
]

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"
DEFAULT_ADMIN_ALLOWED_HOSTS: tuple[str, ...] = ()
"""Host names, besides IP addresses and localhost, that the admin's POSTs may name in
their Host header: none, so a DNS name rebound to this machine changes nothing."""
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_CLIENT_HEADER_TIMEOUT = 10.0
DEFAULT_CLIENT_IDLE_TIMEOUT = 75.0
DEFAULT_CLIENT_WRITE_TIMEOUT = 60.0
DEFAULT_WEBSOCKET_IDLE_TIMEOUT = 3600.0
"""Seconds a WebSocket session or CONNECT tunnel may stay silent both ways."""
DEFAULT_MAX_WEBSOCKET_SESSIONS = 1000
"""Per route: WebSocket sessions and CONNECT tunnels open at once."""
DEFAULT_SHUTDOWN_GRACE = 15.0
"""Seconds in-flight requests get to finish after SIGTERM."""
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_BODY_SIZE: int | None = None
"""No limit: bodies stream through in bounded memory whatever their size."""
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_OPEN_DURATION = 30.0
DEFAULT_HALF_OPEN_REQUESTS = 1
DEFAULT_SUCCESS_THRESHOLD = 1
DEFAULT_FAILURE_STATUS = frozenset({500, 502, 503, 504})
DEFAULT_MIN_REQUESTS = 20
"""A window's floor for the rate rules; a count window of fewer requests uses its size."""
DEFAULT_MAX_OPEN_DURATION = 300.0
"""The backoff's and an upstream's Retry-After's cap, unless `open_duration` is longer."""
DEFAULT_BACKOFF_MULTIPLIER = 1.0
DEFAULT_JITTER = 0.0
DEFAULT_RESPECT_RETRY_AFTER = False
DEFAULT_MODE: Mode = "enforce"
DEFAULT_FALLBACK_STATUS = 200
DEFAULT_FALLBACK_HEADERS = (("Content-Type", "application/json"),)
DEFAULT_MIN_SHARE = Fraction(1, 10)
MAX_FALLBACK_BODY = 1024 * 1024
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = (frozenset({"connect"}), frozenset({502, 503, 504}))
DEFAULT_RETRY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
DEFAULT_RETRY_BACKOFF = (0.025, 0.25)
DEFAULT_RETRY_BUDGET = (Fraction(1, 5), 10.0)
DEFAULT_REPLAY_MAX_BODY = 64 * 1024
MAX_RETRY_ATTEMPTS = 10
MAX_REPLAY_BODY = 16 * 1024 * 1024

MAX_DURATION = 366 * 24 * 3600.0
"""Longer than any sane timeout or open period; keeps the arithmetic finite."""
MAX_COUNT = 1_000_000
MAX_WINDOW_REQUESTS = 100_000
"""A count window keeps one byte per outcome: 100 KB at the most per route."""
MAX_BACKOFF_MULTIPLIER = 100.0
MIN_WINDOW_DURATION = 1.0
MAX_NODES = 100_000
"""YAML nodes walked at the most: an alias bomb stops here, not in memory."""

ROUTE_NAME = re.compile(r"[a-z0-9_-]+")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
}  # fmt: skip
MAX_SIZE = 2**50
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*%")
_URL_PATH = re.compile(r"(/[A-Za-z0-9\-._~!$&'()*+,;=:@%]*)*")
"""A path as it goes on the wire: RFC 3986 characters only, anything else percent-encoded."""
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?"
)


# -- what the config becomes ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return authority(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    """Seconds for the TCP connect to the upstream."""
    request: float
    """Seconds for the whole upstream exchange until its response headers."""
    websocket_idle: float = DEFAULT_WEBSOCKET_IDLE_TIMEOUT
    """Seconds a WebSocket session or CONNECT tunnel may stay silent both ways."""


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Deadlines for the service's side of the proxy listener."""

    headers: float
    """Seconds from a request's first byte to its last header byte (slowloris)."""
    idle: float
    """Seconds a client connection may wait for its next request (or its first)."""
    write: float = DEFAULT_CLIENT_WRITE_TIMEOUT
    """Seconds a client may take to accept each part of its response (slow readers)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    """As written in the file, for messages."""
    scheme: str
    host: str
    port: int
    base_path: str
    """The URL's path without a trailing slash; "" when it has none."""

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{authority(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    host: str | None
    """Lower-case host name to match, port-less; None matches any host."""
    path_prefix: str | None
    """Segment-aware prefix without a trailing slash ("/" matches all); None matches any path."""
    upstream: Upstream
    strip_prefix: bool
    timeouts: Timeouts
    breaker: BreakerSettings
    max_body_size: int | None
    """Request body bytes accepted (413 beyond); None: no limit."""
    line: int
    """Where the route starts in the file."""
    rate_limit: RateLimitSettings | None = None
    bulkhead: BulkheadSettings | None = None
    fallback: FallbackSettings | None = None
    recovery: RecoverySettings | None = None
    retry: RetrySettings | None = None
    max_websocket_sessions: int = DEFAULT_MAX_WEBSOCKET_SESSIONS
    connect: bool = False
    """CONNECT to `host`:the upstream's port is tunnelled to the upstream."""
    tls: TlsSettings | None = None
    """For an https upstream: the settings in force, with their context."""


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "json"
    """"json" (one object a line, the documented schema) or "text"."""
    level: str = "info"
    access: bool = False
    """One line per proxied request when true."""


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    listen: Address
    admin_listen: Address
    routes: tuple[Route, ...]
    client_timeouts: ClientTimeouts = ClientTimeouts(
        DEFAULT_CLIENT_HEADER_TIMEOUT, DEFAULT_CLIENT_IDLE_TIMEOUT
    )
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    log: LogSettings = LogSettings()
    admin_allowed_hosts: tuple[str, ...] = DEFAULT_ADMIN_ALLOWED_HOSTS
    """Lower-case host names, port-less, that an admin POST's Host header may name."""
    warnings: tuple[str, ...] = ()
    """Valid but unwise settings, each a line for the log at every start and reload."""


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        # One line whatever the file held: a message never breaks the format.
        message = self.message.replace("\r", "\\r").replace("\n", "\\n")
        return f"{self.file}:{self.line}: {self.path}: {message}"


class ConfigError(Exception):
    """The config cannot be used; `problems` says every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


# -- entry points ---------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and validate the config file at `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([Problem(path, 0, "(file)", "no such file")]) from None
    except IsADirectoryError:
        raise ConfigError([Problem(path, 0, "(file)", "is a directory, not a file")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(path, 0, "(file)", f"is not UTF-8 text: {e.reason}")]) from None
    except OSError as e:
        raise ConfigError([Problem(path, 0, "(file)", f"cannot read: {e.strerror}")]) from None
    return parse_config(text, path)


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate config text; `filename` is used in messages, and a `body_file` is read
    relative to its directory (the working directory's for "<config>")."""
    reader = _Reader(filename)
    document = reader.load(text)
    config = reader.config(document) if not reader.problems else None
    if reader.problems or config is None:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line))
    return config


# -- YAML with positions ----------------------------------------------------------

_TOO_DEEP = "nested far too deeply"

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML was built with it: 5 to 10 times as fast on large files."""

Path = tuple[str | int, ...]
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
T = TypeVar("T")
_MISSING: Any = object()


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_<>-]{1,64}")


def _dotted(path: Path) -> str:
    """`routes[0].breaker.window`; a key that is not a plain word is quoted: `a['x y']`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{_short_repr(part)}]"
    return out or "(top level)"


def _short_repr(text: str, limit: int = 40) -> str:
    """`repr(text)`, escapes and all, cut to about `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class _Reader:
    """Turns YAML into plain values, remembering the line of every path, and validates them."""

    def __init__(self, filename: str) -> None:
        self.file = filename
        self.problems: list[Problem] = []
        self.lines: dict[Path, int] = {}
        self._nodes = 0
        self.warnings: list[str] = []
        """What is valid but unwise, for the log (`verify: false`)."""
        self._contexts: dict[TlsSettings, TlsSettings] = {}
        """TLS contexts built so far, by their settings: routes that share settings share
        a context (and its TLS sessions)."""

    def error(self, path: Path, message: str) -> None:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        problem = Problem(self.file, self.lines.get(probe, 1), _dotted(path), message)
        if problem not in self.problems:  # (an inherited mistake is found once per route)
            self.problems.append(problem)

    # -- loading --

    def load(self, text: str) -> Any:
        loader: yaml.SafeLoader | None = None
        try:
            loader = _Loader(text)
            node = loader.get_single_node()
            if node is None:
                self.problems.append(Problem(self.file, 1, "(top level)", "the file is empty"))
                return None
            return self._walk(loader, node, ())
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            if "maximum nesting depth" in (e.problem or ""):
                # libyaml's own depth limit (in the wheels of PyYAML 6.0.4 on); with an
                # older libyaml the same file ends in RecursionError below. One message.
                self.problems.append(Problem(self.file, line, "(yaml)", _TOO_DEEP))
            else:
                what = " ".join(filter(None, [e.context, e.problem]))
                self.problems.append(Problem(self.file, line, "(yaml)", f"invalid YAML: {what}"))
        except yaml.reader.ReaderError as e:  # a control character, or bytes that are not text
            line = text.count("\n", 0, e.position) + 1
            character = chr(e.character) if isinstance(e.character, int) else e.character
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    "(yaml)",
                    f"invalid YAML: the character {character!r} is not allowed in a YAML file",
                )
            )
        except yaml.YAMLError as e:
            self.problems.append(Problem(self.file, 1, "(yaml)", f"invalid YAML: {e}"))
        except _TooLarge:
            self.problems.append(
                Problem(self.file, 1, "(yaml)", f"more than {MAX_NODES} values (an alias bomb?)")
            )
        except RecursionError:
            self.problems.append(Problem(self.file, 1, "(yaml)", _TOO_DEEP))
        except (ValueError, OverflowError) as e:  # e.g. an integer of thousands of digits
            self.problems.append(Problem(self.file, 1, "(yaml)", f"invalid value: {e}"))
        finally:
            if loader is not None:
                loader.dispose()
        return None

    def _scalar(self, loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        """A scalar's value; a value its tag cannot hold is a YAML error at its line."""
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError):
            raise  # reported as "invalid value", as before
        except (KeyError, IndexError, AttributeError, TypeError):
            # PyYAML's constructors for `!!bool maybe`, `!!int ''`, `!!timestamp x`.
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {node.tag}", node.start_mark
            ) from None

    def _walk(self, loader: yaml.SafeLoader, node: yaml.Node, path: Path) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooLarge
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            raise yaml.constructor.ConstructorError(
                None, None, f"the tag {node.tag!r} is not allowed here", node.start_mark
            )
        if isinstance(node, yaml.MappingNode):
            return self._walk_mapping(loader, node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self._walk(loader, item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(loader, node)

    def _walk_mapping(self, loader: yaml.SafeLoader, node: yaml.MappingNode, path: Path) -> Any:
        result: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *base` merges a mapping (or a list of them); explicit keys win.
                value = self._walk(loader, value_node, path)
                for source in value if isinstance(value, list) else [value]:
                    if not isinstance(source, dict):
                        line = key_node.start_mark.line + 1
                        message = f"'<<' merges mappings, not {_kind(source)}"
                        self.problems.append(Problem(self.file, line, _dotted(path), message))
                        continue
                    merged = {**source, **merged}
                continue
            # A key is never walked into (nor an alias bomb in one expanded): only a
            # scalar can be a string.
            key = self._scalar(loader, key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if key is None and not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                what = "keys must be strings, not collections"
                if key_node.tag not in _PLAIN_TAGS:
                    what = f"the tag {key_node.tag!r} is not allowed here (keys must be strings)"
                self.problems.append(Problem(self.file, line, _dotted(path), what))
                continue
            if not isinstance(key, str):
                self.lines.setdefault((*path, str(key)), key_node.start_mark.line + 1)
                self.error((*path, str(key)), "keys must be strings")
                continue
            if key in result:
                line = key_node.start_mark.line + 1
                self.problems.append(
                    Problem(self.file, line, _dotted((*path, key)), f"duplicate key {key!r}")
                )
                continue
            self.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = self._walk(loader, value_node, (*path, key))
        return {**merged, **result}

    # -- checking shapes --

    def mapping(self, value: Any, path: Path, known: Iterable[str]) -> dict[str, Any] | None:
        """`value` as a mapping whose keys are all in `known`, or None after an error."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping of keys, not {_kind(value)}")
            return None
        known = list(known)
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
                self.error((*path, key), f"unknown key {key!r}{hint}")
        return value

    def field(
        self, table: dict[str, Any], key: str, path: Path, parse: Callable[[Any], T], default: T
    ) -> T:
        """Parse `table[key]` with `parse`, or return `default` if absent or invalid."""
        if key not in table:
            return default
        try:
            return parse(table[key])
        except _Invalid as e:
            self.error((*path, key), str(e))
        except (ValueError, OverflowError):
            self.error((*path, key), f"{_kind(table[key])} is out of range")
        return default

    # -- the schema --

    def config(self, document: Any) -> Config | None:
        top = self.mapping(
            document,
            (),
            ["listen", "admin", "client_timeouts", "shutdown_grace", "log", "defaults", "routes"],
        )
        if top is None:
            return None
        listen = self.field(top, "listen", (), parse_address, parse_address(DEFAULT_LISTEN))
        admin = self.mapping(top.get("admin"), ("admin",), ["listen", "allowed_hosts"]) or {}
        admin_listen = self.field(
            admin, "listen", ("admin",), parse_address, parse_address(DEFAULT_ADMIN_LISTEN)
        )
        admin_allowed_hosts = self.allowed_hosts(admin, ("admin",))
        if listen == admin_listen and listen.port != 0:
            self.error(("admin", "listen"), f"is the same address as listen ({listen})")

        client_table = (
            self.mapping(
                top.get("client_timeouts"), ("client_timeouts",), ["headers", "idle", "write"]
            )
            or {}
        )
        positive = _duration(minimum_exclusive=0.0)
        client_timeouts = ClientTimeouts(
            headers=self.field(
                client_table,
                "headers",
                ("client_timeouts",),
                positive,
                DEFAULT_CLIENT_HEADER_TIMEOUT,
            ),
            idle=self.field(
                client_table, "idle", ("client_timeouts",), positive, DEFAULT_CLIENT_IDLE_TIMEOUT
            ),
            write=self.field(
                client_table, "write", ("client_timeouts",), positive, DEFAULT_CLIENT_WRITE_TIMEOUT
            ),
        )
        shutdown_grace = self.field(
            top, "shutdown_grace", (), parse_duration, DEFAULT_SHUTDOWN_GRACE
        )
        log_table = self.mapping(top.get("log"), ("log",), ["format", "level", "access"]) or {}
        log = LogSettings(
            format=self.field(log_table, "format", ("log",), _choice(LOG_FORMATS), "json"),
            level=self.field(log_table, "level", ("log",), _choice(LOG_LEVELS), "info"),
            access=self.field(log_table, "access", ("log",), _bool, False),
        )

        defaults = (
            self.mapping(
                top.get("defaults"),
                ("defaults",),
                [
                    "timeouts",
                    "breaker",
                    "max_body_size",
                    "max_websocket_sessions",
                    "tls",
                    *POLICY_KEYS,
                ],
            )
            or {}
        )
        base_max_body_size = self.field(
            defaults, "max_body_size", ("defaults",), _optional(parse_size), DEFAULT_MAX_BODY_SIZE
        )
        base_timeouts = self.timeouts(
            defaults.get("timeouts"),
            ("defaults", "timeouts"),
            Timeouts(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT),
        )
        base_sessions = self.field(
            defaults,
            "max_websocket_sessions",
            ("defaults",),
            _count,
            DEFAULT_MAX_WEBSOCKET_SESSIONS,
        )
        base_tls = self.tls_layer(defaults, ("defaults",)) or {}
        base_breaker = self.breaker(
            defaults.get("breaker"),
            ("defaults", "breaker"),
            BreakerSettings(
                failure_threshold=DEFAULT_FAILURE_THRESHOLD,
                open_duration=DEFAULT_OPEN_DURATION,
                half_open_requests=DEFAULT_HALF_OPEN_REQUESTS,
                success_threshold=DEFAULT_SUCCESS_THRESHOLD,
                failure_status=DEFAULT_FAILURE_STATUS,
                window=None,
                failure_rate=None,
                slow_call_duration=None,
                slow_call_rate=None,
                backoff_multiplier=DEFAULT_BACKOFF_MULTIPLIER,
                max_open_duration=None,  # filled in per route: see `_resolve`
                jitter=DEFAULT_JITTER,
                respect_retry_after=DEFAULT_RESPECT_RETRY_AFTER,
                mode=DEFAULT_MODE,
            ),
        )
        defaults_valid = self.check_breaker(
            _resolve(base_breaker),
            base_timeouts,
            ("defaults", "breaker"),
            _table(defaults.get("breaker")),
            _table(defaults.get("timeouts")),
            route_level=False,
        )

        base_policies = {
            name: self.policy_layer(defaults, name, ("defaults",)) or {} for name in POLICY_KEYS
        }
        self.policies(base_policies, {}, ("defaults",), _resolve(base_breaker))

        routes_value = top.get("routes", _MISSING)
        if routes_value is _MISSING or routes_value is None or routes_value == []:
            self.error(("routes",), "at least one route is required")
            return None
        if not isinstance(routes_value, list):
            self.error(("routes",), f"must be a list of routes, not {_kind(routes_value)}")
            return None
        routes: list[tuple[int, Route]] = []
        for i, item in enumerate(routes_value):
            route = self.route(
                item,
                ("routes", i),
                base_timeouts,
                base_breaker,
                base_max_body_size,
                defaults_valid,
                base_policies,
                base_sessions,
                base_tls,
            )
            if route is not None:
                routes.append((i, route))
        self.check_names(routes)
        self.check_reachable(routes)
        return Config(
            self.file,
            listen,
            admin_listen,
            tuple(route for _, route in routes),
            client_timeouts,
            shutdown_grace,
            log,
            admin_allowed_hosts=admin_allowed_hosts,
            warnings=tuple(dict.fromkeys(self.warnings)),
        )

    def allowed_hosts(self, table: dict[str, Any], path: Path) -> tuple[str, ...]:
        """`admin.allowed_hosts`, each wrong item reported at its own line."""
        if "allowed_hosts" not in table:
            return DEFAULT_ADMIN_ALLOWED_HOSTS
        path = (*path, "allowed_hosts")
        value = table["allowed_hosts"]
        if not isinstance(value, list):
            self.error(
                path,
                f"must be a list of host names such as ['sidecar.internal'], not {_kind(value)}",
            )
            return DEFAULT_ADMIN_ALLOWED_HOSTS
        hosts: list[str] = []
        for i, item in enumerate(value):
            try:
                host = _allowed_host(item)
            except _Invalid as e:
                self.error((*path, i), str(e))
                continue
            if host not in hosts:
                hosts.append(host)
        return tuple(hosts)

    def timeouts(self, value: Any, path: Path, base: Timeouts) -> Timeouts:
        table = self.mapping(value, path, ["connect", "request", "websocket_idle"]) or {}
        positive = _duration(minimum_exclusive=0.0)
        return Timeouts(
            connect=self.field(table, "connect", path, positive, base.connect),
            request=self.field(table, "request", path, positive, base.request),
            websocket_idle=self.field(table, "websocket_idle", path, positive, base.websocket_idle),
        )

    def breaker(self, value: Any, path: Path, base: BreakerSettings) -> BreakerSettings:
        table = self.mapping(value, path, BREAKER_KEYS) or {}

        def get(key: str, parse: Callable[[Any], T], default: T) -> T:
            return self.field(table, key, path, parse, default)

        return BreakerSettings(
            failure_threshold=get("failure_threshold", _optional(_count), base.failure_threshold),
            open_duration=get(
                "open_duration", _duration(minimum_exclusive=0.0), base.open_duration
            ),
            half_open_requests=get("half_open_requests", _count, base.half_open_requests),
            success_threshold=get("success_threshold", _count, base.success_threshold),
            failure_status=get("failure_status", _status_set, base.failure_status),
            window=self.window(table, path, base.window),
            failure_rate=get("failure_rate", _optional(_rate), base.failure_rate),
            slow_call_duration=get(
                "slow_call_duration",
                _optional(_duration(minimum_exclusive=0.0)),
                base.slow_call_duration,
            ),
            slow_call_rate=get("slow_call_rate", _optional(_rate), base.slow_call_rate),
            backoff_multiplier=get(
                "backoff_multiplier", _backoff_multiplier, base.backoff_multiplier
            ),
            max_open_duration=get(
                "max_open_duration",
                _optional(_duration(minimum_exclusive=0.0)),  # null: back to the default
                base.max_open_duration,
            ),
            jitter=get("jitter", _jitter, base.jitter),
            respect_retry_after=get("respect_retry_after", _bool, base.respect_retry_after),
            mode=get("mode", _mode, base.mode),
        )

    def window(
        self, table: dict[str, Any], path: Path, base: WindowSettings | None
    ) -> WindowSettings | None:
        """`window:` over `base`: a new kind or size replaces the old, `min_requests` inherits."""
        if "window" not in table:
            return base
        path = (*path, "window")
        if table["window"] is None:
            return None  # `window: null` turns an inherited window off
        window = self.mapping(table["window"], path, WINDOW_KEYS)
        if window is None:
            return base
        duration = self.field(window, "duration", path, _window_duration, None)
        requests = self.field(window, "requests", path, _window_requests, None)
        min_requests = self.field(
            window, "min_requests", path, _count, base.min_requests if base else None
        )
        if "duration" in window and "requests" in window:
            self.error(
                path, "takes one of 'duration' (time-based) and 'requests' (count-based), not both"
            )
            return base
        if "duration" not in window and "requests" not in window:
            if base is None:
                self.error(
                    path,
                    "needs 'duration' (the last N seconds) or 'requests' (the last N outcomes)",
                )
                return None
            duration, requests = base.duration, base.requests
        elif duration is None and requests is None:
            return base  # the value was wrong, and that was reported
        return WindowSettings(duration=duration, requests=requests, min_requests=min_requests)

    def check_breaker(
        self,
        settings: BreakerSettings,
        timeouts: Timeouts,
        path: Path,
        table: dict[str, Any],
        timeouts_table: dict[str, Any],
        route_level: bool,
    ) -> bool:
        """Report settings that contradict each other, or do nothing; False if any did.

        `settings` are resolved (`_resolve`). Each problem is reported at the key that
        `table` (this level's `breaker:` mapping) sets, or at `path` itself when every
        key involved was inherited.
        """
        problems = len(self.problems)

        def at(*keys: str) -> Path:
            for key in keys:
                if key in table:
                    return (*path, key)
            return path

        window = settings.window
        window_written = table.get("window") is not None  # and wrong, if there is none
        for key in ("failure_rate", "slow_call_rate"):
            if getattr(settings, key) is not None and window is None and not window_written:
                self.error(
                    at(key, "window"),
                    f"{key} needs a window: add window.duration (time-based) "
                    "or window.requests (count-based)",
                )
        if settings.slow_call_rate is not None and settings.slow_call_duration is None:
            self.error(
                at("slow_call_rate"),
                "slow_call_rate needs slow_call_duration: when is a call slow?",
            )
        slow = settings.slow_call_duration
        if slow is not None and slow >= timeouts.request:
            where = at("slow_call_duration")
            if where == path and "request" in timeouts_table:
                where = (*path[:-1], "timeouts", "request")
            self.error(
                where,
                f"slow_call_duration ({format_duration(slow)}) is not shorter than "
                f"timeouts.request ({format_duration(timeouts.request)}): a call that "
                "takes that long has timed out, so no call could ever be slow",
            )
        if (
            window is not None
            and window.requests is not None
            and window.min_requests is not None
            and window.min_requests > window.requests
        ):
            self.error(
                (*path, "window", "min_requests") if "window" in table else path,
                f"min_requests ({window.min_requests}) is more than window.requests "
                f"({window.requests}): no rate rule could ever trip",
            )
        longest = settings.open_duration_cap
        if longest < settings.open_duration:
            self.error(
                at("max_open_duration", "open_duration"),
                f"max_open_duration ({format_duration(longest)}) is shorter than open_duration "
                f"({format_duration(settings.open_duration)})",
            )
        elif settings.backoff_multiplier > 1 and longest == settings.open_duration:
            self.error(
                at("backoff_multiplier", "max_open_duration", "open_duration"),
                f"backoff_multiplier {settings.backoff_multiplier:g} can never grow the open "
                f"period: max_open_duration is no longer than open_duration "
                f"({format_duration(longest)}); set a longer max_open_duration",
            )
        elif (
            route_level
            and table.get("max_open_duration") is not None
            and settings.backoff_multiplier == 1
            and not settings.respect_retry_after
        ):
            self.error(
                (*path, "max_open_duration"),
                "caps nothing here: set backoff_multiplier above 1, or respect_retry_after",
            )
        if (
            settings.failure_threshold is None
            and settings.failure_rate is None
            and settings.slow_call_rate is None
            and not settings.respect_retry_after
        ):
            self.error(
                at("failure_threshold"),
                "no rule can open this circuit: set failure_threshold, failure_rate, "
                "slow_call_rate or respect_retry_after",
            )
        return len(self.problems) == problems

    def route(
        self,
        value: Any,
        path: Path,
        base_timeouts: Timeouts,
        base_breaker: BreakerSettings,
        base_max_body_size: int | None,
        defaults_valid: bool,
        base_policies: dict[str, _Layer],
        base_sessions: int,
        base_tls: _Layer,
    ) -> Route | None:
        table = self.mapping(value, path, ROUTE_KEYS)
        if table is None:
            return None
        ok = True
        for required in ("name", "match", "upstream"):
            if required not in table:
                self.error(path, f"missing required key {required!r}")
                ok = False
        name = self.field(table, "name", path, _route_name, None)
        upstream = self.field(table, "upstream", path, parse_upstream, None)
        strip_prefix = self.field(table, "strip_prefix", path, _bool, False)
        max_body_size = self.field(
            table, "max_body_size", path, _optional(parse_size), base_max_body_size
        )
        host, path_prefix = (
            self.match(table["match"], (*path, "match")) if "match" in table else (None, None)
        )
        if strip_prefix and path_prefix is None and "match" in table:
            self.error((*path, "strip_prefix"), "needs match.path_prefix to strip")
        timeouts = self.timeouts(table.get("timeouts"), (*path, "timeouts"), base_timeouts)
        breaker_path = (*path, "breaker")
        breaker_table = table.get("breaker")
        breaker = _resolve(self.breaker(breaker_table, breaker_path, base_breaker))
        if defaults_valid or breaker_table or table.get("timeouts"):
            # (When `defaults:` was already wrong and the route changes nothing, say it once.)
            self.check_breaker(
                breaker,
                timeouts,
                breaker_path,
                _table(breaker_table),
                _table(table.get("timeouts")),
                route_level=True,
            )
        layers = {name: self.policy_layer(table, name, path) for name in POLICY_KEYS}
        policies = self.policies(base_policies, layers, path, breaker)
        sessions = self.field(table, "max_websocket_sessions", path, _count, base_sessions)
        connect = self.field(table, "connect", path, _bool, False)
        if connect and host is None and "match" in table:
            self.error(
                (*path, "connect"),
                "needs match.host: a CONNECT names the host it is tunnelled for",
            )
        tls = None
        if upstream is not None:
            tls = self.tls(base_tls, self.tls_layer(table, path), path, upstream)
        if not ok or name is None or upstream is None or (host is None and path_prefix is None):
            return None
        return Route(
            name=name,
            host=host,
            path_prefix=path_prefix,
            upstream=upstream,
            strip_prefix=strip_prefix,
            timeouts=timeouts,
            breaker=breaker,
            max_body_size=max_body_size,
            line=self.lines.get(path, 1),
            **policies,
            max_websocket_sessions=sessions,
            connect=connect,
            tls=tls,
        )

    def match(self, value: Any, path: Path) -> tuple[str | None, str | None]:
        table = self.mapping(value, path, ["host", "path_prefix"])
        if table is None:
            return None, None
        if "host" not in table and "path_prefix" not in table:
            if not table:  # otherwise its unknown keys were reported, with a suggestion
                self.error(path, "needs at least one of 'host' and 'path_prefix'")
            return None, None
        host = self.field(table, "host", path, _match_host, None)
        prefix = self.field(table, "path_prefix", path, _path_prefix, None)
        return host, prefix

    # -- TLS to the upstream --

    def tls_layer(self, table: dict[str, Any], path: Path) -> _Layer | None:
        """What one level writes of `tls:`, parsed key by key, each key with the path it
        was written at; None for `tls: null`."""
        if "tls" not in table:
            return {}
        if table["tls"] is None:
            return None
        path = (*path, "tls")
        value = self.mapping(table["tls"], path, TLS_KEYS) or {}
        base = self.file
        parsers: dict[str, Callable[[Any], Any]] = {
            "ca_file": lambda v: resolve_path(_file_path(v), base),
            "cert_file": lambda v: resolve_path(_file_path(v), base),
            "key_file": lambda v: resolve_path(_file_path(v), base),
            "server_name": _match_host,
            "verify": _bool,
            "min_version": _tls_version,
        }
        layer: _Layer = {}
        for key in value:
            if key in parsers:
                parsed = self.field(value, key, path, parsers[key], _MISSING)
                layer[key] = (parsed, (*path, key))
        layer[_WRITTEN] = path
        return layer

    def tls(
        self, base: _Layer, layer: _Layer | None, path: Path, upstream: Upstream
    ) -> TlsSettings | None:
        """The route's TLS settings in force, with their context: `defaults:` under the
        route's own keys; None for an http upstream."""
        if upstream.scheme != "https":
            if layer:
                self.error(
                    layer[_WRITTEN],
                    f"applies to https upstreams only; this route's upstream is {upstream.url!r}",
                )
            return None
        merged = {**base, **(layer or {})} if layer is not None else {}
        merged.pop(_WRITTEN, None)
        if any(parsed is _MISSING for parsed, _ in merged.values()):
            return None  # reported already
        values = {key: parsed for key, (parsed, _) in merged.items()}
        for one, other in (("cert_file", "key_file"), ("key_file", "cert_file")):
            if one in values and other not in values:
                self.error(merged[one][1], f"needs {other} too: a client certificate and its key")
                return None
        settings = TlsSettings(**values)
        if not settings.verify:
            self.warnings.append(
                f"{_dotted(path)}: tls.verify is false: the upstream's certificate and name "
                f"are not checked"
            )
        cached = self._contexts.get(settings)
        if cached is not None:
            return cached
        try:
            built = build_context(settings)
        except TlsSetupError as e:
            self.error(merged[e.key][1] if e.key in merged else (*path, "tls"), str(e))
            return None
        self._contexts[settings] = built
        return built

    # -- traffic policies: rate_limit, bulkhead, fallback, recovery --

    def policy_layer(self, table: dict[str, Any], name: str, path: Path) -> _Layer | None:
        """What one level (`defaults:` or a route) writes of policy `name`, parsed key by
        key: {} if it writes nothing (or only mistakes, reported), None for `name: null`
        (the route turns an inherited policy off)."""
        if name not in table:
            return {}
        if table[name] is None:
            return None
        path = (*path, name)
        value = self.mapping(table[name], path, POLICY_KEYS[name])
        if not value:
            if value == {} and name == "retry":  # `retry: {}`: retries, every default
                return {_WRITTEN: path}
            if value == {}:  # an empty mapping: a policy with nothing in it
                self.error(path, f"is empty: set {POLICY_KEYS[name][0]}, or remove {name}")
            return {}
        parsers = self._policy_parsers(name)
        layer: _Layer = {}
        before = len(self.problems)
        for key in value:
            if key in _NESTED.get(name, {}):
                layer[key] = self.nested(value[key], (*path, key), _NESTED[name][key])
            elif key in parsers:
                parsed = self.field(value, key, path, parsers[key], _MISSING)
                if parsed is not _MISSING:
                    layer[key] = parsed
        if "body" in value and "body_file" in value:
            self.error(path, "takes one of 'body' and 'body_file', not both")
        if len(self.problems) != before:
            layer[_WRONG] = True  # built from what was right, it would only add noise
        layer[_WRITTEN] = path
        return layer

    def nested(
        self, value: Any, path: Path, keys: tuple[str, dict[str, Callable[[Any], Any]]]
    ) -> dict[str, Any]:
        """A policy's mapping within it (`retry.backoff`), parsed key by key as the policy
        is: each mistake reported at its own key."""
        example, parsers = keys
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping such as {example}, not {_kind(value)}")
            return {}
        table = self.mapping(value, path, parsers) or {}
        parsed = {
            key: self.field(table, key, path, parse, _MISSING) for key, parse in parsers.items()
        }
        return {key: item for key, item in parsed.items() if item is not _MISSING}

    def _policy_parsers(self, name: str) -> dict[str, Callable[[Any], Any]]:
        if name == "rate_limit":
            return {"rate": _token_rate, "burst": _burst, "mode": _mode, "scope": _scope}
        if name == "bulkhead":
            return {
                "max_concurrent": _count,
                "max_queued": _max_queued,
                "queue_timeout": _duration(minimum_exclusive=0.0),
            }
        if name == "fallback":
            config_file = self.file
            return {
                "reasons": _fallback_reasons,
                "status": _fallback_status,
                "headers": _fallback_headers,
                "body": _fallback_body,
                "body_file": lambda value: _fallback_body_file(value, config_file),
            }
        if name == "retry":
            positive = _optional(_duration(minimum_exclusive=0.0))
            return {
                "attempts": _attempts,
                "retry_on": _retry_on,
                "methods": _methods,
                "per_try_timeout": positive,
                "deadline": positive,
                "replay_max_body": _replay_max_body,
            }
        return {"ramp": _duration(minimum_exclusive=0.0), "min_share": _min_share}

    def policies(
        self,
        base: dict[str, _Layer],
        layers: dict[str, _Layer | None],
        path: Path,
        breaker: BreakerSettings,
    ) -> dict[str, Any]:
        """Each policy in force for a route (or for `defaults:`, whose `layers` are {}):
        `defaults:` under the route's own keys; contradictions reported."""
        built: dict[str, Any] = {}
        for name in POLICY_KEYS:
            layer = layers.get(name, {})
            if layer is None:
                built[name] = None
                continue
            merged = dict(base[name])
            if "body" in layer or "body_file" in layer:
                merged.pop("body", None)  # one body, wherever it comes from
                merged.pop("body_file", None)
            merged.update(layer)
            if not merged or merged.get(_WRONG):
                built[name] = None
                continue
            where = layer.get(_WRITTEN) or base[name].get(_WRITTEN) or (*path, name)
            written = layer if _WRITTEN in layer else base[name]
            if name == "bulkhead" and _WRITTEN not in layer and path != ("defaults",):
                # Inherited whole, so only this route's breaker can contradict it: say so
                # there.
                written = {"<breaker>": (*path, "breaker", "half_open_requests")}
            built[name] = getattr(self, f"_build_{name}")(merged, where, written, breaker)
        return built

    def _build_rate_limit(
        self, p: _Layer, path: Path, _written: _Layer, _breaker: BreakerSettings
    ) -> RateLimitSettings | None:
        if "rate" not in p:
            self.error(path, "needs rate: tokens per period, such as '100/s' or '100/60s'")
            return None
        count, period = p["rate"]
        return RateLimitSettings(count, period, p.get("burst", count), p.get("mode", "enforce"))

    def _build_bulkhead(
        self, p: _Layer, path: Path, written: _Layer, breaker: BreakerSettings
    ) -> BulkheadSettings | None:
        if "max_concurrent" not in p:
            self.error(path, "needs max_concurrent: the requests in flight at once")
            return None
        settings = BulkheadSettings(
            p["max_concurrent"], p.get("max_queued", 0), p.get("queue_timeout", 1.0)
        )
        at = (*path, "queue_timeout") if "queue_timeout" in written else path
        if (
            "queue_timeout" in p
            and settings.max_queued == 0
            and ("queue_timeout" in written or "max_queued" in written)
        ):
            self.error(at, "has no queue to time out: set max_queued above 0")
        if settings.max_concurrent < breaker.half_open_requests:
            self.error(
                written.get("<breaker>")
                or ((*path, "max_concurrent") if "max_concurrent" in written else path),
                f"max_concurrent ({settings.max_concurrent}) is below the breaker's "
                f"half_open_requests ({breaker.half_open_requests}): probes could never "
                "all be in flight",
            )
        return settings

    def _build_fallback(
        self, p: _Layer, path: Path, _written: _Layer, _breaker: BreakerSettings
    ) -> FallbackSettings | None:
        body, body_file = p.get("body") or p.get("body_file") or (b"", None)
        status = p.get("status", DEFAULT_FALLBACK_STATUS)
        if body and (status in (204, 304)):
            self.error(path, f"status {status} has no body: remove body, or use 200")
        return FallbackSettings(
            reasons=p.get("reasons", frozenset(FALLBACK_REASONS)),
            status=status,
            headers=p.get("headers", DEFAULT_FALLBACK_HEADERS),
            body=body,
            body_file=body_file,
        )

    def _build_retry(
        self, p: _Layer, path: Path, written: _Layer, breaker: BreakerSettings
    ) -> RetrySettings | None:
        kinds, statuses = p.get("retry_on", DEFAULT_RETRY_ON)
        backoff, budget = p.get("backoff", {}), p.get("budget", {})
        base = backoff.get("base", DEFAULT_RETRY_BACKOFF[0])
        longest = backoff.get("max", max(DEFAULT_RETRY_BACKOFF[1], base))
        if longest < base:
            self.error(
                (*path, "backoff") if "backoff" in written else path,
                f"max ({format_duration(longest)}) is shorter than base ({format_duration(base)})",
            )
        ratio = budget.get("ratio", DEFAULT_RETRY_BUDGET[0])
        floor = budget.get("min_per_second", DEFAULT_RETRY_BUDGET[1])
        if ratio == 0 and floor == 0:
            self.error(
                (*path, "budget") if "budget" in written else path,
                "ratio 0% and min_per_second 0 admit no retry at all: set attempts: 1",
            )
        settings = RetrySettings(
            attempts=p.get("attempts", DEFAULT_RETRY_ATTEMPTS),
            retry_on_kinds=kinds,
            retry_on_statuses=statuses,
            methods=p.get("methods", DEFAULT_RETRY_METHODS),
            per_try_timeout=p.get("per_try_timeout"),
            deadline=p.get("deadline"),
            backoff_base=base,
            backoff_max=longest,
            budget_ratio=ratio,
            budget_min_per_second=floor,
            replay_max_body=p.get("replay_max_body", DEFAULT_REPLAY_MAX_BODY),
        )
        per_try, deadline = settings.per_try_timeout, settings.deadline
        slow = breaker.slow_call_duration
        if per_try is not None and slow is not None and slow >= per_try:
            self.error(
                (*path, "per_try_timeout") if "per_try_timeout" in written else path,
                f"per_try_timeout ({format_duration(per_try)}) is not longer than the "
                f"breaker's slow_call_duration ({format_duration(slow)}): a try that slow "
                "has timed out, so no call could ever be slow",
            )
        if per_try is not None and deadline is not None and per_try > deadline:
            self.error(
                (*path, "per_try_timeout") if "per_try_timeout" in written else path,
                f"per_try_timeout ({format_duration(per_try)}) is longer than the deadline "
                f"({format_duration(deadline)}) of the whole call",
            )
        return settings

    def _build_recovery(
        self, p: _Layer, path: Path, _written: _Layer, _breaker: BreakerSettings
    ) -> RecoverySettings | None:
        if "ramp" not in p:
            self.error(path, "needs ramp: how long the share admitted takes to reach 100%")
            return None
        return RecoverySettings(p["ramp"], p.get("min_share", DEFAULT_MIN_SHARE))

    def check_names(self, routes: list[tuple[int, Route]]) -> None:
        first: dict[str, Route] = {}
        for i, route in routes:
            if route.name in first:
                self.problems.append(
                    Problem(
                        self.file,
                        self.lines.get(("routes", i, "name"), route.line),
                        f"routes[{i}].name",
                        f"duplicate route name {route.name!r} "
                        f"(first used at line {first[route.name].line})",
                    )
                )
            else:
                first[route.name] = route

    def check_reachable(self, routes: list[tuple[int, Route]]) -> None:
        """A route that an earlier one always matches first is a mistake, never intended.

        The router itself says so: asked for a route's own host and prefix, it
        answers with the first route in file order that matches them all, which
        is the route itself unless an earlier one shadows it.
        """
        router = Router([(route, (i, route)) for i, route in routes])
        for i, later in routes:
            found = router.lookup(later.host, later.path_prefix or "")
            assert found is not None  # the route itself matches, at least
            earlier = found[1]
            if earlier is not later:
                self.problems.append(
                    Problem(
                        self.file,
                        later.line,
                        f"routes[{i}]",
                        f"route {later.name!r} can never match: route {earlier.name!r} "
                        f"(line {earlier.line}) matches every request it would",
                    )
                )


TLS_KEYS = ["ca_file", "cert_file", "key_file", "server_name", "verify", "min_version"]
ROUTE_KEYS = [
    "name",
    "match",
    "upstream",
    "strip_prefix",
    "timeouts",
    "breaker",
    "max_body_size",
    "max_websocket_sessions",
    "connect",
    "tls",
    "rate_limit",
    "bulkhead",
    "fallback",
    "recovery",
    "retry",
]
BREAKER_KEYS = [
    "failure_threshold",
    "open_duration",
    "half_open_requests",
    "success_threshold",
    "failure_status",
    "window",
    "failure_rate",
    "slow_call_duration",
    "slow_call_rate",
    "backoff_multiplier",
    "max_open_duration",
    "jitter",
    "respect_retry_after",
    "mode",
]
WINDOW_KEYS = ["duration", "requests", "min_requests"]
POLICY_KEYS = {
    "rate_limit": ["rate", "burst", "mode", "scope"],
    "bulkhead": ["max_concurrent", "max_queued", "queue_timeout"],
    "fallback": ["reasons", "status", "headers", "body", "body_file"],
    "recovery": ["ramp", "min_share"],
    "retry": [
        "attempts",
        "retry_on",
        "methods",
        "per_try_timeout",
        "deadline",
        "backoff",
        "budget",
        "replay_max_body",
    ],
}

_Layer = dict[str, Any]
"""One level's keys of one policy, parsed; with `_WRITTEN` (where) and `_WRONG`."""
_WRITTEN = "<written at>"
_WRONG = "<wrong>"


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _resolve(settings: BreakerSettings) -> BreakerSettings:
    """Fill in the defaults that depend on other settings of the same route."""
    window = settings.window
    if window is not None and window.min_requests is None:
        floor = DEFAULT_MIN_REQUESTS
        if window.requests is not None:
            floor = min(floor, window.requests)
        window = dataclasses.replace(window, min_requests=floor)
    longest = settings.max_open_duration
    if longest is None:
        longest = max(settings.open_duration, DEFAULT_MAX_OPEN_DURATION)
    return dataclasses.replace(settings, window=window, max_open_duration=longest)


def format_duration(seconds: float) -> str:
    """A duration as a user would write it: 10m, not 600s."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


class _Invalid(ValueError):
    """One value is wrong; the message says how, without the path."""


class _TooLarge(Exception):
    pass


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) <= 40 else "a string"
    if isinstance(value, int) and not -(10**18) < value < 10**18:
        return "a very large number"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:40] + '...'}"


# -- value parsers: each returns the value or raises _Invalid -----------------------


def parse_duration(value: Any) -> float:
    """Seconds from `1.5`, `"500ms"`, `"2s"`, `"5m"` or `"1h"`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(f"must be a duration such as 1.5, '500ms', '2s', '5m', not {_kind(value)}")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if m is None:
            raise _Invalid(f"{value!r} is not a duration; use seconds (1.5) or a unit: ms, s, m, h")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise _Invalid(f"must be at most {MAX_DURATION / 3600:.0f}h")
    if seconds < 0:
        raise _Invalid("must not be negative")
    return seconds


def _duration(minimum_exclusive: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds <= minimum_exclusive:
            raise _Invalid("must be greater than 0")
        return seconds

    return parse


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be a whole number >= 1, not {_kind(value)}")
    if value < 1:
        raise _Invalid(f"must be >= 1, not {value}")
    if value > MAX_COUNT:
        raise _Invalid(f"must be at most {MAX_COUNT}")
    return value


def _optional(parse: Callable[[Any], T]) -> Callable[[Any], T | None]:
    """`parse`, or None for `null`: how a route turns off a rule it inherits."""

    def parse_or_null(value: Any) -> T | None:
        return None if value is None else parse(value)

    return parse_or_null


def parse_size(value: Any) -> int:
    """Bytes from `1048576`, `"512KB"`, `"10MB"`, `"1GiB"` (KB, MB, GB: powers of 1000)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid(f"must be a size such as 1048576, '512KB' or '10MiB', not {_kind(value)}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value.strip())
        if m is None:
            raise _Invalid(
                f"{value!r} is not a size; use bytes (1048576) or a unit: B, KB, MB, GB, "
                "KiB, MiB, GiB"
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size < 1:
        raise _Invalid("must be at least 1 byte (null for no limit)")
    if size > MAX_SIZE:
        raise _Invalid("must be at most 1 PiB (null for no limit)")
    return size


def _window_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < MIN_WINDOW_DURATION:
        raise _Invalid(
            f"must be at least {format_duration(MIN_WINDOW_DURATION)}: a shorter window "
            "holds too few outcomes to judge a rate by"
        )
    return seconds


def _window_requests(value: Any) -> int:
    count = _count(value)
    if count > MAX_WINDOW_REQUESTS:
        raise _Invalid(f"must be at most {MAX_WINDOW_REQUESTS}")
    return count


def parse_percentage(value: Any) -> Fraction:
    """An exact fraction from `"50%"` or `0.5`; at most 100 %."""
    if isinstance(value, str):
        m = _PERCENT.fullmatch(value.strip())
        if m is None:
            raise _Invalid(f"{value!r} is not a percentage; write '50%' or a fraction such as 0.5")
        rate = Fraction(m.group(1)) / 100
        if rate > 1:
            raise _Invalid(f"{value!r} is more than 100%")
        return rate
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a percentage such as '50%' or 0.5, not {_kind(value)}")
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise _Invalid(f"{value!r} is not a fraction from 0 to 1; write '50%' or 0.5 for half")
    return Fraction(repr(value))  # 0.1 means one tenth, not the binary number nearest it


def _rate(value: Any) -> Fraction:
    rate = parse_percentage(value)
    if rate == 0:
        raise _Invalid("must be more than 0% (null turns the rule off)")
    return rate


def _jitter(value: Any) -> float:
    return float(parse_percentage(value))


def _backoff_multiplier(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number such as 2 (1 means no backoff), not {_kind(value)}")
    if not math.isfinite(value) or not 1 <= value <= MAX_BACKOFF_MULTIPLIER:
        raise _Invalid(f"must be from 1 (no backoff) to {MAX_BACKOFF_MULTIPLIER:g}, not {value}")
    return float(value)


def _mode(value: Any) -> Mode:
    for mode in MODES:
        if value == mode:
            return mode
    raise _Invalid(f"must be 'enforce' or 'shadow', not {_kind(value)}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join(repr(c) for c in choices)
        raise _Invalid(f"must be one of {listed}, not {_kind(value)}")

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {_kind(value)}")
    return value


_TOKEN_RATE = re.compile(r"([0-9]+)\s*/\s*(.+)")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
_FALLBACK_FORBIDDEN_HEADERS = {
    "content-length": "the sidecar frames the body itself",
    "transfer-encoding": "the sidecar frames the body itself",
    "connection": "the sidecar decides whether the connection stays open",
    "keep-alive": "the sidecar decides whether the connection stays open",
    "retry-after": "the sidecar sends the Retry-After of the answer it replaces",
    "x-sidecar-fallback": "the sidecar sets it to the reason the fallback was served",
    "date": "the sidecar sets it",
}


def _token_rate(value: Any) -> tuple[int, float]:
    """Tokens and the period they come in, from "100/s", "100/60s", "6000/m"."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise _Invalid(f"{value} is not a rate; say per what, such as '{value}/s' or '{value}/m'")
    m = _TOKEN_RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        shown = _short_repr(value) if isinstance(value, str) else _kind(value)
        raise _Invalid(
            f"{shown} is not a rate; write tokens per period, such as '100/s', '100/60s' "
            "or '6000/m'"
        )
    count = int(m.group(1))
    unit = m.group(2).strip()
    period = _UNITS[unit] if unit in _UNITS else parse_duration(unit)
    if count < 1:
        raise _Invalid(f"{value!r} admits nothing: the count must be at least 1")
    if count > MAX_COUNT:
        raise _Invalid(f"{value!r}: the count must be at most {MAX_COUNT}")
    if period < 0.001:
        raise _Invalid(f"{value!r}: the period must be at least 1ms")
    return count, period


def _burst(value: Any) -> int:
    if value == 0 and not isinstance(value, bool):
        raise _Invalid("0 admits nothing: the bucket must hold at least 1 token")
    return _count(value)


def _scope(value: Any) -> str:
    if value == "local":
        return "local"
    if value == "fleet":
        raise _Invalid(
            "'fleet' shares the rate among live replicas, which needs the fleet "
            "(sidecars sharing evidence), not in this version; use 'local'"
        )
    raise _Invalid(f"must be 'local', not {_kind(value)}")


def _max_queued(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise _Invalid(f"must be >= 0 (0: no queue), not {value}")
    return _count(value)


def _fallback_reasons(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        raise _Invalid(
            f"must be a list of reasons such as [circuit_open, bulkhead_full], not {_kind(value)}"
        )
    if not value:
        raise _Invalid("is empty: name the answers to replace, or remove fallback")
    for item in value:
        if item not in FALLBACK_REASONS:
            shown = _short_repr(item) if isinstance(item, str) else _kind(item)
            close = difflib.get_close_matches(str(item), FALLBACK_REASONS, n=1, cutoff=0.6)
            known = ", ".join(FALLBACK_REASONS)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {known})"
            raise _Invalid(f"{shown} is not a reason the sidecar answers for{hint}")
    return frozenset(value)


def _fallback_status(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise _Invalid(f"must be an HTTP status from 200 to 599, not {_kind(value)}")
    return value


def _fallback_headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _Invalid(
            f"must be a mapping such as {{Content-Type: application/json}}, not {_kind(value)}"
        )
    headers = []
    seen: set[str] = set()
    for name, item in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise _Invalid(f"{_short_repr(str(name))} is not a header name")
        if name.lower() in seen:
            raise _Invalid(f"{name}: given twice (header names are case-insensitive)")
        seen.add(name.lower())
        why = _FALLBACK_FORBIDDEN_HEADERS.get(name.lower())
        if why is not None:
            raise _Invalid(f"{name}: not allowed here: {why}")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise _Invalid(f"{name}: the value must be text, not {_kind(item)}")
        text = str(item)
        if not _HEADER_VALUE.fullmatch(text):
            raise _Invalid(
                f"{name}: the value must be one line of printable ASCII text (no controls)"
            )
        headers.append((name, text.strip()))
    return tuple(headers)


def _fallback_body(value: Any) -> tuple[bytes, str | None]:
    if not isinstance(value, str):
        raise _Invalid(f"must be text (quote JSON: '{{\"items\": []}}'), not {_kind(value)}")
    body = value.encode()
    if len(body) > MAX_FALLBACK_BODY:
        raise _Invalid(f"is over {MAX_FALLBACK_BODY} bytes; a fallback is a short answer")
    return body, None


def _fallback_body_file(value: Any, config_file: str) -> tuple[bytes, str | None]:
    """The file's bytes, read now (relative to the config file's directory)."""
    path = resolve_path(_file_path(value), config_file)
    try:
        body = read_small_file(path, MAX_FALLBACK_BODY)
    except FileProblem as e:
        if str(e).endswith(f"over {MAX_FALLBACK_BODY} bytes"):
            raise _Invalid(f"{e}; a fallback is a short answer") from None
        raise _Invalid(str(e)) from None
    return body, path


def _file_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a file path, not {_kind(value)}")
    return value


def _tls_version(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else None
    if text not in TLS_VERSIONS:
        raise _Invalid(f"must be one of {', '.join(map(repr, TLS_VERSIONS))}, not {value!r}")
    return text


def _min_share(value: Any) -> Fraction:
    share = parse_percentage(value)
    if share >= 1:
        raise _Invalid("must be below 100%: a ramp that starts at 100% sheds nothing")
    return share


def _attempts(value: Any) -> int:
    count = _count(value)
    if count > MAX_RETRY_ATTEMPTS:
        raise _Invalid(
            f"must be at most {MAX_RETRY_ATTEMPTS}: more tries than that multiply an outage"
        )
    return count


def _retry_on(value: Any) -> tuple[frozenset[str], frozenset[int]]:
    if not isinstance(value, list) or not value:
        raise _Invalid(
            "must be a list of failure kinds (connect, timeout, tls) and statuses, such as "
            f"[connect, 503], not {_kind(value) if value != [] else 'an empty list'}"
        )
    kinds: set[str] = set()
    statuses: set[int] = set()
    for item in value:
        if isinstance(item, str) and item in RETRY_KINDS:
            kinds.add(item)
        elif isinstance(item, int) and not isinstance(item, bool) and 400 <= item <= 599:
            statuses.add(item)
        elif item == "reset":
            raise _Invalid(
                "'reset' is never retried: the answer's head has reached the client by then"
            )
        else:
            shown = _short_repr(item) if isinstance(item, str) else _kind(item)
            raise _Invalid(
                f"{shown} is neither a failure kind (connect, timeout, tls) nor a status "
                "from 400 to 599"
            )
    return frozenset(kinds), frozenset(statuses)


_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


def _methods(value: Any) -> frozenset[bytes]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"must be a list of methods such as [GET, PUT], not {_kind(value)}")
    methods = set()
    for item in value:
        if not isinstance(item, str) or not _METHOD.fullmatch(item):
            shown = _short_repr(item) if isinstance(item, str) else _kind(item)
            raise _Invalid(f"{shown} is not a method (upper case, such as GET)")
        if item in ("POST", "PATCH", "CONNECT"):
            raise _Invalid(
                f"{item} is not idempotent: retry it only per request, with an "
                "Idempotency-Key header (which any method may carry)"
            )
        methods.add(item.encode())
    return frozenset(methods)


def _min_per_second(value: Any) -> float:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
        raise _Invalid(f"must be from 0 to {MAX_COUNT}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(f"must be a number such as 10, not {_kind(value)}")
    if not 0 <= value <= MAX_COUNT:
        raise _Invalid(f"must be from 0 to {MAX_COUNT}, not {value}")
    return float(value)


def _replay_max_body(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    size = parse_size(value)
    if size > MAX_REPLAY_BODY:
        raise _Invalid(
            f"must be at most {MAX_REPLAY_BODY // (1024 * 1024)}MiB: every request in flight "
            "may keep this much"
        )
    return size


def _status_set(value: Any) -> frozenset[int]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of HTTP statuses such as [500, 503], not {_kind(value)}")
    statuses = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            short = isinstance(item, str) and len(item) < 20
            shown = repr(item) if short else _kind(item).removeprefix("int ")
            raise _Invalid(f"{shown} is not an HTTP status (100-599)")
        statuses.add(item)
    return frozenset(statuses)


def _route_name(value: Any) -> str:
    if not isinstance(value, str) or not ROUTE_NAME.fullmatch(value):
        shown = _short_repr(value) if isinstance(value, str) else _kind(value)
        raise _Invalid(
            f"{shown} is not a valid route name: use lower-case letters, digits, '_' and '-'"
        )
    return value


def _match_host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a host name such as 'payments.internal', not {_kind(value)}")
    host = value.strip().lower()
    if not ((host.isascii() and _HOSTNAME.fullmatch(host)) or _is_ip(host.strip("[]"))):
        if ":" in host and not _is_ip(host):
            raise _Invalid(f"{value!r}: match the host without a port (the port is ignored)")
        raise _Invalid(f"{value!r} is not a host name")
    return host.strip("[]").rstrip(".")


def _allowed_host(value: Any) -> str:
    """One name of `admin.allowed_hosts`: a DNS name, lower-case, without port or final dot."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a host name such as 'sidecar.internal', not {_kind(value)}")
    shown = _short_repr(value)
    host = value.strip().lower()
    if _is_ip(host.strip("[]")):
        raise _Invalid(f"{shown}: IP addresses are always allowed; list host names only")
    if not host.isascii():
        raise _Invalid(
            f"{shown} is not a host name: write it in its xn-- form, as browsers send it"
        )
    if "*" in host:
        raise _Invalid(f"{shown}: no wildcards; list each host name")
    if not _HOSTNAME.fullmatch(host):
        name, colon, port = host.rpartition(":")
        if colon and port.isdigit() and _HOSTNAME.fullmatch(name):
            raise _Invalid(f"{shown}: name the host without a port (any port is allowed)")
        raise _Invalid(f"{shown} is not a host name")
    host = host.rstrip(".")
    if host == "localhost":
        raise _Invalid(f"{shown}: localhost is always allowed; list other host names only")
    return host


def _path_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid(f"must start with '/', not {_kind(value)}")
    if any(c in value for c in "?#"):
        raise _Invalid(f"{value!r}: a path prefix holds no query or fragment")
    if not _URL_PATH.fullmatch(value):
        raise _Invalid(
            f"{value!r}: write the prefix as it appears on the wire, percent-encoded "
            "(no spaces, controls or non-ASCII)"
        )
    return value.rstrip("/") or "/"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_address(value: Any) -> Address:
    """`host:port` (IPv6 as `[::1]:9901`); port 0 asks the system for a free port."""
    if not isinstance(value, str):
        raise _Invalid(f"must be 'host:port', such as '0.0.0.0:8080', not {_kind(value)}")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host:
        raise _Invalid(f"{value!r} is not 'host:port', such as '0.0.0.0:8080'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host):
            raise _Invalid(f"{value!r}: {host!r} is not an IPv6 address")
    elif not (_is_ip(host) or (host.isascii() and _HOSTNAME.fullmatch(host.lower()))):
        raise _Invalid(f"{value!r}: {host!r} is not an IP address or host name")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise _Invalid(f"{value!r}: the port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def parse_upstream(value: Any) -> Upstream:
    if not isinstance(value, str):
        raise _Invalid(f"must be a URL such as 'http://payments:8080', not {_kind(value)}")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as e:
        raise _Invalid(f"{value!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise _Invalid(f"{value!r}: the scheme must be http or https")
    if not parts.hostname:
        raise _Invalid(f"{value!r}: the URL has no host")
    hostname = parts.hostname
    if not (_is_ip(hostname) or (hostname.isascii() and _HOSTNAME.fullmatch(hostname))):
        raise _Invalid(f"{value!r}: {parts.hostname!r} is not an IP address or host name")
    if not _URL_PATH.fullmatch(parts.path):
        raise _Invalid(
            f"{value!r}: write the base path percent-encoded (no spaces, controls or non-ASCII)"
        )
    if parts.username is not None or parts.password is not None:
        raise _Invalid(f"{value!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise _Invalid(f"{value!r}: an upstream URL takes no query or fragment")
    if port == 0:
        raise _Invalid(f"{value!r}: port 0 is not a port an upstream listens on")
    return Upstream(
        url=value,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or (443 if parts.scheme == "https" else 80),
        base_path=parts.path.rstrip("/"),
    )


_NESTED: dict[str, dict[str, tuple[str, dict[str, Callable[[Any], Any]]]]] = {
    "retry": {
        "backoff": (
            "{base: 25ms, max: 250ms}",
            {"base": _duration(minimum_exclusive=0.0), "max": _duration(minimum_exclusive=0.0)},
        ),
        "budget": (
            "{ratio: 20%, min_per_second: 10}",
            {"ratio": parse_percentage, "min_per_second": _min_per_second},
        ),
    }
}
"""The policies' mappings within them, and their keys' parsers (each with an example)."""
