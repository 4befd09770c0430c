#!/usr/bin/env bash
# make compose-smoke: build the image with docker-compose, start the stack, wait
# for the gRPC health service, query it with the host's client CLI and the
# OpenAI-compatible HTTP API with curl, tear down.
#
# From nothing on a Debian/Ubuntu host, as root: installs docker.io,
# docker-compose, debootstrap and curl with apt if missing, starts dockerd if none is
# running (and stops it again at the end), and builds a local stand-in for the
# Python base image with debootstrap (for hosts that cannot pull from Docker
# Hub), cached as shoal-base:bookworm between runs.
#
# Settings (environment):
#   SMOKE_BASE_IMAGE      base image for the build (default shoal-base:bookworm, the
#                         local debootstrap image; e.g. python:3.11-slim where pulls work)
#   SMOKE_REBUILD_BASE=1  rebuild shoal-base:bookworm even if it exists
#   SMOKE_IMAGE           tag of the built server image (default shoal:smoke)
#   SMOKE_PORT            host port for gRPC (default 50051)
#   SMOKE_HTTP_PORT       host port for the HTTP API (default 8000)
#   SMOKE_METRICS_PORT    host port for the metrics endpoint (default 9464)
#   SMOKE_COMPOSE         compose command (default: `docker compose` if present, else docker-compose)
#   SMOKE_DEBIAN_MIRROR   debootstrap mirror (default http://deb.debian.org/debian)
#   SMOKE_HEALTH_TIMEOUT  seconds to wait for SERVING (default 300)
#   SMOKE_REMOVE_IMAGE=1  also remove the built server image at the end
#   SMOKE_REQUIRE_DOCKER=1  fail (instead of skip) when Docker cannot run on this host
#
# Exit status: 0 passed (or skipped: Docker cannot run here, with the reason), 1 failed.
set -euo pipefail

cd "$(dirname "$0")/.."

PROJECT=shoal-smoke
BASE_IMAGE=${SMOKE_BASE_IMAGE:-shoal-base:bookworm}
LOCAL_BASE=shoal-base:bookworm
IMAGE=${SMOKE_IMAGE:-shoal:smoke}
PORT=${SMOKE_PORT:-50051}
HTTP_PORT=${SMOKE_HTTP_PORT:-8000}
METRICS_PORT=${SMOKE_METRICS_PORT:-9464}
MIRROR=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HEALTH_TIMEOUT=${SMOKE_HEALTH_TIMEOUT:-300}
CLIENT_PY=.venv/bin/python
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

T0=$(date +%s)
STEP_T0=$T0
TIMINGS=()
DOCKERD_PID=""
DOCKERD_LOG=""
POLICY_RC_CREATED=""
ROOTFS=""
STACK_UP=""

