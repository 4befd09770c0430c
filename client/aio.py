"""asyncio client over one grpc.aio channel; create it inside the event loop that uses it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Unpack

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import Pem, Target, auth_metadata, channel_credentials, channel_target
from client.errors import ShoalError
from client.request import RequestParams, build_request
from client.sync import DEFAULT_TARGET
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


class AsyncShoalClient:
    """The asyncio twin of ShoalClient: same arguments, same methods, awaited.
    `generate` and `stream` return async iterators (`async for chunk in ...`).

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
            self._channel = grpc.aio.insecure_channel(self.target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, credentials, options=channel_options
            )
        self._metadata = auth_metadata(auth_token)
        self._wait_for_ready = wait_for_ready
        self.stub = pb_grpc.InferenceStub(self._channel)

    def _call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata,
            "wait_for_ready": self._wait_for_ready,
        }

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, **self._call_kwargs(timeout))
        except grpc.RpcError as err:
            raise ShoalError.from_rpc(err) from err

    def _chunks(
        self, method: Callable[..., Any], request: Any, timeout: float | None
    ) -> AsyncIterator[Chunk]:
        return _iterate(method(request, **self._call_kwargs(timeout)))

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> AsyncIterator[Chunk]:
        """Submit and stream. Breaking out early leaves the call open until the iterator is
        closed or collected: wrap it in contextlib.aclosing() to cancel the request at once."""
        return self._chunks(self.stub.Generate, build_request(prompt, **params), timeout)

    async def generate_text(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> Completion:
        builder = CompletionBuilder()
        async for chunk in self.generate(prompt, timeout=timeout, **params):
            builder.add(chunk)
        return builder.build()

    async def submit(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> str:
        request = build_request(prompt, **params)
        return (await self._unary(self.stub.Submit, request, timeout)).request_id

    def stream(
        self, request_id: str, from_index: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[Chunk]:
        request = pb.StreamRequest(request_id=request_id, from_index=from_index)
        return self._chunks(self.stub.Stream, request, timeout)

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        request = pb.CancelRequest(request_id=request_id)
        return (await self._unary(self.stub.Cancel, request, timeout)).cancelled

    async def stats(self, *, timeout: float | None = None) -> Stats:
        msg = await self._unary(self.stub.GetStats, pb.GetStatsRequest(), timeout)
        return stats_from_pb(msg)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status by name: "SERVING" once a worker is ready,
        "NOT_SERVING" while none is or while draining. `service`: "" (the server as a
        whole) or "shoal.v1.Inference"; another name fails NOT_FOUND (a ShoalError)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._unary(stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        msg = await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return model_info_from_pb(msg)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel connects; TimeoutError if it doesn't in time."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError as err:
            raise TimeoutError(f"no connection to {self.target} within {timeout} s") from err

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncShoalClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _iterate(call: Any) -> AsyncIterator[Chunk]:
    try:
        async for msg in call:
            yield chunk_from_pb(msg)
    except grpc.RpcError as err:
        raise ShoalError.from_rpc(err) from err
    finally:
        call.cancel()  # no-op once the stream has ended; aborts it if the consumer left
