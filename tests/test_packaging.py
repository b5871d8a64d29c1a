"""The repository's own checks: Dockerfile lint, type checking, code style."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is missing: install the test extra (pip install -e '.[test]')")
    return path


def test_dockerfile_is_hadolint_clean() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text  # non-root
    assert "EXPOSE 8080 9901" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "SIDECAR_CONFIG=/etc/sidecar/config.yaml" in text


def test_package_type_checks_strictly() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_and_format() -> None:
    ruff = tool("ruff")
    lint = run(ruff, "check", "sidecar", "tests", "benchmarks")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(ruff, "format", "--check", "sidecar", "tests")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_the_breaker_micro_benchmark_runs() -> None:
    """A few calls only, so that the benchmark never rots; its figures go in the README."""
    result = run(sys.executable, "benchmarks/breaker_micro.py", "--rounds", "2", "--calls", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == [
        "sidecar-time-window",
        "sidecar-count-window",
        "sidecar-consecutive",
        "pybreaker",
    ]


def test_the_policy_micro_benchmark_runs() -> None:
    """A few requests only, so that the benchmark never rots; its figures (issues 14 and 15)
    go in benchmarks/RESULTS.md."""
    result = run(sys.executable, "benchmarks/policy_micro.py", "--rounds", "1", "--requests", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines()[2:7]]
    assert rows == [
        ["plain", "200"],
        ["policies", "200"],
        ["retry", "200"],
        ["rate-limited", "429"],
        ["open", "503"],
    ]
    assert all(f"bar {n}" in result.stdout for n in (1, 2, 3))


def test_the_retry_memory_benchmark_runs() -> None:
    """A few uploads only, so that the benchmark never rots; its figures (issue 15's memory
    bar, with 1,000) go in benchmarks/RESULTS.md."""
    result = run(sys.executable, "benchmarks/retry_memory.py", "--requests", "20", "--hold", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines()[2:5]]
    assert rows == [["retry", "64KiB"], ["plain", "64KiB"], ["retry", "1MiB"]]
    assert result.stdout.count("bar, ") == 2


def test_the_client_micro_benchmark_runs() -> None:
    """Its figures (aiohttp's client against a lean prototype) are issue 5's evidence."""
    result = run(sys.executable, "benchmarks/client_micro.py", "--rounds", "1", "--requests", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert rows == ["aiohttp-session", "lean-prototype"]


def test_the_websocket_echo_benchmark_runs() -> None:
    """Half a second of echoes straight and through the sidecar, so that the benchmark never
    rots; its figures (issue 16, with nginx beside them) go in benchmarks/RESULTS.md."""
    result = run(
        sys.executable,
        "benchmarks/websocket_echo.py",
        "--rounds",
        "1",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--sessions",
        "1,10",
        "--targets",
        "direct,sidecar",
        "--no-quiet",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line.split()[:2]
        for line in result.stdout.splitlines()
        if re.match(r"\s+\d+ (direct|sidecar) ", line)
    ]
    assert rows == [["1", "direct"], ["1", "sidecar"], ["10", "direct"], ["10", "sidecar"]]
    assert "10 sessions, sidecar: " in result.stdout


def test_the_tls_origination_benchmark_runs() -> None:
    """A second of load through each proxy over TLS, so that the benchmark never rots; its
    figures (issue 16) go in benchmarks/RESULTS.md. It needs nginx (the upstream) and wrk."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    missing = [name for name in ("nginx", "wrk") if shutil.which(name, path=sbin) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install -y nginx-light wrk")
    result = run(
        sys.executable,
        "benchmarks/tls_origination.py",
        "--rounds",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--only",
        "nginx-https,sidecar-https",
        "--no-quiet",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith(("nginx-https ", "sidecar-https "))
    ]
    assert rows == ["nginx-https", "sidecar-https"]
    assert "sidecar-https / nginx-https req/s: " in result.stdout
