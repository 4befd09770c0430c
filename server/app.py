"""Start the front: gRPC server, health, reflection, workers; drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
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
from server.servicer import (
    SERVER_OPTIONS,
    AuthInterceptor,
    InferenceServicer,
    MetricsInterceptor,
    add_inference_servicer,
)
from server.worker_pool import WorkerPool
from shoal.v1 import inference_pb2 as pb

log = logging.getLogger("shoal")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


async def serve(config: ServerConfig, started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM / SIGINT, then drain and return (the process exits 0).

    SystemExit with the reason when it cannot serve at all: the model path is
    missing, the port is taken, the TLS files are unusable, or no worker could load the model.
    """
    if not Path(config.model).exists():
        raise SystemExit(f"--model {config.model}: no such file or directory")
    if config.tls_enabled:
        server_ssl_context(config)  # unusable TLS files fail here, before any worker starts
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
    # SERVER_OPTIONS: no SO_REUSEPORT (a taken port must fail), gRPC's receive limit.
    server = grpc.aio.server(interceptors=interceptors, options=list(SERVER_OPTIONS))
    # Not add_InferenceServicer_to_server: bad bytes must get INVALID_ARGUMENT (servicer.py).
    add_inference_servicer(InferenceServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE, health.SERVICE_NAME), server)  # v1 and v1alpha
    credentials = grpc_credentials(config) if config.tls_enabled else None
    try:
        if credentials is None:
            port = server.add_insecure_port(f"{config.host}:{config.port}")
        else:
            port = server.add_secure_port(f"{config.host}:{config.port}", credentials)
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
    log.info(
        "shoal listening on %s%s (model %s, %d workers)",
        address,
        tls_note(config),
        config.model,
        config.workers,
    )

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


def tls_note(config: ServerConfig) -> str:
    if config.tls_client_ca:
        return " with mutual TLS"
    return " with TLS" if config.tls_enabled else ""


def server_ssl_context(config: ServerConfig) -> ssl.SSLContext:
    """The certificate, key and client CA checked as TLS will use them: a start with files
    that are not PEM, or a key that is not the certificate's, fails naming the flag."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as err:
        raise SystemExit(
            f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {err}"
        ) from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, OSError) as err:
            raise SystemExit(f"--tls-client-ca {config.tls_client_ca}: {err}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS on the gRPC port; with a client CA, only clients with a certificate it signed."""
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        ((key, cert),), root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _uvicorn_tls(config: ServerConfig) -> dict[str, object]:
    """uvicorn.Config's TLS settings: it builds its SSLContext from these (PROTOCOL_TLS_SERVER,
    ALPN) and applies it to the sockets given to serve(sockets=...) too."""
    if not config.tls_enabled:
        return {}
    return {
        "ssl_certfile": config.tls_cert,
        "ssl_keyfile": config.tls_key,
        "ssl_ca_certs": config.tls_client_ca or None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
    }


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
    app = build_http_app(frontend, model_id, config.auth_token, config.max_body_bytes)
    uv = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", **_uvicorn_tls(config)
    )
    uv.load()  # now, so a TLS setting uvicorn refuses fails the start
    if config.tls_enabled and uv.ssl is None:
        raise SystemExit("--tls-cert: uvicorn did not set up TLS for the HTTP API")
    server = _QuietServer(uv)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls_enabled else "http"
    log.info(
        "OpenAI-compatible API and chat page on %s://%s:%d/%s (model id %s)",
        scheme,
        host,
        port,
        tls_note(config),
        model_id,
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
