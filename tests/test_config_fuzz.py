"""Config abuse (issue 4, item 6): hostile YAML gets readable errors, never a traceback.

Whatever the file holds (random structures, wrong types, extreme numbers, unicode,
alias bombs, Python tags, merge keys, duplicate keys, tabs, BOMs), `parse_config`
returns a `Config` or raises `ConfigError` whose every problem is one readable
`FILE:LINE: path: message` line; it loads safely (no tag runs code) and within a
second. `sidecar check` then exits 0 or 2 and never shows a traceback.

The tests at the bottom are the reproducers of the bugs this module found (raw
control characters, bad scalars for standard tags, odd keys, alias bombs in keys
or route names, a quadratic check): all fixed, and the generators now produce
such inputs too.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import BREAKER_KEYS, ROUTE_KEYS, Config, ConfigError, Problem, parse_config

ROOT = Path(__file__).parent.parent
EXAMPLE_TEXT = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
EXAMPLE_DOC: dict[str, Any] = yaml.safe_load(EXAMPLE_TEXT)
FILENAME = str(ROOT / "fuzz.yaml")
"""Beside config.example.yaml, whose certificate paths (examples/tls/...) are read
relative to the config file: from here they are found wherever pytest runs."""
PROBLEM_LINE = re.compile(r".+:\d+: \S.*: .+")

FUZZ = settings(
    deadline=1000,  # one parse, one second
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the property -----------------------------------------------------------------

EXECUTED: list[tuple[Any, ...]] = []


def _executed(*args: Any) -> None:
    """What an unsafe loader would call for `!!python/object/apply:<this module>._executed`."""
    EXECUTED.append(args)


class Executed:
    """What an unsafe loader would build for `!!python/object/new:<this module>.Executed`."""

    def __new__(cls, *args: Any) -> Executed:
        EXECUTED.append(args)
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        EXECUTED.append((state,))


APPLY = f"!!python/object/apply:{__name__}._executed"
NEW = f"!!python/object/new:{__name__}.Executed"


def assert_readable(problem: Problem, text: str) -> None:
    """One `FILE:LINE: path: message` line that points into the file and says something."""
    shown = str(problem)
    assert problem.file == FILENAME, shown
    assert isinstance(problem.line, int), shown
    assert 0 <= problem.line <= len(text.splitlines()) + 1, shown
    assert problem.path.strip(), shown
    assert problem.message.strip(), shown
    assert "\n" not in shown and "\r" not in shown, shown
    assert "Traceback" not in shown, shown
    assert PROBLEM_LINE.fullmatch(shown), shown
    # Linear in the input: a repr may escape each character, but nothing may expand aliases.
    assert len(shown) <= 1000 + 25 * len(text), f"{len(shown)} characters: {shown[:300]}"


def check(text: str) -> Config | None:
    """`parse_config(text)` keeps its promises; the Config, or None for a ConfigError."""
    EXECUTED.clear()
    try:
        return parse_config(text, FILENAME)
    except ConfigError as e:
        assert e.problems, "a ConfigError must say what is wrong"
        for problem in e.problems:
            assert_readable(problem, text)
        return None
    finally:
        assert not EXECUTED, f"the YAML ran code: {EXECUTED}"


def check_within_a_second(text: str) -> None:
    """`check(text)`, timed (outside hypothesis, whose deadline does this for the rest)."""
    start = time.perf_counter()
    check(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"took {elapsed:.2f}s"


class TookTooLong(Exception):
    pass


CHILD = """
import sys
from sidecar.config import ConfigError, parse_config
print("ready", flush=True)
with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
try:
    parse_config(text)
except ConfigError:
    pass
"""


def parse_in_a_child(path: Path, seconds: float) -> None:
    """Parse the file in a fresh interpreter, killed if it takes over `seconds` once imported."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        try:
            child.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            raise TookTooLong(f"{path.stat().st_size} bytes took over {seconds}s") from None
    assert child.returncode == 0


# -- (a) random values, through yaml.safe_dump --------------------------------------


def keys_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from keys_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from keys_in(item)


