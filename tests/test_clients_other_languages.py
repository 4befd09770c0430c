"""Clients in other languages against a live server, and the README's generation commands.

examples/clients/node (@grpc/grpc-js + @grpc/proto-loader, the .proto loaded at run time) and
examples/clients/java (protoc + grpc-java's plugin, Debian's jars) each print one line per
step: model info, a streamed greedy Generate, Submit + Stream + Cancel, a bad request and a
short deadline. The tests hold those lines against the server (the Python client's tokens
for the same greedy request, its model info, the status codes).

Toolchains: a missing one is installed only when the tests run as root (CI), bounded in time
(npm ci for Node, apt-get for Java and for protoc's plugins); otherwise, or when that fails
(no registry), the test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO, RunningServer, ServerGroup, wait_for

from client import ShoalClient
from shoal.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(900)

FLAGS = ("--workers", "1", "--max-batch-size", "8", "--kv-cache-mb", "16")
PROMPT = [5, 6, 7, 8, 9]
MAX_NEW_TOKENS = 12
NODE_DIR = REPO / "examples" / "clients" / "node"
JAVA_RUN = REPO / "examples" / "clients" / "java" / "run.sh"
SKIPPED = 77  # run.sh and readme_commands.py: a tool is missing, nothing ran
IS_ROOT = os.geteuid() == 0
STEPS = ["info", "generate", "submit", "cancel", "stream", "bad_request", "deadline"]


def tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


def apt_install(packages: list[str]) -> str | None:
    """apt-get install as root (apt-get update first when the install fails); None when it
    worked, else why not."""
    if not IS_ROOT or not shutil.which("apt-get"):
        return "not root (or no apt-get): toolchains are installed only when tests run as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode == 0:
            return None
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as error:
        return f"{' '.join(install)}: {error}"
    return None if proc.returncode == 0 else f"{' '.join(install)} failed:\n{tail(proc)}"


def parse(output: str) -> dict[str, dict[str, str]]:
    """`step key=value key=value ...` lines -> {step: {key: value}}; a `message=` runs to the
    end of its line, values may hold spaces (device=cpu (numpy))."""
    steps: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        step, _, rest = line.partition(" ")
        rest, _, message = rest.partition("message=")
        fields = dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", rest.strip()))
        if message:
            fields["message"] = message
        steps[step] = fields
    return steps


@pytest.fixture(scope="module")
def server(module_servers: ServerGroup) -> RunningServer:
    # module_servers stops it after the module and checks exit status 0 and no segments left.
    return module_servers.start(*FLAGS)


@pytest.fixture(scope="module")
def node() -> str:
    """node, with examples/clients/node's dependencies installed (`npm ci`)."""
    if not (shutil.which("node") and shutil.which("npm")):
        why = apt_install(["nodejs", "npm"])
        if why or not shutil.which("node"):
            pytest.skip(f"Node.js/npm not found and not installable: {why}")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        if not IS_ROOT:
            pytest.skip(f"run `npm ci` in {NODE_DIR.relative_to(REPO)} (installed only as root)")
        ci = ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
        try:
            proc = subprocess.run(ci, cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci did not finish within 300 s (no registry?)")
        if proc.returncode != 0:
            pytest.skip(f"npm ci failed (no registry?):\n{tail(proc)}")
    return shutil.which("node") or "node"


@pytest.fixture(scope="module")
def java_client() -> Path:
    """run.sh, with the Java client built (Debian's toolchain installed as root if missing)."""

    def build() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(JAVA_RUN), "--build-only"], capture_output=True, text=True, timeout=300
        )

    proc = build()
    if proc.returncode == SKIPPED:
        packages = subprocess.run(
            [str(JAVA_RUN), "--packages"], capture_output=True, text=True, check=True
        ).stdout.split()
        why = apt_install(packages)
        if why:
            pytest.skip(f"Java toolchain missing ({proc.stderr.strip()}), not installable: {why}")
        proc = build()
        if proc.returncode == SKIPPED:
            pytest.skip(f"Java toolchain still incomplete: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"building the Java client failed:\n{tail(proc, 40)}"
    return JAVA_RUN


def check_client_output(output: str, server: RunningServer) -> None:
    steps = parse(output)
    assert list(steps) == STEPS, output
    stub = server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert steps["info"] == {
        "name": info.name,
        "architecture": info.architecture,
        "vocab_size": str(info.vocab_size),
        "max_context": str(info.max_context),
        "eos_token_ids": ",".join(map(str, info.eos_token_ids)),
        "device": info.device,
    }

    # The same greedy request through the Python client: the same tokens.
    with ShoalClient(server.target, timeout=30) as shoal:
        reference = shoal.generate_text(
            prompt_token_ids=PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True
        )
    assert len(reference.token_ids) == MAX_NEW_TOKENS
    assert steps["generate"] == {
        "token_ids": ",".join(map(str, reference.token_ids)),
        "finish_reason": "FINISH_REASON_LENGTH",
    }

    # Submit + Stream + Cancel: cancelled after its first tokens, long before its 2000.
    request_id = steps["submit"]["request_id"]
    assert request_id
    assert steps["cancel"] == {"cancelled": "true"}
    assert steps["stream"]["request_id"] == request_id
    assert steps["stream"]["finish_reason"] == "FINISH_REASON_CANCELLED"
    assert 1 <= int(steps["stream"]["tokens"]) < 2000

    assert steps["bad_request"]["code"] == "INVALID_ARGUMENT"
    assert "temperature" in steps["bad_request"]["message"]
    assert steps["deadline"] == {"code": "DEADLINE_EXCEEDED"}

    # The cancelled request and the one whose deadline passed no longer hold a slot.
    def idle() -> bool:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
        return stats.total.active_sequences == 0 and stats.pending_queue_length == 0

    wait_for(idle, 30, "the server is idle after the client's cancel and deadline")


def run_client(command: list[str], cwd: Path) -> str:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command[0]} client failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def client_args(server: RunningServer) -> list[str]:
    ids, most = ",".join(map(str, PROMPT)), str(MAX_NEW_TOKENS)
    return ["--target", server.target, "--prompt-token-ids", ids, "--max-new-tokens", most]


def test_node_client(node: str, server: RunningServer) -> None:
    output = run_client([node, "client.js", *client_args(server)], NODE_DIR)
    check_client_output(output, server)


def test_java_client(java_client: Path, server: RunningServer) -> None:
    output = run_client([str(java_client), *client_args(server)], REPO)
    check_client_output(output, server)


def test_readme_generation_commands() -> None:
    """`make clients`: the README's Go / ts-proto / protobuf-es / buf commands, as written.
    Quick (about 2 s once its tools are cached, 5-10 s the first time)."""
    script = REPO / "examples" / "clients" / "readme_commands.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--skip-unavailable"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode == SKIPPED:
        pytest.skip(tail(proc, 3))
    assert proc.returncode == 0, tail(proc, 40)
    assert "README generation commands OK" in proc.stdout
