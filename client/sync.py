"""Blocking client over one grpc channel (thread-safe, like the channel itself)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import Pem, Target, auth_metadata, channel_credentials, channel_target
from client.errors import ShoalError
from client.request import RequestParams, build_request
from client.types import (
    Chunk,
    Completion,
    CompletionBuilder,
    ModelInfo,
    Stats,
    chunk_from_pb,
    model_info_from_pb,
    stats_from_pb,
)
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class ShoalClient:
    """Sync client. `target` is "host:port", several ("a:1,b:2" or a list; balanced
    round_robin) or "dns:///name:port". `timeout` (seconds) is the default deadline of every
    call, None = none; a method's own `timeout=` overrides it. `wait_for_ready` makes calls
    wait for a server that isn't up yet instead of failing UNAVAILABLE at once.

    TLS: `tls_ca` (the CA that signed the server's certificate; a path or PEM bytes), and
    for mutual TLS `tls_cert` + `tls_key` (this client's certificate); `tls=True` alone uses
    the system's roots. Without any of them the channel is plaintext.

    Failed calls raise `ShoalError` (a grpc.RpcError with `.code` and `.details`)."""

    def __init__(
        self,
        target: Target = DEFAULT_TARGET,
        *,
        auth_token: str | None = None,
        timeout: float | None = None,
        wait_for_ready: bool = False,
        options: Iterable[tuple[str, str | int]] = (),
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
    ) -> None:
        credentials = channel_credentials(tls_ca, tls_cert, tls_key, tls=tls)
        tls = credentials is not None
        self.target, channel_options = channel_target(target, options, tls=tls)
        self.timeout = timeout
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=channel_options)
        self._metadata = auth_metadata(auth_token)
        self._wait_for_ready = wait_for_ready
        self.stub = pb_grpc.InferenceStub(self._channel)  # raw access, e.g. for odd requests

    def _call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata,
            "wait_for_ready": self._wait_for_ready,
        }

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return method(request, **self._call_kwargs(timeout))
        except grpc.RpcError as err:
            raise ShoalError.from_rpc(err) from err

    def _chunks(
        self, method: Callable[..., Any], request: Any, timeout: float | None
    ) -> Iterator[Chunk]:
        # The call starts here, not on first next(), so the request is queued at once;
        # its errors still surface while iterating.
        call = method(request, **self._call_kwargs(timeout))
        return _iterate(call)

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> Iterator[Chunk]:
        """Submit and stream. Leaving the loop early (break, exception) cancels the call, and
        the server aborts the request."""
        return self._chunks(self.stub.Generate, build_request(prompt, **params), timeout)

    def generate_text(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> Completion:
        builder = CompletionBuilder()
        for chunk in self.generate(prompt, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    def submit(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> str:
        """Enqueue and return the request id at once; attach later with stream()."""
        request = build_request(prompt, **params)
        return self._unary(self.stub.Submit, request, timeout).request_id

    def stream(
        self, request_id: str, from_index: int = 0, *, timeout: float | None = None
    ) -> Iterator[Chunk]:
        """Replay a submitted request from token `from_index`, then follow it live.
        Leaving early detaches this listener only."""
        request = pb.StreamRequest(request_id=request_id, from_index=from_index)
        return self._chunks(self.stub.Stream, request, timeout)

    def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        """True if the request was aborted, False if it had already finished."""
        request = pb.CancelRequest(request_id=request_id)
        return self._unary(self.stub.Cancel, request, timeout).cancelled

    def stats(self, *, timeout: float | None = None) -> Stats:
        return stats_from_pb(self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status by name: "SERVING" once a worker is ready,
        "NOT_SERVING" while none is or while draining. `service`: "" (the server as a
        whole) or "shoal.v1.Inference"; another name fails NOT_FOUND (a ShoalError)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._unary(stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        msg = self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return model_info_from_pb(msg)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects; TimeoutError if it doesn't in time."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as err:
            raise TimeoutError(f"no connection to {self.target} within {timeout} s") from err

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ShoalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _iterate(call: Any) -> Iterator[Chunk]:
    try:
        for msg in call:
            yield chunk_from_pb(msg)
    except grpc.RpcError as err:
        raise ShoalError.from_rpc(err) from err
    finally:
        call.cancel()  # no-op once the stream has ended; aborts it if the consumer left early