KNOWN_KEYS = sorted(
    {
        *("listen", "admin", "defaults", "routes", "timeouts", "breaker", "connect", "request"),
        *("match", "host", "path_prefix", "duration", "requests", "min_requests", "<<"),
        *("clients", "client_timeouts", "max_body_size"),  # keys being added: harmless if not
        *BREAKER_KEYS,
        *ROUTE_KEYS,
        *keys_in(EXAMPLE_DOC),
    }
)
PLAUSIBLE = [
    *("0", "1", "-1", "", " ", "~", "null", "yes", "no", "on", "off", "0.5", "50%", "150%"),
    *("1s", "500ms", "0ms", "2m", "1h", "9999h", "1.5", ".5s", "1 s", "1e3s", "-1s", "1d"),
    *("127.0.0.1:0", "0.0.0.0:8080", "[::1]:80", "localhost:65536", ":80", "host", "[::1]"),
    *("http://a:1", "https://a", "http://a:0", "ftp://a", "http://u:p@a/", "http://a/?q", "//a"),
    *("/", "/a", "/a/", "a", "/a b", "/ä", "/a?b", "/%zz", "shadow", "enforce", "payments"),
]
SAFE_KEY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
"""Any text, line breaks and leading blanks included (PyYAML escapes what it must)."""
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    SAFE_KEY,
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(1, 4290).map(lambda digits: 10**digits - 1),  # str() stops at 4300 digits
    st.integers(1, 4290).map(lambda digits: -(10**digits)),
    st.floats(),  # nan and the infinities included
    st.text(max_size=40),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=200, max_size=2000),
    st.binary(max_size=20),
    st.dates(),
    st.datetimes(),
    st.sets(st.integers(-5, 5) | st.text(max_size=3), max_size=3),
    st.sampled_from(PLAUSIBLE),
    st.from_regex(r"-?[0-9]{1,8}(\.[0-9]{0,6})?\s?(ms|s|m|h|%)?", fullmatch=True),
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


def dump(draw: st.DrawFn, document: Any) -> str:
    return yaml.safe_dump(
        document,
        sort_keys=False,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([False, None, True])),
        width=draw(st.sampled_from([80, 30, 10**6])),
        explicit_start=draw(st.booleans()),
    )


