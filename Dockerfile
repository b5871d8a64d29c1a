# sidecar: a circuit-breaker reverse proxy, as a container next to your service.
#   podman build -t sidecar .
#   podman run --rm -p 8080:8080 -v ./my.yaml:/etc/sidecar/config.yaml:ro sidecar

# Build stage: turn the source into one wheel, so the runtime image holds only the package.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_CONFIG=/etc/sidecar/config.yaml
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
# The example config serves until you mount your own over it.
COPY config.example.yaml /etc/sidecar/config.yaml
USER 10001
# 8080: the proxy; 9901: /metrics, /healthz, /readyz, /breakers. Set admin.listen to
# 0.0.0.0:9901 in your config for Prometheus to reach the admin listener from outside.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run"]
