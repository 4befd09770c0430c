"""Helpers shared by the tests and the benchmark scripts (scripts/bench_serving.py,
scripts/bench_sweep.py put tests/ on sys.path to import this module).

- `wait_for` / `wait_for_async`: the one polling loop (a condition, a timeout, a message);
- `run_batch`: `python -m worker.batch` over JSONL lines, as a subprocess;
- `start_server` / `RunningServer`: a real `python -m server` on loopback, stopped with SIGTERM;
- `ServerGroup`: servers a test (or a test module) started, stopped and checked at teardown
  (the conftest.py fixtures `servers` and `module_servers` hand one out).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING

T = TypeVar("T")


def _describe(message: str | Callable[[], str]) -> str:
    return message() if callable(message) else message


def wait_for(
    condition: Callable[[], T],
    timeout: float = 10,
    message: str | Callable[[], str] = "condition",
    interval: float = 0.02,
) -> T:
    """Call `condition` until it returns something truthy, and return that.

    TimeoutError (naming `message`, which may be a callable for details known only
    at the end) if it has not within `timeout` seconds. The condition is always
    tried once more at the deadline, so a slow machine only costs time. An
    exception from `condition` ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        late = time.monotonic() >= deadline
        result = condition()
        if result:
            return result
        if late:
            raise TimeoutError(f"not within {timeout} s: {_describe(message)}")
        time.sleep(interval)


async def wait_for_async(
    condition: Callable[[], T],
    timeout: float = 10,
    message: str | Callable[[], str] = "condition",
) -> T:
    """`wait_for` for code on an event loop: the polling runs in a thread, the loop runs on."""
    return await asyncio.to_thread(wait_for, condition, timeout, message)


def run_batch(
    model: Path, tmp_path: Path, lines: list, *flags: str
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`python -m worker.batch` on JSONL `lines` (objects, or raw strings written as they are)."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    args = ["--model", str(model), "--input", str(src), "--output", str(out), "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "worker.batch", *args, "--max-batch-size", "4", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    target: str
    log: Path
    http: str = ""  # http(s)://127.0.0.1:PORT when started with --http-port, else ""
    # With --tls-cert: what channels to it need (grpc.ssl_channel_credentials(CA[, key, cert]))
    credentials: grpc.ChannelCredentials | None = None

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.channel())

    def health(self) -> int:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status

    def segments(self) -> list[str]:
        return [p.name for p in Path("/dev/shm").glob(f"shoal-{self.process.pid}-*")]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(
    model: Path,
    log: Path,
    *flags: str,
    timeout: float = 90,
    http: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
) -> RunningServer:
    """A server on free loopback ports; the HTTP API only with `http=True` (or a --http-port).
    With --tls-cert among the flags, `credentials` are those its health is checked with."""
    port = free_port()
    if "--http-port" not in flags:
        flags = (*flags, "--http-port", str(free_port()) if http else "0")
    http_port = int(flags[flags.index("--http-port") + 1])
    args = [
        sys.executable,
        "-m",
        "server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    scheme = "https" if "--tls-cert" in flags else "http"
    base = f"{scheme}://127.0.0.1:{http_port}" if http_port else ""
    server = RunningServer(process, f"127.0.0.1:{port}", log, base, credentials)

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            return server.health() == SERVING
        except grpc.RpcError:
            return False

    try:
        wait_for(serving, timeout, lambda: f"server is healthy:\n{log.read_text()}", interval=0.2)
    except TimeoutError:
        server.stop()
        raise
    return server


class ServerGroup:
    """Servers started on one model; `stop_all` stops each and checks it exited cleanly
    (exit status 0, no shared-memory segment left behind)."""

    def __init__(self, model: Path, directory: Path) -> None:
        self.model = model
        self.directory = directory
        self.started: list[RunningServer] = []

    def start(
        self,
        *flags: str,
        log: str = "server.log",
        model: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> RunningServer:
        server = start_server(
            model or self.model, self.directory / log, *flags, credentials=credentials
        )
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        faults = []
        for server in self.started:
            try:
                code = server.stop()
            except Exception as error:  # e.g. it ignored SIGTERM: killed, and go on
                faults.append(f"{server.log.name}: {error!r}\n{server.log.read_text()}")
                continue
            if code != 0:
                faults.append(f"{server.log.name}: exit status {code}\n{server.log.read_text()}")
            elif server.segments():
                faults.append(f"{server.log.name}: segments left {server.segments()}")
        self.started.clear()
        assert not faults, "\n".join(faults)