def containers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every mapping and list in `node`, `node` itself first."""
    if isinstance(node, dict | list):
        yield path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            yield from containers(value, (*path, key))


@st.composite
def example_with_random_values(draw: st.DrawFn) -> str:
    """config.example.yaml with a few values replaced, keys added or removed, anywhere."""
    document = copy.deepcopy(EXAMPLE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(containers(document))))
        container = document
        for part in path:
            container = container[part]
        if isinstance(container, dict):
            keys = list(container)
            action = draw(st.sampled_from(["replace", "add", "delete"] if keys else ["add"]))
            if action == "add":
                container[draw(KEYS)] = draw(TREES)
            elif action == "replace":
                container[draw(st.sampled_from(keys))] = draw(TREES)
            else:
                del container[draw(st.sampled_from(keys))]
        else:
            action = draw(st.sampled_from(["replace", "add", "delete"] if container else ["add"]))
            if action == "add":
                container.append(draw(TREES))
            elif action == "replace":
                container[draw(st.integers(0, len(container) - 1))] = draw(TREES)
            else:
                del container[draw(st.integers(0, len(container) - 1))]
    return dump(draw, document)


@st.composite
def random_documents(draw: st.DrawFn) -> str:
    """Any tree at all, or the top-level keys over random trees."""
    top_level = st.dictionaries(st.sampled_from(["listen", "admin", "defaults", "routes"]), TREES)
    return dump(draw, draw(TREES | top_level))


# -- (c) hand-written hostile YAML ----------------------------------------------------


def laughs(levels: int = 9, name: str = "lol", kind: str = "seq") -> str:
    """The billion laughs: anchors a..i, each nine aliases of the one before."""
    letters = "abcdefghi"[:levels]
    if kind == "seq":
        lines = [f"a: &a [{', '.join([name] * 9)}]"]
        lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in itertools.pairwise(letters)]
    else:
        lines = [f"a: &a {{{', '.join(f'k{i}: {name}' for i in range(9))}}}"]
        lines += [
            f"{b}: &{b} {{{', '.join(f'k{i}: *{a}' for i in range(9))}}}"
            for a, b in itertools.pairwise(letters)
        ]
    return "\n".join(lines) + "\n"


ROUTE = "routes:\n  - name: a\n    match: {path_prefix: /a}\n    upstream: http://a:1\n"

HOSTILE_DOCUMENTS: dict[str, str] = {
    "billion laughs": laughs() + "routes: *i\n",
    "billion laughs of mappings": laughs(kind="map") + "defaults: *i\n" + ROUTE,
    "billion laughs merged": laughs(kind="map") + "defaults:\n  <<: *i\n" + ROUTE,
    "billion laughs merged as a list": laughs() + "defaults:\n  <<: *i\n" + ROUTE,
    "recursive alias": "routes: &r [*r]\n",
    "recursive merge": "&a {<<: *a}\n",
    "recursive key": "? &k [*k]\n: 1\n" + ROUTE,
    "undefined alias": "routes: *nope\n",
    "deep flow lists": "routes: " + "[" * 600 + "]" * 600 + "\n",  # 1000+ levels: 1.5 s
    "deep flow mappings": "{a: " * 2000 + "1" + "}" * 2000 + "\n",
    "deep block mappings": "".join(" " * i + f"k{i}:\n" for i in range(700)),
    "deep key": "? " + "[" * 600 + "]" * 600 + "\n: 1\n",
    "python apply": f"{APPLY} [boom]\n",
    "python apply in a route": ROUTE + f"    breaker: {APPLY} [boom]\n",
    "python apply as a key": f"? {APPLY} [boom]\n: 1\n" + ROUTE,
    "python apply merged": ROUTE + f"    <<: {APPLY} [boom]\n",
    "python new": f"routes: [{NEW} {{x: 1}}]\n",
    "python object": f"listen: !!python/object:{__name__}.Executed {{x: 1}}\n",
    "python name": "listen: !!python/name:os.system\n" + ROUTE,
    "python module": "listen: !!python/module:os\n" + ROUTE,
    "python tuple": "listen: !!python/tuple [a, b]\n" + ROUTE,
    "tag directive": (
        "%TAG !py! tag:yaml.org,2002:python/object/apply:\n---\n"
        f"routes: !py!{__name__}._executed [x]\n"
    ),
    "local tags": "routes: !route {name: a}\nlisten: !<tag:example.com,2000:x> y\n",
    "binary, set, timestamp": (
        "listen: !!binary aGVsbG8=\nadmin: !!set {a, b}\n"
        "defaults: {timeouts: {connect: !!timestamp 2001-12-14t21:59:43.10-05:00}}\n" + ROUTE
    ),
    "omap and pairs": "routes: !!omap [a: 1]\ndefaults: !!pairs [b: 2]\n",
    "explicit standard tags": (
        "listen: !!str 1\nadmin: {listen: !!int '80'}\ndefaults: {breaker: {jitter: !!float 1,"
        " respect_retry_after: !!bool yes, mode: !!null ''}}\n" + ROUTE
    ),
    "scalar with collection tags": "listen: !!map x\nadmin: !!seq y\ndefaults: !!set z\n" + ROUTE,
    "merge keys": (
        "routes:\n  - &first {name: a, match: {path_prefix: /a}, upstream: 'http://a:1'}\n"
        "  - <<: *first\n    name: b\n    match: {path_prefix: /b}\n"
        "  - <<: [*first, 1, null, [x]]\n    name: c\n  - {<<: 5, name: d}\n"
    ),
    "duplicate keys": ROUTE
    + "routes: []\nlisten: a:1\nlisten: b:2\nadmin: {listen: x, listen: y}\n",
    "non-string keys": (
        "1: a\ntrue: b\nnull: c\n1.5: d\n.nan: e\n? [a, b]\n: f\n? {a: b}\n: g\n"
        "!!binary aGk=: h\n2001-01-01: i\n" + ROUTE
    ),
    "tab indentation": "routes:\n\t- name: a\n",
    "tab before a value": "listen:\t127.0.0.1:80\n" + ROUTE,
    "byte order mark": "\ufeff" + EXAMPLE_TEXT,
    "byte order mark inside": "listen: 127.0.0.1:1\n\ufeffadmin: {}\n" + ROUTE,
    "crlf line ends": EXAMPLE_TEXT.replace("\n", "\r\n"),
    "old mac line ends": EXAMPLE_TEXT.replace("\n", "\r"),
    "unicode line separators": EXAMPLE_TEXT.replace("\n", "\u2028"),
    "escaped controls": (
        'routes: [{name: "\\0\\a\\e\\u202e", match: {host: "\\x85\\u2028", path_prefix: "/\\t"},'
        ' upstream: "http://\\0/"}]\nlisten: "\\ud800:80"\n'
    ),
    "unicode everywhere": (
        "routes:\n  - name: 支付\n    match: {host: ☃.example, path_prefix: /ü}\n"
        "    upstream: http://☃:80/𝄞\n"
        "    breaker: {mode: \uff53\uff48\uff41\uff44\uff4f\uff57, failure_threshold: \uff15}\n"
    ),
    "long line": "listen: " + "x" * 30000 + "\n" + ROUTE,
    "long comment": "# " + "x" * 30000 + "\n" + ROUTE,
    "long key": "k" * 2000 + ": 1\n" + ROUTE,
    "long quoted key": '"' + "k" * 5000 + '": 1\n' + ROUTE,
    "long decimal": "listen: " + "9" * 5000 + "\n" + ROUTE,
    "long decimal key": "9" * 5000 + ": 1\n" + ROUTE,
    "long hex": ROUTE + "    breaker: {failure_threshold: 0x" + "f" * 5000 + "}\n",
    "long hex key": "0x" + "f" * 5000 + ": 1\n" + ROUTE,
    "long hex name": ROUTE.replace("name: a", "name: 0x" + "f" * 5000),
    "long duration": ROUTE + "    timeouts: {request: " + "9" * 5000 + "s}\n",
    "long percentage": ROUTE + "    breaker: {jitter: '" + "9" * 5000 + "%'}\n",
    "long port": "listen: 127.0.0.1:" + "9" * 5000 + "\n" + ROUTE,
    "extreme floats": ROUTE
    + "    breaker: {backoff_multiplier: 1e999, jitter: .nan, failure_rate: -.inf,"
    " open_duration: 1e-999, slow_call_duration: .inf, max_open_duration: -0.0}\n",
    "sexagesimal": ROUTE + "    timeouts: {connect: 1:30, request: 190:20:30.15}\n",
    "bad dates": "listen: 2001-13-45\nadmin: 2001-12-14t21:59:43.10+99:99\n" + ROUTE,
    "many documents": "---\nroutes: []\n---\nlisten: x\n",
    "empty": "",
    "only a comment": "# nothing here\n",
    "only a document end": "...\n",
    "only directives": "%YAML 1.1\n---\n",
    "unknown YAML version": "%YAML 9.9\n---\n" + ROUTE,
    "null document": "~\n",
    "scalar document": "hello\n",
    "list document": "- 1\n- [2]\n",
    "block scalars": "listen: |\n  127.0.0.1:80\nadmin: >-\n  {}\n" + ROUTE,
    "value indicator": "=: 1\n" + ROUTE,
    "many unknown keys": "".join(f"k{i}: {i}\n" for i in range(300)) + ROUTE,
    "many routes": "routes:\n"
    + "".join(
        f"  - {{name: r{i}, match: {{path_prefix: /r{i}}}, upstream: 'http://u:1'}}\n"
        for i in range(200)
    ),
}

HOSTILE_VALUES = [
    f"{APPLY} [boom]",
    f"{NEW} {{}}",
    "!!python/name:os.system",
    "!!python/object/apply:os.system [echo never]",
    "!!binary aGVsbG8=",
    "!!binary ===",
    "!!set {a, b}",
    "!!timestamp 2001-12-14 21:59:43.10 -5",
    "!!omap [a: 1, b: 2]",
    "!!str",
    "!local x",
    "*undefined",
    "&anchor [*anchor]",
    "{<<: [1, 2]}",
    "{<<: {x: 1}, x: 2}",
    "{a: 1, a: 2}",
    "{1: a, null: b, [c]: d}",
    "[" * 200 + "]" * 200,
    "9" * 5000,
    "0x" + "f" * 5000,
    "1e999",
    "-.inf",
    ".nan",
    "0o777",
    "0b1010",
    "1_000",
    "1:2:3",
    "~",
    "''",
    '"\\0\\x85\\u2028\\U0010ffff"',
    "'\ufeff'",
    "\ufeff",
    "☃" * 200,
    "x" * 5000,
    "- a",
    ": b",
    "? c",
    "|",
    ">",
    "'unterminated",
    '"unterminated',
    "[unterminated",
    "{unterminated",
    "@reserved",
    "`reserved",
    "%percent",
    "#comment",
    "\t",
    "a\tb",
]

# -- (b) raw text mutations of config.example.yaml ------------------------------------

YAML_CHARACTERS = st.one_of(
    st.sampled_from(list(":-?[]{},&*!|>'\"%@`#\\ \t\n\r\ufeff\u2028\x85")),
    st.characters(blacklist_categories=("Cs",)),  # control characters included
)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    """config.example.yaml with lines deleted, doubled, swapped, cut, indented or garbled."""
    lines = EXAMPLE_TEXT.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = ["\n"]
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        column = draw(st.integers(0, len(line)))
        action = draw(
            st.sampled_from(
                ["delete", "double", "swap", "insert", "cut", "indent", "dedent", "value"]
            )
        )
        if action == "delete":
            del lines[i]
        elif action == "double":
            lines.insert(i, line)
        elif action == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif action == "insert":
            inserted = draw(st.text(YAML_CHARACTERS, min_size=1, max_size=8))
            lines[i] = line[:column] + inserted + line[column:]
        elif action == "cut":
            lines[i:] = [line[:column]]
        elif action == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", "    "])) + line
        elif action == "dedent":
            lines[i] = line.lstrip(" ")
        else:  # a hostile value in place of whatever follows the line's first ": "
            key, sep, _ = line.partition(": ")
            lines[i] = (key + ": " if sep else line.rstrip("\n") + " ") + (
                draw(st.sampled_from(HOSTILE_VALUES)) + "\n"
            )
    return "".join(lines)


@st.composite
def hostile_mixtures(draw: st.DrawFn) -> str:
    """A hostile document before, after or instead of a valid config; or a hostile value."""
    document = draw(st.sampled_from(sorted(HOSTILE_DOCUMENTS.values())))
    value = draw(st.sampled_from(HOSTILE_VALUES))
    key = draw(st.sampled_from(["listen", "admin", "defaults", "routes", "extra", "<<"]))
    return draw(
        st.sampled_from(
            [
                document,
                document + EXAMPLE_TEXT,
                EXAMPLE_TEXT + document,
                f"{key}: {value}\n" + EXAMPLE_TEXT,
                EXAMPLE_TEXT + f"{key}: {value}\n",
                f"{value}\n",
            ]
        )
    )


def without_lines(config: Config) -> Config:
    routes = tuple(dataclasses.replace(route, line=0) for route in config.routes)
    return dataclasses.replace(config, path="", routes=routes)


# -- the properties -------------------------------------------------------------------


def test_the_example_config_is_valid() -> None:
    """The mutations start from a valid config, so they probe the schema, not just YAML."""
    config = check(EXAMPLE_TEXT)
    assert config is not None
    assert [route.name for route in config.routes] == [r["name"] for r in EXAMPLE_DOC["routes"]]
    dumped = check(yaml.safe_dump(EXAMPLE_DOC))
    assert dumped is not None
    assert without_lines(dumped) == without_lines(config)


@FUZZ
@given(example_with_random_values())
def test_random_values_anywhere_in_a_valid_config(text: str) -> None:
    check(text)


@FUZZ
@given(random_documents())
def test_random_documents(text: str) -> None:
    check(text)


@FUZZ
@given(mutated_example())
def test_garbled_example_config(text: str) -> None:
    check(text)


@FUZZ
@given(hostile_mixtures())
def test_hostile_mixtures(text: str) -> None:
    check(text)


@pytest.mark.parametrize("name", sorted(HOSTILE_DOCUMENTS))
def test_hostile_document(name: str) -> None:
    check_within_a_second(HOSTILE_DOCUMENTS[name])


def test_hostile_documents_that_are_valid_stay_valid() -> None:
    """Not everything odd is wrong: BOM, CRLF and merge keys still give the intended config."""
    example = check(EXAMPLE_TEXT)
    assert example is not None
    for name in ("byte order mark", "crlf line ends", "old mac line ends"):
        config = check(HOSTILE_DOCUMENTS[name])
        assert config is not None, name
        assert without_lines(config) == without_lines(example), name
    merged = parse_config(
        "routes:\n  - &first {name: a, match: {path_prefix: /a}, upstream: 'http://a:1'}\n"
        "  - <<: *first\n    name: b\n    match: {path_prefix: /b}\n"
    )
    assert [(r.name, r.path_prefix, r.upstream.url) for r in merged.routes] == [
        ("a", "/a", "http://a:1"),
        ("b", "/b", "http://a:1"),
    ]


def test_an_alias_bomb_is_named_as_such() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(HOSTILE_DOCUMENTS["billion laughs"], FILENAME)
    assert [p.path for p in info.value.problems] == ["(yaml)"]
    assert "alias bomb" in info.value.problems[0].message


# -- never executes anything ------------------------------------------------------------

PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.check_call [[touch, '{marker}']]",
    "!!python/object/apply:os.mkdir ['{marker}']",
    "!!python/object/apply:builtins.open ['{marker}', w]",
]
PLACES = {
    "document": "{payload}\n",
    "top-level value": "listen: {payload}\n" + ROUTE,
    "route breaker": ROUTE + "    breaker: {payload}\n",
    "route list item": "routes: [{payload}]\n",
    "key": "? {payload}\n: 1\n" + ROUTE,
    "merge": ROUTE + "    <<: {payload}\n",
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_python_tags_never_run(tmp_path: Path, payload: str, place: str) -> None:
    marker = tmp_path / "executed"
    text = PLACES[place].replace("{payload}", payload.replace("{marker}", str(marker)))
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILENAME)
    assert not marker.exists(), "the YAML ran code"
    tag = payload.split()[0].removeprefix("!!")  # e.g. python/object/apply:os.system
    assert any(tag in problem.message for problem in info.value.problems), info.value.problems
    for problem in info.value.problems:
        assert_readable(problem, text)


def test_a_tag_directive_does_not_smuggle_python_in(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text = (
        "%TAG !py! tag:yaml.org,2002:python/object/apply:\n---\n"
        f"routes: !py!os.system ['touch {marker}']\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILENAME)
    assert not marker.exists()
    assert "python/object/apply:os.system" in str(info.value)


# -- through the real command line ------------------------------------------------------

CLI_FILES: dict[str, tuple[str | bytes, int]] = {
    "example with a BOM and CRLF": ("\ufeff" + EXAMPLE_TEXT.replace("\n", "\r\n"), 0),
    "billion laughs": (HOSTILE_DOCUMENTS["billion laughs"], 2),
    "python tag": ("listen: !!python/object/apply:os.system ['touch {marker}']\n" + ROUTE, 2),
    "deep nesting": (HOSTILE_DOCUMENTS["deep flow lists"], 2),
    "merge, duplicate and non-string keys": (
        HOSTILE_DOCUMENTS["merge keys"] + "listen: a:1\nlisten: b:2\n1: x\n? [y]\n: z\n",
        2,
    ),
    "binary, set and timestamp": (HOSTILE_DOCUMENTS["binary, set, timestamp"], 2),
    "extreme numbers": (HOSTILE_DOCUMENTS["long hex name"] + "listen: 1e999\n", 2),
    "tabs": (HOSTILE_DOCUMENTS["tab indentation"], 2),
    "not UTF-8": (b"listen: \xff\xfe\n", 2),
}


def run_check(tmp_path: Path, content: str | bytes) -> tuple[subprocess.CompletedProcess[str], str]:
    path = tmp_path / "hostile.yaml"
    # config.example.yaml's certificates, where its relative paths look for them.
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("{marker}", str(tmp_path / "executed")), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, str(path)


def assert_clean_cli(result: subprocess.CompletedProcess[str], path: str) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 0:
        assert result.stdout.startswith(f"{path}: valid"), result.stdout
        return
    *errors, summary = result.stderr.splitlines()
    assert errors, result.stderr
    count = len(errors)
    assert summary == f"sidecar check: {path}: {count} error{'s' * (count != 1)}", result.stderr
    for line in errors:
        assert PROBLEM_LINE.fullmatch(line), line
        assert line.startswith(f"{path}:"), line


@pytest.mark.parametrize("name", sorted(CLI_FILES))
def test_sidecar_check_on_a_hostile_file(tmp_path: Path, name: str) -> None:
    content, code = CLI_FILES[name]
    result, path = run_check(tmp_path, content)
    assert_clean_cli(result, path)
    assert result.returncode == code, result.stderr
    assert not (tmp_path / "executed").exists(), "the YAML ran code"


# -- what this module found, each fixed: the reproducers, now regression tests ------------


def only_problem(text: str) -> str:
    """The one problem `text` has, as `sidecar check` prints it."""
    assert check(text) is None
    with pytest.raises(ConfigError) as info:
        parse_config(text, FILENAME)
    (problem,) = info.value.problems
    return str(problem)


@pytest.mark.parametrize("character", ["\x00", "\x07", "\x7f", "\x9b", "\ufffe"])
def test_control_characters_are_an_error_at_their_line(character: str) -> None:
    """They escaped parse_config as PyYAML's ReaderError (a traceback in `sidecar check`)."""
    problem = only_problem(f"listen: a{character}\n" + ROUTE)
    assert problem == (
        f"{FILENAME}:1: (yaml): invalid YAML: the character {character!r} is not allowed "
        "in a YAML file"
    )


