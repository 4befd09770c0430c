"""Metrics without workers: per-worker accounting, and the RPC counting interceptor."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import generate_latest
from service_harness import wait_for_async

from server.metrics import FINISH_LABELS, Metrics
from server.servicer import AuthInterceptor, MetricsInterceptor
from shoal.v1 import inference_pb2 as pb
from shoal.v1 import inference_pb2_grpc as pb_grpc
from worker.channel.messages import Status
from worker.channel.types import Priority


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def status(active: int, total_tokens: int, preemptions: int = 0) -> Status:
    return Status(
        running=active,
        waiting=0,
        max_batch_size=4,
        kv_blocks_used=active * 2,
        kv_blocks_total=64,
        kv_free_tokens=(64 - active * 2) * 16,
        total_tokens=total_tokens,
        preemptions=preemptions,
        adds_received=active,
        add_tokens_received=0,
    )


def test_worker_counters_stay_monotonic_across_a_restart() -> None:
    metrics = Metrics()
    metrics.worker_ready(0, kv_blocks_total=64)
    metrics.worker_status(0, status(2, 10, preemptions=1))
    metrics.worker_status(0, status(3, 25, preemptions=1))
    assert value(metrics, "shoal_generated_tokens_total", worker="0") == 25
    assert value(metrics, "shoal_batch_utilization", worker="0") == 0.75
    assert value(metrics, "shoal_kv_blocks_used", worker="0") == 6
    metrics.worker_gone(0)
    assert value(metrics, "shoal_worker_up", worker="0") == 0
    assert value(metrics, "shoal_active_sequences", worker="0") == 0
    metrics.worker_ready(0, kv_blocks_total=64)
    metrics.worker_status(0, status(1, 4))  # the new process counts from 0
    assert value(metrics, "shoal_generated_tokens_total", worker="0") == 29
    assert value(metrics, "shoal_preemptions_total", worker="0") == 1
    # A total that went back without a death report (a missed one) still only adds.
    metrics.worker_status(0, status(1, 3))
    assert value(metrics, "shoal_generated_tokens_total", worker="0") == 32


def test_scrape_time_values_and_private_registries() -> None:
    queue = dict.fromkeys(Priority, 0)
    restarts = [0]
    first, second = Metrics(), Metrics()  # a shared (global) registry would refuse this
    first.observe_on_scrape(lambda: queue, lambda: restarts[0])
    queue[Priority.LOW], restarts[0] = 3, 2
    assert value(first, "shoal_queue_length", priority="low") == 3
    assert value(first, "shoal_queue_length", priority="high") == 0
    assert value(first, "shoal_worker_restarts_total") == 2
    assert value(second, "shoal_worker_restarts_total") is None
    for reason in FINISH_LABELS:  # present at 0, so completion-rate ratios exist
        assert value(first, "shoal_requests_finished_total", reason=reason) == 0
    assert b"shoal_requests_finished_total" in generate_latest(first.registry)


class _Servicer(pb_grpc.InferenceServicer):
    async def Submit(self, request, context):  # type: ignore[no-untyped-def]
        if request.prompt == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
        if request.prompt == "slow":
            await asyncio.sleep(10)
        if request.prompt == "bug":
            raise RuntimeError("a bug")
        return pb.SubmitResponse(request_id="r")

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        for index in range(1000):
            yield pb.GenerateChunk(index=index)
            if request.prompt == "gone":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
            await asyncio.sleep(0.01)


async def _exercise(metrics: Metrics) -> None:
    interceptors = [MetricsInterceptor(metrics), AuthInterceptor("secret")]
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_InferenceServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    good = (("authorization", "Bearer secret"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            await stub.Submit(pb.GenerateRequest(prompt="ok"), metadata=good)
            for prompt, metadata, timeout in [
                ("bad", good, None),
                ("slow", good, 0.2),
                ("bug", good, None),
                ("ok", (("authorization", "Bearer wrong"),), None),
            ]:
                with pytest.raises(grpc.RpcError):
                    await stub.Submit(
                        pb.GenerateRequest(prompt=prompt), metadata=metadata, timeout=timeout
                    )
            with pytest.raises(grpc.RpcError):
                async for _ in stub.Generate(pb.GenerateRequest(prompt="gone"), metadata=good):
                    pass
            call = stub.Generate(pb.GenerateRequest(prompt="long"), metadata=good)
            await call.read()
            call.cancel()
            await wait_for_async(  # the server sees the cancellation a moment later
                lambda: value(metrics, "shoal_requests_total", rpc="Generate", code="CANCELLED"),
                2,
                "the cancelled Generate counted",
            )
    finally:
        await server.stop(0)


def test_interceptor_counts_every_rpc_by_its_final_status_code() -> None:
    metrics = Metrics()
    asyncio.run(_exercise(metrics))
    expected = {
        ("Submit", "OK"): 1,
        ("Submit", "INVALID_ARGUMENT"): 1,
        ("Submit", "DEADLINE_EXCEEDED"): 1,
        ("Submit", "UNKNOWN"): 1,
        ("Submit", "UNAUTHENTICATED"): 1,
        ("Generate", "UNAVAILABLE"): 1,
        ("Generate", "CANCELLED"): 1,
    }
    for (rpc, code), count in expected.items():
        assert value(metrics, "shoal_requests_total", rpc=rpc, code=code) == count, (rpc, code)
    counted = sum(
        s.value
        for family in metrics.registry.collect()
        if family.name == "shoal_requests"
        for s in family.samples
        if s.name == "shoal_requests_total"
    )
    assert counted == sum(expected.values())
