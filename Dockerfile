# sidecar: a circuit-breaker reverse proxy, as a container next to your service.
#   podman build -t sidecar .
#   podman run --rm -p 8080:8080 -v ./my.yaml:/etc/sidecar/config.yaml:ro sidecar
# deploy/container-smoke.sh builds and proves it (non-root, read-only root filesystem).

# Build stage: install the package and its dependencies into a virtual environment.
# A venv works the same on python:3.11-slim (/usr/local/bin/python3) and on a Debian
# python3 (/usr/bin/python3, which refuses a system-wide pip install: PEP 668), and
# the runtime stage then copies one directory.
FROM python:3.11-slim AS build
RUN python3 -m venv /opt/sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# pip and setuptools only build; the runtime image does not need them in the venv.
RUN /opt/sidecar/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/sidecar/bin/pip uninstall --yes --disable-pip-version-check pip setuptools

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_CONFIG=/etc/sidecar/config.yaml
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
# The same path as in the build stage: the venv's scripts name their interpreter by it.
COPY --from=build /opt/sidecar /opt/sidecar
# The example config serves until you mount your own over it, with the demo
# certificates it names (relative to itself) for its HTTPS route.
COPY config.example.yaml /etc/sidecar/config.yaml
COPY examples/tls/ca.pem examples/tls/client.pem examples/tls/client-key.pem \
    /etc/sidecar/examples/tls/
USER 10001
# 8080: the proxy; 9901: /metrics, /healthz, /readyz, /breakers. Set admin.listen to
# 0.0.0.0:9901 in your config for Prometheus to reach the admin listener from outside
# (deploy/kubernetes/ and deploy/compose/ do).
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run"]
