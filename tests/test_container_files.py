"""Static checks of Dockerfile and docker-compose.yml (no Docker needed).

`make compose-smoke` is the real test; this only catches a broken file or a
setting name the server does not read. The compose checks need PyYAML and are
skipped where it is not installed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server.config import _OPTIONS

ROOT = Path(__file__).resolve().parent.parent
SERVER_ENV = {env for env, _ in _OPTIONS.values()}
# Read by something other than the server (CuPy).
OTHER_ENV = {"CUPY_CACHE_DIR"}
# The health probe: `shoal health` (tests/test_health_command.py runs it).
HEALTH_PROBE = "shoal health --target 127.0.0.1:${PORT:-50051} --timeout 4"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert ("FROM", "${BASE_IMAGE}") in ins
    users = [rest for kw, rest in ins if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(kw == "HEALTHCHECK" and HEALTH_PROBE in rest for kw, rest in ins)
    assert ins[-1] == ("CMD", '["python", "-m", "server"]')
    runs = " ".join(rest for kw, rest in ins if kw == "RUN")
    assert "--no-build-isolation ." in runs and "shoal.v1.inference_pb2_grpc" in runs
    # The default model as `make model` gets it (the real GGUF, or the random fallback),
    # at build and again at start when /models is an empty volume.
    assert ("COPY", "scripts/fetch_model.py ./scripts/fetch_model.py") in ins
    assert "python scripts/fetch_model.py --out /models/default" in runs
    entrypoint = " ".join(rest for kw, rest in ins if kw == "ENTRYPOINT")
    assert "/app/scripts/fetch_model.py --out /models/default" in entrypoint


def test_dockerfile_env_names_are_server_settings() -> None:
    env: dict[str, str] = {}
    for kw, rest in dockerfile_instructions():
        if kw == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    settings = {k: v for k, v in env.items() if k.isupper() and k in SERVER_ENV}
    assert settings["HOST"] == "0.0.0.0"
    assert settings["MODEL"] == "/models/default"
    for name in ("PORT", "NUM_WORKERS", "DEVICE", "BATCH_SIZE", "MAX_QUEUE_LEN"):
        assert name in settings


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models"} <= set(lines)
    # scripts/ stays out except the fetcher the Dockerfile copies (a later `!` line re-includes)
    assert lines.index("!scripts/fetch_model.py") > lines.index("scripts")


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_loads_in_compose_v1_and_v2(compose: dict) -> None:
    # docker-compose 1.29 reads a file without `version` as the Compose
    # Specification (profiles, device reservations); `name` is v2 only.
    assert "version" not in compose
    assert "name" not in compose
    assert set(compose["services"]) == {"shoal", "shoal-gpu", "prometheus"}


def published(service: dict) -> dict[int, str]:
    """Container port -> the host side of its `ports:` entry ("${VAR:-default}")."""
    out = {}
    for entry in service["ports"]:
        host, _, container = str(entry).rpartition(":")
        out[int(container)] = host
    return out


def test_compose_default_service(compose: dict) -> None:
    shoal = compose["services"]["shoal"]
    assert "profiles" not in shoal  # `docker compose up` starts it
    assert any(str(p).endswith(":50051") for p in shoal["ports"])
    assert shoal["shm_size"] == "1gb"
    assert shoal["restart"] == "unless-stopped"
    test = shoal["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"  # run by the container's shell, $PORT read there
    assert test[1].replace("$$", "$").startswith(HEALTH_PROBE), test
    assert "models:/models" in shoal["volumes"]
    assert shoal["environment"]["METRICS_PORT"] == "9090"


@pytest.mark.parametrize(
    ("service", "host_port"),
    [("shoal", "${SHOAL_HTTP_PORT:-8000}"), ("shoal-gpu", "${SHOAL_GPU_HTTP_PORT:-8001}")],
)
def test_compose_publishes_the_http_api(compose: dict, service: str, host_port: str) -> None:
    """The OpenAI-compatible API and chat page: HTTP_PORT inside, published on the host."""
    spec = compose["services"][service]
    env = spec["environment"]
    ports = published(spec)
    assert int(env["HTTP_PORT"]) == 8000 and ports[8000] == host_port
    assert int(env["PORT"]) == 50051 in ports
    assert int(env["METRICS_PORT"]) not in (8000, 50051)  # the server refuses equal ports
    assert env["SERVED_MODEL_NAME"] == "${SERVED_MODEL_NAME:-}"


@pytest.mark.parametrize("service", ["shoal", "shoal-gpu"])
def test_compose_env_names_are_server_settings(compose: dict, service: str) -> None:
    env = compose["services"][service]["environment"]
    assert set(env) <= SERVER_ENV | OTHER_ENV
    assert {"MODEL", "NUM_WORKERS", "DEVICE", "BATCH_SIZE", "MAX_QUEUE_LEN"} <= set(env)


def test_compose_profiles(compose: dict) -> None:
    gpu = compose["services"]["shoal-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["EXTRAS"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