@pytest.mark.parametrize(
    "value", ["!!bool maybe", "!!int ''", "!!float ''", "!!int _", "!!timestamp yesterday"]
)
def test_bad_scalars_for_standard_tags_are_errors(value: str) -> None:
    """SafeConstructor raised KeyError, IndexError or AttributeError on these."""
    problem = only_problem(ROUTE + f"    strip_prefix: {value}\n")
    assert problem.startswith(f"{FILENAME}:5: (yaml): invalid YAML: "), problem
    assert "is not a valid tag:yaml.org,2002:" in problem


def test_an_alias_bomb_inside_a_key_is_never_expanded() -> None:
    """A collection key was built whole (outside MAX_NODES) and printed: 2.6 MB, or a hang."""
    levels = "abcdef"
    items = [f"&a [{', '.join(['x'] * 9)}]"]
    items += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in itertools.pairwise(levels)]
    assert only_problem(f"? [{', '.join(items)}]\n: 1\n" + ROUTE) == (
        f"{FILENAME}:1: (top level): keys must be strings, not collections"
    )


def test_a_route_name_that_is_not_a_string_is_not_quoted_whole() -> None:
    """A 250-byte file once gave a 480 KB error line."""
    levels = "abcde"
    items = [f"&a [{', '.join(['lol'] * 9)}]"]
    items += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in itertools.pairwise(levels)]
    problem = only_problem(ROUTE.replace("name: a", f"name: [{', '.join(items)}]"))
    assert problem.endswith(
        "routes[0].name: a list is not a valid route name: use lower-case letters, "
        "digits, '_' and '-'"
    )


