#!/usr/bin/env bash
# Build the sidecar image with podman and prove it works the way it is meant to run:
# as a non-root user, read-only root filesystem, no capabilities, no privilege
# escalation. Proves /healthz, /readyz, /metrics, the image's HEALTHCHECK and a
# proxied request, prints the image size, and removes its containers on exit.
#
#   bash deploy/container-smoke.sh            (as root; installs what it needs)
#
# Where no registry is reachable, the Dockerfile's base (python:3.11-slim) is made
# from Debian's packages with debootstrap and tagged under that name, so the real
# Dockerfile is built unchanged (--pull=never). Settings, all optional:
#   IMAGE=localhost/sidecar:smoke   PROXY_PORT=18080   ADMIN_PORT=19901
#   DEBIAN_MIRROR=<a Debian archive URL>   REBUILD_BASE=1 (remake the stand-in)
# DEBIAN_MIRROR defaults to the Debian archive this machine's own apt sources name.
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/sidecar:smoke}
PROXY_PORT=${PROXY_PORT:-18080}
ADMIN_PORT=${ADMIN_PORT:-19901}

# The Debian archive this machine's apt already uses: the first URI of a `deb` source
# (one-line or deb822 format) that carries the main suite, not -security or -updates.
machine_debian_archive() {
    {
        grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
            awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i, $(i + 1); break } }'
        awk 'BEGIN { RS = ""; FS = "\n" }
             /(^|\n)Types:[^\n]*deb([[:space:]]|$)/ {
                 uri = ""; suites = ""
                 for (i = 1; i <= NF; i++) {
                     if ($i ~ /^URIs:/) { split($i, f, /[[:space:]]+/); uri = f[2] }
                     if ($i ~ /^Suites:/) { sub(/^Suites:[[:space:]]*/, "", $i); suites = $i }
                 }
                 if (uri != "") print uri, suites
             }' /etc/apt/sources.list.d/*.sources 2>/dev/null
    } | awk '$2 !~ /-(security|updates|backports)/ { print $1; exit }'
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(machine_debian_archive)}
BASE=$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)
# A bare name is Docker Hub's library: import the stand-in under that full name, or
# podman files it under localhost/, where FROM finds it but docker.io/library/... does not.
[[ $BASE == */* ]] && BASE_REF=$BASE || BASE_REF=docker.io/library/$BASE
# runc instead of crun, and limits it need not raise: see deploy/container/containers.conf.
export CONTAINERS_CONF=$PWD/deploy/container/containers.conf
export BUILDAH_ISOLATION=chroot

started=$SECONDS
say() { printf '[%3ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

SIDECAR=sidecar-smoke-$$
UPSTREAM=sidecar-smoke-upstream-$$
work=$(mktemp -d)
cleanup() {
    local status=$?
    if ((status != 0)) && podman container exists "$SIDECAR" 2>/dev/null; then
        echo "--- sidecar logs ---" >&2
        podman logs "$SIDECAR" >&2 || true
    fi
    # One at a time, the upstream first: it joined the sidecar's network namespace,
    # and podman refuses to remove a container that another one depends on.
    for container in "$UPSTREAM" "$SIDECAR"; do
        podman rm --force --time 0 "$container" >/dev/null 2>&1 || true
        if podman container exists "$container" 2>/dev/null; then
            echo "warning: could not remove container $container" >&2
        fi
    done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# -- 1. tools ------------------------------------------------------------------------
missing=()
for tool in podman buildah runc debootstrap curl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- 2. the base image ---------------------------------------------------------------
if [[ -n ${REBUILD_BASE:-} ]] || ! podman image exists "$BASE"; then
    say "making a stand-in for $BASE: debootstrap bookworm with python3, python3-venv, python3-pip and python-is-python3 (the real image has a python command)"
    [[ -n $DEBIAN_MIRROR ]] ||
        fail "no Debian archive among this machine's apt sources: set DEBIAN_MIRROR"
    rootfs=$work/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3 \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
    # As slim as the real base: no package caches, lists or docs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info \
        "$rootfs"/usr/share/locale
    # The build's pip fetches from PyPI. Where this machine reaches it through an
    # intercepting proxy, its CA is in the host's bundle only; trust that bundle in the
    # stand-in (the real python:3.11-slim is used as it comes).
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_REF" >"$work/import.log" 2>&1 || { cat "$work/import.log" >&2; fail "podman import"; }
    rm -rf "$rootfs"
    say "stand-in $BASE_REF imported"
else
    say "base image $BASE is present"
fi

# -- 3. the image --------------------------------------------------------------------
# docker format: the OCI format drops HEALTHCHECK, which this image has.
build_started=$SECONDS
podman build --pull=never --format docker --tag "$IMAGE" . >"$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log" >&2; fail "podman build"; }
say "built $IMAGE in $((SECONDS - build_started)) s"

# The image's own config (config.example.yaml) must be valid.
podman run --rm --no-healthcheck --read-only --cap-drop=ALL --security-opt=no-new-privileges \
    "$IMAGE" check \
    >"$work/check.txt" || { cat "$work/check.txt" >&2; fail "sidecar check on the image's config"; }
say "the image's example config passes sidecar check"

# -- 4. run it -----------------------------------------------------------------------
# The example config, with the one change a container needs (as the Dockerfile says):
# the admin listener on every interface, so that the host reaches it through -p.
config=$work/config.yaml
sed 's/^\(  listen: \)127\.0\.0\.1:9901/\10.0.0.0:9901/' config.example.yaml >"$config"
grep -q '^  listen: 0\.0\.0\.0:9901' "$config" || fail "admin.listen not found in config.example.yaml"
chmod 0644 "$config"

# Locked down as in deploy/kubernetes/: not root, read-only /, no capabilities.
# log-collector.internal, the example's log-shipping upstream, is a second container
# in the sidecar's network namespace (as an app shares a pod with its sidecar).
# The HEALTHCHECK runs below on demand: podman's timer for it needs systemd, and
# podman 4.3 tries to start one whatever --health-interval says (its errors go to
# run.log, shown only if the run fails).
podman run --detach --name "$SIDECAR" --health-interval disable \
    --read-only --cap-drop=ALL --security-opt=no-new-privileges \
    --add-host log-collector.internal:127.0.0.1 \
    --publish "127.0.0.1:$PROXY_PORT:8080" --publish "127.0.0.1:$ADMIN_PORT:9901" \
    --volume "$config:/etc/sidecar/config.yaml:ro" \
    "$IMAGE" >"$work/run.log" 2>&1 || { cat "$work/run.log" >&2; fail "podman run"; }

# The upstream: answers every GET with the path it was asked for.
upstream_py='
import http.server

class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", 9880), Echo).serve_forever()
'
podman run --detach --name "$UPSTREAM" --network "container:$SIDECAR" --no-healthcheck \
    --read-only --cap-drop=ALL --security-opt=no-new-privileges \
    --entrypoint python "$IMAGE" -c "$upstream_py" >/dev/null

admin=http://127.0.0.1:$ADMIN_PORT
proxy=http://127.0.0.1:$PROXY_PORT
for _ in $(seq 100); do
    curl -fsS -o /dev/null "$admin/readyz" 2>/dev/null && break
    podman container inspect --format '{{.State.Running}}' "$SIDECAR" | grep -q true ||
        fail "the sidecar container exited"
    sleep 0.1
done
curl -fsS -o /dev/null "$admin/readyz" || fail "/readyz never answered 200"
say "sidecar ready"
for _ in $(seq 100); do
    podman exec "$UPSTREAM" python -c \
        'import urllib.request; urllib.request.urlopen("http://log-collector.internal:9880/", timeout=1)' \
        2>/dev/null && break
    sleep 0.1
done

# -- 5. prove it ---------------------------------------------------------------------
status=$(podman exec "$SIDECAR" cat /proc/1/status)
uid=$(awk '/^Uid:/ { print $2 }' <<<"$status")
[[ $uid != 0 ]] || fail "the sidecar runs as root"
say "ok: the sidecar process runs as uid $uid"
[[ $(awk '/^CapEff:/ { print $2 }' <<<"$status") =~ ^0+$ ]] || fail "the sidecar has capabilities"
[[ $(awk '/^NoNewPrivs:/ { print $2 }' <<<"$status") == 1 ]] || fail "no_new_privs is not set"
say "ok: no capabilities, no_new_privs set"
if podman exec "$SIDECAR" touch /opt/sidecar/written 2>/dev/null; then
    fail "the root filesystem is writable"
fi
[[ $(podman container inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$SIDECAR") == true ]] ||
    fail "the root filesystem is not read-only"
say "ok: the root filesystem is read-only"

[[ $(curl -sS -o /dev/null -w '%{http_code}' "$admin/healthz") == 200 ]] || fail "/healthz"
say "ok: GET /healthz 200"
podman healthcheck run "$SIDECAR" || fail "the image's HEALTHCHECK fails"
say "ok: the image's HEALTHCHECK passes"

body=$(curl -fsS "$proxy/logs/smoke?n=1") || fail "the proxied request failed"
[[ $body == "upstream saw /ingest/smoke?n=1" ]] || fail "the proxied request got: $body"
say "ok: GET /logs/smoke?n=1 -> log-collector.internal:9880/ingest/smoke?n=1 (200)"
[[ $(curl -sS -o /dev/null -w '%{http_code}' "$proxy/nowhere") == 404 ]] ||
    fail "an unrouted request did not get 404"
say "ok: an unrouted request gets 404"

metrics=$(curl -fsS "$admin/metrics") || fail "/metrics"
grep -q '^sidecar_build_info{' <<<"$metrics" || fail "/metrics has no sidecar_build_info"
grep -Eq '^sidecar_requests_total\{(code="200",route="log-shipping"|route="log-shipping",code="200")\} [1-9]' \
    <<<"$metrics" || fail "/metrics does not count the proxied request"
grep -Eq '^sidecar_breaker_state\{(route="payments",state="closed"|state="closed",route="payments")\} 1' \
    <<<"$metrics" || fail "/metrics has no closed payments breaker"
say "ok: GET /metrics counts the proxied request; every route's breaker is there"

# -- 6. report -----------------------------------------------------------------------
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
say "image $IMAGE: $size bytes ($(numfmt --to=iec-i --suffix=B "$size")); of which the base $BASE: $base_size bytes ($(numfmt --to=iec-i --suffix=B "$base_size"))"
say "PASS"
