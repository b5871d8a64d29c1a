"""The deployment kit under deploy/: Kubernetes manifests, the compose try-out, the smoke script;
and the demo certificates config.example.yaml names, which the image carries.

Nothing here starts a container: deploy/container-smoke.sh does that, with podman.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.config import Config, load_config, parse_config

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
COMPOSE = DEPLOY / "compose.yaml"
EXAMPLE = ROOT / "config.example.yaml"
DEMO_CERTS = ROOT / "examples" / "tls"

SIDECAR_USER = 10001
"""The Dockerfile's `USER`."""

CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
"""Kinds kubernetes-validate has no schema for: it only warns about them and exits 0."""

# The PodMonitor's fields as the Prometheus Operator's CRD documents them
# (monitoring.coreos.com_podmonitors.yaml, operator 0.91): a misspelt key in ours
# fails here, as kubernetes-validate --strict would make it fail for a built-in kind.
PODMONITOR_SPEC_FIELDS = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB",
    "fallbackScrapeProtocol", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector",
    "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podMetricsEndpoints",
    "podTargetLabels", "sampleLimit", "scrapeClass", "scrapeClassicHistograms",
    "scrapeNativeHistograms", "scrapeProtocols", "selector", "selectorMechanism", "targetLimit",
}  # fmt: skip
PODMONITOR_ENDPOINT_FIELDS = {
    "authorization", "basicAuth", "bearerTokenSecret", "enableHttp2", "filterRunning",
    "followRedirects", "honorLabels", "honorTimestamps", "interval", "metricRelabelings",
    "noProxy", "oauth2", "params", "path", "port", "portNumber", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout",
    "targetPort", "tlsConfig", "trackTimestampsStaleness",
}  # fmt: skip
PROMETHEUS_DURATION = re.compile(
    r"0|(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)
"""The CRD's pattern for `interval` and `scrapeTimeout` (Prometheus' duration syntax)."""
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def prometheus_seconds(text: str) -> float:
    match = PROMETHEUS_DURATION.fullmatch(text)
    assert match, f"{text!r} is not a Prometheus duration"
    return sum(int(n) * unit for n, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if n)


# -- reading the files --------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in documents(path):
            yield path, doc


def the(kind: str) -> dict[str, Any]:
    """The one manifest of `kind` under deploy/kubernetes/."""
    found = [doc for _, doc in resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the("Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers() -> list[dict[str, Any]]:
    spec = pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def sidecar_container() -> dict[str, Any]:
    """The container that runs the image's entrypoint, `sidecar`."""
    found = [c for c in all_containers() if c.get("args", [None])[0] == "run"]
    assert len(found) == 1, "expected one container with args: [run, ...]"
    return found[0]


def sidecar_configs() -> Iterator[tuple[str, str]]:
    """(name, text) of every sidecar config under deploy/, in files or in ConfigMaps.

    A sidecar config is a YAML mapping with `routes`; Kubernetes objects and the
    compose and Prometheus files have none.
    """
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        name = str(path.relative_to(ROOT))
        for doc in documents(path):
            if doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    embedded = yaml.safe_load(text)
                    if isinstance(embedded, dict) and "routes" in embedded:
                        yield f"{name}[data.{key}]", text
            elif "routes" in doc:
                yield name, path.read_text()


def mounted_config() -> Config:
    """The config the Deployment's sidecar runs with: its ConfigMap's entry."""
    configmap = the("ConfigMap")
    (key,) = configmap["data"]
    return parse_config(configmap["data"][key], f"configmap[{key}]")


# -- Kubernetes -----------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate_strict(path: Path) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip(
            "kubernetes-validate is missing: install the test extra (pip install -e '.[test]')"
        )
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for doc in documents(path):
        resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS and "passed" not in result.stdout:
            # No schema bundled: validated by test_podmonitor_* below instead.
            assert f"Couldn't find schema for kind {doc['kind']}" in result.stdout
        else:
            assert f"passed for resource {resource}" in result.stdout, result.stdout


def test_there_is_a_deployment_service_configmap_and_podmonitor() -> None:
    kinds = sorted(doc["kind"] for _, doc in resources())
    assert kinds == ["ConfigMap", "Deployment", "PodMonitor", "Service"]


def test_grace_period_exceeds_shutdown_grace() -> None:
    """Or the kubelet's SIGKILL cuts the sidecar's drain short."""
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > mounted_config().shutdown_grace


def test_every_container_is_locked_down() -> None:
    pod = pod_spec()
    pod_context = pod.get("securityContext", {})
    assert pod.get("automountServiceAccountToken") is False
    for container in all_containers():
        context = {**pod_context, **container.get("securityContext", {})}
        name = container["name"]
        assert context.get("runAsNonRoot") is True, name
        assert context.get("runAsUser") == SIDECAR_USER, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("capabilities") == {"drop": ["ALL"]}, name
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), name
        assert {"cpu", "memory"} <= resources.get("limits", {}).keys(), name


def test_the_sidecar_is_a_native_sidecar() -> None:
    """Started before the app and stopped after it; strict validation does not check values."""
    sidecar = sidecar_container()
    assert sidecar in pod_spec().get("initContainers", [])
    assert sidecar.get("restartPolicy") == "Always"


def test_probes_and_ports_agree_with_the_mounted_config() -> None:
    config = mounted_config()
    sidecar = sidecar_container()
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
    assert ports["admin"] == config.admin_listen.port
    assert ports["proxy"] == config.listen.port
    # The kubelet and Prometheus reach the admin listener on the pod's address.
    assert config.admin_listen.host in ("0.0.0.0", "::")
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}
    # The app and the sidecar share the pod's network: their ports must not collide.
    all_ports = [p["containerPort"] for c in all_containers() for p in c.get("ports", [])]
    assert len(all_ports) == len(set(all_ports))