@pytest.mark.parametrize(
    ("key", "shown"), [("a\\nb", "['a\\nb']"), ("a\\rb", "['a\\rb']"), (" x", "[' x']")]
)
def test_odd_keys_are_quoted_in_paths(key: str, shown: str) -> None:
    """A line break in a key split one problem over two lines."""
    problem = only_problem(ROUTE + f'"{key}": 1\n')
    assert problem.startswith(f"{FILENAME}:5: {shown}: unknown key "), problem


def test_a_config_of_10000_routes_is_checked_in_linear_time(tmp_path: Path) -> None:
    """The shadowed-route check compared every pair: 3,000 routes took 3 s, 10,000 far more.

    Now about 1.8 s here for 700 KB (libyaml's parser, and a look-up per route); the
    child is killed after 10 s, which only a quadratic check could take.
    """
    path = tmp_path / "big.yaml"
    path.write_text(
        "routes:\n"
        + "".join(
            f"  - {{name: r{i}, match: {{path_prefix: /r{i}}}, upstream: 'http://u:1'}}\n"
            for i in range(10_000)
        ),
        encoding="utf-8",
    )
    parse_in_a_child(path, 10.0)


@pytest.mark.parametrize(
    "content",
    ["listen: a\x00\n" + ROUTE, ROUTE + "    strip_prefix: !!bool maybe\n"],
    ids=["NUL", "bool"],
)
def test_sidecar_check_reports_them_without_a_traceback(tmp_path: Path, content: str) -> None:
    result, path = run_check(tmp_path, content)
    assert_clean_cli(result, path)
    assert result.returncode == 2
