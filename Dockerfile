# shoal server image: `python -m server`, configured from the environment.
#
#   CPU (default):   docker build -t shoal .
#   GPU (CUDA 12):   docker build -t shoal:gpu \
#                        --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                        --build-arg EXTRAS=gpu .
#
# BASE_IMAGE may be any Debian or Ubuntu image. If it has no Python with venv
# support (the CUDA runtime images have none), Python is installed with apt and
# must be >= 3.11 (Ubuntu 24.04: 3.12; Ubuntu 22.04's 3.10 is too old).
# Dependencies always go into the virtual environment /opt/venv (Debian's own
# Python refuses system-wide pip installs). EXTRAS names extras from
# pyproject.toml ("gpu" adds CuPy). Only plain Dockerfile syntax is used, so the
# classic builder (docker-compose 1.29) and BuildKit both build it.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG EXTRAS=""
# Package-index settings for builds behind a proxy or a private index. Declared
# without defaults, so they are unset in the build unless passed with
# --build-arg. (HTTP_PROXY, HTTPS_PROXY, NO_PROXY and their lowercase forms are
# predefined build args and need no declaration.)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Python (only where the base lacks it), the venv, and the unprivileged user.
RUN set -eu; \
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "shoal needs Python >= 3.11; BASE_IMAGE has %d.%d" % v[:2])'; \
    python3 -m venv /opt/venv; \
    useradd --uid 10001 --user-group --create-home --home-dir /home/shoal \
        --shell /usr/sbin/nologin shoal; \
    mkdir -p /models; \
    chown shoal:shoal /models

WORKDIR /app

# Dependencies first, read from pyproject.toml (the one list of them), so this
# layer is rebuilt only when pyproject.toml changes, not on every code edit.
COPY pyproject.toml ./
RUN set -eu; \
    python -c 'import os, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = os.environ.get("EXTRAS", "").replace(",", " ").split(); \
reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]; \
open("/tmp/requirements.txt", "w").write("\n".join(reqs) + "\n")'; \
    cat /tmp/requirements.txt; \
    pip install --no-cache-dir -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

# The project itself: stubs generated from the proto (as `make protos` does),
# then `pip install .` (dependencies are already in place).
COPY README.md ./
COPY protos ./protos
COPY server ./server
COPY worker ./worker
COPY client ./client
COPY examples ./examples
RUN set -eu; \
    python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/shoal/v1/*.proto; \
    pip install --no-cache-dir --no-deps .; \
    rm -rf build ./*.egg-info; \
    python -c 'import server.app, client, worker.model'

USER shoal

# The default model: a small random-weight Llama checkpoint (nothing downloaded).
# The entrypoint writes it again at start if /models is an empty volume.
RUN python -m worker.random_checkpoint --preset default --out /models/default

ENV HOST=0.0.0.0 \
    PORT=50051 \
    MODEL=/models/default \
    NUM_WORKERS=1 \
    DEVICE=auto \
    BATCH_SIZE=32 \
    MAX_QUEUE_LEN=1024

EXPOSE 50051 9090

# SERVING only once the workers are ready (grpc.health.v1); health stays open when auth is on.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; r = hg.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('PORT', '50051'))).Check(h.HealthCheckRequest(), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]

# Writes the default model when MODEL is /models/default and the volume there is
# empty, then execs the command, so the server gets SIGTERM and drains.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$MODEL\" = /models/default ] && [ ! -f /models/default/shoal_checkpoint.json ]; then python -m worker.random_checkpoint --preset default --out /models/default || exit 1; fi; exec \"$@\"", "shoal-entrypoint"]
CMD ["python", "-m", "server"]
