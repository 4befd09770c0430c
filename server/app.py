"""Start the front: gRPC server, health, reflection, workers; drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import logs
from server.config import ServerConfig
from server.frontend import Frontend
from server.http_api import build_http_app, served_model_id
from server.reflection import enable_reflection
from server.servicer import AuthInterceptor, InferenceServicer, MetricsInterceptor
from server.worker_pool import WorkerPool
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("shoal")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


async def serve(config: ServerConfig, started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM / SIGINT, then drain and return (the process exits 0).

    SystemExit with the reason when it cannot serve at all: the model path is
    missing, the port is taken, or no worker could load the model.
    """
    if not Path(config.model).exists():
        raise SystemExit(f"--model {config.model}: no such file or directory")
    stop = asyncio.Event()
    fatal: list[str] = []

    def give_up(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    engine = WorkerPool(config.model, config.engine, config.workers, config.ring_bytes, give_up)
    frontend = Frontend(config, engine)

    # Metrics first: the outermost interceptor also counts the calls auth refuses.
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(frontend.metrics)]
    if config.auth_token:
        interceptors.append(AuthInterceptor(config.auth_token))
    # No SO_REUSEPORT: a second server on a taken port must fail, not share it silently.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE, health.SERVICE_NAME), server)  # v1 and v1alpha
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as err:  # grpc reports a taken port this way
        raise SystemExit(f"--port {config.port} on {config.host}: {err}") from None
    address = f"{config.host}:{port}"

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )

    def set_health(ok: bool) -> None:
        status = serving if ok else not_serving
        for name in ("", SERVICE):
            asyncio.get_running_loop().create_task(health_servicer.set(name, status))

    frontend.on_health_change = set_health
    set_health(False)
    if config.metrics_port:
        try:
            frontend.metrics.serve(config.host, config.metrics_port)
        except OSError as err:
            raise SystemExit(f"metrics port {config.metrics_port}: {err}") from err
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    http = start_http(config, frontend) if config.http_port else None
    await server.start()
    frontend.start()
    log.info("shoal listening on %s (model %s, %d workers)", address, config.model, config.workers)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started.set()
    await stop.wait()

    log.info("draining: up to %.0f s for running requests", config.drain_grace_s)
    await frontend.drain()
    if http is not None:
        await http.stop()
    await server.stop(grace=1.0)
    frontend.metrics.close()
    if fatal:
        raise SystemExit(f"shoal: {fatal[0]}")
    log.info("stopped")


class _QuietServer(uvicorn.Server):
    """uvicorn inside our loop: the front owns SIGTERM / SIGINT (drain), not uvicorn."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


class HttpFront:
    """The OpenAI-compatible API on its own port, served in this event loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task) -> None:
        self.server, self.task = server, task

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


def start_http(config: ServerConfig, frontend: Frontend) -> HttpFront:
    """Bind the port now (a taken port fails the start) and serve it in the background."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY (no 40 ms delayed-ACK wait per answer).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.http_port))
    except OSError as err:
        raise SystemExit(f"--http-port {config.http_port} on {config.host}: {err}") from None
    model_id = config.served_model_name or served_model_id(config.model)
    app = build_http_app(frontend, model_id, config.auth_token)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = _QuietServer(uv)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    log.info(
        "OpenAI-compatible API and chat page on http://%s:%d/ (model id %s)", host, port, model_id
    )
    return HttpFront(server, task)


def main(argv: list[str] | None = None) -> int:
    try:
        config = ServerConfig.from_args(argv)
    except ValueError as err:
        print(f"python -m server: {err}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    asyncio.run(serve(config))
    return 0
