"""The gRPC edge: protobuf in, plain values to the Frontend, protobuf out, status codes.

Requests become `RequestFields` (field by field, by name) and finish reasons map to
the wire enum in server/proto_json.py, the proto edge that the offline runner
(`worker.batch`, which may not import gRPC) shares; this module adds the RPCs,
the status codes and the interceptors.

Malformed requests: `add_inference_servicer` registers the RPCs with request
deserializers that never raise. Bytes that are not a request message (not
protobuf, or a string field that is not UTF-8) and messages over
MAX_REQUEST_BYTES get INVALID_ARGUMENT naming the fault (and the limit), with
one log line, instead of gRPC's UNKNOWN and a traceback. gRPC's own receive
limit (SERVER_OPTIONS) is set well above MAX_REQUEST_BYTES, so that its
RESOURCE_EXHAUSTED, which the contract keeps for a full queue, is only reached
by messages over GRPC_RECEIVE_LIMIT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from server.frontend import Frontend, Unavailable, UnknownRequest
from server.memory import TRIM_AFTER_BYTES, trim_soon
from server.metrics import Metrics
from server.pending_queue import QueueFull
from server.proto_json import FINISH_REASONS, fields_from_proto
from server.requests import Chunk, DuplicateRequestId, RequestError, RequestState
from server.validation import InvalidRequest, check_request_id, validate_off_loop
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc
from worker.channel.messages import Status, hit_rate
from worker.channel.types import FinishReason

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 << 20  # a request message (gRPC's usual default), INVALID_ARGUMENT past it
GRPC_RECEIVE_LIMIT = 64 << 20  # gRPC's own limit (RESOURCE_EXHAUSTED): far past ours
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT),
    # No SO_REUSEPORT: a second server on a taken port must fail, not share it silently.
    ("grpc.so_reuseport", 0),
)


class Refused(Exception):
    """Ends an RPC with a non-OK status: raised by the handlers, answered by the guard
    (`_guard_unary` / `_guard_stream`) with `set_code` / `set_details`.

    Not `context.abort`: gRPC keeps the AbortError it raises on the call's RPCState,
    and that error's traceback holds every handler frame, whose `context` holds the
    RPCState: a reference cycle. Each refused call (its request message, with the
    protobuf arena behind it, and every frame's locals) then stayed in memory until a
    full garbage collection, which the collector's object counts rarely trigger: a
    request with 1,500 `messages` left ~90 KB (docs/reliability.md). A Refused is
    caught and dropped before the handler returns, so the call is freed at once.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def chunk_to_proto(chunk: Chunk, completion_tokens: int | None = None) -> pb.GenerateChunk:
    """`completion_tokens`: the request's total, for the last chunk's usage (default: where
    the chunk ends, which is the total unless a Stream asked from past the end)."""
    message = pb.GenerateChunk(
        request_id=chunk.request_id,
        index=chunk.index,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=FINISH_REASONS[chunk.finish_reason],
        logprobs=[
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
            for lp in chunk.logprobs
        ],
    )
    if chunk.finish_reason != FinishReason.NONE:
        completion = completion_tokens
        if completion is None:
            completion = chunk.index + len(chunk.token_ids)
        message.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=completion,
                cached_prompt_tokens=chunk.cached_prompt_tokens,
            )
        )
        message.timing.CopyFrom(
            pb.Timing(queue_ms=chunk.queue_ms, ttft_ms=chunk.ttft_ms, total_ms=chunk.total_ms)
        )
    return message


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> RequestState:
        if not self.frontend.serving:
            reason = "server is draining" if self.frontend.draining else "no worker is ready"
            raise Refused(grpc.StatusCode.UNAVAILABLE, reason)
        try:
            fields = fields_from_proto(request)
            limits, prompts = self.frontend.limits(), self.frontend.prompts
            validated = await validate_off_loop(fields, limits, prompts)
            return self.frontend.submit(validated)
        except (InvalidRequest, DuplicateRequestId) as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except QueueFull as err:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
        except Unavailable as err:
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(err)) from None

    async def _relay(
        self, state: RequestState, from_index: int, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in state.follow(from_index):
                yield chunk_to_proto(chunk, len(state.token_ids))
        except RequestError as err:
            raise Refused(grpc.StatusCode[err.code], str(err)) from None

    async def Submit(self, request, context):
        state = await self._admit(request, context)
        return pb.SubmitResponse(request_id=state.request_id)

    async def Generate(self, request, context):
        state = await self._admit(request, context)
        try:
            async for chunk in self._relay(state, 0, context):
                yield chunk
        finally:
            if not state.finished:  # the call was cancelled or its deadline passed
                self.frontend.cancel(state.request_id)

    async def Stream(self, request, context):
        try:
            check_request_id(request.request_id)
            state = self.frontend.get(request.request_id)
        except InvalidRequest as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except UnknownRequest as err:
            raise Refused(grpc.StatusCode.NOT_FOUND, str(err.args[0])) from None
        if request.from_index > len(state.token_ids) and state.finished:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"from_index {request.from_index} is past the end of the completion "
                f"({len(state.token_ids)} tokens)",
            )
        async for chunk in self._relay(state, request.from_index, context):
            yield chunk

    async def Cancel(self, request, context):
        try:
            check_request_id(request.request_id)
            return pb.CancelResponse(cancelled=self.frontend.cancel(request.request_id))
        except InvalidRequest as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        except UnknownRequest as err:
            raise Refused(grpc.StatusCode.NOT_FOUND, str(err.args[0])) from None

    async def GetStats(self, request, context):
        workers = sorted(self.frontend.workers.values(), key=lambda w: w.index)
        rows = [_worker_row(w.index, w.alive, w.status) for w in workers]
        slots = sum(w.ready.max_batch_size for w in workers if w.alive)
        running = sum(r.active_sequences for r in rows)
        total = pb.WorkerStats(
            worker=-1,
            alive=any(r.alive for r in rows),
            active_sequences=running,
            total_tokens=sum(r.total_tokens for r in rows),
            utilization=running / slots if slots else 0.0,
            queue_length=sum(r.queue_length for r in rows),
            kv_blocks_used=sum(r.kv_blocks_used for r in rows),
            kv_blocks_total=sum(r.kv_blocks_total for r in rows),
            draft_tokens=sum(r.draft_tokens for r in rows),
            accepted_draft_tokens=sum(r.accepted_draft_tokens for r in rows),
            kv_blocks_cached=sum(r.kv_blocks_cached for r in rows),
            prefix_cache_query_tokens=sum(r.prefix_cache_query_tokens for r in rows),
            prefix_cache_hit_tokens=sum(r.prefix_cache_hit_tokens for r in rows),
        )
        total.prefix_cache_hit_rate = hit_rate(
            total.prefix_cache_hit_tokens, total.prefix_cache_query_tokens
        )
        total.draft_acceptance_rate = _acceptance_rate(total)
        return pb.Stats(workers=rows, total=total, pending_queue_length=len(self.frontend.queue))

    async def GetModelInfo(self, request, context):
        model = self.frontend.model
        if model is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "no worker is ready")
        return pb.ModelInfo(
            name=model.model_name,
            architecture=model.architecture,
            vocab_size=model.vocab_size,
            max_context=self.frontend.limits().max_context,
            kv_capacity_tokens=model.kv_capacity_tokens,
            has_chat_template=bool(model.chat_template),
            eos_token_ids=list(model.eos_token_ids),
            device=model.device,
            max_new_tokens_limit=self.frontend.config.max_new_tokens_limit,
        )