log() { printf '[compose-smoke %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
indent() { sed 's/^/    /'; }
fail() {
    log "FAIL: $*"
    exit 1
}
skip() {
    if [[ ${SMOKE_REQUIRE_DOCKER:-0} == 1 ]]; then
        fail "$* (SMOKE_REQUIRE_DOCKER=1)"
    fi
    log "SKIP: $*"
    log "SKIP: the compose smoke test did not run on this host"
    exit 0
}
step() {
    local now
    now=$(date +%s)
    if [[ -n ${STEP_NAME:-} ]]; then
        TIMINGS+=("$(printf '%-28s %5ds' "$STEP_NAME" $((now - STEP_T0)))")
    fi
    STEP_NAME=$1
    STEP_T0=$now
    log "== $1"
}

compose() { "${COMPOSE[@]}" -p "$PROJECT" "$@"; }

# Run a command with its output indented; return the command's own status.
indented() {
    local rc
    set +e
    "$@" 2>&1 | sed -u 's/^/    /'
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

cleanup() {
    local rc=$?
    set +e
    if [[ -n $STACK_UP ]]; then
        if [[ $rc -ne 0 ]]; then
            log "server logs (last 60 lines):"
            compose logs --no-color --tail=60 shoal 2>&1 | sed 's/^/    /'
        fi
        log "tearing down: containers, network, model volume"
        compose down --volumes --remove-orphans >/dev/null 2>&1 || log "warning: compose down failed"
        if [[ ${SMOKE_REMOVE_IMAGE:-0} == 1 ]]; then
            docker image rm "$IMAGE" >/dev/null 2>&1
        fi
    fi
    if [[ -n $ROOTFS && -d $ROOTFS ]]; then
        # debootstrap mounts proc/sys inside the target; never delete through a mount.
        grep -o " $ROOTFS/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf --one-file-system "$ROOTFS"
    fi
    if [[ -n $POLICY_RC_CREATED ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
    fi
    if [[ -n $DOCKERD_LOG && $rc -eq 0 ]]; then
        rm -f "$DOCKERD_LOG"
    elif [[ -n $DOCKERD_LOG ]]; then
        log "dockerd log kept at $DOCKERD_LOG"
    fi
    if [[ $rc -eq 0 ]]; then
        step "done"
        log "timings:"
        printf '    %s\n' "${TIMINGS[@]}"
    fi
    log "total $(($(date +%s) - T0)) s, exit $rc"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_updated=""
apt_install() {
    [[ $(id -u) -eq 0 ]] || fail "need $* but not root: install them, or rerun as root"
    command -v apt-get >/dev/null || fail "need $* and there is no apt-get: install them by hand"
    # Keep the packages' init scripts from starting a docker daemon during the
    # install (there is no systemd here): this script starts and stops its own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    if [[ -z $apt_updated ]]; then
        log "apt-get update"
        timeout 600 apt-get update -q >/dev/null || fail "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive timeout 1200 \
        apt-get install -y -q --no-install-recommends "$@" >/dev/null || fail "apt-get install $* failed"
    if [[ -n $POLICY_RC_CREATED ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=""
    fi
}

# --- 1. tools -----------------------------------------------------------------
step "tools"
[[ -x $CLIENT_PY ]] || fail "$CLIENT_PY not found: run \`make install\` first (make compose-smoke does)"
for p in "$PORT" "$HTTP_PORT" "$METRICS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        fail "port $p is already in use on this host (another server?); set SMOKE_PORT / SMOKE_HTTP_PORT / SMOKE_METRICS_PORT"
    fi
done
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v docker >/dev/null || missing+=(docker.io)
docker info >/dev/null 2>&1 || command -v dockerd >/dev/null || missing+=(docker.io)
if [[ -n ${SMOKE_COMPOSE:-} ]]; then
    read -r -a COMPOSE <<<"$SMOKE_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=(docker-compose)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        skip "missing ${missing[*]} and not root, so cannot install them"
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    apt_install "${missing[@]}"
fi
log "docker: $(docker --version)"
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1))"

# --- 2. docker daemon -----------------------------------------------------------
step "dockerd"
if docker info >/dev/null 2>&1; then
    log "using the running docker daemon"
else
    [[ $(id -u) -eq 0 ]] || skip "no docker daemon is reachable and not root, so cannot start one"
    if [[ -S /var/run/docker.sock ]] && pgrep -x dockerd >/dev/null; then
        fail "a dockerd is running but \`docker info\` fails: $(docker info 2>&1 | tail -1)"
    fi
    DOCKERD_LOG=$(mktemp /tmp/shoal-smoke-dockerd.XXXXXX.log)
    log "starting dockerd (log: $DOCKERD_LOG)"
    dockerd >"$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            DOCKERD_PID=""
            log "dockerd exited during start; its log:"
            tail -n 25 "$DOCKERD_LOG" | sed 's/^/    /'
            skip "dockerd cannot start on this host: $(grep -m1 -iE 'level=(fatal|error)' "$DOCKERD_LOG" || tail -n1 "$DOCKERD_LOG")"
        fi
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s (log: $DOCKERD_LOG)"
    log "dockerd is up: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}' 2>/dev/null)"
fi

# --- 3. base image ------------------------------------------------------------------
step "base image"
if [[ $BASE_IMAGE != "$LOCAL_BASE" ]]; then
    log "base image $BASE_IMAGE (the build pulls it if needed)"
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 && [[ ${SMOKE_REBUILD_BASE:-0} != 1 ]]; then
    log "$LOCAL_BASE exists (cached; SMOKE_REBUILD_BASE=1 rebuilds it)"
else
    [[ $(id -u) -eq 0 ]] || fail "building $LOCAL_BASE with debootstrap needs root"
    command -v debootstrap >/dev/null || apt_install debootstrap
    ROOTFS=$(mktemp -d /var/tmp/shoal-base.XXXXXX)
    log "debootstrap bookworm (minbase + python3, venv, pip) from $MIRROR into $ROOTFS"
    timeout 1500 debootstrap --variant=minbase \
        --include=passwd,ca-certificates,python3,python3-venv,python3-pip \
        bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
        tail -n 20 "$ROOTFS.log" | sed 's/^/    /'
        fail "debootstrap failed (log: $ROOTFS.log)"
    }
    rm -f "$ROOTFS.log"
    # Downloads may go through a TLS-intercepting proxy that only the host's
    # bundle trusts: the image gets the same bundle.
    cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    log "importing $ROOTFS as $LOCAL_BASE"
    tar --numeric-owner -C "$ROOTFS" -c . |
        docker import --change 'CMD ["/bin/bash"]' --message "debootstrap bookworm for shoal compose-smoke" - "$LOCAL_BASE" >/dev/null
    rm -rf --one-file-system "$ROOTFS"
    ROOTFS=""
    log "$LOCAL_BASE: $(docker image inspect --format '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%.0f MB", $1 / 1e6}')"
fi

# --- 4. build ---------------------------------------------------------------------
step "build"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# Proxy and pip settings of this host go to the build (a proxy may be the only way out).
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY http_proxy https_proxy no_proxy all_proxy \
    $(compgen -e | grep '^PIP_' || true); do
    if [[ -n ${!var:-} ]]; then
        build_args+=(--build-arg "$var=${!var}")
    fi
done
if [[ $BASE_IMAGE == "$LOCAL_BASE" && -z ${PIP_CERT:-} ]]; then
    build_args+=(--build-arg "PIP_CERT=$CA_BUNDLE") # the bundle copied in above
fi
export SHOAL_IMAGE=$IMAGE SHOAL_PORT=$PORT SHOAL_HTTP_PORT=$HTTP_PORT SHOAL_METRICS_PORT=$METRICS_PORT
log "${COMPOSE[*]} build ${build_args[*]} shoal"
indented timeout 1800 "${COMPOSE[@]}" -p "$PROJECT" build "${build_args[@]}" shoal ||
    fail "image build failed"
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image build failed: no image $IMAGE"
log "$IMAGE: $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# --- 5. up + health ---------------------------------------------------------------
step "up + health"
STACK_UP=1
indented compose up -d shoal || fail "compose up failed"
cid=$(compose ps -q shoal)
[[ -n $cid ]] || fail "no container for service shoal"
deadline=$(($(date +%s) + HEALTH_TIMEOUT))
status=""
while :; do
    status=$(docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
    [[ $status == "running healthy" ]] && break
    restarts=$(docker inspect --format '{{.RestartCount}}' "$cid")
    case $status in
    exited* | dead* | restarting*) fail "the server container stopped (state: $status, restarts: $restarts)" ;;
    esac
    ((restarts == 0)) || fail "the server container crashed and was restarted $restarts time(s)"
    if (($(date +%s) > deadline)); then
        docker inspect --format '{{range .State.Health.Log}}{{.Output}}{{end}}' "$cid" | tail -n 5 | sed 's/^/    /'
        fail "not healthy within ${HEALTH_TIMEOUT}s (state: $status)"
    fi
    sleep 2
done
log "container ${cid:0:12} is healthy (grpc.health.v1 SERVING)"

# --- 6. client from the host --------------------------------------------------------
step "client"
target=127.0.0.1:$PORT
# The server takes AUTH_TOKEN from this shell (docker-compose.yml); the client, SHOAL_AUTH_TOKEN.
if [[ -n ${AUTH_TOKEN:-} ]]; then
    export SHOAL_AUTH_TOKEN=$AUTH_TOKEN
fi
# Local calls never go through a proxy this host may have set.
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}" NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
log "python -m client --target $target info"
out=$(timeout 60 "$CLIENT_PY" -m client --target "$target" info 2>&1) || {
    indent <<<"$out"
    fail "client info failed"
}
indent <<<"$out"
log "python -m client --target $target generate \"hello\" --max-new-tokens 8"
out=$(timeout 120 "$CLIENT_PY" -m client --target "$target" generate "hello" --max-new-tokens 8 2>&1) || {
    indent <<<"$out"
    fail "client generate failed"
}
indent <<<"$out"
[[ -n $out ]] || fail "client generate printed nothing"
log "python -m client --target $target stats"
indented timeout 60 "$CLIENT_PY" -m client --target "$target" stats || fail "client stats failed"
metrics_url=http://127.0.0.1:$METRICS_PORT/metrics
log "GET $metrics_url"
indented timeout 30 "$CLIENT_PY" -c '
import sys, urllib.request
no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = no_proxy.open(sys.argv[1], timeout=10).read().decode()
lines = [l for l in body.splitlines() if l.startswith(("shoal_generated_tokens_total", "shoal_requests_total"))]
print("\n".join(lines))
sys.exit(0 if any(l.startswith("shoal_generated_tokens_total") for l in lines) else "no shoal_generated_tokens_total")
' "$metrics_url" || fail "metrics endpoint check failed"

# --- 7. the OpenAI-compatible HTTP API, with curl from the host -------------------------
step "http api"
base=http://127.0.0.1:$HTTP_PORT
# The same bearer token as gRPC when AUTH_TOKEN is set (the API key of OpenAI clients).
curl_args=(--silent --show-error --noproxy '*' --max-time 120 --write-out '\n%{http_code}')
if [[ -n ${AUTH_TOKEN:-} ]]; then
    curl_args+=(--header "Authorization: Bearer $AUTH_TOKEN")
fi
# http_ok WHAT PATTERN CURL-ARGS...: the answer must be 200 and contain PATTERN (a glob).
http_ok() {
    local what=$1 pattern=$2 out code
    shift 2
    log "$what"
    out=$(curl "${curl_args[@]}" "$@" 2>&1) || {
        indent <<<"$out"
        fail "$what: curl failed"
    }
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    sed "/^$/d" <<<"$out" | tail -n 4 | indent
    [[ $code == 200 ]] || fail "$what: HTTP $code"
    # shellcheck disable=SC2053 # PATTERN is a glob on purpose
    [[ $out == $pattern ]] || fail "$what: the answer lacks $pattern"
}
json=(--header 'Content-Type: application/json')
http_ok "GET $base/health" '*"ok"*' "$base/health"
http_ok "GET $base/v1/models" '*"object":"list"*' "$base/v1/models"
http_ok "POST $base/v1/chat/completions" '*"object":"chat.completion"*' "${json[@]}" \
    --data '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}' \
    "$base/v1/chat/completions"
http_ok "POST $base/v1/chat/completions (stream)" '*data: \[DONE\]*' "${json[@]}" --no-buffer \
    --data '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": true}' \
    "$base/v1/chat/completions"

# --- 8. graceful stop ---------------------------------------------------------------
step "stop (drain)"
indented compose stop shoal || fail "compose stop failed"
code=$(docker inspect --format '{{.State.ExitCode}}' "$cid")
[[ $code -eq 0 ]] || fail "the server exited with status $code on SIGTERM (expected a clean drain, 0)"
log "server drained and exited 0 on SIGTERM"
log "PASS"