def test_the_configmap_is_mounted_where_the_sidecar_reads_it() -> None:
    sidecar = sidecar_container()
    configmap = the("ConfigMap")
    (key,) = configmap["data"]
    (mount,) = sidecar["volumeMounts"]
    assert "subPath" not in mount  # a subPath mount never sees the ConfigMap's updates
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert sidecar["args"] == ["run", "--config", f"{mount['mountPath']}/{key}"]


def test_the_service_selects_the_pods() -> None:
    service = the("Service")
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    app_ports = {p["name"] for c in pod_spec()["containers"] for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in app_ports


def test_podmonitor_uses_only_documented_fields() -> None:
    monitor = the("PodMonitor")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor.keys() <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert spec.keys() <= PODMONITOR_SPEC_FIELDS, spec.keys() - PODMONITOR_SPEC_FIELDS
    assert "selector" in spec  # the CRD's one required field
    assert spec["selector"].keys() <= {"matchLabels", "matchExpressions"}
    assert spec["podMetricsEndpoints"], "no endpoint to scrape"
    for endpoint in spec["podMetricsEndpoints"]:
        unknown = endpoint.keys() - PODMONITOR_ENDPOINT_FIELDS
        assert not unknown, f"not a PodMetricsEndpoint field: {unknown}"
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                prometheus_seconds(endpoint[key])
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            # The operator rejects a timeout longer than the interval.
            interval = prometheus_seconds(endpoint["interval"])
            assert prometheus_seconds(endpoint["scrapeTimeout"]) <= interval


def test_podmonitor_scrapes_the_sidecars_metrics() -> None:
    spec = the("PodMonitor")["spec"]
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    admin_port = next(p for p in sidecar_container()["ports"] if p["name"] == "admin")
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == admin_port["name"]
    assert endpoint.get("path", "/metrics") == "/metrics"


# -- sidecar configs anywhere under deploy/ -------------------------------------------


def test_the_deploy_configs_are_found() -> None:
    names = [name for name, _ in sidecar_configs()]
    assert "deploy/compose/sidecar.yaml" in names
    assert "deploy/kubernetes/configmap.yaml[data.config.yaml]" in names


DEPLOY_CONFIGS = list(sidecar_configs())


@pytest.mark.parametrize(("name", "text"), DEPLOY_CONFIGS, ids=[name for name, _ in DEPLOY_CONFIGS])
def test_every_sidecar_config_under_deploy_passes_check(name: str, text: str) -> None:
    config = parse_config(text, name)  # what `sidecar check` runs; raises ConfigError
    assert config.routes
    # In a container, the admin listener must answer from outside it.
    assert config.admin_listen.host in ("0.0.0.0", "::"), name


def test_the_compose_sidecar_config_passes_the_command_line_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(DEPLOY / "compose/sidecar.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- the compose try-out --------------------------------------------------------------


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def go_seconds(text: str) -> float:
    """Compose's durations (`20s`, `1m30s`)."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert match and any(match.groups()), f"{text!r} is not a duration"
    minutes, seconds = (int(n or 0) for n in match.groups())
    return minutes * 60.0 + seconds


def test_compose_has_app_sidecar_flaky_upstream_and_prometheus() -> None:
    assert set(compose()["services"]) == {"app", "sidecar", "flaky", "prometheus"}


def test_compose_references_files_that_exist() -> None:
    services = compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
        network = service.get("network_mode", "")
        if network.startswith("service:"):
            assert network.removeprefix("service:") in services, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, name


def test_compose_sidecar_is_locked_down_and_drains() -> None:
    sidecar = compose()["services"]["sidecar"]
    assert sidecar["user"] == str(SIDECAR_USER)
    assert sidecar["read_only"] is True
    assert sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]
    config = parse_config((DEPLOY / "compose/sidecar.yaml").read_text())
    assert go_seconds(sidecar["stop_grace_period"]) > config.shutdown_grace


def test_compose_prometheus_scrapes_the_sidecar() -> None:
    config = parse_config((DEPLOY / "compose/sidecar.yaml").read_text())
    prometheus = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    targets = [
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert f"sidecar:{config.admin_listen.port}" in targets
    upstream = next(r.upstream for r in config.routes if r.name == "flaky")
    assert (upstream.host, upstream.port) == ("flaky", 8000)  # flaky_upstream.py's PORT


def test_compose_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (apt-get install prometheus)")
    # Laid out as compose.yaml mounts them: the config and the alert rules side by side.
    with tempfile.TemporaryDirectory() as etc:
        shutil.copy(DEPLOY / "compose/prometheus.yml", Path(etc, "prometheus.yml"))
        shutil.copy(DEPLOY / "prometheus/alerts.yml", Path(etc, "alerts.yml"))
        result = subprocess.run(
            [promtool, "check", "config", str(Path(etc, "prometheus.yml"))],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 17 rules found" in result.stdout, result.stdout


@pytest.mark.parametrize("path", sorted((DEPLOY / "compose").glob("*.py")), ids=lambda p: p.name)
def test_compose_scripts_compile(path: Path) -> None:
    compile(path.read_text(), str(path), "exec")


# -- the example config's demo certificates -----------------------------------------


def example_files() -> list[Path]:
    """The files config.example.yaml names (its routes' `tls:` files), from the repository's
    root."""
    names: set[str] = set()
    for route in load_config(str(EXAMPLE)).routes:
        if route.tls is not None:
            names.update(
                f for f in (route.tls.ca_file, route.tls.cert_file, route.tls.key_file) if f
            )
    return sorted(Path(name).resolve().relative_to(ROOT.resolve()) for name in names)


def test_the_image_carries_the_files_the_example_config_names() -> None:
    """The image starts with config.example.yaml as /etc/sidecar/config.yaml: every file
    it names must be in the build context and copied to the same place beside it, or the
    image's own config fails (`sidecar run` exits 2)."""
    files = example_files()
    assert files, "config.example.yaml names no files: drop this test or the copies"
    included = (ROOT / ".dockerignore").read_text().splitlines()
    copies = [
        line.split()[1:]
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.startswith("COPY ") and "--from" not in line
    ]
    for file in files:
        assert f"!{file}" in included, f".dockerignore leaves {file} out of the build context"
        (copy,) = [args for args in copies if str(file) in args[:-1]]
        assert copy[-1] == f"/etc/sidecar/{file.parent}/", copy


def certificate(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((DEMO_CERTS / name).read_bytes())


@pytest.mark.parametrize(
    ("cert", "key", "usage"),
    [
        ("client.pem", "client-key.pem", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("server.pem", "server-key.pem", ExtendedKeyUsageOID.SERVER_AUTH),
    ],
)
def test_the_demo_certificates_hold_together(
    cert: str, key: str, usage: x509.ObjectIdentifier
) -> None:
    """As examples/tls/make-certs.sh made them: signed by the demo CA, each with its key,
    for its use, and good for years yet (or the example route stops working)."""
    ca = certificate("ca.pem")
    leaf = certificate(cert)
    leaf.verify_directly_issued_by(ca)
    private = load_pem_private_key((DEMO_CERTS / key).read_bytes(), password=None)
    assert leaf.public_key() == private.public_key()
    assert usage in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    in_a_year = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    assert min(ca.not_valid_after_utc, leaf.not_valid_after_utc) > in_a_year, (
        "the demo certificates expire within a year: run examples/tls/make-certs.sh"
    )


def test_the_demo_server_certificate_names_the_example_host() -> None:
    """A stand-in provider on this machine (examples/tls/README.md) passes the name check
    for the example route's host and for 127.0.0.1."""
    names = certificate("server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    (route,) = [r for r in load_config(str(EXAMPLE)).routes if r.tls is not None]
    assert route.host in names.value.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]


# -- the container smoke script -------------------------------------------------------


def test_the_smoke_script_parses() -> None:
    """It is run by hand (it builds an image); here it must at least be valid bash."""
    script = DEPLOY / "container-smoke.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