class MalformedRequest:
    """What a request deserializer returns for bytes it cannot take (it must not raise:
    gRPC would answer UNKNOWN and log a traceback); the RPC answers INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        self.message = message


def request_deserializer(cls: type[Message]) -> Callable[[bytes], Any]:
    """bytes -> a `cls` message, or a MalformedRequest naming the fault."""
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        if len(data) >= TRIM_AFTER_BYTES:  # its receive buffers, freed by then (server/memory.py)
            trim_soon()
        if len(data) > MAX_REQUEST_BYTES:
            return MalformedRequest(
                f"the {name} message is {len(data)} bytes; at most {MAX_REQUEST_BYTES} "
                f"({MAX_REQUEST_BYTES >> 20} MiB) are allowed"
            )
        try:
            return cls.FromString(data)
        except Exception as err:  # DecodeError; a string field's bad UTF-8 is one too
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            return MalformedRequest(
                f"the request is not a valid {name} message (not protobuf, or a string "
                f"field that is not UTF-8): {reason}"
            )

    return deserialize


def add_inference_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """`add_InferenceServicer_to_server`, with deserializers that turn bad bytes into
    INVALID_ARGUMENT (see the module docstring)."""
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                _guard_stream(method.name, behaviour),
                request_deserializer=request_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _guard_unary(method.name, behaviour),
                request_deserializer=request_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        handlers[method.name] = handler
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62, as generated code
        server.add_registered_method_handlers(service.full_name, handlers)


def _malformed(rpc: str, request: MalformedRequest) -> Refused:
    log.info("%s: malformed request refused: %s", rpc, request.message)
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _answer(context: grpc.aio.ServicerContext, refused: Refused) -> None:
    """End the call with `refused`'s status (sent when the handler returns)."""
    context.set_code(refused.code)
    context.set_details(refused.details)


def _guard_unary(rpc: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def guarded(request, context):  # type: ignore[no-untyped-def]
        try:
            if isinstance(request, MalformedRequest):
                raise _malformed(rpc, request)
            return await behaviour(request, context)
        except Refused as refused:
            _answer(context, refused)
            return None  # gRPC discards the response of a call with a non-OK code

    return guarded


def _guard_stream(rpc: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def guarded(request, context):  # type: ignore[no-untyped-def]
        try:
            if isinstance(request, MalformedRequest):
                raise _malformed(rpc, request)
            async for message in behaviour(request, context):
                yield message
        except Refused as refused:
            _answer(context, refused)

    return guarded


def _worker_row(index: int, alive: bool, status: Status | None) -> pb.WorkerStats:
    row = pb.WorkerStats(worker=index, alive=alive)
    if status is not None:
        row.active_sequences = status.running
        row.total_tokens = status.total_tokens
        row.utilization = status.utilization
        row.queue_length = status.waiting
        row.kv_blocks_used = status.kv_blocks_used
        row.kv_blocks_total = status.kv_blocks_total
        row.draft_tokens = status.draft_tokens
        row.accepted_draft_tokens = status.accepted_draft_tokens
        row.draft_acceptance_rate = _acceptance_rate(row)
        row.kv_blocks_cached = status.kv_blocks_cached
        row.prefix_cache_query_tokens = status.prefix_cache_query_tokens
        row.prefix_cache_hit_tokens = status.prefix_cache_hit_tokens
        row.prefix_cache_hit_rate = status.prefix_cache_hit_rate
    return row


def _acceptance_rate(row: pb.WorkerStats) -> float:
    return row.accepted_draft_tokens / row.draft_tokens if row.draft_tokens else 0.0


SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['Inference'].full_name}/"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every Inference RPC by method and final status code, errors included.

    Installed outermost, so it also sees the calls the auth check refuses.
    Health and reflection are not counted.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        rpc = details.method[len(SERVICE_PREFIX) :]
        done = self.metrics.rpc_done
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def counted_unary(request, context):  # type: ignore[no-untyped-def]
                # The exception's type, not the exception: a local holding the exception
                # would be a reference cycle (exception -> traceback -> this frame -> it),
                # keeping the request and every frame's locals alive until a full gc.
                ended: type[BaseException] | None = None
                try:
                    return await unary(request, context)
                except BaseException as err:
                    ended = type(err)
                    raise
                finally:
                    done(rpc, _status_name(ended, context))

            return handler._replace(unary_unary=counted_unary)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def counted_stream(request, context):  # type: ignore[no-untyped-def]
                ended: type[BaseException] | None = None  # a type: see counted_unary
                try:
                    async for message in stream(request, context):
                        yield message
                except BaseException as err:
                    ended = type(err)
                    raise
                finally:
                    done(rpc, _status_name(ended, context))

            return handler._replace(unary_stream=counted_stream)
        return handler


def _status_name(ended: type[BaseException] | None, context: grpc.aio.ServicerContext) -> str:
    """The status the client sees for a call that raised an `ended` (None: returned)."""
    code = context.code()  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if ended is None:
        return "OK"
    if issubclass(ended, asyncio.CancelledError | GeneratorExit):
        # gRPC cancels the handler both when the client goes and when the deadline passes.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` matches (health stays open)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        if details.method.startswith("/grpc."):  # health and reflection
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self.expected:
            return await continuation(details)
        return _deny(details.method)


def _deny(method: str) -> grpc.RpcMethodHandler:
    """UNAUTHENTICATED, set as the call's status (not context.abort: see Refused)."""
    denied = Refused(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def deny(request, context):  # type: ignore[no-untyped-def]
        _answer(context, denied)

    streaming = method.endswith(("/Stream", "/Generate"))
    if streaming:

        async def deny_stream(request, context):  # type: ignore[no-untyped-def]
            _answer(context, denied)
            return
            yield  # an async generator that yields nothing

        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)
